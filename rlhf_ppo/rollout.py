"""Generation and the ``Rollout`` it returns: the sampled responses (and what the sampling pass
recorded), before any scoring. ``experience.py`` turns a rollout into the update's batch.

Shape legend: ``B`` rollouts, ``P`` prompt length (left-padded), ``R`` response length
(right-padded after the first stop token), ``L = P + R``.

Two masks, one meaning each (docs/algorithm.md, "Masks: what the model reads and what it is
trained on"): ``attention_mask`` ``(B, L)`` is what the model reads, ``response_mask`` ``(B, R)``
(alias ``action_mask``) the tokens the policy sampled and is trained on. A single-turn response
is one block where the two agree; in a multi-turn rollout the response region also holds tool
outputs, environment messages and chat-template glue between the model's turns: read
(attention 1), never trained (response mask 0), i.e. holes in the response mask.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops
from .config import GenerationConfig
from .data import Prompt, left_pad
from .lm import position_ids_from_mask, postprocess_logits, transformer

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One iteration's experience. Per-token tensors cover the response region (columns P..)
    and are 0 where ``response_mask`` is 0. ``response_mask`` is the action mask: 1 on the tokens
    the policy sampled (a single-turn response: up to and including the first stop token), 0 on
    everything else: padding, and in a multi-turn rollout the environment's tokens between the
    model's turns (read: ``attention_mask`` 1, never trained)."""

    # ---- tokens
    input_ids: torch.Tensor
    """(B, L) prompt (left-padded to P) then response region (padded after its end)"""
    attention_mask: torch.Tensor
    """(B, L) what the model reads: 1 on real prompt tokens, the model's tokens and the
    environment's tokens between turns; 0 on padding"""
    prompt_length: int
    """P: the response region starts at column P"""
    response_mask: torch.Tensor
    """(B, R) the action mask: 1 on the tokens the policy sampled and is trained on (each turn's
    stop token included), 0 on environment tokens and padding"""
    stopped: torch.Tensor
    """(B,) bool: the response ended with a stop token (else it hit max_new_tokens)"""
    prompts: list[Prompt] = field(default_factory=list)
    """the B prompts"""
    response_texts: list[str] = field(default_factory=list)
    """decoded responses (special tokens and stop strings removed)"""
    # ---- per token, recorded by the sampling pass itself (None when it did not record them;
    # experience.rollout_outputs computes them then)
    logprobs: torch.Tensor | None = None
    """(B, R) log pi_old(a_t|s_t) at sampling time"""
    entropy: torch.Tensor | None = None
    """(B, R) entropy of the policy's next-token distribution"""
    values: torch.Tensor | None = None
    """(B, R) V_old(s_t) from a value head on the policy's hidden states"""
    # ---- multi-turn
    turn_rewards: torch.Tensor | None = None
    """(B, R) float: an environment's reward for an intermediate turn, on the last model token
    of that turn (``response_mask`` 1 there), 0 elsewhere; added to the per-token rewards before
    the advantages. None: single-turn (the score on the last action token is the only reward)"""
    episode_stats: dict[str, torch.Tensor] | None = None
    """multi-turn only, per row ``(B,)``: ``turns``, ``tool_calls``, ``tool_errors``,
    ``tool_timeouts``, ``observation_tokens`` (long) and, with an environment, ``success``
    (bool); see :func:`agent_rollout.episode_stats`. Kept by :meth:`subset` and :meth:`concat`
    (when every part has them)"""
    environments: list[Any] | None = None
    """multi-turn with an environment: each row's environment instance, after its episode (TRL
    passes them to reward functions as ``environments``); None otherwise"""
    completion_messages: list[list[dict[str, Any]]] | None = None
    """multi-turn, chat protocol: each row's conversation after the prompt as chat messages
    (assistant turns with ``tool_calls``, ``tool`` results, an environment's ``user`` messages):
    TRL-style reward functions get them as ``completions``; None otherwise"""

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, R) response region tokens (the model's and, multi-turn, the environment's)."""
        return self.input_ids[:, self.prompt_length:]

    @property
    def action_mask(self) -> torch.Tensor:
        """(B, R) ``response_mask`` under its meaning: the tokens the policy sampled."""
        return self.response_mask

    @staticmethod
    def concat(rollouts: list[Rollout], pad_id: int) -> Rollout:
        """One rollout of the rows of ``rollouts`` in order: prompts re-padded on the left to the
        longest, responses on the right (pad token ``pad_id``, mask 0, recorded values 0).
        ``turn_rewards`` are kept (zeros for the parts without any; None when no part has)."""
        P = max(r.prompt_length for r in rollouts)
        R = max(r.response_mask.shape[1] for r in rollouts)
        F = torch.nn.functional

        def join(key: str, prompt_value, response_value) -> torch.Tensor:
            parts = []
            for r in rollouts:
                x = getattr(r, key)
                head, tail = x[:, :r.prompt_length], x[:, r.prompt_length:]
                parts.append(torch.cat([F.pad(head, (P - head.shape[1], 0), value=prompt_value),
                                        F.pad(tail, (0, R - tail.shape[1]), value=response_value)],
                                       dim=1))
            return torch.cat(parts)

        recorded = {}
        for key in ("logprobs", "entropy", "values"):
            if all(getattr(r, key) is not None for r in rollouts):
                recorded[key] = torch.cat([F.pad(getattr(r, key), (0, R - getattr(r, key).shape[1]))
                                           for r in rollouts])
        given = [r.turn_rewards for r in rollouts if r.turn_rewards is not None]
        if given:  # a part without turn rewards has none: zeros
            recorded["turn_rewards"] = torch.cat([
                F.pad(r.turn_rewards, (0, R - r.turn_rewards.shape[1])) if r.turn_rewards is not None
                else given[0].new_zeros(r.response_mask.shape[0], R) for r in rollouts])
        if all(r.episode_stats is not None for r in rollouts):
            recorded["episode_stats"] = {k: torch.cat([r.episode_stats[k] for r in rollouts])
                                         for k in rollouts[0].episode_stats}
        for key in ("environments", "completion_messages"):  # per row; kept when every part has them
            if all(getattr(r, key) is not None for r in rollouts):
                recorded[key] = [x for r in rollouts for x in getattr(r, key)]
        return Rollout(
            input_ids=join("input_ids", pad_id, pad_id),
            attention_mask=join("attention_mask", 0, 0), prompt_length=P,
            response_mask=torch.cat([F.pad(r.response_mask, (0, R - r.response_mask.shape[1]))
                                     for r in rollouts]),
            stopped=torch.cat([r.stopped for r in rollouts]),
            prompts=[q for r in rollouts for q in r.prompts],
            response_texts=[t for r in rollouts for t in r.response_texts], **recorded)

    def subset(self, rows: list[int]) -> Rollout:
        """A new rollout of the given rows (e.g. one process's share of a batch)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[rows]
            elif isinstance(value, dict):  # episode_stats: (B,) tensors
                value = {k: v[rows] for k, v in value.items()}
            elif isinstance(value, list):
                value = [value[i] for i in rows]
            out[f.name] = value
        return Rollout(**out)


DYNAMIC_SAMPLING_ROUNDS = 4
"""``ppo.dynamic_sampling``: at most this many extra sampling rounds per iteration"""


def dynamic_sampling(rollout: Rollout, scores: torch.Tensor, group_size: int,
                     resample: Callable[[], tuple[Rollout, torch.Tensor]],
                     any_process: Callable[[bool], bool], pad_id: int
                     ) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
    """DAPO's dynamic sampling: keep the groups (``group_size`` contiguous rows) whose scores
    differ, since a group of equal scores gives no signal against its own baseline, and draw new
    groups (``resample()``: a rollout and its scores) until there are as many as in ``rollout``.
    Every process samples as many rounds as the one that needs most (``any_process(short)``:
    whether any process is short), at most :data:`DYNAMIC_SAMPLING_ROUNDS` more; a batch still
    short is filled with the groups left out. A multi-turn rollout's ``turn_rewards`` travel with
    their rows (a group is judged by its scores alone). Returns ``(rollout, scores, metrics)``."""
    groups = len(rollout.prompts) // group_size

    def informative(s: torch.Tensor) -> torch.Tensor:  # (groups,)
        g = s.view(-1, group_size)
        return (g.max(1).values - g.min(1).values) > 1e-8
    parts, part_scores = [rollout], [scores]
    first = informative(scores)
    while len(parts) <= DYNAMIC_SAMPLING_ROUNDS:
        if not any_process(sum(int(informative(s).sum()) for s in part_scores) < groups):
            break
        new, new_scores = resample()
        parts.append(new)
        part_scores.append(new_scores)
    everything = Rollout.concat(parts, pad_id) if len(parts) > 1 else rollout
    all_scores = torch.cat(part_scores)
    flags = informative(all_scores).tolist()
    chosen = sorted(([g for g, f in enumerate(flags) if f]
                     + [g for g, f in enumerate(flags) if not f])[:groups])
    rows = [g * group_size + j for g in chosen for j in range(group_size)]
    return everything.subset(rows), all_scores[rows], {
        "dynamic/informative_first": float(first.float().mean()),
        "dynamic/rounds": float(len(parts) - 1),
        "dynamic/informative_kept": sum(flags[g] for g in chosen) / groups}


def off_policy_settings(cfg: GenerationConfig) -> list[str]:
    """Generation settings that reshape the sampling distribution away from the policy's."""
    found = []
    if cfg.top_k:
        found.append(f"top_k={cfg.top_k}")
    if cfg.top_p < 1.0:
        found.append(f"top_p={cfg.top_p}")
    if cfg.min_new_tokens:
        found.append(f"min_new_tokens={cfg.min_new_tokens}")
    if cfg.repetition_penalty != 1.0:
        found.append(f"repetition_penalty={cfg.repetition_penalty}")
    return found


def warn_off_policy(cfg: GenerationConfig) -> None:
    """Warn about every generation setting that makes the samples off-policy."""
    for setting in off_policy_settings(cfg):
        logger.warning(
            "generation.%s reshapes the sampling distribution: responses are no longer samples "
            "of the policy whose log-probs PPO uses (off-policy), a known cause of negative or "
            "exploding KL. Use pure sampling unless you mean it.", setting)


def hf_generation_config(cfg: GenerationConfig, tokenizer, stop_ids: list[int]):
    """A transformers ``GenerationConfig`` with every sampling knob set explicitly, so neither
    the model's ``generation_config.json`` nor library defaults (``top_k=50``) change the
    distribution behind our back."""
    from transformers import GenerationConfig as HFGenerationConfig

    extra = {"cache_implementation": cfg.cache_implementation} if cfg.cache_implementation else {}
    return HFGenerationConfig(
        **extra, do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        min_new_tokens=cfg.min_new_tokens, repetition_penalty=cfg.repetition_penalty,
        max_new_tokens=cfg.max_new_tokens, eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id, use_cache=True, num_beams=1,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, no_repeat_ngram_size=0,
        bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
        forced_eos_token_id=None, forced_bos_token_id=None,
    )


class StopOnStrings:
    """A ``generate`` stopping criterion: a row is done once the decoded tail of its response
    contains a stop string. (transformers' own ``stop_strings`` needs a tokenizer whose vocabulary
    it can map to strings, which fails for some tokenizers; decoding works for every tokenizer.)"""

    def __init__(self, stop_strings: list[str], tokenizer, prompt_length: int):
        self.stop_strings, self.tokenizer, self.prompt_length = stop_strings, tokenizer, prompt_length
        # Every token decodes to at least one character or to nothing, so this many trailing
        # tokens always cover a stop string that the last token completed.
        self.window = max(len(s) for s in stop_strings) + 2

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        tail = input_ids[:, max(self.prompt_length, input_ids.shape[1] - self.window):]
        texts = self.tokenizer.batch_decode(tail.tolist(), skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in texts],
                            device=input_ids.device)


