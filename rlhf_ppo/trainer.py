"""The PPO loop under accelerate. ``PPOTrainer.step`` reads as the algorithm's numbered steps;
the math lives in ``ops.py``.

Shape legend: ``B`` rollouts per process, ``P`` prompt length, ``R`` response length.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import ops
from .config import Config, ConfigError, config_from_dict, save_config
from .data import PromptSampler, load_prompts
from .distributed import (
    clip_grad_norms,
    full_state_dict,
    generation_model,
    is_deepspeed,
    make_accelerator,
    match_partitioned_dtype,
    prepare_frozen,
    zero_stage,
)
from .models import (
    ActorCritic,
    build_actor_critic,
    load_tokenizer,
    save_actor_critic,
    save_merged,
)
from .rewards import RewardSum
from .rollout import Rollout, generate, off_policy_settings

logger = logging.getLogger(__name__)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor, prompt_length: int):
    """Drop prompt columns that are padding in every row and response columns past the longest
    response, so a micro-batch costs only what its longest sequence needs.
    Returns ``(input_ids, attention_mask, response_mask, prompt_length)``."""
    p0 = int(attention_mask[:, :prompt_length].any(0).long().argmax())
    r = max(int(response_mask.sum(-1).max()), 1)
    end = prompt_length + r
    return (input_ids[:, p0:end], attention_mask[:, p0:end], response_mask[:, :r],
            prompt_length - p0)


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           p) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages for the policy (lambda ``p.lam``, or VAPO's length-adaptive lambda with
    ``p.lam_length_alpha``) and value targets for the critic (lambda ``p.critic_lam``, default
    the policy's): decoupled lambdas as in VC-PPO. ``[B, R]`` each; ``p`` is the ``ppo`` section.
    """
    lam = p.lam
    if p.lam_length_alpha is not None:
        lam = ops.length_adaptive_lam(mask.sum(-1), p.lam_length_alpha)  # (B,)
    advantages, returns = ops.compute_gae(rewards, values, mask, p.gamma, lam)
    if p.critic_lam is not None and (p.critic_lam != p.lam or p.lam_length_alpha is not None):
        _, returns = ops.compute_gae(rewards, values, mask, p.gamma, p.critic_lam)
    return advantages, returns


def metric_jumps(history: list[dict], metrics: dict, keys: tuple[str, ...],
                 factor: float = 10.0, window: int = 10, min_history: int = 3
                 ) -> list[tuple[str, float, float]]:
    """``(key, value, median)`` for each of ``keys`` whose value in ``metrics`` is more than
    ``factor`` times its median over the last ``window`` iterations of ``history`` (at least
    ``min_history`` finite values needed; non-finite values are ignored)."""
    out = []
    for key in keys:
        value = metrics.get(key)
        past = [m[key] for m in history[-window:]
                if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
        if value is None or not math.isfinite(value) or len(past) < min_history:
            continue
        median = sorted(past)[len(past) // 2]
        if median > 0 and value > factor * median:
            out.append((key, float(value), float(median)))
    return out


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate after ``step`` optimizer steps."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return f


def make_adamw(groups: list[dict], o, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the ``optim`` section's settings; the fused kernel where torch
    has one for the parameters' device and dtype (on CPU about 3x faster than the default
    per-parameter loop; the same update up to float rounding). Engines that shard or replace the
    optimizer (DeepSpeed, FSDP) get the default implementation."""
    kwargs = dict(lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps, weight_decay=o.weight_decay)
    params = [q for g in groups for q in g["params"]]
    devices = {q.device.type for q in params}
    if fused and params and devices <= {"cpu", "cuda"} and all(q.is_floating_point() for q in params):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # no fused kernel for this device/dtype
            pass
    return torch.optim.AdamW(groups, **kwargs)


class NonFiniteError(RuntimeError):
    """A NaN or infinite value appeared; the message names the iteration and the stage."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT: a checkpoint was written; ``signum`` and ``checkpoint`` say which/where."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name} after iteration "
                         f"{iteration}; checkpoint written to {checkpoint}")


# Keys that may differ between a run and its resumption (they do not change the trajectory).
RESUMABLE_KEYS = {"iterations", "resume_from", "overwrite", "save_every", "keep_last",
                  "report_to", "output_dir", "on_nonfinite"}
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "final")


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if key in RESUMABLE_KEYS:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key} (saved {va!r}, now {vb!r})")
    return out


