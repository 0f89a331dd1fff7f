"""Reward-model training (``rlhf-ppo reward``) on preference pairs with the Bradley-Terry loss.

The model is an ``AutoModelForSequenceClassification`` with one output, scored exactly as PPO
scores it (``rewards.ModelReward`` / ``rewards.score_sequences``): at the last attended position,
on the sequence PPO will build. With the policy's tokenizer (the usual case: a reward model
started from the SFT policy) that is the prompt's tokens as ``data.load_prompts`` encodes them,
the response's tokens, and EOS (a rollout that stopped ends with it). With another tokenizer it is
the text ``ModelReward`` re-tokenizes: the conversation through the reward model's chat template,
or prompt and response decoded together. ``data.policy_tokenizer`` names the policy's tokenizer
when it is not the reward model's own.

Formats (TRL's, :mod:`formats`, docs/data.md): preference (``prompt``, ``chosen``, ``rejected``)
and implicit-prompt preference (``chosen`` / ``rejected`` holding the whole conversation), standard
or conversational; Anthropic HH transcripts are parsed into chat messages, and conversations that
repeat the prompt (UltraFeedback) keep it once.

Shape legend: ``B`` pairs in a micro-batch, ``L`` padded sequence length.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import finetune as ft
from . import formats
from .config import ModelConfig, PeftConfig, check
from .data import DataError, render_prompt, warn_unknown_tokens
from .lm import transformer
from .loading import enable_activation_checkpointing, load_sequence_classifier, load_tokenizer
from .lora import is_peft
from .rewards import score_sequences

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config

@dataclass
class RewardDataConfig(ft.FinetuneDataConfig):
    path: str | None = None
    """preference pairs: local .json/.jsonl/.csv/.parquet file, `save_to_disk` folder, or hub id"""
    prompt_column: str = "prompt"
    """optional column with the prompt (string or messages) of both sides; without it: their common start"""
    chosen_column: str = "chosen"
    """column with the preferred response: text, or chat messages ending with the assistant's"""
    rejected_column: str = "rejected"
    """column with the other response, in the same form"""
    margin_column: str = "margin"
    """optional column with a margin m per pair: loss -log sigmoid(r_chosen - r_rejected - m)"""
    max_length: int = 512
    """longest sequence in tokens (prompt + response + EOS)"""
    truncate_long: bool = False
    """keep the last `max_length` tokens of longer pairs (the scored end stays) instead of dropping them"""
    append_eos: bool = True
    """end responses with EOS, as PPO's rollouts that stop do (the score is read there)"""
    policy_tokenizer: str | None = None
    """the PPO policy's tokenizer if not the reward model's: pairs are laid out as PPO will score them"""


@dataclass
class RewardTrainConfig(ft.FinetuneRunConfig):
    """``rlhf-ppo reward``: reward-model training on preference pairs."""

    output_dir: str = "runs/reward"
    """folder for metrics.jsonl, config.yaml and the reward model (OUTPUT_DIR/final)"""
    seed: int = 0
    """random seed for the held-out split, data order and new weights (score head, LoRA)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """starting checkpoint: a causal LM (a new score head is added) or a one-output classifier"""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """LoRA on the backbone (the score head trains fully); the output is always merged"""
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    """preference pairs"""

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: RewardTrainConfig) -> None:
    """Value ranges and cross-field constraints; ConfigError naming the key."""
    d = cfg.data
    ft.validate_data(d, ("prompt_column", "chosen_column", "rejected_column", "margin_column"))
    check(d.chosen_column != d.rejected_column, "data.rejected_column",
          "a column other than data.chosen_column", d.rejected_column)
    ft.validate_model_keys(cfg.model, "reward", gguf=False)
    check(cfg.model.revision is None, "model.revision", "null (not used by `rlhf-ppo reward`)",
          cfg.model.revision)
    check(cfg.peft.adapter_path is None, "peft.adapter_path",
          "null (`rlhf-ppo reward` starts a new adapter)", cfg.peft.adapter_path)


# --------------------------------------------------------------------------- the loss

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected - margin)``: ``(B,)``.

    The negative log-likelihood of "chosen is preferred" under P = sigmoid(r_c - r_r)
    (Ouyang et al. 2022, eq. 1); a margin (Llama 2, Touvron et al. 2023, eq. 2) asks for a gap of
    at least ``margin``. ``logsigmoid`` keeps it finite for large gaps.
    """
    gap = chosen.float() - rejected.float()
    if margin is not None:
        gap = gap - margin.float()
    return -F.logsigmoid(gap)


# --------------------------------------------------------------------------- pair formatting

