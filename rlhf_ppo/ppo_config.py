"""The ``ppo`` section of ``rlhf-ppo train``, grouped by what its keys control: the rollout
batch and the update schedule (``ppo.*``), then ``ppo.advantages``, ``ppo.loss``,
``ppo.critic``, ``ppo.kl`` and ``ppo.forward``. The flat names of before the sections
(:data:`PPO_RENAMED`) still work in YAML, overrides, attributes and keywords, with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from . import estimators
from .typed import check, unread

# The `ppo` keys of before the sections (old name -> new name under `ppo.`). The old names
# still work, in YAML, overrides and Python attributes, with a FutureWarning.


PPO_RENAMED: dict[str, str] = {
    "micro_batch_size": "forward.micro_batch_size",
    "micro_batch_tokens": "forward.micro_batch_tokens",
    "inference_batch_size": "forward.inference_batch_size",
    "packing": "forward.packing",
    "old_logprobs": "forward.old_logprobs",
    "gamma": "advantages.gamma",
    "lam": "advantages.lam",
    "lam_length_alpha": "advantages.lam_length_alpha",
    "whiten_advantages": "advantages.whiten",
    "clip_range": "loss.clip_range",
    "clip_range_high": "loss.clip_range_high",
    "dual_clip": "loss.dual_clip",
    "ratio_level": "loss.ratio_level",
    "loss_aggregation": "loss.aggregation",
    "entropy_coef": "loss.entropy_coef",
    "tis_cap": "loss.tis_cap",
    "mask_truncated": "loss.mask_truncated",
    "overlong_buffer": "loss.overlong_buffer",
    "overlong_penalty": "loss.overlong_penalty",
    "vf_coef": "critic.vf_coef",
    "clip_range_value": "critic.value_clip",
    "critic_lam": "critic.lam",
    "critic_warmup": "critic.warmup",
    "scale_value_loss": "critic.scale_value_loss",
    "value_backbone_grad": "critic.backbone_grad",
    "kl_coef": "kl.coef",
    "kl_estimator": "kl.estimator",
    "adaptive_kl": "kl.adaptive",
    "kl_target": "kl.adaptive_target",  # the adaptive controller's summed KL, not early stopping
    "kl_horizon": "kl.horizon",
    "kl_loss_coef": "kl.loss_coef",
    "kl_loss_estimator": "kl.loss_estimator",
    "target_kl": "early_stop_kl",  # per-token approximate KL that stops an iteration's epochs
}


def _renamed_path(old: str) -> tuple[list[str], str]:
    """The sections and leaf of a renamed ``ppo`` attribute, after a FutureWarning naming both."""
    new = PPO_RENAMED[old]
    warnings.warn(f"config key ppo.{old} is deprecated and will be removed: use ppo.{new}",
                  FutureWarning, stacklevel=3)
    *path, leaf = new.split(".")
    return path, leaf


@dataclass


class ForwardConfig:
    """``ppo.forward``: how sequences are batched through the models. None of these changes the
    numbers beyond float rounding; they trade memory for speed."""

    micro_batch_size: int = 8
    """sequences per forward/backward on each process; a minibatch accumulates gradients over
    its micro-batches"""
    micro_batch_tokens: int | None = None
    """token budget of a forward/backward on each process, instead of `micro_batch_size`
    sequences: a minibatch's sequences, longest first, fill micro-batches of at most this many
    token positions (with `packing`: their real tokens; else rows x the longest), and a longer
    sequence gets one of its own. null: `micro_batch_size` sequences per micro-batch"""
    inference_batch_size: int = 32
    """sequences per no-grad forward on each process (old log-probs, values, reference)"""
    packing: bool = True
    """padding-free forward passes (update, old log-probs, values, reference, reward models): each
    batch's sequences packed end to end with position ids that restart per sequence, the same
    numbers as padded batches; a model whose attention does not separate packed sequences (checked
    at start) runs padded, and a warning says so"""
    old_logprobs: Literal["auto", "generation", "recompute"] = "auto"
    """log pi_old from `generation` (native backend) or a `recompute` pass; `auto`: generation in float32"""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "inference_batch_size"):
            check(getattr(self, key) >= 1, f"ppo.forward.{key}", "an integer >= 1", getattr(self, key))
        check(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1,
              "ppo.forward.micro_batch_tokens", "an integer >= 1 or null", self.micro_batch_tokens)


@dataclass


class AdvantagesConfig:
    """``ppo.advantages``: returns and advantages from the per-token rewards."""

    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda of the policy's advantages (GAE only)"""
    lam_length_alpha: float | None = None
    """VAPO's length-adaptive policy lambda `1 - 1/(alpha * response_length)` per sequence,
    replacing `lam` (VAPO: 0.05); null: off (GAE only)"""
    whiten: bool | None = None
    """whiten the advantages over the valid tokens of the batch; null: the estimator's rule (GAE
    and REINFORCE++ whiten, the group baselines do not). An estimator whose rule is fixed refuses
    the other value (docs/estimators.md)"""

    def __post_init__(self) -> None:
        check(0 <= self.gamma <= 1, "ppo.advantages.gamma", "a number in [0, 1]", self.gamma)
        check(0 <= self.lam <= 1, "ppo.advantages.lam", "a number in [0, 1]", self.lam)
        check(self.lam_length_alpha is None or self.lam_length_alpha > 0,
              "ppo.advantages.lam_length_alpha", "a number > 0 or null", self.lam_length_alpha)


