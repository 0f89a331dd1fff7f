"""Reward sources (reward models, Python functions, reward servers: :mod:`.remote`), their
weighted sum, and score processing.

A reward function is written in one of two styles, told apart by its signature
(:func:`function_style`):

- rlhf_ppo's ``fn(prompts: list[str], responses: list[str], **kwargs) -> list[float]``: the prompt
  texts (chat prompts as rendered by the policy's chat template) and the response texts (special
  tokens and stop strings removed) by position;
- TRL's ``fn(completions, **kwargs) -> list[float | None]``, called with keywords only, as TRL's
  GRPO/RLOO trainers call it: ``prompts`` (the dataset's prompts: chat messages for a chat
  dataset), ``completions`` (strings, or ``[{"role": "assistant", "content": ...}]`` per response
  when the prompts are chat messages) and ``completion_ids`` (the response token ids, the stop
  token included). ``None`` (or NaN) for a response means "not scored by this function": it is
  left out of the weighted sum, like TRL's ``nansum``.

Both also receive the ``kwargs`` from their config entry, every other dataset column as a list
(with the type the dataset loader gave it), and ``stopped`` (list[bool]: the response emitted a
stop token); a function without ``**kwargs`` gets only the keyword arguments it names.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ops
from .assets import POSITIVE_WORDS
from .config import ModelConfig, RewardConfig, RewardSource
from .data import Prompt
from .errors import RewardError, located, raised
from .lm import backbone_hidden
from .loading import load_pretrained, load_sequence_classifier, resolve, zero3_partitioned_loading
from .lora import active_adapter
from .models import CriticStart
from .ops import RunningMoments
from .packing import pack_for, packed_hidden
from .remote import RemoteReward
from .rollout import Rollout

# --------------------------------------------------------------------------- built-in rewards

def keyword_share(prompts: list[str], responses: list[str], words: list[str] | None = None,
                  **kwargs) -> list[float]:
    """Share of the words of each response that are in ``words`` (default: positive words such as
    "good", "great", "happy"); 0 for an empty response. The reward of the built-in tiny task."""
    targets = set(words if words is not None else POSITIVE_WORDS)
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
            raise RewardError(f"{key}: importing {target!r} failed: {type(e).__name__}: {e}"
                              + located(e, str(path))) from e
    else:
        # Console scripts do not put the working directory on sys.path; `python -m` does. A
        # user's own `myrewards:fn` next to the config should import either way.
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(target)
        except Exception as e:  # ImportError, or whatever the module raises while importing
            raise RewardError(f"{key}: cannot import module {target!r}: "
                              f"{type(e).__name__}: {e}" + located(e)) from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"{key}: {target!r} has no function {name!r}")
    return fn


def _check_scores(values, n: int, where: str, allow_none: bool = False) -> torch.Tensor:
    """Scores as a float32 tensor ``[n]``; ``allow_none``: a None score becomes NaN (TRL style)."""
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
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            hint = (" (None, for a response a function does not score, is accepted from TRL-style "
                    "functions `fn(completions, **kwargs)`)" if v is None else "")
            raise RewardError(f"{where}: score {i} is {type(v).__name__} {v!r}; expected a "
                              f"number{hint}")
    # NaN / inf are numbers: the trainer's `on_nonfinite` policy decides what happens to them.
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)


OWN_STYLE, TRL_STYLE = "rlhf_ppo", "trl"
ACCEPTED_SIGNATURES = (
    "rlhf_ppo's `fn(prompts, responses, **kwargs) -> list[float]` (prompt and response texts by "
    "position) or TRL's `fn(completions, **kwargs) -> list[float | None]` (called with keywords "
    "only: prompts, completions, completion_ids and the dataset columns)")


def function_style(fn: Callable, where: str = "reward function") -> tuple[str, set[str] | None]:
    """The calling convention of a reward function, from its signature, and the keyword arguments
    it accepts (None: it takes ``**kwargs``, so everything).

    1. a parameter named ``completions`` (not positional-only): TRL style;
    2. else two positional parameters (or ``*args``): rlhf_ppo style ``fn(prompts, responses)``;
    3. else only ``**kwargs`` and at most one positional-or-keyword parameter (e.g. TRL's
       ``fn(completion_ids, **kwargs)`` or ``fn(**kwargs)``): TRL style;
    4. else RewardError showing both accepted signatures.

    A callable whose signature cannot be read (some builtins) is taken as rlhf_ppo style.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return OWN_STYLE, None
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepts = None if var_kw else names
    if "completions" in names:
        return TRL_STYLE, accepts
    if var_pos or len(positional) >= 2:
        return OWN_STYLE, accepts
    if var_kw and not any(p.kind is p.POSITIONAL_ONLY for p in positional):
        return TRL_STYLE, accepts
    try:
        shown = f"{getattr(fn, '__name__', 'fn')}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        shown = repr(fn)
    raise RewardError(f"{where}: the signature {shown} fits neither accepted reward function "
                      f"style; expected {ACCEPTED_SIGNATURES}")


