"""Reward sources (reward models and Python functions), their weighted sum, and score processing.

A reward function has the signature ``fn(prompts: list[str], responses: list[str], **kwargs)
-> list[float]``. It receives the prompt texts (chat prompts as rendered by the policy's chat
template), the response texts (special tokens and stop strings removed), the ``kwargs`` from its
config entry, every other dataset column as a list, and ``stopped`` (list[bool]: the response
emitted a stop token).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import numbers
import os
import re
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from . import builtin, ops
from .config import ModelConfig, RewardConfig, RewardSource
from .errors import RewardError
from .models import (
    active_adapter,
    backbone_hidden,
    build_actor_critic,
    load_pretrained,
    load_sequence_classifier,
    resolve,
    zero3_partitioned_loading,
)
from .ops import RunningMoments
from .rollout import Rollout

# --------------------------------------------------------------------------- built-in rewards

def keyword_share(prompts: list[str], responses: list[str], words: list[str] | None = None,
                  **kwargs) -> list[float]:
    """Share of the words of each response that are in ``words`` (default: positive words such as
    "good", "great", "happy"); 0 for an empty response. The reward of the built-in tiny task."""
    targets = set(words if words is not None else builtin.POSITIVE_WORDS)
    scores = []
    for text in responses:
        tokens = re.findall(r"[\w']+|[^\w\s]", text.lower())
        scores.append(sum(t in targets for t in tokens) / len(tokens) if tokens else 0.0)
    return scores


def length_target(prompts: list[str], responses: list[str], target: int = 10,
                  **kwargs) -> list[float]:
    """``-|words - target| / target`` per response: 0 for exactly ``target`` words, -1 for none
    (or twice as many). A dense reward for concise answers."""
    return [-abs(len(r.split()) - target) / target for r in responses]


def repeated_words(prompts: list[str], responses: list[str], **kwargs) -> list[float]:
    """Minus the share of each response's words that repeat an earlier word (case and punctuation
    ignored): 0 when every word is new, -0.75 for "very very very very". A fluency guard that
    penalises the loops a reward-hacking policy falls into; 0 for an empty response."""
    scores = []
    for text in responses:
        words = [w for w in re.findall(r"[\w']+", text.lower())]
        scores.append(-(len(words) - len(set(words))) / len(words) if words else 0.0)
    return scores


def response_length(prompts: list[str], responses: list[str], **kwargs) -> list[float]:
    """Number of whitespace-separated words in each response."""
    return [float(len(r.split())) for r in responses]


# --------------------------------------------------------------------------- loading

def load_function(spec: str, key: str = "reward.sources[].function") -> Callable:
    """Import ``package.module:function`` or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise RewardError(f"{key}: expected 'package.module:function' or "
                          f"'path/to/file.py:function', got {spec!r}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"{key}: file {target!r} not found")
        mod_name = f"rlhf_ppo_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"{key}: importing {target!r} failed: {type(e).__name__}: {e}") from e
    else:
        # Console scripts do not put the working directory on sys.path; `python -m` does. A
        # user's own `myrewards:fn` next to the config should import either way.
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(target)
        except Exception as e:  # ImportError, or whatever the module raises while importing
            raise RewardError(f"{key}: cannot import module {target!r}: "
                              f"{type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"{key}: {target!r} has no function {name!r}")
    return fn


def _check_scores(values, n: int, where: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().flatten().tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"{where}: returned {type(values).__name__}; expected a list of "
                          f"{n} numbers") from None
    if len(values) != n:
        raise RewardError(f"{where}: returned {len(values)} scores for {n} responses; expected "
                          "one number per response")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"{where}: score {i} is {type(v).__name__} {v!r}; expected a number")
    # NaN / inf are numbers: the trainer's `on_nonfinite` policy decides what happens to them.
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


class FunctionReward:
    """A Python reward function with its config ``kwargs``."""

    def __init__(self, source: RewardSource, key: str):
        self.fn, self.kwargs, self.key = load_function(source.function, f"{key}.function"), \
            dict(source.kwargs), key
        self.name = source.function
        # A function without **kwargs gets only the keyword arguments it names.
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):
            params = []
        self.accepts = (None if not params or any(p.kind is p.VAR_KEYWORD for p in params)
                        else {p.name for p in params})

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        columns: dict[str, list] = {}
        for p in rollout.prompts:
            for k, v in p.extra.items():
                if k not in ("prompts", "responses"):  # the positional arguments win
                    columns.setdefault(k, []).append(v)
        kwargs = {**columns, "stopped": rollout.stopped.tolist(), **self.kwargs}
        if self.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        prompts = [p.text for p in rollout.prompts]
        try:
            out = self.fn(prompts, list(rollout.response_texts), **kwargs)
        except Exception as e:
            raise RewardError(f"{self.key} ({self.name}) raised {type(e).__name__}: {e}") from e
        return _check_scores(out, len(prompts), f"{self.key} ({self.name})")


