"""What the stages before PPO share (``sft.py``, ``reward_training.py``): the ``train`` config
section, dataset loading and held-out splits, the output folder, and one optimisation loop under
accelerate whose loss is a sum over "units" (label tokens for SFT, pairs for the reward model)
divided by the step's global unit count, so the gradient does not depend on how a step is split
into micro-batches or processes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .checkpoint import atomic_folder
from .config import DataConfig, FinetuneOptimConfig, ModelConfig, RunConfig, check, config_from_dict
from .data import load_rows
from .distributed import make_accelerator, set_threads
from .errors import ConfigError, DataError, NonFiniteError
from .optim import make_optimizer as make_opt
from .progress import ensure_logging, plural, progress_bar
from .runs import FINETUNE_RUN_FILES, RunLog, init_run_folder, prepare_output_dir

logger = logging.getLogger(__name__)



@dataclass
class TrainConfig:
    """The ``train`` section of sft and reward: passes, steps and batch sizes (the optimizer is
    the shared ``optim`` section)."""

    epochs: int = 1
    """passes over the training set"""
    max_steps: int | None = None
    """stop after at most this many optimizer steps (null: run every epoch)"""
    batch_size: int = 16
    """examples (SFT with packing: blocks; reward: pairs) per optimizer step, over all processes"""
    micro_batch_size: int = 8
    """examples per forward/backward on each process; a step accumulates gradients over its micro-batches"""
    heldout_batch_size: int = 32
    """examples per no-grad forward when scoring the held-out set"""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "micro_batch_size", "heldout_batch_size"):
            check(getattr(self, key) >= 1, f"train.{key}", "an integer >= 1", getattr(self, key))
        check(self.max_steps is None or self.max_steps >= 1, "train.max_steps",
              "an integer >= 1 or null", self.max_steps)


FINETUNE_RENAMED = {
    # "eval" meant four things (the command, PPO's samples, held-out loss, a scoring pass)
    "data.eval_path": "data.heldout_path", "data.eval_split": "data.heldout_split",
    "data.eval_fraction": "data.heldout_fraction", "train.eval_batch_size": "train.heldout_batch_size",
    # the optimizer settings moved to the `optim` section every training command shares
    **{f"train.{k}": f"optim.{k}" for k in ("lr", "weight_decay", "max_grad_norm", "scheduler",
                                             "warmup_steps")},
}
"""renamed keys of sft and reward (old -> new); the old ones still work, with a warning"""


@dataclass
class FinetuneDataConfig:
    """The ``data`` keys sft and reward share: where the examples are, and what is held out."""

    path: str | None = None
    """training data: local .json/.jsonl/.csv/.parquet file, `save_to_disk` folder, or hub id"""
    split: str = "train"
    """dataset split of `path`"""
    heldout_path: str | None = None
    """held-out data in the same format (default: `heldout_fraction` of `path`)"""
    heldout_split: str = "test"
    """dataset split of `heldout_path` (any name for a local file)"""
    heldout_fraction: float = 0.1
    """share of `path` held out (its loss / accuracy is logged) when there is no `heldout_path` (0: none)"""


@dataclass
class FinetuneRunConfig(RunConfig):
    """What ``rlhf-ppo sft`` and ``rlhf-ppo reward`` share besides :class:`RunConfig`."""

    overwrite: bool = False
    """start afresh in an output_dir that holds another run (its files are deleted)"""
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    """optimizer and schedule"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """passes, steps and batch sizes"""

    RENAMED: ClassVar[dict[str, str]] = FINETUNE_RENAMED


def validate_data(d, columns: Sequence[str]) -> None:
    """Checks shared by the ``data`` sections of sft and reward: a path, a held-out fraction in
    [0, 1), a usable max_length and non-empty column names (``columns``: field names)."""
    check(bool(d.path), "data.path", "a .json/.jsonl/.csv/.parquet file, dataset folder or hub id",
          d.path)
    check(0 <= d.heldout_fraction < 1, "data.heldout_fraction", "a number in [0, 1)",
          d.heldout_fraction)
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


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random ``(train, held-out)`` split with ``round(fraction * n)`` held-out items (at
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


# --------------------------------------------------------------------------- the run

def start_run(cfg, cls: type):
    """Re-check ``cfg`` (values may have changed after construction), refuse an output folder
    holding another run unless ``overwrite`` (then clear it), make the accelerator, write
    ``config.yaml`` and seed. Returns ``(cfg, accelerator, RunLog)``."""
    from accelerate.utils import set_seed

    ensure_logging()  # a script's run_sft / run_reward_training logs like the command line
    cfg = config_from_dict(cfg.to_dict(), cls)
    out = Path(cfg.output_dir)
    prepare_output_dir(out, cfg.overwrite, FINETUNE_RUN_FILES)
    acc = make_accelerator(cfg.mixed_precision)
    threads = set_threads(cfg.threads)
    logger.info("%s, device %s, torch threads %d", plural(acc.num_processes, "process", "processes"),
                acc.device, threads)
    init_run_folder(out, cfg, FINETUNE_RUN_FILES, cfg.overwrite, acc.is_main_process,
                    acc.wait_for_everyone)
    set_seed(cfg.seed)
    return cfg, acc, RunLog(out, acc.is_main_process)


def log_start(stage: str, cfg, model: nn.Module, n_items: int, unit: str, steps: int,
              num_processes: int) -> None:
    """One summary of what the run is about to do: the model with its parameter counts, the
    batch arithmetic and where the outputs go."""
    count = lambda params: sum(q.numel() for q in params)
    t = cfg.train
    units = lambda n: plural(n, unit[:-1], unit)  # unit: a plural noun ("pairs", "examples")
    logger.info(
        "%s run:\n  model: %s (%.2fM parameters, %.2fM trained%s)\n  batch: %s per step over "
        "%s, micro-batches of %d per process; %s (%s of %s%s)\n"
        "  output: %s/ (metrics.jsonl, config.yaml, final/)", stage, cfg.model.name_or_path,
        count(model.parameters()) / 1e6, count(q for q in model.parameters() if q.requires_grad) / 1e6,
        ", LoRA" if cfg.peft.enabled else "", units(t.batch_size),
        plural(num_processes, "process", "processes"), t.micro_batch_size, plural(steps, "step"),
        plural(t.epochs, "epoch"), units(n_items),
        f", at most {plural(t.max_steps, 'step')}" if t.max_steps else "", cfg.output_dir)


def save_final(acc, folder: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` on the main process into a temporary folder that becomes ``folder`` once
    whole (:func:`checkpoint.atomic_folder`); every process waits for it."""
    with atomic_folder(folder, acc.is_main_process, acc.wait_for_everyone) as tmp:
        if acc.is_main_process:
            write(tmp)


