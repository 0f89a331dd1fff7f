"""The experience batch that crosses from scoring to the PPO update, and the no-grad pass that
computes what sampling did not record.

Shape legend: ``B`` rollouts (this process's), ``P`` prompt length (left-padded), ``R`` response
length (right-padded after the first stop token), ``L = P + R``. Per-token tensors cover the
response region (columns P..) and are 0 where ``response_mask`` is 0.

``response_mask`` is the action mask (the tokens the policy sampled and is trained on); in a
multi-turn rollout it has holes, the environment's tokens between the model's turns, which the
model reads (``attention_mask`` 1) but which never get a log-prob ratio, an advantage, a KL term
or a value loss. Nothing here assumes the trained tokens of a row are one contiguous block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import estimators, ops
from .config import PPOConfig
from .distributed import global_moments
from .rollout import Rollout


def trained_width(response_mask: torch.Tensor) -> int:
    """Response columns up to and including the last one any row is trained on (at least 1):
    ``(B, R)`` -> ``r``. Not a count of trained tokens, which is shorter than this whenever a
    response has holes (the environment's tokens between turns)."""
    trained = response_mask.bool().any(0)  # (R,)
    if not trained.any():
        return 1
    return int(trained.nonzero().max()) + 1


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor, prompt_length: int):
    """Drop prompt columns that are padding in every row and response columns past the last
    trained one (:func:`trained_width`), so a micro-batch costs only what its longest sequence
    needs. Columns after the last trained token may still be read by no one: attention is
    causal, so no log-prob or value of a trained token depends on them (an environment's final
    message, padding). Returns ``(input_ids, attention_mask, response_mask, prompt_length)``."""
    p0 = int(attention_mask[:, :prompt_length].any(0).long().argmax())
    r = trained_width(response_mask)
    end = prompt_length + r
    return (input_ids[:, p0:end], attention_mask[:, p0:end], response_mask[:, :r],
            prompt_length - p0)


def records_logprobs(mode: str, backend: str, dtype: torch.dtype, mixed_precision: str) -> bool:
    """Whether sampling records the old log-probs (``ppo.forward.old_logprobs`` ``mode``; ``auto``: when
    the native sampling pass computes in the training forward's precision, float32 weights
    without autocast, so that recorded and recomputed log-probs agree)."""
    if mode != "auto" or backend != "native":
        return mode == "generation"
    return dtype == torch.float32 and mixed_precision == "no"


class RolloutOutputs(NamedTuple):
    """What the models say about a rollout's responses, each ``(B, R)`` float32, masked."""

    logprobs: torch.Tensor
    """log pi_old(a_t|s_t): the rollout policy's log-probs"""
    entropy: torch.Tensor
    """entropy of the policy's next-token distribution (a metric)"""
    values: torch.Tensor
    """V_old(s_t): the critic's values"""
    ref_logprobs: torch.Tensor | None
    """log pi_ref(a_t|s_t); None: no reference (nothing reads it)"""
    sampling_logprobs: torch.Tensor | None = None
    """the log-probs recorded while sampling, when they were recomputed too (else None)"""


