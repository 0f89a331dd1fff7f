"""What the engines behind accelerate (DDP, DeepSpeed ZeRO, FSDP) need from a PPO loop.

No home-made distribution: accelerate builds the engine from the launch config (`accelerate
launch --config_file configs/accelerate/...`); this module only fills in what PPO decides (batch
sizes, gradient accumulation and clipping for DeepSpeed), gathers sharded weights for generation
and saving, and prepares the frozen models for inference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from .config import Config
from .errors import CheckpointError, ConfigError
from .trackers import resolve as resolve_trackers

logger = logging.getLogger(__name__)


def launch_world_size() -> int:
    """Processes of this launch (``WORLD_SIZE`` of torchrun / accelerate launch; 1 otherwise),
    known before the ``Accelerator`` exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_process(total: int, num_processes: int, key: str) -> int:
    """``total`` (a batch size over all processes) split evenly over the processes; a
    ConfigError naming ``key`` when it does not divide."""
    if total % num_processes:
        raise ConfigError(f"{key}: {total} is the batch over all processes and must be a multiple "
                          f"of the {num_processes} processes")
    return total // num_processes


def ppo_batch_per_process(cfg: Config, num_processes: int) -> int:
    """Rollouts each process samples per iteration (``ppo.batch_size`` counts over all); it must
    split into ``ppo.num_minibatches`` whole minibatches."""
    b = per_process(cfg.ppo.batch_size, num_processes, "ppo.batch_size")
    k = cfg.ppo.samples_per_prompt
    if b % k:  # a group of responses to one prompt never splits across processes
        raise ConfigError(f"ppo.batch_size: {cfg.ppo.batch_size} over {num_processes} processes is "
                          f"{b} responses each, not a multiple of ppo.samples_per_prompt={k}")
    if b % cfg.ppo.num_minibatches:
        raise ConfigError(f"ppo.batch_size: {cfg.ppo.batch_size} over {num_processes} processes is "
                          f"{b} rollouts each, not a multiple of ppo.num_minibatches="
                          f"{cfg.ppo.num_minibatches}")
    return b