def prepare_output_dir(cfg: Config) -> Path | None:
    """Check ``output_dir`` before anything loads; return the checkpoint to resume from, if any.

    A folder holding another run is refused unless ``resume_from`` continues it (with the same
    settings) or ``overwrite`` clears it: a new run never silently appends to or replaces old
    metrics and checkpoints.
    """
    import yaml

    out = Path(cfg.output_dir)
    if cfg.resume_from is not None:
        folder = ckpt.resolve_resume(cfg.resume_from, out)
        saved_cfg = folder / ckpt.STATE_DIR / "config.yaml"
        if saved_cfg.is_file() and not cfg.overwrite:
            diff = _diff(yaml.safe_load(saved_cfg.read_text()), cfg.to_dict())
            if diff:
                raise ConfigError(f"resume_from: {folder} was trained with other settings: "
                                  f"{'; '.join(diff)}. Use the same config (or overwrite=true "
                                  "to resume anyway)")
        return folder
    held = [n for n in RUN_FILES if (out / n).exists()] + [p.name for p in ckpt.list_checkpoints(out)]
    if held and not cfg.overwrite:
        raise ConfigError(f"output_dir: {str(out)!r} holds a run ({', '.join(held)}); resume it "
                          "with resume_from=latest, pick another output_dir, or set overwrite=true "
                          "to delete it")
    return None


def clear_run(out: Path) -> None:
    """Delete a previous run's files from ``out`` (``overwrite: true``); other files stay."""
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in list(out.glob("checkpoint-*")) + list(out.glob(".tmp-checkpoint-*")):
        shutil.rmtree(p, ignore_errors=True)


