"""Worker for the multi-process tests, launched with `torchrun --nproc_per_node N`.

    dist_worker.py step OUT [--engine=E] OVERRIDES...  one PPO iteration on a fixed rollout of
        the first ppo.batch_size * N prompts, split by rank; writes OUT/metrics.json,
        OUT/weights.pt, OUT/initial.pt and (engines) the gathered save OUT/final
    dist_worker.py train OUT OVERRIDES...              a full run (trainer.train())

E: `ddp` (default: what accelerate sets up from torchrun on CPU, gloo), or `fsdp2`, `zero2`,
`zero3`. accelerate enables FSDP and DeepSpeed for GPU launches only, so for those the worker
forces the engine's plugin onto the multi-CPU run, as a GPU launch would have set it up
(DeepSpeed then uses its own CPU accelerator). FSDP2 processes on gloo sometimes abort at exit
after finishing: judge such runs by their outputs.
"""

import json
import os
import sys
from pathlib import Path

import torch

from rlhf_ppo import PPOTrainer, load_config
from rlhf_ppo.distributed import configure_deepspeed, generation_model, gradient_accumulation_steps
from rlhf_ppo.rollout import generate

ROOT = Path(__file__).resolve().parents[1]


def forced_engine_accelerator(engine: str, cfg):
    """An Accelerator for a multi-CPU run with the FSDP2 or DeepSpeed plugin forced on."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    gas = gradient_accumulation_steps(cfg, int(os.environ["WORLD_SIZE"]))
    if engine == "fsdp2":
        acc = Accelerator(cpu=True, gradient_accumulation_steps=gas)
        kind = DistributedType.FSDP
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
    else:
        plugin = DeepSpeedPlugin(zero_stage=int(engine[-1]), zero3_init_flag=False,
                                 zero3_save_16bit_model=True, gradient_accumulation_steps=gas)
        acc = Accelerator(cpu=True, gradient_accumulation_steps=gas, deepspeed_plugin=plugin)
        kind = DistributedType.DEEPSPEED
        acc.state.deepspeed_plugins = {"default": plugin}
        plugin.select(_from_accelerator_state=True)
        plugin.set_mixed_precision("no")
    # PartialState too: AcceleratorState copies its fields back when re-created.
    PartialState().distributed_type = kind
    acc.state.distributed_type = kind
    if engine != "fsdp2":
        configure_deepspeed(acc, cfg)
    return acc


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    engine = "ddp"
    if overrides and overrides[0].startswith("--engine="):
        engine = overrides.pop(0).split("=", 1)[1]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    acc = None if engine == "ddp" else forced_engine_accelerator(engine, cfg)
    trainer = PPOTrainer(cfg, accelerator=acc)
    acc = trainer.accelerator
    if acc.is_main_process:
        print(f"engine: {acc.distributed_type} {type(trainer.model).__name__} "
              f"{type(trainer.ref).__name__} processes={acc.num_processes}", flush=True)
    if mode == "train":
        trainer.train()
        return
    # The same full rollout on every process (same seed, same initial weights, same prompts),
    # then each process keeps its contiguous share: the batch is split, nothing else changes.
    world, rank = acc.num_processes, acc.process_index
    b = cfg.ppo.batch_size // world  # ppo.batch_size counts over all processes
    prompts = trainer.sampler.prompts[: b * world]
    torch.manual_seed(1234)
    with generation_model(acc, trainer.model) as policy:
        full = generate(policy, prompts, trainer.tokenizer, cfg.generation)
    initial = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    metrics = trainer.step(rollout=full.subset(list(range(rank * b, (rank + 1) * b))))
    if engine != "ddp":
        trainer.save(Path(out) / "final")  # gathers the shards
    state = {k: v.detach().cpu() for k, v in trainer.unwrapped.state_dict().items()}
    if acc.is_main_process:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics))
        torch.save(state, Path(out) / "weights.pt")
        torch.save(initial, Path(out) / "initial.pt")
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
