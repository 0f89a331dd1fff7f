"""The ``rlhf-ppo`` command line: ``rlhf-ppo train --config FILE key.sub=value ...``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, iter_fields, load_config


def _fields_help() -> str:
    lines = ["config keys (override any with key.sub=value):"]
    for key, tp, default, doc in iter_fields():
        lines.append(f"  {key} ({tp}, default {default!r}): {doc}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rlhf-ppo``."""
    parser = argparse.ArgumentParser(prog="rlhf-ppo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="align a policy to a reward with PPO",
                           epilog=_fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="dotted overrides, values parsed as YAML")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rlhf-ppo: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "train":
        from .checkpoint import CheckpointError
        from .data import DataError
        from .models import ModelLoadError
        from .rewards import RewardError
        from .trainer import NonFiniteError, PPOTrainer, TrainingInterrupted

        try:
            history = PPOTrainer(cfg).train()
        except ConfigError as e:
            print(f"rlhf-ppo: config error: {e}", file=sys.stderr)
            return 2
        except TrainingInterrupted as e:
            again = " ".join(["rlhf-ppo train"] + (["--config", args.config] if args.config else [])
                             + [o for o in args.overrides if not o.startswith("resume_from=")]
                             + ["resume_from=latest"])
            print(f"rlhf-ppo: {e}. Resume with:\n  {again}", file=sys.stderr)
            return 128 + e.signum
        except (DataError, ModelLoadError, RewardError, NonFiniteError, CheckpointError) as e:
            print(f"rlhf-ppo: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        if history and int(os.environ.get("RANK", "0")) == 0:
            first, last = history[0], history[-1]
            print(f"done: {len(history)} iterations, score_mean {first['score_mean']:.3f} -> "
                  f"{last['score_mean']:.3f}, kl {last['kl']:.3f}; policy saved to "
                  f"{cfg.output_dir}/final")
    return 0