class ModelReward:
    """An ``AutoModelForSequenceClassification`` scored at the last valid token of each sequence.

    When its tokenizer equals the policy's, it reads the rollout's token ids (stop token
    included). Otherwise the text is re-tokenized with its own tokenizer: through its chat template
    when it has one (the prompt's messages, or the prompt text as a user turn, then the response
    as the assistant turn), else the prompt and response tokens decoded together.
    """

    def __init__(self, source: RewardSource, key: str, model_cfg: ModelConfig, policy_tokenizer,
                 batch_size: int):
        from transformers import AutoTokenizer


        self.key, self.name, self.batch_size = key, source.model, batch_size
        with zero3_partitioned_loading(model_cfg.shard_frozen_models):
            self.model = load_sequence_classifier(source.model, model_cfg, f"{key}.model")
        self.scorer = SequenceScorer(self.model)
        path = resolve(source.model, f"{key}.model")
        self.path = path
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, f"{key}.model",
                               trust_remote_code=model_cfg.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "right"
        self.policy_tokenizer = policy_tokenizer
        self.same_tokenizer = self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()

    @property
    def device(self) -> torch.device:
        return next(self.scorer.parameters()).device

    def _texts(self, rollout: Rollout) -> list[str]:
        if self.tokenizer.chat_template is None:
            # Decode prompt and response together: decoding them apart loses the space between
            # them for many tokenizers (SentencePiece, word-level).
            return [self.policy_tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                    for ids, mask in zip(rollout.input_ids, rollout.attention_mask)]
        texts = []
        for prompt, response in zip(rollout.prompts, rollout.response_texts):
            messages = list(prompt.messages or [{"role": "user", "content": prompt.text}])
            messages.append({"role": "assistant", "content": response})
            texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
        return texts

    def _inputs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        if self.same_tokenizer:
            return rollout.input_ids, rollout.attention_mask
        add_special = self.tokenizer.chat_template is None
        enc = self.tokenizer(self._texts(rollout), padding=True, return_tensors="pt",
                             add_special_tokens=add_special, truncation=True,
                             max_length=min(self.tokenizer.model_max_length, 1 << 20))
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        input_ids, attention_mask = self._inputs(rollout)
        scores = []
        for s in range(0, input_ids.shape[0], self.batch_size):
            ids = input_ids[s:s + self.batch_size].to(self.device)
            mask = attention_mask[s:s + self.batch_size].to(self.device)
            scores.append(self.scorer(ids, mask).float().cpu())
        return torch.cat(scores)  # non-finite scores are the trainer's `on_nonfinite` business


def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score ``(B,)`` read at the last position where ``attention_mask`` is 1.

    Decoder reward models (a ``score`` head) are applied per position and read at that index, not
    at "the last non-pad token id": with pad == EOS that would skip a response's final EOS.
    Other models (e.g. encoder classifiers) use their own pooling.
    """
    if hasattr(model, "score"):
        hidden = backbone_hidden(model, input_ids, attention_mask)  # (B, L, H)
        last = ops.last_token_index(attention_mask)  # (B,)
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return model.score(h_last).squeeze(-1)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]


class SequenceScorer(torch.nn.Module):
    """A frozen reward model whose ``forward`` is :func:`score_sequences`: one root module, so an
    engine can shard it for inference."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])
        self.adapters_off = False
        """True when the model also carries a trained LoRA critic adapter: scoring runs without it"""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), active_adapter(self.model, None) if self.adapters_off else nullcontext():
            return score_sequences(self.model, input_ids, attention_mask)


