"""Alarms while training: checks of the metrics history that catch a run failing quietly (reward
hacking, an unhealthy critic, off-policy drift), reported as a WARNING log line, a row of
``OUTPUT_DIR/alarms.jsonl`` and an ``alarm/<name>: 1.0`` metric. docs/monitoring.md describes
each alarm, its setting and what to do when it fires.

Every check is a pure function of the metrics history (a list of ``metrics.jsonl`` records, the
current iteration's last): a resumed run rebuilds the same decisions from the saved history, and
the tests drive the checks with hand-built histories. A condition that stays true is reported
once, when it starts, and again only after ``alarms.quiet`` iterations without it.

Most checks compare a *current level* (the mean of the last ``alarms.window`` iterations after the
warm-up) with a *baseline* (the mean of the first ``alarms.warmup`` iterations: the policy then is
still close to the reference, so its lengths, entropy and scores are the reference's).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import AlarmsConfig
from .jsonl import append_jsonl, finite_number, read_jsonl, write_jsonl
from .runs import metric_jumps

logger = logging.getLogger(__name__)

History = list[dict]
"""metrics records, oldest first; the last is the iteration being checked"""


@dataclass(frozen=True)
class Alarm:
    """One alarm condition that holds at an iteration."""

    name: str
    message: str
    value: float
    """the watched quantity (its current level, ratio or streak)"""
    threshold: float
    """the bound it crossed"""


# --------------------------------------------------------------------------- the n-gram metric

def repeated_ngram_share(response_ids: torch.Tensor, response_mask: torch.Tensor,
                         n: int = 3) -> torch.Tensor:
    """``(B,)`` float: per response, the share of its token n-grams that repeat an earlier n-gram
    of the same response (0 for a response of fewer than n tokens). Only the trained tokens count
    (``response_mask`` 1: a multi-turn rollout's environment tokens are left out, the model's turns
    read as one sequence). A policy looping on a phrase ("great great great ...") scores near 1;
    ordinary text near 0.

    Args:
        response_ids: ``[B, R]`` the response region's tokens.
        response_mask: ``[B, R]`` the action mask.
    """
    shares = []
    for ids, mask in zip(response_ids.tolist(), response_mask.bool().tolist()):
        tokens = [t for t, m in zip(ids, mask) if m]
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        shares.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return torch.tensor(shares, dtype=torch.float32)


def response_metrics(rollout) -> dict[str, torch.Tensor]:
    """``response/repeated_ngram_share`` per row ``(B,)`` of a :class:`~rlhf_ppo.rollout.Rollout`,
    for :func:`rlhf_ppo.metrics.iteration_metrics` to average over every process's rows."""
    return {"response/repeated_ngram_share":
            repeated_ngram_share(rollout.response_ids, rollout.response_mask)}


# --------------------------------------------------------------------------- history helpers

def _finite(record: dict, key: str) -> float | None:
    """``record[key]`` as a float when it is a finite number (metrics files store NaN as null)."""
    return finite_number(record.get(key))


def _mean(records: History, key: str) -> float | None:
    """The mean of the finite values of ``key`` in ``records``; None when there are none."""
    values = [v for r in records if (v := _finite(r, key)) is not None]
    return sum(values) / len(values) if values else None


def _std(records: History, key: str) -> float:
    """The (population) standard deviation of the finite values of ``key`` (0 for fewer than 2)."""
    values = [v for r in records if (v := _finite(r, key)) is not None]
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def baseline_and_current(h: History, key: str, cfg: AlarmsConfig) -> tuple[float, float] | None:
    """``(baseline, current)`` of ``key``: the mean over the first ``cfg.warmup`` iterations and
    over the last ``cfg.window`` after them; None during the warm-up or without values."""
    if len(h) <= cfg.warmup:
        return None
    base = _mean(h[: cfg.warmup], key)
    cur = _mean(h[max(cfg.warmup, len(h) - cfg.window):], key)
    return None if base is None or cur is None else (base, cur)


# --------------------------------------------------------------------------- the checks

