"""Tests of the critic-free estimators and policy-loss variants of rlhf_ppo.ops (issue 18).

Three kinds of checks:
- small hand-computed examples, the expected values written as formulas, with a sentinel value
  (JUNK) in the padding to show that padding never leaks into a result;
- the peers' reference code, copied into this file with a link to the commit and lines it comes
  from (veRL, OpenRLHF, TRL), compared with ours on random padded batches;
- micro-batch invariance of every loss aggregation mode (summed micro-batch losses with the
  minibatch's normalizer = the minibatch loss, and the same gradient).
Comparisons use torch.testing.assert_close with its default tolerances unless they say otherwise.
"""

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from rlhf_ppo import estimators, ops
from rlhf_ppo.errors import ConfigError

GROUP_ESTIMATORS = [name for name, e in estimators.ESTIMATORS.items() if e.groups]


def group_advantages(scores, k, name, eps=None):
    """The registered group baseline of estimator ``name`` (``eps``: GRPO's std epsilon)."""
    baseline = estimators.get(name).baseline
    return baseline(scores, k) if eps is None else baseline(scores, k, eps=eps)

# A value placed at padding positions: any leak of it into a result makes the test fail.
JUNK = 1000.0

VERL = "https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/"
OPENRLHF = "https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/"
TRL = "https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/"


# =========================================================================== peers' reference code
# Copied from the files below (only renamed, `config` objects replaced by arguments, dp_size = 1);
# kept as close to the original as possible so that a difference shows up here.

# --- veRL, verl/utils/torch_functional.py#L266-L339 (masked_sum, masked_mean, masked_var,
#     masked_whiten)
def verl_masked_sum(values, mask, axis=None):
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def verl_masked_mean(values, mask, axis=None):
    s = verl_masked_sum(values, mask, axis)
    return s / (mask.sum(axis=axis) + 1e-8)


def verl_masked_var(values, mask, unbiased=True):
    mean = verl_masked_mean(values, mask)
    centered_values = values - mean
    variance = verl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def verl_masked_whiten(values, mask, shift_mean=True):
    mean, var = verl_masked_mean(values, mask), verl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


# --- veRL, verl/trainer/ppo/core_algos.py#L303-L330 (compute_grpo_outcome_advantage)
def verl_grpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
                id2std[idx] = torch.tensor(1.0)
            elif len(id2score[idx]) > 1:
                scores_tensor = torch.stack(id2score[idx])
                id2mean[idx] = torch.mean(scores_tensor)
                id2std[idx] = torch.std(scores_tensor)
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            if norm_adv_by_std_in_grpo:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


# --- veRL, verl/trainer/ppo/core_algos.py#L451-L473
#     (compute_reinforce_plus_plus_baseline_outcome_advantage)
def verl_reinforce_pp_baseline(token_level_rewards, response_mask, index):
    response_length = token_level_rewards.shape[-1]
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean = {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
            elif len(id2score[idx]) > 1:
                id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1).tile([1, response_length]) * response_mask
        scores = verl_masked_whiten(scores, response_mask) * response_mask
    return scores, scores


# --- veRL, verl/trainer/ppo/core_algos.py#L501-L525 (compute_rloo_outcome_advantage)
def verl_rloo(token_level_rewards, response_mask, index):
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean = {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
            elif len(id2score[idx]) > 1:
                id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            response_num = len(id2score[index[i]])
            if response_num > 1:
                scores[i] = scores[i] * response_num / (response_num - 1) - id2mean[
                    index[i]] * response_num / (response_num - 1)
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


# --- veRL, verl/trainer/ppo/core_algos.py#L603-L618
#     (compute_reinforce_plus_plus_outcome_advantage)
def verl_reinforce_pp(token_level_rewards, response_mask, gamma):
    with torch.no_grad():
        returns = torch.zeros_like(token_level_rewards)
        running_return = 0
        for t in reversed(range(token_level_rewards.shape[1])):
            running_return = token_level_rewards[:, t] + gamma * running_return
            returns[:, t] = running_return
            # Reset after EOS
            running_return = running_return * response_mask[:, t]
        advantages = verl_masked_whiten(returns, response_mask)
        advantages = advantages * response_mask
    return advantages, returns


# --- veRL, verl/trainer/ppo/core_algos.py#L1025-L1080 (agg_loss)
def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None,
                  global_batch_size=None, loss_scale_factor=None):
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        loss = verl_masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)  # token-sum
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()  # exclude fully masked sequences
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size  # seq-mean
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)  # per-sequence token count
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)  # token-mean
        seq_mask = (seq_mask > 0).float()  # exclude fully masked sequences
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size  # seq-mean
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        if loss_scale_factor is None:
            loss_scale_factor = loss_mask.shape[-1]
        loss = torch.sum(seq_losses) / loss_scale_factor
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return loss


# --- veRL, verl/trainer/ppo/core_algos.py#L1210-L1243 (compute_policy_loss_vanilla, the config
#     values as arguments; rollout_is_weights as in its #L1237-L1239)
def verl_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                             clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c,
                             rollout_is_weights=None, **global_batch_info):
    cliprange, cliprange_low, cliprange_high = clip_ratio, clip_ratio_low, clip_ratio_high
    negative_approx_kl = log_prob - old_log_prob
    # Clamp negative_approx_kl for stability
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    if cliprange_low is None:
        cliprange_low = cliprange
    if cliprange_high is None:
        cliprange_high = cliprange
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = verl_agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode,
                            **global_batch_info)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


# --- veRL, verl/trainer/ppo/core_algos.py#L1286-L1313 (compute_policy_loss_gspo)
def verl_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low,
                          clip_ratio_high, rollout_is_weights=None, **global_batch_info):
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)  # for numerical stability
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = verl_agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode="seq-mean-token-mean",
                            **global_batch_info)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    return pg_loss, pg_clipfrac


# --- veRL at b8dc5377 (the truncated importance sampling PR), verl/trainer/ppo/core_algos.py#L893-L897
def verl_tis(old_log_prob, rollout_log_probs, tis_imp_ratio_cap):
    tis_imp_ratio = torch.exp(old_log_prob - rollout_log_probs)
    tis_imp_ratio = torch.clamp(tis_imp_ratio, max=tis_imp_ratio_cap)
    return tis_imp_ratio


