"""``PPOTrainer``: build, step, update, train. ``step`` reads as the algorithm's numbered steps;
the parts it runs on are built in ``components.py``, the advantage estimators are entries of
``estimators.py``, the math lives in ``ops.py``, the batch from scoring to the update in
``experience.py``, the update in ``update.py``, the run folder in ``runs.py``, the checkpoint
format in ``checkpoint.py``, cross-process statistics in ``distributed.py``.

Shape legend: ``B`` rollouts per process, ``R`` response length.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import ops, trackers
from .agent_rollout import sample_rollout
from .alarms import AlarmLog, response_metrics
from .components import build_components, policy_folder
from .config import Config, config_from_dict, upgrade_quietly
from .distributed import (
    all_finite,
    check_engine_support,
    generation_model,
    global_mean,
    make_ppo_accelerator,
    ppo_batch_per_process,
    set_threads,
)
from .errors import NonFiniteError, TrainingInterrupted
from .experience import Experience, make_targets, records_logprobs, rollout_outputs
from .metrics import IterationRecord, agent_metrics, greedy_samples, iteration_metrics, skipped_metrics
from .models import (
    save_merged,
)
from .packing import attention_weight
from .paths import run_config_yaml
from .progress import ensure_logging, plural, progress_bar
from .rollout import Rollout, dynamic_sampling, warn_off_policy
from .runs import (
    PPO_RUN_FILES,
    RunLog,
    SignalRequests,
    flat_config,
    init_run_folder,
    prepare_output_dir,
)
from .train_report import write_at_end_of_training
from .update import Learner, UpdateSettings, ppo_update

logger = logging.getLogger(__name__)


def start_lines(t: PPOTrainer) -> list[str]:
    """What a run is about to do, for the log: data, rewards, models with their parameter counts,
    the batch arithmetic and where the outputs go."""
    cfg, p, acc = t.cfg, t.cfg.ppo, t.accelerator
    count = lambda params: sum(q.numel() for q in params)
    ac = t.unwrapped
    trainable = count(q for q in ac.parameters() if q.requires_grad)
    mini = t.batch_size // p.num_minibatches
    micro = min(p.forward.micro_batch_size, mini)
    steps = p.ppo_epochs * p.num_minibatches
    sources = ", ".join(f"{w:g} x {s.name}" for w, s in t.rewards.sources)
    return [
        f"prompts: {len(t.sampler.prompts)} from {cfg.data.path} (column {cfg.data.prompt_column!r})",
        f"reward: {sources}",
        f"policy: {cfg.model.name_or_path} ({count(ac.policy.parameters()) / 1e6:.2f}M parameters"
        + (", LoRA" if cfg.peft.enabled else "") + "); critic: "
        + (f"none ({p.advantage_estimator}, {plural(p.samples_per_prompt, 'sample')} per prompt)"
           if not ac.has_critic else cfg.model.critic
           + (f" from the {cfg.model.critic_init}" if cfg.model.critic == "separate"
              else " value head"))
        + "; reference: " + ((cfg.model.ref_name_or_path or "the initial policy") if t.ref is not None
                             else "none, nothing reads it (no KL penalty, controller or loss)"),
        f"trained parameters: {trainable / 1e6:.2f}M of {count(ac.parameters()) / 1e6:.2f}M",
        f"batch: {p.batch_size} rollouts per iteration = "
        f"{plural(acc.num_processes, 'process', 'processes')} x {t.batch_size}; "
        f"{plural(p.num_minibatches, 'minibatch', 'minibatches')} of {mini} per process in "
        "micro-batches of " + (plural(micro, "sequence") if p.forward.micro_batch_tokens is None
                               else f"at most {plural(p.forward.micro_batch_tokens, 'token')}")
        + f"; {plural(p.ppo_epochs, 'epoch')}: {plural(steps, 'optimizer step')} per iteration, "
        f"{steps * cfg.iterations} in {plural(cfg.iterations, 'iteration')}",
        "forward passes: " + ("packed, without padding" if ac.pack_sequences else "padded"
                              + (" (the model's packing check failed)" if p.forward.packing else "")),
        f"device: {acc.device} ({acc.distributed_type.name}), torch threads "
        f"{torch.get_num_threads()}",
        f"output: {t.output_dir}/ (metrics.jsonl, checkpoint-N/, final/)",
    ]


class PPOTrainer:
    """Aligns ``cfg.model`` to ``cfg.reward`` with PPO. ``PPOTrainer(cfg).train()`` runs it all."""

    def __init__(self, cfg: Config, accelerator=None):
        ensure_logging()  # a script's PPOTrainer logs like `rlhf-ppo train`
        config_from_dict(cfg.to_dict())  # re-check types and values changed after construction
        resume = prepare_output_dir(cfg.output_dir, cfg.overwrite, PPO_RUN_FILES, cfg.resume_from,
                                    cfg.to_dict(), upgrade_quietly)  # before any model loads
        self.cfg = cfg
        self.accelerator = acc = accelerator or make_ppo_accelerator(cfg)
        set_threads(cfg.threads)
        self.batch_size = ppo_batch_per_process(cfg, acc.num_processes)  # B
        if acc.is_main_process:
            warn_off_policy(cfg.generation)
        check_engine_support(cfg, acc)
        c = build_components(cfg, acc, self.batch_size, resume)
        self.tokenizer, self.sampler, self.rewards = c.tokenizer, c.sampler, c.rewards
        self.unwrapped, self.model, self.ref = c.unwrapped, c.model, c.ref
        self.optimizer, self.scheduler, self.agent = c.optimizer, c.scheduler, c.agent
        self._prepare_algorithm()
        self.output_dir = Path(cfg.output_dir)
        self.run_log = RunLog(self.output_dir, acc.is_main_process, acc if cfg.report_to else None)
        self.iteration, self.nonfinite_skips = 0, 0
        self.history: list[dict] = []  # every iteration's metrics
        self._start(resume)
        self.alarms = AlarmLog(cfg.alarms, self.output_dir, acc.is_main_process, self.iteration)
        if acc.is_main_process:
            logger.info("%s", "\n  ".join(["run:", *start_lines(self)]))

    # ------------------------------------------------------------------ build

    def _prepare_algorithm(self) -> None:
        """The KL controller, the minibatch shuffle and the update's settings."""
        cfg, p, model = self.cfg, self.cfg.ppo, self.unwrapped
        self.kl_ctl = (ops.AdaptiveKLController(p.kl.coef, p.kl.adaptive_target, p.kl.horizon)
                       if p.kl.adaptive else ops.FixedKLController(p.kl.coef))
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        self.update_settings = UpdateSettings(
            p, cfg.optim, cfg.generation.temperature, with_critic=model.has_critic,
            max_response_length=cfg.response_budget,
            packed=attention_weight(model.policy.config) if model.pack_sequences else None)
        self._record_logprobs = p.loss.tis_cap is not None or records_logprobs(  # log pi_old
            p.forward.old_logprobs, cfg.generation.backend, next(model.policy.parameters()).dtype,
            self.accelerator.mixed_precision)

    def _start(self, resume: Path | None) -> None:
        """Seed, restore the checkpoint's state when resuming, and (re)write the run's files."""
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        init_run_folder(self.output_dir, cfg, PPO_RUN_FILES + trackers.TRACKER_FILES,
                        resume is None and cfg.overwrite, acc.is_main_process, acc.wait_for_everyone)
        trackers.start(acc, cfg.report_to, flat_config(cfg.to_dict()), self.output_dir, resume)
        # Seeded last, so loading (which may draw random numbers) does not shift the rollouts;
        # device_specific: each process samples different responses.
        set_seed(cfg.seed, device_specific=True)
        if resume is not None:  # after seeding: the saved RNG states replace the fresh ones
            self.load_state_dict(ckpt.read_training_state(resume, acc.process_index), resume)
            self.history = ckpt.load_metrics(resume)[: self.iteration]
            logger.info("resumed from %s at iteration %d", resume, self.iteration)
        self.run_log.start(self.history, self.iteration)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything besides weights, optimizer, schedule and RNG that the next iteration
        depends on (JSON-serialisable; ``trainer_state.json`` of a checkpoint)."""
        return {"iteration": self.iteration, **self.kl_ctl.state_dict(),
                "data": self.sampler.state_dict(), **self.rewards.state_dict(),
                "num_processes": self.accelerator.num_processes,
                "nonfinite_skips": self.nonfinite_skips}

    def load_state_dict(self, state: dict, folder: Path | None = None) -> None:
        """Restore a checkpoint's state (:func:`checkpoint.read_training_state`'s dict)."""
        t = state["trainer"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["rng"] is not None:
            ckpt.set_rng_state(state["rng"])
            self.shuffle_gen.set_state(state["rng"]["shuffle"])
        else:  # more processes than the run that saved: fresh, distinct streams for the new ones
            logger.warning("%s has no RNG state for process %d; seeding it afresh", folder,
                           self.accelerator.process_index)
        self.iteration = t["iteration"]
        self.kl_ctl.load_state_dict(t)
        self.sampler.load_state_dict(t["data"])
        self.rewards.load_state_dict(t)
        self.nonfinite_skips = t.get("nonfinite_skips", 0)

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict]:
        """Run until ``cfg.iterations``; checkpoint every ``save_every`` iterations and at the end,
        and save the final policy to ``OUTPUT_DIR/final``. Returns the metrics history.

        SIGTERM / SIGINT finish the current iteration, write a checkpoint and raise
        :class:`TrainingInterrupted` (a second SIGINT interrupts at once). SIGUSR1 writes a
        checkpoint after the current iteration and goes on (a checkpoint on demand).
        """
        from tqdm.contrib.logging import logging_redirect_tqdm

        acc, cfg = self.accelerator, self.cfg
        # a bar on a terminal; redirected, one log line per iteration instead of `\r` lines
        bar = progress_bar(cfg.iterations, "ppo", acc.is_main_process, self.iteration, every=1)
        # log lines go through tqdm.write, so they do not glue onto the progress bar
        in_step = False  # from a step's start until its stop/save requests are read
        with SignalRequests(lambda: self.iteration + (not in_step)) as requests, \
                logging_redirect_tqdm():
            try:
                if cfg.sample_every and self.iteration == 0:
                    self.log_samples()  # the starting point
                while self.iteration < cfg.iterations:
                    in_step = True
                    metrics = self.step()
                    if cfg.sample_every and self.iteration % cfg.sample_every == 0:
                        rows = self.log_samples()  # their mean score: a signal the alarms watch
                        metrics["samples/score_mean"] = sum(r["score"] for r in rows) / len(rows)
                    metrics.update(self.alarms.check(self.history, metrics))  # alarms.jsonl too
                    self.history.append(metrics)
                    self.run_log.metrics(metrics, step=self.iteration)
                    bar.update(1)
                    bar.set_postfix({k: f"{metrics[k]:.3g}" for k in
                                     ("score_mean", "kl", "kl_coef", "entropy", "clipfrac")})
                    signum, save_now = requests.agreed(acc)
                    in_step = False
                    folder = self.output_dir / f"checkpoint-{self.iteration}"
                    if signum:
                        self.save_checkpoint(folder)
                        raise TrainingInterrupted(signum, self.iteration, folder)
                    periodic = cfg.save_every and self.iteration % cfg.save_every == 0
                    if (periodic or save_now) and self.iteration < cfg.iterations:
                        self.save_checkpoint(folder)
            finally:
                bar.close()
        self.save_checkpoint(self.output_dir / f"checkpoint-{self.iteration}")
        self.save(self.output_dir / "final")
        if cfg.report_to:
            acc.end_training()
        if acc.is_main_process:  # a failure is logged, never raised: the run is saved
            write_at_end_of_training(self.output_dir)
        return self.history

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
            rollout = self.sample(self.sampler.next_batch())
        t1 = time.perf_counter()

        # step 2. scores from the reward sources (dynamic sampling: groups without a signal are
        # replaced by new ones)
        rollout, raw_scores, reward_metrics = self.score(rollout)
        # step 3. what sampling did not record: log-probs and values under the rollout policy;
        # reference log-probs (when a KL setting reads them)
        out = self.rollout_outputs(rollout)
        all_raw = acc.gather(raw_scores.to(acc.device)).cpu()  # (B * processes,)
        all_stopped = acc.gather(rollout.stopped.to(acc.device)).cpu()
        # Nothing non-finite may reach the KL controller, the score statistics or the weights.
        for stage, tensors, detail in (
                ("rollout", (out.logprobs, out.ref_logprobs, out.values),  # ref: None without one
                 "policy / reference log-probs or values"),
                ("score", (raw_scores,), ", ".join(self.rewards.nonfinite_sources) or "scores")):
            if not self._finite(stage, detail, *tensors):
                return skipped_metrics(self.iteration, stage, all_raw, self.kl_ctl.value,
                                       self.nonfinite_skips, time.perf_counter() - t0)
        # Normalisation statistics come from every process's scores, so processes agree.
        self.rewards.update_moments(all_raw, all_stopped)
        scores = self.rewards.process(raw_scores, rollout.stopped, update_moments=False)
        if p.loss.overlong_buffer is not None:  # DAPO's soft overlong punishment
            # the response region's length (model turns and observations) against its limit
            region = rollout.attention_mask[:, rollout.prompt_length:].sum(-1)
            scores = scores + ops.overlong_penalty(region, cfg.response_budget,
                                                   p.loss.overlong_buffer, p.loss.overlong_penalty)
        t2 = time.perf_counter()

        # steps 4-5. per-token rewards (-beta * KL_t, plus the score or the score minus its
        # group's baseline on the last valid token), advantages and returns of the estimator,
        # whitened over every process's tokens when the estimator does
        kl_coef = self.kl_ctl.value
        targets = make_targets(acc, p, rollout, out, scores, kl_coef)
        # summed KL per sequence; NaN without a reference (the controller is then fixed at 0)
        mean_kl = float("nan") if targets.kl is None else global_mean(acc, targets.kl.sum(-1))
        self.kl_ctl.update(mean_kl, n_steps=len(rollout.prompts) * acc.num_processes)

        # step 6. PPO epochs over shuffled minibatches; the value loss is divided by the returns'
        # variance (over every process's valid tokens) when it exceeds 1
        ret_var = targets.returns_moments[1]
        update_metrics = self.update(targets.batch, 1.0 / max(ret_var, 1.0)
                                     if p.critic.scale_value_loss else 1.0)
        t3 = time.perf_counter()

        # step 7. metrics, as means over the whole (all-process) batch, in one reduction
        record = IterationRecord(
            self.iteration, all_raw, all_stopped, scores, rollout.response_mask.float(), out.entropy,
            out.values, targets.batch.returns, targets.returns_moments, mean_kl, kl_coef,
            {**reward_metrics, **targets.metrics, **agent_metrics(rollout),
             **response_metrics(rollout)}, self.unwrapped.has_critic)
        metrics = iteration_metrics(acc, record, update_metrics, self.scheduler.get_last_lr()[0],
                                    self.nonfinite_skips, [t0, t1, t2, t3])
        # TRL-style functions' log_metric values: this process's, after the reduction over
        # processes (a function may log on one process and not another)
        return {**metrics, **self.rewards.trl.pop_metrics()}

    def score(self, rollout: Rollout) -> tuple[Rollout, torch.Tensor, dict]:
        """Step 2: ``(rollout, raw scores (B,), reward metrics)``; ``ppo.dynamic_sampling`` replaces
        groups of equal scores by new ones (:func:`dynamic_sampling`, rounds agreed by processes)."""
        acc, p = self.accelerator, self.cfg.ppo
        trl = self.rewards.trl  # what TRL-style reward functions get besides the rollout
        trl.state.global_step, trl.state.max_steps, trl.logged = self.iteration - 1, self.cfg.iterations, {}
        raw_scores, reward_metrics = self.rewards(rollout)
        if p.dynamic_sampling:
            rollout, raw_scores, dyn = dynamic_sampling(
                rollout, raw_scores, p.samples_per_prompt,
                lambda: (r := self.sample(self.sampler.next_batch()), self.rewards(r)[0]),
                lambda short: bool(acc.reduce(torch.tensor([float(short)], device=acc.device),
                                              "max").item()),
                self.tokenizer.pad_token_id)
            reward_metrics.update(dyn)
        return rollout, raw_scores, reward_metrics

    def sample(self, prompts: list) -> Rollout:
        """Step 1: ``samples_per_prompt`` responses to each prompt (a group's rows in a row)."""
        k, ac = self.cfg.ppo.samples_per_prompt, self.unwrapped
        with generation_model(self.accelerator, self.model, ac) as policy:  # agent: multi-turn
            return sample_rollout(policy, [q for q in prompts for _ in range(k)], self.tokenizer,
                                  self.cfg.generation, self.accelerator.device, self.agent,
                                  record=self._record_logprobs,
                                  value_fn=ac.shared_values if ac.shares_backbone else None)

    def rollout_outputs(self, rollout: Rollout):
        """The no-grad pass of step 3 (:func:`experience.rollout_outputs`)."""
        return rollout_outputs(self.unwrapped, self.ref, rollout, self.cfg.generation.temperature,
                               self.cfg.ppo.forward.inference_batch_size, self.accelerator.device,
                               recompute=self.cfg.ppo.loss.tis_cap is not None)

    # ------------------------------------------------------------------ update

    def update(self, batch: Experience, value_loss_scale: float = 1.0) -> dict[str, float]:
        """Step 6: the PPO epochs over ``batch`` (:func:`update.ppo_update`); the first
        ``ppo.critic.warmup`` iterations train the critic alone."""
        return ppo_update(Learner(self.accelerator, self.model, self.optimizer, self.scheduler),
                          batch, self.update_settings, self.shuffle_gen,
                          critic_only=self.iteration <= self.cfg.ppo.critic.warmup,
                          value_loss_scale=value_loss_scale,
                          finite=lambda norm: self._finite("update", "the loss or its gradient", norm))

    def _finite(self, stage: str, detail: str, *tensors: torch.Tensor) -> bool:
        """True when every value is finite on every process. Otherwise raise
        :class:`NonFiniteError` (``on_nonfinite: error``) or count a skip and return False."""
        if all_finite(self.accelerator, *tensors):
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

    # ------------------------------------------------------------------ output

    def log_samples(self) -> list[dict]:
        """Greedy responses to the first ``sample_prompts`` prompts, scored, logged and appended
        to ``OUTPUT_DIR/samples.jsonl`` (:func:`metrics.greedy_samples`)."""
        with generation_model(self.accelerator, self.model, self.unwrapped) as policy:  # engines gather
            rows = greedy_samples(policy, self.sampler.prompts[: self.cfg.sample_prompts],
                                  self.tokenizer, self.cfg.generation, self.accelerator.device,
                                  self.rewards, self.iteration, self.agent)
        self.run_log.samples(rows)
        return rows

    def save_checkpoint(self, folder: Path) -> None:
        """Write a resumable checkpoint (the format: :mod:`rlhf_ppo.checkpoint`); every process
        takes part (sharded weights are gathered, each process saves its RNG state)."""
        acc = self.accelerator
        # Sharded engines keep per-process optimizer shards: not saved (resume refuses them).
        sharded = acc.distributed_type.name in ("DEEPSPEED", "FSDP")
        with policy_folder(self.accelerator, self.model, self.unwrapped, self.tokenizer, folder,
                           ckpt.COMPLETE) as tmp:
            ckpt.write_training_state(
                tmp, rank=acc.process_index, is_main=acc.is_main_process,
                rng={**ckpt.rng_state(), "shuffle": self.shuffle_gen.get_state()},
                trainer=self.state_dict(),
                optimizer=None if sharded else self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), config_yaml=run_config_yaml(self.cfg),
                history=self.history)
        if acc.is_main_process:
            ckpt.prune(folder.parent, self.cfg.keep_last)
            logger.info("checkpoint written: %s", folder)

    def save(self, folder: Path) -> None:
        """``save_pretrained`` the policy + tokenizer (and value head / critic) into ``folder``,
        with the run's config (and the merged LoRA policy, ``peft.save_merged``)."""
        with policy_folder(self.accelerator, self.model, self.unwrapped, self.tokenizer,
                           folder) as tmp:
            if self.accelerator.is_main_process:
                if self.cfg.peft.enabled and self.cfg.peft.save_merged:
                    save_merged(self.unwrapped, self.tokenizer, tmp / "merged")
                (tmp / "rlhf_ppo_config.yaml").write_text(run_config_yaml(self.cfg))
        if self.accelerator.is_main_process:
            logger.info("saved the policy to %s", folder)
