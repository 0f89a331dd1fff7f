"""The run folder every training command writes (PPO, SFT, reward training): which files make a
run, when an existing run may be resumed or replaced, the metrics and samples files, and the
signals that stop a run or ask for a checkpoint.

A folder holding another run is refused unless ``resume_from`` continues it (PPO, with the same
settings) or ``overwrite`` clears it: a new run never silently appends to or replaces old
metrics and checkpoints.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .errors import ConfigError
from .jsonl import append_jsonl, read_jsonl, write_jsonl
from .paths import absolute_paths, run_config_yaml

logger = logging.getLogger(__name__)

PPO_RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "final")
"""what makes a folder hold a PPO run (besides its checkpoint-N folders)"""
FINETUNE_RUN_FILES = ("metrics.jsonl", "final", "config.yaml")
"""what makes a folder hold an SFT or reward-model run"""

RESUMABLE_KEYS = {"iterations", "resume_from", "overwrite", "save_every", "keep_last",
                  "report_to", "output_dir", "on_nonfinite", "sample_every", "sample_prompts",
                  "peft.save_merged", "threads", "alarms"}
"""keys that may differ between a run and its resumption: what and where it writes, how long
it runs, how often it saves and logs samples, the threads, the alarms; none changes the
trajectory"""


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key (saved X, now Y)`` for every setting that differs between two nested config dicts,
    except :data:`RESUMABLE_KEYS`."""
    out = []
    for k in sorted(set(saved) | set(now)):
        key = f"{prefix}{k}"
        if key in RESUMABLE_KEYS:
            continue
        va, vb = saved.get(k), now.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key} (saved {va!r}, now {vb!r})")
    return out


def held_run_files(out: Path, run_files: tuple[str, ...]) -> list[str]:
    """The names in ``out`` that belong to a run: ``run_files`` and complete checkpoints."""
    return ([n for n in run_files if (out / n).exists()]
            + [p.name for p in ckpt.list_checkpoints(out)])


def prepare_output_dir(output_dir: str | Path, overwrite: bool, run_files: tuple[str, ...],
                       resume_from: str | None = None, config: dict | None = None,
                       upgrade: Callable[[dict], dict] | None = None) -> Path | None:
    """Check ``output_dir`` before anything loads; return the checkpoint to resume from, if any.

    ``resume_from`` (``latest`` or a folder) must name a complete checkpoint trained with the same
    settings as ``config`` (a nested dict; :data:`RESUMABLE_KEYS` may differ) unless
    ``overwrite``; ``upgrade`` brings a checkpoint's config of an older layout (renamed keys) to
    the current one before they are compared. Without it, a folder holding a run is refused
    unless ``overwrite`` (the caller then clears it with :func:`clear_run`)."""
    import yaml

    out = Path(output_dir)
    if resume_from is not None:
        folder = ckpt.resolve_resume(resume_from, out)
        saved_cfg = folder / ckpt.STATE_DIR / "config.yaml"
        if saved_cfg.is_file() and config is not None and not overwrite:
            saved = yaml.safe_load(saved_cfg.read_text())
            # compared with local paths absolute: the saved config holds them so (paths.py)
            diff = config_diff(absolute_paths(upgrade(saved) if upgrade else saved),
                               absolute_paths(config))
            if diff:
                raise ConfigError(
                    f"resume_from: {folder} was trained with other settings: {'; '.join(diff)}. "
                    "They change the training itself, so resume with the saved values (its "
                    f"{ckpt.STATE_DIR}/config.yaml), or start a new run in another output_dir")
        return folder
    held = held_run_files(out, run_files)
    if held and not overwrite:
        raise ConfigError(f"output_dir: {str(out)!r} holds a run ({', '.join(held)}); "
                          + ("resume it with resume_from=latest, " if "samples.jsonl" in run_files
                             else "")
                          + "pick another output_dir, or set overwrite=true to delete it")
    return None


def clear_run(out: Path, run_files: tuple[str, ...]) -> None:
    """Delete a previous run's files and checkpoints from ``out`` (``overwrite: true``); other
    files stay."""
    for name in run_files:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in list(out.glob("checkpoint-*")) + list(out.glob(".tmp-checkpoint-*")):
        shutil.rmtree(p, ignore_errors=True)


def init_run_folder(out: Path, cfg, run_files: tuple[str, ...], clear: bool, is_main: bool,
                    barrier=lambda: None) -> None:
    """On the main process: create ``out``, delete a previous run's files when ``clear``
    (``overwrite: true``, checked by :func:`prepare_output_dir`) and write ``config.yaml``;
    every process then waits at ``barrier``."""
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if clear:
            clear_run(out, run_files)
        (out / "config.yaml").write_text(run_config_yaml(cfg))
    barrier()


