"""The ``rlhf-ppo`` command line.

``rlhf-ppo train|sft|reward|evaluate|serve-reward|serve-env --config FILE key.sub=value ...`` and
``rlhf-ppo quickstart`` and ``rlhf-ppo report RUN_DIR``.
Exit codes: 0 done, 2 config error, 1 data/model/reward/checkpoint error, 128+signal when
interrupted (a checkpoint is saved first). An error prints one line (a reward function's or
tool's names its file and line); ``--traceback`` prints the full traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback
import warnings

from .config import iter_fields, load_config, section_docs
from .errors import ConfigError, UnreadKeyWarning, exit_code
from .eval_config import load_eval_config
from .progress import plural, setup_cli_logging

# command -> (module, config class, run function, help)
COMMANDS = {
    "train": ("rlhf_ppo.config", "Config", None, "align a policy to a reward with PPO"),
    "sft": ("rlhf_ppo.sft", "SFTConfig", "run_sft", "supervised fine-tuning on prompt/response data"),
    "reward": ("rlhf_ppo.reward_training", "RewardTrainConfig", "run_reward_training",
               "train a reward model on preference pairs (Bradley-Terry)"),
    "evaluate": ("rlhf_ppo.evaluate", "EvalConfig", "run_evaluate",
                 "sample from policy and reference, score, and write report.html"),
    "serve-reward": ("rlhf_ppo.serve", "ServeConfig", "run_serve",
                     "serve a reward model or function over HTTP, for `url` reward sources"),
    "serve-env": ("rlhf_ppo.serve", "ServeEnvConfig", "run_serve_env",
                  "serve a reset/step environment over HTTP, for `agent.environment: http://...`"),
}


def plain(text: str) -> str:
    """Docstring text for a terminal: reST literals (````x````) and roles (``:func:`x```) as
    plain ``x``."""
    return re.sub(r":\w+:`([^`]+)`", r"\1", text).replace("``", "")


def _fields_help(command: str) -> str | None:
    try:
        cls = _config_class(command)
    except ImportError:  # an optional stage whose module failed to import: no key list
        return None
    lines, sections, current = ["config keys (override any with key.sub=value):"], section_docs(cls), ""
    for key, tp, default, doc in iter_fields(cls):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        if section != current and section in sections:  # a header per section, in field order
            lines.append(plain(f"\n {section}: {sections[section]}"))
        current = section
        lines.append(plain(f"  {key} ({tp}, default {default!r}): {doc}"))
    return "\n".join(lines)


def _config_class(command: str):
    module, cls, _, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), cls)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rlhf-ppo``."""
    parser = argparse.ArgumentParser(prog="rlhf-ppo", description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, epilog=_fields_help(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML config file (default: the built-in defaults)" + (
            "; or a PPO run's config.yaml, whose data, reward and generation sections are used"
            if name == "evaluate" else ""))
        p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="dotted overrides, values parsed as YAML")
        _add_traceback_flag(p)
    q = sub.add_parser("quickstart", help="the whole pipeline offline on a built-in review task: "
                       "SFT, reward model, PPO, evaluation report")
    q.add_argument("--output-dir", default="runs/quickstart", help="folder for every stage's output")
    q.add_argument("--fresh", action="store_true", help="rerun every stage even if its output exists")
    _add_traceback_flag(q)
    r = sub.add_parser("report", help="write a PPO run's training report (RUN_DIR/report.html)")
    r.add_argument("run_dir", help="the run's output_dir (metrics.jsonl, samples.jsonl, alarms.jsonl, "
                   "config.yaml)")
    r.add_argument("--output", help="where to write the page (default: RUN_DIR/report.html)")
    return parser


def _add_traceback_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, print the full traceback (the user code's included) "
                        "after the one-line message")


def _train(cfg, args) -> int:
    from .errors import TrainingInterrupted
    from .trainer import PPOTrainer

    try:
        history = PPOTrainer(cfg).train()
    except TrainingInterrupted as e:
        again = " ".join(["rlhf-ppo train"] + (["--config", args.config] if args.config else [])
                         + [o for o in args.overrides if not o.startswith("resume_from=")]
                         + ["resume_from=latest"])
        print(f"rlhf-ppo: {e}. Resume with:\n  {again}", file=sys.stderr)
        return 128 + e.signum
    if history and int(os.environ.get("RANK", "0")) == 0:
        first, last = history[0], history[-1]
        kl = f"kl {last['kl']:.3f}" if cfg.ppo.kl.reads_reference() else "no reference"
        print(f"done: {plural(len(history), 'iteration')}, score_mean {first['score_mean']:.3f} -> "
              f"{last['score_mean']:.3f}, {kl}; policy saved to {cfg.output_dir}/final")
    return 0


def _run(args) -> int:
    if args.command == "quickstart":
        from .tasks.quickstart import run_quickstart

        run_quickstart(args.output_dir, fresh=args.fresh)
        return 0
    if args.command == "report":
        from .train_report import write_train_report

        print(f"report: {write_train_report(args.run_dir, args.output)}")
        return 0
    if args.command == "evaluate":  # --config may also be a PPO run's config.yaml
        cfg = load_eval_config(args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides, cls=_config_class(args.command))
    if args.command == "train":
        return _train(cfg, args)
    module, _, fn, _ = COMMANDS[args.command]
    summary = getattr(importlib.import_module(module), fn)(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(_done_line(args.command, summary, cfg))
    return 0


def _done_line(command: str, s: dict, cfg) -> str:
    """One line a user reads at the end of a stage."""
    if command == "evaluate":
        f = lambda d: f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
        return (f"done: score policy {f(s['policy']['score'])} vs reference "
                f"{f(s['reference']['score'])}, win rate {f(s['win_rate'])}, kl {s['kl']['mean']:.3f}; "
                + (f"accuracy policy {f(s['policy']['accuracy'])} vs reference "
                   f"{f(s['reference']['accuracy'])}; " if "accuracy" in s["policy"] else "")
                + f"report: {cfg.output_dir}/report.html")
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
             if isinstance(v, (int, float, str)) or v is None}
    return "done: " + ", ".join(f"{k} {v}" for k, v in shown.items())


_plain_showwarning = warnings.showwarning


def _show_config_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A renamed or unread config key as one line naming the key (the source line of the warning
    is ours, not the user's); other warnings as Python shows them."""
    renamed = issubclass(category, FutureWarning) and str(message).startswith("config key")
    if renamed or issubclass(category, UnreadKeyWarning):
        print(f"rlhf-ppo: warning: {message}", file=file or sys.stderr)
    else:
        _plain_showwarning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    # transformers' per-file "Loading weights" / "Writing model shards" bars at every load and
    # save are noise here: the commands show their own progress
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.showwarning = _show_config_warning
    try:
        return _run(args)
    except Exception as e:  # the errors users see (errors.py) get their exit code; bugs raise
        code = exit_code(e)
        if code is None:
            raise
        label = "config error" if isinstance(e, ConfigError) else type(e).__name__
        full = getattr(args, "traceback", False)
        if full:
            traceback.print_exception(e, file=sys.stderr)
        hint = " (--traceback shows the full traceback)" if e.__cause__ and not full else ""
        print(f"rlhf-ppo: {label}: {e}{hint}", file=sys.stderr)
        return code
