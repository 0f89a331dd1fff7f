"""PPO with GAE against the critic-free estimators on the built-in reasoning task
(rlhf_ppo/tasks/reasoning.py), at equal numbers of sampled responses per iteration.

One SFT model is trained once; then every estimator trains from it with the same batch of
responses (``--responses``; GAE: one response per prompt, the group estimators:
``--group`` responses per prompt), the same iterations, learning rate and KL settings, for each
seed. Every run is its own process (peak RSS is per run). It prints a table (final test
accuracy with its spread over seeds, pass@k, seconds per iteration, peak RSS) and draws the
learning curves (training reward = share of correct sampled answers) as a PNG.

    python scripts/bench/estimator_bench.py --output-dir runs/estimator_bench
    python scripts/bench/estimator_bench.py --report-only --output-dir runs/estimator_bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ESTIMATORS = {
    "ppo (gae)": {"ppo.advantage_estimator": "gae"},
    "grpo": {"ppo.advantage_estimator": "grpo"},
    "dr_grpo": {"ppo.advantage_estimator": "dr_grpo",
                "ppo.loss.aggregation": "seq-mean-token-sum-norm"},
    "rloo": {"ppo.advantage_estimator": "rloo"},
    "reinforce_pp": {"ppo.advantage_estimator": "reinforce_pp"},
    "reinforce_pp_baseline": {"ppo.advantage_estimator": "reinforce_pp_baseline"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/estimator_bench")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--responses", type=int, default=256, help="sampled responses per iteration")
    p.add_argument("--group", type=int, default=4, help="responses per prompt (group estimators)")
    p.add_argument("--report-only", action="store_true", help="table and plot from saved runs")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON)
    return p.parse_args(argv)


def shared_stages(out: Path) -> tuple[dict, dict]:
    """Task data, base model and the SFT model under ``out/shared`` (built once); returns the
    task's data paths and its stage configs."""
    from rlhf_ppo import reasoning
    from rlhf_ppo.config import config_from_dict
    from rlhf_ppo.sft import SFTConfig, run_sft

    shared = out / "shared"
    data = reasoning.write_task(shared / "data", **reasoning.TASK)
    if not (shared / "base" / ".complete").is_file():
        reasoning.build_base(shared / "base")
        (shared / "base" / ".complete").write_text("ok\n")
    stages = reasoning.stage_configs(shared, data)
    if not (shared / "sft" / ".complete").is_file():
        run_sft(config_from_dict(stages["sft"], SFTConfig))
        (shared / "sft" / ".complete").write_text("ok\n")
    return data, stages


def run_one(spec: dict) -> dict:
    """Train one estimator for one seed and evaluate it on the test problems."""
    import copy

    import torch

    from rlhf_ppo import PPOTrainer, estimators
    from rlhf_ppo.config import config_from_dict, set_dotted, upgrade_quietly
    from rlhf_ppo.evaluate import EvalConfig, run_evaluate

    torch.set_num_threads(1)
    out = Path(spec["out"])
    data, stages = shared_stages(Path(spec["bench"]))
    # the task's PPO stage in the current layout (a task written before the ``ppo`` sections
    # still works), so the dotted settings below cannot meet an old name for the same key
    ppo = upgrade_quietly(stages["ppo"])
    estimator = estimators.get(spec["overrides"]["ppo.advantage_estimator"])
    group = 1 if estimator.critic else spec["group"]  # GAE: one response per prompt
    settings = {"output_dir": str(out / "ppo"), "seed": spec["seed"], "iterations": spec["iterations"],
                "sample_every": 0, "ppo.batch_size": spec["responses"],
                "ppo.samples_per_prompt": group, "ppo.num_minibatches": 2,
                "ppo.forward.micro_batch_size": spec["responses"] // 2, **spec["overrides"]}
    for key, value in settings.items():
        set_dotted(ppo, key, value)
    t0 = time.perf_counter()
    history = PPOTrainer(config_from_dict(ppo)).train()
    seconds = time.perf_counter() - t0
    ev = copy.deepcopy(stages["eval"])
    ev.update(output_dir=str(out / "eval"), policy=str(out / "ppo" / "final"), plot_training=False,
              seed=spec["seed"])
    summary = run_evaluate(config_from_dict(ev, EvalConfig))
    k = summary["samples_per_prompt"]
    return {
        "estimator": spec["name"], "seed": spec["seed"], "group": group,
        "curve": [m["score_mean"] for m in history],
        "s_per_iter": statistics.median(m["time/iteration"] for m in history),
        "train_seconds": seconds,
        "accuracy": summary["policy"]["accuracy"]["mean"],
        "sft_accuracy": summary["reference"]["accuracy"]["mean"],
        f"pass@{k}": summary["policy"]["pass@k"][str(k)]["mean"],
        "pass@1": summary["policy"]["pass@k"]["1"]["mean"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def report(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/result.json"))]
    if not rows:
        return "no results yet"
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["estimator"], []).append(r)
    k_key = next(k for k in rows[0] if k.startswith("pass@") and k != "pass@1")
    lines = [f"| estimator | responses/prompt | test accuracy (mean ± sd over seeds) | pass@1 | "
             f"{k_key} | s/iter | peak RSS MB | seeds |", "|---|---|---|---|---|---|---|---|"]
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    mean = statistics.mean
    for name in ESTIMATORS:
        rs = by.get(name)
        if not rs:
            continue
        acc = [r["accuracy"] for r in rs]
        lines.append(f"| {name} | {rs[0]['group']} | {mean(acc):.3f} ± {sd(acc):.3f} | "
                     f"{mean(r['pass@1'] for r in rs):.3f} | {mean(r[k_key] for r in rs):.3f} | "
                     f"{mean(r['s_per_iter'] for r in rs):.2f} | "
                     f"{mean(r['peak_rss_mb'] for r in rs):.0f} | {len(rs)} |")
    sft = mean(r["sft_accuracy"] for r in rows)
    lines.append(f"\nSFT model (the start of every run): test accuracy {sft:.3f}.")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name in ESTIMATORS:
            rs = by.get(name)
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            curve = [mean(r["curve"][i] for r in rs) for i in range(n)]
            ax.plot(range(1, n + 1), curve, label=name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training reward (share correct), mean over seeds")
        ax.set_title("reasoning task: PPO (GAE) and critic-free estimators")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "estimators.png", dpi=110)
        lines.append(f"curves: {out / 'estimators.png'}")
    except ImportError:
        lines.append("(matplotlib not installed: no plot)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        result = run_one(spec)
        Path(spec["out"], "result.json").write_text(json.dumps(result) + "\n")
        return 0
    out = Path(args.output_dir)
    if not args.report_only:
        shared_stages(out)  # once, before the runs
        for name in args.estimators:
            for seed in args.seeds:
                run_dir = out / "runs" / f"{name.split()[0]}-seed{seed}"
                if (run_dir / "result.json").is_file():
                    continue
                run_dir.mkdir(parents=True, exist_ok=True)
                spec = dict(name=name, seed=seed, out=str(run_dir), bench=str(out),
                            iterations=args.iterations, responses=args.responses,
                            group=args.group, overrides=ESTIMATORS[name])
                t0 = time.time()
                subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL)
                print(f"{name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    print(report(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
