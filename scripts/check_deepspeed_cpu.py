"""Opt-in check of the DeepSpeed ZeRO path on CPU (gloo): accelerate drives DeepSpeed only on
GPUs, so this forces its DeepSpeed plugin onto a multi-CPU run (DeepSpeed's own CPU accelerator
does the rest), does one PPO iteration on a fixed rollout and a gathered save, and writes the
metrics. Compare with a one-process run of tests/dist_worker.py on the same settings.

    torchrun --standalone --nproc_per_node 2 scripts/check_deepspeed_cpu.py OUT STAGE key=value ...
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType

from rlhf_ppo import PPOTrainer, load_config
from rlhf_ppo.distributed import configure_deepspeed, generation_model, gradient_accumulation_steps
from rlhf_ppo.rollout import generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out, stage, *overrides = sys.argv[1:]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    plugin = DeepSpeedPlugin(zero_stage=int(stage), zero3_init_flag=False,
                             zero3_save_16bit_model=True,
                             gradient_accumulation_steps=gradient_accumulation_steps(cfg))
    acc = Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps(cfg),
                      deepspeed_plugin=plugin)
    # What a GPU launch would have set (PartialState too: AcceleratorState copies it back).
    PartialState().distributed_type = DistributedType.DEEPSPEED
    acc.state.distributed_type = DistributedType.DEEPSPEED
    acc.state.deepspeed_plugins = {"default": plugin}
    plugin.select(_from_accelerator_state=True)
    plugin.set_mixed_precision("no")
    configure_deepspeed(acc, cfg)
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
