"""The iteration metrics (metrics.py) against hand-computed values, on one process."""

import math
import types

import pytest
import torch

from rlhf_ppo.metrics import IterationRecord, iteration_metrics

# One process: reductions are the identity.
ACC = types.SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, op: t)


def test_iteration_metrics_hand_values():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]])  # error 0, 0, 0, 1 on valid tokens
    entropy = torch.tensor([[0.5, 1.0, 1.5], [2.0, 9.0, 9.0]])  # padding must not count
    update = {"policy_loss": 0.1, "ppo_steps": 2, "nonfinite_skipped": False}
    record = IterationRecord(
        iteration=3, all_scores=torch.tensor([1.0, 3.0]), all_stopped=torch.tensor([True, False]),
        mask=mask, entropy=entropy, values=values, returns=returns, scores=torch.tensor([0.5, 1.5]),
        reward_metrics={"reward/source0_mean": 2.0}, kl=0.4, kl_coef=0.1, returns_moments=(2.5, 5 / 3))
    m = iteration_metrics(ACC, record, update, lr=1e-3, nonfinite_skips=0, times=[0.0, 1.0, 1.5, 3.0])
    # error (0, 0, 0, 1): mean 0.25, unbiased variance (3 * 0.0625 + 0.5625) / 3 = 0.25
    assert m["explained_variance"] == pytest.approx(1 - 0.25 / (5 / 3))
    assert m["value_error"] == pytest.approx(math.sqrt(1 / 4))  # root mean square of the error
    assert m["entropy"] == pytest.approx((0.5 + 1.0 + 1.5 + 2.0) / 4)
    assert m["score_mean"] == 2.0 and m["score_std"] == pytest.approx(math.sqrt(2.0))
    assert m["score_processed_mean"] == pytest.approx(1.0)
    assert m["value_mean"] == pytest.approx((1 + 2 + 3 + 3) / 4)
    assert m["response_length"] == pytest.approx(2.0) and m["stop_rate"] == 0.5
    assert m["reward_kl_penalty"] == pytest.approx(-0.04)
    assert m["tokens_per_second"] == pytest.approx(4 / 1.0)  # 4 response tokens in 1 s of rollout
    assert (m["time/rollout"], m["time/score"], m["time/update"], m["time/iteration"]) == (1.0, 0.5, 1.5, 3.0)
    assert m["nonfinite_skipped"] == 0.0 and m["ppo_steps"] == 2 and m["reward/source0_mean"] == 2.0
    assert update["nonfinite_skipped"] is False  # the caller's dict is left alone