@dataclass
class Pair:
    """One preference pair as reward-model token ids."""

    chosen: list[int]
    """ids of prompt + preferred response"""
    rejected: list[int]
    """ids of prompt + other response"""
    margin: float = 0.0
    """required score gap"""


class PairFormatter:
    """Token ids of (prompt, response) as PPO's ``ModelReward`` will present them.

    ``policy_tokenizer``: the tokenizer PPO's policy generates with (default: ``tokenizer``,
    the reward model's). Same vocabulary: ids are the policy's prompt ids + response ids (+ EOS),
    as in a rollout. Otherwise the text that ``ModelReward._texts`` builds from such a rollout,
    tokenized with ``tokenizer``.
    """

    def __init__(self, tokenizer, policy_tokenizer=None, append_eos: bool = True,
                 prompt_column: str = "prompt"):
        self.tokenizer, self.prompt_column = tokenizer, prompt_column
        self.policy = policy_tokenizer if policy_tokenizer is not None else tokenizer
        self.append_eos = append_eos
        self.same_tokenizer = self.tokenizer.get_vocab() == self.policy.get_vocab()

    def split(self, prompt: Any, response: Any, row: int, column: str
              ) -> tuple[str, list[dict] | None, str]:
        """``(prompt text, prompt messages or None, response text)`` of one pair side;
        ``column`` names its config key and column (``data.chosen_column 'chosen'``) in errors.
        A chat response is the last (assistant) message of prompt + response messages; turns
        that the response repeats from the end of the prompt (UltraFeedback's ``chosen`` starts
        with the ``prompt``'s user turn) are kept once (:func:`formats.join_conversation`)."""
        prompt_key = f"data.prompt_column {self.prompt_column!r}"
        if formats.is_messages(response):
            value = formats.prompt_value(prompt, self.policy.chat_template is not None)
            value = None if value == "" else value
            conv, _ = formats.join_conversation(formats.as_messages(value), list(response), row,
                                                column)
            if conv[-1]["role"] != "assistant" or len(conv) < 2:
                raise DataError(f"{column}: row {row} is a conversation that does not end with "
                                "an assistant message after at least one other message")
            if self.policy.chat_template is None:
                raise DataError(f"{column}: row {row} holds chat messages but the tokenizer has "
                                "no chat template")
            text, messages = render_prompt(conv[:-1], self.policy, row, column)
            return text, messages, conv[-1]["content"]
        if not isinstance(response, str):
            raise DataError(f"{column}: row {row} is {type(response).__name__} "
                            f"{str(response)[:80]!r}; expected a string or a list of chat messages")
        if prompt is None or prompt == "":
            return "", None, response
        text, messages = render_prompt(prompt, self.policy, row, prompt_key)
        return text, messages, response

    def encode(self, prompt: Any, response: Any, row: int, column: str) -> list[int]:
        """Reward-model token ids of one (prompt, response) cell pair."""
        text, messages, response_text = self.split(prompt, response, row, column)
        pol = self.policy
        # As data.load_prompts: special tokens (BOS) for plain text, none for a rendered template.
        # Without a prompt the response is the whole text and gets them instead.
        prompt_ids = pol(text, add_special_tokens=messages is None)["input_ids"] if text else []
        response_ids = pol(response_text, add_special_tokens=not text)["input_ids"]
        if self.append_eos and pol.eos_token_id is not None:
            response_ids = response_ids + [pol.eos_token_id]
        if self.same_tokenizer:
            return prompt_ids + response_ids
        # ModelReward re-tokenizes text: through its chat template when it has one (the prompt's
        # messages, or the prompt text as a user turn, then the decoded response)...
        if self.tokenizer.chat_template is not None:
            conv = list(messages or ([{"role": "user", "content": text}] if text else []))
            conv.append({"role": "assistant",
                         "content": pol.decode(response_ids, skip_special_tokens=True)})
            rendered = self.tokenizer.apply_chat_template(conv, tokenize=False)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        # ... else prompt and response ids decoded together.
        joined = pol.decode(prompt_ids + response_ids, skip_special_tokens=True)
        return self.tokenizer(joined)["input_ids"]


def _fit(ids: list[int], max_length: int, truncate: bool) -> list[int] | None:
    if len(ids) <= max_length:
        return ids
    return ids[-max_length:] if truncate else None