def check_length_drift(h: History, cfg: AlarmsConfig) -> Alarm | None:
    """Mean response length ``length_ratio`` times its warm-up level or more, or that many times
    below it: a reward that pays for length (or brevity) rather than quality."""
    bc = baseline_and_current(h, "response_length", cfg)
    if bc is None or bc[0] <= 0:
        return None
    base, cur = bc
    ratio = cur / base
    if ratio >= cfg.length_ratio:
        return Alarm("length_drift", f"mean response length {cur:.1f} tokens is {ratio:.1f}x its "
                     f"start ({base:.1f})", ratio, cfg.length_ratio)
    if ratio <= 1.0 / cfg.length_ratio:
        return Alarm("length_drift", f"mean response length {cur:.1f} tokens is {1 / ratio:.1f}x "
                     f"shorter than at the start ({base:.1f})", ratio, 1.0 / cfg.length_ratio)
    return None


def check_repetition(h: History, cfg: AlarmsConfig) -> Alarm | None:
    """The share of repeated 3-grams in the responses ``repetition_rise`` above its warm-up level:
    the policy loops on phrases the reward likes."""
    bc = baseline_and_current(h, "response/repeated_ngram_share", cfg)
    if bc is None:
        return None
    base, cur = bc
    if cur - base >= cfg.repetition_rise:
        return Alarm("repetition", f"{cur:.0%} of the responses' 3-grams repeat an earlier one "
                     f"(at the start {base:.0%})", cur, base + cfg.repetition_rise)
    return None


def check_entropy_collapse(h: History, cfg: AlarmsConfig) -> Alarm | None:
    """Per-token entropy below ``entropy_ratio`` times its warm-up level: the policy stopped
    exploring (often alongside repetition or one memorised answer)."""
    bc = baseline_and_current(h, "entropy", cfg)
    if bc is None or bc[0] <= 0:
        return None
    base, cur = bc
    if cur <= cfg.entropy_ratio * base:
        return Alarm("entropy_collapse", f"entropy {cur:.3g} is {cur / base:.0%} of its start "
                     f"({base:.3g})", cur, cfg.entropy_ratio * base)
    return None


def check_kl_acceleration(h: History, cfg: AlarmsConfig) -> Alarm | None:
    """The KL to the reference at ``kl_min`` nats or more, higher at each of the last ``window``
    iterations than at the one before, and rising over them ``kl_ratio`` times faster than on
    average since the warm-up (a pace of at least 0.1 nats per iteration): the policy runs away
    from the reference faster than the penalty holds it back."""
    n, w = len(h), cfg.window
    if n < cfg.warmup + w + 1:
        return None
    base = _mean(h[: cfg.warmup], "kl")
    last = [_finite(r, "kl") for r in h[-w - 1:]]
    if base is None or any(v is None for v in last):
        return None
    pace_now = (last[-1] - last[0]) / w  # nats per iteration over the window
    # from the warm-up's middle (index (warmup - 1) / 2) to the window's start (index n - 1 - w)
    pace_before = (last[0] - base) / max(n - 1 - w - (cfg.warmup - 1) / 2, 1.0)
    bound = cfg.kl_ratio * max(pace_before, 0.1)
    rising = all(b > a for a, b in zip(last, last[1:]))
    if rising and last[-1] >= cfg.kl_min and pace_now >= bound:
        return Alarm("kl_acceleration", f"KL {last[-1]:.3g} rose {pace_now:.3g} nats per iteration "
                     f"over the last {w} iterations, {pace_now / max(pace_before, 0.1):.1f}x its "
                     f"pace before ({pace_before:.3g}; at the start {base:.3g})", pace_now, bound)
    return None


def secondary_keys(record: dict) -> list[str]:
    """The per-source reward metrics (``reward/sourceI_mean``) of a run with two or more sources
    (a weight-0 source counts: it is scored and logged, not trained on): signals that should not
    fall while the score rises. One source is the score itself: nothing to compare."""
    sources = sorted(k for k in record if re.fullmatch(r"reward/source\d+_mean", k))
    return sources if len(sources) >= 2 else []


SAMPLES_KEY = "samples/score_mean"
"""the mean score of the greedy ``sample_prompts`` samples, on the iterations that log them"""


