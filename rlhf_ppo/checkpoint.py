"""Checkpoints that resume exactly, and the one atomic folder writer every save uses.

A checkpoint folder ``OUTPUT_DIR/checkpoint-N`` holds:
- the policy and tokenizer (``save_pretrained``, loadable by ``AutoModelForCausalLM``) with the
  value head (``value_head.safetensors``) or the separate critic (``critic/``);
- ``training_state/``: ``optimizer.pt`` and ``scheduler.pt`` (tensors and numbers only, read
  back with ``torch.load(weights_only=True)``), ``rng_state_R.pt`` for every process R,
  ``trainer_state.json`` (the trainer's ``state_dict()``: iteration, KL controller, data
  position, score statistics), ``config.yaml`` and ``metrics.jsonl``;
- ``.complete``, written last.

Every folder the package saves (checkpoints, ``final/``, the built-in assets) is assembled under a
temporary name and renamed into place (:func:`atomic_folder`), so a folder under its real name is
always whole. This module knows the folder format only: the trainer hands it dicts and gets dicts
back (it imports nothing from the trainer).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .jsonl import read_jsonl, write_jsonl

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
COMPLETE = ".complete"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Test hook: "checkpoint-N:STAGE" kills the process with SIGKILL at that point of that save
# (STAGE: model, optimizer, rng, state), to show that an interrupted save loses nothing.
ABORT_ENV = "RLHF_PPO_TEST_KILL_DURING_SAVE"

__all__ = ["CheckpointError", "atomic_folder", "list_checkpoints", "resolve_resume", "prune",
           "write_training_state", "read_training_state", "rng_state", "set_rng_state",
           "load_metrics"]


def maybe_abort(folder_name: str, stage: str) -> None:
    """The test hook of :data:`ABORT_ENV`."""
    if os.environ.get(ABORT_ENV) == f"{folder_name}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def atomic_folder(folder: str | Path, is_main: bool = True,
                  barrier: Callable[[], None] | None = None, marker: str | None = None
                  ) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; when the block ends without an error, write
    ``marker`` (e.g. ``.complete``) into it and rename it to ``folder``, replacing an older one.

    Single process (``barrier`` None): the temporary folder has a unique name, so concurrent
    writers of the same folder never mix files; with a ``marker``, the first complete copy stays
    (a later writer discards its own). Several processes: pass ``is_main`` and ``barrier``
    (``accelerator.wait_for_everyone``); every process gets the same folder (``.tmp-NAME``) to
    write its own files into, the main process creates and renames it. A crash leaves only a
    ``.tmp-*`` folder behind.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if barrier is None:
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    else:
        tmp = folder.parent / f".tmp-{folder.name}"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
            tmp.mkdir(parents=True)
        barrier()
    try:
        yield tmp
    except BaseException:
        if barrier is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if barrier is not None:
        barrier()
    if is_main:
        if marker is not None:
            (tmp / marker).write_text("ok\n")
        def taken() -> bool:  # a concurrent writer's complete copy, which readers may be using
            return barrier is None and marker is not None and (folder / marker).exists()
        if taken():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            # an older save of the same name (e.g. an extended run); asked again, because a
            # concurrent writer may have renamed its complete copy in since: never delete that
            if folder.exists() and not taken():
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:  # another writer renamed its copy in between: keep that one
                shutil.rmtree(tmp, ignore_errors=True)
                if marker is None or not (folder / marker).exists():
                    raise
    if barrier is not None:
        barrier()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = _NAME.match(p.name)
        if m and (p / COMPLETE).is_file():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path:
    """The checkpoint folder named by ``resume_from`` (``latest`` or a path)."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from=latest: no complete checkpoint in {str(output_dir)!r}")
        return found[-1]
    path = Path(resume_from)
    if not (path / COMPLETE).is_file() or not (path / STATE_DIR).is_dir():
        raise CheckpointError(f"resume_from: {resume_from!r} is not a complete checkpoint folder "
                              f"(expected {STATE_DIR}/ and {COMPLETE} inside)")
    return path


def prune(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """The global random states of this process (Python, NumPy, torch, CUDA)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_training_state(folder: Path, *, rank: int, is_main: bool, rng: dict,
                         trainer: dict | None = None, optimizer: dict | None = None,
                         scheduler: dict | None = None, config_yaml: str | None = None,
                         history: list[dict] | None = None) -> None:
    """Write ``folder/training_state/``: this process's ``rng`` state; on the main process also
    the ``trainer`` state (JSON), the ``optimizer`` (None: not saved, e.g. sharded) and
    ``scheduler`` state dicts, the config and the metrics history."""
    sd = folder / STATE_DIR
    sd.mkdir(exist_ok=True)
    torch.save(rng, sd / f"rng_state_{rank}.pt")
    if not is_main:
        return
    if optimizer is not None:
        torch.save(optimizer, sd / "optimizer.pt")
    torch.save(scheduler, sd / "scheduler.pt")
    maybe_abort(folder.name.removeprefix(".tmp-"), "optimizer")
    (sd / "trainer_state.json").write_text(json.dumps(trainer, indent=1))
    if config_yaml is not None:
        (sd / "config.yaml").write_text(config_yaml)
    write_jsonl(sd / "metrics.jsonl", history or [])
    maybe_abort(folder.name.removeprefix(".tmp-"), "state")


def _load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_training_state(folder: Path, rank: int) -> dict[str, Any]:
    """What :func:`write_training_state` wrote, as ``{"trainer", "optimizer", "scheduler",
    "rng"}`` (``rng`` None when the checkpoint has no state for process ``rank``: it was saved
    by fewer processes)."""
    sd = folder / STATE_DIR
    rng_file = sd / f"rng_state_{rank}.pt"
    return {"trainer": json.loads((sd / "trainer_state.json").read_text()),
            "optimizer": _load(sd / "optimizer.pt"), "scheduler": _load(sd / "scheduler.pt"),
            "rng": _load(rng_file) if rng_file.is_file() else None}


def load_metrics(folder: Path) -> list[dict]:
    """The metrics history saved with a checkpoint."""
    return read_jsonl(folder / STATE_DIR / "metrics.jsonl")
