"""Print (or, with --write, update in README.md) the config reference tables.

One table per command (`train`, `sft`, `reward`, `evaluate`), generated from the config
dataclasses' field docstrings, so the README documents every field; tests/test_docs.py fails when
the README's copy is stale.
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


def markers(command: str) -> tuple[str, str]:
    """The README markers around a command's table."""
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args()
    if not args.write:
        for command in COMMANDS:
            print(f"## {command}\n{table(command)}\n")
        return 0
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    for command in COMMANDS:
        begin, end = markers(command)
        if begin not in text or end not in text:
            print(f"{readme}: markers {begin} / {end} not found", file=sys.stderr)
            return 1
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{table(command)}\n{end}{tail}"
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
