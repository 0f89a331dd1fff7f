"""Worker for the multi-process tests, launched with `torchrun --nproc_per_node N` (accelerate
reads the torchrun environment and sets up gloo on CPU).

    dist_worker.py step OUT OVERRIDES...   one PPO iteration on a fixed rollout of the first
                                           2 * ppo.batch_size * N / 2 prompts, split by rank
    dist_worker.py train OUT OVERRIDES...  a full run (trainer.train())
"""

import json
import sys
from pathlib import Path

import torch

from rlhf_ppo import PPOTrainer, load_config
from rlhf_ppo.rollout import generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    trainer = PPOTrainer(cfg)
    acc = trainer.accelerator
    if acc.is_main_process:
        print(f"engine: {acc.distributed_type} processes={acc.num_processes}", flush=True)
    if mode == "train":
        trainer.train()
        return
    # The same full rollout on every process (same seed, same initial weights, same prompts),
    # then each process keeps its contiguous share: the batch is split, nothing else changes.
    world, rank, b = acc.num_processes, acc.process_index, cfg.ppo.batch_size
    prompts = trainer.sampler.prompts[: b * world]
    torch.manual_seed(1234)
    full = generate(trainer.unwrapped.policy, prompts, trainer.tokenizer, cfg.generation)
    initial = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    metrics = trainer.step(rollout=full.subset(list(range(rank * b, (rank + 1) * b))))
    state = {k: v.detach().cpu() for k, v in trainer.unwrapped.state_dict().items()}
    if acc.is_main_process:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics))
        torch.save(state, Path(out) / "weights.pt")
        torch.save(initial, Path(out) / "initial.pt")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
