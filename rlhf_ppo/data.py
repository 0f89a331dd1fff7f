"""Prompt datasets: loading, formats (:mod:`formats`), chat templates, length filtering, sharding
and left-padded batches."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import assets, formats
from .config import DataConfig
from .errors import DataError

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

UNKNOWN_SHARE_WARNING = 0.05
"""a dataset whose tokens are more than this share the tokenizer's unknown token (``<unk>``) gets
a warning (:func:`warn_unknown_tokens`): the model cannot tell those words apart"""




@dataclass
class Prompt:
    """One prompt: its text as the policy sees it, its token ids and the other dataset columns."""

    text: str
    """the prompt text (chat prompts rendered with the chat template)"""
    input_ids: list[int]
    """token ids of `text`"""
    messages: list[dict] | None = None
    """the original chat messages, for chat prompts"""
    extra: dict[str, Any] = field(default_factory=dict)
    """other dataset columns, passed to reward functions as keyword arguments"""


class Rows(list):
    """The rows of a local JSON / JSON Lines file: dicts that all have every column (``None``
    where a row lacks one), with ``column_names``, as a ``datasets.Dataset`` iterates."""

    def __init__(self, rows: list[dict], column_names: list[str]):
        super().__init__(rows)
        self.column_names = column_names


def read_json_rows(path: str) -> Rows:
    """Rows of a ``.jsonl`` file (one object per line) or a ``.json`` file (a list of objects,
    an object of equal-length column lists, or JSON Lines). Read with the standard library:
    ``datasets`` would cost ~85 MB of memory for its import and write an Arrow cache of every
    file; errors name the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.path: could not read {path!r} ({type(e).__name__}: {e})") from e
    records = None
    if path.lower().endswith(".json") and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # perhaps JSON Lines in a .json file
        if isinstance(data, list):
            records = data
        elif isinstance(data, dict):
            cols = list(data.values())
            if cols and all(isinstance(c, list) and len(c) == len(cols[0]) for c in cols):
                records = [dict(zip(data, values)) for values in zip(*cols)]
            else:
                records = [data]
    if records is None:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"data.path: {path!r} line {n} is not valid JSON ({e.msg}); "
                                "expected one JSON object per line") from e
    columns: dict[str, None] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"data.path: {path!r} row {i} is {type(record).__name__}, expected "
                            "a JSON object of columns")
        columns.update(dict.fromkeys(record))
    if not records:
        raise DataError(f"data.path: {path!r} has no rows")
    return Rows([{c: r.get(c) for c in columns} for r in records], list(columns))


