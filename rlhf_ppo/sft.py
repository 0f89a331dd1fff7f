"""Supervised fine-tuning (``rlhf-ppo sft``): next-token loss on the response tokens of
prompt-completion or chat data (or on every token of plain text), before PPO.

Formats (TRL's, :mod:`formats`, docs/data.md): language modeling (``text`` or ``messages``) and
prompt-completion (``prompt`` + ``completion`` / ``response``), standard or conversational.

Sequences are laid out the way PPO will see them: the prompt tokenized as ``data.load_prompts``
does (chat prompts through the chat template with the generation prompt), then the response's own
tokens, then EOS, the token at which PPO's rollouts stop. Labels are the input ids with
``IGNORE_INDEX`` on everything the model should not learn to produce (prompt, padding).

Shape legend: ``B`` sequences (examples, or packed blocks) in a micro-batch, ``L`` their padded
length, ``N`` label tokens in it, ``H`` hidden size.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import finetune as ft
from . import formats
from .config import ModelConfig, PeftConfig
from .data import DataError, render_prompt, warn_unknown_tokens
from .errors import ConfigError
from .lm import token_logprobs, transformer
from .loading import load_causal_lm, load_tokenizer, record_portable_base
from .lora import apply_lora, is_peft
from .packing import check_packing

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""label of tokens that carry no loss (prompt, padding), as in transformers"""


# --------------------------------------------------------------------------- config

@dataclass
class SFTDataConfig(ft.FinetuneDataConfig):
    path: str | None = None
    """training data: local .json/.jsonl/.csv/.parquet file, `save_to_disk` folder, or hub id"""
    prompt_column: str = "prompt"
    """prompt-completion data: the prompt, a string or chat messages (rendered with the generation prompt)"""
    response_column: str = "response"
    """prompt-completion data: the response, text or messages (at this default TRL's `completion` too)"""
    messages_column: str = "messages"
    """conversations (used when present): the loss covers every assistant turn"""
    text_column: str = "text"
    """plain text (used without messages or prompt-completion columns): the loss covers every token"""
    max_length: int = 512
    """longest example in tokens (prompt + response + EOS)"""
    truncate_long: bool = False
    """cut longer examples to their first `max_length` tokens instead of dropping them"""
    append_eos: bool = True
    """end each response with EOS (learned), so the policy learns to stop where PPO's rollouts stop"""
    packing: bool = False
    """pack examples into blocks of `max_length` tokens (attention kept within each); off: pad"""