def encode_pairs(ds, formatter: PairFormatter, data: RewardDataConfig, where: str) -> list[Pair]:
    """Every row as a :class:`Pair`; over-long pairs dropped or cut, identical ones dropped (both
    logged). The format (preference or implicit-prompt preference) is detected from the columns
    and logged (:func:`formats.detect_pairs`); rows are split by :func:`formats.preference_row`."""
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    chat = formatter.policy.chat_template is not None
    fmt = formats.detect_pairs(ds, data, where, chat)
    has_prompt = "prompt" in fmt.columns
    has_margin = data.margin_column in ds.column_names
    pairs, too_long, cut, identical = [], 0, 0, 0
    for i, row in enumerate(ds):
        prompt, chosen, rejected = formats.preference_row(
            row[data.prompt_column] if has_prompt else None, row[data.chosen_column],
            row[data.rejected_column], chat)
        chosen = formatter.encode(prompt, chosen, i, f"data.chosen_column {data.chosen_column!r}")
        rejected = formatter.encode(prompt, rejected, i,
                                    f"data.rejected_column {data.rejected_column!r}")
        if chosen == rejected:
            identical += 1
            continue
        margin = row[data.margin_column] if has_margin else 0.0
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) \
                or not math.isfinite(margin):
            raise DataError(f"data.margin_column {data.margin_column!r}: row {i} of {where} is "
                            f"{margin!r}; expected a finite number")
        c, r = (_fit(x, data.max_length, data.truncate_long) for x in (chosen, rejected))
        if c is None or r is None:
            too_long += 1
            continue
        cut += c is not chosen or r is not rejected
        pairs.append(Pair(c, r, float(margin)))
    if identical:
        logger.warning("%s: dropped %d of %d pairs whose %r and %r are identical (no preference "
                       "to learn)", where, identical, len(ds), data.chosen_column, data.rejected_column)
    if too_long:
        logger.warning("%s: dropped %d of %d pairs longer than data.max_length=%d tokens (set "
                       "data.truncate_long=true to keep their last tokens)", where, too_long, len(ds),
                       data.max_length)
    if cut:
        logger.warning("%s: kept the last data.max_length=%d tokens of %d pairs", where,
                       data.max_length, cut)
    if not pairs:
        reason = "identical chosen and rejected" if identical == len(ds) else \
            f"longer than data.max_length={data.max_length} or identical"
        raise DataError(f"{where}: no usable pair (every pair is {reason})")
    warn_unknown_tokens([ids for p in pairs for ids in (p.chosen, p.rejected)], ds,
                        formatter.tokenizer, f"{where} ({fmt.describe()})")
    return pairs


def load_pairs(data: RewardDataConfig, formatter: PairFormatter, seed: int
               ) -> tuple[list[Pair], list[Pair]]:
    """``(train, held-out)`` pairs: from ``data.heldout_path``, else a seeded ``heldout_fraction``."""
    train = encode_pairs(ft.load_table(data.path, data.split, "data.path"), formatter, data,
                         repr(data.path))
    if data.heldout_path is not None:
        held = encode_pairs(ft.load_table(data.heldout_path, data.heldout_split, "data.heldout_path"),
                            formatter, data, repr(data.heldout_path))
        return train, held
    if data.heldout_fraction > 0 and len(train) < 2:
        raise DataError(f"data.heldout_fraction: {data.path!r} has {len(train)} usable pair(s); need "
                        "at least 2 to hold one out (or set data.heldout_fraction=0)")
    return ft.split_heldout(train, data.heldout_fraction, seed)


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen sequences then the rejected ones, right-padded: ``input_ids`` and
    ``attention_mask`` ``[2B, L]``, and ``margin`` ``(B,)``."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return {"input_ids": ft.right_pad(seqs, pad_id),
            "attention_mask": ft.right_pad([[1] * len(s) for s in seqs], 0),
            "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32)}


# --------------------------------------------------------------------------- model

class RewardScorer(nn.Module):
    """``forward`` = :func:`rewards.score_sequences` (trainable): one root module, so
    ``accelerator.prepare`` wraps it and the score is read where PPO reads it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return score_sequences(transformer(self.model), input_ids, attention_mask)


def pair_loss(module: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``finetune.LossFn``: summed Bradley-Terry loss of a micro-batch of pairs, with the count
    of pairs ranked right (``accuracy``) and the summed score gap (``gap``)."""
    dev = next(module.parameters()).device
    scores = module(batch["input_ids"].to(dev), batch["attention_mask"].to(dev)).float()  # (2B,)
    chosen, rejected = scores.chunk(2)
    losses = bradley_terry_loss(chosen, rejected, batch["margin"].to(dev))
    return losses.sum(), {"accuracy": (chosen > rejected).float().sum(),
                          "gap": (chosen - rejected).sum()}


