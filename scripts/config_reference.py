"""Print (or, with --write, update in README.md) the config reference table.

The table is generated from the config dataclasses' field docstrings, so the README documents
every field; tests/test_docs.py fails when the README's copy is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf_ppo.config import iter_fields

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def table() -> str:
    """The markdown table of every config key."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in iter_fields():
        tp = tp.replace("rlhf_ppo.config.", "").replace("|", "or")
        rows.append(f"| `{key}` | {tp} | `{default!r}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args()
    if not args.write:
        print(table())
        return 0
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{readme}: markers {BEGIN} / {END} not found", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
