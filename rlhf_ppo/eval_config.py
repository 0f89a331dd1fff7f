"""``rlhf-ppo evaluate``'s config: :class:`EvalConfig`, its checks, and how its ``data``,
``reward`` and ``generation`` sections combine with those of the PPO run that trained the policy.

A key set for evaluate (in its config file or on the command line) wins; every other key takes
the run's value, key by key (:func:`effective_config`). ``--config`` may also be a PPO run's own
config file (:func:`load_eval_config`). The ``agent`` section (tools / environment of a multi-turn
run) is taken from the run in the same way; it is named in the logs and ``settings_from`` only
when it is on, so that a single-turn evaluation reads as before.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .config import (
    AgentConfig,
    Config,
    ConfigError,
    DataConfig,
    GenerationConfig,
    RewardConfig,
    apply_overrides,
    check,
    config_from_dict,
    load_config,
)

# The command's logger, not this module's: users (and tests) follow evaluate's log lines, e.g.
# "rlhf_ppo.evaluate: evaluate data: ...", under one name.
logger = logging.getLogger("rlhf_ppo.evaluate")

# The sections evaluate takes from the PPO run that trained the policy, unless set for evaluate.
RUN_SECTIONS = ("data", "reward", "generation")
# ... and the multi-turn one, reported only when on (tools or an environment are set).
AGENT_SECTION = "agent"


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


class EvalAgentConfig(_RecordsSetKeys, AgentConfig):
    """evaluate's ``agent`` section: an :class:`AgentConfig` that records the keys it was given."""


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
    """CPU threads torch uses; null: `OMP_NUM_THREADS` when set, else half this machine's usable cores"""
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
    accuracy_function: str = "rlhf_ppo.tasks.reasoning:correct"
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
    agent: EvalAgentConfig = field(default_factory=EvalAgentConfig)
    """multi-turn sampling with tools / an environment, the same for both models (docs/agents.md);
    default: the PPO run's, key by key"""

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
    Config(data=cfg.data, generation=cfg.generation, reward=cfg.reward, agent=cfg.agent)


# --------------------------------------------------------------------------- the PPO run's settings

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
    """``cfg`` with its ``data``, ``reward``, ``generation`` and ``agent`` sections completed from
    the PPO run that trained the policy (``run``: its config dict and path, see
    :func:`find_run_config`).

    Key by key: a key set for evaluate (:func:`set_keys`: named in its config file or on the
    command line) wins; every other key takes the run's value (the PPO default where the run's
    config leaves it out). Without a run, the evaluate config is used as it is. Returns the
    config and, per section, where its settings came from (logged as one INFO line per section,
    and written to ``summary.json`` as ``settings_from``; the ``agent`` section only when it is
    on, so a single-turn evaluation logs and writes what it did before the section existed).
    """
    run_cfg = None
    if run is not None:
        try:
            run_cfg = config_from_dict({k: run[0][k] for k in (*RUN_SECTIONS, AGENT_SECTION)
                                        if k in run[0]}, Config)
        except ConfigError as e:
            raise ConfigError(f"the run config {run[1]}: {e}; fix it or set the data, reward and "
                              "generation sections for evaluate") from e
    fallback = (f"the PPO run's config {run[1]}" if run is not None
                else "the defaults (no PPO run config found with the policy)")
    sources = getattr(cfg, "key_sources", None) or {}
    merged, origins = {}, {}
    for name in (*RUN_SECTIONS, AGENT_SECTION):
        merged[name], origins[name] = _merge_section(name, getattr(cfg, name), run_cfg, run,
                                                     sources, fallback)
    if not merged[AGENT_SECTION].enabled:
        del origins[AGENT_SECTION]
    out = dataclasses.replace(cfg, **merged)
    for name in origins:
        logger.info("evaluate %s: %s (%s)", name, _describe(name, getattr(out, name)),
                    origins[name])
    return out, origins


def _merge_section(name: str, mine: Any, run_cfg: Config | None, run: tuple[dict, Path] | None,
                   sources: dict[str, str], fallback: str) -> tuple[Any, str]:
    """One section of :func:`effective_config`: evaluate's keys over the run's section, and a
    line saying where its settings came from."""
    keys = set_keys(mine)
    if run_cfg is None or not keys:
        merged = getattr(run_cfg, name) if run_cfg is not None else mine
    else:
        try:
            merged = dataclasses.replace(getattr(run_cfg, name), **{k: getattr(mine, k) for k in keys})
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
        return merged, f"all from {fallback if rest else next(iter(groups))}"
    return merged, "; ".join(f"{', '.join(v)} from {label}" if v else f"the rest from {fallback}"
                             for label, v in groups.items())


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


def _agent_on(section: Any) -> bool:
    """A PPO config file's ``agent`` section (a dict) sets tools or an environment."""
    return isinstance(section, dict) and bool(section.get("tools") or section.get("environment"))


def load_eval_config(path: str | Path | None = None, overrides: list[str] | None = None
                     ) -> EvalConfig:
    """``rlhf-ppo evaluate``'s config: :func:`config.load_config` with :class:`EvalConfig`, except
    that ``path`` may also be a PPO run's config (e.g. ``RUN/config.yaml``, see
    :func:`is_ppo_config`). Of that, evaluate uses the ``data``, ``reward``, ``generation`` and
    ``agent`` sections (as if written in its own config file: they win over the policy's run config) and
    ignores the other keys (``output_dir``, ``seed``, ``model``, ``ppo``, ...: the run folder is
    not evaluate's output folder), with an INFO line; the file is validated as a PPO config first.
    Overrides then apply as usual. The config remembers where each section key was set
    (``key_sources``), for :func:`effective_config`'s log lines."""
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
        try:  # report_to is ignored: its trackers need not be installed where evaluate runs
            config_from_dict({**data, "report_to": []}, Config)
        except ConfigError as e:
            raise ConfigError(f"config file {str(path)!r} (a PPO run's config): {e}") from e
        taken = [k for k in (*RUN_SECTIONS, AGENT_SECTION) if k in data]
        ignored = sorted(k for k in data if k not in taken)
        shown = [k for k in taken if k != AGENT_SECTION or _agent_on(data[k])]
        logger.info("%s is a PPO run's config: evaluate uses its %s section(s) and ignores %s",
                    path, ", ".join(shown) or "(no)", ", ".join(ignored) or "nothing else")
        sections = apply_overrides({k: data[k] for k in taken}, list(overrides or []))
        cfg = config_from_dict(sections, EvalConfig)
        cfg.ppo_config_file = (data, Path(path).resolve())
    file_label = f"--config {path}" if path is not None else "the evaluate config"
    sources = {name: file_label for name in (*RUN_SECTIONS, AGENT_SECTION)}
    for item in overrides or []:
        parts = item.split("=", 1)[0].split(".")
        if parts[0] in sources:
            sources[".".join(parts[:2])] = "the command line"
    cfg.key_sources = sources
    return cfg
