"""Generation and the ``Rollout`` batch that crosses from sampling to the PPO update.

Shape legend: ``B`` rollouts, ``P`` prompt length (left-padded), ``R`` response length
(right-padded after the first stop token), ``L = P + R``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
from .data import Prompt, left_pad

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One iteration's experience. Per-token tensors cover response tokens only; ``response_mask``
    is 1 on tokens up to and including the first stop token, 0 after it."""

    # ---- tokens
    input_ids: torch.Tensor
    """(B, L) prompt (left-padded to P) then response (padded after the stop)"""
    attention_mask: torch.Tensor
    """(B, L) 1 on real prompt tokens and valid response tokens"""
    prompt_length: int
    """P: the response starts at column P"""
    response_mask: torch.Tensor
    """(B, R) 1 on valid response tokens (stop token included)"""
    stopped: torch.Tensor
    """(B,) bool: the response ended with a stop token (else it hit max_new_tokens)"""
    prompts: list[Prompt] = field(default_factory=list)
    """the B prompts"""
    response_texts: list[str] = field(default_factory=list)
    """decoded responses (special tokens and stop strings removed)"""
    # ---- per token, from the models (filled by the trainer)
    logprobs: torch.Tensor | None = None
    """(B, R) log pi_old(a_t|s_t) at rollout time"""
    ref_logprobs: torch.Tensor | None = None
    """(B, R) log pi_ref(a_t|s_t)"""
    values: torch.Tensor | None = None
    """(B, R) V_old(s_t)"""
    # ---- per sequence
    scores: torch.Tensor | None = None
    """(B,) final score after penalties, normalisation and clipping"""
    # ---- derived
    rewards: torch.Tensor | None = None
    """(B, R) per-token rewards: -kl_coef * KL_t, plus the score on the last valid token"""
    advantages: torch.Tensor | None = None
    """(B, R) GAE advantages (whitened if configured)"""
    returns: torch.Tensor | None = None
    """(B, R) value targets"""

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, R) response tokens."""
        return self.input_ids[:, self.prompt_length:]

    def subset(self, rows: list[int]) -> Rollout:
        """A new rollout of the given rows (e.g. one process's share of a batch)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[rows]
            elif isinstance(value, list):
                value = [value[i] for i in rows]
            out[f.name] = value
        return Rollout(**out)

    def select(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """The tensors the update needs, for the rows in ``index`` (a minibatch)."""
        names = ("input_ids", "attention_mask", "response_mask", "logprobs", "values",
                 "advantages", "returns")
        return {n: getattr(self, n)[index] for n in names}


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


def hf_generation_config(cfg: GenerationConfig, tokenizer, stop_ids: list[int]):
    """A transformers ``GenerationConfig`` with every sampling knob set explicitly, so neither
    the model's ``generation_config.json`` nor library defaults (``top_k=50``) change the
    distribution behind our back."""
    from transformers import GenerationConfig as HFGenerationConfig

    return HFGenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
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


@torch.no_grad()
def generate(model, prompts: list[Prompt], tokenizer, cfg: GenerationConfig,
             device: torch.device | str = "cpu") -> Rollout:
    """Sample one response per prompt and build the (token-level) ``Rollout``.

    Prompts are left-padded so that every response starts at column P; generation runs with a
    KV cache in chunks of ``generation.batch_size``. Everything after the first stop is replaced
    by padding and masked out.
    """
    stop_ids = stop_token_ids(cfg, tokenizer)
    gen_cfg = hf_generation_config(cfg, tokenizer, stop_ids)
    prompt_ids, prompt_mask = left_pad([p.input_ids for p in prompts], tokenizer.pad_token_id)
    P = prompt_ids.shape[1]
    chunk = cfg.batch_size or len(prompts)
    was_training = model.training
    model.eval()
    responses = []
    for start in range(0, len(prompts), chunk):
        ids = prompt_ids[start:start + chunk].to(device)
        mask = prompt_mask[start:start + chunk].to(device)
        kwargs = {}
        if cfg.stop_strings:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [StopOnStrings(cfg.stop_strings, tokenizer, P)])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                             **kwargs)
        responses.append(out[:, P:].cpu())
    model.train(was_training)
    R = max(r.shape[1] for r in responses)
    response_ids = torch.cat([torch.nn.functional.pad(r, (0, R - r.shape[1]),
                                                      value=tokenizer.pad_token_id)
                              for r in responses])
    lengths, stopped = find_stops(response_ids, stop_ids, cfg.stop_strings, tokenizer)
    R = int(lengths.max())
    response_ids = response_ids[:, :R]
    response_mask = (torch.arange(R)[None, :] < lengths[:, None]).long()
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return Rollout(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        prompt_length=P,
        response_mask=response_mask,
        stopped=stopped,
        prompts=list(prompts),
        response_texts=decode_responses(response_ids, lengths, tokenizer, cfg.stop_strings),
    )
