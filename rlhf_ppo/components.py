"""What a PPO run is built from, before its first iteration: the tokenizer, the prompt sampler,
the reward sources, the policy / critic / reference models (packed where their attention allows),
the optimizer and its schedule, all handed to the engine, and the agent (tools or environment)
of a multi-turn run. :class:`~rlhf_ppo.trainer.PPOTrainer`
builds one :class:`Components` and runs the algorithm on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import estimators
from .agent_rollout import Agent, build_agent
from .config import Config
from .data import PromptSampler, load_prompts
from .distributed import full_state_dict, is_deepspeed, match_partitioned_dtype, prepare_frozen
from .loading import load_tokenizer
from .models import (
    ActorCritic,
    ReferenceModel,
    build_ppo_models,
    check_lengths,
    load_checkpoint_weights,
    save_actor_critic,
)
from .optim import make_optimizer
from .packing import check_packing
from .rewards import RewardSum


@dataclass
class Components:
    """A PPO run's parts, ready to train (``model``, ``ref`` and the reward models prepared by the
    engine)."""

    tokenizer: Any
    """the policy's tokenizer"""
    sampler: PromptSampler
    """this process's prompts, ``batch_size / samples_per_prompt`` per iteration"""
    rewards: RewardSum
    """the reward sources and score processing"""
    unwrapped: ActorCritic
    """the policy and critic themselves (what ``accelerate.unwrap_model`` returns)"""
    model: torch.nn.Module
    """``unwrapped`` as the engine prepared it (DDP / DeepSpeed / FSDP wrapper, or itself)"""
    ref: torch.nn.Module | None
    """the frozen reference model (as the engine placed or sharded it); None when no KL setting reads it
    (:meth:`~rlhf_ppo.ppo_config.KLConfig.reads_reference` false): neither loaded nor run"""
    optimizer: torch.optim.Optimizer
    """AdamW over the policy's and the critic's parameters (two groups)"""
    scheduler: Any
    """the learning-rate schedule over every optimizer step of the run"""
    agent: Agent | None = None
    """the tools or environment that answer a multi-turn rollout (the ``agent`` section); None:
    single-turn"""


def build_components(cfg: Config, acc, batch_size: int, resume: Path | None) -> Components:
    """Load and prepare everything in the order the run's random numbers depend on: tokenizer,
    prompts, rewards; then, seeded, the models (the checkpoint's weights when ``resume``); then
    the optimizer and the engine. ``batch_size``: responses per process per iteration."""
    from accelerate.utils import set_seed  # accelerate's top level costs ~1 s at import

    tokenizer = load_tokenizer(cfg.model)
    agent = build_agent(cfg.agent, tokenizer) if cfg.agent.enabled else None
    prompts = load_prompts(cfg.data, tokenizer, agent.schemas if agent else None)  # chat: with tools
    k = cfg.ppo.samples_per_prompt  # each prompt is sampled k times (a group)
    sampler = PromptSampler(prompts, batch_size // k, cfg.seed, cfg.data.shuffle,
                            acc.process_index, acc.num_processes)
    rewards = RewardSum(cfg.reward, cfg.model, tokenizer)
    set_seed(cfg.seed)  # fresh weights (LoRA, a new critic head) are the same on every run
    model, ref, critic_scorer = build_ppo_models(
        cfg.model, cfg.peft, rewards.critic_start_model(),
        with_critic=estimators.get(cfg.ppo.advantage_estimator).critic,
        with_reference=cfg.ppo.kl.reads_reference())
    check_lengths(cfg, model.policy.config, max(len(x.input_ids) for x in prompts), len(tokenizer))
    if cfg.ppo.forward.packing:
        enable_packing(cfg, model, ref, rewards)
    if resume is not None:
        load_checkpoint_weights(model, resume)
    prepared, optimizer, scheduler = prepare_engine(cfg, acc, model)
    if ref is not None:
        ref = prepare_frozen(acc, ref, cfg.model.shard_frozen_models)
    for source in rewards.model_sources():
        if source.scorer is not critic_scorer:  # that one is inside the prepared model
            source.scorer = prepare_frozen(acc, source.scorer, cfg.model.shard_frozen_models)
    return Components(tokenizer, sampler, rewards, model, prepared, ref, optimizer, scheduler, agent)


def enable_packing(cfg: Config, model: ActorCritic, ref: ReferenceModel | None,
                   rewards: RewardSum) -> None:
    """``ppo.forward.packing``: padding-free passes for every model whose packed pass gives its
    padded pass's numbers (:func:`packing.check_packing`; the others stay padded, with a
    warning)."""
    model.pack_sequences = check_packing(model.policy, "model.name_or_path") and (
        model.critic is None or check_packing(model.critic, "model.critic_name_or_path"))
    if ref is not None:
        ref.pack_sequences = (model.pack_sequences if ref.lm is model.policy
                              else check_packing(ref.lm, "model.ref_name_or_path"
                                                 if cfg.model.ref_name_or_path else "reference"))
    for source in rewards.model_sources():
        source.scorer.pack_sequences = check_packing(source.model, f"{source.key}.model")


def prepare_engine(cfg: Config, acc, model: ActorCritic):
    """AdamW (the policy's and the critic's learning rates) and its schedule over every optimizer
    step of the run; the model and optimizer handed to the engine. Returns ``(prepared model,
    optimizer, scheduler)``."""
    o, p = cfg.optim, cfg.ppo
    groups = [{"params": model.policy_parameters(), "lr": o.lr}]
    if model.has_critic:
        groups.append({"params": model.critic_parameters(), "lr": o.critic_lr or o.lr})
    optimizer, scheduler = make_optimizer(
        groups, o, cfg.iterations * p.ppo_epochs * p.num_minibatches,
        fused=not is_deepspeed(acc) and acc.distributed_type.name != "FSDP")
    if is_deepspeed(acc):
        match_partitioned_dtype(model)
    # Engines wrap the module (DDP, DeepSpeed, FSDP1) or shard it in place (FSDP2); the object
    # itself stays what `accelerate.unwrap_model` returns, without the DeepSpeed import (~20 MB)
    # that unwrap_model makes whenever DeepSpeed is installed.
    prepared, optimizer = acc.prepare(model, optimizer)
    return prepared, optimizer, scheduler


@contextmanager
def policy_folder(acc, model: torch.nn.Module, unwrapped: ActorCritic, tokenizer, folder: Path,
                  marker: str | None = None) -> Iterator[Path]:
    """An atomic folder (:func:`checkpoint.atomic_folder`) holding the policy and critic; every
    process takes part (sharded weights of the prepared ``model`` are gathered), the main process
    writes. Yields the temporary folder the caller adds its files to."""
    weights = full_state_dict(acc, model)
    with ckpt.atomic_folder(folder, acc.is_main_process, acc.wait_for_everyone, marker) as tmp:
        if acc.is_main_process:
            save_actor_critic(unwrapped, tokenizer, tmp, weights)
            ckpt.maybe_abort(folder.name, "model")
        yield tmp
