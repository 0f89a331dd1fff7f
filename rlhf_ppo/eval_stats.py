"""The statistics of ``rlhf-ppo evaluate``: pure functions on numpy arrays and torch tensors.

Confidence intervals are percentile bootstrap intervals over prompts (a prompt's K samples are
resampled together, a cluster bootstrap); pass@k is the unbiased estimator of Chen et al. 2021
(:func:`rlhf_ppo.ops.pass_at_k`). No model, config or file here: each function is checked against
hand-computed values in tests/test_eval_stats.py.

Shape legend: ``N`` prompts, ``K`` samples per prompt, ``B`` sequences, ``R`` response length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from . import ops


def bootstrap_ci(values: Sequence[float] | np.ndarray, num_samples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    ``values``: ``[N]``, or ``[N, K]`` (K samples per prompt). Rows are resampled with replacement,
    each keeping its K entries: the samples of one prompt are correlated, so resampling them one by
    one would understate the uncertainty (a cluster bootstrap over prompts). Each of
    ``num_samples`` resamples gives the mean of its ``N`` rows (every row has K entries, so that is
    the mean of all its entries); the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of those means. Seeded: the same inputs give the same interval.
    Returns ``(low, high)``.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"bootstrap_ci: expected a non-empty [N] or [N, K] array, got shape {x.shape}")
    n = x.shape[0]
    row_means = x.mean(axis=1)  # (N,)
    rng = np.random.default_rng(seed)
    means = np.empty(num_samples)
    step = max(1, (1 << 20) // n)  # bounds the index matrix at about 1M entries
    for start in range(0, num_samples, step):
        m = min(step, num_samples - start)
        means[start:start + m] = row_means[rng.integers(0, n, size=(m, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def win_indicators(scores: Sequence[float] | np.ndarray, other: Sequence[float] | np.ndarray
                   ) -> np.ndarray:
    """Per pair: 1 where ``scores`` beats ``other``, 0.5 for a tie, 0 for a loss (same shape)."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_indicators: shapes differ, {a.shape} vs {b.shape}")
    return (a > b) + 0.5 * (a == b)


def win_rate(scores: Sequence[float] | np.ndarray, other: Sequence[float] | np.ndarray) -> float:
    """Share of pairs where ``scores`` beats ``other``, ties counting 1/2 (0.5: no difference)."""
    return float(win_indicators(scores, other).mean())


def distinct_n(token_lists: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams over all sequences.

    A sequence shorter than ``n`` contributes no n-gram; 0.0 when there is none at all.
    E.g. ``[[1, 2, 3], [1, 2, 4]]``: bigrams (1,2) (2,3) (1,2) (2,4), so distinct-2 = 3/4.
    """
    if n < 1:
        raise ValueError(f"distinct_n: expected n >= 1, got {n}")
    grams = [tuple(seq[i:i + n]) for seq in token_lists for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
    """k1 estimate of KL(pi || pi_ref) per sequence, from tokens sampled from pi.

    ``sum_t mask_t * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))``: unbiased for the sequence KL (its
    mean over samples estimates it), though single samples can be negative.
    Args: ``logprobs``, ``ref_logprobs``, ``mask``: ``[B, R]``. Returns ``[B]``.
    """
    return (ops.kl_penalty(logprobs, ref_logprobs, "k1") * mask).sum(-1)


def pass_k_values(samples_per_prompt: int, pass_k: Sequence[int] | None = None) -> list[int]:
    """The k of pass@k: ``pass_k`` sorted, or by default 1, 2, 4, ... up to and with K."""
    if pass_k is not None:
        return sorted(set(pass_k))
    ks = [1 << i for i in range(samples_per_prompt.bit_length()) if 1 << i <= samples_per_prompt]
    return sorted(set(ks) | {samples_per_prompt})


def pass_at_k_per_prompt(correct: np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k (Chen et al. 2021, :func:`ops.pass_at_k`) of each row of a ``[N, K]``
    0/1 array of correct samples: ``[N]``."""
    x = np.asarray(correct, dtype=bool)
    n = x.shape[1]
    return np.array([ops.pass_at_k(n, int(c), k) for c in x.sum(axis=1)], dtype=np.float64)


def accuracy_summary(correct: np.ndarray, ks: Sequence[int], boot: dict) -> dict:
    """``accuracy`` (mean over all samples) and ``pass@k`` per k (keys ``"1"``, ``"4"``, ...) of a
    ``[N, K]`` 0/1 array, each with its prompt-bootstrap interval (:func:`mean_ci`)."""
    x = np.asarray(correct, dtype=np.float64)
    return {"accuracy": mean_ci(x, **boot),
            "pass@k": {str(k): mean_ci(pass_at_k_per_prompt(x, k), **boot) for k in ks}}


def mean_ci(values: np.ndarray, num_samples: int, level: float, seed: int) -> dict[str, float]:
    """``{"mean", "ci_low", "ci_high"}`` of ``values`` (``[N]`` or ``[N, K]``), see :func:`bootstrap_ci`."""
    low, high = bootstrap_ci(values, num_samples, level, seed)
    return {"mean": float(np.mean(values)), "ci_low": low, "ci_high": high}


def source_mean_ci(values: np.ndarray, num_samples: int, level: float, seed: int
                   ) -> dict[str, float]:
    """:func:`mean_ci` of one source's ``[N, K]`` scores; NaN entries (responses a TRL-style
    function did not score) are left out: the mean is over the scored responses, and each
    bootstrap resample of prompts gives the mean of its scored responses. ``scored``: their
    share (only where some are missing; the mean and interval are NaN when none is scored)."""
    x = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(x)
    if ok.all():
        return mean_ci(x, num_samples, level, seed)
    if not ok.any():
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "scored": 0.0}
    x = x[:, None] if x.ndim == 1 else x
    sums, counts = np.where(ok, x, 0.0).reshape(len(x), -1).sum(1), ok.reshape(len(x), -1).sum(1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(num_samples, len(x)))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[idx].sum(1) / counts[idx].sum(1)  # NaN for a resample of unscored prompts
    low, high = np.nanquantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(sums.sum() / counts.sum()), "ci_low": float(low), "ci_high": float(high),
            "scored": float(ok.mean())}
