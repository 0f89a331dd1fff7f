"""``rlhf-ppo evaluate``: sample from the trained policy and its reference, score both, compare.

For every prompt, K responses are sampled from each model with the same generation settings and
the same seeds (the torch generator is reset to the same seed before each batch, for both), so the
sample pairs ``(prompt i, sample k)`` differ only through the models. Both sides are scored by the
reward sources; the report gives means with bootstrap confidence intervals, the paired win rate and
score difference, KL(policy || reference), response length, distinct-1/2 and the stop rate.
Outputs: ``OUTPUT_DIR/samples.jsonl``, ``summary.json`` and a self-contained ``report.html``.

When the policy comes from a PPO run (its config is found with the policy folder), the run's
``data``, ``reward``, ``generation`` and ``agent`` sections are used, except for the keys set for
evaluate (in its config file or on the command line), key by key: see
:func:`rlhf_ppo.eval_config.effective_config`.

Multi-turn (an ``agent`` section with tools or an environment): both models are sampled through
:func:`rlhf_ppo.agent_rollout.sample_rollout` with the same tools / environment (a fresh
environment instance per episode) and the same seeds; the summary adds, per model, the success
rate, turns, tool calls and tool errors per episode (:func:`agent_summary`), and each sample keeps
its whole transcript, split into the model's (trained) spans and the observations
(:func:`transcript_spans`).

The command in four modules, each with one job: :mod:`rlhf_ppo.eval_config` (the config and how
it combines with the PPO run's), :mod:`rlhf_ppo.eval_models` (which models, and loading them),
:mod:`rlhf_ppo.eval_stats` (the statistics, pure functions) and this one (sampling, scoring, the
summary and the outputs; the page itself is :mod:`rlhf_ppo.report`'s).

Shape legend: ``N`` prompts, ``K`` samples per prompt, ``B`` sequences of a batch, ``R`` response
length, ``S`` reward sources.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import report
from .agent_rollout import Agent, build_agent, sample_rollout
from .config import ConfigError, GenerationConfig, ModelConfig
from .data import Prompt, load_prompts
from .distributed import set_threads
from .errors import raised
from .eval_config import (
    EvalConfig,
    effective_config,
    load_eval_config,  # noqa: F401  (re-exported: users import it from rlhf_ppo.evaluate)
    set_keys,
)
from .eval_models import (
    Side,
    find_run_config,
    load_sides,
    pick_device,
    policy_dir,
    resolve_specs,
    tokenizer_config,
)
from .eval_stats import (
    accuracy_summary,
    bootstrap_ci,  # noqa: F401  (re-exported: users import it from rlhf_ppo.evaluate)
    distinct_n,
    mean_ci,
    pass_k_values,
    sequence_kl,
    source_mean_ci,
    win_indicators,
    win_rate,  # noqa: F401  (re-exported: users import it from rlhf_ppo.evaluate)
)
from .jsonl import json_safe
from .loading import load_tokenizer
from .models import reference_logprobs
from .progress import ensure_logging, plural
from .rewards import RewardError, RewardSum, load_function
from .rollout import Rollout

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- sampling and scoring

@dataclass
class SideSamples:
    """One model's N * K responses, flattened prompt-major (row ``i * K + k``: prompt i, sample k)."""

    texts: list[str] = field(default_factory=list)
    """decoded responses"""
    tokens: list[list[int]] = field(default_factory=list)
    """response token ids without the stop token"""
    scores: list[float] = field(default_factory=list)
    """weighted sum of the reward sources"""
    source_scores: list[list[float]] = field(default_factory=list)
    """per response, each source's raw score (S values)"""
    lengths: list[int] = field(default_factory=list)
    """valid response tokens, stop token included"""
    stopped: list[bool] = field(default_factory=list)
    """the response emitted a stop token before max_new_tokens"""
    correct: list[bool] = field(default_factory=list)
    """the answer is right (only with `accuracy_column`; empty otherwise)"""
    # ---- multi-turn only (empty otherwise), per episode
    transcripts: list[list[dict]] = field(default_factory=list)
    """the response region as spans ``{"text", "trained"}`` (:func:`transcript_spans`)"""
    episode: dict[str, list[int]] = field(default_factory=dict)
    """``turns``, ``tool_calls``, ``tool_errors`` and, with an environment, ``success`` (0/1)"""

    def extend(self, rollout: Rollout, scores: torch.Tensor, per_source: torch.Tensor) -> None:
        """Append a scored rollout: ``scores`` ``[B]``, ``per_source`` ``[S, B]``."""
        lengths = rollout.response_mask.sum(-1)
        for b in range(len(rollout.prompts)):
            n, stop = int(lengths[b]), bool(rollout.stopped[b])
            if rollout.episode_stats is None:
                self.tokens.append(rollout.response_ids[b, :n - int(stop)].tolist())
            else:  # multi-turn: the model's own tokens, observations left out
                self.tokens.append(rollout.response_ids[b][rollout.response_mask[b].bool()].tolist())
            self.lengths.append(n)
            self.stopped.append(stop)
        self.texts += rollout.response_texts
        self.scores += scores.tolist()
        self.source_scores += per_source.T.tolist()

    def extend_episodes(self, rollout: Rollout, tokenizer) -> None:
        """Append a multi-turn rollout's transcripts and per-episode counts (``episode_stats``)."""
        self.transcripts += transcript_spans(rollout, tokenizer)
        for key, values in (rollout.episode_stats or {}).items():
            self.episode.setdefault(key, []).extend(int(v) for v in values.tolist())


