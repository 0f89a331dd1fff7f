"""Tests of rlhf_ppo.ops against small hand-computed examples.

Expected values are written as formulas with their derivation in comments; every comparison
uses torch.testing.assert_close with its default tolerances.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_ppo import ops

# A value placed at padding positions: any leak of it into a result makes the test fail.
JUNK = 1000.0


# --------------------------------------------------------------------------- masked statistics

def _stats_example():
    # valid values: 1, 2, 3 (row 0) and 4 (row 1); the rest is padding.
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, JUNK, -JUNK]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return x, mask


def test_masked_sum():
    x, mask = _stats_example()
    assert_close(ops.masked_sum(x, mask), torch.tensor(1.0 + 2.0 + 3.0 + 4.0))
    assert_close(ops.masked_sum(x, mask, dim=1), torch.tensor([1.0 + 2.0 + 3.0, 4.0]))
    assert_close(ops.masked_sum(x, mask, dim=0), torch.tensor([1.0 + 4.0, 2.0, 3.0]))


def test_masked_mean_all_and_per_row():
    x, mask = _stats_example()
    # mean over the 4 valid values: (1 + 2 + 3 + 4) / 4
    assert_close(ops.masked_mean(x, mask), torch.tensor((1.0 + 2.0 + 3.0 + 4.0) / 4))
    # per row: (1 + 2 + 3) / 3 and 4 / 1
    assert_close(ops.masked_mean(x, mask, dim=1), torch.tensor([(1.0 + 2.0 + 3.0) / 3, 4.0]))
    # a bool mask is the same as an int mask
    assert_close(ops.masked_mean(x, mask.bool()), torch.tensor(2.5))


def test_masked_mean_empty_row_is_zero_not_nan():
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert_close(ops.masked_mean(x, mask, dim=1), torch.tensor([2.0, 0.0]))
    assert_close(ops.masked_mean(x, torch.zeros_like(mask)), torch.tensor(0.0))


def _unbiased_var(x, mask):
    valid = x[mask.bool()]
    return ((valid - valid.mean()) ** 2).sum() / (valid.numel() - 1)


def test_whiten_with_given_statistics_shift_mean_true():
    x, mask = _stats_example()
    # valid values 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5,
    # unbiased variance 5 / 3 (the statistics the trainer reduces over processes)
    out = ops.whiten(x, mask, 2.5, 5.0 / 3)
    # (x - 2.5) / sqrt(5/3 + 1e-8) on valid tokens, 0 on padding
    std = math.sqrt(5.0 / 3 + 1e-8)
    expected = torch.tensor([[(1 - 2.5) / std, (2 - 2.5) / std, (3 - 2.5) / std],
                             [(4 - 2.5) / std, 0.0, 0.0]])
    assert_close(out, expected)
    assert_close(ops.masked_mean(out, mask), torch.tensor(0.0))
    assert_close(_unbiased_var(out, mask), torch.tensor(1.0))  # unbiased variance 1
    assert out[1, 1] == 0 and out[1, 2] == 0


def test_whiten_shift_mean_false_keeps_mean():
    x, mask = _stats_example()
    out = ops.whiten(x, mask, 2.5, 5.0 / 3, shift_mean=False)
    # (x - 2.5) / std + 2.5 on valid tokens, 0 on padding
    std = math.sqrt(5.0 / 3 + 1e-8)
    expected = torch.tensor([[(1 - 2.5) / std + 2.5, (2 - 2.5) / std + 2.5, (3 - 2.5) / std + 2.5],
                             [(4 - 2.5) / std + 2.5, 0.0, 0.0]])
    assert_close(out, expected)
    assert_close(ops.masked_mean(out, mask), torch.tensor(2.5))
    assert_close(_unbiased_var(out, mask), torch.tensor(1.0))


# --------------------------------------------------------------------------- log-probs, entropy

def _lp_ent(logits, tokens, temperature=1.0):
    return ops.token_logprobs_and_entropy(ops.log_softmax_with_temperature(logits, temperature),
                                          tokens)


def test_logprobs_and_entropy_hand_example():
    # logits (0, ln 2, ln 3) -> softmax (1/6, 2/6, 3/6)
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]])
    lp, ent = _lp_ent(logits, torch.tensor([2]))
    assert_close(lp, torch.tensor([math.log(3 / 6)]))
    assert_close(_lp_ent(logits, torch.tensor([0]))[0], torch.tensor([math.log(1 / 6)]))
    # H = -sum p log p
    p = [1 / 6, 2 / 6, 3 / 6]
    assert_close(ent, torch.tensor([-sum(q * math.log(q) for q in p)]))


def test_logprobs_with_temperature_hand_example():
    # logits (0, ln 4) at temperature 2 -> (0, ln 2) -> softmax (1/3, 2/3)
    logits = torch.tensor([[0.0, math.log(4.0)]])
    lp, ent = _lp_ent(logits, torch.tensor([1]), temperature=2.0)
    assert_close(lp, torch.tensor([math.log(2 / 3)]))
    assert_close(ent, torch.tensor([-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)]))


def test_logprobs_and_entropy_vs_manual_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g) * 3
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    # manual softmax: p = exp(z) / sum exp(z)
    p = logits.exp() / logits.exp().sum(-1, keepdim=True)
    expected_logp = torch.log(p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    lp, ent = _lp_ent(logits, tokens)
    assert_close(lp, expected_logp)
    assert_close(ent, -(p * p.log()).sum(-1))
    # the sampling loop passes the probabilities it drew from: the same entropy
    logp = ops.log_softmax_with_temperature(logits)
    assert_close(ops.token_logprobs_and_entropy(logp, tokens, probs=logp.exp())[1], ent)
    assert (ops.token_logprobs_and_entropy(logp, tokens, with_entropy=False)[1] == 0).all()


def test_logprobs_and_entropy_computed_in_float32():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=torch.bfloat16)
    lp, ent = _lp_ent(logits, torch.tensor([1]))
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    z = logits.float()  # the bf16 values, computed in float32
    p = z.exp() / z.exp().sum(-1, keepdim=True)
    assert_close(lp, torch.log(p[:, 1]))
    assert_close(ent, -(p * p.log()).sum(-1))


# --------------------------------------------------------------------------- KL estimators

def _kl_example():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    # log_ratio = logprobs - ref = (0.5, -1.0, 0.0)
    return logprobs, ref


def test_kl_penalty_k1():
    lp, ref = _kl_example()
    assert_close(ops.kl_penalty(lp, ref, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    assert_close(ops.kl_penalty(lp, ref), torch.tensor([[0.5, -1.0, 0.0]]))  # default k1


def test_kl_penalty_k2():
    lp, ref = _kl_example()
    # log_ratio^2 / 2
    assert_close(ops.kl_penalty(lp, ref, "k2"),
                 torch.tensor([[0.5 ** 2 / 2, (-1.0) ** 2 / 2, 0.0]]))


def test_kl_penalty_k3():
    lp, ref = _kl_example()
    # exp(-lr) - 1 + lr
    expected = torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]])
    out = ops.kl_penalty(lp, ref, "k3")
    assert_close(out, expected)
    assert (out >= 0).all()


def test_kl_penalty_invalid_estimator():
    lp, ref = _kl_example()
    with pytest.raises(ValueError, match="k4"):
        ops.kl_penalty(lp, ref, "k4")


# --------------------------------------------------------------------------- reward shaping

def test_last_token_index():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 0]])
    # last valid index per row; a hole does not stop the row; an empty row gives 0
    assert torch.equal(ops.last_token_index(mask), torch.tensor([2, 1, 0, 2, 0]))
    assert torch.equal(ops.last_token_index(mask.bool()), torch.tensor([2, 1, 0, 2, 0]))


def test_shape_rewards_score_on_last_valid_token():
    c = 0.1  # kl_coef
    s0, s1, s2 = 2.0, -3.0, 5.0
    kl = torch.tensor([[0.5, -0.2, 0.3],
                       [0.4, 0.6, JUNK],
                       [-0.7, JUNK, JUNK]])
    # row 0: full length (last valid token is the last column); row 1: length 2; row 2: length 1
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    out = ops.shape_rewards(torch.tensor([s0, s1, s2]), kl, mask, kl_coef=c)
    expected = torch.tensor([
        [-c * 0.5, -c * -0.2, -c * 0.3 + s0],  # score on column 2 (last column)
        [-c * 0.4, -c * 0.6 + s1, 0.0],        # score on column 1, padding 0
        [-c * -0.7 + s2, 0.0, 0.0],            # score on column 0, padding 0
    ])
    assert_close(out, expected)


def test_shape_rewards_zero_kl_coef_puts_only_scores():
    kl = torch.ones(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = ops.shape_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.0)
    expected = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    assert_close(out, expected)


# --------------------------------------------------------------------------- GAE

G, L = 0.9, 0.8  # gamma, lambda


def _gae_row3(r, v):
    """Hand GAE of a full row of 3 tokens (value after the end is 0)."""
    r0, r1, r2 = r
    v0, v1, v2 = v
    a2 = r2 - v2                                  # delta_2 = r2 + g*0 - v2
    a1 = r1 + G * v2 - v1 + G * L * a2            # delta_1 + g*l*A_2
    a0 = r0 + G * v1 - v0 + G * L * a1            # delta_0 + g*l*A_1
    return [a0, a1, a2]


def test_compute_gae_single_row():
    r = [1.0, -0.5, 2.0]
    v = [0.3, 0.7, -0.4]
    adv, ret = ops.compute_gae(torch.tensor([r]), torch.tensor([v]), torch.ones(1, 3), G, L)
    r0, r1, r2 = r
    v0, v1, v2 = v
    a2 = r2 - v2
    a1 = r1 + G * v2 - v1 + G * L * (r2 - v2)
    a0 = r0 + G * v1 - v0 + G * L * a1
    assert_close(adv, torch.tensor([[a0, a1, a2]]))
    assert_close(ret, torch.tensor([[a0 + v0, a1 + v1, a2 + v2]]))


def test_compute_gae_batch_with_different_lengths():
    # row 0: 3 valid tokens; row 1: 1 valid token; row 2: 2 valid tokens (padding mid-batch)
    rewards = torch.tensor([[1.0, -0.5, 2.0],
                            [0.6, JUNK, JUNK],
                            [0.2, 1.5, JUNK]])
    values = torch.tensor([[0.3, 0.7, -0.4],
                           [0.9, JUNK, JUNK],
                           [-0.1, 0.5, JUNK]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    adv, ret = ops.compute_gae(rewards, values, mask, G, L)

    row0 = _gae_row3([1.0, -0.5, 2.0], [0.3, 0.7, -0.4])
    # row 1: single token, the value after it is 0 (not the JUNK value of the padding)
    row1 = [0.6 - 0.9, 0.0, 0.0]
    # row 2: a1 = r1 - v1 (value after last valid token is 0), a0 = r0 + g*v1 - v0 + g*l*a1
    a21 = 1.5 - 0.5
    a20 = 0.2 + G * 0.5 - (-0.1) + G * L * a21
    row2 = [a20, a21, 0.0]
    assert_close(adv, torch.tensor([row0, row1, row2]))

    # returns = advantages + values on valid tokens, 0 on padding
    m = mask.float()
    assert_close(ret, (adv + values) * m)
    assert_close(ret[1], torch.tensor([0.6, 0.0, 0.0]))  # a + v = (0.6 - 0.9) + 0.9
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_compute_gae_padded_row_equals_row_alone():
    r = torch.tensor([[0.2, 1.5]])
    v = torch.tensor([[-0.1, 0.5]])
    adv_alone, ret_alone = ops.compute_gae(r, v, torch.ones(1, 2), G, L)
    # same row padded to length 4 with junk, in a batch with a longer row
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.2, 1.5, JUNK, -JUNK]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [-0.1, 0.5, JUNK, JUNK]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = ops.compute_gae(rewards, values, mask, G, L)
    assert_close(adv[1, :2], adv_alone[0])
    assert_close(ret[1, :2], ret_alone[0])
    assert_close(adv[1, 2:], torch.zeros(2))
    assert_close(ret[1, 2:], torch.zeros(2))


def test_compute_gae_mask_with_hole_skips_masked_token():
    # token 1 is masked: the recursion goes from token 2 straight to token 0
    r0, r2 = 1.0, 2.0
    v0, v2 = 0.3, -0.4
    rewards = torch.tensor([[r0, JUNK, r2]])
    values = torch.tensor([[v0, JUNK, v2]])
    mask = torch.tensor([[1, 0, 1]])
    adv, ret = ops.compute_gae(rewards, values, mask, G, L)
    a2 = r2 - v2
    a0 = r0 + G * v2 - v0 + G * L * a2  # V(next) is V at token 2, A(next) is A_2
    assert_close(adv, torch.tensor([[a0, 0.0, a2]]))
    assert_close(ret, torch.tensor([[a0 + v0, 0.0, a2 + v2]]))


def test_compute_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    # with g = l = 1, A_t = sum_{k>=t} r_k - V_t
    rewards = torch.tensor([[1.0, 2.0, 3.0, JUNK]])
    values = torch.tensor([[0.5, -1.0, 2.0, JUNK]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, _ = ops.compute_gae(rewards, values, mask, 1.0, 1.0)
    assert_close(adv, torch.tensor([[6.0 - 0.5, 5.0 + 1.0, 3.0 - 2.0, 0.0]]))


def test_compute_gae_per_row_lambda_equals_each_row_alone():
    # lam as a [B] tensor: row 0 uses 0.5, row 1 uses 1.0 (Monte-Carlo)
    rewards = torch.tensor([[1.0, -0.5, 2.0], [0.2, 1.5, JUNK]])
    values = torch.tensor([[0.3, 0.7, -0.4], [-0.1, 0.5, JUNK]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = ops.compute_gae(rewards, values, mask, G, torch.tensor([0.5, 1.0]))
    # row 0 by hand with lam 0.5
    a2 = 2.0 - (-0.4)
    a1 = -0.5 + G * (-0.4) - 0.7 + G * 0.5 * a2
    a0 = 1.0 + G * 0.7 - 0.3 + G * 0.5 * a1
    # row 1 with lam 1: a1 = r1 - v1, a0 = r0 + g*v1 - v0 + g*a1 = r0 + g*r1 - v0
    b1 = 1.5 - 0.5
    b0 = 0.2 + G * 1.5 - (-0.1)
    assert_close(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    assert_close(ret[1], torch.tensor([0.2 + G * 1.5, 1.5, 0.0]))  # MC returns: reward-to-go


def test_length_adaptive_lam():
    # lam = 1 - 1 / (alpha * l): alpha 0.05 -> l=40: 1 - 1/2; l=100: 1 - 1/5; l=10: 1 - 2 -> 0
    lam = ops.length_adaptive_lam(torch.tensor([40, 100, 10, 0]), 0.05)
    assert_close(lam, torch.tensor([0.5, 0.8, 0.0, 0.0]))


def test_scale_gradient():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    for scale in (0.0, 0.25, 1.0):
        x.grad = None
        y = ops.scale_gradient(x, scale)
        assert_close(y, x.detach())  # the forward value is x
        ((3.0 * y).sum() + 0.0 * x.sum()).backward()  # (the 0 * x term: scale 0 detaches)
        assert_close(x.grad, torch.full((2,), 3.0 * scale))


# --------------------------------------------------------------------------- loss aggregation

def test_aggregate_loss_token_and_seq_mean():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [10.0, JUNK, JUNK]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token-mean: (1 + 2 + 3 + 10) / 4
    assert_close(ops.aggregate_loss(per_token, mask, "token-mean"), torch.tensor(16.0 / 4))
    # seq-mean: ((1 + 2 + 3) / 3 + 10 / 1) / 2
    assert_close(ops.aggregate_loss(per_token, mask, "seq-mean"), torch.tensor((2.0 + 10.0) / 2))
    # normalizer replaces the denominator
    assert_close(ops.aggregate_loss(per_token, mask, "token-mean", normalizer=8),
                 torch.tensor(16.0 / 8))
    assert_close(ops.aggregate_loss(per_token, mask, "seq-mean", normalizer=4),
                 torch.tensor((2.0 + 10.0) / 4))


def test_aggregate_loss_invalid_aggregation():
    with pytest.raises(ValueError, match="sum"):
        ops.aggregate_loss(torch.ones(1, 2), torch.ones(1, 2), "sum")


# --------------------------------------------------------------------------- policy loss

EPS = 0.2  # clip range


def _policy_example():
    # row 0: 3 tokens, row 1: 2 tokens + padding
    ratios = torch.tensor([[1.5, 0.5, 0.5], [1.5, 1.1, 1.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0], [-2.0, 1.0, JUNK]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -0.7]])
    new = (old + ratios.log()).clone().requires_grad_(True)
    return new, old, adv, mask


# Per token, loss_t = max(-A r, -A clip(r, 0.8, 1.2)):
#   A=+1, r=1.5: max(-1.5, -1.2) = -1.2   clipped taken (positive advantage, ratio too high)
#   A=+1, r=0.5: max(-0.5, -0.8) = -0.5   unclipped taken
#   A=-2, r=0.5: max( 1.0,  1.6) =  1.6   clipped taken (negative advantage, ratio too low)
#   A=-2, r=1.5: max( 3.0,  2.4) =  3.0   unclipped taken
#   A=+1, r=1.1: max(-1.1, -1.1) = -1.1   inside the clip range: not counted as clipped
PER_TOKEN = [[-1.2, -0.5, 1.6], [3.0, -1.1]]


def test_policy_loss_token_mean_and_stats():
    new, old, adv, mask = _policy_example()
    loss, stats = ops.policy_loss(new, old, adv, mask, EPS)
    assert_close(loss, torch.tensor((-1.2 - 0.5 + 1.6 + 3.0 - 1.1) / 5))
    assert_close(stats["clipfrac"], torch.tensor(2 / 5))
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1]
    assert_close(stats["ratio"], torch.tensor(sum(ratios) / 5))
    # approx_kl = mean((r - 1) - log r) over the 5 valid tokens
    assert_close(stats["approx_kl"], torch.tensor(sum((q - 1) - math.log(q) for q in ratios) / 5))
    for v in stats.values():
        assert not v.requires_grad


def test_policy_loss_gradient():
    new, old, adv, mask = _policy_example()
    loss, _ = ops.policy_loss(new, old, adv, mask, EPS)
    loss.backward()
    # d loss / d logprob_t = (-A_t r_t) / 5 where the unclipped term is taken, 0 where the
    # clipped (constant) term is taken, 0 on padding
    expected = torch.tensor([[0.0, -1.0 * 0.5 / 5, 0.0], [2.0 * 1.5 / 5, -1.0 * 1.1 / 5, 0.0]])
    assert_close(new.grad, expected)


def test_policy_loss_seq_mean():
    new, old, adv, mask = _policy_example()
    loss, _ = ops.policy_loss(new, old, adv, mask, EPS, aggregation="seq-mean")
    # mean of the per-sequence token means: ((-1.2 - 0.5 + 1.6)/3 + (3.0 - 1.1)/2) / 2
    assert_close(loss, torch.tensor(((-1.2 - 0.5 + 1.6) / 3 + (3.0 - 1.1) / 2) / 2))


def test_policy_loss_no_change_has_ratio_one_and_no_clipping():
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    adv = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = ops.policy_loss(old.clone(), old, adv, mask, EPS)
    assert_close(loss, torch.tensor(-(1.0 - 2.0 + 0.5) / 3))  # -mean(A) over valid tokens
    assert_close(stats["ratio"], torch.tensor(1.0))
    assert_close(stats["clipfrac"], torch.tensor(0.0))
    assert_close(stats["approx_kl"], torch.tensor(0.0))


def _minibatch(seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 5, generator=g) * 3
    new = old + torch.randn(4, 5, generator=g) * 0.3  # some ratios outside the clip range
    adv = torch.randn(4, 5, generator=g)
    # rows of 5, 2, 4 and 1 valid tokens
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    return new, old, adv, mask


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_policy_loss_normalizer_micro_batches_match_full_minibatch(aggregation):
    new, old, adv, mask = _minibatch(0)
    full_lp = new.clone().requires_grad_(True)
    full, _ = ops.policy_loss(full_lp, old, adv, mask, EPS, aggregation)
    full.backward()

    # the whole minibatch's count: 12 valid tokens, or 4 sequences
    normalizer = mask.sum() if aggregation == "token-mean" else mask.shape[0]
    micro_lp = new.clone().requires_grad_(True)
    total = torch.zeros(())
    for sl in (slice(0, 2), slice(2, 4)):  # micro-batches of 7 and 5 tokens
        part, _ = ops.policy_loss(micro_lp[sl], old[sl], adv[sl], mask[sl], EPS, aggregation,
                                  normalizer=normalizer)
        part.backward()  # gradient accumulation
        total = total + part.detach()
    assert_close(total, full.detach())
    assert_close(micro_lp.grad, full_lp.grad)

    # without the normalizer, the micro-batch means do not add up to the minibatch loss
    naive = sum(ops.policy_loss(new[sl], old[sl], adv[sl], mask[sl], EPS, aggregation)[0]
                for sl in (slice(0, 2), slice(2, 4)))
    assert not torch.allclose(naive, full.detach())


# --------------------------------------------------------------------------- value loss

def _value_example():
    old = torch.tensor([[1.0, 1.0, 0.0], [0.0, JUNK, 0.0]])
    values = torch.tensor([[1.5, 1.5, 0.1], [-0.5, JUNK, 0.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 1.0, 1.0], [-1.0, JUNK, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return values, old, returns, mask


# With c = 0.2, V_clip = V_old + clip(V - V_old, -0.2, 0.2):
#   V=1.5, old=1, R=2:    (V-R)^2 = 0.25, V_clip=1.2,  (V_clip-R)^2 = 0.64 -> 0.64 (clipped)
#   V=1.5, old=1, R=1:    0.25, V_clip=1.2,  0.04 -> 0.25 (unclipped)
#   V=0.1, old=0, R=1:    0.81, V_clip=0.1,  0.81 -> 0.81 (inside the range, not counted)
#   V=-0.5, old=0, R=-1:  0.25, V_clip=-0.2, 0.64 -> 0.64 (clipped)

def test_value_loss_clipped():
    values, old, returns, mask = _value_example()
    loss, stats = ops.value_loss(values, old, returns, mask, clip_range=0.2)
    assert_close(loss, torch.tensor(0.5 * (0.64 + 0.25 + 0.81 + 0.64) / 4))
    assert_close(stats["vf_clipfrac"], torch.tensor(2 / 4))
    loss.backward()
    # gradient 0.5 * 2 (V - R) / 4 where the unclipped term is taken, 0 where the clipped one is
    expected = torch.tensor([[0.0, (1.5 - 1.0) / 4, (0.1 - 1.0) / 4], [0.0, 0.0, 0.0]])
    assert_close(values.grad, expected)


def test_value_loss_unclipped():
    values, old, returns, mask = _value_example()
    loss, stats = ops.value_loss(values, old, returns, mask, clip_range=None)
    # 0.5 * mean((V - R)^2) over the 4 valid tokens
    assert_close(loss, torch.tensor(0.5 * (0.25 + 0.25 + 0.81 + 0.25) / 4))
    assert_close(stats["vf_clipfrac"], torch.tensor(0.0))


def test_value_loss_seq_mean():
    values, old, returns, mask = _value_example()
    loss, _ = ops.value_loss(values, old, returns, mask, clip_range=0.2, aggregation="seq-mean")
    # 0.5 * ((0.64 + 0.25 + 0.81) / 3 + 0.64 / 1) / 2
    assert_close(loss, torch.tensor(0.5 * ((0.64 + 0.25 + 0.81) / 3 + 0.64) / 2))


# --------------------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_above_target_clips_error():
    ctl = ops.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)
    # e = clip(12/6 - 1, -0.2, 0.2) = 0.2
    assert_close(ctl.value, 0.1 * (1 + 0.2 * 256 / 10000))


def test_adaptive_kl_controller_below_target_clips_error():
    ctl = ops.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=1.0, n_steps=256)
    # e = clip(1/6 - 1, -0.2, 0.2) = -0.2
    assert_close(ctl.value, 0.1 * (1 - 0.2 * 256 / 10000))


def test_adaptive_kl_controller_inside_clip_range():
    ctl = ops.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=6.6, n_steps=64)
    # e = 6.6/6 - 1 = 0.1, not clipped
    assert_close(ctl.value, 0.1 * (1 + (6.6 / 6 - 1) * 64 / 1000))
    ctl.update(current_kl=5.7, n_steps=64)
    # e = 5.7/6 - 1 = -0.05; the coefficient multiplies again
    assert_close(ctl.value, 0.1 * (1 + (6.6 / 6 - 1) * 64 / 1000) * (1 + (5.7 / 6 - 1) * 64 / 1000))


def test_fixed_kl_controller_unchanged():
    ctl = ops.FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    ctl.update(current_kl=0.0, n_steps=1000)
    assert ctl.value == 0.05


# --------------------------------------------------------------------------- running moments

def test_running_moments_matches_concatenated_batches():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(7, generator=g, dtype=torch.float64) * 2 + 3,
               torch.randn(1, generator=g, dtype=torch.float64) - 5,
               torch.randn(12, generator=g, dtype=torch.float64) * 0.5]
    rm = ops.RunningMoments()
    for b in batches:
        rm.update(b)
    allx = torch.cat(batches)
    assert rm.count == 20
    assert_close(rm.mean, allx.mean().item())
    assert_close(rm.std, allx.std(unbiased=False).item())
    assert_close(rm.var, allx.var(unbiased=False).item())


def test_running_moments_hand_example_and_empty_update():
    rm = ops.RunningMoments()
    rm.update(torch.tensor([1.0, 3.0]))
    rm.update(torch.tensor([]))  # no-op
    rm.update(torch.tensor([[5.0]]))  # flattened
    # values 1, 3, 5: mean 3, population variance (4 + 0 + 4) / 3
    assert rm.count == 3
    assert_close(rm.mean, 3.0)
    assert_close(rm.var, 8.0 / 3)
    assert_close(rm.std, math.sqrt(8.0 / 3))
