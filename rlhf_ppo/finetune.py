"""What the stages before PPO share (``sft.py``, ``reward_training.py``): the ``train`` config
section, dataset loading and held-out splits, the output folder, and one optimisation loop under
accelerate whose loss is a sum over "units" (label tokens for SFT, pairs for the reward model)
divided by the step's global unit count, so the gradient does not depend on how a step is split
into micro-batches or processes.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from .checkpoint import json_safe
from .config import ConfigError, DataConfig, ModelConfig, check
from .data import DataError, load_rows
from .distributed import multi_process_cpu
from .trainer import NonFiniteError, lr_lambda

logger = logging.getLogger(__name__)

RUN_FILES = ("metrics.jsonl", "final", "config.yaml")


@dataclass
class TrainConfig:
    epochs: int = 1
    """passes over the training set"""
    max_steps: int | None = None
    """stop after at most this many optimizer steps (null: run every epoch)"""
    batch_size: int = 16
    """examples (SFT with packing: blocks; reward: pairs) per optimizer step, over all processes"""
    micro_batch_size: int = 8
    """examples per forward/backward; a step accumulates gradients over its micro-batches"""
    eval_batch_size: int = 32
    """examples per no-grad forward in evaluation"""
    lr: float = 2e-5
    """learning rate (AdamW)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm (null: off)"""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """learning-rate schedule after warmup, over all optimizer steps"""
    warmup_steps: int = 0
    """optimizer steps of linear warmup from 0"""


def validate_train(t: TrainConfig) -> None:
    """Value ranges of the ``train`` section."""
    for key in ("epochs", "batch_size", "micro_batch_size", "eval_batch_size"):
        check(getattr(t, key) >= 1, f"train.{key}", "an integer >= 1", getattr(t, key))
    check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "an integer >= 1 or null",
          t.max_steps)
    check(t.lr > 0, "train.lr", "a number > 0", t.lr)
    check(t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay)
    check(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm",
          "a number > 0 or null", t.max_grad_norm)
    check(t.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", t.warmup_steps)


def validate_data(d, columns: Sequence[str]) -> None:
    """Checks shared by the ``data`` sections of sft and reward: a path, an eval fraction in
    [0, 1), a usable max_length and non-empty column names (``columns``: field names)."""
    check(bool(d.path), "data.path", "a .json/.jsonl/.csv/.parquet file, dataset folder or hub id",
          d.path)
    check(0 <= d.eval_fraction < 1, "data.eval_fraction", "a number in [0, 1)", d.eval_fraction)
    check(d.max_length >= 2, "data.max_length", "an integer >= 2", d.max_length)
    for key in columns:
        check(getattr(d, key) != "", f"data.{key}", "a column name", getattr(d, key))


def validate_model_keys(m: ModelConfig, command: str, gguf: bool = True) -> None:
    """Refuse the PPO-only ``model.*`` keys (reference, critic, sharding) when set: a stage that
    trains one model would silently ignore them."""
    defaults = ModelConfig()
    unused = ["ref_name_or_path", "ref_gguf_file", "critic", "critic_name_or_path", "critic_init",
              "shard_frozen_models"] + ([] if gguf else ["gguf_file"])
    for key in unused:
        value, default = getattr(m, key), getattr(defaults, key)
        shown = "null" if default is None else repr(default)
        check(value == default, f"model.{key}", f"{shown} (not used by `rlhf-ppo {command}`)", value)


# --------------------------------------------------------------------------- data

def load_table(path: str, split: str, key: str):
    """A ``datasets.Dataset`` from a local .json/.jsonl/.csv/.parquet file, a ``save_to_disk``
    folder or a hub id (as ``data.load_rows``), with errors reported under config ``key``."""
    try:
        return load_rows(DataConfig(path=path, split=split))
    except DataError as e:
        raise DataError(str(e).replace("data.path", key, 1)) from e


def check_columns(ds, needed: Sequence[str], where: str, keys: Sequence[str]) -> None:
    """DataError naming the file and the config key when a needed column is missing, or when
    the dataset has no rows."""
    for column, key in zip(needed, keys, strict=True):
        if column not in ds.column_names:
            raise DataError(f"{key}: column {column!r} not in {where}; columns are "
                            f"{ds.column_names}")
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random ``(train, eval)`` split with ``round(fraction * n)`` held-out items (at
    least one when ``fraction > 0``, and at least one left to train on)."""
    if fraction <= 0:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(fraction * len(items))), len(items) - 1)
    held = set(order[:n_eval])
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