@dataclass
class SFTConfig(ft.FinetuneRunConfig):
    """``rlhf-ppo sft``: supervised fine-tuning."""

    output_dir: str = "runs/sft"
    """folder for metrics.jsonl, config.yaml and the fine-tuned model (OUTPUT_DIR/final)"""
    seed: int = 0
    """random seed for the held-out split, data order and new weights (LoRA)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """the causal LM to fine-tune (model.name_or_path, tokenizer, revision, dtype, gguf_file, ...)"""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """LoRA: train an adapter instead of all weights (saved in final/, merged copy optional)"""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """prompt/response or chat data"""

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: SFTConfig) -> None:
    """Value ranges and cross-field constraints; ConfigError naming the key."""
    ft.validate_data(cfg.data, ("prompt_column", "response_column", "messages_column", "text_column"))
    ft.validate_model_keys(cfg.model, "sft")


# --------------------------------------------------------------------------- examples

@dataclass
class SFTExample:
    """One training sequence (an example, or several packed into a block)."""

    input_ids: list[int]
    """token ids"""
    labels: list[int]
    """the token id where the model learns to produce it, ``IGNORE_INDEX`` elsewhere"""
    position_ids: list[int]
    """0, 1, 2, ... restarting at every packed example"""


def encode_prompt_response(prompt: Any, response: Any, tokenizer, row: int, data: SFTDataConfig
                           ) -> SFTExample:
    """Prompt tokens (as ``data.load_prompts`` encodes a prompt: special tokens added to plain
    text, none to a rendered chat template), then the response's tokens and EOS, labelled.

    A response of chat messages (TRL's conversational prompt-completion) is appended to the
    prompt's messages (a string prompt: one user turn; turns the response repeats from the prompt
    kept once) and the whole is encoded as :func:`encode_chat` does, the loss on the response's
    assistant turns only."""
    prompt_key = f"data.prompt_column {data.prompt_column!r}"
    response_key = f"data.response_column {data.response_column!r}"
    if formats.is_messages(response):
        chat = tokenizer.chat_template is not None
        value = formats.prompt_value(prompt, chat)
        if isinstance(value, str) and not value.strip():
            raise DataError(f"{prompt_key}: row {row} is an empty prompt")
        if not (isinstance(value, str) or formats.is_messages(value)):
            render_prompt(value, tokenizer, row, prompt_key)  # raises, naming the type
        conv, n_prompt = formats.join_conversation(formats.as_messages(value), list(response), row,
                                                   response_key)
        if n_prompt < len(conv) and conv[n_prompt - 1]["role"] == "assistant":
            formats.final_assistant_turn(conv[:n_prompt], row, prompt_key, None)  # raises
        return encode_chat(conv, tokenizer, row, data, first_turn=n_prompt, column=response_key)
    text, messages = render_prompt(prompt, tokenizer, row, prompt_key)
    prompt_ids = tokenizer(text, add_special_tokens=messages is None)["input_ids"]
    if not isinstance(response, str) or not response.strip():
        raise DataError(f"{response_key}: row {row} is {type(response).__name__} "
                        f"{str(response)[:80]!r}; expected a non-empty string or chat messages")
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if data.append_eos:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return SFTExample(ids, labels, list(range(len(ids))))


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def encode_text(text: Any, tokenizer, row: int, data: SFTDataConfig) -> SFTExample:
    """Plain text (standard language modeling): its tokens (special tokens added, as for a
    plain-text prompt) and EOS, every one labelled."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"data.text_column {data.text_column!r}: row {row} is "
                        f"{type(text).__name__} {str(text)[:80]!r}; expected a non-empty string")
    ids = tokenizer(text)["input_ids"]
    if data.append_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return SFTExample(ids, list(ids), list(range(len(ids))))


