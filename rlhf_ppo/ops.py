"""The PPO math as pure functions on tensors: no models, no I/O, no accelerate.

Shape legend: ``B`` batch (sequences), ``T`` response length (tokens after the prompt),
``V`` vocabulary, ``H`` hidden size. Every ``mask`` is 1 (or True) on the valid response tokens
(up to and including the stop token) and 0 on the padding after it; that is the only mask
convention in this package. Masked positions of every returned per-token tensor are 0.

References (code links pinned to the commit and lines that were read)
- PPO: Schulman et al. 2017, https://arxiv.org/abs/1707.06347 (eq. 7 clipped surrogate).
- GAE: Schulman et al. 2015, https://arxiv.org/abs/1506.02438 (eq. 16).
- KL-shaped reward, adaptive KL: Ziegler et al. 2019, https://arxiv.org/abs/1909.08593 (sec. 2.2),
  following openai/lm-human-preferences (each function below links the lines it follows).
- KL estimators k1/k2/k3: J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
- Decoupled GAE (critic lambda 1, policy lambda < 1) and value pretraining: Yuan et al. 2025,
  VC-PPO, https://arxiv.org/abs/2503.01491; length-adaptive lambda: Yue et al. 2025, VAPO,
  https://arxiv.org/abs/2504.05118.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean"]


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
    recomputed ones (``ppo.old_logprobs: generation`` relies on that).
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
    """Index of the last valid token of each row: ``[B, T]`` -> ``[B]`` (0 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.long()).argmax(-1)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl_t`` on every response token, plus the sequence score on
    its last valid token.

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
    Returns:
        ``[B, T]`` rewards, 0 at masked positions.
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


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
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    - ``token-mean``: sum over valid tokens / number of valid tokens.
    - ``seq-mean``: each sequence's token mean, averaged over sequences.
    ``normalizer`` replaces the denominator (valid tokens, or sequences): pass the count of the
    whole minibatch so that gradient accumulation over micro-batches gives the same gradient as
    one pass over the minibatch.
    """
    mask = mask.to(per_token.dtype)
    if aggregation == "token-mean":
        total = (per_token * mask).sum()
        denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    elif aggregation == "seq-mean":
        total = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        denom = per_token.shape[0] if normalizer is None else normalizer
    else:
        raise ValueError(f"aggregation: expected 'token-mean' or 'seq-mean', got {aggregation!r}")
    return total / denom


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float, aggregation: Aggregation = "token-mean",
                normalizer: float | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (PPO paper eq. 7, negated for minimisation), as
    lm-human-preferences' ``pg_losses``
    (https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/lm_human_preferences/train_policy.py#L350-L355).

    ``ratio = exp(logprobs - old_logprobs)``;
    ``loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))``.

    Args:
        logprobs: ``[B, T]`` log pi_theta(a_t|s_t), with grad.
        old_logprobs: ``[B, T]`` log-probs at rollout time.
        advantages: ``[B, T]``.  mask: ``[B, T]``.
        clip_range: eps.
        aggregation, normalizer: see :func:`aggregate_loss`.
    Returns:
        ``(loss, stats)``; stats (detached, token means over valid tokens): ``clipfrac`` (share of
        tokens where the clipped term is taken), ``approx_kl`` (k3 estimate of KL(old || new):
        ``(ratio - 1) - log ratio``), ``ratio``.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate_loss(per_token, mask, aggregation, normalizer)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


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