def transcript_spans(rollout: Rollout, tokenizer) -> list[list[dict]]:
    """Per row, its response region (up to its last token read) split where the action mask
    changes: ``[{"text": decoded span, "trained": True for the model's tokens}, ...]``.
    Special tokens are kept (an EOS the model sampled is a trained token too)."""
    P = rollout.prompt_length
    out = []
    for ids, action, read in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist(),
                                 rollout.attention_mask[:, P:].tolist()):
        spans: list[tuple[bool, list[int]]] = []
        for tok, a, r in zip(ids, action, read):
            if not r:  # padding after the episode's end
                break
            if spans and spans[-1][0] == bool(a):
                spans[-1][1].append(tok)
            else:
                spans.append((bool(a), [tok]))
        out.append([{"text": tokenizer.decode(t, skip_special_tokens=False), "trained": a}
                    for a, t in spans])
    return out


def select_prompts(prompts: list[Prompt], num_prompts: int | None, shuffle: bool, seed: int
                   ) -> list[Prompt]:
    """The first ``num_prompts`` prompts, or (``shuffle``) a seeded random subset in random order."""
    order = list(range(len(prompts)))
    if shuffle:
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [prompts[i] for i in order[:num_prompts]]


def score_rollout(rewards: RewardSum, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted score ``[B]`` and each source's raw score ``[S, B]`` (NaN where a TRL-style
    function returned None: left out of the weighted sum, as TRL's ``nansum``). RewardError on a
    NaN / inf score, or a response that no source scored."""
    per_source, scored = rewards.score_sources(rollout)  # (S, B) each
    for i, (_, source) in enumerate(rewards.sources):
        if not torch.isfinite(per_source[i][scored[i]]).all():
            raise RewardError(f"reward.sources[{i}] ({source.name}) returned NaN or inf")
    unscored = (~scored.any(0)).nonzero().flatten().tolist()
    if unscored:
        b = unscored[0]
        raise RewardError(
            f"no reward source scored {len(unscored)} of {len(scored[0])} responses (every one "
            f"returned None), e.g. the response {rollout.response_texts[b]!r} to "
            f"{rollout.prompts[b].text!r}; evaluate compares a score per response: add a source "
            "that scores every response")
    weights = torch.tensor([w for w, _ in rewards.sources], dtype=torch.float32)
    return torch.where(scored, weights[:, None] * per_source, 0.0).sum(0), per_source


def check_answers(fn, prompts: Sequence[Prompt], texts: Sequence[str], column: str) -> list[bool]:
    """Per response: the checker ``fn(prompts, responses, answer=...)`` (``accuracy_function``)
    gives it a score >= 0.5. ConfigError when a prompt lacks the ``column``."""
    answers = []
    for p in prompts:
        if column not in p.extra:
            raise ConfigError(f"accuracy_column: the prompts have no column {column!r} (their "
                              f"other columns: {sorted(p.extra)})")
        answers.append(p.extra[column])
    try:
        scores = list(fn([p.text for p in prompts], list(texts), answer=answers))
    except Exception as e:
        raise RewardError(raised("accuracy_function", e, fn)) from e
    if len(scores) != len(texts):
        raise RewardError(f"accuracy_function returned {len(scores)} scores for {len(texts)} "
                          "responses")
    return [s is not None and float(s) >= 0.5 for s in scores]


def response_logprobs(side: Side, rollout: Rollout, temperature: float, device: torch.device
                      ) -> torch.Tensor:
    """Log-probs ``[B, R]`` of the rollout's response tokens under ``side`` (0 past the stop)."""
    with side.active():
        lp = reference_logprobs(side.lm, rollout.input_ids.to(device),
                                rollout.attention_mask.to(device), rollout.prompt_length,
                                temperature).cpu()
    return lp * rollout.response_mask


def sample(side: Side, prompts: list[Prompt], tokenizer, cfg: GenerationConfig, seed: int,
           device: torch.device, agent: Agent | None = None) -> Rollout:
    """One response (with ``agent``: one multi-turn episode) per prompt, with the torch generator
    reset to ``seed`` first (the caller's random state is left as it was)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the same seed for both models: pairs differ only by the model
        with side.active():
            return sample_rollout(side.lm, prompts, tokenizer, cfg, device, agent=agent)


def sample_and_score(cfg: EvalConfig, prompts: list[Prompt], policy: Side, reference: Side,
                     tokenizer, rewards: RewardSum, checker: Callable | None, device: torch.device,
                     agent: Agent | None = None) -> tuple[SideSamples, SideSamples, list[float]]:
    """Per batch of ``cfg.batch_size`` prompts: K samples per prompt from each model, both sampled
    with the seed ``cfg.seed + b`` of batch b (and, multi-turn, the same ``agent``), scored (and
    checked with ``checker``, the ``accuracy_function``, when given). Returns the policy's and the
    reference's samples and the k1 KL of each policy sample (``N * K`` values each,
    prompt-major; multi-turn: over the model's tokens only)."""
    pol, ref, kl = SideSamples(), SideSamples(), []
    K, temperature = cfg.samples_per_prompt, cfg.generation.temperature
    for b, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        batch = [p for p in prompts[start:start + cfg.batch_size] for _ in range(K)]  # prompt-major
        for side, out in ((policy, pol), (reference, ref)):
            rollout = sample(side, batch, tokenizer, cfg.generation, cfg.seed + b, device, agent)
            out.extend(rollout, *score_rollout(rewards, rollout))
            if agent is not None:
                out.extend_episodes(rollout, tokenizer)
            if checker is not None:
                out.correct += check_answers(checker, batch, rollout.response_texts,
                                             cfg.accuracy_column)
            if side is policy:  # k1 on the policy's own samples
                lp = response_logprobs(policy, rollout, temperature, device)
                ref_lp = response_logprobs(reference, rollout, temperature, device)
                kl += sequence_kl(lp, ref_lp, rollout.response_mask).tolist()
    return pol, ref, kl


# --------------------------------------------------------------------------- summary

def side_summary(s: SideSamples, names: list[str], shape: tuple[int, int], boot: dict,
                 pass_k: Sequence[int] | None = None) -> dict:
    """Statistics of one model's samples; ``shape`` = (N, K) for the prompt-level bootstrap.
    With answers checked (``s.correct``): also ``accuracy`` and ``pass@k`` (k in ``pass_k``,
    default :func:`pass_k_values`)."""
    per_source = np.asarray(s.source_scores, dtype=np.float64).reshape(*shape, len(names))
    accuracy = {}
    if s.correct:
        accuracy = accuracy_summary(np.asarray(s.correct).reshape(shape),
                                    pass_k_values(shape[1], pass_k), boot)
    return {
        "score": mean_ci(np.asarray(s.scores).reshape(shape), **boot),
        "sources": [{"source": f"reward.sources[{i}]", "name": name,
                     **source_mean_ci(per_source[..., i], **boot)} for i, name in enumerate(names)],
        "response_length": float(np.mean(s.lengths)),
        "stop_rate": float(np.mean(s.stopped)),
        "distinct_1": distinct_n(s.tokens, 1),
        "distinct_2": distinct_n(s.tokens, 2),
        **accuracy,
        **({"agent": agent_summary(s, shape, boot)} if s.episode else {}),
    }


def success_from(s: SideSamples) -> str | None:
    """What a multi-turn sample's success is: ``"accuracy_function"`` (answers checked, as for
    single-turn accuracy), ``"environment"`` (:func:`rlhf_ppo.agent_rollout.episode_stats`), or
    None (tools without an environment or an answer checker: no success rate)."""
    if s.correct:
        return "accuracy_function"
    return "environment" if "success" in s.episode else None


def agent_summary(s: SideSamples, shape: tuple[int, int], boot: dict) -> dict:
    """Per-episode means of one model's multi-turn samples with their prompt-bootstrap intervals
    (:func:`mean_ci` over ``[N, K]``): ``success_rate`` (see :func:`success_from`; absent when
    there is none), ``turns`` (model turns), ``tool_calls`` and ``tool_errors`` (calls answered
    with an error observation: the tool raised or timed out, an unknown tool, bad arguments)."""
    def per_episode(values: Sequence[float]) -> dict[str, float]:
        return mean_ci(np.asarray(values, dtype=np.float64).reshape(shape), **boot)
    kind = success_from(s)
    out = {}
    if kind is not None:
        out["success_rate"] = per_episode(s.correct if kind == "accuracy_function"
                                          else s.episode["success"])
    for key in ("turns", "tool_calls", "tool_errors"):
        out[key] = per_episode(s.episode[key])
    return out


def build_summary(cfg: EvalConfig, pol: SideSamples, ref: SideSamples, kl: list[float],
                  source_names: list[str], shape: tuple[int, int], names: dict[str, str],
                  settings_from: dict[str, str] | None = None) -> dict:
    """The ``summary.json`` dict (docs/finetune.md lists every field). ``settings_from``: per
    data / reward / generation section, where its settings came from (:func:`effective_config`)."""
    boot = dict(num_samples=cfg.bootstrap_samples, level=cfg.ci_level, seed=cfg.seed)
    p_scores, r_scores = np.asarray(pol.scores).reshape(shape), np.asarray(ref.scores).reshape(shape)
    return {
        "policy_path": names["policy"],
        "reference_path": names["reference"],
        "num_prompts": shape[0],
        "samples_per_prompt": shape[1],
        "bootstrap": {"samples": cfg.bootstrap_samples, "level": cfg.ci_level, "unit": "prompt",
                      "seed": cfg.seed},
        "policy": side_summary(pol, source_names, shape, boot, cfg.pass_k),
        "reference": side_summary(ref, source_names, shape, boot, cfg.pass_k),
        "win_rate": mean_ci(win_indicators(p_scores, r_scores), **boot),
        "score_diff": mean_ci(p_scores - r_scores, **boot),
        "kl": mean_ci(np.asarray(kl).reshape(shape), **boot),
        **({"accuracy_diff": mean_ci(np.asarray(pol.correct, dtype=np.float64).reshape(shape)
                                     - np.asarray(ref.correct, dtype=np.float64).reshape(shape),
                                     **boot)} if pol.correct and ref.correct else {}),
        "config": cfg.to_dict(),
        **({"settings_from": settings_from} if settings_from is not None else {}),
        **({"success_from": success_from(pol)} if pol.episode else {}),
    }


def sample_rows(prompts: list[Prompt], k: int, pol: SideSamples, ref: SideSamples,
                kl: list[float]) -> list[dict]:
    """One ``samples.jsonl`` row per (prompt, sample index) pair."""
    rows = []
    for j in range(len(prompts) * k):
        rows.append({
            "prompt_index": j // k, "sample": j % k, "prompt": prompts[j // k].text,
            "policy_response": pol.texts[j], "reference_response": ref.texts[j],
            "policy_score": pol.scores[j], "reference_score": ref.scores[j],
            "policy_source_scores": pol.source_scores[j],
            "reference_source_scores": ref.source_scores[j],
            "policy_length": pol.lengths[j], "reference_length": ref.lengths[j],
            "policy_stopped": pol.stopped[j], "reference_stopped": ref.stopped[j],
            "kl": kl[j],
        })
        for side, s in (("policy", pol), ("reference", ref)):
            if s.transcripts:  # multi-turn: the whole transcript and the episode's counts
                rows[-1][f"{side}_transcript"] = s.transcripts[j]
                rows[-1].update({f"{side}_{key}": values[j] for key, values in s.episode.items()})
    return rows


def default_metrics_path(cfg: EvalConfig, folder: Path) -> Path | None:
    """``metrics_path``, or the PPO run's metrics.jsonl beside the policy folder when present."""
    if not cfg.plot_training:
        return None
    if cfg.metrics_path is not None:
        path = Path(cfg.metrics_path)
        if not path.is_file():
            raise ConfigError(f"metrics_path: file {cfg.metrics_path!r} not found; expected a PPO "
                              "run's metrics.jsonl (or null)")
        return path
    for path in (folder.parent / "metrics.jsonl", folder / "metrics.jsonl"):
        if path.is_file():
            return path
    return None


def write_outputs(out_dir: Path, summary: dict, rows: list[dict], kl: list[float],
                  metrics_path: Path | None) -> None:
    """Write samples.jsonl, summary.json and report.html (with the training curves of
    ``metrics_path`` when given) to ``out_dir``, replacing earlier ones. A non-finite KL is written
    as null, with a warning."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not all(math.isfinite(x) for x in kl):  # a sampled token the reference gives probability 0
        logger.warning("the KL is infinite or NaN for some samples (written as null)")
    with open(out_dir / "samples.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(json_safe(row)) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    metrics = report.read_metrics(metrics_path) if metrics_path is not None else None
    report.write_report(out_dir / "report.html", summary, rows, metrics)


# --------------------------------------------------------------------------- the command

def run_evaluate(cfg: EvalConfig) -> dict:
    """Sample, score and compare the policy and the reference; write samples.jsonl, summary.json
    and report.html to ``cfg.output_dir``. Returns the summary dict."""
    ensure_logging()  # a script's run_evaluate logs like `rlhf-ppo evaluate`
    logger.info("evaluate: torch threads %d", set_threads(cfg.threads))

    # step 1. resolve the models and the data / reward / generation settings (defaults from the
    # PPO run's config) before loading anything
    folder = policy_dir(cfg)
    run = find_run_config(folder) or cfg.ppo_config_file
    pol_spec, ref_spec = resolve_specs(cfg, folder, run)
    # training-time shaping keys set for evaluate get a warning; the run's (also when read from a
    # PPO config given as --config) are expected there
    sources = cfg.key_sources or {}
    shaping_set = {k for k in set_keys(cfg.reward) & {"normalize", "clip", "missing_stop_penalty"}
                   if cfg.ppo_config_file is None
                   or sources.get(f"reward.{k}", sources.get("reward")) == "the command line"}
    cfg, settings_from = effective_config(cfg, run)
    revision = ((run[0].get("model") or {}).get("revision")) if run else None
    model_cfg = ModelConfig(name_or_path=pol_spec.name, dtype=cfg.dtype, revision=revision,
                            trust_remote_code=cfg.trust_remote_code)
    metrics_path = default_metrics_path(cfg, folder)
    device = pick_device(cfg.device)
    r = cfg.reward
    if r.normalize or r.clip is not None or r.missing_stop_penalty is not None:
        # set by the user for evaluate: a warning; inherited from the training run: expected
        log = logger.warning if shaping_set else logger.info
        log("reward.normalize, reward.clip and reward.missing_stop_penalty shape the training "
            "signal; evaluate ignores them and reports the weighted raw scores (and the stop rate "
            "separately)")

    # step 2. prompts, models and reward sources
    tokenizer = load_tokenizer(tokenizer_config(cfg, pol_spec, model_cfg),
                               key="tokenizer" if cfg.tokenizer else pol_spec.key)
    agent = build_agent(cfg.agent, tokenizer) if cfg.agent.enabled else None
    # as in training: in the chat protocol the tools' schemas are rendered into the prompts
    prompts = select_prompts(load_prompts(cfg.data, tokenizer, agent.schemas if agent else None),
                             cfg.num_prompts, cfg.data.shuffle, cfg.seed)
    policy, reference = load_sides(pol_spec, ref_spec, model_cfg)
    for side in (policy, reference):
        side.lm.to(device)
    rewards = RewardSum(cfg.reward, model_cfg, tokenizer)
    checker = None
    if cfg.accuracy_column is not None:
        checker = load_function(cfg.accuracy_function, "accuracy_function")
    for source in rewards.model_sources():
        source.scorer.to(device)
    logger.info("evaluating %s against %s on %s x %s", pol_spec.name, ref_spec.name,
                plural(len(prompts), "prompt"), plural(cfg.samples_per_prompt, "sample"))

    # step 3. per batch: K samples per prompt from each model (same seed), scores, KL
    K = cfg.samples_per_prompt
    try:
        pol, ref, kl = sample_and_score(cfg, prompts, policy, reference, tokenizer, rewards, checker,
                                        device, agent)
    finally:
        if agent is not None:
            agent.close()

    # step 4. statistics and outputs
    names = [src.function or src.model or src.url for src in cfg.reward.sources]
    summary = build_summary(cfg, pol, ref, kl, names, (len(prompts), K),
                            {"policy": pol_spec.name, "reference": ref_spec.name}, settings_from)
    rows = sample_rows(prompts, K, pol, ref, kl)
    if checker is not None:
        for row, p_ok, r_ok in zip(rows, pol.correct, ref.correct):
            row.update(policy_correct=p_ok, reference_correct=r_ok)
    out_dir = Path(cfg.output_dir)
    write_outputs(out_dir, summary, rows, kl, metrics_path)
    logger.info("policy score %.4g vs reference %.4g, win rate %.3f, KL %.4g; report: %s",
                summary["policy"]["score"]["mean"], summary["reference"]["score"]["mean"],
                summary["win_rate"]["mean"], summary["kl"]["mean"], out_dir / "report.html")
    if checker is not None:
        p, r = summary["policy"], summary["reference"]
        logger.info("accuracy policy %.3f vs reference %.3f; %s", p["accuracy"]["mean"],
                    r["accuracy"]["mean"], ", ".join(
                        f"pass@{k} {p['pass@k'][k]['mean']:.3f} vs {r['pass@k'][k]['mean']:.3f}"
                        for k in p["pass@k"]))
    if agent is not None:
        log_agent_figures(summary)
    return summary


def log_agent_figures(summary: dict) -> None:
    """One INFO line with both models' per-episode agent figures."""
    p, r = summary["policy"]["agent"], summary["reference"]["agent"]
    parts = [f"{key.replace('_', ' ')} {p[key]['mean']:.3g} vs {r[key]['mean']:.3g}"
             for key in ("success_rate", "turns", "tool_calls", "tool_errors") if key in p]
    logger.info("per episode, policy vs reference: %s (success from %s)", ", ".join(parts),
                summary["success_from"] or "nothing: no environment or accuracy_column")