def gradient_accumulation_steps(cfg: Config, num_processes: int) -> int:
    """Micro-batches per minibatch on each process (the optimizer step happens after the last)."""
    mini = ppo_batch_per_process(cfg, num_processes) // cfg.ppo.num_minibatches
    return max(1, mini // cfg.ppo.forward.micro_batch_size)


def multi_process_cpu() -> bool:
    """True for a multi-process launch (torchrun, accelerate launch) on a machine without CUDA.
    accelerate sets up multi-process CPU (gloo) only when asked for the CPU (``cpu=True``)."""
    return not torch.cuda.is_available() and launch_world_size() > 1


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads for this process and return the number: ``threads``, else
    ``OMP_NUM_THREADS`` when set, else half the cores this process may use, divided among the
    processes of this machine (``LOCAL_WORLD_SIZE`` of torchrun / accelerate launch), at least 1.
    Half: threads that wait for a core another process holds spin and stall every matrix
    product (50x slower on a busy 2-core machine, docs/performance.md#cpu-threads)."""
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            threads = int(os.environ["OMP_NUM_THREADS"])
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            threads = max(1, (cores or 1) // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def make_accelerator(mixed_precision: str | None, gradient_accumulation_steps: int = 1,
                     log_with: list[str] | None = None, project_dir: str | None = None,
                     find_unused_parameters: bool = False):
    """The ``Accelerator`` every command trains under (single process, DDP, DeepSpeed, FSDP:
    whatever the launch config says), multi-process CPU (gloo) included."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    multi_cpu = multi_process_cpu()
    if multi_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # accelerate cannot drive DeepSpeed without CUDA: its process count would stay 1 while
        # DeepSpeed sees them all, so every process would train on the same prompts.
        raise RuntimeError("DeepSpeed launch without CUDA: accelerate supports DeepSpeed on GPUs "
                           "only. On CPUs, launch plain data parallel (torchrun, or an accelerate "
                           "config without distributed_type: DEEPSPEED).")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, cpu=multi_cpu,
                       mixed_precision=mixed_precision, log_with=log_with or None,
                       project_dir=project_dir, kwargs_handlers=[ddp])


def make_ppo_accelerator(cfg: Config):
    """:func:`make_accelerator` with PPO's accumulation settings (and DeepSpeed's batch sizes)."""
    acc = make_accelerator(
        cfg.mixed_precision, gradient_accumulation_steps(cfg, launch_world_size()),
        resolve_trackers(cfg.report_to), cfg.output_dir,
        # Critic warmup with a shared backbone leaves the policy's parameters without gradients.
        find_unused_parameters=cfg.ppo.critic.warmup > 0)
    if is_deepspeed(acc):
        configure_deepspeed(acc, cfg)
    return acc


def check_engine_support(cfg: Config, acc) -> None:
    """Refuse the PPO settings the launch's engine does not support, before anything loads."""
    if cfg.optim.separate_grad_clip and acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise ConfigError("optim.separate_grad_clip: not supported under DeepSpeed or FSDP "
                          "(the engine clips the joint norm); set it to false")
    if (cfg.peft.enabled and cfg.model.critic == "separate"
            and cfg.model.critic_init == "reward" and zero_stage(acc) == 3):
        # The reward model would be partitioned inside the trained engine while its scoring
        # runs outside the engine's forward; not supported yet.
        raise ConfigError("model.critic_init: 'reward' with peft.enabled (a critic adapter on "
                          "the reward model) is not supported under DeepSpeed ZeRO-3 yet; use "
                          "ZeRO-2, DDP, or model.critic_init=policy")
    if cfg.peft.enabled and acc.distributed_type.name == "FSDP":
        # The reference pass runs the policy's own modules with the adapter off, outside the
        # FSDP root's forward; not supported yet.
        raise ConfigError("peft.enabled: LoRA under FSDP is not supported yet; use DDP or "
                          "DeepSpeed")
    if cfg.ppo.forward.micro_batch_tokens is not None and is_deepspeed(acc):
        raise ConfigError("ppo.forward.micro_batch_tokens: token budgets are not supported under "
                          "DeepSpeed yet (its config fixes the micro-batches per optimizer step); "
                          "use ppo.forward.micro_batch_size")
    if cfg.resume_from is not None and (is_deepspeed(acc) or acc.distributed_type.name == "FSDP"):
        raise CheckpointError("resume_from: resuming under DeepSpeed or FSDP is not supported "
                              "yet (sharded optimizer state)")


def is_deepspeed(acc) -> bool:
    """True under a DeepSpeed launch config."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc) -> int:
    """The DeepSpeed ZeRO stage (0 without DeepSpeed)."""
    if not is_deepspeed(acc):
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
               .get("stage", 0))


def is_fsdp(acc) -> bool:
    """True under an FSDP launch config."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def configure_deepspeed(acc, cfg: Config) -> None:
    """Write PPO's micro-batch size, accumulation steps and gradient clipping into the DeepSpeed
    config (the PPO config is the source of truth; a different explicit value is overridden)."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    gas = gradient_accumulation_steps(cfg, acc.num_processes)
    mini = cfg.ppo.batch_size // acc.num_processes // cfg.ppo.num_minibatches
    micro = min(cfg.ppo.forward.micro_batch_size, mini)
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * acc.num_processes,
        "gradient_clipping": cfg.optim.max_grad_norm or 0.0,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            logger.warning("DeepSpeed config %s=%s replaced by %s from the PPO config", key,
                           ds[key], value)
        ds[key] = value
    acc.state.deepspeed_plugin.gradient_accumulation_steps = gas


@contextmanager
def generation_model(acc, model: nn.Module, unwrapped: nn.Module | None = None
                     ) -> Iterator[nn.Module]:
    """The policy with full weights for ``generate``. ``model``: the prepared ActorCritic;
    ``unwrapped``: the module inside its wrappers (default: ``acc.unwrap_model(model)``).

    ZeRO-3 and FSDP shard parameters; generation runs many small forwards outside the training
    module's own forward, so the weights are gathered once for the whole rollout here.
    """
    unwrapped = unwrapped if unwrapped is not None else acc.unwrap_model(model)
    if zero_stage(acc) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield unwrapped.policy
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDPModule):  # FSDP2: unshard every sharded module for the rollout
        # generate() calls the inner modules directly; without the root's lazy init first, each
        # layer would initialise as its own root and the next training forward would fail.
        model._get_fsdp_state()._lazy_init()
        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in sharded:
            m.unshard()
        try:
            yield unwrapped.policy
        finally:
            for m in sharded:
                m.reshard()
    elif isinstance(model, FSDP):  # FSDP1
        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield unwrapped.policy
    else:
        yield unwrapped.policy


def match_partitioned_dtype(model: nn.Module) -> None:
    """Under ZeRO-3, cast the parameters made outside ``zero.Init`` (the value head) to the
    dtype of the partitioned ones. A model loaded partitioned (bf16 under bf16 mixed precision)
    is not cast again by the engine, and the stage-3 optimizer flattens every partition into one
    buffer of a single dtype (it keeps float32 master weights itself)."""
    dtypes = {p.dtype for p in model.parameters() if hasattr(p, "ds_id")}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def prepare_frozen(acc, model: nn.Module, shard: bool) -> nn.Module:
    """Put a frozen inference model (reference, reward) on the device: replicated on every
    process (default), or, with ``shard`` under ZeRO-3 / FSDP, sharded by an inference-only
    engine (no optimizer state, no gradient sync)."""
    if not shard or not (zero_stage(acc) == 3 or is_fsdp(acc)):
        return model.to(acc.device)
    if zero_stage(acc) == 3:
        import deepspeed

        ds = acc.state.deepspeed_plugin.deepspeed_config
        config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
                  "zero_optimization": {"stage": 3}, "bf16": ds.get("bf16", {"enabled": False}),
                  "fp16": ds.get("fp16", {"enabled": False})}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine.module
    if getattr(acc, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        # accelerate's prepare_model(evaluation_mode=True) only places FSDP models; shard here
        # with the launch config's FSDP2 settings (wrapping units, resharding, mixed precision).
        model = fsdp2_prepare_model(acc, model.to(acc.device))
        model._get_fsdp_state()._lazy_init()  # as the root, before any inner module runs
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    acc.state.fsdp_plugin.set_auto_wrap_policy(model)
    plugin = acc.state.fsdp_plugin
    return FSDP(model.to(acc.device), auto_wrap_policy=plugin.auto_wrap_policy,
                sharding_strategy=plugin.sharding_strategy, mixed_precision=plugin.mixed_precision_policy,
                device_id=acc.device if acc.device.type != "cpu" else None)


def full_state_dict(acc, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict of the prepared model; call on every process."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    return acc.get_state_dict(model)


def clip_grad_norms(acc, groups: list[list[torch.nn.Parameter]], max_norm: float | None,
                    separate: bool = False) -> tuple:
    """Clip gradients to ``max_norm`` (None: only measure) and return ``(total, *per group)``
    norms before clipping (0-d tensors; under DeepSpeed, whose engine clips by itself, the
    per-group ones are None and the joint one is what accelerate reports). ``separate``: each
    group (policy, critic) is clipped to ``max_norm`` on its own, as two optimizers would be, so
    a large value-loss gradient cannot shrink the policy's step; otherwise their joint norm is
    clipped. The per-group norms are measured either way."""
    limit = max_norm or float("inf")
    if is_deepspeed(acc):  # the engine clips (gradient_clipping); accelerate reports its norm
        total = acc.clip_grad_norm_([q for g in groups for q in g], limit)
        return (None if total is None else _as_tensor(total), *(None,) * len(groups))
    if separate:
        norms = [_as_tensor(acc.clip_grad_norm_(g, limit)) for g in groups]
        total = torch.stack([n.float() for n in norms]).square().sum().sqrt()
        return (total, *norms)
    norms = [_group_norm(g) for g in groups]
    total = _as_tensor(acc.clip_grad_norm_([q for g in groups for q in g], limit))
    return (total, *norms)


def _as_tensor(norm) -> torch.Tensor:
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return torch.as_tensor(norm)


def _group_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of the (local) gradients of ``params``, measured before clipping."""
    grads = [q.grad for q in params if q.grad is not None]
    if not grads:
        return torch.zeros(())
    grads = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                 for g in grads]))


