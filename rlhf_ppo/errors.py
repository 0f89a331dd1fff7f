"""Every error a user sees, and the exit code the command line gives it (one place).

Lowest module of the package: it imports nothing from ``rlhf_ppo``, so any module may raise
these. Each message names the config key or file and what was expected.
"""

from __future__ import annotations

import signal
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
