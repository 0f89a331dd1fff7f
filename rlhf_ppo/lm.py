"""The forward pass of a loaded transformers model, below everything that builds or trains one:
the backbone's last hidden states, positions under left padding, and token log-probs from the
LM head in chunks (so a float32 ``[B, L, V]`` logits tensor never exists for a whole batch).

Imports only torch and :mod:`.ops`; :mod:`.packing`, :mod:`.rollout`, :mod:`.lora` and
:mod:`.models` build on it.

Shape legend: ``B`` batch, ``R`` response length, ``L`` sequence length, ``H`` hidden size,
``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import ops

# Logits are computed for at most this many elements at a time (64M floats = 256 MB in float32),
# so a float32 [B, L, V] tensor is never materialised for the whole batch.
LOGITS_CHUNK_ELEMENTS = 1 << 26
# Under autograd, logits of at most this many elements in all (8M: 32 MB in float32) are kept for
# backward; larger ones are recomputed chunk by chunk (checkpointed). Recomputing costs a second
# LM-head matmul, about a tenth of a small model's update.
KEEP_LOGITS_ELEMENTS = 1 << 23


def transformer(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers included), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_partitioned(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the model's parameters."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


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