def first_and_last(h: History, key: str) -> tuple[float, float] | None:
    """The first and the last finite value of ``key`` (a metric logged every few iterations, such
    as :data:`SAMPLES_KEY`); None with fewer than two."""
    values = [v for r in h if (v := _finite(r, key)) is not None]
    return (values[0], values[-1]) if len(values) >= 2 else None


def check_secondary_drop(h: History, cfg: AlarmsConfig) -> Alarm | None:
    """The score ``divergence_sigmas`` warm-up standard deviations above its start while a
    secondary signal is as far below its own: another reward source (:func:`secondary_keys`,
    baseline and current level as for the score), or the greedy ``sample_prompts`` samples' mean
    score (:data:`SAMPLES_KEY`: its first logged value against its last, the spread 5% of the
    first). The policy pleases the trained-on signal at the expense of what it stands for."""
    score = baseline_and_current(h, "score_mean", cfg)
    if score is None:
        return None
    spread = lambda key, base: max(_std(h[: cfg.warmup], key), 0.05 * abs(base), 1e-3)
    rise = (score[1] - score[0]) / spread("score_mean", score[0])
    if rise < cfg.divergence_sigmas:
        return None
    for key in [*secondary_keys(h[-1]), SAMPLES_KEY]:
        bc = first_and_last(h, key) if key == SAMPLES_KEY else baseline_and_current(h, key, cfg)
        if bc is None:
            continue
        drop = (bc[0] - bc[1]) / (max(0.05 * abs(bc[0]), 1e-3) if key == SAMPLES_KEY
                                  else spread(key, bc[0]))
        if drop >= cfg.divergence_sigmas:
            return Alarm("secondary_drop", f"the score rose {score[0]:.3g} -> {score[1]:.3g} while "
                         f"{key} fell {bc[0]:.3g} -> {bc[1]:.3g} ({drop:.1f} warm-up standard "
                         "deviations)", drop, cfg.divergence_sigmas)
    return None


def check_explained_variance(h: History, cfg: AlarmsConfig) -> Alarm | None:
    """Explained variance below ``explained_variance_min`` at each of the last
    ``explained_variance_iterations`` iterations (no warm-up: a critic can be broken from the
    start). Below -1 the values' errors vary more than twice as much as the returns themselves:
    the critic is worse than a constant. Critic runs only (critic-free runs log NaN)."""
    n = cfg.explained_variance_iterations
    if len(h) < n:
        return None
    last = [_finite(r, "explained_variance") for r in h[-n:]]
    if all(v is not None and v < cfg.explained_variance_min for v in last):
        return Alarm("explained_variance", f"explained variance below {cfg.explained_variance_min:g} "
                     f"for {n} iterations (now {last[-1]:.3g}): the critic does not explain the "
                     "returns", last[-1], cfg.explained_variance_min)
    return None


def check_value_error(h: History, cfg: AlarmsConfig) -> Alarm | None:
    """The value error (RMS of returns - values) ``value_error_ratio`` times its warm-up level: the
    critic moves away from the returns it is trained on."""
    bc = baseline_and_current(h, "value_error", cfg)
    if bc is None or bc[0] <= 0:
        return None
    base, cur = bc
    if cur >= cfg.value_error_ratio * base:
        return Alarm("value_error_growth", f"value error {cur:.3g} is {cur / base:.1f}x its start "
                     f"({base:.3g})", cur, cfg.value_error_ratio * base)
    return None


def _jump(key: str, name: str) -> Callable[[History, AlarmsConfig], Alarm | None]:
    """A check that ``key`` jumped ``jump_factor`` times its recent median (:func:`metric_jumps`:
    the median of the last 10 iterations, at least 3 of them; no warm-up)."""
    def check(h: History, cfg: AlarmsConfig) -> Alarm | None:
        """``key`` at the last iteration ``jump_factor`` times its recent median or more."""
        current = {k: v for k in (key,) if (v := _finite(h[-1], k)) is not None}
        for _, value, median in metric_jumps(h[:-1], current, (key,), factor=cfg.jump_factor):
            return Alarm(name, f"{key} {value:.4g} is {value / median:.0f}x its median {median:.4g} "
                         "over the last iterations: the critic may be diverging", value,
                         cfg.jump_factor * median)
        return None
    return check