def load_rows(cfg: DataConfig):
    """The rows named by ``data.path``: a ``datasets.Dataset`` (hub id, CSV, Parquet,
    ``save_to_disk`` folder) or :class:`Rows` (local JSON / JSON Lines)."""
    path = assets.resolve_dataset(cfg.path)
    suffix = Path(path).suffix.lower()
    if suffix in LOCAL_FORMATS and not Path(path).is_file():
        raise DataError(f"data.path: file {path!r} not found")
    if LOCAL_FORMATS.get(suffix) == "json":
        return read_json_rows(path)
    import datasets

    try:
        if suffix in LOCAL_FORMATS:
            ds = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files={cfg.split: path},
                                       split=cfg.split)
        elif Path(path).is_dir() and (Path(path) / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(path)[cfg.split]  # a DatasetDict from save_to_disk
        elif Path(path).is_dir() and (Path(path) / "state.json").is_file():
            ds = datasets.load_from_disk(path)  # a Dataset from save_to_disk
        else:
            ds = datasets.load_dataset(path, split=cfg.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; all mean "could not read it"
        raise DataError(f"data.path: could not load {path!r} split {cfg.split!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                        "Expected a .json/.jsonl/.csv/.parquet file or a hub dataset id") from e
    return ds



def render_prompt(value: Any, tokenizer, row: int, column: str, drop_final_assistant: bool | None = None,
                  tools: list[dict] | None = None) -> tuple[str, list[dict] | None]:
    """Prompt text for one dataset value: a string as is, chat messages through the template
    with the generation prompt (and ``tools``, JSON schemas of the tools a multi-turn rollout
    offers, as ``apply_chat_template(tools=...)`` renders them; None: no tools, as single-turn).

    An Anthropic HH-style string (``\\n\\nHuman: ...\\n\\nAssistant:``) is parsed into messages
    when the tokenizer has a chat template (:func:`formats.hh_prompt`). Messages whose last turn
    is the assistant's are refused (DataError naming the row), or that turn is dropped when
    ``drop_final_assistant`` (None: the command has no such option; the error says so).
    """
    value = formats.prompt_value(value, tokenizer.chat_template is not None)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{column}: row {row} is an empty prompt")
        return value, None
    if formats.is_messages(value):
        if tokenizer.chat_template is None:
            raise DataError(f"{column}: row {row} holds chat messages but the tokenizer has no chat "
                            "template")
        value = formats.final_assistant_turn(list(value), row, column, drop_final_assistant)
        with_tools = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True, **with_tools)
        return text, value
    raise DataError(f"{column}: row {row} is {type(value).__name__} {str(value)[:80]!r}; expected a "
                    "string or a list of chat messages ({'role': ..., 'content': ...})")


def unknown_token_id(tokenizer) -> int | None:
    """The tokenizer's unknown-token id, or None when it has none or the id doubles as EOS, BOS
    or pad (GPT-2's ``<|endoftext|>`` is all four): then counting it would count those too."""
    unk = getattr(tokenizer, "unk_token_id", None)
    others = {getattr(tokenizer, f"{name}_token_id", None) for name in ("eos", "bos", "pad")}
    return None if unk is None or unk in others else unk


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a dataset value: a string, chat messages' contents, nested lists."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def unknown_words(values: Any, tokenizer, limit: int = 3, scan: int = 200) -> list[str]:
    """Up to ``limit`` distinct pieces of text (words, for a word-level tokenizer) that
    ``tokenizer`` maps to its unknown token, from the first ``scan`` strings in ``values`` (rows,
    texts). Empty for a tokenizer without character offsets (a slow tokenizer)."""
    unk = unknown_token_id(tokenizer)
    found: list[str] = []
    for n, text in enumerate(_strings(values)):
        if n >= scan or len(found) >= limit:
            break
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow tokenizers have no offsets
            return found
        for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            if token == unk and text[start:end] not in found and len(found) < limit:
                found.append(text[start:end])
    return found


def warn_unknown_tokens(id_lists: Iterable[list[int]], values: Any, tokenizer, where: str
                        ) -> float | None:
    """Warn once when more than :data:`UNKNOWN_SHARE_WARNING` of the tokens in ``id_lists`` (one
    dataset, tokenized) are the unknown token, naming ``where`` (the file and column), the share,
    a few words it replaced (found in ``values``: the rows or texts) and what to do. Why: a
    tokenizer that does not cover the data trains on ``<unk>`` runs, and the loss still falls.
    Returns the share (None: the tokenizer has no separate unknown token)."""
    unk = unknown_token_id(tokenizer)
    if unk is None:
        return None
    total = unknown = 0
    for ids in id_lists:
        total += len(ids)
        unknown += sum(1 for t in ids if t == unk)
    share = unknown / total if total else 0.0
    if share > UNKNOWN_SHARE_WARNING:
        words = ", ".join(repr(w) for w in unknown_words(values, tokenizer))
        logger.warning(
            "%s: %.0f%% of the tokens (%d of %d) are the tokenizer's unknown token %r%s, more "
            "than %.0f%%: the model cannot tell those words apart. Use a model whose tokenizer "
            "covers the data (model.name_or_path: a pretrained model); builtin:tiny knows %s",
            where, 100 * share, unknown, total, tokenizer.unk_token,
            f" (it replaced e.g. {words})" if words else "", 100 * UNKNOWN_SHARE_WARNING,
            "72 lowercase words of short reviews (docs/data.md, 'The built-in tiny vocabulary')")
    return share


def _encode(text: str, messages: list[dict] | None, tokenizer) -> list[int]:
    # A rendered chat template already contains the special tokens it needs (e.g. BOS).
    add_special = messages is None
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def load_prompts(cfg: DataConfig, tokenizer, tools: list[dict] | None = None) -> list[Prompt]:
    """Load, render, tokenize and length-filter the prompts (chat prompts with the tool schemas
    ``tools`` in the template, for a multi-turn rollout's chat protocol; see :func:`render_prompt`).

    The prompt is ``data.prompt_column`` (prompt-only data, or the prompt of prompt-completion /
    preference data; a string prompt is a user turn when the row's completion or chosen /
    rejected are chat messages, as SFT and reward training read it). Without that column (at its
    default name): the common start of ``chosen`` and ``rejected`` (implicit-prompt preference),
    or a ``messages`` column's conversations. :func:`formats.detect_prompts` logs the format.
    Every other column is passed to reward functions. Prompts longer than
    ``data.max_prompt_length`` tokens are dropped (count logged), or cut to their last
    ``max_prompt_length`` tokens when ``data.truncate_long_prompts``.
    """
    ds = load_rows(cfg)
    if len(ds) == 0:
        raise DataError(f"data.path: {cfg.path!r} split {cfg.split!r} has no rows")
    chat = tokenizer.chat_template is not None
    fmt = formats.detect_prompts(ds, cfg, repr(cfg.path), chat)
    # `data.drop_final_assistant_turn` where the config has it (None: the error says to edit the data)
    drop = getattr(cfg, "drop_final_assistant_turn", None)
    column = fmt.columns.get("prompt")
    where = f"data.prompt_column {column!r}" if column == cfg.prompt_column else f"column {column!r}"
    prompts, dropped = [], 0
    for i, row in enumerate(ds):
        if column is None:
            value = formats.implicit_prompt(row["chosen"], row["rejected"], chat, i, repr(cfg.path))
            where = "the common start of 'chosen' and 'rejected'"
        else:
            value = formats.row_prompt(row[column], row, chat)
        text, messages = render_prompt(value, tokenizer, i, where, drop, tools)
        ids = _encode(text, messages, tokenizer)
        if not ids:
            raise DataError(f"{where}: row {i} tokenizes to no tokens; a prompt needs at least one")
        if len(ids) > cfg.max_prompt_length:
            if not cfg.truncate_long_prompts:
                dropped += 1
                continue
            ids = ids[-cfg.max_prompt_length:]
            text = tokenizer.decode(ids)
        extra = {k: v for k, v in row.items() if k != column}
        prompts.append(Prompt(text, ids, messages, extra))
    if dropped:
        logger.warning("dropped %d of %d prompts longer than data.max_prompt_length=%d tokens "
                       "(set data.truncate_long_prompts=true to keep them, cut)",
                       dropped, len(ds), cfg.max_prompt_length)
    if not prompts:
        raise DataError(f"data.max_prompt_length={cfg.max_prompt_length}: every prompt in "
                        f"{cfg.path!r} is longer; raise it or set data.truncate_long_prompts=true")
    warn_unknown_tokens([p.input_ids for p in prompts], [p.text for p in prompts], tokenizer,
                        f"data.path {cfg.path!r} ({where}, prompts)")
    return prompts


class PromptSampler:
    """Endless, reproducible stream of prompt batches for one process.

    Every pass over the data is a fresh permutation (``seed + epoch``); process ``rank`` of
    ``world_size`` takes every ``world_size``-th prompt of it, so processes never share a prompt
    within a pass.
    """

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        n = len(self.prompts)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        # Every process gets the same number of prompts per pass (the remainder is skipped this
        # pass; the next permutation differs), so processes stay in step.
        usable = (n // self.world_size) * self.world_size
        if usable == 0:
            return order[:1]
        return order[:usable][self.rank::self.world_size]

    def next_batch(self) -> list[Prompt]:
        """The next ``batch_size`` prompts (wrapping into a new pass when one runs out)."""
        batch = []
        while len(batch) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch

    def __iter__(self) -> Iterator[list[Prompt]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The position in the data: the pass (``epoch``) and the prompts of all processes drawn
        in it, so that a resume with another process count continues the same pass."""
        return {"epoch": self.epoch, "global_position": self.position * self.world_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict`'s position."""
        self.epoch = state["epoch"]
        self._order = self._permutation()
        self.position = state["global_position"] // self.world_size


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to ``[B, P]`` ids and attention mask (1 on real tokens)."""
    P = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), P), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids, mask