def check_lengths(cfg: Config, model_config, longest_prompt: int, vocab_size: int) -> None:
    """Fail early (instead of deep inside torch) when prompt + response exceed the model's
    context, or a stop token id is outside the vocabulary."""
    from .config import ConfigError

    context = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    need = longest_prompt + cfg.generation.max_new_tokens
    if context is not None and need > context:
        raise ConfigError(
            f"data.max_prompt_length / generation.max_new_tokens: the longest prompt "
            f"({longest_prompt} tokens) plus generation.max_new_tokens="
            f"{cfg.generation.max_new_tokens} is {need} tokens, more than the model's context of "
            f"{context} (max_position_embeddings); lower one of them")
    bad = [i for i in cfg.generation.stop_token_ids if not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(f"generation.stop_token_ids: {bad} outside the vocabulary "
                          f"[0, {vocab_size})")


class PPOTrainer:
    """Aligns ``cfg.model`` to ``cfg.reward`` with PPO. ``PPOTrainer(cfg).train()`` runs it all."""

    def __init__(self, cfg: Config, accelerator=None):
        config_from_dict(cfg.to_dict())  # re-check types and values changed after construction
        resume = prepare_output_dir(cfg)  # before any model loads
        self.cfg = cfg
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        if acc.is_main_process:
            logger.info("%d process(es), %s, device %s", acc.num_processes,
                        acc.distributed_type, acc.device)
        for setting in off_policy_settings(cfg.generation) if acc.is_main_process else []:
            logger.warning(
                "generation.%s reshapes the sampling distribution: responses are no longer "
                "samples of the policy whose log-probs PPO uses (off-policy), a known cause of "
                "negative or exploding KL. Use pure sampling unless you mean it.", setting)
        model = self._load(resume)
        self._prepare(model)
        self.output_dir = Path(cfg.output_dir)
        self.iteration = 0
        self.nonfinite_skips = 0
        self.history: list[dict] = []
        self._signal: int | None = None
        self._save_requested = False
        self._start(resume)

    def _load(self, resume: Path | None) -> ActorCritic:
        """Tokenizer, prompts, models and rewards; the checkpoint's weights when resuming."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.optim.separate_grad_clip and acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
            raise ConfigError("optim.separate_grad_clip: not supported under DeepSpeed or FSDP "
                              "(the engine clips the joint norm); set it to false")
        if (cfg.peft.enabled and cfg.model.critic == "separate"
                and cfg.model.critic_init == "reward" and zero_stage(acc) == 3):
            # The reward model would be partitioned inside the trained engine while its scoring
            # runs outside the engine's forward; not supported yet.
            raise ConfigError("model.critic_init: 'reward' with peft.enabled (a critic adapter on "
                              "the reward model) is not supported under DeepSpeed ZeRO-3 yet; use "
                              "ZeRO-2, DDP, or model.critic_init=policy")
        if cfg.peft.enabled and acc.distributed_type.name == "FSDP":
            # The reference pass runs the policy's own modules with the adapter off, outside the
            # FSDP root's forward; not supported yet.
            raise ConfigError("peft.enabled: LoRA under FSDP is not supported yet; use DDP or "
                              "DeepSpeed")
        self.tokenizer = load_tokenizer(cfg.model)
        prompts = load_prompts(cfg.data, self.tokenizer)
        self.sampler = PromptSampler(prompts, cfg.ppo.batch_size, cfg.seed, cfg.data.shuffle,
                                     acc.process_index, acc.num_processes)
        from accelerate.utils import set_seed

        self.rewards = RewardSum(cfg.reward, cfg.model, self.tokenizer)
        # critic_init: reward starts the critic from the first reward model (with LoRA: an
        # adapter on that very module, whose scoring then runs with the adapter off)
        rm = next(iter(self.rewards.model_sources()), None)
        set_seed(cfg.seed)  # fresh weights (LoRA, a new critic head) are the same on every run
        model, self.ref = build_actor_critic(
            cfg.model, cfg.peft, reward_model=rm.model if rm else None,
            reward_path=rm.path if rm else None)
        self._critic_scorer = rm.scorer if model.critic_on_reward_model else None
        if self._critic_scorer is not None:
            self._critic_scorer.adapters_off = True
        check_lengths(cfg, model.policy.config, max(len(x.input_ids) for x in prompts),
                      len(self.tokenizer))
        if resume is not None:
            if is_deepspeed(acc) or acc.distributed_type.name == "FSDP":
                raise ckpt.CheckpointError("resume_from: resuming under DeepSpeed or FSDP is not "
                                           "supported yet (sharded optimizer state)")
            ckpt.load_weights(model, resume)
        return model

    def _prepare(self, model: ActorCritic) -> None:
        """Optimizer, schedule and KL controller; hand the models to the engine."""
        cfg, acc, o, p = self.cfg, self.accelerator, self.cfg.optim, self.cfg.ppo
        groups = [{"params": model.policy_parameters(), "lr": o.lr},
                  {"params": model.critic_parameters(), "lr": o.critic_lr or o.lr}]
        self.optimizer = make_adamw(groups, o, fused=not is_deepspeed(acc)
                                    and acc.distributed_type.name != "FSDP")
        total_steps = cfg.iterations * p.ppo_epochs * p.num_minibatches
        # Not passed to accelerate.prepare: its wrapper steps num_processes times per call.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o.scheduler, o.warmup_steps, total_steps))
        if is_deepspeed(acc):
            match_partitioned_dtype(model)
        # Engines wrap the module (DDP, DeepSpeed, FSDP1) or shard it in place (FSDP2); the
        # object itself stays what `accelerate.unwrap_model` returns, without the DeepSpeed
        # import (~20 MB) that unwrap_model makes whenever DeepSpeed is installed.
        self._module = model
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.ref = prepare_frozen(acc, self.ref, cfg.model.shard_frozen_models)
        for source in self.rewards.model_sources():
            if source.scorer is not self._critic_scorer:  # that one is inside self.model
                source.scorer = prepare_frozen(acc, source.scorer, cfg.model.shard_frozen_models)
        self.kl_ctl = (ops.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
                       if p.adaptive_kl else ops.FixedKLController(p.kl_coef))
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)

    def _start(self, resume: Path | None) -> None:
        """Seed, restore the checkpoint's state when resuming, and (re)write the run's files."""
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if resume is None and cfg.overwrite:
                clear_run(self.output_dir)
        acc.wait_for_everyone()
        if cfg.report_to:
            acc.init_trackers("rlhf_ppo", config=_flat(cfg.to_dict()))
        # Seeded last, so loading (which may draw random numbers) does not shift the rollouts;
        # device_specific: each process samples different responses.
        set_seed(cfg.seed, device_specific=True)
        if resume is not None:  # after seeding: the saved RNG states replace the fresh ones
            state = ckpt.load_training_state(self, resume)
            self.nonfinite_skips = state.get("nonfinite_skips", 0)
            self.history = ckpt.load_metrics(resume)[: self.iteration]
            logger.info("resumed from %s at iteration %d", resume, self.iteration)
        if acc.is_main_process:
            save_config(cfg, self.output_dir / "config.yaml")
            with open(self.output_dir / "metrics.jsonl", "w") as f:
                for m in self.history:
                    f.write(json.dumps(ckpt.json_safe(m)) + "\n")
            _truncate_samples(self.output_dir / "samples.jsonl", self.iteration)

    @property
    def unwrapped(self) -> ActorCritic:
        """The ActorCritic without accelerate/DDP wrappers."""
        return self._module

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict]:
        """Run until ``cfg.iterations``; checkpoint every ``save_every`` iterations and at the end,
        and save the final policy to ``OUTPUT_DIR/final``. Returns the metrics history.

        SIGTERM / SIGINT finish the current iteration, write a checkpoint and raise
        :class:`TrainingInterrupted` (a second SIGINT interrupts at once). SIGUSR1 writes a
        checkpoint after the current iteration and goes on (a checkpoint on demand).
        """
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="ppo",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        handlers = self._install_signal_handlers()
        try:
            if cfg.eval_every and self.iteration == 0:
                self.log_samples()  # the starting point
            while self.iteration < cfg.iterations:
                metrics = self.step()
                self._warn_on_jumps(metrics)
                self.history.append(metrics)
                self.log(metrics)
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in
                                 ("score_mean", "kl", "kl_coef", "entropy", "clipfrac")})
                if cfg.eval_every and self.iteration % cfg.eval_every == 0:
                    self.log_samples()
                signum, save_now = self._agreed_requests()
                folder = self.output_dir / f"checkpoint-{self.iteration}"
                if signum:
                    self.save_checkpoint(folder)
                    raise TrainingInterrupted(signum, self.iteration, folder)
                periodic = cfg.save_every and self.iteration % cfg.save_every == 0
                if (periodic or save_now) and self.iteration < cfg.iterations:
                    self.save_checkpoint(folder)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            bar.close()
        self.save_checkpoint(self.output_dir / f"checkpoint-{self.iteration}")
        self.save(self.output_dir / "final")
        if cfg.report_to:
            acc.end_training()
        return self.history

    def _warn_on_jumps(self, metrics: dict) -> None:
        """Warn when the value loss or the gradient norm jumps by an order of magnitude, the
        first sign of a critic (and then a policy) going off the rails."""
        if not self.accelerator.is_main_process:
            return
        for key, value, median in metric_jumps(self.history, metrics, ("value_loss", "grad_norm")):
            logger.warning(
                "iteration %d: %s %.4g is %.0fx its median %.4g over the last iterations: the "
                "critic may be diverging (see docs/critic.md: a separate critic, "
                "ppo.value_backbone_grad, a lower optim.critic_lr or ppo.vf_coef)",
                metrics["iteration"], key, value, value / median, median)

    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, frame):
            if signum == getattr(signal, "SIGUSR1", None):
                self._save_requested = True
                logger.info("SIGUSR1 received: a checkpoint follows iteration %d",
                            self.iteration + 1)
                return
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self._signal = signum
            logger.warning("%s received: finishing iteration %d, then writing a checkpoint",
                           signal.Signals(signum).name, self.iteration + 1)

        signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1]
                                                     if hasattr(signal, "SIGUSR1") else [])
        return {s: signal.signal(s, on_signal) for s in signals}

    def _agreed_requests(self) -> tuple[int, bool]:
        """(stop signal any process received or 0, whether any process asked for a checkpoint):
        reduced so that all processes stop or save together."""
        flags = torch.tensor([float(self._signal or 0), float(self._save_requested)],
                             device=self.accelerator.device)
        signum, save = self.accelerator.reduce(flags, "max").tolist()
        self._save_requested = False
        return int(signum), bool(save)

    def save_checkpoint(self, folder: Path) -> None:
        """Write a resumable checkpoint (see :mod:`rlhf_ppo.checkpoint`)."""
        ckpt.save_checkpoint(self, folder)

    def step(self, rollout: Rollout | None = None) -> dict[str, float]:
        """One PPO iteration (number ``self.iteration + 1``): roll out, score, shape rewards,
        GAE, update. Returns its metrics (reduced over all processes).

        ``rollout``: use these responses instead of generating (tests, offline data).
        """
        cfg, p, acc = self.cfg, self.cfg.ppo, self.accelerator
        self.iteration += 1
        t0 = time.perf_counter()

        # step 1. generate the trajectories (each process its own prompts), recording the
        # policy's log-probs (and a shared head's values) while sampling when they are exact
        if rollout is None:
            ac = self.unwrapped
            values = ac.shared_values if ac.shares_backbone else None
            with generation_model(acc, self.model, self.unwrapped) as policy:
                rollout = generate(policy, self.sampler.next_batch(), self.tokenizer,
                                   cfg.generation, acc.device, record=self.record_logprobs,
                                   value_fn=values)
        t1 = time.perf_counter()

        # step 2. what generation did not record: log-probs and values under the rollout
        # policy; reference log-probs
        entropy = self.evaluate_rollout(rollout)
        # step 3. scores from the reward sources
        raw_scores, reward_metrics = self.rewards(rollout)
        all_raw = acc.gather(raw_scores.to(acc.device)).cpu()  # (B * processes,)
        all_stopped = acc.gather(rollout.stopped.to(acc.device)).cpu()
        # Nothing non-finite may reach the KL controller, the score statistics or the weights.
        mask = rollout.response_mask.float()
        for stage, tensors, detail in (
                ("rollout", (rollout.logprobs, rollout.ref_logprobs, rollout.values),
                 "policy / reference log-probs or values"),
                ("score", (raw_scores,), ", ".join(self.rewards.nonfinite_sources) or "scores")):
            if not self._finite(stage, detail, *tensors):
                return self._skipped_metrics(stage, all_raw, time.perf_counter() - t0)
        # Normalisation statistics come from every process's scores, so processes agree.
        self.rewards.update_moments(all_raw, all_stopped)
        rollout.scores = self.rewards.process(raw_scores, rollout.stopped, update_moments=False)
        t2 = time.perf_counter()

        # step 4. per-token rewards: -beta * KL_t, plus the score on the last valid token
        kl = ops.kl_penalty(rollout.logprobs, rollout.ref_logprobs, p.kl_estimator) * mask
        kl_coef = self.kl_ctl.value
        rollout.rewards = ops.shape_rewards(rollout.scores, kl, mask, kl_coef)
        kl_per_seq = kl.sum(-1)  # (B,)
        mean_kl = self.global_mean(kl_per_seq)
        self.kl_ctl.update(mean_kl, n_steps=len(rollout.prompts) * acc.num_processes)

        # step 5. advantages and returns (GAE, per sequence: local), advantages whitened over the
        # valid tokens of all processes (a global statistic: the result must not depend on how
        # the batch is split)
        advantages, rollout.returns = advantages_and_returns(rollout.rewards, rollout.values,
                                                             mask, p)
        if p.whiten_advantages:
            mean, var = self.global_moments(advantages, mask)
            advantages = ops.whiten(advantages, mask, mean, var)
        rollout.advantages = advantages

        # step 6. PPO epochs over shuffled minibatches
        # the returns' moments over every process's valid tokens (also step 7's metrics)
        ret_mean, ret_var = self.global_moments(rollout.returns, mask)
        value_loss_scale = 1.0 / max(ret_var, 1.0) if p.scale_value_loss else 1.0
        update_metrics = self.update(rollout, value_loss_scale)
        t3 = time.perf_counter()

        # step 7. metrics, as means over the whole (all-process) batch, in one reduction
        inputs = {"value_error": (rollout.returns - rollout.values, mask),
                  "entropy": (entropy, mask), "values": (rollout.values, mask),
                  "scores": (rollout.scores, None), "lengths": (mask.sum(-1), None),
                  **{("reward", k): (torch.as_tensor(v, dtype=torch.float32), None)
                     for k, v in reward_metrics.items()}}
        stats = dict(zip(inputs, self.global_stats(list(inputs.values()))))  # (mean, var, n)
        err_mean, err_var, err_n = stats["value_error"]
        err_ms = err_var * (err_n - 1) / max(err_n, 1.0) + err_mean * err_mean  # mean square
        n_tokens = stats["lengths"][0] * stats["lengths"][2]
        return {
            "iteration": self.iteration,
            "score_mean": all_raw.mean().item(),
            "score_std": all_raw.std().item() if len(all_raw) > 1 else 0.0,
            "score_processed_mean": stats["scores"][0],
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "entropy": stats["entropy"][0],
            **update_metrics,
            "explained_variance": 1.0 - err_var / max(ret_var, 1e-8),
            "value_mean": stats["values"][0],
            "return_mean": ret_mean,
            "value_error": math.sqrt(max(err_ms, 0.0)),
            "reward_kl_penalty": -kl_coef * mean_kl,
            "response_length": stats["lengths"][0],
            "stop_rate": all_stopped.float().mean().item(),
            "lr": self.scheduler.get_last_lr()[0],
            "nonfinite_skipped": float(update_metrics.pop("nonfinite_skipped")),
            "nonfinite_skips": self.nonfinite_skips,
            **{k: stats["reward", k][0] for k in reward_metrics},
            "time/rollout": t1 - t0,
            "time/score": t2 - t1,
            "time/update": t3 - t2,
            "time/iteration": t3 - t0,
            "tokens_per_second": n_tokens / max(t1 - t0, 1e-9),
        }

    # ------------------------------------------------------------------ non-finite values

    def _finite(self, stage: str, detail: str, *tensors: torch.Tensor) -> bool:
        """True when every value is finite on every process. Otherwise raise
        :class:`NonFiniteError` (``on_nonfinite: error``) or count a skip and return False."""
        bad = any(not torch.isfinite(t).all() for t in tensors if t is not None)
        flag = torch.tensor([float(bad)], device=self.accelerator.device)
        if not self.accelerator.reduce(flag, "max").item():
            return True
        if self.cfg.on_nonfinite == "error":
            raise NonFiniteError(
                f"iteration {self.iteration}, stage {stage}: non-finite values (NaN or inf) in "
                f"{detail}. The weights were not updated with them; set on_nonfinite=skip to skip "
                "such iterations instead")
        self.nonfinite_skips += 1
        logger.warning("iteration %d: non-finite values at stage %s (%s); update skipped",
                       self.iteration, stage, detail)
        return False

    def _skipped_metrics(self, stage: str, all_raw: torch.Tensor, seconds: float) -> dict:
        nan = float("nan")
        keys = ("score_std", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
                "explained_variance", "response_length", "time/score", "time/update")
        return {"iteration": self.iteration, "score_mean": all_raw.mean().item(),
                **dict.fromkeys(keys, nan), "kl_coef": self.kl_ctl.value, "ppo_steps": 0,
                "nonfinite_skipped": 1.0, "nonfinite_skips": self.nonfinite_skips,
                "nonfinite_stage": stage, "time/rollout": seconds, "time/iteration": seconds,
                "tokens_per_second": nan}

    # ------------------------------------------------------------------ cross-process statistics

    def global_stats(self, items: list[tuple[torch.Tensor, torch.Tensor | None]]
                     ) -> list[tuple[float, float, float]]:
        """``(mean, unbiased variance, count)`` of each ``(x, mask)`` over the valid elements
        (``mask`` None: every element) of every process, all in one reduction."""
        rows = []
        for x, mask in items:
            x = x.float()
            m = torch.ones_like(x) if mask is None else mask.to(x.device).float()
            rows.append(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]))
        t = torch.stack(rows).double().to(self.accelerator.device)
        out = []
        for total, total_sq, n in self.accelerator.reduce(t, "sum").tolist():
            mean = total / max(n, 1.0)
            var = (total_sq - n * mean * mean) / max(n - 1.0, 1.0)
            out.append((mean, max(var, 0.0), n))
        return out

    def global_mean(self, x: torch.Tensor) -> float:
        """Mean of ``x`` over every element of every process."""
        return self.global_stats([(x, None)])[0][0]

    def global_moments(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        """Mean and unbiased variance of ``x`` over the valid tokens of every process."""
        mean, var, _ = self.global_stats([(x, mask)])[0]
        return mean, var

    # ------------------------------------------------------------------ the phases

    @property
    def record_logprobs(self) -> bool:
        """Whether generation records the old log-probs (``ppo.old_logprobs``; ``auto``: when the
        sampling pass computes in the training forward's precision, float32 without autocast)."""
        mode = self.cfg.ppo.old_logprobs
        if mode != "auto" or self.cfg.generation.backend != "native":
            return mode == "generation"
        dtype = next(self.unwrapped.policy.parameters()).dtype
        return dtype == torch.float32 and self.accelerator.mixed_precision == "no"

    @torch.no_grad()
    def evaluate_rollout(self, rollout: Rollout) -> torch.Tensor:
        """Fill in inference batches what generation did not record: ``rollout.logprobs`` (and
        ``.entropy``) and ``.values``; and ``.ref_logprobs``. Returns the policy's per-token
        entropy ``(B, R)`` for the metrics."""
        model, device = self.unwrapped, self.accelerator.device
        temperature = self.cfg.generation.temperature
        need_policy = rollout.logprobs is None or rollout.entropy is None
        need_values = rollout.values is None
        model.eval()
        out = {"lp": [], "ent": [], "v": [], "ref": []}
        bs = self.cfg.ppo.inference_batch_size
        R = rollout.response_mask.shape[1]
        for s in range(0, len(rollout.prompts), bs):
            ids, am, rm, P = trim_padding(rollout.input_ids[s:s + bs],
                                          rollout.attention_mask[s:s + bs],
                                          rollout.response_mask[s:s + bs], rollout.prompt_length)
            ids, am = ids.to(device), am.to(device)
            got = {"ref": self.ref(ids, am, P, temperature)}
            if need_policy:
                got["lp"], got["ent"], got["v"] = model(ids, am, P, temperature, with_entropy=True)
            elif need_values:
                got["v"] = model.values(ids, am, P)
            pad = R - rm.shape[1]  # back to the rollout's full response width
            for k, x in got.items():
                out[k].append(torch.nn.functional.pad(x.float().cpu(), (0, pad)))
        model.train()
        mask = rollout.response_mask.float()
        if need_policy:
            rollout.logprobs = torch.cat(out["lp"]) * mask
            rollout.entropy = torch.cat(out["ent"]) * mask
        if need_policy or need_values:
            rollout.values = torch.cat(out["v"]) * mask
        rollout.ref_logprobs = torch.cat(out["ref"]) * mask
        return rollout.entropy

    def update(self, rollout: Rollout, value_loss_scale: float = 1.0) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches; gradient accumulation over
        micro-batches with losses normalised by the minibatch's token (or sequence) count, so the
        gradient does not depend on the micro-batch size. The value loss enters the objective
        times ``vf_coef * value_loss_scale`` (its metric is unscaled)."""
        cfg, p, acc = self.cfg, self.cfg.ppo, self.accelerator
        B = len(rollout.prompts)
        mini = B // p.num_minibatches
        critic_only = self.iteration <= p.critic_warmup
        # param_groups[0] is the policy's, [1] the critic's (value head, adapter or model)
        groups = [g["params"] for g in self.optimizer.param_groups]
        norm_keys = ("grad_norm", "grad_norm_policy", "grad_norm_critic")
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in (
            "policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac", "entropy_loss",
            *norm_keys)}
        steps, early_stop, nonfinite = 0, False, False
        for _epoch in range(p.ppo_epochs):
            order = torch.randperm(B, generator=self.shuffle_gen)
            for mb_idx in order.split(mini):
                mb = rollout.select(mb_idx)
                mb_mask = mb["response_mask"]
                # Denominators are global counts / processes: the engine averages gradients over
                # processes, so each process's loss must be its share of the global token mean.
                counts = torch.tensor([float(mb_mask.sum()), float(len(mb_idx))], device=acc.device)
                g_tokens, g_seqs = (acc.reduce(counts, "sum") / acc.num_processes).tolist()
                mb_tokens = torch.tensor(max(g_tokens, 1e-8))
                normalizer = mb_tokens if p.loss_aggregation == "token-mean" else g_seqs
                mb_stats = {k: torch.zeros((), device=acc.device) for k in stats
                            if k not in norm_keys}
                # accelerate counts micro-batches and syncs gradients (DDP no_sync, DeepSpeed
                # accumulation boundary) only on the last one of each minibatch.
                for rows in torch.arange(len(mb_idx)).split(p.micro_batch_size):
                    with acc.accumulate(self.model):
                        s = self._micro_step(mb, rows, rollout.prompt_length, normalizer,
                                             mb_tokens, critic_only, value_loss_scale)
                    for name, value in s.items():
                        mb_stats[name] += value
                if p.target_kl is not None:
                    approx_kl = acc.reduce(mb_stats["approx_kl"].clone(), "mean").item()
                    # Never take the step that overshoots (DeepSpeed has stepped already in
                    # backward: there the update ends after it).
                    if approx_kl > p.target_kl:
                        self.optimizer.zero_grad(set_to_none=True)
                        early_stop = True
                        break
                # The norm is computed (max_norm inf: no clipping) even without clipping: a
                # non-finite one means a NaN/inf loss or gradient, and that step is never taken.
                norms = clip_grad_norms(acc, groups, cfg.optim.max_grad_norm,
                                        cfg.optim.separate_grad_clip)
                grad_norm = norms[0]
                if grad_norm is not None and not self._finite(
                        "update", "the loss or its gradient", torch.as_tensor(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    nonfinite = True
                    break
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                steps += 1
                for name, value in mb_stats.items():
                    stats[name].append(value.detach())
                for key, norm in zip(norm_keys, norms):
                    stats[key].append(torch.as_tensor(
                        float("nan") if norm is None else norm, dtype=torch.float32,
                        device=acc.device))
            if early_stop or nonfinite:
                break
        # Each process holds its share of each minibatch mean; the mean over processes is the
        # global value (one reduction for all of them, after the loop: no syncs inside it).
        keys = [k for k in stats if stats[k]]
        out = {k: float("nan") for k in stats}
        if keys:
            local = torch.stack([torch.stack(stats[k]).mean() for k in keys])
            reduced = acc.reduce(local, "mean").tolist()
            out.update(dict(zip(keys, reduced)))
        out["ppo_steps"] = steps
        out["early_stopped"] = float(early_stop)
        out["nonfinite_skipped"] = nonfinite
        return out

    def _micro_step(self, mb: dict[str, torch.Tensor], rows: torch.Tensor, prompt_length: int,
                    normalizer, mb_tokens: torch.Tensor, critic_only: bool,
                    value_loss_scale: float = 1.0
                    ) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch. Returns its loss terms (normalised, so they
        sum to the minibatch's) and its token-weighted share of the minibatch's token means."""
        p, acc = self.cfg.ppo, self.accelerator
        ids, am, mask, P = trim_padding(mb["input_ids"][rows], mb["attention_mask"][rows],
                                        mb["response_mask"][rows], prompt_length)
        r = mask.shape[1]
        dev = acc.device
        ids, am, mask = ids.to(dev), am.to(dev), mask.to(dev).float()
        old_lp, old_v = mb["logprobs"][rows, :r].to(dev), mb["values"][rows, :r].to(dev)
        adv, ret = mb["advantages"][rows, :r].to(dev), mb["returns"][rows, :r].to(dev)
        normalizer = torch.as_tensor(normalizer, device=dev)
        logprobs, entropy, values = self.model(
            ids, am, P, self.cfg.generation.temperature, with_entropy=p.entropy_coef > 0,
            backbone_value_grad=0.0 if critic_only else p.value_backbone_grad)
        pg_loss, pg_stats = ops.policy_loss(logprobs, old_lp, adv, mask, p.clip_range,
                                            p.loss_aggregation, normalizer)
        vf_loss, vf_stats = ops.value_loss(values, old_v, ret, mask, p.clip_range_value,
                                           p.loss_aggregation, normalizer)
        ent_loss = ops.aggregate_loss(entropy, mask, p.loss_aggregation, normalizer)
        loss = p.vf_coef * value_loss_scale * vf_loss
        if not critic_only:
            loss = loss + pg_loss - p.entropy_coef * ent_loss
        # accelerate (and DeepSpeed) divide by the accumulation steps; our normaliser already
        # makes the micro-batch losses sum to the minibatch loss, so undo that division.
        acc.backward(loss * acc.gradient_accumulation_steps)
        weight = mask.sum() / mb_tokens.to(dev)  # stats are token means over the minibatch
        return {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                "entropy_loss": ent_loss.detach(),
                "clipfrac": pg_stats["clipfrac"] * weight,
                "approx_kl": pg_stats["approx_kl"] * weight,
                "vf_clipfrac": vf_stats["vf_clipfrac"] * weight}

    # ------------------------------------------------------------------ output

    def log(self, metrics: dict[str, float]) -> None:
        """Append to ``metrics.jsonl`` (main process) and send to the trackers."""
        acc = self.accelerator
        if acc.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(ckpt.json_safe(metrics)) + "\n")
        if self.cfg.report_to:
            acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))
                     and k != "iteration"}, step=self.iteration)

    def log_samples(self) -> list[dict]:
        """Greedy responses to the first ``eval_prompts`` prompts with their scores, logged and
        appended to ``OUTPUT_DIR/samples.jsonl`` (a fixed set, so a user sees the generations
        move). The random state is left untouched: a run with and without samples is the same."""
        cfg, acc = self.cfg, self.accelerator
        greedy = dataclasses.replace(cfg.generation, temperature=1.0, top_k=1, top_p=1.0)
        devices = [acc.device.index or 0] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with generation_model(acc, self.model, self.unwrapped) as policy:  # every process: engines gather
                r = generate(policy, self.sampler.prompts[: cfg.eval_prompts], self.tokenizer,
                             greedy, acc.device)
            scores, _ = self.rewards(r)
        rows = [{"iteration": self.iteration, "prompt": p.text, "response": text,
                 "score": float(score), "stopped": bool(stop)}
                for p, text, score, stop in zip(r.prompts, r.response_texts, scores.tolist(),
                                                      r.stopped.tolist())]
        if acc.is_main_process:
            with open(self.output_dir / "samples.jsonl", "a") as f:
                for row in rows:
                    f.write(json.dumps(ckpt.json_safe(row)) + "\n")
            for row in rows:
                logger.info("iteration %d sample (score %.3f): %r -> %r", self.iteration,
                            row["score"], row["prompt"], row["response"])
        return rows

    def save(self, folder: Path) -> None:
        """``save_pretrained`` the policy + tokenizer (and value head / critic) into ``folder``.
        Every process takes part (sharded weights are gathered); the main process writes."""
        acc = self.accelerator
        folder = Path(folder)
        acc.wait_for_everyone()
        state = full_state_dict(acc, self.model)
        if acc.is_main_process:
            tmp = folder.parent / f".tmp-{folder.name}"  # written whole, then renamed into place
            shutil.rmtree(tmp, ignore_errors=True)
            save_actor_critic(self.unwrapped, self.tokenizer, tmp, state)
            if self.cfg.peft.enabled and self.cfg.peft.save_merged:
                save_merged(self.unwrapped, self.tokenizer, tmp / "merged")
            save_config(self.cfg, tmp / "rlhf_ppo_config.yaml")
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
            logger.info("saved the policy to %s", folder)
        acc.wait_for_everyone()


def _truncate_samples(path: Path, iteration: int) -> None:
    """Drop ``samples.jsonl`` rows logged after ``iteration`` (a run resumed from an earlier
    checkpoint logs them again)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["iteration"] <= iteration]
    path.write_text("".join(row + "\n" for row in rows))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