def assistant_spans(messages: list[dict], tokenizer, first_turn: int = 1
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (from message
    ``first_turn`` on; at least 1: the first message is context).

    Turn i's span runs from the end of the rendering of ``messages[:i]`` with the generation
    prompt (what PPO would give the policy) to the end of ``messages[:i + 1]`` (so it includes
    the template's end-of-turn markup, which the model must learn to emit). A turn whose
    rendering is not a prefix of the whole (templates that rewrite earlier turns) stays context.
    """
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < max(first_turn, 1):
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1], False)
        if upto.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(messages: Any, tokenizer, row: int, data: SFTDataConfig, first_turn: int = 1,
                column: str | None = None) -> SFTExample:
    """The conversation through the chat template, labelled on its assistant turns from message
    ``first_turn`` on (see :func:`assistant_spans`). EOS is appended, labelled, when the
    conversation ends with an assistant turn whose rendering does not already contain it.
    ``column`` names the data in errors (default: ``data.messages_column``)."""
    column = column or f"data.messages_column {data.messages_column!r}"
    if not formats.is_messages(messages):
        raise DataError(f"{column}: row {row} is {type(messages).__name__} "
                        f"{str(messages)[:80]!r}; expected a list of chat messages "
                        "({'role': ..., 'content': ...})")
    if tokenizer.chat_template is None:
        raise DataError(f"{column}: row {row} holds chat messages but the tokenizer has no chat "
                        "template")
    full, spans = assistant_spans(messages, tokenizer, first_turn)
    if not spans:
        raise DataError(f"{column}: row {row} has no assistant turn after another message; "
                        "expected e.g. a user turn followed by an assistant turn")
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise DataError(f"{column}: chat data needs a fast tokenizer (character offsets locate "
                        "the assistant turns)") from e
    ids = list(enc["input_ids"])
    labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
              for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    s_last, e_last = spans[-1]
    last_turn = [t for t, (start, _) in zip(ids, enc["offset_mapping"]) if s_last <= start < e_last]
    ends_with_assistant = e_last == len(full)
    if data.append_eos and ends_with_assistant and tokenizer.eos_token_id not in last_turn:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return SFTExample(ids, labels, list(range(len(ids))))


def fit_length(ex: SFTExample, max_length: int, truncate: bool) -> SFTExample | None:
    """The example if it fits; else its first ``max_length`` tokens (``truncate``) when some
    label survives, else None (dropped)."""
    if len(ex.input_ids) <= max_length:
        return ex
    if not truncate or all(x == IGNORE_INDEX for x in ex.labels[1:max_length]):
        return None
    return SFTExample(ex.input_ids[:max_length], ex.labels[:max_length], ex.position_ids[:max_length])


def encode_rows(ds, tokenizer, data: SFTDataConfig, where: str) -> list[SFTExample]:
    """Every row of a dataset as an :class:`SFTExample`, length-checked (drops/cuts logged).
    The format is detected from the columns (:func:`formats.detect_sft`, logged)."""
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    fmt = formats.detect_sft(ds, data, where, tokenizer.chat_template is not None)
    if fmt.columns.get("completion", data.response_column) != data.response_column:
        data = replace(data, response_column=fmt.columns["completion"])  # TRL's `completion`
    out, dropped, cut = [], 0, 0
    for i, row in enumerate(ds):
        if "messages" in fmt.columns:
            ex = encode_chat(row[data.messages_column], tokenizer, i, data)
        elif "text" in fmt.columns:
            ex = encode_text(row[data.text_column], tokenizer, i, data)
        else:
            ex = encode_prompt_response(row[data.prompt_column], row[data.response_column],
                                        tokenizer, i, data)
        if not any(x != IGNORE_INDEX for x in ex.labels[1:]):
            raise DataError(f"{where}: row {i} has no response token to learn")
        fitted = fit_length(ex, data.max_length, data.truncate_long)
        dropped += fitted is None
        cut += fitted is not None and fitted is not ex
        if fitted is not None:
            out.append(fitted)
    if dropped:
        logger.warning("%s: dropped %d of %d examples longer than data.max_length=%d tokens (set "
                       "data.truncate_long=true to keep them, cut)", where, dropped, len(ds),
                       data.max_length)
    if cut:
        logger.warning("%s: cut %d of %d examples to data.max_length=%d tokens", where, cut,
                       len(ds), data.max_length)
    if not out:
        raise DataError(f"data.max_length={data.max_length}: every example of {where} is longer "
                        "(or keeps no response token when cut); raise it")
    warn_unknown_tokens([ex.input_ids for ex in out], ds, tokenizer, f"{where} ({fmt.describe()})")
    return out


def load_examples(data: SFTDataConfig, tokenizer, seed: int
                  ) -> tuple[list[SFTExample], list[SFTExample]]:
    """``(train, held-out)`` examples: from ``data.heldout_path``, else a seeded ``heldout_fraction``."""
    train = encode_rows(ft.load_table(data.path, data.split, "data.path"), tokenizer, data,
                        repr(data.path))
    if data.heldout_path is not None:
        held = encode_rows(ft.load_table(data.heldout_path, data.heldout_split, "data.heldout_path"),
                           tokenizer, data, repr(data.heldout_path))
        return train, held
    if data.heldout_fraction > 0 and len(train) < 2:
        raise DataError(f"data.heldout_fraction: {data.path!r} has {len(train)} usable example(s); "
                        "need at least 2 to hold one out (or set data.heldout_fraction=0)")
    return ft.split_heldout(train, data.heldout_fraction, seed)


def pack(examples: list[SFTExample], max_length: int, seed: int) -> list[SFTExample]:
    """Concatenate whole examples (in a seeded random order) into blocks of at most
    ``max_length`` tokens, each example keeping its labels and its own positions 0, 1, ...

    Next-fit: a block is closed when the next example does not fit (O(n), a little padding).
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    blocks: list[SFTExample] = []
    cur = SFTExample([], [], [])
    for i in order:
        ex = examples[i]
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_length:
            blocks.append(cur)
            cur = SFTExample([], [], [])
        cur.input_ids += ex.input_ids
        cur.labels += ex.labels
        cur.position_ids += ex.position_ids
    if cur.input_ids:
        blocks.append(cur)
    return blocks


def collate(items: list[SFTExample], pad_id: int, packed: bool) -> dict[str, torch.Tensor | None]:
    """Right-padded ``[B, L]`` tensors: ``input_ids``, ``labels`` (``IGNORE_INDEX`` on padding),
    ``position_ids``, and ``attention_mask`` (1 on real tokens).

    Packed: ``attention_mask`` is None, so transformers reads the example boundaries from the
    restarting ``position_ids`` and keeps attention within each example (right padding needs no
    mask: causal attention never looks ahead).
    """
    ids = ft.right_pad([x.input_ids for x in items], pad_id)
    mask = ft.right_pad([[1] * len(x.input_ids) for x in items], 0)
    return {"input_ids": ids,
            "labels": ft.right_pad([x.labels for x in items], IGNORE_INDEX),
            "position_ids": ft.right_pad([x.position_ids for x in items], 0),
            "attention_mask": None if packed else mask}


def label_count(batch: dict[str, torch.Tensor | None]) -> int:
    """Tokens that carry loss: labels other than ``IGNORE_INDEX`` after the shift by one."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_batches(items: list[SFTExample], size: int, pad_id: int, packed: bool) -> list[dict]:
    """``items`` collated ``size`` at a time."""
    return [collate(items[s:s + size], pad_id, packed) for s in range(0, len(items), size)]


# --------------------------------------------------------------------------- loss

class CausalLMLoss(nn.Module):
    """Summed next-token negative log-likelihood of the labelled tokens of a micro-batch.

    One root module around the LM, so ``accelerator.prepare`` wraps it (autocast, DDP) and the
    forward below is the one that runs. Logits are computed only at the ``N`` positions that
    predict a label, in chunks (``models.token_logprobs``), never as a full ``[B, L, V]`` tensor.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        lm = transformer(self.model)
        hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state  # (B, L, H)
        # Position t predicts token t+1.
        targets = labels[:, 1:]  # (B, L-1)
        keep = targets != IGNORE_INDEX
        h = hidden[:, :-1][keep]  # (N, H)
        logp, _ = token_logprobs(lm.get_output_embeddings(), lm.config, h[None],
                                 targets[keep][None], with_entropy=False)  # (1, N)
        return -logp.sum()


def lm_loss(module: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``finetune.LossFn`` for SFT: summed NLL of a collated micro-batch (no extra stats)."""
    dev = next(module.parameters()).device
    moved = {k: (v.to(dev) if v is not None else None) for k, v in batch.items()}
    return module(**moved), {}


# --------------------------------------------------------------------------- run

def load_model(cfg: SFTConfig) -> nn.Module:
    """The causal LM, wrapped with a trainable LoRA adapter when ``peft.enabled``."""
    m = cfg.model
    model = load_causal_lm(m.name_or_path, m, "model.name_or_path", m.gguf_file)
    if cfg.peft.enabled:
        model, _ = apply_lora(model, cfg.peft)
    return model


def save_model(model: nn.Module, tokenizer, folder: Path, save_merged: bool,
               base_name: str | None = None) -> None:
    """``save_pretrained`` model (or LoRA adapter) + tokenizer into ``folder``; with LoRA and
    ``save_merged`` also the merged weights into ``folder/merged``. ``base_name``: the base as
    the config names it, recorded in the adapter (:func:`models.record_portable_base`)."""
    if is_peft(model):
        # Only the trained adapter: with peft.adapter_path, "reference" is the frozen start.
        model.save_pretrained(folder, selected_adapters=["default"])
        record_portable_base(folder, base_name)
        tokenizer.save_pretrained(folder)
        if save_merged:
            merged = model.merge_and_unload(adapter_names=["default"])
            merged.save_pretrained(folder / "merged")
            tokenizer.save_pretrained(folder / "merged")
        return
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and save it to ``OUTPUT_DIR/final``.

    Writes ``OUTPUT_DIR/metrics.jsonl`` (one line per optimizer step: loss, lr, grad norm,
    tokens; and the held-out loss before and after training) and ``OUTPUT_DIR/config.yaml``.
    Returns ``{"train_loss_first", "train_loss_last", "heldout_loss_before",
    "heldout_loss_after", "steps", "train_examples", "heldout_examples", "output", "merged"}``
    (held-out losses None without held-out data; ``merged``: the merged LoRA model's folder, or
    None).
    """
    cfg, acc, run_log = ft.start_run(cfg, SFTConfig)
    final = Path(cfg.output_dir) / "final"

    # step 1. tokenizer, examples (packed into blocks when asked), model
    tokenizer = load_tokenizer(cfg.model)
    pad = tokenizer.pad_token_id
    train_ex, held_ex = load_examples(cfg.data, tokenizer, cfg.seed)
    logger.info("sft: %d training and %d held-out examples", len(train_ex), len(held_ex))
    items = pack(train_ex, cfg.data.max_length, cfg.seed) if cfg.data.packing else train_ex
    model = load_model(cfg)
    ft.check_context(model, max(len(x.input_ids) for x in items + held_ex))
    if cfg.data.packing and not check_packing(model, "model.name_or_path"):
        raise ConfigError("data.packing: this model's attention does not keep packed examples "
                          "apart (its packed and padded passes differ); set data.packing: false")

    # step 2. optimizer, schedule, engine
    t = cfg.train
    plan = ft.step_plan(len(items), t, cfg.seed, acc.process_index, acc.num_processes)
    optimizer, scheduler = ft.make_optimizer([p for p in model.parameters() if p.requires_grad],
                                             cfg.optim, len(plan))
    ft.log_start("sft", cfg, model, len(items), "blocks" if cfg.data.packing else "examples",
                 len(plan), acc.num_processes)
    module, optimizer = acc.prepare(CausalLMLoss(model), optimizer)

    def step_batches(rows: list[int]) -> tuple[list[dict], list[float]]:
        mbs = micro_batches([items[i] for i in rows], t.micro_batch_size, pad, cfg.data.packing)
        return mbs, [label_count(b) for b in mbs]

    held_mbs = micro_batches(held_ex, t.heldout_batch_size, pad, packed=False)
    held_counts = [label_count(b) for b in held_mbs]

    # step 3. held-out loss before, the optimizer steps, held-out loss after
    before = ft.log_heldout(module, held_mbs, held_counts, lm_loss, run_log, "before", 0)
    history = ft.fit(acc, module, optimizer, scheduler, plan, step_batches, lm_loss,
                     cfg.optim.max_grad_norm, run_log, "sft", unit="tokens")
    after = ft.log_heldout(module, held_mbs, held_counts, lm_loss, run_log, "after", len(plan))

    # step 4. save (the main process writes)
    merged = cfg.peft.enabled and cfg.peft.save_merged
    ft.save_final(acc, final, lambda tmp: save_model(ft.unwrap(acc, module), tokenizer, tmp, merged,
                                                     cfg.model.name_or_path))
    if acc.is_main_process:
        logger.info("sft: %d steps, train loss %.4f -> %.4f, held-out loss %s -> %s; saved to %s",
                    len(plan), history[0]["loss"], history[-1]["loss"], ft.fmt(before.get("loss")),
                    ft.fmt(after.get("loss")), final)
    return {"train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
            "heldout_loss_before": before.get("loss"), "heldout_loss_after": after.get("loss"),
            "steps": len(plan), "train_examples": len(train_ex), "heldout_examples": len(held_ex),
            "output": str(final), "merged": str(final / "merged") if merged else None}