# --------------------------------------------------------------------------- training loop

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


def make_optimizer(params: list[nn.Parameter], o, total_steps: int):
    """AdamW and its warmup + decay schedule from the ``optim`` section (:mod:`rlhf_ppo.optim`).
    The default per-parameter AdamW, not the fused one PPO uses: fused changes the rounding,
    and with it every figure the stages print (left for a measured change)."""
    return make_opt([{"params": params}], o, total_steps, fused=False)


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
        max_grad_norm: float | None, run_log: RunLog, desc: str, unit: str) -> list[dict]:
    """Run every step of ``plan`` (from :func:`step_plan`); ``make_batches(indices)`` gives a
    step's micro-batches and their unit counts. Each step's record (``step``, ``epoch``,
    ``loss``, extra stats, ``lr``, ``grad_norm``, and the unit count under the name ``unit``)
    is appended to ``metrics.jsonl`` by the main process. Returns the records."""
    history = []
    bar = progress_bar(len(plan), desc, acc.is_main_process)  # log lines when not on a terminal
    for step, (epoch, rows) in enumerate(plan, start=1):
        mbs, counts = make_batches(rows)
        m = train_step(acc, module, optimizer, scheduler, mbs, counts, loss_fn, max_grad_norm)
        record = {"step": step, "epoch": epoch, unit: m.pop("units"), **m}
        history.append(record)
        run_log.metrics(record)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}")
    bar.close()
    return history


@torch.no_grad()
def heldout_metrics(model: nn.Module, micro_batches: list, counts: list[float], loss_fn: LossFn
             ) -> dict[str, float]:
    """Mean loss and extra stats over every unit of the held-out micro-batches; ``{}`` without
    any. Every process scores the whole held-out set (the same numbers everywhere, and no
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


def log_heldout(model: nn.Module, micro_batches: list, counts: list[float], loss_fn: LossFn,
                run_log: RunLog, stage: str, step: int) -> dict[str, float]:
    """:func:`heldout_metrics`, appended to ``metrics.jsonl`` as ``heldout_<name>`` (main
    process). Returns ``{}`` when there is nothing held out."""
    m = heldout_metrics(model, micro_batches, counts, loss_fn)
    if m:
        run_log.metrics({"step": step, "stage": stage, **{f"heldout_{k}": v for k, v in m.items()}})
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
