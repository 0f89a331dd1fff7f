"""One PPO iteration's metrics (the lines of ``metrics.jsonl``), as means over the whole batch
of every process, and the greedy samples of ``samples.jsonl``. docs/algorithm.md says what each
metric means."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .agent_rollout import sample_rollout
from .config import GenerationConfig
from .distributed import global_stats
from .rollout import Rollout


@dataclass(frozen=True)
class IterationRecord:
    """What one PPO iteration produced that its metrics read. ``(B, R)`` tensors are this
    process's; the gathered ones hold every process's rows."""

    iteration: int
    all_scores: torch.Tensor
    """(B * processes,) raw scores of every process"""
    all_stopped: torch.Tensor
    """(B * processes,) whether each response emitted a stop token"""
    scores: torch.Tensor
    """(B,) processed scores (normalised, clipped, penalised)"""
    mask: torch.Tensor
    """(B, R) the action mask: the tokens the policy sampled (never the environment's)"""
    entropy: torch.Tensor
    """(B, R) the policy's entropy per token"""
    values: torch.Tensor
    """(B, R) V_old"""
    returns: torch.Tensor
    """(B, R) value targets"""
    returns_moments: tuple[float, float]
    """the returns' global (mean, variance)"""
    kl: float
    """mean summed KL per sequence (global); NaN: no reference (no KL setting reads it)"""
    kl_coef: float
    """the KL coefficient the rewards used"""
    reward_metrics: dict
    """per-source scores, dynamic sampling, truncated importance sampling (means over processes);
    multi-turn episode counts (:func:`agent_metrics`, per-row ``(B,)`` tensors: means over rows)"""
    with_critic: bool = True
    """False: critic-free, no value to explain"""


def agent_metrics(rollout: Rollout) -> dict[str, torch.Tensor]:
    """A multi-turn rollout's per-episode counts as ``agent/...`` metrics, each ``(B,)`` float, so
    that :func:`iteration_metrics` reports their means over every process's episodes:
    ``agent/turns``, ``agent/tool_calls``, ``agent/tool_errors``, ``agent/tool_timeouts``,
    ``agent/observation_tokens`` and, with an environment, ``agent/success`` (the fraction of
    episodes it scored as a success); see :func:`rlhf_ppo.agent_rollout.episode_stats`.
    Empty for a single-turn rollout."""
    stats = rollout.episode_stats or {}
    return {f"agent/{key}": values.float() for key, values in stats.items()}


def iteration_metrics(acc, r: IterationRecord, update: dict, lr: float, nonfinite_skips: int,
                      times: list[float]) -> dict:
    """The metrics of one iteration, in one reduction over processes. ``update``: what the
    update returned; ``times``: ``perf_counter`` at the start, after the rollout, after scoring
    and after the update. Per-token means (entropy, values, value error) are over the action
    mask; ``response_length`` is the mean number of trained tokens (the model's own, every turn
    together, environment tokens not counted), and ``tokens_per_second`` counts those too."""
    mask, entropy, values, returns, scores = r.mask, r.entropy, r.values, r.returns, r.scores
    reward_metrics, kl, kl_coef, all_scores = r.reward_metrics, r.kl, r.kl_coef, r.all_scores
    inputs = {"value_error": (returns - values, mask), "entropy": (entropy, mask),
              "values": (values, mask), "scores": (scores, None), "lengths": (mask.sum(-1), None),
              **{("reward", k): (torch.as_tensor(v, dtype=torch.float32), None)
                 for k, v in reward_metrics.items()}}
    stats = dict(zip(inputs, global_stats(acc, list(inputs.values()))))  # (mean, var, n)
    err_mean, err_var, err_n = stats["value_error"]
    err_ms = err_var * (err_n - 1) / max(err_n, 1.0) + err_mean * err_mean  # mean square
    ret_mean, ret_var = r.returns_moments
    n_tokens = stats["lengths"][0] * stats["lengths"][2]
    t0, t1, t2, t3 = times
    update = dict(update)
    if not r.with_critic:  # critic-free estimators: no value to explain
        err_var = err_ms = float("nan")
    return {
        "iteration": r.iteration,
        "score_mean": all_scores.mean().item(),
        "score_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
        "score_processed_mean": stats["scores"][0],
        "kl": kl,
        "kl_coef": kl_coef,
        "entropy": stats["entropy"][0],
        **update,
        "explained_variance": 1.0 - err_var / max(ret_var, 1e-8),
        "value_mean": stats["values"][0],
        "return_mean": ret_mean,
        "value_error": math.sqrt(max(err_ms, 0.0)),
        # without a reference (kl NaN) the rewards have no KL term: their penalty is 0
        "reward_kl_penalty": -kl_coef * kl if math.isfinite(kl) else 0.0,
        "response_length": stats["lengths"][0],
        "stop_rate": r.all_stopped.float().mean().item(),
        "lr": lr,
        "nonfinite_skipped": float(update.pop("nonfinite_skipped", False)),
        "nonfinite_skips": nonfinite_skips,
        **{k: stats["reward", k][0] for k in reward_metrics},
        "time/rollout": t1 - t0,
        "time/score": t2 - t1,
        "time/update": t3 - t2,
        "time/iteration": t3 - t0,
        "tokens_per_second": n_tokens / max(t1 - t0, 1e-9),
    }


def skipped_metrics(iteration: int, stage: str, all_scores: torch.Tensor, kl_coef: float,
                    nonfinite_skips: int, seconds: float) -> dict:
    """The metrics of an iteration whose update was skipped for non-finite values at ``stage``."""
    nan = float("nan")
    keys = ("score_std", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
            "explained_variance", "response_length", "time/score", "time/update")
    return {"iteration": iteration, "score_mean": all_scores.mean().item(),
            **dict.fromkeys(keys, nan), "kl_coef": kl_coef, "ppo_steps": 0,
            "nonfinite_skipped": 1.0, "nonfinite_skips": nonfinite_skips,
            "nonfinite_stage": stage, "time/rollout": seconds, "time/iteration": seconds,
            "tokens_per_second": nan}


def greedy_samples(policy, prompts: list, tokenizer, generation: GenerationConfig,
                   device: torch.device, rewards, iteration: int, agent=None) -> list[dict]:
    """Greedy responses of ``policy`` to ``prompts`` (a fixed set, so a user sees the generations
    move) scored by ``rewards`` (a ``RewardSum``): ``samples.jsonl`` rows. With ``agent`` (an
    :class:`~rlhf_ppo.agent_rollout.Agent`) the episodes are multi-turn, through the same tools or
    environment as training: ``response`` is the whole transcript after the prompt (the model's
    turns and the observations), and each row adds the episode's counts (``turns``,
    ``tool_calls``, ``tool_errors``, ...) and, with an environment, ``environment_reward`` (the sum
    of its rewards, which training adds to ``score``). The random state is left untouched: a run
    with and without samples is the same."""
    greedy = dataclasses.replace(generation, temperature=1.0, top_k=1, top_p=1.0)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        r = sample_rollout(policy, prompts, tokenizer, greedy, device, agent)
        scores, _ = rewards(r)
    rows = [{"iteration": iteration, "prompt": p.text, "response": text, "score": float(score),
             "stopped": bool(stop)}
            for p, text, score, stop in zip(r.prompts, r.response_texts, scores.tolist(),
                                            r.stopped.tolist())]
    for b, row in enumerate(rows):
        for key, values in (r.episode_stats or {}).items():
            row[key] = values[b].item()
        if r.turn_rewards is not None:
            row["environment_reward"] = float(r.turn_rewards[b].sum())
    return rows