def stop_token_ids(cfg: GenerationConfig, tokenizer) -> list[int]:
    """EOS (all of them, if the tokenizer lists several) plus ``generation.stop_token_ids``."""
    ids = list(cfg.stop_token_ids)
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids = [eos] + [i for i in ids if i != eos]
    return ids


def find_stops(response_ids: torch.Tensor, stop_ids: list[int], stop_strings: list[str] = (),
               tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Length of each response up to and including its first stop, and whether it stopped.

    A stop is a token in ``stop_ids``, or the token whose decoding first completes one of
    ``stop_strings``. Args: ``response_ids`` ``(B, R)``. Returns ``(lengths (B,), stopped (B,))``.
    """
    B, R = response_ids.shape
    is_stop = torch.zeros_like(response_ids, dtype=torch.bool)
    for sid in stop_ids:
        is_stop |= response_ids == sid
    stopped = is_stop.any(-1)
    lengths = torch.where(stopped, is_stop.float().argmax(-1) + 1, torch.full_like(stopped, R,
                                                                                   dtype=torch.long))
    if stop_strings:
        for b in range(B):
            n = _stop_string_length(response_ids[b, : lengths[b]].tolist(), stop_strings, tokenizer)
            if n is not None:
                lengths[b], stopped[b] = n, True
    return lengths.long(), stopped


def _stop_string_length(ids: list[int], stop_strings: list[str], tokenizer) -> int | None:
    """Smallest n such that decode(ids[:n]) contains a stop string (binary search), or None."""
    def hit(n: int) -> bool:
        text = tokenizer.decode(ids[:n], skip_special_tokens=False)
        return any(s in text for s in stop_strings)

    if not ids or not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def decode_responses(response_ids: torch.Tensor, lengths: torch.Tensor, tokenizer,
                     stop_strings: list[str] = ()) -> list[str]:
    """Response texts without special tokens, cut before the first stop string."""
    texts = tokenizer.batch_decode([row[:n].tolist() for row, n in zip(response_ids, lengths)],
                                   skip_special_tokens=True)
    for s in stop_strings:
        texts = [t.split(s, 1)[0] for t in texts]
    return texts


def warp_scores(scores: torch.Tensor, cfg: GenerationConfig, step: int,
                stop_ids: list[int] | torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The logits actually sampled from at response step ``step`` (0-based), given the policy's
    temperature-scaled logits ``scores`` ``(B, V)``: ``generate``'s processors in its order
    (min_new_tokens, repetition_penalty, then top_k and top_p). ``seen`` ``(B, V)`` bool: tokens
    already in each row's prompt or response (repetition penalty; padding never counts).
    Dividing by the temperature first gives the same result as ``generate``'s penalty-then-
    temperature order, since the penalty keeps the sign of a logit."""
    if cfg.min_new_tokens and step < cfg.min_new_tokens and len(stop_ids):
        ids = torch.as_tensor(stop_ids, device=scores.device)  # a device tensor: no copy per step
        scores = scores.index_fill(1, ids, float("-inf"))
    if seen is not None and cfg.repetition_penalty != 1.0:
        pen = cfg.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * pen, scores / pen), scores)
    if cfg.top_k:
        kth = torch.topk(scores, min(cfg.top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - cfg.top_p
        remove[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def draw(probs: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """One token per row from the probabilities ``probs`` ``(B, V)`` (normalised or not).

    ``method``: ``"cdf"`` (inverse CDF: one uniform per row and a binary search in the float64
    cumulative distribution) or ``"race"`` (``argmax(p / E)`` with ``E ~ Exp(1)`` per entry, what
    ``torch.multinomial`` does for one sample); default: ``cdf`` on CPU and ``race`` elsewhere.
    Both sample exactly the distribution ``probs``. On CPU the race's exponentials cost ~3 ms per
    step for 16 x 8192 probabilities (a quarter of a small model's decoding step) against ~0.1 ms
    for the CDF; on a GPU a scan along a 150k-entry row is the slow part.
    Returns ``(B,)``."""
    if (method or ("cdf" if probs.device.type == "cpu" else "race")) == "race":
        e = torch.empty(probs.shape, dtype=torch.float32, device=probs.device).exponential_()
        # never 0 / 0 (NaN, which argmax would pick): a zero-probability token can never win
        return (probs.float() / e.clamp_(min=torch.finfo(torch.float32).tiny)).argmax(-1)
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total
    u = torch.minimum(u, total * (1 - 1e-12))  # u < total even after rounding
    # right=True: the first index whose cdf exceeds u, never a zero-probability token
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


def _cache_kwarg(base) -> str | None:
    """The name under which a transformers backbone takes its KV cache, or None."""
    import inspect

    params = inspect.signature(base.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def native_supported(model) -> bool:
    """True when the native sampling loop can drive ``model`` (a decoder whose backbone takes a
    KV cache); otherwise ``generate`` falls back to ``model.generate``."""
    base = getattr(transformer(model), "base_model", None)
    return base is not None and _cache_kwarg(base) is not None


def _cache_part(cache, mask: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> tuple:
    """The batch positions ``index`` of a sampling cache: ``(their output rows, per layer (keys,
    values) or None when a layer is not a plain DynamicLayer, their mask over the cache)``."""
    from transformers.cache_utils import DynamicLayer

    plain = all(type(layer) is DynamicLayer for layer in cache.layers)
    layers = [(layer.keys[index], layer.values[index]) for layer in cache.layers] if plain else None
    return rows[index], layers, mask[index, :cache.get_seq_length()]


def sample_native(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  cfg: GenerationConfig, stop_ids: list[int], tokenizer, record: bool = True,
                  value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  sync_every: int | None = None, cache=None, past_mask: torch.Tensor | None = None,
                  keep_cache: bool = False) -> dict[str, Any]:
    """Sample responses with a KV cache, recording as it goes what PPO needs of the policy.

    Each step runs the backbone on the newest token, applies the LM head to the last position
    and draws the next token from ``warp_scores`` of the temperature-scaled logits (so log-probs
    and entropies are of the policy's own distribution, as in a full forward). Rows that stopped
    (a stop token, or a decoded stop string) are dropped from the batch and its cache, so they
    cost nothing more; the loop ends when every row stopped or after ``max_new_tokens``.

    Args: ``prompt_ids``, ``prompt_mask`` ``(B, P)`` left-padded, on the model's device;
    ``record``: also return per-token ``logprobs`` and ``entropy``, and ``values`` from
    ``value_fn`` (last hidden states ``(b, H)`` -> values ``(b,)``: a shared critic's head, e.g.
    ``ActorCritic.shared_values``) when given;
    ``sync_every``: steps between the host's checks of which rows stopped (default 1 on CPU, 8 on
    an accelerator; rows that stopped in between run on and are cut afterwards: the same tokens
    under greedy decoding, the same distribution when sampling).
    Multi-turn (:mod:`agent_rollout`) continues a context already read: ``cache`` (a transformers
    ``DynamicCache`` of ``C`` entries per row) and ``past_mask`` ``(B, C)`` (1 on its real entries,
    which may be left-padded), then ``prompt_ids`` are only the tokens appended since; their
    positions continue from each row's count of real entries. ``keep_cache``: the result also
    holds ``"cache_parts"``, the batched cache of every row at the step it left the batch (or at
    the end): a list of :func:`_cache_part` ``(rows (b,), per layer (keys, values) (b, heads, C', d)
    or None, mask (b, C'))``; the entries after a row's stop are of tokens it did not keep.
    Returns ``{"response_ids": (B, R) with padding after each stop, "logprobs", "entropy",
    "values": (B, R) float32 or absent}``, ``R <= max_new_tokens``.
    """
    lm = transformer(model)
    base, head, config = lm.base_model, lm.get_output_embeddings(), lm.config
    cache_kw = _cache_kwarg(base)
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if cache is None else cache
    B, dev, R = prompt_ids.shape[0], prompt_ids.device, cfg.max_new_tokens
    pad = tokenizer.pad_token_id
    tokens = torch.full((B, R), pad, dtype=torch.long, device=dev)
    out = {k: torch.zeros(B, R, device=dev) for k in
           (("logprobs", "entropy") + (("values",) if value_fn is not None else ()))
           if record}
    stop_t = torch.tensor(stop_ids, dtype=torch.long, device=dev)
    seen = None  # (b, V) for the repetition penalty, made at the first step
    on_strings = StopOnStrings(cfg.stop_strings, tokenizer, 0) if cfg.stop_strings else None
    warped = bool(cfg.top_k or cfg.top_p < 1.0 or cfg.min_new_tokens or
                  cfg.repetition_penalty != 1.0)
    rows = torch.arange(B, device=dev)  # batch position -> row of the output
    done = torch.zeros(B, dtype=torch.bool, device=dev)  # per batch position
    end = torch.full((B,), R, dtype=torch.long, device=dev)  # response length per output row
    x, mask = prompt_ids, (prompt_mask if past_mask is None else torch.cat([past_mask, prompt_mask], 1))
    pos = position_ids_from_mask(mask)[:, -prompt_ids.shape[1]:]  # real tokens before come first
    # How often the host looks at which rows stopped (a device sync): every step on CPU, where
    # it is free; every 8th on an accelerator, so that the host queues steps ahead of the device.
    if sync_every is None:
        sync_every = 1 if dev.type == "cpu" else 8
    steps, parts = 0, []
    for t in range(R):
        hidden = base(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True,
                      **{cache_kw: cache}).last_hidden_state[:, -1]  # (b, H)
        logits = postprocess_logits(head(hidden), config).float()
        # the same function as the training forward's log-probs (lm.py's token_logprobs)
        logp = (ops.log_softmax_with_temperature(logits, cfg.temperature)
                if record or not warped else None)
        probs = logp.exp() if logp is not None else None
        if warped:
            if cfg.temperature != 1.0:
                logits = logits / cfg.temperature
            if cfg.repetition_penalty != 1.0 and seen is None:
                # counts, so that a pad id which is also a real prompt token still counts
                counts = torch.zeros(logits.shape, device=dev)
                seen = counts.scatter_add_(1, prompt_ids, prompt_mask.to(counts.dtype)) > 0
            tok = draw(torch.softmax(warp_scores(logits, cfg, t, stop_t, seen), -1))
        else:
            tok = draw(probs)  # (b,)
        # Rows that stopped earlier but are still in the batch write too: cut at `end` below.
        tokens[rows, t] = tok
        if record:
            out["logprobs"][rows, t], out["entropy"][rows, t] = ops.token_logprobs_and_entropy(
                logp, tok, probs=probs)
            if value_fn is not None:
                out["values"][rows, t] = value_fn(hidden)
        steps = t + 1
        stop = torch.isin(tok, stop_t) if stop_ids else torch.zeros_like(done)
        if on_strings is not None:
            stop |= on_strings(tokens[rows, :t + 1])
        if seen is not None:
            seen[torch.arange(len(tok), device=dev), tok] = True
        stop &= ~done
        end[rows] = torch.where(stop, t + 1, end[rows])  # on the device: no sync
        done |= stop
        if t == R - 1:
            break
        x = tok[:, None]
        mask = torch.cat([mask, mask.new_ones(len(tok), 1)], dim=1)
        pos = pos[:, -1:] + 1
        if on_strings is None and (t + 1) % sync_every:
            continue
        n_done = int(done.sum())  # the step's one host sync
        if n_done == len(done):
            break
        if n_done >= max(1, len(done) // 8):  # drop stopped rows from the batch and the cache
            keep = (~done).nonzero().squeeze(1)
            if keep_cache:
                parts.append(_cache_part(cache, mask, rows, done.nonzero().squeeze(1)))
            cache.batch_select_indices(keep)
            x, mask, pos, rows, done = x[keep], mask[keep], pos[keep], rows[keep], done[keep]
            if seen is not None:
                seen = seen[keep]
    steps = min(steps, int(end.max()))  # rows may all have stopped between two syncs
    after = torch.arange(steps, device=dev)[None, :] >= end[:, None]  # past each row's stop
    if keep_cache:
        parts.append(_cache_part(cache, mask, rows, torch.arange(len(rows), device=dev)))
    kept = {"cache_parts": parts} if keep_cache else {}
    return {"response_ids": tokens[:, :steps].masked_fill(after, pad),
            **{k: v[:, :steps].masked_fill(after, 0.0) for k, v in out.items()}, **kept}


@torch.no_grad()
def generate(model, prompts: list[Prompt], tokenizer, cfg: GenerationConfig,
             device: torch.device | str = "cpu", record: bool = False,
             value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Rollout:
    """Sample one response per prompt and build the (token-level) ``Rollout``.

    Prompts are left-padded so that every response starts at column P; generation runs with a
    KV cache in chunks of ``generation.batch_size``, with the native loop
    (:func:`sample_native`) or ``model.generate`` (``generation.backend``). Everything after the
    first stop is replaced by padding and masked out.

    ``record`` (native backend only): fill ``logprobs`` and ``entropy`` (and ``values`` from
    ``value_fn``, see :func:`sample_native`) from the sampling pass itself.
    """
    stop_ids = stop_token_ids(cfg, tokenizer)
    prompt_ids, prompt_mask = left_pad([p.input_ids for p in prompts], tokenizer.pad_token_id)
    P = prompt_ids.shape[1]
    chunk = cfg.batch_size or len(prompts)
    native = cfg.backend == "native" and native_supported(model)
    if cfg.backend == "native" and not native:
        logger.warning("generation.backend=native: %s's backbone takes no KV cache argument; "
                       "sampling with model.generate instead", type(model).__name__)
    gen_cfg = None if native else hf_generation_config(cfg, tokenizer, stop_ids)
    was_training = model.training
    model.eval()
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(prompts), chunk):
        ids = prompt_ids[start:start + chunk].to(device)
        mask = prompt_mask[start:start + chunk].to(device)
        if native:
            part = sample_native(model, ids, mask, cfg, stop_ids, tokenizer, record, value_fn)
            parts.append({k: v.cpu() for k, v in part.items()})
            continue
        kwargs = {}
        if cfg.stop_strings:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [StopOnStrings(cfg.stop_strings, tokenizer, P)])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                             **kwargs)
        parts.append({"response_ids": out[:, P:].cpu()})
    model.train(was_training)
    R = max(part["response_ids"].shape[1] for part in parts)

    def column(key: str, value) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(part[key], (0, R - part[key].shape[1]),
                                                  value=value) for part in parts])

    response_ids = column("response_ids", tokenizer.pad_token_id)
    lengths, stopped = find_stops(response_ids, stop_ids, cfg.stop_strings, tokenizer)
    R = int(lengths.max())
    response_ids = response_ids[:, :R]
    response_mask = (torch.arange(R)[None, :] < lengths[:, None]).long()
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    recorded = {key: column(key, 0.0)[:, :R] * response_mask
                for key in ("logprobs", "entropy", "values") if key in parts[0]}
    return Rollout(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        prompt_length=P,
        response_mask=response_mask,
        stopped=stopped,
        prompts=list(prompts),
        response_texts=decode_responses(response_ids, lengths, tokenizer, cfg.stop_strings),
        **recorded,
    )
