"""Every error a user sees, and the exit code the command line gives it (one place).

Lowest module of the package: it imports nothing from ``rlhf_ppo``, so any module may raise
these. Each message names the config key or file and what was expected.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sysconfig
import traceback
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class UnreadKeyWarning(UserWarning):
    """A config key is set but nothing in this run reads it (e.g. a critic's learning rate with
    a critic-free estimator): kept in the config, so one file can serve several settings."""


class DataError(ValueError):
    """A dataset file or row does not have the expected layout or content."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded."""


class RewardError(RuntimeError):
    """A reward function or model failed, or returned something other than one score per row."""


class AgentError(RuntimeError):
    """A tool or environment failed, hung, or returned what its protocol does not allow; the
    message names the tool or environment class, the row and what was expected."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


class NonFiniteError(RuntimeError):
    """A NaN or infinite value appeared; the message names the iteration (or step) and stage."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT: a checkpoint was written; ``signum`` and ``checkpoint`` say which/where."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name} after iteration "
                         f"{iteration}; checkpoint written to {checkpoint}")


def exit_code(error: BaseException) -> int | None:
    """The command line's exit code for ``error``: 2 for a config error, 1 for the other errors
    above, ``128 + signal`` for an interruption; None for anything else (a bug: let it raise)."""
    if isinstance(error, ConfigError):
        return 2
    if isinstance(error, TrainingInterrupted):
        return 128 + error.signum
    if isinstance(error, (DataError, ModelLoadError, RewardError, AgentError, CheckpointError,
                          NonFiniteError)):
        return 1
    return None


# ----------------------------------------------------------------------------- user code

def source_file(fn: object) -> str | None:
    """The file that defines ``fn`` (a function, a ``functools.partial`` or ``wraps`` wrapper,
    or an object with ``__call__``); None when it has no Python code (a builtin)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = inspect.unwrap(fn) if callable(fn) else fn
    code = getattr(fn, "__code__", None)
    if code is None and callable(fn):  # an instance of a class with __call__
        code = getattr(type(fn).__call__, "__code__", None)
    return code.co_filename if code is not None else None


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (short), else as is."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith("..") else relative


def _machinery(filename: str) -> bool:
    """A frame that is not the user's: importlib's frozen frames, this package, Python's own
    library (asyncio, threading: where a call into user code is made), not site-packages."""
    path = os.path.abspath(filename)
    paths = sysconfig.get_paths()
    libraries = tuple(os.path.abspath(paths[k]) + os.sep for k in ("purelib", "platlib"))
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    stdlib = os.path.abspath(paths["stdlib"]) + os.sep
    return (filename.startswith("<") or path.startswith(package)
            or (path.startswith(stdlib) and not path.startswith(libraries)))


def user_location(error: BaseException, file: str | None = None) -> str | None:
    """Where ``error`` was raised, as ``path:line in function``: the innermost frame of its
    traceback in ``file`` (the user function's own file, so a library it called is passed
    over), else the innermost frame outside this package; None without such a frame."""
    frames = traceback.extract_tb(error.__traceback__)
    target = os.path.abspath(file) if file else None
    chosen = [f for f in frames if target and os.path.abspath(f.filename) == target] or \
             [f for f in frames if not _machinery(f.filename)]
    if not chosen:
        return None
    frame = chosen[-1]
    return f"{_shown_path(frame.filename)}:{frame.lineno} in {frame.name}"


def located(error: BaseException, file: str | None = None) -> str:
    """``" at path:line in function"`` (:func:`user_location`), or ``""`` when unknown."""
    location = user_location(error, file)
    return f" at {location}" if location else ""


def raised(where: str, error: BaseException, fn: object = None) -> str:
    """The message for user code that raised: ``"{where} raised ZeroDivisionError: division by
    zero at my_rewards.py:12 in ratio"``; ``fn``, the user's function, picks the frame (see
    :func:`user_location`). Raise the wrapping error ``from`` the user's: ``rlhf-ppo COMMAND
    --traceback`` then prints both tracebacks."""
    file = source_file(fn) if fn is not None else None
    message = f"{where} raised {type(error).__name__}: {error}"
    if user_location(error, file) is None and file is not None:  # failed at the call (a signature)
        line = getattr(getattr(inspect.unwrap(fn), "__code__", None), "co_firstlineno", None)
        return message + f" (defined at {_shown_path(file)}" + (f":{line})" if line else ")")
    return message + located(error, file)
