"""Dataset formats: TRL's conventions, detected from the columns, and the rows cut into a prompt
and the response(s) the way PPO will see them.

The formats (docs/data.md has an example row of each), in their standard (text) and
conversational (chat-message list) forms:

- language modeling: ``text`` / ``messages``;
- prompt-only: ``prompt``;
- prompt-completion: ``prompt`` + ``completion`` (``response`` also read, for SFT);
- preference: ``prompt`` + ``chosen`` + ``rejected``;
- implicit-prompt preference: ``chosen`` + ``rejected`` holding the whole conversation, whose
  common start is the prompt.

Each command accepts the formats that make sense for it (:data:`ACCEPTED`); a dataset fitting
none is a :class:`DataError` naming the file, its columns and the accepted formats. The detected
format and the columns used are logged (one INFO line).

Two public layouts need more than the column names:

- UltraFeedback (``prompt`` a string, ``chosen`` / ``rejected`` whole conversations that start
  with that same user turn): the repeated turns are kept once (:func:`join_conversation`).
- Anthropic HH (``chosen`` / ``rejected`` strings of ``\\n\\nHuman: ...\\n\\nAssistant: ...``
  turns): parsed into chat messages (:func:`parse_hh`) when the tokenizer has a chat template,
  so a reward model is trained on the chat-formatted text PPO will score.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError

logger = logging.getLogger(__name__)

LANGUAGE_MODELING = "language modeling"
PROMPT_ONLY = "prompt-only"
PROMPT_COMPLETION = "prompt-completion"
PREFERENCE = "preference"
IMPLICIT_PREFERENCE = "implicit-prompt preference"

ACCEPTED = {
    "sft": (LANGUAGE_MODELING, PROMPT_COMPLETION),
    "reward": (PREFERENCE, IMPLICIT_PREFERENCE),
    "train": (PROMPT_ONLY, PROMPT_COMPLETION, PREFERENCE, IMPLICIT_PREFERENCE, LANGUAGE_MODELING),
}
"""the formats each command reads (``train``: PPO's prompts, also `evaluate`'s)"""


def is_messages(value: Any) -> bool:
    """A non-empty list of chat messages (dicts with ``role`` and ``content``)."""
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


# --------------------------------------------------------------------------- Anthropic HH

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def is_hh(value: Any) -> bool:
    """A string laid out as an Anthropic HH transcript: ``Human:`` first (after leading
    whitespace) and at least one ``\\n\\nAssistant:`` turn."""
    return (isinstance(value, str) and value.lstrip().startswith("Human:")
            and "\n\nAssistant:" in value)


def parse_hh(text: str) -> list[dict]:
    """The turns of an Anthropic HH transcript as chat messages: ``Human:`` -> ``user``,
    ``Assistant:`` -> ``assistant``, each content stripped of surrounding whitespace. A final
    ``Assistant:`` with nothing after it (the prompt's cue to answer) is kept as an empty assistant
    turn; :func:`hh_prompt` drops it."""
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    return [{"role": _HH_ROLES[role], "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def hh_prompt(text: str) -> list[dict]:
    """An HH-style prompt (``\\n\\nHuman: ...\\n\\nAssistant:``) as messages, without the empty
    final assistant cue (the chat template's generation prompt takes its place)."""
    messages = parse_hh(text)
    if len(messages) > 1 and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages = messages[:-1]
    return messages


def prompt_value(value: Any, chat: bool) -> Any:
    """A prompt cell as it is rendered: an HH-style string becomes messages when the tokenizer has
    a chat template (``chat``); anything else is returned as is."""
    return hh_prompt(value) if chat and is_hh(value) else value


COMPLETION_COLUMNS = ("completion", "response", "chosen", "rejected")
"""the columns that make a row conversational for :func:`row_prompt` when they hold messages"""


def row_prompt(value: Any, row: dict, chat: bool) -> Any:
    """PPO's prompt from a row's prompt cell: :func:`prompt_value`, and a string prompt is a user
    turn when the row's completion / chosen / rejected are chat messages (UltraFeedback): SFT and
    reward training lay such rows out as a conversation, so PPO must too."""
    value = prompt_value(value, chat)
    if isinstance(value, str) and value.strip() and \
            any(is_messages(row.get(c)) for c in COMPLETION_COLUMNS):
        return [{"role": "user", "content": value}]
    return value


# --------------------------------------------------------------------------- conversations

def as_messages(prompt: Any) -> list[dict]:
    """A prompt cell as messages: none for ``None``, a string as one user turn."""
    if prompt is None:
        return []
    return list(prompt) if is_messages(prompt) else [{"role": "user", "content": prompt}]


def _same(a: dict, b: dict) -> bool:
    return (a.get("role") == b.get("role")
            and str(a.get("content", "")).strip() == str(b.get("content", "")).strip())


def join_conversation(prompt: list[dict], response: list[dict], row: int, column: str
                      ) -> tuple[list[dict], int]:
    """``(prompt + response, number of prompt messages)``, with turns that ``response`` repeats
    from the end of ``prompt`` kept once: UltraFeedback's ``chosen`` is ``[user, assistant]``
    starting with the ``prompt`` string's own user turn. Turns match on role and stripped
    content; the longest such overlap is removed. Two user turns left at the joint mean the
    response repeats a different prompt: a DataError."""
    for k in range(min(len(prompt), len(response)), 0, -1):
        if all(_same(p, r) for p, r in zip(prompt[-k:], response[:k])):
            response = response[k:]
            break
    if prompt and response and prompt[-1]["role"] == "user" and response[0]["role"] == "user":
        raise DataError(f"{column}: row {row} starts with a user turn "
                        f"({str(response[0]['content'])[:60]!r}) right after the prompt's own user "
                        f"turn ({str(prompt[-1]['content'])[:60]!r}); expected it to hold the answer, "
                        "or the whole conversation starting with the prompt's turns")
    return prompt + list(response), len(prompt)


def final_assistant_turn(messages: list[dict], row: int, column: str, drop: bool | None,
                         option: str = "data.drop_final_assistant_turn") -> list[dict]:
    """``messages`` to render with a generation prompt. A last turn by the assistant would put
    the answer into the prompt and then ask for a second one: it is dropped when ``drop``, else a
    DataError (naming ``option`` when the command has it, i.e. ``drop`` is not None)."""
    if messages[-1]["role"] != "assistant":
        return messages
    if drop and len(messages) > 1:
        return messages[:-1]
    hint = (f"remove that turn from the data, or set {option}=true to drop it" if drop is False
            else "it is the only turn: give the prompt's own turns" if drop
            else "remove that turn from the data")
    raise DataError(f"{column}: row {row} is a chat prompt whose last turn is the assistant's "
                    f"({str(messages[-1]['content'])[:60]!r}): the answer would be part of the "
                    f"prompt and the policy asked for another; a prompt must end with the turn the "
                    f"policy answers (e.g. the user's); {hint}")


# --------------------------------------------------------------------------- implicit prompts

def text_prefix(a: str, b: str) -> int:
    """Length of the common start of two texts, cut back to a word boundary: the responses start
    at the whitespace before the first word they differ in (``"...Assistant:"`` + ``" Sure"``,
    as a tokenizer that marks spaces in tokens wants them). 0 when they share no whole word."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    if n == len(a) == len(b):
        return 0  # identical texts: no prompt to split off
    i = n
    # The whitespace at or before the first difference, then back to the start of its run.
    while i > 0 and not (i < len(a) and a[i].isspace() and i < len(b) and b[i].isspace()):
        i -= 1
    while i > 0 and a[i - 1].isspace():
        i -= 1
    return i if a[:i].strip() else 0


def message_prefix(a: list[dict], b: list[dict]) -> int:
    """Number of leading messages two conversations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def preference_row(prompt: Any, chosen: Any, rejected: Any, chat: bool) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a preference row in the form ``PairFormatter`` encodes.

    - HH transcripts (both sides) become messages when the tokenizer has a chat template.
    - Without a prompt: two conversations are cut at their common leading messages (TRL's
      ``extract_prompt``); two texts at their common start, cut back to a word boundary (HH
      transcripts kept as text: back to the last ``\\n\\nAssistant:``).
    - Otherwise unchanged (a conversation that repeats the prompt is joined once later, by
      :func:`join_conversation`).
    """
    if chat and is_hh(chosen) and is_hh(rejected):
        chosen, rejected = parse_hh(chosen), parse_hh(rejected)
    if prompt is not None and prompt != "":
        return prompt, chosen, rejected
    if is_messages(chosen) and is_messages(rejected):
        k = message_prefix(chosen, rejected)
        k = min(k, len(chosen) - 1, len(rejected) - 1)  # each side keeps its last turn
        return (chosen[:k] or None), chosen[k:], rejected[k:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = text_prefix(chosen, rejected)
        if is_hh(chosen) and is_hh(rejected):  # kept as text: the prompt ends with a turn's cue
            cue = chosen.rfind("\n\nAssistant:", 0, k)
            k = cue + len("\n\nAssistant:") if cue >= 0 else k
        return (chosen[:k] or None), chosen[k:], rejected[k:]
    return None, chosen, rejected


def implicit_prompt(chosen: Any, rejected: Any, chat: bool, row: int, where: str) -> Any:
    """The prompt of an implicit-prompt preference row (for PPO's prompts): the common leading
    messages of the two conversations (HH transcripts parsed when ``chat``), or the common start
    of the two texts. DataError when they share none."""
    prompt, _, _ = preference_row(None, chosen, rejected, chat)
    if prompt is None:
        if not (is_messages(chosen) or isinstance(chosen, str)) or \
                not (is_messages(rejected) or isinstance(rejected, str)):
            raise DataError(f"data.path: row {row} of {where}: 'chosen' and 'rejected' are "
                            f"{type(chosen).__name__} and {type(rejected).__name__}; expected two "
                            "texts or two conversations")
        raise DataError(f"data.path: row {row} of {where}: 'chosen' and 'rejected' share no "
                        "prompt (no common start); set data.prompt_column to a prompt column")
    return prompt


# --------------------------------------------------------------------------- detection

@dataclass(frozen=True)
class Format:
    """A detected dataset format: its name and the column each part is read from."""

    name: str
    """one of the format names (``LANGUAGE_MODELING``, ...)"""
    columns: dict[str, str]
    """part (``prompt``, ``completion``, ``chosen``, ``rejected``, ``text``, ``messages``) -> column"""
    form: str = "standard"
    """``standard`` (text), ``conversational`` (chat messages) or ``Anthropic HH`` (parsed turns)"""

    def describe(self) -> str:
        """``prompt-completion (conversational): prompt 'prompt', completion 'completion'``"""
        cols = ", ".join(f"{part} {col!r}" for part, col in self.columns.items())
        return f"{self.name} ({self.form}): {cols}"


def _form(value: Any, chat: bool, row: dict | None = None) -> str:
    if is_messages(value):
        return "conversational"
    if row is not None and isinstance(value, str) and \
            any(is_messages(row.get(c)) for c in COMPLETION_COLUMNS):
        return "conversational, the string prompts read as user turns"
    if is_hh(value):
        return ("Anthropic HH transcripts, parsed into chat messages" if chat else
                "Anthropic HH transcripts, kept as text: the tokenizer has no chat template")
    return "standard"


def _pick(columns: Sequence[str], configured: str, default: str, *aliases: str) -> str | None:
    """The configured column when present; at the default name, TRL's / the legacy name."""
    if configured in columns:
        return configured
    if configured == default:
        return next((a for a in aliases if a in columns), None)
    return None


def _no_format(where: str, columns: Sequence[str], command: str, accepted: str, key: str) -> DataError:
    return DataError(f"{key}: {where} has columns {list(columns)}, which fit no format "
                     f"`rlhf-ppo {command}` reads; accepted: {accepted} (docs/data.md)")


def detect_sft(ds, data, where: str, chat: bool) -> Format:
    """The SFT format of ``ds``: conversational language modeling (``data.messages_column``,
    used when present), prompt-completion (``data.prompt_column`` + ``data.response_column``, at
    its default also TRL's ``completion``), or standard language modeling (``data.text_column``)."""
    cols = list(ds.column_names)
    first = ds[0] if len(ds) else {}
    completion = _pick(cols, data.response_column, "response", "completion")
    if data.messages_column in cols:
        fmt = Format(LANGUAGE_MODELING, {"messages": data.messages_column}, "conversational")
    elif data.prompt_column in cols and completion is not None:
        form = _form(first.get(data.prompt_column), chat)
        if form == "standard" and is_messages(first.get(completion)):
            form = "conversational, the string prompts read as user turns"
        fmt = Format(PROMPT_COMPLETION, {"prompt": data.prompt_column, "completion": completion},
                     form)
    elif data.text_column in cols:
        fmt = Format(LANGUAGE_MODELING, {"text": data.text_column})
    else:
        resp = repr(data.response_column) + (" or 'completion'" if data.response_column == "response"
                                             else "")
        raise _no_format(
            where, cols, "sft",
            f"language modeling ({data.text_column!r} = data.text_column, or "
            f"{data.messages_column!r} = data.messages_column), prompt-completion "
            f"({data.prompt_column!r} = data.prompt_column and {resp} = data.response_column)",
            "data.response_column" if data.prompt_column in cols else "data.path")
    logger.info("%s: %s", where, fmt.describe())
    return fmt


def detect_pairs(ds, data, where: str, chat: bool) -> Format:
    """The preference format of ``ds``: ``data.chosen_column`` + ``data.rejected_column``, with
    ``data.prompt_column`` (preference) or without (implicit-prompt preference)."""
    cols = list(ds.column_names)
    if data.chosen_column not in cols or data.rejected_column not in cols:
        missing = "data.chosen_column" if data.chosen_column not in cols else "data.rejected_column"
        raise _no_format(
            where, cols, "reward",
            f"preference ({data.prompt_column!r} = data.prompt_column, {data.chosen_column!r} = "
            f"data.chosen_column, {data.rejected_column!r} = data.rejected_column) or "
            f"implicit-prompt preference ({data.chosen_column!r} and {data.rejected_column!r} "
            "holding the whole conversation)", missing)
    first = ds[0] if len(ds) else {}
    parts = {"chosen": data.chosen_column, "rejected": data.rejected_column}
    if data.prompt_column in cols:
        fmt = Format(PREFERENCE, {"prompt": data.prompt_column, **parts},
                     _form(first.get(data.chosen_column), chat))
    else:
        fmt = Format(IMPLICIT_PREFERENCE, parts, _form(first.get(data.chosen_column), chat))
    logger.info("%s: %s", where, fmt.describe())
    return fmt


def detect_prompts(ds, cfg, where: str, chat: bool) -> Format:
    """PPO's prompts in ``ds``: ``data.prompt_column`` when present (prompt-only, or the prompt
    of prompt-completion / preference data); else the common start of ``chosen`` / ``rejected``
    (implicit-prompt preference); else the conversations of a ``messages`` column."""
    cols = list(ds.column_names)
    first = ds[0] if len(ds) else {}
    if cfg.prompt_column in cols:
        others = set(cols) - {cfg.prompt_column}
        name = (PREFERENCE if {"chosen", "rejected"} <= others else
                PROMPT_COMPLETION if others & {"completion", "response"} else PROMPT_ONLY)
        fmt = Format(name, {"prompt": cfg.prompt_column},
                     _form(first.get(cfg.prompt_column), chat, first))
    elif cfg.prompt_column == "prompt" and "chosen" in cols and "rejected" in cols:
        fmt = Format(IMPLICIT_PREFERENCE, {"chosen": "chosen", "rejected": "rejected"},
                     _form(first.get("chosen"), chat))
    elif cfg.prompt_column == "prompt" and "messages" in cols:
        fmt = Format(LANGUAGE_MODELING, {"prompt": "messages"}, "conversational")
    else:
        raise _no_format(
            where, cols, "train",
            f"prompt-only ({cfg.prompt_column!r} = data.prompt_column; prompt-completion and "
            "preference data have one too), implicit-prompt preference ('chosen' and 'rejected': "
            "the prompt is their common start) or conversations ('messages')",
            "data.prompt_column")
    logger.info("%s: %s", where, fmt.describe())
    return fmt
