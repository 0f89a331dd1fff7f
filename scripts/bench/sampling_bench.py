"""Sampling alone: rlhf_ppo's native loop against transformers' ``generate`` on one batch.

    python scripts/bench/sampling_bench.py --policy bench_models/small/policy --batch 16 \
        --prompt-len 16 --response-len 32 [--device cuda --dtype bfloat16] [--profile]

Prints one JSON line per variant (median seconds and generated tokens/s over ``--reps`` runs,
the variants alternating), then the per-step cost of each token-drawing method on a ``(batch,
vocab)`` probability matrix, and with ``--profile`` the busiest operators of both loops
(``torch.profiler`` over ``--profile-steps`` tokens). Every response runs to
``--response-len`` tokens (no stop token), as in ``scripts/bench/benchmark.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="a causal LM folder (scripts/bench/make_bench_models.py)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also profile both loops (short runs)")
    p.add_argument("--profile-steps", type=int, default=16, help="tokens per profiled run")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import rlhf_ppo.rollout as rollout
    from rlhf_ppo.config import GenerationConfig, ModelConfig
    from rlhf_ppo.models import load_tokenizer

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    tok = load_tokenizer(ModelConfig(name_or_path=args.policy))
    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=getattr(torch, args.dtype)).to(dev)
    model.eval()
    g = torch.Generator().manual_seed(0)
    high = min(model.config.vocab_size, len(tok))
    ids = torch.randint(4, high, (args.batch, args.prompt_len), generator=g).to(dev)
    mask = torch.ones_like(ids)
    R = args.response_len

    def configs(n: int):
        cfg = GenerationConfig(max_new_tokens=n, backend="native")
        hf_cfg = rollout.hf_generation_config(cfg, tok, [])
        hf_cfg.eos_token_id, hf_cfg.min_new_tokens = None, None
        return cfg, hf_cfg

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    real_draw = rollout.draw

    def native(method, n=R):
        cfg = configs(n)[0]

        def run():
            rollout.draw = lambda probs: real_draw(probs, method)
            try:
                with torch.no_grad():
                    out = rollout.sample_native(model, ids, mask, cfg, [], tok, record=False)
            finally:
                rollout.draw = real_draw
            assert out["response_ids"].shape[1] == n
        return run

    def hf(n=R):
        hf_cfg = configs(n)[1]

        def run():
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_cfg)
            assert out.shape[1] == args.prompt_len + n
        return run

    variants = {"generate": hf(), "native/cdf": native("cdf"), "native/race": native("race")}
    times = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        s = statistics.median(ts)
        print(json.dumps({"variant": name, "device": str(dev), "batch": args.batch, "response_len": R,
                          "s": round(s, 4), "all_s": [round(t, 4) for t in ts],
                          "gen_tokens_per_s": round(args.batch * R / s, 1),
                          "ms_per_step": round(1000 * s / R, 3)}), flush=True)

    probs = torch.softmax(torch.randn(args.batch, model.config.vocab_size, device=dev), -1)
    draws = {"cdf": lambda: real_draw(probs, "cdf"), "race": lambda: real_draw(probs, "race"),
             "multinomial": lambda: torch.multinomial(probs, 1)}
    row = {}
    for name, fn in draws.items():
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        sync()
        row[name] = round((time.perf_counter() - t0) / 20 * 1000, 3)
    print(json.dumps({"draw_ms_per_step": row, "shape": list(probs.shape)}), flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        short = {"native/race": native("race", args.profile_steps), "generate": hf(args.profile_steps)}
        for name, fn in short.items():
            with profile(activities=acts) as prof:
                fn()
                sync()
            key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            print(f"== {name}: by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=40))
            print(f"== {name}: by self_cpu_time_total")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10,
                                            max_name_column_width=40))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