@dataclass
class TrainerState:
    """What a TRL-style reward function gets as ``trainer_state`` (the fields of TRL's
    ``TrainerState`` that reward schedules read): ``global_step``, updates done before this
    scoring (the iteration number - 1); ``max_steps``, the run's iterations."""

    global_step: int = 0
    max_steps: int = 0


class TRLCallbacks:
    """The extra keyword arguments TRL 1.12's GRPOTrainer gives reward functions, so a function
    written for it runs unchanged: ``trainer_state`` (:class:`TrainerState`), ``log_metric(name,
    value)`` (the values of one scoring call become the metric ``reward/NAME``, their mean) and
    ``log_extra(column, values)`` (TRL adds columns to its completions table; rlhf_ppo has no such
    table and drops them)."""

    def __init__(self):
        self.state = TrainerState()
        self.logged: dict[str, list[float]] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.logged.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        """Accepted and dropped (see the class docstring)."""

    def kwargs(self) -> dict:
        return {"trainer_state": self.state, "log_metric": self.log_metric, "log_extra": self.log_extra}

    def pop_metrics(self) -> dict[str, float]:
        """``reward/NAME``: the mean of the values logged since the last call."""
        out = {f"reward/{k}": sum(v) / len(v) for k, v in self.logged.items() if v}
        self.logged = {}
        return out


