"""The PPO math as pure functions on tensors: no models, no I/O, no accelerate.

Shape legend: ``B`` batch (sequences), ``T`` response length (tokens after the prompt),
``V`` vocabulary, ``H`` hidden size. Every ``mask`` is the action mask: 1 (or True) on the tokens
the policy sampled and is trained on (a single-turn response: up to and including the stop
token), 0 elsewhere: the padding after the response and, in a multi-turn rollout, the
environment's tokens between the model's turns (holes). That is the only mask convention in this
package. Nothing here assumes the 1s of a row are contiguous: every recursion skips masked
positions (``t+1`` is the next *trained* token) and every reduction ignores them. Masked
positions of every returned per-token tensor are 0.

References (code links pinned to the commit and lines that were read)
- PPO: Schulman et al. 2017, https://arxiv.org/abs/1707.06347 (eq. 7 clipped surrogate).
- GAE: Schulman et al. 2015, https://arxiv.org/abs/1506.02438 (eq. 16).
- KL-shaped reward, adaptive KL: Ziegler et al. 2019, https://arxiv.org/abs/1909.08593 (sec. 2.2),
  following openai/lm-human-preferences (each function below links the lines it follows).
- KL estimators k1/k2/k3: J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
- Decoupled GAE (critic lambda 1, policy lambda < 1) and value pretraining: Yuan et al. 2025,
  VC-PPO, https://arxiv.org/abs/2503.01491; length-adaptive lambda: Yue et al. 2025, VAPO,
  https://arxiv.org/abs/2504.05118.
- Critic-free group baselines: GRPO (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300),
  Dr. GRPO (Liu et al. 2025, https://arxiv.org/abs/2503.20783), RLOO (Ahmadian et al. 2024,
  https://arxiv.org/abs/2402.14740), REINFORCE++ (Hu 2025, https://arxiv.org/abs/2501.03262).
- Dual-clip PPO: Ye et al. 2020, https://arxiv.org/abs/1912.09729; clip-higher and the soft overlong
  punishment: Yu et al. 2025, DAPO, https://arxiv.org/abs/2503.14476; GSPO (sequence-level ratio):
  Zheng et al. 2025, https://arxiv.org/abs/2507.18071.
- Truncated importance sampling of the rollout/trainer mismatch: Yao et al. 2025, "Your Efficient RL
  Framework Secretly Brings You Off-Policy RL Training", https://fengyao.notion.site/off-policy-rl.
- pass@k: Chen et al. 2021, https://arxiv.org/abs/2107.03374 (sec. 2.1).
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is 1, over ``dim`` (all dims if None)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    Args:
        x: ``[B, T]`` (any shape equal to ``mask``'s).
        mask: same shape, 1 on valid positions.
        dim: reduce only this dim; None reduces all.
    A row (or batch) with no valid position gives 0, not NaN.
    """
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: float | torch.Tensor,
           var: float | torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance with the given statistics of its valid
    positions (reduced over every process by the caller, so the result does not depend on how the
    batch is split), as lm-human-preferences and TRL whiten advantages
    (https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/lm_human_preferences/utils/core.py#L336-L341,
    with the batch's own biased variance; TRL's ``masked_whiten`` with the unbiased one, as here:
    https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/trl/experimental/ppo/ppo_trainer.py#L237-L270).
    ``shift_mean=False`` adds the mean back (only rescales: what one wants for rewards).

    Args:
        x, mask: ``[B, T]``.  mean, var: scalars.
    Returns:
        ``(x - mean) / sqrt(var + eps)`` (plus ``mean`` when ``shift_mean=False``), 0 where masked.
    """
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def log_softmax_with_temperature(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)`` in float32: ``[..., V]`` -> ``[..., V]``.

    The one definition of the sampling distribution's log-probs: the sampling loop draws from it
    and the training forward scores tokens with it, so log-probs recorded while sampling equal
    recomputed ones (``ppo.forward.old_logprobs: generation`` relies on that).
    """
    logits = logits.float()
    if temperature != 1.0:  # x / 1.0 == x exactly: skip a pass over [..., V]
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def token_logprobs_and_entropy(logp: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = True,
                               probs: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each token and the entropy of each distribution, from log-probs ``logp``
    ``[..., V]`` (:func:`log_softmax_with_temperature`) and ``tokens`` ``[...]``.
    ``probs``: ``logp.exp()`` if the caller has it already (the sampling loop draws from it).

    Returns ``(logprobs, entropy)``, each ``[...]``; entropy ``-sum_v p_v log p_v`` (zeros when
    ``with_entropy`` is false).
    """
    token_logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return token_logp, torch.zeros_like(token_logp)
    if probs is not None:
        return token_logp, -(probs * logp).sum(-1)
    if torch.is_grad_enabled() and logp.requires_grad:  # autograd keeps exp's output
        return token_logp, -(logp.exp() * logp).sum(-1)
    return token_logp, -logp.exp().mul_(logp).sum(-1)  # same values, one [..., V] buffer fewer


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               estimator: Literal["k1", "k2", "k3"] = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of tokens sampled from pi.

    With ``log_ratio = logprobs - ref_logprobs`` (log pi(a|s) - log pi_ref(a|s)):
    - ``k1 = log_ratio`` (unbiased, can be negative per token),
    - ``k2 = log_ratio**2 / 2`` (biased, low variance, >= 0),
    - ``k3 = exp(-log_ratio) - 1 + log_ratio`` (unbiased, >= 0).

    Args:
        logprobs, ref_logprobs: ``[B, T]``.
    Returns:
        ``[B, T]`` (not masked: multiply by the mask before summing).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator: expected 'k1', 'k2' or 'k3', got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid (action) token of each row, holes or not: ``[B, T]`` -> ``[B]``
    (0 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.long()).argmax(-1)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl_t`` on every response token, plus ``extra`` (a
    multi-turn rollout's turn rewards, each on the last model token of its turn), plus the
    sequence score on its last valid token.

    The last valid token is the stop token itself when the response has one (it is part of the
    response and its log-prob is trained), else the last generated token. Putting the score one
    token early or on the first padding token is a known off-by-one in other trainers: TRL's
    last PPO trainer adds it one position after the last kept token
    (https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/trl/experimental/ppo/ppo_trainer.py#L764-L779);
    OpenRLHF puts it on the last valid token as here
    (https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/openrlhf/models/utils.py#L98-L126),
    lm-human-preferences on the last column of fixed-length responses
    (https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/lm_human_preferences/train_policy.py#L149-L154).

    Args:
        scores: ``[B]`` sequence scores.  kl: ``[B, T]`` per-token KL.  mask: ``[B, T]``.
        extra: ``[B, T]`` rewards to add, 0 wherever ``mask`` is 0, or None.
    Returns:
        ``[B, T]`` rewards, 0 at masked positions.
    Raises:
        ValueError: ``extra`` is non-zero on a masked position (the recursions skip those: the
            reward would never be credited to any token).
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    if extra is not None:
        check_on_mask(extra, mask, "turn_rewards")
        rewards = rewards + extra.to(rewards.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def check_on_mask(x: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    """ValueError naming ``name``, the first offending row and column, unless ``x`` ``[B, T]``
    (the shape of ``mask``) is 0 wherever ``mask`` is 0."""
    if x.shape != mask.shape:
        raise ValueError(f"{name}: expected shape {tuple(mask.shape)} (the response mask's), "
                         f"got {tuple(x.shape)}")
    off = (x != 0) & ~mask.bool()
    if off.any():
        b, t = (int(i) for i in off.nonzero()[0])
        raise ValueError(f"{name}: row {b}, response column {t} holds {float(x[b, t])!r} on a "
                         f"token the policy did not sample (action mask 0), where no advantage "
                         f"would ever credit it; place each turn's reward on the last model "
                         f"token of its turn")


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int,
                     penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the sequence score: with ``start = max_length -
    buffer``, ``0`` for ``length <= start``, ``-(length - start) / buffer * penalty`` in between
    (linear, ``-penalty`` at ``length == max_length``) and ``-penalty`` beyond (DAPO eq. 13; as
    OpenRLHF's ``apply_overlong_penalty``, which also caps the excess at ``buffer``:
    https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/openrlhf/trainer/ppo_utils/length_penalty.py#L41-L55;
    veRL's DAPO reward manager:
    https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/verl/workers/reward_manager/dapo.py#L116-L122).

    Args:
        lengths: ``[B]`` response lengths (valid tokens, e.g. ``mask.sum(-1)``).
        max_length: the largest response length (``max_new_tokens``).
        buffer: the number of tokens before ``max_length`` over which the penalty grows, ``1 <=
            buffer <= max_length``.
        penalty: the largest penalty (>= 0).
    Returns:
        ``[B]`` penalties ``<= 0`` (float32, or ``lengths``' floating dtype).
    """
    if not 1 <= buffer <= max_length:
        raise ValueError(f"overlong buffer: expected 1 <= buffer <= max_length={max_length}, "
                         f"got {buffer!r}")
    lengths = lengths if lengths.is_floating_point() else lengths.float()
    excess = (lengths - (max_length - buffer)).clamp(0, buffer)
    return 0.0 - excess / buffer * penalty


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens of each row.

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)``, ``A_t = delta_t + gamma * lam * A_{t+1}``
    (GAE paper eq. 16), with ``V = 0`` and ``A = 0`` after the last valid token (the episode ends),
    as the loops of baselines (https://github.com/openai/baselines/blob/ea25b9e8b234e6ee1bca43083f8f3cf974143998/baselines/ppo2/runner.py#L55-L65)
    and lm-human-preferences (https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/lm_human_preferences/train_policy.py#L327-L338).
    Masked positions are skipped: ``t+1`` means the next *valid* token, so any mask works.

    Args:
        rewards, values, mask: ``[B, T]``.
        lam: a number, or ``[B]`` (one lambda per row, e.g. :func:`length_adaptive_lam`).
    Returns:
        ``(advantages, returns)``, each ``[B, T]``, with ``returns = advantages + values`` (the
        lambda-return target of the value function); 0 at masked positions.
    """
    B, T = rewards.shape
    valid = mask.bool()
    gl = gamma * torch.as_tensor(lam, dtype=rewards.dtype, device=rewards.device)  # () or (B,)
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(B)
    next_adv = rewards.new_zeros(B)
    # Reverse-time recursion; the loop over T is short (response tokens) and vectorised over B.
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gl * next_adv
        advantages[:, t] = torch.where(valid[:, t], adv_t, 0.0)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv_t, next_adv)
    returns = (advantages + values) * valid.to(values.dtype)
    return advantages, returns


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           gamma: float, lam: float, critic_lam: float | None = None,
                           lam_length_alpha: float | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages for the policy with ``lam`` (or VAPO's length-adaptive lambda when
    ``lam_length_alpha`` is set, :func:`length_adaptive_lam`) and value targets for the critic
    with ``critic_lam`` (None: the policy's lambda): decoupled lambdas as in VC-PPO.

    Args:
        rewards, values, mask: ``[B, T]``.
    Returns:
        ``(advantages, returns)``, each ``[B, T]``, 0 at masked positions.
    """
    policy_lam = lam if lam_length_alpha is None else length_adaptive_lam(mask.sum(-1), lam_length_alpha)
    advantages, returns = compute_gae(rewards, values, mask, gamma, policy_lam)
    if critic_lam is not None and (critic_lam != lam or lam_length_alpha is not None):
        _, returns = compute_gae(rewards, values, mask, gamma, critic_lam)
    return advantages, returns


def length_adaptive_lam(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO's length-adaptive GAE lambda for the policy: ``lam = 1 - 1 / (alpha * l)`` per
    sequence of ``l`` valid tokens (Yue et al. 2025, https://arxiv.org/abs/2504.05118, "Length-Adaptive GAE";
    alpha 0.05 there), so that the sum of the TD-error weights, ``1 / (1 - lam) = alpha * l``,
    grows with the length and a long response's final reward is not discounted away. Clamped to
    ``[0, 1]`` (a response shorter than ``1 / alpha`` tokens gets 0: one-step TD).

    Args:
        lengths: ``[B]`` valid tokens per sequence.
    Returns:
        ``[B]`` float32 lambdas.
    """
    lengths = lengths.float().clamp(min=1)
    return (1.0 - 1.0 / (alpha * lengths)).clamp(0.0, 1.0)


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N]`` scores as ``[N / k, k]`` float groups (contiguous rows ``g*k .. g*k+k-1``)."""
    k = int(group_size)
    if k < 1 or scores.dim() != 1 or scores.shape[0] % k:
        raise ValueError(f"group baseline: expected [N] scores, N a multiple of "
                         f"group_size={group_size}, got shape {tuple(scores.shape)}")
    scores = scores if scores.is_floating_point() else scores.float()
    return scores.view(-1, k)


def group_normalized(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantage ``(s - mean_g) / (std_g + eps)`` over the ``k = group_size``
    responses to the same prompt (contiguous rows), ``std_g`` the *unbiased* (Bessel, ``/(k-1)``)
    standard deviation, as veRL's ``compute_grpo_outcome_advantage`` (``torch.std``,
    ``epsilon=1e-6`` added outside the square root,
    https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/verl/trainer/ppo/core_algos.py#L303-L330),
    TRL's (``nanstd`` with Bessel's correction, ``1e-4`` added,
    https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/trl/trainer/grpo_trainer.py#L2685-L2707)
    and OpenRLHF's ``group_norm`` (``1e-9`` added,
    https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/openrlhf/trainer/ppo_utils/experience_maker.py#L264-L270).
    A group whose scores are all equal gets 0 (up to the rounding of its mean). A group of 1 gets
    0 (as TRL: ``s - s``; veRL gives such a row ``s / (1 + eps)``: mean 0 and std 1).

    Args:
        scores: ``[N]`` sequence scores, ``N = groups * group_size``.
    Returns:
        ``[N]`` advantages, one per sequence.
    """
    grouped = _groups(scores, group_size)
    if grouped.shape[1] == 1:  # no baseline from the group's other samples: no signal
        return torch.zeros_like(grouped).reshape(-1)
    mean = grouped.mean(-1, keepdim=True)
    return ((grouped - mean) / (grouped.std(-1, keepdim=True) + eps)).reshape(-1)  # std: unbiased


def group_centered(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``s - mean_g`` over the group of the same prompt: Dr. GRPO (no division by the std;
    veRL's ``norm_adv_by_std_in_grpo=False``, OpenRLHF's ``dr_grpo``) and REINFORCE++-baseline
    (veRL's https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/verl/trainer/ppo/core_algos.py#L451-L473,
    OpenRLHF's ``reinforce_baseline``; both peers then whiten the token-level advantages over the
    batch: the caller's step, :func:`whiten` with global statistics). A group of 1 gets 0.

    Args:
        scores: ``[N]``, ``N = groups * group_size``.
    Returns:
        ``[N]`` advantages.
    """
    grouped = _groups(scores, group_size)
    return (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: ``s - mean of the other k - 1 scores = k / (k - 1) * (s - mean_g)``, as OpenRLHF's
    ``(sum - s) / (k - 1)`` baseline
    (https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/openrlhf/trainer/ppo_utils/experience_maker.py#L264-L270)
    and veRL's ``compute_rloo_outcome_advantage``
    (https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/verl/trainer/ppo/core_algos.py#L501-L525).
    A group of 1 gets 0 (veRL keeps the raw score there).

    Args:
        scores: ``[N]``, ``N = groups * group_size``.
    Returns:
        ``[N]`` advantages.
    """
    grouped = _groups(scores, group_size)
    k = grouped.shape[1]
    if k == 1:
        return torch.zeros_like(grouped).reshape(-1)
    return (grouped - (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go over the valid tokens of each row, ``G_t = r_t + gamma * G_{t+1}``, ``G = 0``
    after the last valid token: the returns (and, before whitening, the advantages) of
    REINFORCE++ from KL-shaped rewards (:func:`shape_rewards`), as OpenRLHF's
    ``get_cumulative_returns``
    (https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/openrlhf/trainer/ppo_utils/experience_maker.py#L380-L411)
    and veRL's ``compute_reinforce_plus_plus_outcome_advantage``
    (https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/verl/trainer/ppo/core_algos.py#L606-L613;
    veRL resets the sum at every masked token, OpenRLHF carries it through masked ones).
    As :func:`compute_gae`, masked positions are skipped (``t+1`` is the next *valid* token) and
    their rewards never read; with right padding this is the peers' result exactly.

    Args:
        rewards, mask: ``[B, T]``.
    Returns:
        ``[B, T]`` returns, 0 at masked positions.
    """
    B, T = rewards.shape
    valid = mask.bool()
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(B)
    for t in reversed(range(T)):
        g_t = rewards[:, t] + gamma * running
        returns[:, t] = torch.where(valid[:, t], g_t, 0.0)
        running = torch.where(valid[:, t], g_t, running)
    return returns


def broadcast_to_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One value per sequence on each of its valid tokens: ``[B]`` -> ``[B, T]``,
    ``values[:, None] * mask`` (e.g. :func:`group_normalized` as per-token advantages, as veRL's
    ``scores.unsqueeze(-1) * response_mask``)."""
    return values.unsqueeze(-1) * mask.to(values.dtype)


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; in backward the gradient flowing into ``x`` is multiplied by
    ``scale`` (0: ``x.detach()``, 1: ``x``)."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x.detach() + scale * (x - x.detach())


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor,
                   aggregation: Aggregation = "token-mean",
                   normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar (``mask`` ``[B, T]``; ``l_bt`` the loss,
    ``m_bt`` the mask, ``n_b = sum_t m_bt``).

    - ``token-mean``: ``sum_bt m l / sum_bt m`` (sum over valid tokens / number of valid tokens).
    - ``seq-mean`` = ``seq-mean-token-mean`` (both names accepted): each sequence's token mean,
      averaged over sequences, ``sum_b (sum_t m l / n_b) / B``.
    - ``seq-mean-token-sum``: each sequence's token sum, averaged over sequences,
      ``sum_b sum_t m l / B``.
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): ``sum_bt m l / (B * L)`` with a constant ``L``, the
      largest response length allowed (``max_new_tokens``): pass ``normalizer = B * L``; without a
      normalizer ``B * T`` of the tensor. As TRL's ``loss_type="dr_grpo"``
      (https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/trl/trainer/grpo_trainer.py#L3134-L3135).
      veRL's mode of the same name divides by ``loss_scale_factor`` alone, ``T`` by default, not
      ``B * T`` (https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/verl/trainer/ppo/core_algos.py#L1072-L1076):
      here the mean over sequences that its name says is taken.

    The three ``seq-mean-*`` modes are veRL's ``agg_loss`` modes
    (https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/verl/trainer/ppo/core_algos.py#L1025-L1080);
    one difference: the number of sequences here is ``B``, where veRL and OpenRLHF
    (https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/openrlhf/models/loss.py#L11-L39)
    count only the rows with a valid token (the same unless a row is empty).

    ``normalizer`` replaces the denominator (valid tokens, sequences, or ``B * L``): pass the count
    of the whole minibatch so that gradient accumulation over micro-batches gives the same loss
    (summed) and gradient as one pass over the minibatch.
    """
    mask = mask.to(per_token.dtype)
    if aggregation == "token-mean":
        total = (per_token * mask).sum()
        denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    elif aggregation in ("seq-mean", "seq-mean-token-mean"):
        total = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        denom = per_token.shape[0] if normalizer is None else normalizer
    elif aggregation == "seq-mean-token-sum":
        total = (per_token * mask).sum()
        denom = per_token.shape[0] if normalizer is None else normalizer
    elif aggregation == "seq-mean-token-sum-norm":
        total = (per_token * mask).sum()
        denom = per_token.shape[0] * per_token.shape[1] if normalizer is None else normalizer
    else:
        raise ValueError(f"aggregation: expected one of {', '.join(map(repr, AGGREGATIONS))}, "
                         f"got {aggregation!r}")
    return total / denom


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float, aggregation: Aggregation = "token-mean",
                normalizer: float | torch.Tensor | None = None, *,
                clip_range_high: float | None = None, dual_clip: float | None = None,
                ratio_level: Literal["token", "sequence"] = "token",
                is_weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (PPO paper eq. 7, negated for minimisation), as
    lm-human-preferences' ``pg_losses``
    (https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/lm_human_preferences/train_policy.py#L350-L355),
    with the variants of veRL's ``compute_policy_loss_vanilla``
    (https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/verl/trainer/ppo/core_algos.py#L1210-L1243)
    and OpenRLHF's ``PolicyLoss``
    (https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/openrlhf/models/loss.py#L166-L193).

    ``ratio = exp(logprobs - old_logprobs)``;
    ``loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps_high))``, ``eps_high = eps``
    unless ``clip_range_high`` is set (DAPO's clip-higher).

    - ``dual_clip=c`` (> 1; dual-clip PPO, veRL's ``clip_ratio_c``): where ``A_t < 0`` the loss is
      ``min(loss_t, -A_t * c)``, so a token whose ratio has grown far above 1 while its advantage
      is negative contributes at most ``-c * A_t`` (and no gradient). Positive advantages unchanged.
    - ``ratio_level="sequence"`` (GSPO): the ratio of sequence ``i`` is
      ``s_i = exp(mean over its valid tokens of (logprobs - old_logprobs))``, applied to each of its
      tokens with the token's own advantage, in GSPO-token's stop-gradient form
      ``s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])`` (value ``s_i``; gradient ``s_i * grad logp_t``),
      clipped like the token ratio, as veRL's ``compute_policy_loss_gspo``
      (https://github.com/volcengine/verl/blob/b178a3cd56f58b2d502255daba591e92833930a7/verl/trainer/ppo/core_algos.py#L1286-L1305;
      without its clamp of the log-ratio at 10). With ``seq-mean-token-mean`` aggregation and
      one advantage per sequence this has GSPO's gradient (TRL's ``importance_sampling_level=
      "sequence"``, https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/trl/trainer/grpo_trainer.py#L3054-L3066).
    - ``is_weights`` ``[B, T]`` (:func:`truncated_is_weights`; used without gradient) multiply
      the per-token loss after the clipping (veRL's ``rollout_is_weights``, line 1238 above).

    With every keyword at its default the loss is the plain PPO loss.

    Args:
        logprobs: ``[B, T]`` log pi_theta(a_t|s_t), with grad.
        old_logprobs: ``[B, T]`` log-probs at rollout time.
        advantages: ``[B, T]``.  mask: ``[B, T]``.
        clip_range: eps (the lower clip ``1 - eps``, and the upper one unless ``clip_range_high``).
        aggregation, normalizer: see :func:`aggregate_loss`.
    Returns:
        ``(loss, stats)``; stats (detached, token means over valid tokens): ``clipfrac`` (share of
        tokens where the clipped term is taken), ``approx_kl`` (k3 estimate of KL(old || new) from
        the token ratios: ``(ratio - 1) - log ratio``), ``ratio`` (the ratio that is clipped: the
        sequence ratio with ``ratio_level="sequence"``), ``dual_clipfrac`` (share of tokens where
        the dual-clip bound ``-A * c`` is taken; 0 without ``dual_clip``).
    """
    log_ratio = logprobs - old_logprobs
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
    elif ratio_level == "sequence":
        seq_log_ratio = masked_mean(log_ratio.detach(), mask, dim=-1)  # [B]: log s_i, no grad
        ratio = torch.exp(seq_log_ratio.unsqueeze(-1) + (logprobs - logprobs.detach()))
    else:
        raise ValueError(f"ratio_level: expected 'token' or 'sequence', got {ratio_level!r}")
    high = clip_range if clip_range_high is None else clip_range_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    dual_taken = None
    if dual_clip is not None:
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip: expected a number > 1, got {dual_clip!r}")
        bound = -advantages * dual_clip
        negative = advantages < 0
        dual_taken = negative & (per_token > bound)
        per_token = torch.where(negative, torch.minimum(per_token, bound), per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate_loss(per_token, mask, aggregation, normalizer)
    with torch.no_grad():
        token_ratio = ratio if ratio_level == "token" else torch.exp(log_ratio)
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((token_ratio - 1) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
            "dual_clipfrac": (torch.zeros((), device=logprobs.device) if dual_taken is None
                              else masked_mean(dual_taken.float(), mask)),
        }
    return loss, stats


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            estimator: Literal["k1", "k2", "k3"] = "k3", aggregation: Aggregation = "token-mean",
            normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """The KL to the reference policy as a loss term (GRPO, instead of a KL-shaped reward):
    :func:`kl_penalty` per token, aggregated by :func:`aggregate_loss`; differentiable through
    ``logprobs``. Added to the policy loss with a coefficient, it is the same as adding
    ``beta * kl_t`` to each token's loss before aggregating, as TRL
    (https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/trl/trainer/grpo_trainer.py#L3069-L3073,
    and #L3120-L3121), when the aggregation and normalizer are the policy loss's.

    The estimators differ as losses in their gradients (with ``r = ref / pi`` per token, for
    tokens sampled from pi): ``k3 = r - 1 - log r`` (GRPO's, DeepSeekMath eq. 4, TRL's) gives
    ``(1 - r) * grad log pi``, whose expectation is the gradient of KL(pi_ref || pi);
    ``k2 = (log pi - log pi_ref)^2 / 2`` gives ``(log pi - log pi_ref) * grad log pi``, the
    gradient of KL(pi || pi_ref) in expectation; ``k1 = log pi - log pi_ref``, the plain
    log-ratio, gives ``grad log pi``, 0 in expectation: as a loss it does not pull toward the
    reference (it is meant for the reward).

    Args:
        logprobs: ``[B, T]`` with grad.  ref_logprobs, mask: ``[B, T]``.
    Returns:
        The scalar loss. Masked positions never enter it (not even through an overflow).
    """
    valid = mask.bool()
    per_token = kl_penalty(torch.where(valid, logprobs, 0.0), torch.where(valid, ref_logprobs, 0.0),
                           estimator)
    return aggregate_loss(per_token, mask, aggregation, normalizer)


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                         mask: torch.Tensor, cap: float
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weights of the trainer's policy over the sampler's: the fix of the
    mismatch between the log-probs the sampling engine recorded and those the trainer computes
    for the same policy (Yao et al. 2025, https://fengyao.notion.site/off-policy-rl), as veRL's
    ``tis_imp_ratio_cap``
    (https://github.com/volcengine/verl/blob/b8dc5377c6484f5873102e02f6a63829528ab8c9/verl/trainer/ppo/core_algos.py#L893-L897)
    and OpenRLHF's ``vllm_is_correction_type="tis"`` (which also has a lower threshold,
    https://github.com/OpenRLHF/OpenRLHF/blob/3c3be6234e0cb353e76bb8019947db9dfe99fca7/openrlhf/models/loss.py#L215-L218).

    ``w_t = min(exp(old_logprobs_t - rollout_logprobs_t), cap)``, to multiply the per-token policy
    loss (``policy_loss(..., is_weights=w)``).

    Args:
        old_logprobs: ``[B, T]`` log pi_old as the trainer computes it.
        rollout_logprobs: ``[B, T]`` log pi_old as the sampler recorded it.
        mask: ``[B, T]``.  cap: the truncation (> 0; 2 in Yao et al.).
    Returns:
        ``(weights, stats)``: weights ``[B, T]`` without grad, 0 at masked positions; stats (token
        means over valid tokens): ``is_weight_mean`` (of the truncated weights), ``is_clipfrac``
        (share of tokens whose weight was capped), ``logprob_gap`` (mean ``|old - rollout|``,
        TRL's ``sampling_logp_difference``,
        https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/trl/trainer/grpo_trainer.py#L2779-L2783).
    """
    if not cap > 0:
        raise ValueError(f"truncated importance sampling cap: expected a number > 0, got {cap!r}")
    with torch.no_grad():
        valid = mask.bool()
        log_w = torch.where(valid, old_logprobs - rollout_logprobs, 0.0)
        raw = torch.exp(log_w)
        weights = torch.where(valid, raw.clamp(max=cap), 0.0)
        stats = {
            "is_weight_mean": masked_mean(weights, mask),
            "is_clipfrac": masked_mean((raw > cap).to(weights.dtype), mask),
            "logprob_gap": masked_mean(log_w.abs(), mask),
        }
    return weights, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float | None,
               aggregation: Aggregation = "token-mean",
               normalizer: float | torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with
    ``V_clip = V_old + clip(V - V_old, -c, c)`` (as in baselines ppo2,
    https://github.com/openai/baselines/blob/ea25b9e8b234e6ee1bca43083f8f3cf974143998/baselines/ppo2/model.py#L66-L75
    ); ``clip_range=None`` gives the plain ``0.5 * (V - R)^2``.

    Args:
        values: ``[B, T]`` current values, with grad.  old_values: ``[B, T]`` at rollout time.
        returns: ``[B, T]`` targets.  mask: ``[B, T]``.
    Returns:
        ``(loss, stats)``; stats: ``vf_clipfrac`` (share of tokens where the clipped term is taken).
    """
    unclipped = (values - returns).square()
    if clip_range is None:
        per_token = unclipped
        clipfrac = torch.zeros((), device=values.device)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (v_clipped - returns).square()
        per_token = torch.maximum(unclipped, clipped)
        with torch.no_grad():
            clipfrac = masked_mean((clipped > unclipped).float(), mask)
    loss = 0.5 * aggregate_loss(per_token, mask, aggregation, normalizer)
    return loss, {"vf_clipfrac": clipfrac}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et al.
    2021, eq. 1): ``1 - comb(n - c, k) / comb(n, k)``, computed as the product
    ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` of their numpy code
    (https://github.com/openai/human-eval/blob/6d43fb980f9fee3c892a914eda09951f772ad10d/human_eval/evaluation.py#L22-L28);
    1.0 when ``n - c < k`` (every draw of k samples holds a correct one).

    Args:
        n: samples (>= 1).  c: correct ones, ``0 <= c <= n``.  k: ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: expected 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, as lm-human-preferences'
    ``AdaptiveKLController`` (https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/lm_human_preferences/train_policy.py#L115-L124).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``coef *= 1 + e * n_steps / horizon``, where KL is
    the mean summed KL per sequence of the last batch and ``n_steps`` the number of sequences in it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient toward the target after a batch with mean KL ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The current coefficient (what a resumed run needs)."""
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.value = float(state["kl_coef"])


class FixedKLController:
    """A constant KL coefficient, with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient (as :class:`AdaptiveKLController`'s)."""
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.value = float(state["kl_coef"])


class RunningMoments:
    """Running mean and standard deviation of scalars (parallel-variance update, Chan et al.)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        """Fold a 1-D batch of values into the running statistics."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        """Running standard deviation (population)."""
        return self.var**0.5

    def state_dict(self) -> dict[str, float]:
        """Mean, variance and count."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