def load_reward_model(cfg: RewardTrainConfig, tokenizer) -> nn.Module:
    """A one-output sequence classifier from ``model.name_or_path`` (a causal LM gets a new score
    head), ``pad_token_id`` set, optionally with LoRA (task SEQ_CLS: the head trains fully)."""
    model = load_sequence_classifier(cfg.model.name_or_path, cfg.model, "model.name_or_path",
                                     trainable=True)
    if model.config.pad_token_id is None:  # transformers' own pooling needs it to batch
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if not cfg.peft.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.peft.target_modules
    lora = LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets,
                      task_type="SEQ_CLS")
    return get_peft_model(model, lora)


def save_reward_model(model: nn.Module, tokenizer, folder: Path) -> None:
    """``save_pretrained`` a plain ``AutoModelForSequenceClassification`` (LoRA merged in) and
    the tokenizer."""
    if is_peft(model):
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _policy_tokenizer(cfg: RewardTrainConfig):
    if cfg.data.policy_tokenizer is None:
        return None
    return load_tokenizer(ModelConfig(name_or_path=cfg.data.policy_tokenizer,
                                      trust_remote_code=cfg.model.trust_remote_code),
                          key="data.policy_tokenizer")


# --------------------------------------------------------------------------- run

def run_reward_training(cfg: RewardTrainConfig) -> dict[str, Any]:
    """Train a reward model on ``cfg.data``'s pairs and save it to ``OUTPUT_DIR/final``.

    Writes ``OUTPUT_DIR/metrics.jsonl`` (per optimizer step: loss, accuracy, score gap, lr, grad
    norm; and the held-out values before and after) and ``OUTPUT_DIR/config.yaml``. Returns
    ``{"heldout_accuracy_before", "heldout_loss_before", "heldout_accuracy", "heldout_loss",
    "train_loss_first", "train_loss_last", "steps", "train_pairs", "heldout_pairs", "output"}``
    (held-out values None without held-out pairs).
    """
    cfg, acc, run_log = ft.start_run(cfg, RewardTrainConfig)
    final = Path(cfg.output_dir) / "final"

    # step 1. tokenizers, pairs in PPO's scoring format, model
    tokenizer = load_tokenizer(cfg.model)
    pad = tokenizer.pad_token_id
    formatter = PairFormatter(tokenizer, _policy_tokenizer(cfg), cfg.data.append_eos,
                              cfg.data.prompt_column)
    train, held = load_pairs(cfg.data, formatter, cfg.seed)
    logger.info("reward: %d training and %d held-out pairs", len(train), len(held))
    model = load_reward_model(cfg, tokenizer)
    ft.check_context(model, max(max(len(p.chosen), len(p.rejected)) for p in train + held))

    # step 2. optimizer, schedule, engine
    t = cfg.train
    plan = ft.step_plan(len(train), t, cfg.seed, acc.process_index, acc.num_processes)
    optimizer, scheduler = ft.make_optimizer([p for p in model.parameters() if p.requires_grad],
                                             cfg.optim, len(plan))
    ft.log_start("reward", cfg, model, len(train), "pairs", len(plan), acc.num_processes)
    module, optimizer = acc.prepare(RewardScorer(model), optimizer)

    def batches(pairs: list[Pair], size: int) -> tuple[list[dict], list[float]]:
        mbs = [collate_pairs(pairs[s:s + size], pad) for s in range(0, len(pairs), size)]
        return mbs, [float(len(b["margin"])) for b in mbs]

    held_mbs, held_counts = batches(held, t.heldout_batch_size)

    # step 3. held-out accuracy before, the optimizer steps, held-out accuracy after
    before = ft.log_heldout(module, held_mbs, held_counts, pair_loss, run_log, "before", 0)
    history = ft.fit(acc, module, optimizer, scheduler, plan,
                     lambda rows: batches([train[i] for i in rows], t.micro_batch_size), pair_loss,
                     cfg.optim.max_grad_norm, run_log, "reward", unit="pairs")
    after = ft.log_heldout(module, held_mbs, held_counts, pair_loss, run_log, "after", len(plan))

    # step 4. save a plain classifier (the main process writes)
    ft.save_final(acc, final, lambda tmp: save_reward_model(ft.unwrap(acc, module), tokenizer, tmp))
    if acc.is_main_process:
        logger.info("reward: %d steps, held-out accuracy %s -> %s, loss %s -> %s; saved to %s",
                    len(plan), ft.fmt(before.get("accuracy")), ft.fmt(after.get("accuracy")),
                    ft.fmt(before.get("loss")), ft.fmt(after.get("loss")), final)
    return {"heldout_accuracy_before": before.get("accuracy"),
            "heldout_loss_before": before.get("loss"),
            "heldout_accuracy": after.get("accuracy"), "heldout_loss": after.get("loss"),
            "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
            "steps": len(plan), "train_pairs": len(train), "heldout_pairs": len(held),
            "output": str(final)}