# --- OpenRLHF, openrlhf/models/utils.py#L166-L169 (masked_mean) and openrlhf/models/loss.py#L11-L39
#     (aggregate_loss)
def openrlhf_masked_mean(tensor, mask, dim=None):
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def openrlhf_aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None,
                            global_batch_size=None):
    if token_level_loss:
        if batch_num_tokens is None:
            return openrlhf_masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    token_counts = loss_mask.sum(dim=-1)
    seq_loss = (loss * loss_mask).sum(dim=-1) / (token_counts + 1e-8)
    seq_mask = (token_counts > 0).float()  # exclude fully masked sequences
    if global_batch_size is None:
        return openrlhf_masked_mean(seq_loss, seq_mask, dim=None)
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


# --- OpenRLHF, openrlhf/models/loss.py#L166-L230 (PolicyLoss.forward; the "tis" correction only)
def openrlhf_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_eps_low, clip_eps_high,
                         dual_clip=None, policy_loss_type="ppo", token_level_loss=True,
                         rollout_log_probs=None, vllm_is_truncated_threshold=None,
                         batch_num_tokens=None, global_batch_size=None):
    if policy_loss_type == "gspo":
        token_level_loss = False
    enable_vllm_is_correction = rollout_log_probs is not None
    raw_policy_log_ratio = log_probs - old_log_probs
    if policy_loss_type == "ppo":
        policy_log_ratio = raw_policy_log_ratio.clamp(min=-20.0, max=20.0)
        ratio = policy_log_ratio.exp()
    elif policy_loss_type == "gspo":
        log_ratio = raw_policy_log_ratio
        ratio = (log_ratio * action_mask).sum(dim=-1) / action_mask.sum(dim=-1).clamp(min=1)
        ratio = ratio.exp().unsqueeze(-1) * action_mask
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * advantages
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, dual_clip * advantages)
        loss = -torch.where(advantages < 0, clip2, clip1)
    if enable_vllm_is_correction and policy_loss_type == "ppo":
        low_threshold, high_threshold = vllm_is_truncated_threshold
        rollout_log_ratio = old_log_probs - rollout_log_probs
        vllm_is = torch.exp(rollout_log_ratio).clamp(min=low_threshold, max=high_threshold).detach()
        loss = vllm_is * loss
    loss = openrlhf_aggregate_loss(loss, action_mask, token_level_loss=token_level_loss,
                                   batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    clip_ratio = openrlhf_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
    return loss, clip_ratio


# --- OpenRLHF, openrlhf/trainer/ppo_utils/experience_maker.py#L252-L272 (the group baselines)
def openrlhf_group_baseline(rewards, n_samples_per_prompt, estimator):
    rewards = rewards.reshape(-1, n_samples_per_prompt)
    if estimator == "rloo":
        baseline = (rewards.sum(-1, keepdim=True) - rewards) / (n_samples_per_prompt - 1)
        rewards = rewards - baseline
    elif estimator in ["reinforce_baseline", "dr_grpo"]:
        rewards = rewards - rewards.mean(-1, keepdim=True)
    elif estimator == "group_norm":
        rewards = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)
    return rewards.reshape(-1)


# --- OpenRLHF, openrlhf/trainer/ppo_utils/experience_maker.py#L380-L411 (get_cumulative_returns)
def openrlhf_cumulative_returns(rewards, action_mask, gamma):
    response_length = rewards.size(1)
    returns = torch.zeros_like(rewards)
    cumulative_return = torch.zeros(rewards.size(0), device=rewards.device)
    if action_mask is not None:
        rewards = action_mask * rewards
    for t in reversed(range(response_length)):
        cumulative_return = rewards[:, t] + gamma * cumulative_return
        returns[:, t] = cumulative_return
    return returns


# --- OpenRLHF, openrlhf/trainer/ppo_utils/length_penalty.py#L41-L55 (apply_overlong_penalty, one row)
def openrlhf_overlong_penalty(valid_response_length, max_new_tokens, overlong_buffer_len,
                              overlong_penalty_factor):
    expected_len = max_new_tokens - overlong_buffer_len
    exceed_len = min(valid_response_length - expected_len, overlong_buffer_len)
    if exceed_len > 0:
        return -exceed_len / overlong_buffer_len * overlong_penalty_factor
    return 0.0


# --- TRL, trl/trainer/utils.py#L857-L882 (nanstd) and trl/trainer/grpo_trainer.py#L2685-L2707
#     (group advantages, scale_rewards="group")
def trl_nanstd(tensor, dim=None, keepdim=False):
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction  # Bessel's correction
    std = torch.sqrt(variance)
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.squeeze()


def trl_group_advantages(rewards, num_generations):
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    advantages = advantages / (std_rewards + 1e-4)
    return advantages


# --- TRL, trl/trainer/grpo_trainer.py#L3054-L3136 (_compute_loss: sequence-level importance
#     sampling, loss_type "grpo" or "dr_grpo", the k3 KL term with beta)
def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask,
                  epsilon_low, epsilon_high, beta, importance_sampling_level, loss_type,
                  max_completion_length=None):
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
    advantages = advantages.unsqueeze(1)  # (B,) -> (B, 1), as in the trainer
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    return loss


# =========================================================================== random padded batches

def _random_mask(g, B, T, min_len=1):
    """Right-padded mask with lengths in [min_len, T] (a row of full length included)."""
    lengths = torch.randint(min_len, T + 1, (B,), generator=g)
    lengths[0] = T
    return (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)


def _with_junk(x, mask, junk=JUNK):
    """``x`` with ``junk`` at the masked positions."""
    return torch.where(mask.bool(), x, torch.full_like(x, junk))


def _batch(seed, B=8, T=6, spread=0.4):
    """Random log-probs (ratios often outside the clip range), advantages, rollout log-probs and a
    right-padded mask; padding filled with junk (moderate in the log-probs: their difference is
    exponentiated, and a leak of it would still show)."""
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(g, B, T)
    old = -torch.rand(B, T, generator=g) * 3
    new = old + torch.randn(B, T, generator=g) * spread
    rollout = old + torch.randn(B, T, generator=g) * spread
    adv = torch.randn(B, T, generator=g)
    new = _with_junk(new, mask, 7.0)
    old = _with_junk(old, mask, -5.0)
    rollout = _with_junk(rollout, mask, 3.0)
    adv = _with_junk(adv, mask)
    return new, old, rollout, adv, mask


