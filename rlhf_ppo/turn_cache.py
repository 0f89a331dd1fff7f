"""KV caches carried from one turn of a multi-turn rollout to the next, so that a turn prefills only
the tokens appended since the row's previous turn (its last sampled token and the observation),
not the row's whole history.

Each row keeps its own cache between turns (:class:`RowCache`: the keys and values of the first
``m`` tokens of its context, nothing else), since rows leave the batch at different turns and
``generation.batch_size`` may chunk them differently from turn to turn. A turn stacks the rows'
caches left-padded to the longest (:func:`assemble`: padded entries are zeros, masked out), the
sampler appends the new tokens (left-padded as well: padding in the middle of a row, masked out,
positions counting real tokens only) and decodes, rows leaving the batch when they stop as in
single-turn sampling; :func:`split` then takes each row's real entries back out of the batched
caches it kept. Attention over the same real keys at the same positions
gives the fresh prefill's numbers (to float rounding: the matrix shapes differ).

Only plain ``DynamicLayer`` caches are carried (full attention); a model with sliding-window or
other layer types gets ``None`` from :func:`split` and a fresh prefill next turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowCache:
    """One row's KV cache between turns: per layer ``(keys, values)``, each ``(heads, m, d)``,
    for the first ``m`` tokens of the row's context (prompt, turns and observations so far)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        """m: the context tokens whose keys and values are held."""
        return self.layers[0][0].shape[1] if self.layers else 0

    def cut(self, n: int) -> RowCache:
        """The cache of the first ``min(n, m)`` tokens (drops the entries of tokens the row did
        not keep: sampled after its stop, or the last token of its turn, never fed back)."""
        return RowCache([(k[:, :n], v[:, :n]) for k, v in self.layers])


def assemble(caches: list[RowCache | None], config) -> tuple[object | None, torch.Tensor | None]:
    """One transformers ``DynamicCache`` for a batch of rows and its mask ``(B, C)``, each row's
    cache left-padded (zeros, mask 0) to the longest, ``C``. ``(None, None)`` when no row has a
    cache yet (its first turn: the sampler starts an empty one)."""
    from transformers import DynamicCache

    lengths = [c.length if c is not None else 0 for c in caches]
    B, C = len(caches), max(lengths)
    if C == 0:
        return None, None
    first = next(c for c in caches if c is not None and c.length)
    data = []
    for layer, (k0, v0) in enumerate(first.layers):
        keys = k0.new_zeros(B, k0.shape[0], C, k0.shape[2])  # (B, heads, C, d)
        values = v0.new_zeros(B, v0.shape[0], C, v0.shape[2])
        for b, cache in enumerate(caches):
            if lengths[b]:
                keys[b, :, C - lengths[b]:], values[b, :, C - lengths[b]:] = cache.layers[layer]
        data.append((keys, values))
    mask = torch.zeros(B, C, dtype=torch.long, device=k0.device)
    for b, m in enumerate(lengths):
        if m:
            mask[b, C - m:] = 1
    return DynamicCache(ddp_cache_data=data, config=config), mask


def split(parts: list[tuple], batch: int) -> list[RowCache] | None:
    """Each row's real entries (mask 1), in order, from the sampler's ``cache_parts`` (the batched
    cache of the rows that left the batch at one step; :func:`rollout.sample_native`); None when
    a layer is not a plain ``DynamicLayer`` (not carried)."""
    found: list[RowCache | None] = [None] * batch
    for rows, layers, mask in parts:
        if layers is None:
            return None
        for i, row in enumerate(rows.tolist()):
            real = mask[i].nonzero().squeeze(1)
            found[row] = RowCache([(keys[i][:, real], values[i][:, real]) for keys, values in layers])
    return found
