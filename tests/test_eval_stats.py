"""The statistics of `rlhf-ppo evaluate` (rlhf_ppo.eval_stats) against hand-computed values:
distinct-n, the win rate, the prompt bootstrap, the k1 sequence KL, means of partly unscored
sources, and accuracy with pass@k."""

import math

import numpy as np
import pytest
import torch

from rlhf_ppo.eval_stats import (
    accuracy_summary,
    bootstrap_ci,
    distinct_n,
    mean_ci,
    pass_at_k_per_prompt,
    pass_k_values,
    sequence_kl,
    source_mean_ci,
    win_indicators,
    win_rate,
)


def test_distinct_n_counts_unique_ngrams_over_all_responses():
    seqs = [[1, 2, 3], [1, 2, 4]]
    # unigrams 1 2 3 1 2 4: 4 unique of 6; bigrams (1,2) (2,3) (1,2) (2,4): 3 unique of 4
    assert distinct_n(seqs, 1) == 4 / 6
    assert distinct_n(seqs, 2) == 3 / 4
    # a response shorter than n has no n-gram; no n-gram at all gives 0
    assert distinct_n([[5], [5, 5, 5]], 2) == 1 / 2
    assert distinct_n([[], [7]], 2) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(seqs, 0)


def test_win_rate_counts_ties_as_half():
    policy, reference = [1.0, 2.0, 3.0, 3.0], [0.0, 2.0, 4.0, 1.0]
    assert win_indicators(policy, reference).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert win_rate(policy, reference) == (1 + 0.5 + 0 + 1) / 4
    assert win_rate(reference, policy) == 1 - 0.625
    with pytest.raises(ValueError, match="shapes differ"):
        win_indicators([1.0], [1.0, 2.0])


def test_bootstrap_ci_of_a_constant_is_the_constant():
    assert bootstrap_ci([0.25] * 7, num_samples=50) == (0.25, 0.25)
    assert bootstrap_ci(np.full((5, 3), -2.0), num_samples=50) == (-2.0, -2.0)
    low, high = bootstrap_ci([0.1] * 10, num_samples=50)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_bootstrap_ci_hand_computed_two_values():
    # Resampling [0, 1] twice gives means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the 30%
    # and 70% quantiles (level 0.4) are both 1/2 (up to sampling noise far from the 1/4 and 3/4
    # cumulative thresholds with 4000 resamples).
    assert bootstrap_ci([0.0, 1.0], num_samples=4000, level=0.4, seed=1) == (0.5, 0.5)


def test_bootstrap_ci_contains_mean_narrows_with_n_and_is_seeded():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=100), rng.normal(size=1600)
    widths = []
    for x in (small, large):
        low, high = bootstrap_ci(x, num_samples=1000, seed=3)
        assert low < x.mean() < high
        widths.append(high - low)
    # the width scales as 1/sqrt(n): 16x the data, about a quarter of the width
    assert 2.5 < widths[0] / widths[1] < 6.0, widths
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, seed=3) != bootstrap_ci(small, seed=4)


def test_bootstrap_ci_resamples_prompts_with_their_samples():
    # [N, K]: rows are resampled whole, so the interval equals that of the row means.
    x = np.random.default_rng(1).normal(size=(30, 4))
    assert bootstrap_ci(x, seed=5) == pytest.approx(bootstrap_ci(x.mean(axis=1), seed=5))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_sequence_kl_is_the_masked_sum_of_log_ratios():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -7.0], [-0.5, -1.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0: 0.5 - 1 + 4 = 3.5; row 1: 0 + 1 (the third token is past the stop) = 1
    assert sequence_kl(lp, ref, mask).tolist() == [3.5, 1.0]
    assert sequence_kl(lp, lp, mask).tolist() == [0.0, 0.0]


def test_source_mean_ci_leaves_out_unscored_responses():
    nan = float("nan")
    assert source_mean_ci(np.array([[2.0, nan], [2.0, 2.0]]), 50, 0.95, 0) == {
        "mean": 2.0, "ci_low": 2.0, "ci_high": 2.0, "scored": 0.75}
    out = source_mean_ci(np.array([[1.0, nan], [3.0, 5.0], [nan, nan]]), 500, 0.9, 0)
    # the mean of the 3 scored responses; resamples of prompts 0 and 1 give means in [1, 4]
    assert out["mean"] == 3.0 and out["scored"] == 0.5
    assert 1.0 <= out["ci_low"] <= 3.0 <= out["ci_high"] <= 4.0
    assert math.isnan(source_mean_ci(np.full((2, 2), nan), 50, 0.95, 0)["mean"])
    # without missing scores: mean_ci, unchanged
    x = np.random.default_rng(0).normal(size=(6, 2))
    assert source_mean_ci(x, 100, 0.95, 3) == {**mean_ci(x, 100, 0.95, 3)}


def test_pass_k_values_default_and_given():
    assert pass_k_values(8) == [1, 2, 4, 8]
    assert pass_k_values(6) == [1, 2, 4, 6]
    assert pass_k_values(1) == [1]
    assert pass_k_values(8, [8, 1, 8, 3]) == [1, 3, 8]


def test_accuracy_and_pass_at_k_hand_computed():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    # n=4: c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; c=2, k=2: 1 - C(2,2)/C(4,2) = 5/6
    assert pass_at_k_per_prompt(correct, 2) == pytest.approx([0.5, 5 / 6, 0.0])
    assert pass_at_k_per_prompt(correct, 1) == pytest.approx([0.25, 0.5, 0.0])  # c / n
    assert pass_at_k_per_prompt(correct, 4) == pytest.approx([1.0, 1.0, 0.0])
    boot = dict(num_samples=200, level=0.95, seed=0)
    s = accuracy_summary(correct, [1, 2, 4], boot)
    assert s["accuracy"]["mean"] == pytest.approx(3 / 12)
    assert list(s["pass@k"]) == ["1", "2", "4"]
    assert s["pass@k"]["1"]["mean"] == pytest.approx(s["accuracy"]["mean"])  # pass@1 = accuracy
    assert s["pass@k"]["2"]["mean"] == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert s["pass@k"]["4"]["mean"] == pytest.approx(2 / 3)
    for stat in (s["accuracy"], *s["pass@k"].values()):
        assert stat["ci_low"] <= stat["mean"] <= stat["ci_high"]
