"""Print, write (--write) or check (--check) the config reference tables of docs/config.md.

One table per command (`train`, `sft`, `reward`, `evaluate`, `serve-reward`, `serve-env`),
generated from the config dataclasses' field docstrings, so the docs cover every field; and the
table of the advantage estimators in docs/estimators.md, generated from their registry
(`rlhf_ppo.estimators`):

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
            "evaluate": ("rlhf_ppo.eval_config", "EvalConfig"),
            "serve-reward": ("rlhf_ppo.serve", "ServeConfig"),
            "serve-env": ("rlhf_ppo.serve", "ServeEnvConfig")}
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


EST_DOC = DOC.parent / "estimators.md"
EST_BEGIN, EST_END = "<!-- estimators:begin -->", "<!-- estimators:end -->"


def estimator_table() -> str:
    """The markdown table of the estimator registry (:data:`rlhf_ppo.estimators.ESTIMATORS`):
    what each estimator needs, whether it whitens, which optional keys it reads."""
    from rlhf_ppo import estimators

    whiten = {None: "`ppo.advantages.whiten` (default yes)", True: "always", False: "never"}
    rows = ["| estimator | what | critic | group (`samples_per_prompt` > 1) | whitens | reads the "
            "critic and GAE keys |", "|---|---|---|---|---|---|"]
    for e in estimators.ESTIMATORS.values():
        rows.append(f"| `{e.name}` | {e.summary} | {'yes' if e.critic else 'no'} | "
                    f"{'yes' if e.groups else 'no'} | {whiten[e.whiten]} | "
                    f"{'yes' if e.reads else 'no'} |")
    return "\n".join(rows)


def estimators_current(text: str) -> bool:
    """Whether ``text`` (docs/estimators.md) holds the current :func:`estimator_table`."""
    if EST_BEGIN not in text or EST_END not in text:
        return False
    return text.split(EST_BEGIN, 1)[1].split(EST_END, 1)[0].strip() == estimator_table()


def render_estimators(text: str) -> str:
    """``text`` with its estimator block replaced by the current table (ValueError: no markers)."""
    if EST_BEGIN not in text or EST_END not in text:
        raise ValueError(f"markers {EST_BEGIN} / {EST_END} not found")
    head, rest = text.split(EST_BEGIN, 1)
    return f"{head}{EST_BEGIN}\n{estimator_table()}\n{EST_END}{rest.split(EST_END, 1)[1]}"


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
    if args.file == DOC and not _estimators(check=args.check):
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


def _estimators(check: bool) -> bool:
    """Check (or rewrite) the estimator table of docs/estimators.md; False when stale or
    unwritable."""
    text = EST_DOC.read_text()
    if check:
        if not estimators_current(text):
            print(f"{EST_DOC}: estimator table out of date; run: {WRITE_COMMAND}", file=sys.stderr)
            return False
        return True
    try:
        new = render_estimators(text)
    except ValueError as e:
        print(f"{EST_DOC}: {e}", file=sys.stderr)
        return False
    if new != text:
        EST_DOC.write_text(new)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
