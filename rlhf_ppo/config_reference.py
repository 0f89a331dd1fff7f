"""Print, write (--write) or check (--check) the config reference tables of docs/config.md.

One table per command (`train`, `sft`, `reward`, `evaluate`), generated from the config
dataclasses' field docstrings, so the docs cover every field:

    python -m rlhf_ppo.config_reference            # print the tables
    python -m rlhf_ppo.config_reference --write    # rewrite the generated blocks of docs/config.md
    python -m rlhf_ppo.config_reference --check    # exit 1 when docs/config.md is stale

tests/test_docs.py fails when the copy in docs/config.md is stale.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from rlhf_ppo.config import iter_fields

COMMANDS = {"train": ("rlhf_ppo.config", "Config"), "sft": ("rlhf_ppo.sft", "SFTConfig"),
            "reward": ("rlhf_ppo.reward_training", "RewardTrainConfig"),
            "evaluate": ("rlhf_ppo.evaluate", "EvalConfig")}
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"  # train
DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
WRITE_COMMAND = "python -m rlhf_ppo.config_reference --write"


def markers(command: str) -> tuple[str, str]:
    """The markers around a command's table."""
    if command == "train":
        return BEGIN, END
    return f"<!-- config-reference:{command}:begin -->", f"<!-- config-reference:{command}:end -->"


def table(command: str = "train") -> str:
    """The markdown table of every config key of a command."""
    module, name = COMMANDS[command]
    cls = getattr(importlib.import_module(module), name)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in iter_fields(cls):
        tp = tp.replace("rlhf_ppo.config.", "").replace("|", "or")
        rows.append(f"| `{key}` | {tp} | `{default!r}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def render(text: str) -> str:
    """`text` with every command's generated block replaced by the current table.

    Raises ValueError when a command's markers are missing.
    """
    for command in COMMANDS:
        begin, end = markers(command)
        if begin not in text or end not in text:
            raise ValueError(f"markers {begin} / {end} not found")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{table(command)}\n{end}{tail}"
    return text


def stale(text: str) -> list[str]:
    """The commands whose generated block in `text` is missing or differs from the current table."""
    out = []
    for command in COMMANDS:
        begin, end = markers(command)
        if begin not in text or end not in text:
            out.append(command)
            continue
        section = text.split(begin, 1)[1].split(end, 1)[0].strip()
        if section != table(command):
            out.append(command)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the tables in the file")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 when the file's tables are not current")
    parser.add_argument("--file", type=Path, default=DOC, help=f"default: {DOC}")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        for command in COMMANDS:
            print(f"## {command}\n{table(command)}\n")
        return 0
    try:
        text = args.file.read_text()
    except OSError as e:
        print(f"{args.file}: {e.strerror or e}", file=sys.stderr)
        return 1
    if args.check:
        bad = stale(text)
        if bad:
            print(f"{args.file}: config reference out of date for {', '.join(bad)}; "
                  f"run: {WRITE_COMMAND}", file=sys.stderr)
            return 1
        print(f"{args.file}: config reference is current")
        return 0
    try:
        new = render(text)
    except ValueError as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    if new != text:
        args.file.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
