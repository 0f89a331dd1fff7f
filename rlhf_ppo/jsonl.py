"""Strict JSON lines: the metrics, samples and summaries every command writes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / inf float replaced by None, recursively through dicts and lists,
    so metrics lines and summaries are strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def finite_number(x: Any) -> float | None:
    """``x`` as a float when it is a finite number (not a bool), else None: how a value read back
    from a metrics file is used (:func:`json_safe` wrote NaN and inf as null)."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def append_jsonl(path: str | Path, *records: dict) -> None:
    """Append one JSON line per record (non-finite floats written as null)."""
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(json_safe(record)) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write ``records`` as JSON lines, replacing the file."""
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(json_safe(record)) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