@dataclass


class LossConfig:
    """``ppo.loss``: the policy objective and its variants."""

    clip_range: float = 0.2
    """PPO ratio clip epsilon"""
    clip_range_high: float | None = None
    """upper ratio clip `1 + clip_range_high` (DAPO's clip-higher); null: `clip_range`"""
    dual_clip: float | None = None
    """dual-clip bound c > 1: a negative-advantage token's loss is at most `-A * c`; null: off"""
    ratio_level: Literal["token", "sequence"] = "token"
    """`token` (PPO) or `sequence`: one ratio per response, the geometric mean of its tokens'
    (GSPO)"""
    aggregation: Literal["token-mean", "seq-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                         "seq-mean-token-sum-norm"] = "token-mean"
    """`token-mean`: over all tokens; `seq-mean` (= `seq-mean-token-mean`): each sequence's token
    mean, averaged over sequences; `seq-mean-token-sum`: each sequence's token sum, averaged;
    `seq-mean-token-sum-norm`: the token sum over a constant (sequences x
    `generation.max_new_tokens`, or `agent.max_total_tokens` with an agent section; Dr. GRPO).
    Applies to every loss term"""
    entropy_coef: float = 0.0
    """entropy bonus coefficient"""
    tis_cap: float | None = None
    """truncated importance sampling: weight each token's loss by min(pi_old / pi_sampling, cap),
    pi_sampling the log-probs recorded while sampling (they differ e.g. in bf16); null: off"""
    mask_truncated: bool = False
    """leave responses that hit `max_new_tokens` without a stop token out of the loss"""
    overlong_buffer: int | None = None
    """soft overlong penalty (DAPO), added to the score: the last N tokens before
    `max_new_tokens` (multi-turn: `agent.max_total_tokens`, the whole transcript counted) cost up
    to `overlong_penalty` linearly; null: off"""
    overlong_penalty: float = 1.0
    """the largest overlong penalty (at `max_new_tokens`)"""

    def __post_init__(self) -> None:
        check(self.clip_range > 0, "ppo.loss.clip_range", "a number > 0", self.clip_range)
        check(self.clip_range_high is None or self.clip_range_high > 0, "ppo.loss.clip_range_high",
              "a number > 0 or null", self.clip_range_high)
        check(self.dual_clip is None or self.dual_clip > 1, "ppo.loss.dual_clip",
              "a number > 1 or null", self.dual_clip)
        check(self.entropy_coef >= 0, "ppo.loss.entropy_coef", "a number >= 0", self.entropy_coef)
        check(self.tis_cap is None or self.tis_cap > 0, "ppo.loss.tis_cap", "a number > 0 or null",
              self.tis_cap)
        check(self.overlong_buffer is None or self.overlong_buffer >= 1, "ppo.loss.overlong_buffer",
              "an integer >= 1 or null", self.overlong_buffer)
        check(self.overlong_penalty >= 0, "ppo.loss.overlong_penalty", "a number >= 0",
              self.overlong_penalty)
        unread(self, "overlong_penalty", "ppo.loss", self.overlong_buffer is not None,
               "ppo.loss.overlong_buffer is null")


@dataclass


class CriticTrainConfig:
    """``ppo.critic``: how the critic (value function) learns; read only by an estimator with a
    critic (`gae`). Which critic model: `model.critic`."""

    vf_coef: float = 0.1
    """value loss coefficient"""
    value_clip: float | None = 0.2
    """value clip around the old values (null: no value clipping)"""
    lam: float | None = None
    """GAE lambda of the critic's value targets (returns); null: `ppo.advantages.lam`. 1.0:
    Monte-Carlo returns (VC-PPO's decoupled GAE)"""
    warmup: int = 0
    """value pretraining: the first N iterations (counted in `iterations`) train only the value
    head / critic, on rollouts of the initial policy, toward `lam` returns"""
    scale_value_loss: bool = True
    """divide the value loss by the variance of the batch's returns when it exceeds 1, so the value
    gradient (through a shared backbone, the policy's) cannot grow with the reward scale or kl_coef"""
    backbone_grad: float = 1.0
    """shared value head: scale of the value loss's gradient that reaches the policy's backbone
    (1: all of it, 0: the head alone learns)"""

    def __post_init__(self) -> None:
        check(self.vf_coef >= 0, "ppo.critic.vf_coef", "a number >= 0", self.vf_coef)
        check(self.value_clip is None or self.value_clip > 0, "ppo.critic.value_clip",
              "a number > 0 or null", self.value_clip)
        check(self.lam is None or 0 <= self.lam <= 1, "ppo.critic.lam", "a number in [0, 1] or null",
              self.lam)
        check(self.warmup >= 0, "ppo.critic.warmup", "an integer >= 0", self.warmup)
        check(0 <= self.backbone_grad <= 1, "ppo.critic.backbone_grad", "a number in [0, 1]",
              self.backbone_grad)


@dataclass


class KLConfig:
    """``ppo.kl``: the KL to the reference model, as a reward penalty and / or a loss term. With
    neither (``coef`` 0, ``adaptive`` false, ``loss_coef`` 0) nothing reads the reference: it is
    not loaded and not run, and the ``kl`` metric is NaN."""

    coef: float = 0.05
    """initial KL penalty coefficient beta in the per-token rewards (0: no penalty; with
    `adaptive` false and `loss_coef` 0 too, no reference model is loaded or run)"""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator for the reward penalty (Schulman's k1/k2/k3)"""
    adaptive: bool = False
    """adapt `coef` toward `adaptive_target` (Ziegler et al. 2019)"""
    adaptive_target: float = 6.0
    """the adaptive controller's target: summed KL per sequence"""
    horizon: int = 10000
    """horizon of the adaptive controller, in sequences"""
    loss_coef: float = 0.0
    """coefficient of the KL to the reference as a loss term (GRPO); 0: off. Independent of
    `coef` (the KL in the reward): either, both or neither"""
    loss_estimator: Literal["k1", "k2", "k3"] = "k3"
    """per-token KL estimator of the loss term (GRPO: k3)"""

    def __post_init__(self) -> None:
        check(self.coef >= 0, "ppo.kl.coef", "a number >= 0", self.coef)
        check(self.adaptive_target > 0, "ppo.kl.adaptive_target", "a number > 0", self.adaptive_target)
        check(self.horizon >= 1, "ppo.kl.horizon", "an integer >= 1", self.horizon)
        check(self.loss_coef >= 0, "ppo.kl.loss_coef", "a number >= 0", self.loss_coef)
        for key in ("adaptive_target", "horizon"):
            unread(self, key, "ppo.kl", self.adaptive, "ppo.kl.adaptive is false")
        unread(self, "loss_estimator", "ppo.kl", self.loss_coef > 0, "ppo.kl.loss_coef is 0")
        unread(self, "estimator", "ppo.kl", self.reads_reference(), "no KL setting reads the reference "
               "(ppo.kl.coef 0, ppo.kl.adaptive false, ppo.kl.loss_coef 0): the run has none")

    def reads_reference(self) -> bool:
        """Whether any KL setting reads the reference model's log-probs: the penalty in the
        rewards (``coef`` > 0), the adaptive controller (it measures the KL) or the loss term
        (``loss_coef`` > 0). False: the run builds no reference (GRPO / DAPO without KL)."""
        return self.coef > 0 or self.adaptive or self.loss_coef > 0


@dataclass


class PPOConfig:
    """``ppo``: the rollout batch and the update schedule, then one section per concern."""

    OLD_NAMES: ClassVar[dict[str, str]] = PPO_RENAMED  # suggested for a mistyped old name

    advantage_estimator: str = estimators.DEFAULT
    """how advantages are estimated: GAE with a critic, or a critic-free group or REINFORCE++
    baseline; one of the names in `rlhf_ppo.estimators.ESTIMATORS` (docs/estimators.md lists
    each with what it needs)"""
    batch_size: int = 16
    """responses per iteration, over all processes (each process samples `batch_size /
    processes`); they answer `batch_size / samples_per_prompt` prompts"""
    samples_per_prompt: int = 1
    """responses sampled per prompt (the group of the group estimators); a group stays on one
    process"""
    dynamic_sampling: bool = False
    """drop groups whose scores are all equal (no signal) and sample more until the batch is
    full (DAPO); needs `samples_per_prompt` > 1"""
    ppo_epochs: int = 4
    """passes over the rollout batch per iteration"""
    num_minibatches: int = 2
    """optimizer steps per PPO epoch; `batch_size` must divide evenly"""
    early_stop_kl: float | None = None
    """stop this iteration's updates when the per-token approximate KL(old || new) of a minibatch
    exceeds it (null: never)"""
    advantages: AdvantagesConfig = field(default_factory=AdvantagesConfig)
    """returns and advantages"""
    loss: LossConfig = field(default_factory=LossConfig)
    """the policy objective and its variants"""
    critic: CriticTrainConfig = field(default_factory=CriticTrainConfig)
    """how the critic learns (estimators with a critic)"""
    kl: KLConfig = field(default_factory=KLConfig)
    """the KL to the reference"""
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    """how sequences are batched through the models"""

    def __post_init__(self) -> None:
        for key in ("batch_size", "num_minibatches", "ppo_epochs", "samples_per_prompt"):
            check(getattr(self, key) >= 1, f"ppo.{key}", "an integer >= 1", getattr(self, key))
        check(self.batch_size % self.num_minibatches == 0, "ppo.batch_size",
              f"a multiple of ppo.num_minibatches={self.num_minibatches}", self.batch_size)
        check(self.batch_size % self.samples_per_prompt == 0, "ppo.batch_size",
              f"a multiple of ppo.samples_per_prompt={self.samples_per_prompt}", self.batch_size)
        mini, micro = self.batch_size // self.num_minibatches, self.forward.micro_batch_size
        check(mini % micro == 0 or micro >= mini, "ppo.forward.micro_batch_size",
              f"a divisor of the minibatch size {mini} (ppo.batch_size / ppo.num_minibatches)", micro)
        check(self.early_stop_kl is None or self.early_stop_kl > 0, "ppo.early_stop_kl",
              "a number > 0 or null", self.early_stop_kl)
        check(not self.dynamic_sampling or self.samples_per_prompt > 1, "ppo.dynamic_sampling",
              "false unless ppo.samples_per_prompt > 1 (it drops groups of equal scores)",
              self.dynamic_sampling)
        estimators.check_section(self)

    # Python access under the names of before the sections (``cfg.ppo.kl_coef``), with a warning.
    def __getattr__(self, name: str) -> Any:  # called only when normal lookup fails
        if name not in PPO_RENAMED:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        path, leaf = _renamed_path(name)
        node = self
        for part in path:
            node = getattr(node, part)
        return getattr(node, leaf)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in PPO_RENAMED:
            object.__setattr__(self, name, value)
            return
        path, leaf = _renamed_path(name)
        node = self
        for part in path:
            node = getattr(node, part)
        object.__setattr__(node, leaf, value)


def _accept_old_keywords(cls: type) -> type:
    """Let ``cls(kl_coef=...)`` (the keyword names of before the sections) build the new sections,
    each renamed keyword with a FutureWarning; the sections validate as usual."""
    init = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        by_section: dict[str, dict[str, Any]] = {}
        for old in [k for k in kwargs if k in PPO_RENAMED]:
            path, leaf = _renamed_path(old)
            if not path:
                kwargs[leaf] = kwargs.pop(old)
            else:
                by_section.setdefault(path[0], {})[leaf] = kwargs.pop(old)
        for section, leaves in by_section.items():
            start = kwargs.get(section) or next(f for f in dataclasses.fields(cls)
                                                if f.name == section).default_factory()
            kwargs[section] = dataclasses.replace(start, **leaves)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


_accept_old_keywords(PPOConfig)
