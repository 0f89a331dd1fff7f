"""Padding-free forward passes: the sequences of a padded batch packed end to end into a few rows,
with position ids that restart at 0 for every sequence, so that attention never crosses from one
sequence into another.

transformers builds the attention mask of a packed row from its position ids when no attention
mask is given (``masking_utils.find_packed_sequence_indices``: a new sequence starts wherever the
position does not grow by one); flash attention reads the same boundaries. Sequences are placed
first-fit decreasing into rows whose length balances the padding left at the rows' ends against
attention's work over a longer row (which, with a mask, covers every pair in the row): one row
when attention is cheap next to the dense layers, rows as long as the longest sequence when it
is not. A packed batch costs about ``sum of lengths`` token positions instead of
``rows x longest``.

:func:`check_packing` verifies on the model itself that packed and padded passes agree, so an
architecture whose attention ignores the position ids falls back to padded batches instead of
silently mixing sequences.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .lm import backbone_hidden, is_partitioned, transformer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Packed:
    """A padded batch ``(B, L)`` (prompt left-padded to ``P``, response right-padded) packed into
    ``(n, C)``. Flat indices below index the packed batch flattened to ``n * C`` positions."""

    input_ids: torch.Tensor
    """(n, C) the real tokens of every sequence, end to end; unused tails hold token 0"""
    position_ids: torch.Tensor
    """(n, C) 0, 1, ... within each sequence (and within each row's unused tail)"""
    response_index: torch.Tensor
    """(N,) flat position that predicts each real response token (the position before it), in
    the row-major order of ``response_real``"""
    response_tokens: torch.Tensor
    """(N,) the real response tokens, same order"""
    response_real: torch.Tensor
    """(B, R) bool: which response columns of the padded batch are real (attention mask 1: the
    model's tokens and, multi-turn, the environment's). Not the action mask: the loss masks the
    environment's tokens afterwards, as it does in a padded batch"""
    last_index: torch.Tensor
    """(B,) flat position of each sequence's last real token"""

    tail: int = 0
    """positions in the rows' unused tails (the packed batch's padding)"""

    def unpack(self, flat: torch.Tensor) -> torch.Tensor:
        """``(N,)`` or ``(1, N)`` per-response-token values back to the padded ``(B, R)`` layout
        (0 where the response is padding)."""
        out = flat.new_zeros(self.response_real.shape)
        out[self.response_real] = flat.reshape(-1)
        return out


MAX_ROW = 16384
"""longest packed row considered (a row's attention mask is row length squared)"""


def attention_weight(config) -> float:
    """Attention's work per token and per position it attends to, relative to a layer's dense
    work per token: ``2 H`` multiply-adds per pair (scores and weighted values, every head)
    against ``4 H^2 + 3 H I`` (projections and a gated MLP), i.e. ``2 / (4 H + 3 I)``."""
    c = config.get_text_config()
    H = c.hidden_size
    return 2.0 / (4 * H + 3 * (getattr(c, "intermediate_size", None) or 4 * H))


def first_fit(lengths: list[int], capacity: int) -> tuple[list[int], list[int]]:
    """Place sequences of ``lengths`` first-fit decreasing into rows of ``capacity`` (at least
    the longest): ``(flat start of each sequence, tokens used in each row)``."""
    fill: list[int] = []
    start = [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, used in enumerate(fill):
            if used + lengths[i] <= capacity:
                start[i] = row * capacity + used
                fill[row] += lengths[i]
                break
        else:
            start[i] = len(fill) * capacity
            fill.append(lengths[i])
    return start, fill


def layout(lengths: list[int], attention: float) -> tuple[list[int], list[int], int]:
    """The cheapest packing of sequences of ``lengths``: rows of length ``C`` from the longest
    sequence up to all of them in one row, costing ``rows x C x (1 + attention x C)`` (dense
    work per position, plus attention over the whole row: a CPU computes masked pairs too).
    Returns ``(flat starts, tokens used per row, C)``."""
    longest, total = max(max(lengths, default=1), 1), max(sum(lengths), 1)
    best = None
    for k in range(1, 9):  # rows of total / k tokens (at least the longest, at most MAX_ROW)
        C = min(max(longest, -(-total // k)), max(longest, MAX_ROW))
        start, fill = first_fit(lengths, C)
        cost = len(fill) * C * (1 + attention * C)
        if best is None or cost < best[0]:
            best = (cost, start, fill, C)
    start, fill = first_fit(lengths, longest)
    if len(fill) * longest * (1 + attention * longest) < best[0]:
        return start, fill, longest
    return best[1], best[2], best[3]


def packed_positions(attention_mask: torch.Tensor, attention: float) -> int:
    """Token positions (rows x row length) a packed pass over this batch computes."""
    _, fill, C = layout(attention_mask.sum(1).tolist(), attention)
    return max(len(fill), 1) * C


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
         attention: float = 0.0) -> Packed:
    """Pack the real tokens (``attention_mask`` 1: all the model reads, the environment's tokens
    between turns included) of each row of a padded batch into rows laid
    out by :func:`layout` (``attention``: :func:`attention_weight` of the model; 0: one row).
    Every row must have at least one real prompt token (the position that predicts the first
    response token)."""
    B, L = input_ids.shape
    device = input_ids.device
    real = attention_mask.bool()
    lengths = real.sum(1).tolist()
    start, fill, C = layout(lengths, attention)
    if not real[:, :prompt_length].any(1).all():
        raise ValueError("pack: every row needs a real prompt token (the position that predicts "
                         "its first response token)")
    n = max(len(fill), 1)
    rank = real.long().cumsum(1) - 1  # index of each real token within its sequence
    dest = torch.tensor(start, device=device)[:, None] + rank  # (B, L) flat destination
    ids = torch.zeros(n * C, dtype=input_ids.dtype, device=device)
    ids[dest[real]] = input_ids[real]
    # Unused tails get positions 0, 1, ... too: a block of their own that no sequence sees.
    pos = (torch.arange(n * C, device=device) % C).sub_(
        torch.tensor(fill + [0] * (n - len(fill)), device=device).repeat_interleave(C))
    pos[dest[real]] = rank[real]
    resp = real[:, prompt_length:]
    last = torch.tensor(start, device=device) + torch.tensor(lengths, device=device) - 1
    return Packed(ids.view(n, C), pos.clamp_(min=0).view(n, C),
                  (dest[:, prompt_length:] - 1)[resp], input_ids[:, prompt_length:][resp], resp,
                  last, tail=n * C - sum(lengths))


def pack_for(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             prompt_length: int) -> Packed:
    """:func:`pack` with rows laid out for ``model``'s shape (:func:`attention_weight` of its
    config; a PEFT wrapper's base model is read)."""
    return pack(input_ids, attention_mask, prompt_length,
                attention_weight(transformer(model).config))


def packed_hidden(model: nn.Module, packed: Packed) -> torch.Tensor:
    """Last hidden states ``(n * C, H)`` of a ``*ForCausalLM`` / ``*ForSequenceClassification``'s
    backbone over a packed batch (no attention mask: the position ids mark the sequences)."""
    out = transformer(model).base_model(input_ids=packed.input_ids,
                                        position_ids=packed.position_ids, attention_mask=None,
                                        use_cache=False)
    return out.last_hidden_state.flatten(0, 1)


@torch.no_grad()
def check_packing(model: nn.Module, name: str) -> bool:
    """True when ``model``'s packed and padded passes agree on three short random sequences, two
    of them sharing a packed row (hidden states within 1e-3 of their scale, 5e-2 in 16-bit
    weights); else a warning naming ``name`` and the architecture, and False (use padded
    batches). A model whose weights an engine partitioned cannot run outside it: there the
    architecture's code is checked for transformers' packed-sequence mask instead."""
    lm = transformer(model)
    config = lm.config.get_text_config()
    arch = type(lm).__name__
    if is_partitioned(model):
        ok = "create_causal_mask" in sys.modules[type(lm).__module__].__dict__
    else:
        param = next(model.parameters())
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(getattr(config, "vocab_size", 2) or 2, (3, 8), generator=gen)
        mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1],   # 7 tokens, left padding
                             [0, 0, 0, 0, 1, 1, 1, 0],   # 3 and 4: one packed row
                             [0, 0, 1, 1, 1, 1, 0, 0]])  # right padding too
        ids, mask = ids.to(param.device), mask.to(param.device)
        was_training = model.training
        model.eval()
        try:
            padded = backbone_hidden(model, ids, mask)[mask.bool()].float()
            p = pack(ids, mask, 5, attention=1.0)  # rows of 7: two sequences share one
            flat = packed_hidden(model, p).float()
            rows = [torch.arange(int(last) - n + 1, int(last) + 1)
                    for last, n in zip(p.last_index.tolist(), mask.sum(1).tolist())]
            packed = flat[torch.cat(rows).to(flat.device)]
            rtol = 1e-3 if param.dtype == torch.float32 else 5e-2
            ok = bool((packed - padded).abs().max() <= rtol * (padded.abs().max() + 1))
        except (TypeError, ValueError, RuntimeError, IndexError) as e:
            logger.debug("packing check of %s failed: %s", name, e)
            ok = False
        finally:
            model.train(was_training)
    if not ok:
        logger.warning("%s (%s): packed sequences do not give the padded pass's hidden states; "
                       "its forward passes use padded micro-batches instead", name, arch)
    return ok