@torch.no_grad()
def rollout_outputs(model, ref, rollout: Rollout, temperature: float, batch_size: int,
                    device: torch.device, recompute: bool = False) -> RolloutOutputs:
    """The reference's log-probs, and the policy's log-probs, entropy and values where sampling
    did not record them (``rollout.logprobs`` etc. None) or ``recompute`` asks (truncated
    importance sampling compares the two), in no-grad batches of ``batch_size``.
    ``model``: the unwrapped ActorCritic; ``ref``: the reference model, or None (no KL setting
    reads it: no reference pass, ``ref_logprobs`` None).
    Every pass reads the whole context (environment tokens included); every output, computed
    or recorded, is 0 where ``response_mask`` is 0."""
    need_policy = recompute or rollout.logprobs is None or rollout.entropy is None
    need_values = rollout.values is None
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"lp": [], "ent": [], "v": [], "ref": []}
    R = rollout.response_mask.shape[1]
    for s in range(0, len(rollout.prompts), batch_size):
        ids, am, rm, P = trim_padding(rollout.input_ids[s:s + batch_size],
                                      rollout.attention_mask[s:s + batch_size],
                                      rollout.response_mask[s:s + batch_size], rollout.prompt_length)
        ids, am = ids.to(device), am.to(device)
        got = {} if ref is None else {"ref": ref(ids, am, P, temperature)}
        if need_policy:
            got["lp"], got["ent"], got["v"] = model(ids, am, P, temperature, with_entropy=True)
        elif need_values:
            got["v"] = model.values(ids, am, P)
        pad = R - rm.shape[1]  # back to the rollout's full response width
        for k, x in got.items():
            out[k].append(F.pad(x.float().cpu(), (0, pad)))
    model.train(was_training)
    mask = rollout.response_mask.float()
    # recorded ones are masked too: a sampler may record something on the environment's tokens
    logprobs = (torch.cat(out["lp"]) if need_policy else rollout.logprobs) * mask
    entropy = (torch.cat(out["ent"]) if need_policy else rollout.entropy) * mask
    values = (torch.cat(out["v"]) if need_policy or need_values else rollout.values) * mask
    ref_logprobs = None if ref is None else torch.cat(out["ref"]) * mask
    return RolloutOutputs(logprobs, entropy, values, ref_logprobs,
                          rollout.logprobs * mask if recompute else None)


def loss_weights(rollout: Rollout, out: RolloutOutputs, tis_cap: float | None,
                 mask_truncated: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The update's token mask and importance weights: ``(loss_mask (B, R), is_weights (B, R) or
    None, metrics)``. The loss mask is the action mask (``rollout.response_mask``: environment
    tokens never enter the loss), less what ``mask_truncated`` leaves out. ``tis_cap``: truncated
    importance sampling between the recomputed pi_old and the log-probs recorded while sampling
    (:func:`ops.truncated_is_weights`, over the action mask); ``mask_truncated``: responses
    without a stop token are left out of the loss."""
    loss_mask, is_weights, metrics = rollout.response_mask, None, {}
    if tis_cap is not None:
        is_weights, stats = ops.truncated_is_weights(out.logprobs, out.sampling_logprobs,
                                                     rollout.response_mask.float(), tis_cap)
        metrics = {f"tis/{k}": v for k, v in stats.items()}
    if mask_truncated:
        loss_mask = loss_mask * rollout.stopped[:, None].to(loss_mask.dtype)
    return loss_mask, is_weights, metrics


@dataclass(frozen=True)
class Experience:
    """One iteration's complete experience, as the PPO update receives it (every field set).
    ``response_mask`` is the update's action (loss) mask; per-token fields are 0 where it is 0."""

    # ---- tokens
    input_ids: torch.Tensor
    """(B, L) prompt (left-padded to P) then response region (padded after its end)"""
    attention_mask: torch.Tensor
    """(B, L) what the model reads: real prompt tokens, the model's and the environment's tokens"""
    prompt_length: int
    """P: the response region starts at column P"""
    response_mask: torch.Tensor
    """(B, R) the action mask the loss uses: the tokens the policy sampled (stop tokens
    included; environment tokens and padding 0; truncated rows 0 with ``loss.mask_truncated``)"""
    # ---- the rollout policy and critic
    logprobs: torch.Tensor
    """(B, R) log pi_old(a_t|s_t)"""
    values: torch.Tensor
    """(B, R) V_old(s_t)"""
    ref_logprobs: torch.Tensor | None
    """(B, R) log pi_ref(a_t|s_t) (the KL loss term); None: no reference (nothing reads it)"""
    # ---- targets
    rewards: torch.Tensor
    """(B, R) per-token rewards r_t: -beta * KL_t, plus the turn rewards, plus the score on the
    last action token"""
    advantages: torch.Tensor
    """(B, R) A_t: GAE advantages (whitened if configured)"""
    returns: torch.Tensor
    """(B, R) value targets"""
    is_weights: torch.Tensor | None = None
    """(B, R) truncated importance weights min(pi_old / pi_sampling, cap), or None (off)"""

    @property
    def action_mask(self) -> torch.Tensor:
        """(B, R) ``response_mask`` under its meaning: the tokens the update trains."""
        return self.response_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> Experience:
        """The rows in ``index`` (a minibatch), with the same prompt length."""
        fields = {k: v[index] if isinstance(v, torch.Tensor) else v
                  for k, v in self.__dict__.items()}
        return Experience(**fields)

    def micro_batch(self, rows: torch.Tensor, device: torch.device) -> dict:
        """Rows ``rows`` trimmed to their last trained column (:func:`trim_padding`) and moved to
        ``device``: ``input_ids``, ``attention_mask``, ``mask`` (float, the action mask),
        ``prompt_length`` and the per-token ``logprobs``, ``values``, ``advantages``,
        ``returns``, and ``ref_logprobs`` and ``is_weights`` (each None when absent) ``(b, r)``."""
        ids, am, mask, P = trim_padding(self.input_ids[rows], self.attention_mask[rows],
                                        self.response_mask[rows], self.prompt_length)
        r = mask.shape[1]
        per_token = {k: getattr(self, k)[rows, :r].to(device)
                     for k in ("logprobs", "values", "advantages", "returns")}
        for k in ("ref_logprobs", "is_weights"):  # optional
            x = getattr(self, k)
            per_token[k] = None if x is None else x[rows, :r].to(device)
        return {"input_ids": ids.to(device), "attention_mask": am.to(device),
                "mask": mask.to(device).float(), "prompt_length": P, **per_token}


