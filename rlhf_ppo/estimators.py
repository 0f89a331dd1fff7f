"""Advantage estimators as data: one :class:`Estimator` entry per ``ppo.advantage_estimator``,
the only place their names are listed.

An entry says what its estimator needs (a critic, groups of responses per prompt), whether it
whitens, and which optional keys it reads; config validation (:func:`check_config`), the
trainer and the docs read this one table. Adding an estimator is one entry here plus its
baseline function in ``ops.py`` and its tests.

Every estimator turns a batch into per-token rewards, advantages and returns the same way
(:meth:`Estimator.estimate`): the score (or, with a group baseline, the score minus its group's
baseline) lands on the last valid token with ``-kl_coef * KL_t`` on every token, as OpenRLHF shapes
them, plus a multi-turn rollout's turn rewards on the last token of each rewarded turn; then GAE
with the critic's values, or the critic-free returns-to-go. Both skip the tokens the action mask
leaves out (the environment's tokens between turns).

Shape legend: ``B`` sequences, ``T`` response length.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ops
from .errors import ConfigError, UnreadKeyWarning

# Keys that ask for a critic: refused by an estimator without one (they would load or train
# a model nothing reads).
CRITIC_REQUESTS: dict[str, str] = {
    "ppo.critic.warmup": "iterations that train the critic alone",
    "model.critic": "a separate critic model",
    "model.critic_name_or_path": "the critic's weights",
    "model.critic_init": "the critic's starting point",
}
# Keys that tune the critic's training: left unread, with a warning, by an estimator without
# one (a config file may serve several estimators, e.g. configs/tiny.yaml sets the value loss's
# coefficient and is run with `ppo.advantage_estimator=grpo`).
CRITIC_SETTINGS: dict[str, str] = {
    "ppo.critic.vf_coef": "the value loss's coefficient",
    "ppo.critic.value_clip": "the value loss's clip",
    "ppo.critic.lam": "the critic's GAE lambda",
    "ppo.critic.scale_value_loss": "the value loss's scaling",
    "ppo.critic.backbone_grad": "the value gradient into a shared backbone",
    "optim.critic_lr": "the critic's learning rate",
    "optim.separate_grad_clip": "clipping the critic's gradient apart from the policy's",
}
# Keys only GAE reads (the policy's lambda): unread, with a warning, by the others.
GAE_SETTINGS: dict[str, str] = {
    "ppo.advantages.lam": "GAE's lambda",
    "ppo.advantages.lam_length_alpha": "VAPO's length-adaptive GAE lambda",
}
CRITIC_KEYS = {**CRITIC_REQUESTS, **CRITIC_SETTINGS}


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator and what it needs."""

    name: str
    """the ``ppo.advantage_estimator`` value"""
    summary: str
    """one line for the docs and the run's start log"""
    critic: bool
    """trains a value function (the critic) and reads its values: GAE"""
    whiten: bool | None
    """advantages whitened over the batch: True always, False never, None as
    ``ppo.advantages.whiten`` says (default true)"""
    baseline: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    """group baseline ``([N] scores, group size k) -> [N]`` score minus baseline; None: the raw
    score. Its estimator needs ``ppo.samples_per_prompt > 1`` (the group)"""

    @property
    def groups(self) -> bool:
        """Its baseline comes from the group of responses to one prompt."""
        return self.baseline is not None

    @property
    def reads(self) -> dict[str, str]:
        """The optional keys it reads (of :data:`CRITIC_KEYS` and :data:`GAE_SETTINGS`)."""
        return {**CRITIC_KEYS, **GAE_SETTINGS} if self.critic else {}

    def whitens(self, setting: bool | None) -> bool:
        """Whether its advantages are whitened, given ``ppo.advantages.whiten`` (None: default)."""
        if self.whiten is not None:
            return self.whiten
        return True if setting is None else setting

    def estimate(self, scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, values: torch.Tensor,
                 mask: torch.Tensor, group_size: int, gamma: float, lam: float,
                 critic_lam: float | None = None, lam_length_alpha: float | None = None,
                 turn_rewards: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token rewards, advantages and returns of one batch, before any whitening.

        Args:
            scores: ``[B]``.  kl, values, mask: ``[B, T]`` (``values`` unread without a critic;
                ``mask`` the action mask).
            group_size: responses per prompt (contiguous rows), read by a group baseline.
            turn_rewards: ``[B, T]`` rewards of intermediate turns, each on the last token of its
                turn (``mask`` 1 there: else a ValueError), added as they are (a group baseline
                applies to the score only), or None.
        Returns:
            ``(rewards, advantages, returns)``, each ``[B, T]``, 0 at masked positions. Without
            a critic the returns-to-go (:func:`ops.discounted_returns`) are both the advantages
            and the returns.
        """
        terminal = scores if self.baseline is None else self.baseline(scores, group_size)
        rewards = ops.shape_rewards(terminal, kl, mask, kl_coef, turn_rewards)
        if self.critic:
            advantages, returns = ops.advantages_and_returns(rewards, values, mask, gamma, lam,
                                                             critic_lam, lam_length_alpha)
            return rewards, advantages, returns
        returns = ops.discounted_returns(rewards, mask, gamma)
        return rewards, returns, returns


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("gae", "PPO: GAE with a critic's values (the default)", critic=True, whiten=None),
    Estimator("grpo", "score minus the group mean, over the group std (GRPO)", critic=False,
              whiten=False, baseline=ops.group_normalized),
    Estimator("dr_grpo", "score minus the group mean, no std division (Dr. GRPO)", critic=False,
              whiten=False, baseline=ops.group_centered),
    Estimator("rloo", "score minus the mean of the group's other scores (RLOO)", critic=False,
              whiten=False, baseline=ops.leave_one_out),
    Estimator("reinforce_pp", "KL-shaped returns-to-go, whitened over the batch (REINFORCE++)",
              critic=False, whiten=True),
    Estimator("reinforce_pp_baseline", "REINFORCE++ with the group mean subtracted first",
              critic=False, whiten=True, baseline=ops.group_centered),
)}
DEFAULT = "gae"


def get(name: str, key: str = "ppo.advantage_estimator") -> Estimator:
    """The entry of ``name``; a ConfigError naming ``key`` and the known names otherwise."""
    if name not in ESTIMATORS:
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, ESTIMATORS))}, got {name!r}")
    return ESTIMATORS[name]


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_section(p) -> None:
    """Refuse what the chosen estimator contradicts within the ``ppo`` section (``p``): a group
    baseline without a group, a whitening setting it cannot honour. ConfigError naming the key."""
    est = get(p.advantage_estimator)
    who = f"ppo.advantage_estimator={est.name!r}"
    if est.groups and p.samples_per_prompt < 2:
        raise ConfigError(f"ppo.samples_per_prompt: expected an integer > 1 with {who} (its baseline "
                          f"is the group of responses to the same prompt), got {p.samples_per_prompt}")
    whiten = p.advantages.whiten
    if est.whiten is not None and whiten is not None and whiten != est.whiten:
        raise ConfigError(f"ppo.advantages.whiten: {who} {'always' if est.whiten else 'never'} "
                          f"whitens its advantages; leave it null, got {whiten!r}")


def check_unread(cfg, defaults) -> None:
    """Before any model loads: refuse a key that asks for a critic (:data:`CRITIC_REQUESTS`) with
    an estimator that has none, and warn (:class:`UnreadKeyWarning`) about a critic or GAE
    setting it never reads (:data:`CRITIC_SETTINGS`, :data:`GAE_SETTINGS`). A key left at its
    default is neither.

    ``cfg``: the PPO config; ``defaults``: an object with the same sections at their defaults.
    The ConfigError and the warning name the key, the estimator and why.
    """
    est = get(cfg.ppo.advantage_estimator)
    for key, what in {**CRITIC_KEYS, **GAE_SETTINGS}.items():
        value, default = _value(cfg, key), _value(defaults, key)
        if key in est.reads or value == default:
            continue
        reason = "it has no critic" if key in CRITIC_KEYS else "it does not use GAE"
        msg = (f"{key}: {what} is not read by ppo.advantage_estimator={est.name!r} ({reason}); "
               f"remove it (default {default!r}), got {value!r}")
        if key in CRITIC_REQUESTS:
            raise ConfigError(msg)
        warnings.warn(msg, UnreadKeyWarning, stacklevel=2)
