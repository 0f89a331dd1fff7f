"""Experiment trackers (``report_to``): which ones exist, the check that each one's package is
installed (at config time, before any model loads), where each one writes, and starting them.

The trackers themselves are accelerate's (``accelerate.tracking``): this module only names them,
checks them with accelerate's own ``is_<name>_available`` functions, and hands each one the
settings that put its files under the run folder (where the tracker allows it), the project name
``rlhf_ppo`` and the run's name (the output folder's name). ``overwrite: true`` deletes
:data:`TRACKER_FILES`; a resumed run continues the same tracker runs (``trackers.json`` keeps their
ids) and appends to their files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

PROJECT = "rlhf_ppo"
"""the project (W&B, trackio, SwanLab, Comet), experiment (MLflow) or TensorBoard sub-folder name"""

TrackerName = Literal["all", "tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim",
                      "clearml", "dvclive", "swanlab"]
"""the values of ``report_to``: accelerate's ``LoggerType`` (``all``: every installed tracker)"""

PACKAGES: dict[str, str] = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
    "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive",
    "swanlab": "swanlab",
}
"""tracker -> the pip package it needs, which is also rlhf_ppo's extra of the same name"""

IDS_FILE = "trackers.json"
"""the W&B and MLflow run ids of a run folder, so that a resumed run continues them"""

TRACKER_FILES = (PROJECT, "wandb", "mlflow.db", "mlartifacts", ".aim", "dvclive", "swanlog", IDS_FILE)
"""what the trackers write in a run folder (TensorBoard's events are in ``rlhf_ppo/``), deleted by
``overwrite: true``"""

_our_mlflow_uris: set[str] = set()  # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI


def is_available(name: str) -> bool:
    """Whether ``name``'s package is installed: accelerate's ``is_<name>_available`` (looked up at
    each call, so a test can patch it)."""
    import accelerate.utils

    return bool(getattr(accelerate.utils, f"is_{name}_available")())


def check_report_to(names: list[str], key: str = "report_to") -> None:
    """Raise ConfigError when a name is not a tracker of the installed accelerate, or when its
    package is missing (naming the pip extra): the run would otherwise go on and log nothing."""
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for i, name in enumerate(names):
        if name == "all":
            continue
        if name not in PACKAGES or name not in LOGGER_TYPE_TO_CLASS:
            known = ", ".join(["all", *(n for n in PACKAGES if n in LOGGER_TYPE_TO_CLASS)])
            raise ConfigError(f"{key}[{i}]: expected one of {known} (the trackers of the installed "
                              f"accelerate), got {name!r}")
        if not is_available(name):
            raise ConfigError(f"{key}[{i}]: the {name} tracker needs the {PACKAGES[name]!r} package, "
                              f"which is not installed: pip install 'rlhf_ppo[{name}]'")


def resolve(names: list[str]) -> list[str]:
    """The trackers to start: ``names`` without repeats, ``all`` replaced by every installed one."""
    out: list[str] = []
    for name in names:
        for n in ([n for n in PACKAGES if is_available(n)] if name == "all" else [name]):
            if n not in out:
                out.append(n)
    return out


def mlflow_uri(out: Path) -> str:
    """MLflow's tracking store: ``MLFLOW_TRACKING_URI`` when the user set it, else a SQLite file
    in the run folder (MLflow 3 refuses its old ``mlruns`` file store by default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri not in _our_mlflow_uris:
        return uri
    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    _our_mlflow_uris.add(uri)  # not the user's choice when the next run reads the variable
    return uri


def init_kwargs(names: list[str], out: Path, ids: dict[str, str], resume_iteration: int | None
                ) -> dict[str, dict[str, Any]]:
    """Each tracker's keyword arguments for accelerate's ``init_trackers``: the run's name, its
    files under ``out`` where the tracker takes a folder, and on a resume (``resume_iteration``,
    the checkpoint's iteration) the ids of the runs to continue (``ids``)."""
    run, resumed = out.resolve().name, resume_iteration is not None
    kw: dict[str, dict[str, Any]] = {
        # events after the checkpoint's iteration were logged by the run being replaced
        "tensorboard": {"purge_step": resume_iteration + 1} if resumed else {},
        "wandb": {"dir": str(out), "name": run,
                  **({"id": ids["wandb"], "resume": "allow"} if resumed and "wandb" in ids else {})},
        "mlflow": {"run_name": run, "logging_dir": str(out.resolve() / "mlartifacts"),
                   **({"run_id": ids["mlflow"]} if resumed and "mlflow" in ids else {})},
        "trackio": {"name": run, "resume": "allow" if resumed else "never"},
        "dvclive": {"dir": str(out / "dvclive"), "resume": resumed},
        "swanlab": {"experiment_name": run, "logdir": str(out / "swanlog")},
    }
    return {n: kw[n] for n in names if n in kw}


def start(acc, report_to: list[str], config: dict[str, Any], out: Path,
          resume: Path | None = None) -> None:
    """Start the trackers of ``report_to`` on ``acc`` with the flat ``config`` as their
    hyper-parameters, continuing the tracker runs of ``out`` when resuming from the checkpoint
    folder ``resume``; write their run ids to ``out/trackers.json`` (main process)."""
    names = resolve(report_to)
    if not names:
        return
    ids_file = out / IDS_FILE
    ids = json.loads(ids_file.read_text()) if resume is not None and ids_file.is_file() else {}
    if acc.is_main_process:
        if "mlflow" in names:
            import mlflow

            mlflow.set_tracking_uri(mlflow_uri(out))
        if "swanlab" in names:
            (out / "swanlog").mkdir(parents=True, exist_ok=True)  # swanlab wants it to exist
    acc.init_trackers(PROJECT, config=config, init_kwargs=init_kwargs(
        names, out, ids, None if resume is None else checkpoint_iteration(resume)))
    if acc.is_main_process:
        ids_file.write_text(json.dumps(run_ids(acc, names), indent=1) + "\n")


def checkpoint_iteration(folder: Path) -> int:
    """The iteration a checkpoint folder was saved at (its ``trainer_state.json``)."""
    from .checkpoint import STATE_DIR

    return int(json.loads((folder / STATE_DIR / "trainer_state.json").read_text())["iteration"])


def run_ids(acc, names: list[str]) -> dict[str, str]:
    """The W&B and MLflow run ids of the started trackers (a resume passes them back)."""
    ids = {}
    if "wandb" in names:
        ids["wandb"] = acc.get_tracker("wandb", unwrap=True).id
    if "mlflow" in names:
        ids["mlflow"] = acc.get_tracker("mlflow").active_run.info.run_id
    return ids