class RewardSum:
    """All configured sources, their weighted sum, and the score post-processing."""

    def __init__(self, cfg: RewardConfig, model_cfg: ModelConfig, policy_tokenizer):
        self.cfg = cfg
        self.sources = []
        for i, src in enumerate(cfg.sources):
            key = f"reward.sources[{i}]"
            if src.function is not None:
                self.sources.append((src.weight, FunctionReward(src, key)))
            else:
                self.sources.append((src.weight, ModelReward(src, key, model_cfg,
                                                             policy_tokenizer, cfg.batch_size)))
        self.moments = RunningMoments()
        self.nonfinite_sources: list[str] = []
        """sources that returned NaN / inf in the last call"""

    def state_dict(self) -> dict[str, dict]:
        """The running score statistics (``reward.normalize``)."""
        return {"score_moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Restore :meth:`state_dict`."""
        self.moments.load_state_dict(state["score_moments"])

    def build_actor_critic(self, model_cfg: ModelConfig, peft_cfg):
        """:func:`models.build_actor_critic` with this reward's first reward model available as the
        critic's start (``model.critic_init: reward``; with LoRA the critic is an adapter on that
        very module, whose scoring then runs with the adapter off). Returns ``(actor_critic,
        reference, the scorer inside the actor-critic or None)``."""
        rm = next(iter(self.model_sources()), None)
        model, ref = build_actor_critic(model_cfg, peft_cfg, reward_model=rm.model if rm else None,
                                        reward_path=rm.path if rm else None)
        scorer = rm.scorer if model.critic_on_reward_model else None
        if scorer is not None:
            scorer.adapters_off = True
        return model, ref, scorer

    def model_sources(self) -> list[ModelReward]:
        """The reward-model sources (their ``.scorer`` is placed on the device by the trainer)."""
        return [s for _, s in self.sources if isinstance(s, ModelReward)]

    def __call__(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Scores ``(B,)`` for the rollout and per-source raw means for the metrics."""
        total = torch.zeros(len(rollout.prompts))
        metrics = {}
        self.nonfinite_sources = []
        for i, (weight, source) in enumerate(self.sources):
            raw = source(rollout)
            if not torch.isfinite(raw).all():
                self.nonfinite_sources.append(f"reward.sources[{i}] ({source.name})")
            metrics[f"reward/source{i}_mean"] = raw.mean().item()
            total += weight * raw
        return total, metrics

    def penalize(self, raw: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        """Scores with the missing-stop penalty subtracted where ``stopped`` is False."""
        scores = raw.clone()
        if self.cfg.missing_stop_penalty is not None:
            scores[~stopped] -= self.cfg.missing_stop_penalty
        return scores

    def update_moments(self, raw: torch.Tensor, stopped: torch.Tensor) -> None:
        """Fold a batch (normally every process's) into the running normalisation statistics."""
        if self.cfg.normalize:
            self.moments.update(self.penalize(raw, stopped))

    def process(self, raw: torch.Tensor, stopped: torch.Tensor,
                update_moments: bool = True) -> torch.Tensor:
        """Missing-stop penalty, then running normalisation, then clipping.

        ``update_moments``: fold this batch into the running statistics first (single process;
        the trainer calls :meth:`update_moments` with the scores of all processes instead).
        """
        if update_moments:
            self.update_moments(raw, stopped)
        scores = self.penalize(raw, stopped)
        if self.cfg.normalize:
            scores = (scores - self.moments.mean) / max(self.moments.std, 1e-8)
        if self.cfg.clip is not None:
            scores = scores.clamp(-self.cfg.clip, self.cfg.clip)
        return scores