class Targets(NamedTuple):
    """Steps 4-5 of an iteration: the update's batch and what the metrics read besides it."""

    batch: Experience
    """the experience the update trains on"""
    kl: torch.Tensor | None
    """(B, R) the per-token KL penalty estimate (``ppo.kl.estimator``), 0 on padding; None: no
    reference (nothing reads it)"""
    returns_moments: tuple[float, float]
    """the returns' (mean, variance) over every process's valid tokens"""
    metrics: dict
    """truncated importance sampling's metrics (``tis/...``), or empty"""


def make_targets(acc, p: PPOConfig, rollout: Rollout, out: RolloutOutputs, scores: torch.Tensor,
                 kl_coef: float) -> Targets:
    """Steps 4-5: per-token rewards (``-kl_coef * KL_t``, plus ``rollout.turn_rewards`` when a
    multi-turn rollout has them, plus the score, or the score minus its group's baseline, on the
    last action token), advantages and returns of the estimator
    ``p.advantage_estimator`` (:mod:`rlhf_ppo.estimators`), the advantages whitened over the valid
    tokens of every process when the estimator does (a global statistic: the result must not
    depend on how the batch is split), and the update's loss mask and importance weights.

    Args:
        scores: ``(B,)`` processed scores.  kl_coef: the KL coefficient of this iteration.
    """
    mask = rollout.response_mask.float()
    kl = (None if out.ref_logprobs is None
          else ops.kl_penalty(out.logprobs, out.ref_logprobs, p.kl.estimator) * mask)
    est, a = estimators.get(p.advantage_estimator), p.advantages
    # without a reference kl_coef is 0, so zeros give the penalty it would: none
    kl_t = torch.zeros_like(mask) if kl is None else kl  # (B, R)
    rewards, advantages, returns = est.estimate(scores, kl_t, kl_coef, out.values, mask,
                                                p.samples_per_prompt, a.gamma, a.lam, p.critic.lam,
                                                a.lam_length_alpha, rollout.turn_rewards)
    if est.whitens(a.whiten):
        advantages = ops.whiten(advantages, mask, *global_moments(acc, advantages, mask))
    loss_mask, is_weights, tis = loss_weights(rollout, out, p.loss.tis_cap, p.loss.mask_truncated)
    batch = Experience(rollout.input_ids, rollout.attention_mask, rollout.prompt_length, loss_mask,
                       out.logprobs, out.values, out.ref_logprobs, rewards, advantages, returns,
                       is_weights)
    return Targets(batch, kl, global_moments(acc, returns, mask), tis)

