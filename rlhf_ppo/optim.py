"""AdamW and its learning-rate schedule, built the same way for PPO, SFT and reward training."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate after ``step`` optimizer steps: linear warmup from 0
    over ``warmup`` steps, then ``constant``, ``linear`` decay to 0 or ``cosine`` decay to 0 at
    step ``total``."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return f


def make_adamw(groups: list[dict], o, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the ``optim`` section's settings; the fused kernel where torch
    has one for the parameters' device and dtype (on CPU about 3x faster than the default
    per-parameter loop; the same update up to float rounding). Engines that shard or replace the
    optimizer (DeepSpeed, FSDP) get the default implementation."""
    kwargs = dict(lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps, weight_decay=o.weight_decay)
    params = [q for g in groups for q in g["params"]]
    devices = {q.device.type for q in params}
    if fused and params and devices <= {"cpu", "cuda"} and all(q.is_floating_point() for q in params):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # no fused kernel for this device/dtype
            pass
    return torch.optim.AdamW(groups, **kwargs)


def make_optimizer(groups: list[dict], o, total_steps: int, fused: bool = True
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (:func:`make_adamw`) and its warmup + decay schedule over ``total_steps`` optimizer
    steps, from the ``optim`` section ``o``. The scheduler steps once per optimizer step (it is
    not handed to ``accelerate.prepare``, whose wrapper would step it once per process)."""
    optimizer = make_adamw(groups, o, fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(o.scheduler, o.warmup_steps, total_steps))
    return optimizer, scheduler