class FunctionReward:
    """A Python reward function (rlhf_ppo or TRL style, see :func:`function_style`) with its config
    ``kwargs``; ``callbacks``: the TRL extras a TRL-style function gets (shared by a run's sources)."""

    def __init__(self, source: RewardSource, key: str, callbacks: TRLCallbacks | None = None):
        self.callbacks = callbacks or TRLCallbacks()
        self.fn, self.kwargs, self.key = load_function(source.function, f"{key}.function"), \
            dict(source.kwargs), key
        self.name = source.function
        # accepts: the keyword arguments a function without **kwargs names (None: all of them)
        self.style, self.accepts = function_style(self.fn, f"{key}.function ({source.function})")
        self.positional: tuple[str, ...] = ()
        """names of the parameters that take prompts and responses (rlhf_ppo style)"""
        self.required: set[str] = set()
        """keyword arguments the function cannot do without (dataset columns, config kwargs)"""
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        if self.style == OWN_STYLE:
            self.positional = tuple(p.name for p in params
                                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[:2]
        self.required = {p.name for p in params if p.default is p.empty
                         and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                         and p.name not in self.positional}

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        """Scores ``[B]`` (NaN where a TRL-style function returned None)."""
        return self.score(rollout)[0]

    def arguments(self, rollout: Rollout) -> tuple[tuple, dict]:
        """The positional and keyword arguments of the call for ``rollout``."""
        ours = (("prompts", "completions", "completion_ids") if self.style == TRL_STYLE
                else ("prompts", "responses", *self.positional))
        columns: dict[str, list] = {}
        for p in rollout.prompts:
            for k, v in p.extra.items():
                if k not in ours:  # the prompts and responses arguments win
                    columns.setdefault(k, []).append(v)
        kwargs = {**columns, "stopped": rollout.stopped.tolist(), **self.kwargs}
        if rollout.environments is not None:  # as TRL: each completion's environment instance
            kwargs["environments"] = rollout.environments
        texts = list(rollout.response_texts)
        if self.style == OWN_STYLE:
            args = ([p.text for p in rollout.prompts], texts)
        else:
            # As TRL's GRPOTrainer._calculate_rewards: the dataset's prompts, and the completions
            # as chat messages when the (first) prompt is one.
            chat = bool(rollout.prompts) and rollout.prompts[0].messages is not None
            # the whole response region the model read, tool outputs and environment turns
            # included (a multi-turn action mask has holes; single-turn: the same as its sum)
            read = rollout.attention_mask[:, rollout.prompt_length:]
            lengths = torch.where(read.any(-1), ops.last_token_index(read) + 1, 0).tolist()
            if chat and rollout.completion_messages is not None:  # a tool-calling conversation
                completions = copy.deepcopy(rollout.completion_messages)
            else:
                completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
            kwargs.update(
                self.callbacks.kwargs(),
                prompts=[copy.deepcopy(p.messages) if p.messages is not None else p.text
                         for p in rollout.prompts],
                completions=completions,
                completion_ids=[rollout.response_ids[b, :int(n)].tolist()
                                for b, n in enumerate(lengths)])
            args = ()
        if self.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        return args, kwargs

    def score(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` and the mask ``[B]`` of the responses the function scored (a TRL-style
        function's None or NaN: not scored)."""
        args, kwargs = self.arguments(rollout)
        where = f"{self.key} ({self.name})"
        missing = sorted(self.required - set(kwargs))
        if missing:
            columns = sorted(rollout.prompts[0].extra) if rollout.prompts else []
            raise RewardError(f"{where}: needs the argument(s) {', '.join(missing)}, which are "
                              f"neither dataset columns (the columns are {columns}) nor in its "
                              "config kwargs")
        try:
            out = self.fn(*args, **kwargs)
            if inspect.isawaitable(out):  # an async reward function, as TRL accepts
                out = asyncio.run(out)
        except Exception as e:
            raise RewardError(raised(where, e, self.fn)) from e
        trl = self.style == TRL_STYLE
        scores = _check_scores(out, len(rollout.prompts), where, allow_none=trl)
        scored = ~torch.isnan(scores) if trl else torch.ones(len(scores), dtype=torch.bool)
        return scores, scored


class ModelReward:
    """An ``AutoModelForSequenceClassification`` scored at the last valid token of each sequence.

    When its tokenizer equals the policy's, it reads the rollout's token ids (stop token
    included). Otherwise the text is re-tokenized with its own tokenizer: through its chat template
    when it has one (the prompt's messages, or the prompt text as a user turn, then the response
    as the assistant turn), else the prompt and response tokens decoded together.
    ``policy_tokenizer`` None: texts only (``rlhf-ppo serve-reward``, :mod:`.serve`).
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
        self.same_tokenizer = (policy_tokenizer is not None
                               and self.tokenizer.get_vocab() == policy_tokenizer.get_vocab())

    @property
    def device(self) -> torch.device:
        return next(self.scorer.parameters()).device

    def _texts(self, rollout: Rollout) -> list[str]:
        if self.tokenizer.chat_template is None:
            # Decode prompt and response together: decoding them apart loses the space between
            # them for many tokenizers (SentencePiece, word-level).
            return [self.policy_tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                    for ids, mask in zip(rollout.input_ids, rollout.attention_mask)]
        return self.chat_texts(rollout.prompts, rollout.response_texts)

    def chat_texts(self, prompts: list[Prompt], responses: list[str]) -> list[str]:
        """Each conversation through the reward model's chat template: the prompt's messages (or
        its text as a user turn), then the response as the assistant turn."""
        texts = []
        for prompt, response in zip(prompts, responses):
            messages = list(prompt.messages or [{"role": "user", "content": prompt.text}])
            messages.append({"role": "assistant", "content": response})
            texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
        return texts

    def _inputs(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        if self.same_tokenizer:
            return rollout.input_ids, rollout.attention_mask
        return self.tokenize(self._texts(rollout))

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[B, L]`` (right-padded) of ``texts`` for this model."""
        add_special = self.tokenizer.chat_template is None
        enc = self.tokenizer(texts, padding=True, return_tensors="pt",
                             add_special_tokens=add_special, truncation=True,
                             max_length=min(self.tokenizer.model_max_length, 1 << 20))
        return enc["input_ids"], enc["attention_mask"]

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return self.score_tokens(*self._inputs(rollout))

    @torch.no_grad()
    def score_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` of ``input_ids`` ``[B, L]``, ``batch_size`` sequences per forward pass."""
        scores = []
        for s in range(0, input_ids.shape[0], self.batch_size):
            ids = input_ids[s:s + self.batch_size].to(self.device)
            mask = attention_mask[s:s + self.batch_size].to(self.device)
            scores.append(self.scorer(ids, mask).float().cpu())
        return torch.cat(scores)  # non-finite scores are the trainer's `on_nonfinite` business


def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pack_sequences: bool = False) -> torch.Tensor:
    """Reward-model score ``(B,)`` read at the last position where ``attention_mask`` is 1.

    Decoder reward models (a ``score`` head) are applied per position and read at that index, not
    at "the last non-pad token id": with pad == EOS that would skip a response's final EOS.
    Other models (e.g. encoder classifiers) use their own pooling. ``pack_sequences``: a decoder
    reward model runs one padding-free pass (:mod:`.packing`).
    """
    if hasattr(model, "score") and pack_sequences:
        packed = pack_for(model, input_ids, attention_mask, input_ids.shape[1])
        return model.score(packed_hidden(model, packed)[packed.last_index]).squeeze(-1)
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
        self.pack_sequences = False
        """True: padding-free forward passes (:mod:`.packing`)"""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), active_adapter(self.model, None) if self.adapters_off else nullcontext():
            return score_sequences(self.model, input_ids, attention_mask, self.pack_sequences)


class RewardSum:
    """All configured sources, their weighted sum, and the score post-processing."""

    def __init__(self, cfg: RewardConfig, model_cfg: ModelConfig, policy_tokenizer):
        self.cfg = cfg
        self.sources = []
        self.trl = TRLCallbacks()
        """``trainer_state`` / ``log_metric`` / ``log_extra`` of the TRL-style functions"""
        for i, src in enumerate(cfg.sources):
            key = f"reward.sources[{i}]"
            if src.function is not None:
                self.sources.append((src.weight, FunctionReward(src, key, self.trl)))
            elif src.url is not None:
                self.sources.append((src.weight, RemoteReward(src, key, policy_tokenizer)))
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

    def critic_start_model(self) -> CriticStart | None:
        """The reward model a critic may start from (``model.critic_init: reward``): the first
        reward-model source's model, path and scorer; None without a reward-model source."""
        rm = next(iter(self.model_sources()), None)
        return None if rm is None else CriticStart(rm.model, rm.path, rm.scorer)

    def model_sources(self) -> list[ModelReward]:
        """The reward-model sources (their ``.scorer`` is placed on the device by the trainer)."""
        return [s for _, s in self.sources if isinstance(s, ModelReward)]

    def score_sources(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Each source's raw scores ``[S, B]`` and the mask ``[S, B]`` of the scores it gave (False
        where a TRL-style function returned None or NaN; the score there is NaN)."""
        raw, scored = [], []
        for _, source in self.sources:
            if isinstance(source, (FunctionReward, RemoteReward)):
                r, s = source.score(rollout)
            else:
                r = source(rollout)
                s = torch.ones(r.shape, dtype=torch.bool)
            raw.append(r.float())
            scored.append(s)
        return torch.stack(raw), torch.stack(scored)

    def __call__(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """Scores ``(B,)`` for the rollout and per-source raw means for the metrics.

        The weighted sum skips the responses a source did not score (TRL's None: ``nansum``); a
        response that no source scored gets NaN, which the trainer's ``on_nonfinite`` handles.
        """
        raw, scored = self.score_sources(rollout)
        total = torch.zeros(len(rollout.prompts))
        metrics = {}
        self.nonfinite_sources = []
        for i, (weight, source) in enumerate(self.sources):
            values = raw[i][scored[i]]
            if not torch.isfinite(values).all():
                self.nonfinite_sources.append(f"reward.sources[{i}] ({source.name})")
            metrics[f"reward/source{i}_mean"] = (values.mean().item() if len(values)
                                                 else math.nan)
            total += torch.where(scored[i], weight * raw[i], 0.0)
        unscored = ~scored.any(0)
        if unscored.any():
            total[unscored] = math.nan
            self.nonfinite_sources.append(
                f"{int(unscored.sum())} of {len(unscored)} responses that no reward source scored "
                "(every one returned None)")
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
