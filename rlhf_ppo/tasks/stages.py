"""One stage runner for the demos: a pipeline is a list of stages, each run into its own folder
and reused on the next run while its config is unchanged.

A stage records what it ran with in ``OUT/NAME/.complete`` (JSON, written atomically)::

    {"config": {...the stage's config...}, "summary": {...what the stage returned...}}

On the next run a stage is reused (its function not called, its recorded summary returned) when
that marker exists and its config equals the current one. Otherwise it runs again, and so does
every stage after it, since later stages read earlier stages' outputs (a new SFT model needs a new
reward model, PPO run and evaluation). A marker that is missing, unreadable or of an older layout
means "run again". The marker is removed before a stage runs, so an interrupted stage is never
taken for a finished one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import config_from_dict
from ..jsonl import json_safe

logger = logging.getLogger(__name__)

MARKER = ".complete"


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline, run into ``OUT/name``."""

    name: str
    """the stage's folder under the output folder, and its key in the summaries"""
    config: dict[str, Any]
    """everything the stage's result depends on, JSON-able: a change reruns it and every later stage"""
    run: Callable[[dict[str, Any]], dict[str, Any]]
    """runs the stage on (a copy of) ``config``; returns its summary, JSON-able"""


def as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples as lists, NaN as None, int keys as strings), so a
    config or summary compares equal to its recorded copy."""
    return json.loads(json.dumps(json_safe(obj)))


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The ``{"config", "summary"}`` recorded in ``folder/.complete``; None when it is missing,
    unreadable, or of an older layout (a bare summary, or ``{"stage_config", "summary"}``)."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or set(record) != {"config", "summary"}:
        return None
    if not isinstance(record["summary"], dict):
        return None
    return record


def write_marker(folder: Path, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """Write ``folder/.complete`` atomically (a temporary file renamed over it), so a crash never
    leaves a half-written marker."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(as_json({"config": config, "summary": summary}), indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{MARKER}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, folder / MARKER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_stages(out: str | Path, stages: Sequence[Stage], fresh: bool = False,
               label: str = "stages") -> dict[str, dict[str, Any]]:
    """Run ``stages`` in order under ``out`` (stage ``s`` in ``out / s.name``); returns every
    stage's summary by name, each as it reads back from JSON (the same for a run and a reuse),
    with ``seconds`` (the stage's run time, recorded when it ran) added.

    A stage is reused when its marker records its current config, unless ``fresh`` or an earlier
    stage ran in this call. ``label`` names the pipeline in the log lines."""
    out = Path(out)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    summaries: dict[str, dict[str, Any]] = {}
    rerun = fresh
    for stage in stages:
        folder, config = out / stage.name, as_json(stage.config)
        previous = None if rerun else read_marker(folder)
        if previous is not None and previous["config"] == config:
            logger.info("%s: %s already done (%s), reusing it", label, stage.name, folder)
            summaries[stage.name] = previous["summary"]
            continue
        rerun = True  # this stage runs: the ones after it read its output
        (folder / MARKER).unlink(missing_ok=True)
        logger.info("%s: running %s (%s)", label, stage.name, folder)
        t0 = time.perf_counter()
        summary = dict(stage.run(copy.deepcopy(stage.config)))
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        write_marker(folder, config, summary)
        summaries[stage.name] = as_json(summary)
    return summaries


def run_pipeline(out: str | Path, stages: Sequence[Stage], fresh: bool, label: str,
                 summary_text: Callable[[Path, dict[str, dict[str, Any]], float], str]
                 ) -> dict[str, dict[str, Any]]:
    """A demo's whole run: one torch thread (the models are tiny: one thread is fastest, and far
    faster on a busy machine, where several threads per process spin against each other),
    ``fresh`` deletes ``out`` first, :func:`run_stages`, then prints ``summary_text(out,
    summaries, seconds)``. Returns every stage's summary by name."""
    torch.set_num_threads(1)
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summaries = run_stages(out, stages, fresh=fresh, label=label)
    print(summary_text(out, summaries, time.perf_counter() - start), flush=True)
    return summaries


def command_stage(name: str, config: dict[str, Any], config_class: type,
                  command: Callable[[Any], dict[str, Any]]) -> Stage:
    """A stage that runs one rlhf_ppo command (``run_sft``, ``run_evaluate``, ...) on ``config``
    parsed as ``config_class``, then writes the config as ``OUTPUT_DIR/stage.yaml`` so the stage
    can be rerun alone (``rlhf-ppo sft --config OUT/sft/stage.yaml``)."""
    def run(cfg: dict[str, Any]) -> dict[str, Any]:
        summary = command(config_from_dict(cfg, config_class))
        (Path(cfg["output_dir"]) / "stage.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        return summary

    return Stage(name, config, run)