# --------------------------------------------------------------------------- cross-process statistics

def global_stats(acc, items: list[tuple[torch.Tensor, torch.Tensor | None]]
                 ) -> list[tuple[float, float, float]]:
    """``(mean, unbiased variance, count)`` of each ``(x, mask)`` over the valid elements
    (``mask`` None: every element) of every process, all in one reduction."""
    rows = []
    for x, mask in items:
        x = x.float()
        m = torch.ones_like(x) if mask is None else mask.to(x.device).float()
        rows.append(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]))
    t = torch.stack(rows).double().to(acc.device)
    out = []
    for total, total_sq, n in acc.reduce(t, "sum").tolist():
        mean = total / max(n, 1.0)
        var = (total_sq - n * mean * mean) / max(n - 1.0, 1.0)
        out.append((mean, max(var, 0.0), n))
    return out


def global_mean(acc, x: torch.Tensor) -> float:
    """Mean of ``x`` over every element of every process."""
    return global_stats(acc, [(x, None)])[0][0]


def global_moments(acc, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and unbiased variance of ``x`` over the valid tokens of every process."""
    mean, var, _ = global_stats(acc, [(x, mask)])[0]
    return mean, var


def all_finite(acc, *tensors: torch.Tensor | None) -> bool:
    """True when every value of every tensor is finite on every process (all agree)."""
    bad = any(not torch.isfinite(t).all() for t in tensors if t is not None)
    flag = torch.tensor([float(bad)], device=acc.device)
    return not acc.reduce(flag, "max").item()