def _grad(fn, x):
    """(value, d value / d x) of a scalar function."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x)
    return y.detach(), gx


# =========================================================================== group advantages

GROUP = [1.0, 0.0, 2.0, 1.0]  # mean 1; deviations 0, -1, 1, 0; unbiased var (0+1+1+0)/3 = 2/3
STD = math.sqrt(2.0 / 3.0)


def test_group_advantages_grpo_hand_example():
    # groups of 4, contiguous: [1, 0, 2, 1], [4, 4, 4, 4], [0, 0, 0, 1]
    scores = torch.tensor(GROUP + [4.0, 4.0, 4.0, 4.0] + [0.0, 0.0, 0.0, 1.0])
    out = group_advantages(scores, 4, "grpo")
    e = 1e-6
    g1 = [0.0, -1.0 / (STD + e), 1.0 / (STD + e), 0.0]
    g2 = [0.0] * 4  # all equal: std 0, s - mean = 0
    # [0, 0, 0, 1]: mean 1/4, unbiased var (3 * (1/4)^2 + (3/4)^2) / 3 = 1/4, std 1/2
    g3 = [-0.25 / (0.5 + e)] * 3 + [0.75 / (0.5 + e)]
    assert_close(out, torch.tensor(g1 + g2 + g3))
    # eps is added to the std, outside the square root
    out = group_advantages(torch.tensor(GROUP), 4, "grpo", eps=0.5)
    assert_close(out, torch.tensor([0.0, -1.0 / (STD + 0.5), 1.0 / (STD + 0.5), 0.0]))


def test_group_advantages_dr_grpo_and_reinforce_pp_baseline_hand_example():
    scores = torch.tensor(GROUP + [3.0, 1.0, 5.0, -1.0])  # second group: mean 2
    expected = torch.tensor([0.0, -1.0, 1.0, 0.0] + [1.0, -1.0, 3.0, -3.0])  # s - mean_g
    assert_close(group_advantages(scores, 4, "dr_grpo"), expected)
    assert_close(group_advantages(scores, 4, "reinforce_pp_baseline"), expected)


def test_group_advantages_rloo_hand_example():
    out = group_advantages(torch.tensor(GROUP), 4, "rloo")
    # s minus the mean of the 3 others: 1 - (0+2+1)/3, 0 - (1+2+1)/3, 2 - (1+0+1)/3, 1 - (1+0+2)/3
    expected = torch.tensor([1 - 3 / 3, 0 - 4 / 3, 2 - 2 / 3, 1 - 3 / 3])
    assert_close(out, expected)
    # = k / (k - 1) * (s - mean_g)
    assert_close(out, 4 / 3 * (torch.tensor(GROUP) - 1.0))


def test_group_advantages_groups_of_two():
    scores = torch.tensor([3.0, 1.0, -2.0, 0.0])
    # [3, 1]: mean 2, unbiased std sqrt((1 + 1) / 1) = sqrt 2;  [-2, 0]: mean -1, std sqrt 2
    r2 = math.sqrt(2.0)
    assert_close(group_advantages(scores, 2, "grpo"),
                 torch.tensor([1 / (r2 + 1e-6), -1 / (r2 + 1e-6), -1 / (r2 + 1e-6), 1 / (r2 + 1e-6)]))
    # RLOO with k = 2: s minus the other one
    assert_close(group_advantages(scores, 2, "rloo"), torch.tensor([2.0, -2.0, -2.0, 2.0]))


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_group_advantages_group_of_one_is_zero(estimator):
    out = group_advantages(torch.tensor([3.0, -1.0, 0.5]), 1, estimator)
    assert torch.equal(out, torch.zeros(3))


def test_group_advantages_integer_scores_and_errors():
    out = group_advantages(torch.tensor([1, 0, 2, 1]), 4, "dr_grpo")
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([0.0, -1.0, 1.0, 0.0]))
    with pytest.raises(ConfigError, match="ppo.advantage_estimator: expected one of 'gae', 'grpo', "
                       "'dr_grpo', 'rloo', 'reinforce_pp', 'reinforce_pp_baseline', got 'ppo'"):
        group_advantages(torch.tensor(GROUP), 4, "ppo")
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.tensor(GROUP), 3, "grpo")


def _scores_and_token_rewards(seed, groups=5, k=4, T=6):
    g = torch.Generator().manual_seed(seed)
    N = groups * k
    scores = torch.randn(N, generator=g)
    scores[k:2 * k] = 0.5  # a group with equal scores
    scores[2 * k:3 * k] = (torch.rand(k, generator=g) > 0.5).float()  # binary rewards
    mask = _random_mask(g, N, T)
    # the score on the last valid token, as veRL's token_level_rewards
    token_rewards = ops.shape_rewards(scores, torch.zeros(N, T), mask, kl_coef=0.0)
    index = np.repeat(np.arange(groups), k)
    return scores, token_rewards, mask, index


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_match_verl(seed):
    k = 4
    scores, token_rewards, mask, index = _scores_and_token_rewards(seed, k=k)
    adv = ops.broadcast_to_tokens(group_advantages(scores, k, "grpo"), mask)
    assert_close(adv, verl_grpo(token_rewards.clone(), mask, index)[0])
    adv = ops.broadcast_to_tokens(group_advantages(scores, k, "dr_grpo"), mask)
    assert_close(adv, verl_grpo(token_rewards.clone(), mask, index, norm_adv_by_std_in_grpo=False)[0])
    adv = ops.broadcast_to_tokens(group_advantages(scores, k, "rloo"), mask)
    assert_close(adv, verl_rloo(token_rewards.clone(), mask, index)[0])
    # REINFORCE++-baseline: s - mean_g on every token, then whitened over the batch's valid tokens
    # (the whitening is the trainer's step: ops.whiten with the unbiased variance)
    tok = ops.broadcast_to_tokens(group_advantages(scores, k, "reinforce_pp_baseline"), mask)
    mean = ops.masked_mean(tok, mask)
    var = ops.masked_sum((tok - mean) ** 2, mask) / (mask.sum() - 1)
    assert_close(ops.whiten(tok, mask, mean, var),
                 verl_reinforce_pp_baseline(token_rewards.clone(), mask, index)[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_match_openrlhf_and_trl(seed):
    k = 4
    scores = _scores_and_token_rewards(seed, k=k)[0]
    assert_close(group_advantages(scores, k, "rloo"), openrlhf_group_baseline(scores, k, "rloo"))
    assert_close(group_advantages(scores, k, "dr_grpo"),
                 openrlhf_group_baseline(scores, k, "dr_grpo"))
    assert_close(group_advantages(scores, k, "reinforce_pp_baseline"),
                 openrlhf_group_baseline(scores, k, "reinforce_baseline"))
    assert_close(group_advantages(scores, k, "grpo", eps=1e-9),
                 openrlhf_group_baseline(scores, k, "group_norm"))
    assert_close(group_advantages(scores, k, "grpo", eps=1e-4), trl_group_advantages(scores, k))


def test_group_advantages_group_of_one_conventions_of_the_peers():
    # documented differences for a group of 1: TRL gives 0 as here, veRL keeps s / (1 + eps)
    scores = torch.tensor([2.0, -1.0])
    mask = torch.ones(2, 1, dtype=torch.int64)
    index = np.arange(2)
    assert torch.equal(group_advantages(scores, 1, "grpo"), torch.zeros(2))
    assert_close(verl_grpo(scores[:, None].clone(), mask, index)[0][:, 0], scores / (1 + 1e-6))


# =========================================================================== returns, broadcast

def test_discounted_returns_hand_example():
    g = 0.9
    rewards = torch.tensor([[1.0, 2.0, 3.0],
                            [0.5, -1.0, JUNK],
                            [4.0, JUNK, -JUNK]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    out = ops.discounted_returns(rewards, mask, g)
    row0 = [1.0 + g * (2.0 + g * 3.0), 2.0 + g * 3.0, 3.0]  # G_t = r_t + g G_{t+1}, G_3 = 0
    row1 = [0.5 + g * -1.0, -1.0, 0.0]  # G = 0 after the last valid token; padding 0
    row2 = [4.0, 0.0, 0.0]
    assert_close(out, torch.tensor([row0, row1, row2]))
    # gamma 1: plain reward-to-go
    assert_close(ops.discounted_returns(rewards, mask, 1.0)[0], torch.tensor([6.0, 5.0, 3.0]))


def test_discounted_returns_skips_a_masked_token():
    g = 0.5
    out = ops.discounted_returns(torch.tensor([[1.0, JUNK, 2.0]]), torch.tensor([[1, 0, 1]]), g)
    assert_close(out, torch.tensor([[1.0 + g * 2.0, 0.0, 2.0]]))  # t+1 = the next valid token


@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_discounted_returns_match_openrlhf_and_verl(gamma):
    g = torch.Generator().manual_seed(3)
    mask = _random_mask(g, 8, 7)
    rewards = _with_junk(torch.randn(8, 7, generator=g), mask)
    out = ops.discounted_returns(rewards, mask, gamma)
    clean = rewards * mask  # the peers' rewards are 0 on padding
    assert_close(out, openrlhf_cumulative_returns(clean, mask, gamma) * mask)
    _, verl_returns = verl_reinforce_pp(clean, mask, gamma)
    assert_close(out, verl_returns * mask)


def test_reinforce_pp_advantages_match_verl():
    # REINFORCE++: KL-shaped rewards -> returns-to-go -> whitened over the batch's valid tokens
    g = torch.Generator().manual_seed(4)
    mask = _random_mask(g, 8, 7)
    kl = _with_junk(torch.randn(8, 7, generator=g) * 0.1, mask)
    rewards = ops.shape_rewards(torch.randn(8, generator=g), kl, mask, kl_coef=0.05)
    returns = ops.discounted_returns(rewards, mask, 1.0)
    mean = ops.masked_mean(returns, mask)
    var = ops.masked_sum((returns - mean) ** 2, mask) / (mask.sum() - 1)
    verl_adv, _ = verl_reinforce_pp(rewards, mask, 1.0)
    assert_close(ops.whiten(returns, mask, mean, var), verl_adv)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    out = ops.broadcast_to_tokens(torch.tensor([2.0, -3.0, 5.0]), mask)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 2.0], [-3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert ops.broadcast_to_tokens(torch.tensor([1.0], dtype=torch.float64), mask[:1]).dtype == torch.float64


# =========================================================================== loss aggregation

def test_aggregate_loss_new_modes_hand_example():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [10.0, JUNK, -JUNK]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    agg = ops.aggregate_loss
    # seq-mean-token-mean = seq-mean: ((1 + 2 + 3) / 3 + 10 / 1) / 2
    assert_close(agg(per_token, mask, "seq-mean-token-mean"), torch.tensor((2.0 + 10.0) / 2))
    assert torch.equal(agg(per_token, mask, "seq-mean-token-mean"), agg(per_token, mask, "seq-mean"))
    # seq-mean-token-sum: ((1 + 2 + 3) + 10) / 2 sequences
    assert_close(agg(per_token, mask, "seq-mean-token-sum"), torch.tensor(16.0 / 2))
    # seq-mean-token-sum-norm: 16 / (B * T) = 16 / (2 * 3) without a normalizer ...
    assert_close(agg(per_token, mask, "seq-mean-token-sum-norm"), torch.tensor(16.0 / 6))
    # ... and 16 / (B * L) with L = 5 the largest response length allowed
    assert_close(agg(per_token, mask, "seq-mean-token-sum-norm", normalizer=2 * 5),
                 torch.tensor(16.0 / 10))
    # the normalizer replaces the denominator in every mode
    assert_close(agg(per_token, mask, "seq-mean-token-mean", normalizer=4), torch.tensor(12.0 / 4))
    assert_close(agg(per_token, mask, "seq-mean-token-sum", normalizer=4), torch.tensor(16.0 / 4))


def test_aggregate_loss_error_names_every_mode():
    with pytest.raises(ValueError, match="'seq-mean-token-sum-norm'.*got 'token-sum'"):
        ops.aggregate_loss(torch.ones(1, 2), torch.ones(1, 2), "token-sum")


@pytest.mark.parametrize("seed", [0, 1])
def test_aggregate_loss_matches_verl_and_openrlhf(seed):
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(g, 8, 6)  # no empty row: the peers' count of sequences is B here
    loss_mat = _with_junk(torch.randn(8, 6, generator=g), mask)
    m = mask.float()  # the peers multiply by the mask: junk would leak into theirs, not ours
    clean = loss_mat * m
    agg = ops.aggregate_loss
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert_close(agg(loss_mat, mask, mode), verl_agg_loss(clean, m, mode))
        # the whole minibatch's counts
        assert_close(agg(loss_mat, mask, mode, normalizer=40 if mode == "token-mean" else 16),
                     verl_agg_loss(clean, m, mode, batch_num_tokens=40, global_batch_size=16))
    # Dr. GRPO: veRL divides by its loss_scale_factor (default T), here by B * L
    assert_close(agg(loss_mat, mask, "seq-mean-token-sum-norm"),
                 verl_agg_loss(clean, m, "seq-mean-token-sum-norm", loss_scale_factor=8 * 6))
    assert_close(agg(loss_mat, mask, "seq-mean-token-sum-norm", normalizer=8 * 10),
                 verl_agg_loss(clean, m, "seq-mean-token-sum-norm", loss_scale_factor=8 * 10))
    assert_close(agg(loss_mat, mask, "seq-mean-token-sum-norm") * 8,
                 verl_agg_loss(clean, m, "seq-mean-token-sum-norm"))
    # OpenRLHF's two modes
    assert_close(agg(loss_mat, mask, "token-mean"), openrlhf_aggregate_loss(clean, m))
    assert_close(agg(loss_mat, mask, "seq-mean"), openrlhf_aggregate_loss(clean, m, token_level_loss=False))
    assert_close(agg(loss_mat, mask, "seq-mean", normalizer=16),
                 openrlhf_aggregate_loss(clean, m, token_level_loss=False, global_batch_size=16))


# --- the behaviour before issue 18 (rlhf_ppo/ops.py at 722e247), frozen here: with the new
#     arguments at their defaults, aggregate_loss and policy_loss must give the same bits.
def _aggregate_loss_before(per_token, mask, aggregation="token-mean", normalizer=None):
    mask = mask.to(per_token.dtype)
    if aggregation == "token-mean":
        total = (per_token * mask).sum()
        denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    elif aggregation == "seq-mean":
        total = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        denom = per_token.shape[0] if normalizer is None else normalizer
    return total / denom


def _policy_loss_before(logprobs, old_logprobs, advantages, mask, clip_range, aggregation="token-mean",
                        normalizer=None):
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    loss = _aggregate_loss_before(per_token, mask, aggregation, normalizer)
    with torch.no_grad():
        stats = {
            "clipfrac": ops.masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": ops.masked_mean((ratio - 1) - log_ratio, mask),
            "ratio": ops.masked_mean(ratio, mask),
        }
    return loss, stats


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
@pytest.mark.parametrize("normalizer", [None, 13])
def test_policy_loss_defaults_bit_for_bit_as_before(aggregation, normalizer):
    new, old, _, adv, mask = _batch(5)
    lp_a = new.clone().requires_grad_(True)
    lp_b = new.clone().requires_grad_(True)
    loss_a, stats_a = ops.policy_loss(lp_a, old, adv, mask, 0.2, aggregation, normalizer)
    loss_b, stats_b = _policy_loss_before(lp_b, old, adv, mask, 0.2, aggregation, normalizer)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(lp_a.grad, lp_b.grad)
    for key in ("clipfrac", "approx_kl", "ratio"):
        assert torch.equal(stats_a[key], stats_b[key])
    assert torch.equal(stats_a["dual_clipfrac"], torch.tensor(0.0))
    # the defaults spelled out are the same
    loss_c, _ = ops.policy_loss(new, old, adv, mask, 0.2, aggregation, normalizer, clip_range_high=None,
                                dual_clip=None, ratio_level="token", is_weights=None)
    assert torch.equal(loss_c, loss_b.detach())
    per_token = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ops.aggregate_loss(per_token, mask, aggregation, normalizer),
                       _aggregate_loss_before(per_token, mask, aggregation, normalizer))


def _micro_batches(x, rows, width=None):
    """The rows ``rows`` of ``x``, trimmed to ``width`` columns (a micro-batch padded only to its
    own longest response)."""
    return x[rows] if width is None else x[rows, :width]


def _normalizer(mode, mask, max_len):
    if mode == "token-mean":
        return mask.sum()
    if mode == "seq-mean-token-sum-norm":
        return mask.shape[0] * max_len
    return mask.shape[0]


VARIANTS = [
    {},
    dict(clip_range_high=0.28, dual_clip=3.0),
    dict(ratio_level="sequence", clip_range_high=0.28),
    dict(dual_clip=2.0, is_weights=True),
]


@pytest.mark.parametrize("mode", ops.AGGREGATIONS)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_policy_and_kl_loss_micro_batches_match_full_minibatch(mode, variant):
    new, old, rollout, adv, mask = _batch(7, B=6, T=5, spread=0.6)
    kwargs = dict(VARIANTS[variant])
    if kwargs.pop("is_weights", False):
        kwargs["is_weights"], _ = ops.truncated_is_weights(old, rollout, mask, 1.5)
    max_len = 7  # the largest response length allowed (> T: only the seq-mean-token-sum-norm mode cares)
    ref = old + 0.3  # some reference log-probs for the KL term
    normalizer = _normalizer(mode, mask, max_len)

    def loss_fn(lp, rows, width, norm):
        sl = lambda x: _micro_batches(x, rows, width)
        kw = dict(kwargs)
        if "is_weights" in kw:
            kw["is_weights"] = sl(kw["is_weights"])
        pg, _ = ops.policy_loss(lp, sl(old), sl(adv), sl(mask), 0.2, mode, norm, **kw)
        return pg + 0.1 * ops.kl_loss(lp, sl(ref), sl(mask), "k3", mode, norm)

    full_lp = new.clone().requires_grad_(True)
    full = loss_fn(full_lp, slice(None), None, normalizer)
    full.backward()

    micro_lp = new.clone().requires_grad_(True)
    total = torch.zeros(())
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        width = int(mask[rows].sum(-1).max())  # trimmed to the micro-batch's longest row
        part = loss_fn(micro_lp[rows, :width], rows, width, normalizer)
        part.backward()  # gradient accumulation
        total = total + part.detach()
    assert_close(total, full.detach())
    assert_close(micro_lp.grad, full_lp.grad)


@pytest.mark.parametrize("mode", ops.AGGREGATIONS)
def test_aggregate_loss_micro_batches_match_full_minibatch(mode):
    g = torch.Generator().manual_seed(8)
    mask = _random_mask(g, 6, 5)
    per_token = _with_junk(torch.randn(6, 5, generator=g), mask)
    normalizer = _normalizer(mode, mask, 9)
    full, full_grad = _grad(lambda x: ops.aggregate_loss(x ** 2, mask, mode, normalizer), per_token)
    x = per_token.clone().requires_grad_(True)
    total = sum(ops.aggregate_loss(x[rows] ** 2, mask[rows], mode, normalizer)
                for rows in (slice(0, 1), slice(1, 4), slice(4, 6)))
    total.backward()
    assert_close(total.detach(), full)
    assert_close(x.grad, full_grad)
    # without the minibatch's normalizer the micro-batch losses do not add up
    naive = sum(ops.aggregate_loss(per_token[rows] ** 2, mask[rows], mode)
                for rows in (slice(0, 1), slice(1, 4), slice(4, 6)))
    assert not torch.allclose(naive, full)


# =========================================================================== policy loss variants

EPS = 0.2


def _token_example():
    # ratios per token (row 1 has one padding position); advantages; the log-probs from them
    ratios = torch.tensor([[1.5, 0.5, 4.0, 1.1], [4.0, 1.5, 0.5, 1.0]])
    adv = torch.tensor([[1.0, -2.0, -2.0, 1.0], [1.0, -2.0, 1.0, JUNK]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.2], [-1.5, -0.3, -0.7, -2.0]])
    new = (old + ratios.log()).clone().requires_grad_(True)
    return new, old, adv, mask


# Per token, loss = max(-A r, -A clip(r, 1 - 0.2, 1 + eps_high)); dual clip c = 3: min(loss, -3 A)
# where A < 0. With eps_high = 0.2 / 0.28:
#   r=1.5, A=+1:  max(-1.5, -1.2 / -1.28)      = -1.2 / -1.28  clipped (upper)
#   r=0.5, A=-2:  max( 1.0,  1.6)              =  1.6          clipped (lower; same for both)
#   r=4.0, A=-2:  max( 8.0,  2.4 / 2.56)       =  8.0          dual clip: min(8.0, 6.0) = 6.0
#   r=1.1, A=+1:  max(-1.1, -1.1)              = -1.1          inside the range
#   r=4.0, A=+1:  max(-4.0, -1.2 / -1.28)      = -1.2 / -1.28  clipped; positive A: no dual clip
#   r=1.5, A=-2:  max( 3.0,  2.4 / 2.56)       =  3.0          below the dual bound 6
#   r=0.5, A=+1:  max(-0.5, -0.8)              = -0.5          unclipped
def test_policy_loss_clip_higher_hand_example():
    new, old, adv, mask = _token_example()
    loss, stats = ops.policy_loss(new, old, adv, mask, EPS, clip_range_high=0.28)
    per_token = [-1.28, 1.6, 8.0, -1.1, -1.28, 3.0, -0.5]
    assert_close(loss, torch.tensor(sum(per_token) / 7))
    assert_close(stats["clipfrac"], torch.tensor(3 / 7))
    assert_close(stats["dual_clipfrac"], torch.tensor(0.0))
    # without clip_range_high: symmetric
    loss, _ = ops.policy_loss(new, old, adv, mask, EPS)
    assert_close(loss, torch.tensor((-1.2 + 1.6 + 8.0 - 1.1 - 1.2 + 3.0 - 0.5) / 7))


def test_policy_loss_dual_clip_hand_example():
    new, old, adv, mask = _token_example()
    loss, stats = ops.policy_loss(new, old, adv, mask, EPS, dual_clip=3.0)
    per_token = [-1.2, 1.6, 6.0, -1.1, -1.2, 3.0, -0.5]
    assert_close(loss, torch.tensor(sum(per_token) / 7))
    assert_close(stats["dual_clipfrac"], torch.tensor(1 / 7))
    assert_close(stats["clipfrac"], torch.tensor(3 / 7))  # the PPO clip, as before the dual bound
    loss.backward()
    # gradient -A r / 7 where the unclipped term is taken; 0 where a clipped term or the dual bound
    # (a constant) is taken; 0 on padding
    expected = torch.tensor([[0.0, 0.0, 0.0, -1.1 / 7], [0.0, 2.0 * 1.5 / 7, -0.5 / 7, 0.0]])
    assert_close(new.grad, expected)


def test_policy_loss_is_weights_hand_example():
    new, old, adv, mask = _token_example()
    w = torch.tensor([[0.5, 2.0, 1.0, 1.0], [1.0, 1.0, 0.25, JUNK]])
    loss, _ = ops.policy_loss(new, old, adv, mask, EPS, is_weights=w)
    per_token = [-1.2 * 0.5, 1.6 * 2.0, 8.0, -1.1, -1.2, 3.0, -0.5 * 0.25]
    assert_close(loss, torch.tensor(sum(per_token) / 7))
    # the weights get no gradient
    w = w.clone().requires_grad_(True)
    loss, _ = ops.policy_loss(new, old, adv, mask, EPS, is_weights=w)
    loss.backward()
    assert w.grad is None


def test_policy_loss_sequence_ratio_hand_example():
    # row 0: token log-ratios 0.05, 0.15 -> mean 0.1, s_0 = e^0.1 (inside [0.8, 1.2]);
    # row 1: 0.3, 0.1, padding -> mean 0.2, s_1 = e^0.2 = 1.2214 (above 1.2)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -5.0]])
    new = (old + torch.tensor([[0.05, 0.15, 0.0], [0.3, 0.1, 7.0]])).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([[1.0, -2.0, JUNK], [1.0, -1.0, JUNK]])
    loss, stats = ops.policy_loss(new, old, adv, mask, EPS, ratio_level="sequence")
    s0, s1 = math.exp(0.1), math.exp(0.2)
    # row 0: -A s_0 (unclipped); row 1: A=+1 takes the clipped -1.2, A=-1 the unclipped s_1
    per_token = [-1.0 * s0, 2.0 * s0, -1.2, 1.0 * s1]
    assert_close(loss, torch.tensor(sum(per_token) / 4))
    assert_close(stats["ratio"], torch.tensor((2 * s0 + 2 * s1) / 4))
    assert_close(stats["clipfrac"], torch.tensor(1 / 4))
    # approx_kl stays the token-level k3 estimate
    lr = [0.05, 0.15, 0.3, 0.1]
    assert_close(stats["approx_kl"], torch.tensor(sum(math.exp(x) - 1 - x for x in lr) / 4))
    loss.backward()
    # GSPO-token: d s_i,t / d logp_t = s_i; gradient -A_t s_i / 4 where unclipped, else 0
    expected = torch.tensor([[-1.0 * s0 / 4, 2.0 * s0 / 4, 0.0], [0.0, 1.0 * s1 / 4, 0.0]])
    assert_close(new.grad, expected)


def test_policy_loss_sequence_ratio_ignores_padding():
    # a row alone equals the same row padded with junk in a batch with a longer row
    old = torch.tensor([[-1.0, -2.0]])
    new = old + torch.tensor([[0.3, -0.1]])
    adv = torch.tensor([[1.0, 0.5]])
    alone, _ = ops.policy_loss(new, old, adv, torch.ones(1, 2), EPS, "seq-mean", ratio_level="sequence")
    pad_old = torch.tensor([[-1.0, -2.0, 5.0, -5.0], [-0.2, -0.3, -0.4, -0.5]])
    pad_new = torch.tensor([[-0.7, -2.1, 7.0, 9.0], [-0.25, -0.3, -0.4, -0.5]])
    pad_adv = torch.tensor([[1.0, 0.5, JUNK, -JUNK], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    padded, _ = ops.policy_loss(pad_new, pad_old, pad_adv, mask, EPS, "seq-mean", normalizer=1,
                                ratio_level="sequence")
    assert_close(padded, alone)  # row 1 has zero advantages: it adds 0


def test_policy_loss_argument_errors():
    new, old, adv, mask = _token_example()
    with pytest.raises(ValueError, match="ratio_level"):
        ops.policy_loss(new, old, adv, mask, EPS, ratio_level="seq")
    with pytest.raises(ValueError, match="dual_clip"):
        ops.policy_loss(new, old, adv, mask, EPS, dual_clip=1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_policy_loss_dual_clip_and_is_weights_match_verl(seed, mode):
    new, old, rollout, adv, mask = _batch(seed, spread=0.8)
    w, _ = ops.truncated_is_weights(old, rollout, mask, 2.0)
    m = mask.float()
    c_old, c_adv = old * m, adv * m  # the peer's inputs have no junk

    def ours(lp):
        return ops.policy_loss(lp, old, adv, mask, 0.2, mode, clip_range_high=0.28, dual_clip=3.0,
                               is_weights=w)[0]

    def theirs(lp):
        return verl_policy_loss_vanilla(c_old, lp * m, c_adv, m, mode, 0.2, 0.2, 0.28, 3.0,
                                        rollout_is_weights=verl_tis(c_old, rollout * m, 2.0),
                                        loss_scale_factor=mask.shape[0] * mask.shape[1])[0]

    loss, grad = _grad(ours, new)
    ref_loss, ref_grad = _grad(theirs, new)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)
    _, stats = ops.policy_loss(new, old, adv, mask, 0.2, mode, clip_range_high=0.28, dual_clip=3.0)
    _, clipfrac, _, clipfrac_lower = verl_policy_loss_vanilla(c_old, new * m, c_adv, m, mode, 0.2, 0.2,
                                                              0.28, 3.0)
    assert_close(stats["clipfrac"], clipfrac)
    assert_close(stats["dual_clipfrac"], clipfrac_lower)
    assert stats["dual_clipfrac"] > 0 and stats["clipfrac"] > 0  # the example exercises both


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean"])
def test_policy_loss_dual_clip_and_tis_match_openrlhf(seed, mode):
    new, old, rollout, adv, mask = _batch(seed, spread=0.8)
    w, _ = ops.truncated_is_weights(old, rollout, mask, 2.0)
    m = mask.float()

    def ours(lp):
        return ops.policy_loss(lp, old, adv, mask, 0.2, mode, clip_range_high=0.3, dual_clip=2.5,
                               is_weights=w)[0]

    def theirs(lp):  # TIS with a lower threshold of 0: the cap only
        return openrlhf_policy_loss(lp * m, old * m, adv * m, m, 0.2, 0.3, dual_clip=2.5,
                                    token_level_loss=mode == "token-mean", rollout_log_probs=rollout * m,
                                    vllm_is_truncated_threshold=[0.0, 2.0])[0]

    loss, grad = _grad(ours, new)
    ref_loss, ref_grad = _grad(theirs, new)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_sequence_ratio_matches_verl_gspo(seed):
    new, old, rollout, adv, mask = _batch(seed, spread=0.3)
    w, _ = ops.truncated_is_weights(old, rollout, mask, 1.5)
    m = mask.float()

    def ours(lp):
        return ops.policy_loss(lp, old, adv, mask, 0.2, "seq-mean-token-mean", clip_range_high=0.25,
                               ratio_level="sequence", is_weights=w)[0]

    def theirs(lp):
        return verl_policy_loss_gspo(old * m, lp * m, adv * m, m, 0.2, 0.25,
                                     rollout_is_weights=verl_tis(old * m, rollout * m, 1.5))[0]

    loss, grad = _grad(ours, new)
    ref_loss, ref_grad = _grad(theirs, new)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)
    _, stats = ops.policy_loss(new, old, adv, mask, 0.2, clip_range_high=0.25, ratio_level="sequence")
    assert_close(stats["clipfrac"], verl_policy_loss_gspo(old * m, new * m, adv * m, m, 0.2, 0.25)[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_sequence_ratio_matches_openrlhf_and_trl_gspo(seed):
    # OpenRLHF and TRL differentiate s_i = exp(mean log-ratio) itself (no stop-gradient form);
    # with seq-mean-token-mean and one advantage per sequence, GSPO-token has the same gradient
    new, old, _, _, mask = _batch(seed, spread=0.3)
    g = torch.Generator().manual_seed(seed + 10)
    seq_adv = torch.randn(mask.shape[0], generator=g)
    adv = ops.broadcast_to_tokens(seq_adv, mask)
    m = mask.float()

    def ours(lp):
        return ops.policy_loss(lp, old, adv, mask, 0.2, "seq-mean-token-mean", clip_range_high=0.25,
                               ratio_level="sequence")[0]

    def openrlhf(lp):
        return openrlhf_policy_loss(lp * m, old * m, adv, m, 0.2, 0.25, policy_loss_type="gspo")[0]

    def trl(lp):
        return trl_grpo_loss(lp * m, old * m, None, seq_adv, m, 0.2, 0.25, 0.0, "sequence", "grpo")

    loss, grad = _grad(ours, new)
    for peer in (openrlhf, trl):
        ref_loss, ref_grad = _grad(peer, new)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


def test_policy_loss_with_kl_loss_matches_trl_grpo_and_dr_grpo():
    # TRL adds beta * k3 to each token's loss before aggregating: the same as policy_loss + beta *
    # kl_loss with one aggregation (token-level ratio, one advantage per sequence)
    new, old, _, _, mask = _batch(11, spread=0.3)
    g = torch.Generator().manual_seed(12)
    seq_adv = torch.randn(mask.shape[0], generator=g)
    ref = _with_junk(old + 0.2 * torch.randn(old.shape, generator=g), mask, 2.0)
    adv = ops.broadcast_to_tokens(seq_adv, mask)
    m = mask.float()
    beta, L = 0.04, 9
    for mode, loss_type, norm in (("seq-mean-token-mean", "grpo", None),
                                  ("seq-mean-token-sum-norm", "dr_grpo", mask.shape[0] * L)):
        def ours(lp, mode=mode, norm=norm):
            pg, _ = ops.policy_loss(lp, old, adv, mask, 0.2, mode, norm, clip_range_high=0.28)
            return pg + beta * ops.kl_loss(lp, ref, mask, "k3", mode, norm)

        def trl(lp, loss_type=loss_type):
            return trl_grpo_loss(lp * m, old * m, ref * m, seq_adv, m, 0.2, 0.28, beta, "token", loss_type,
                                 max_completion_length=L)

        loss, grad = _grad(ours, new)
        ref_loss, ref_grad = _grad(trl, new)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


# =========================================================================== KL loss

def test_kl_loss_hand_example_and_gradients():
    # valid log-ratios (logprobs - ref): 0.5, -1.0, 0.2; padding holds junk that would overflow exp
    ref = torch.tensor([[-1.5, -1.0], [-0.7, JUNK]])
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -JUNK]])
    mask = torch.tensor([[1, 1], [1, 0]])
    lr = [0.5, -1.0, 0.2]
    k3 = [math.exp(-x) - 1 + x for x in lr]
    value, grad = _grad(lambda lp: ops.kl_loss(lp, ref, mask), logprobs)  # defaults: k3, token-mean
    assert_close(value, torch.tensor(sum(k3) / 3))
    # d k3 / d logp = 1 - exp(-log_ratio) = 1 - pi_ref / pi
    assert_close(grad, torch.tensor([[(1 - math.exp(-0.5)) / 3, (1 - math.exp(1.0)) / 3],
                                     [(1 - math.exp(-0.2)) / 3, 0.0]]))
    # k2: value log_ratio^2 / 2, gradient log_ratio
    value, grad = _grad(lambda lp: ops.kl_loss(lp, ref, mask, "k2"), logprobs)
    assert_close(value, torch.tensor(sum(x * x / 2 for x in lr) / 3))
    assert_close(grad, torch.tensor([[0.5 / 3, -1.0 / 3], [0.2 / 3, 0.0]]))
    # k1: value the log-ratio, gradient 1 per token
    value, grad = _grad(lambda lp: ops.kl_loss(lp, ref, mask, "k1"), logprobs)
    assert_close(value, torch.tensor(sum(lr) / 3))
    assert_close(grad, torch.tensor([[1 / 3, 1 / 3], [1 / 3, 0.0]]))
    # seq-mean: ((k3_0 + k3_1) / 2 + k3_2) / 2
    assert_close(ops.kl_loss(logprobs, ref, mask, aggregation="seq-mean"),
                 torch.tensor(((k3[0] + k3[1]) / 2 + k3[2]) / 2))


# =========================================================================== truncated IS weights

def test_truncated_is_weights_hand_example():
    # valid gaps old - rollout: log 0.5, log 3, 0, log 1.5  (cap 2)
    rollout = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 4.0, -4.0]])
    old = rollout + torch.tensor([[math.log(0.5), math.log(3.0), 0.0],
                                  [math.log(1.5), JUNK, -JUNK]])
    old.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w, stats = ops.truncated_is_weights(old, rollout, mask, 2.0)
    assert_close(w, torch.tensor([[0.5, 2.0, 1.0], [1.5, 0.0, 0.0]]))
    assert not w.requires_grad
    assert_close(stats["is_weight_mean"], torch.tensor((0.5 + 2.0 + 1.0 + 1.5) / 4))
    assert_close(stats["is_clipfrac"], torch.tensor(1 / 4))
    gap = (math.log(2.0) + math.log(3.0) + 0.0 + math.log(1.5)) / 4  # mean |old - rollout|
    assert_close(stats["logprob_gap"], torch.tensor(gap))
    with pytest.raises(ValueError, match="cap"):
        ops.truncated_is_weights(old, rollout, mask, 0.0)


def test_truncated_is_weights_match_verl():
    _, old, rollout, _, mask = _batch(13, spread=0.8)
    w, _ = ops.truncated_is_weights(old, rollout, mask, 2.0)
    assert_close(w, verl_tis(old, rollout, 2.0) * mask)
    assert (w <= 2.0).all() and (w[mask == 0] == 0).all()


# =========================================================================== overlong penalty

def test_overlong_penalty_hand_example():
    # max 20, buffer 5: free up to 15, then -(len - 15) / 5 * p, -p from 20 on
    p = 0.5
    lengths = torch.tensor([10, 15, 16, 18, 20, 25])
    out = ops.overlong_penalty(lengths, 20, 5, p)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([0.0, 0.0, -1 / 5 * p, -3 / 5 * p, -p, -p]))
    assert_close(ops.overlong_penalty(lengths, 20, 5), torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0]))
    # buffer = max_length: the penalty starts at length 0
    assert_close(ops.overlong_penalty(torch.tensor([0, 5, 10]), 10, 10), torch.tensor([0.0, -0.5, -1.0]))
    for bad in (0, 21):
        with pytest.raises(ValueError, match="buffer"):
            ops.overlong_penalty(lengths, 20, bad)


def test_overlong_penalty_matches_openrlhf():
    lengths = torch.arange(0, 40)
    out = ops.overlong_penalty(lengths, 32, 12, 0.7)
    expected = torch.tensor([openrlhf_overlong_penalty(int(n), 32, 12, 0.7) for n in lengths])
    assert_close(out, expected)


# =========================================================================== pass@k

def test_pass_at_k_hand_examples():
    assert_close(ops.pass_at_k(5, 1, 1), 1 / 5)  # pass@1 = c / n
    assert_close(ops.pass_at_k(4, 2, 2), 1 - math.comb(2, 2) / math.comb(4, 2))  # 1 - 1/6
    assert ops.pass_at_k(4, 3, 2) == 1.0  # n - c = 1 < k: every pair holds a correct one
    assert ops.pass_at_k(4, 0, 3) == 0.0
    for bad in ((4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)):
        with pytest.raises(ValueError, match="pass_at_k"):
            ops.pass_at_k(*bad)


def test_pass_at_k_matches_the_combinatorial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                direct = 1.0 - math.comb(n - c, k) / math.comb(n, k)  # comb(m, k) = 0 for m < k
                assert math.isclose(ops.pass_at_k(n, c, k), direct, rel_tol=1e-12, abs_tol=1e-12), (n, c, k)
