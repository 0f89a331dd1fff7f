"""Opt-in check of the FSDP2 path on CPU (gloo): accelerate only enables FSDP for GPU launches,
so this forces its FSDP2 plugin onto a multi-CPU run, does one PPO iteration on a fixed rollout
(generation through the unsharded policy, sharded update, gathered save) and writes the metrics.
Compare with a one-process run of tests/dist_worker.py on the same settings.

    torchrun --standalone --nproc_per_node 2 scripts/check_fsdp_cpu.py OUT key=value ...

FSDP2 processes on gloo sometimes abort at exit after finishing; judge the run by its outputs.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from rlhf_ppo import PPOTrainer, load_config
from rlhf_ppo.distributed import generation_model, gradient_accumulation_steps
from rlhf_ppo.rollout import generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out, *overrides = sys.argv[1:]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps(cfg))
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
    # What a GPU launch would have set (PartialState too: AcceleratorState copies it back).
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    trainer = PPOTrainer(cfg, accelerator=acc)
    world, rank, b = acc.num_processes, acc.process_index, cfg.ppo.batch_size
    prompts = trainer.sampler.prompts[: b * world]
    torch.manual_seed(1234)
    with generation_model(acc, trainer.model) as policy:
        full = generate(policy, prompts, trainer.tokenizer, cfg.generation)
    metrics = trainer.step(rollout=full.subset(list(range(rank * b, (rank + 1) * b))))
    trainer.save(Path(out) / "final")
    if acc.is_main_process:
        (Path(out) / "metrics.json").write_text(json.dumps(metrics))
        print("engine:", acc.distributed_type, type(trainer.model).__name__,
              type(trainer.ref).__name__, flush=True)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