class RunLog:
    """``metrics.jsonl`` and ``samples.jsonl`` of a run folder (only the main process writes),
    and the trackers (an accelerator's ``log``) when ``tracker`` is given."""

    def __init__(self, folder: str | Path, is_main: bool = True, tracker=None):
        self.folder, self.is_main, self.tracker = Path(folder), is_main, tracker
        self.metrics_file = self.folder / "metrics.jsonl"
        self.samples_file = self.folder / "samples.jsonl"

    def start(self, history: list[dict], iteration: int) -> None:
        """(Re)write ``metrics.jsonl`` with ``history`` and drop ``samples.jsonl`` rows logged
        after ``iteration`` (a run resumed from an earlier checkpoint logs them again)."""
        if not self.is_main:
            return
        write_jsonl(self.metrics_file, history)
        if self.samples_file.is_file():
            write_jsonl(self.samples_file,
                        [r for r in read_jsonl(self.samples_file) if r["iteration"] <= iteration])

    def metrics(self, record: dict, step: int | None = None) -> None:
        """Append one metrics record (and send its numbers to the trackers at ``step``)."""
        if self.is_main:
            append_jsonl(self.metrics_file, record)
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in record.items()
                              if isinstance(v, (int, float)) and k != "iteration"}, step=step)

    def samples(self, rows: list[dict]) -> None:
        """Append sample rows (``iteration``, ``prompt``, ``response``, ``score``) and log them."""
        if not self.is_main:
            return
        append_jsonl(self.samples_file, *rows)
        for row in rows:
            logger.info("iteration %d sample (score %.3f): %r -> %r", row["iteration"],
                        row["score"], row["prompt"], row["response"])


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"a.b": scalar}`` (trackers take flat hyper-parameters)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def metric_jumps(history: list[dict], metrics: dict, keys: tuple[str, ...],
                 factor: float = 10.0, window: int = 10, min_history: int = 3
                 ) -> list[tuple[str, float, float]]:
    """``(key, value, median)`` for each of ``keys`` whose value in ``metrics`` is more than
    ``factor`` times its median over the last ``window`` iterations of ``history`` (at least
    ``min_history`` finite values needed; non-finite values are ignored)."""
    out = []
    for key in keys:
        value = metrics.get(key)
        past = [m[key] for m in history[-window:]
                if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
        if value is None or not math.isfinite(value) or len(past) < min_history:
            continue
        median = sorted(past)[len(past) // 2]
        if median > 0 and value > factor * median:
            out.append((key, float(value), float(median)))
    return out


def warn_on_jumps(history: list[dict], metrics: dict, is_main: bool = True) -> None:
    """Warn when the value loss or the gradient norm jumps by an order of magnitude
    (:func:`metric_jumps`), the first sign of a critic (and then a policy) going off the rails."""
    if not is_main:
        return
    for key, value, median in metric_jumps(history, metrics, ("value_loss", "grad_norm")):
        logger.warning(
            "iteration %d: %s %.4g is %.0fx its median %.4g over the last iterations: the "
            "critic may be diverging (see docs/critic.md: a separate critic, "
            "ppo.critic.backbone_grad, a lower optim.critic_lr or ppo.critic.vf_coef)",
            metrics["iteration"], key, value, value / median, median)


class SignalRequests:
    """While entered, SIGTERM / SIGINT ask the run to stop after the current iteration (a second
    SIGINT interrupts at once) and SIGUSR1 asks for a checkpoint after it; the previous handlers
    come back on exit. ``current()`` names the iteration in progress for the log messages.
    Outside the main thread (where Python cannot install handlers) nothing is installed."""

    def __init__(self, current=lambda: 0):
        self.current = current
        self.stop: int | None = None  # the stop signal received, if any
        self.save = False  # a checkpoint was asked for
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == getattr(signal, "SIGUSR1", None):
            self.save = True
            logger.info("SIGUSR1 received: a checkpoint follows iteration %d", self.current())
            return
        if self.stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.stop = signum
        logger.warning("%s received: finishing iteration %d, then writing a checkpoint",
                       signal.Signals(signum).name, self.current())

    def __enter__(self) -> SignalRequests:
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1]
                                                         if hasattr(signal, "SIGUSR1") else [])
            self._previous = {s: signal.signal(s, self._on_signal) for s in signals}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def agreed(self, acc) -> tuple[int, bool]:
        """(stop signal any process received or 0, whether any process asked for a checkpoint),
        reduced over processes so that all stop or save together; clears the save request."""
        import torch

        flags = torch.tensor([float(self.stop or 0), float(self.save)], device=acc.device)
        signum, save = acc.reduce(flags, "max").tolist()
        self.save = False
        return int(signum), bool(save)
