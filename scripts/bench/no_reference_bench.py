"""GRPO without KL, with and without the reference model: seconds per iteration and peak RSS.

A run without KL (``ppo.kl.coef`` 0, no adaptive controller, no KL loss) builds no reference
model. ``reference`` runs the code path of before (the reference built and run although nothing
reads it, by patching :meth:`rlhf_ppo.ppo_config.KLConfig.reads_reference`); ``none`` is the
default. Each case is a fresh process (its own peak), the two alternate A B A B, and each
prints one JSON line: the median seconds per iteration after the first (warm-up), the median of
step 3 and the reward pass (``time/score``: where the reference pass ran), and the peak RSS
(``ru_maxrss``, MB).

    python scripts/bench/no_reference_bench.py                         # the built-in tiny model
    python scripts/bench/make_bench_models.py --out bench_models --sizes medium
    python scripts/bench/no_reference_bench.py --models bench_models/medium --iters 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("reference", "none")


def overrides_for(args: argparse.Namespace, out: str) -> list[str]:
    """GRPO without KL on ``args.models`` (a make_bench_models.py size folder: its policy and
    reward model, random-word prompts) or the built-in tiny model and reward."""
    o = [f"output_dir={out}", f"iterations={args.iters}", "save_every=0", "sample_every=0",
         f"threads={args.threads}", "ppo.advantage_estimator=grpo", f"ppo.samples_per_prompt={args.group}",
         f"ppo.batch_size={args.batch}", "ppo.num_minibatches=2", "ppo.ppo_epochs=1",
         "ppo.kl.coef=0", f"generation.max_new_tokens={args.response_len}",
         f"ppo.forward.micro_batch_size={args.batch // 2}",
         f"ppo.forward.inference_batch_size={args.batch}"]
    if args.models:
        m = Path(args.models)
        o += [f"model.name_or_path={m / 'policy'}", f"reward.sources=[{{model: '{m / 'reward'}'}}]",
              f"data.path={args.prompts}", f"data.max_prompt_length={args.prompt_len}"]
    return o


def run_case(args: argparse.Namespace, mode: str) -> None:
    """One case, in this process: build the trainer, train, print the figures."""
    from rlhf_ppo import PPOTrainer, load_config
    from rlhf_ppo.ppo_config import KLConfig

    if mode == "reference":  # the code path of before: built and run, read by nothing
        KLConfig.reads_reference = lambda self: True
    trainer = PPOTrainer(load_config(None, overrides_for(args, tempfile.mkdtemp())))
    history = trainer.train()
    steady = history[1:] or history
    print(json.dumps({
        "mode": mode, "model": args.models or "builtin:tiny",
        "reference_built": trainer.ref is not None,
        "s_per_iter": round(statistics.median(m["time/iteration"] for m in steady), 3),
        "s_score_step": round(statistics.median(m["time/score"] for m in steady), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }), flush=True)


def prompts_file(args: argparse.Namespace, folder: Path) -> str:
    """Random-word prompts of ``--prompt-len`` tokens for the bench models' tokenizer."""
    sys.path.insert(0, str(Path(__file__).parent))
    from benchmark import write_prompts

    return str(write_prompts(folder / "prompts.jsonl", str(Path(args.models) / "policy"), 64,
                             args.prompt_len))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="a make_bench_models.py size folder "
                   "(policy/ and reward/); default: the built-in tiny model")
    p.add_argument("--iters", type=int, default=6, help="iterations per case (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="A B A B rounds")
    p.add_argument("--batch", type=int, default=16, help="responses per iteration")
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--response-len", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", choices=MODES, help=argparse.SUPPRESS)  # one case, in this process
    p.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        run_case(args, args.case)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        forwarded = [a for a in sys.argv[1:]]
        if args.models:
            forwarded += ["--prompts", prompts_file(args, Path(tmp))]
        for _ in range(args.rounds):
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, *forwarded, "--case", mode],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return out.returncode
                print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