def check_logprob_gap(h: History, cfg: AlarmsConfig) -> Alarm | None:
    """The gap between the log-probs recorded while sampling and recomputed by the trainer
    (``tis/logprob_gap``, with ``ppo.loss.tis_cap``) above ``logprob_gap_min`` and
    ``logprob_gap_ratio`` times its warm-up level: the sampler and the trained policy disagree."""
    bc = baseline_and_current(h, "tis/logprob_gap", cfg)
    if bc is None:
        return None
    base, cur = bc
    bound = max(cfg.logprob_gap_min, cfg.logprob_gap_ratio * base)
    if cur >= bound:
        return Alarm("logprob_gap", f"the mean gap between sampled and recomputed log-probs {cur:.3g} "
                     f"(at the start {base:.3g})", cur, bound)
    return None


CHECKS: dict[str, Callable[[History, AlarmsConfig], Alarm | None]] = {
    "length_drift": check_length_drift,
    "repetition": check_repetition,
    "entropy_collapse": check_entropy_collapse,
    "kl_acceleration": check_kl_acceleration,
    "secondary_drop": check_secondary_drop,
    "explained_variance": check_explained_variance,
    "value_error_growth": check_value_error,
    "value_loss_jump": _jump("value_loss", "value_loss_jump"),
    "grad_norm_jump": _jump("grad_norm", "grad_norm_jump"),
    "logprob_gap": check_logprob_gap,
}
"""every alarm by name: a check of the history that returns the alarm when its condition holds
at the last iteration"""


# --------------------------------------------------------------------------- deciding

def holding(h: History, cfg: AlarmsConfig) -> list[Alarm]:
    """The alarms whose condition holds at the last iteration of ``h``."""
    if not h or not cfg.enabled:
        return []
    return [a for check in CHECKS.values() if (a := check(h, cfg)) is not None]


def new_alarms(h: History, cfg: AlarmsConfig) -> list[Alarm]:
    """The alarms to report at the last iteration of ``h``: holding now and at none of the
    ``cfg.quiet`` iterations before (a condition that keeps holding is reported once)."""
    now = holding(h, cfg)
    if not now:
        return []
    before = {a.name for k in range(1, cfg.quiet + 1) if len(h) > k for a in holding(h[:-k], cfg)}
    return [a for a in now if a.name not in before]


# --------------------------------------------------------------------------- reporting

class AlarmLog:
    """Checks each iteration's metrics and reports new alarms: a WARNING, a row of
    ``alarms.jsonl`` (the main process writes) and ``alarm/<name>: 1.0`` in the metrics."""

    def __init__(self, cfg: AlarmsConfig, folder: str | Path, is_main: bool = True,
                 iteration: int = 0):
        """Keep the rows of ``alarms.jsonl`` up to ``iteration`` (a resumed run reports later
        iterations again; a fresh run, iteration 0, starts an empty file)."""
        self.cfg, self.is_main = cfg, is_main
        self.file = Path(folder) / "alarms.jsonl"
        if is_main:
            write_jsonl(self.file, [r for r in read_jsonl(self.file) if r["iteration"] <= iteration])

    def check(self, history: History, metrics: dict) -> dict[str, float]:
        """``{"alarm/<name>": 1.0}`` for each alarm that starts at ``metrics`` (the iteration after
        ``history``), reported in the log and ``alarms.jsonl``; the caller adds them to the
        metrics."""
        fired = new_alarms([*history, metrics], self.cfg)
        it = metrics["iteration"]
        if self.is_main:
            for a in fired:
                logger.warning("alarm %s at iteration %d: %s", a.name, it, a.message)
            append_jsonl(self.file, *({"iteration": it, "alarm": a.name, "message": a.message,
                                       "value": a.value, "threshold": a.threshold} for a in fired))
        return {f"alarm/{a.name}": 1.0 for a in fired}