def right_pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer lists to a ``[B, L]`` long tensor (L: the longest row)."""
    L = max(len(r) for r in rows)
    out = torch.full((len(rows), L), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


# --------------------------------------------------------------------------- output folder

def prepare_output_dir(output_dir: str, overwrite: bool) -> Path:
    """Refuse a folder that holds another run unless ``overwrite`` (then delete that run's
    files; other files stay). Called before any model loads."""
    out = Path(output_dir)
    held = [n for n in RUN_FILES if (out / n).exists()]
    if held and not overwrite:
        raise ConfigError(f"output_dir: {str(out)!r} holds a run ({', '.join(held)}); pick "
                          "another output_dir or set overwrite=true to delete it")
    for name in held:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (non-finite floats written as null)."""
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record)) + "\n")


# --------------------------------------------------------------------------- training loop

def make_accelerator(mixed_precision: str | None):
    """An ``Accelerator`` for the launch environment (single process or data parallel).
    Gradient accumulation is done by :func:`train_step` itself (``no_sync`` on all but the last
    micro-batch), so steps may hold any number of micro-batches."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision, cpu=multi_process_cpu())


def step_plan(n: int, t: TrainConfig, seed: int, rank: int = 0, world: int = 1
              ) -> list[tuple[int, list[int]]]:
    """``(epoch, this process's example indices)`` for every optimizer step of the run.

    Each epoch is a fresh seeded permutation cut into global batches of ``train.batch_size``;
    process ``rank`` takes every ``world``-th example of each. With several processes a last
    partial batch is dropped, so all processes run the same number of micro-batches.
    """
    plan = []
    for epoch in range(t.epochs):
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
        for start in range(0, n, t.batch_size):
            batch = order[start:start + t.batch_size]
            if world > 1 and len(batch) < t.batch_size:
                break
            plan.append((epoch, batch[rank::world]))
            if t.max_steps is not None and len(plan) == t.max_steps:
                return plan
    if not plan:
        raise ConfigError(f"train.batch_size: {t.batch_size} is more than the {n} training "
                          f"examples; with {world} processes a step needs a full batch")
    return plan


def make_optimizer(params: list[nn.Parameter], t: TrainConfig, total_steps: int):
    """AdamW and its warmup + decay schedule (``trainer.lr_lambda``)."""
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.scheduler, t.warmup_steps, total_steps))
    return optimizer, scheduler


def global_sum(acc, value: float) -> float:
    """Sum of a number over all processes."""
    return acc.reduce(torch.tensor([float(value)], device=acc.device), "sum").item()


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``(model, micro_batch) -> (summed loss, summed extra stats)``; sums over the micro-batch's
units, so the caller can divide by the step's global unit count."""


def train_step(acc, model: nn.Module, optimizer, scheduler, micro_batches: list, counts: list[float],
               loss_fn: LossFn, max_grad_norm: float | None) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (this process's share of the step).

    ``counts[i]``: units (label tokens, pairs) in micro-batch i. Each micro-batch's summed loss is
    divided by the step's global unit count / processes: the engine averages gradients over
    processes, so the gradient is that of the mean loss over every unit of the step.
    Returns the step's mean loss and mean extra stats over all processes, and its grad norm.
    """
    total_units = global_sum(acc, sum(counts))
    if total_units == 0:
        raise DataError("a training step has no units to learn from (every label masked)")
    normalizer = total_units / acc.num_processes
    sums: dict[str, torch.Tensor] = {}
    model.train()
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Gradients are synchronised across processes only on the step's last micro-batch.
        ctx = acc.no_sync(model) if not last and acc.num_processes > 1 else nullcontext()
        with ctx:
            loss_sum, stats = loss_fn(model, mb)
            acc.backward(loss_sum / normalizer)
        for k, v in {"loss": loss_sum, **stats}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = acc.clip_grad_norm_(params, max_grad_norm or float("inf"))
    if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)).all():
        raise NonFiniteError("the loss or its gradient is NaN/inf (the weights were not "
                             "updated with it); lower train.lr, or try mixed_precision=no")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    keys = sorted(sums)
    totals = acc.reduce(torch.stack([sums[k] for k in keys]).to(acc.device), "sum").tolist()
    out = {k: v / total_units for k, v in zip(keys, totals)}
    out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    out["lr"] = lr
    out["units"] = total_units
    return out


def fit(acc, module: nn.Module, optimizer, scheduler, plan: list[tuple[int, list[int]]],
        make_batches: Callable[[list[int]], tuple[list, list[float]]], loss_fn: LossFn,
        max_grad_norm: float | None, metrics_file: Path, desc: str, unit: str) -> list[dict]:
    """Run every step of ``plan`` (from :func:`step_plan`); ``make_batches(indices)`` gives a
    step's micro-batches and their unit counts. Each step's record (``step``, ``epoch``,
    ``loss``, extra stats, ``lr``, ``grad_norm``, and the unit count under the name ``unit``)
    is appended to ``metrics_file`` by the main process. Returns the records."""
    from tqdm.auto import tqdm

    history = []
    bar = tqdm(total=len(plan), desc=desc, disable=not acc.is_main_process, dynamic_ncols=True)
    for step, (epoch, rows) in enumerate(plan, start=1):
        mbs, counts = make_batches(rows)
        m = train_step(acc, module, optimizer, scheduler, mbs, counts, loss_fn, max_grad_norm)
        record = {"step": step, "epoch": epoch, unit: m.pop("units"), **m}
        history.append(record)
        if acc.is_main_process:
            append_jsonl(metrics_file, record)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}")
    bar.close()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, micro_batches: list, counts: list[float], loss_fn: LossFn
             ) -> dict[str, float]:
    """Mean loss and extra stats over every unit of the held-out micro-batches; ``{}`` without
    any. Every process evaluates the whole held-out set (the same numbers everywhere, and no
    process waits on a collective that another, holding no eval batch, never joins)."""
    units = sum(counts)
    if not micro_batches or units == 0:
        return {}
    model.eval()
    sums: dict[str, float] = {}
    for mb in micro_batches:
        loss_sum, stats = loss_fn(model, mb)
        for k, v in {"loss": loss_sum, **stats}.items():
            sums[k] = sums.get(k, 0.0) + v.item()
    model.train()
    return {k: v / units for k, v in sums.items()}


def log_eval(acc, model: nn.Module, micro_batches: list, counts: list[float], loss_fn: LossFn,
             metrics_file: Path, stage: str, step: int) -> dict[str, float]:
    """:func:`evaluate`, with its values appended to ``metrics_file`` as ``eval_<name>`` (main
    process). Returns ``{}`` when there is nothing held out."""
    m = evaluate(model, micro_batches, counts, loss_fn)
    if m and acc.is_main_process:
        append_jsonl(metrics_file, {"step": step, "stage": stage,
                                    **{f"eval_{k}": v for k, v in m.items()}})
    return m


def check_context(model: nn.Module, longest: int) -> None:
    """ConfigError naming ``data.max_length`` when the longest sequence exceeds the model's
    context (``max_position_embeddings``): fail before training, not deep inside torch."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if context is not None and longest > context:
        raise ConfigError(f"data.max_length: the longest sequence has {longest} tokens, more "
                          f"than the model's context of {context} (max_position_embeddings); set "
                          f"data.max_length <= {context}")


def fmt(x: float | None) -> str:
    """A metric for a log line: 4 decimals, or n/a."""
    return "n/a" if x is None else f"{x:.4f}"


def unwrap(acc, module: nn.Module) -> nn.Module:
    """The trained transformers / PEFT model inside a prepared loss wrapper."""
    return acc.unwrap_model(module).model
