"""LoRA through peft: the policy's adapter ("default", and a frozen "reference" copy when it
starts from a trained adapter), a critic adapter on the policy's or the reward model's base, and
running a PEFT model with one adapter (or none) active.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn as nn

from .errors import ModelLoadError
from .lm import transformer

CRITIC_ADAPTER = "critic"


def is_peft(model: nn.Module) -> bool:
    """True for a PEFT (LoRA) model."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


@contextmanager
def active_adapter(model: nn.Module, name: str | None):
    """Run a PEFT model with adapter ``name`` active (None: every adapter off, the bare base),
    leaving every parameter's ``requires_grad`` alone. (PEFT's ``set_adapter`` and the exit of
    ``disable_adapter`` also freeze the inactive adapters; with a policy and a critic adapter
    that both train, that would silently stop one of them from learning.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        if name is None:
            m._disable_adapters = True
        else:
            m._active_adapter = [name]
    try:
        yield
    finally:
        for m, (a, d) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = a, d


def lora_config(peft_cfg):
    """The ``peft.LoraConfig`` of a ``PeftConfig`` section."""
    from peft import LoraConfig

    targets = peft_cfg.target_modules
    return LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets,
                      task_type="CAUSAL_LM")


def add_critic_adapter(model: nn.Module, peft_cfg) -> str:
    """Add a fresh trainable LoRA adapter for the critic to the policy's PEFT model (same rank
    and targets); the trainable set afterwards: "default" and the critic, never "reference"."""
    model.add_adapter(CRITIC_ADAPTER, lora_config(peft_cfg))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(".default." in name or f".{CRITIC_ADAPTER}." in name)
    return CRITIC_ADAPTER


def add_reward_critic_adapter(reward_model: nn.Module, peft_cfg) -> tuple[nn.Module, nn.Linear]:
    """Wrap the (frozen) reward model with a trainable LoRA critic adapter (the policy's rank and
    targets, never its ``score`` head) and return it with a trainable value head that starts as
    a copy of the score head, so the critic's first values are the reward model's scores of each
    prefix. The reward model's weights stay one copy: scoring runs with the adapter off."""
    from peft import get_peft_model

    config = lora_config(peft_cfg)
    config.task_type = None  # no task head handling: the value head is our own copy
    config.exclude_modules = ["score"]
    model = get_peft_model(reward_model, config, adapter_name=CRITIC_ADAPTER)
    head = copy.deepcopy(transformer(model).score)
    head.requires_grad_(True)
    if head.bias is None:  # reward models usually have no bias; the value head gets one at 0
        bias_head = nn.Linear(head.in_features, 1)
        with torch.no_grad():
            bias_head.weight.copy_(head.weight)
            bias_head.bias.zero_()
        head = bias_head
    return model, head


def apply_lora(base: nn.Module, peft_cfg) -> tuple[nn.Module, str | None]:
    """Wrap ``base`` with a trainable LoRA adapter ("default"). With ``peft.adapter_path`` the
    existing adapter is loaded twice: frozen as "reference" and trainable as "default" (a copy
    that PPO trains). Returns the PEFT model and the reference adapter's name (None: bare base)."""
    from peft import PeftModel, get_peft_model

    if peft_cfg.adapter_path is None:
        return get_peft_model(base, lora_config(peft_cfg)), None
    path = peft_cfg.adapter_path
    try:
        model = PeftModel.from_pretrained(base, path, adapter_name="reference", is_trainable=False)
        model.load_adapter(path, adapter_name="default", is_trainable=True)
    except Exception as e:
        raise ModelLoadError(f"peft.adapter_path: could not load adapter {path!r} "
                             f"({type(e).__name__}: {e})") from e
    model.set_adapter("default")
    return model, "reference"
