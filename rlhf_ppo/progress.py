"""What a run shows while it runs: a progress bar on a terminal and plain log lines elsewhere, the
logging setup the command line and the Python API share, and counted nouns for those lines.

A ``\\r`` progress bar redirected to a file turns the log into one long line; so when stderr is
not a terminal, :func:`progress_bar` gives a :class:`LineProgress` with tqdm's ``update`` /
``set_postfix`` / ``close`` that logs the same figures as INFO lines instead.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""the format of every log line, from the command line and from the Python API"""

LINES_PER_RUN = 20
"""without a terminal, a bar of many steps logs about this many lines (and its last step)"""

logger = logging.getLogger(__name__)


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and the noun in the number it takes: ``plural(1, "sample")`` is ``"1 sample"``,
    ``plural(2, "sample")`` ``"2 samples"``; ``nouns`` for an irregular plural."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"


# ----------------------------------------------------------------------------- logging setup

def setup_cli_logging() -> None:
    """The command line's logging: INFO and above from every library, in :data:`LOG_FORMAT`,
    on stderr (a no-op when the root logger has handlers already)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


class _FallbackHandler(logging.Handler):
    """stderr through ``tqdm.write`` (so a line does not glue onto a bar), only while the root
    logger has no handler: logging an application sets up later is not doubled."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)  # sys.stderr now, not at setup
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def ensure_logging() -> None:
    """The Python API logs like the command line: when neither the root logger nor
    ``rlhf_ppo``'s has a handler (a script that set up no logging, where Python would show
    warnings only), ``rlhf_ppo``'s INFO lines go to stderr in :data:`LOG_FORMAT`. A logging setup
    of the application's own is left as it is."""
    package = logging.getLogger("rlhf_ppo")
    if logging.getLogger().handlers or package.handlers:
        return
    handler = _FallbackHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


# ----------------------------------------------------------------------------- progress

class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as INFO log lines, for output that is
    not a terminal: ``set_postfix`` after every ``every``-th step (and the last) logs
    ``desc n/total [elapsed<remaining, rate] key=value, ...`` with the postfix's figures."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0,
                 every: int | None = None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.n = self.start_n = self.logged_n = initial
        self.every = every or max(1, math.ceil((total - initial) / LINES_PER_RUN))
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        """Log a line when this step is due (``refresh``: tqdm's, ignored)."""
        if self.n % self.every == 0 or self.n >= self.total:
            self._log({**(ordered_dict or {}), **kwargs})

    def close(self) -> None:
        """Log the last count when it has not been logged (a loop that ended early)."""
        if self.n != self.logged_n:
            self._log({})

    def line(self, figures: Mapping[str, Any]) -> str:
        """``desc n/total [elapsed<remaining, rate] key=value, ...``, timed as tqdm times."""
        from tqdm import tqdm

        elapsed = time.perf_counter() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        remaining = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else "?"
        speed = "?" if rate <= 0 else f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it"
        shown = ", ".join(f"{k}={v}" for k, v in figures.items())
        return (f"{self.desc} {self.n}/{self.total} [{tqdm.format_interval(elapsed)}<{remaining}, "
                f"{speed}]" + (f" {shown}" if shown else ""))

    def _log(self, figures: Mapping[str, Any]) -> None:
        self.logged_n = self.n
        if self.enabled:
            logger.info("%s", self.line(figures))


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0,
                 every: int | None = None, stream: TextIO | None = None):
    """A tqdm bar on ``stream`` (default stderr) when it is a terminal, else a
    :class:`LineProgress` (``every``: a line every this many steps; None: about
    :data:`LINES_PER_RUN` lines). ``enabled`` False (a process other than the main one): silent.
    Both have ``update(n)``, ``set_postfix(dict)`` and ``close()``."""
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                    dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, enabled, initial, every)
