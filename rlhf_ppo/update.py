"""The PPO update: ``ppo_epochs`` passes over the experience batch in shuffled minibatches, each
minibatch one optimizer step accumulated over micro-batches.

Every loss is normalised by its minibatch's global token (or sequence) count, so the gradient
does not depend on how a minibatch is cut into micro-batches or spread over processes (the
invariance tests in tests/test_trainer.py and tests/test_distributed.py hold it to that).
Tokens counted in a loss are the action mask's (``Experience.response_mask``: the tokens the
policy sampled); the forward passes read, and token budgets count, what the attention mask holds
(environment tokens between turns included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import ops
from .config import OptimConfig, PPOConfig
from .distributed import clip_grad_norms
from .experience import Experience
from .packing import packed_positions

NORM_KEYS = ("grad_norm", "grad_norm_policy", "grad_norm_critic")
LOSS_KEYS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac", "entropy_loss",
             "kl_loss", "dual_clipfrac")


class Learner(NamedTuple):
    """What the update trains, as the engine prepared it."""

    acc: Any
    """the accelerate ``Accelerator``"""
    model: torch.nn.Module
    """the prepared ActorCritic (wrapped by DDP / DeepSpeed / FSDP, or not)"""
    optimizer: torch.optim.Optimizer
    """its ``param_groups``: the policy's, then the critic's"""
    scheduler: Any
    """the learning-rate schedule, stepped with the optimizer"""


@dataclass(frozen=True)
class UpdateSettings:
    """How the update runs, fixed for a whole run."""

    ppo: PPOConfig
    """the ``ppo`` section (epochs, minibatches, the loss, the critic's loss, the KL loss)"""
    optim: OptimConfig
    """gradient clipping (``max_grad_norm``, ``separate_grad_clip``)"""
    temperature: float
    """the sampling temperature the log-probs are taken at"""
    with_critic: bool = True
    """False: no value loss (critic-free estimators)"""
    max_response_length: int | None = None
    """the constant of the ``seq-mean-token-sum-norm`` aggregation (None: the batch's width)"""
    packed: float | None = None
    """the model's :func:`packing.attention_weight` when it packs its forward passes (the packed
    layout sizes token budgets and padding counts); None: padded passes"""


def ppo_update(learner: Learner, batch: Experience, s: UpdateSettings, generator: torch.Generator,
               critic_only: bool = False, value_loss_scale: float = 1.0,
               finite: Callable[[torch.Tensor], bool] = lambda norm: bool(torch.isfinite(norm))
               ) -> dict[str, float]:
    """Train the prepared ActorCritic on ``batch`` (this process's rows).

    The policy's and the critic's gradients are clipped jointly, or each on its own with
    ``optim.separate_grad_clip``; ``generator`` shuffles the minibatches; ``critic_only``: the
    policy loss is left out (value pretraining); the value loss enters the objective times
    ``ppo.critic.vf_coef * value_loss_scale`` (its metric is unscaled); ``finite(grad_norm)``
    decides whether a step is taken (False: the update stops there, its gradient dropped).
    Returns the update's metrics, means over every process and minibatch step, with
    ``ppo_steps``, ``early_stopped``, ``nonfinite_skipped`` and ``padding_share`` (the share of
    the token positions the update's forward passes computed that were padding).
    """
    acc, model, optimizer, scheduler = learner
    p, o, packed = s.ppo, s.optim, s.packed
    B = len(batch)
    groups = [g["params"] for g in optimizer.param_groups]
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in LOSS_KEYS + NORM_KEYS}
    steps, early_stop, nonfinite = 0, False, False
    # token positions the forward passes computed, and those that were real (not padding)
    positions = torch.zeros(2, device=acc.device)
    for _epoch in range(p.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for mb_idx in order.split(B // p.num_minibatches):
            mb = batch.select(mb_idx)
            # Denominators are global counts / processes: the engine averages gradients over
            # processes, so each process's loss must be its share of the global token mean.
            # Tokens: trained (action) tokens, never the environment's.
            counts = torch.tensor([float(mb.response_mask.sum()), float(len(mb))], device=acc.device)
            g_tokens, g_seqs = (acc.reduce(counts, "sum") / acc.num_processes).tolist()
            mb_tokens = torch.tensor(max(g_tokens, 1e-8))
            if p.loss.aggregation == "token-mean":
                normalizer = mb_tokens
            elif p.loss.aggregation == "seq-mean-token-sum-norm":  # a constant per sequence
                normalizer = g_seqs * (s.max_response_length or batch.response_mask.shape[1])
            else:
                normalizer = g_seqs
            mb_stats = {k: torch.zeros((), device=acc.device) for k in LOSS_KEYS}
            parts = micro_batches(acc, mb, p, packed is not None)
            if p.forward.micro_batch_tokens is not None:  # as many micro-batches as this minibatch has
                acc.gradient_accumulation_steps, acc.step = len(parts), 0
            # accelerate counts micro-batches and syncs gradients (DDP no_sync, DeepSpeed
            # accumulation boundary) only on the last one of each minibatch.
            for rows in parts:
                micro = mb.micro_batch(rows, acc.device)
                am = micro["attention_mask"]
                computed = am.numel() if packed is None else packed_positions(am, packed)
                positions += torch.tensor([float(computed), float(am.sum())], device=acc.device)
                with acc.accumulate(model):
                    got = micro_step(acc, model, micro, s, normalizer, mb_tokens, critic_only,
                                     value_loss_scale)
                for name, value in got.items():
                    mb_stats[name] += value
            if p.early_stop_kl is not None:
                approx_kl = acc.reduce(mb_stats["approx_kl"].clone(), "mean").item()
                # Never take the step that overshoots (DeepSpeed has stepped already in
                # backward: there the update ends after it).
                if approx_kl > p.early_stop_kl:
                    optimizer.zero_grad(set_to_none=True)
                    early_stop = True
                    break
            # The norm is computed (max_norm inf: no clipping) even without clipping: a
            # non-finite one means a NaN/inf loss or gradient, and that step is never taken.
            norms = clip_grad_norms(acc, groups, o.max_grad_norm, o.separate_grad_clip)
            if norms[0] is not None and not finite(torch.as_tensor(norms[0])):
                optimizer.zero_grad(set_to_none=True)
                nonfinite = True
                break
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            for name, value in mb_stats.items():
                stats[name].append(value.detach())
            for key, norm in zip(NORM_KEYS, norms):
                stats[key].append(torch.as_tensor(float("nan") if norm is None else norm,
                                                  dtype=torch.float32, device=acc.device))
        if early_stop or nonfinite:
            break
    # Each process holds its share of each minibatch mean; the mean over processes is the
    # global value (one reduction for all of them, after the loop: no syncs inside it).
    keys = [k for k in stats if stats[k]]
    out = {k: float("nan") for k in stats}
    if keys:
        local = torch.stack([torch.stack(stats[k]).mean() for k in keys])
        out.update(dict(zip(keys, acc.reduce(local, "mean").tolist())))
    computed, real = acc.reduce(positions, "sum").tolist()
    return {**out, "ppo_steps": steps, "early_stopped": float(early_stop),
            "padding_share": 1.0 - real / computed if computed else float("nan"),
            "nonfinite_skipped": nonfinite}


def micro_batches(acc, mb: Experience, p: PPOConfig, packed: bool) -> list[torch.Tensor]:
    """The rows of each micro-batch of minibatch ``mb``: ``p.forward.micro_batch_size`` rows at a time,
    or with ``p.forward.micro_batch_tokens`` the rows placed longest first into the first micro-batch whose
    token budget they fit (packed: the sum of their real tokens, the attention mask's; padded:
    rows x (longest prompt + longest response, the response up to its last real column, so that
    holes in the attention mask cost what the padded pass computes)); a row over the budget
    alone. Every process
    gets as many micro-batches as the process that needs the most (its largest ones split), so
    gradient synchronisation happens on the same micro-batch everywhere."""
    if p.forward.micro_batch_tokens is None:
        return list(torch.arange(len(mb)).split(p.forward.micro_batch_size))
    P = mb.prompt_length
    prompt_len = mb.attention_mask[:, :P].sum(1).tolist()
    resp_real = mb.attention_mask[:, P:]
    resp_len = resp_real.sum(1).tolist()  # real tokens: the model's and the environment's
    # padded width: up to the last real column (the real-token count when there are no holes)
    resp_width = (ops.last_token_index(resp_real) + resp_real.any(1).long()).tolist()

    def cost(rows: list[int]) -> int:
        if packed:
            return sum(prompt_len[j] + resp_len[j] for j in rows)
        return len(rows) * (max(prompt_len[j] for j in rows) + max(resp_width[j] for j in rows))

    parts: list[list[int]] = []  # first-fit decreasing
    for i in sorted(range(len(mb)), key=lambda i: -(prompt_len[i] + resp_len[i])):
        part = next((q for q in parts if cost(q + [i]) <= p.forward.micro_batch_tokens), None)
        if part is None:
            parts.append([i])
        else:
            part.append(i)
    wanted = int(acc.reduce(torch.tensor([len(parts)], device=acc.device), "max").item())
    while len(parts) < wanted:  # every process has as many rows as the others: always possible
        big = max(range(len(parts)), key=lambda k: len(parts[k]))
        half = len(parts[big]) // 2
        if half == 0:
            raise RuntimeError(f"{len(mb)} rows cannot make {wanted} micro-batches: processes "
                               "hold minibatches of different sizes")
        parts[big:big + 1] = [parts[big][:half], parts[big][half:]]
    return [torch.tensor(sorted(rows)) for rows in parts]


def micro_step(acc, model, mb: dict, s: UpdateSettings, normalizer, mb_tokens: torch.Tensor,
               critic_only: bool, value_loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Forward + backward of one micro-batch (:meth:`Experience.micro_batch`). Returns its loss
    terms (normalised, so they sum to the minibatch's) and its token-weighted share of the
    minibatch's token means."""
    p, mask = s.ppo, mb["mask"]
    normalizer = torch.as_tensor(normalizer, device=mask.device)
    logprobs, entropy, values = model(
        mb["input_ids"], mb["attention_mask"], mb["prompt_length"], s.temperature,
        with_entropy=p.loss.entropy_coef > 0,
        backbone_value_grad=0.0 if critic_only else p.critic.backbone_grad)
    variants = {k: v for k, v in dict(clip_range_high=p.loss.clip_range_high, dual_clip=p.loss.dual_clip,
                                      is_weights=mb["is_weights"]).items() if v is not None}
    if p.loss.ratio_level != "token":
        variants["ratio_level"] = p.loss.ratio_level
    pg_loss, pg_stats = ops.policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask,
                                        p.loss.clip_range, p.loss.aggregation, normalizer, **variants)
    ent_loss = ops.aggregate_loss(entropy, mask, p.loss.aggregation, normalizer)
    zero = torch.zeros((), device=mask.device)
    loss = zero
    vf_loss, vf_clipfrac = zero, zero
    if s.with_critic:
        vf_loss, vf_stats = ops.value_loss(values, mb["values"], mb["returns"], mask,
                                           p.critic.value_clip, p.loss.aggregation, normalizer)
        vf_clipfrac = vf_stats["vf_clipfrac"]
        loss = p.critic.vf_coef * value_loss_scale * vf_loss
    kl_loss = zero
    if p.kl.loss_coef > 0:  # the KL to the reference as a loss term (GRPO)
        kl_loss = ops.kl_loss(logprobs, mb["ref_logprobs"], mask, p.kl.loss_estimator,
                              p.loss.aggregation, normalizer)
    if not critic_only:
        loss = loss + pg_loss - p.loss.entropy_coef * ent_loss + p.kl.loss_coef * kl_loss
    # accelerate (and DeepSpeed) divide by the accumulation steps; our normaliser already makes
    # the micro-batch losses sum to the minibatch loss, so undo that division.
    acc.backward(loss * acc.gradient_accumulation_steps)
    weight = mask.sum() / mb_tokens.to(mask.device)  # stats are token means over the minibatch
    return {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
            "entropy_loss": ent_loss.detach(), "kl_loss": kl_loss.detach(),
            "clipfrac": pg_stats["clipfrac"] * weight,
            "approx_kl": pg_stats["approx_kl"] * weight,
            "vf_clipfrac": vf_clipfrac * weight,
            "dual_clipfrac": pg_stats.get("dual_clipfrac", zero) * weight}
