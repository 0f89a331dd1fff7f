"""Local paths in a run's saved config made absolute, so that the saved config means the same
files from any working directory: ``rlhf-ppo evaluate RUN`` and ``resume_from`` then work from
anywhere, and a resume from the original directory with the original relative paths still
matches (:func:`absolute_paths` is applied to both sides before they are compared).

Only values that name an existing local file or folder relative to the working directory change;
hub ids, ``builtin:`` / ``pypi:`` names, URLs, absolute and ``~`` paths stay as written. The
lowest layer: imports nothing from ``rlhf_ppo``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

PATH_KEYS = frozenset({
    "output_dir", "resume_from",  # the run folder and the checkpoint it continues
    "name_or_path", "tokenizer", "ref_name_or_path", "critic_name_or_path",  # model.*
    "adapter_path",  # peft.adapter_path
    "path", "heldout_path", "policy_tokenizer",  # data.*
    "model",  # reward.sources[i].model (a string there; the `model` section is a dict)
})
"""config keys (at any depth) whose string value is a file or folder, a hub id or a built-in name"""

SPEC_KEYS = frozenset({"function", "tools", "environment"})
"""config keys whose value (or list of values) is ``module:name`` or ``path/file.py:name``:
reward.sources[i].function, agent.tools, agent.environment"""

SKIPPED_KEYS = frozenset({"kwargs"})
"""sections passed on to user code as they are (a reward function's keyword arguments)"""


def absolute_path(value: str) -> str:
    """``value`` as an absolute path when it is a relative path to an existing file or folder;
    otherwise ``value`` unchanged (a hub id, ``builtin:tiny``, an absolute or ``~`` path)."""
    if value.startswith("~") or os.path.isabs(value) or not Path(value).exists():
        return value
    return os.path.abspath(value)


def absolute_spec(value: str) -> str:
    """``path/file.py:name`` with the file's path made absolute (:func:`absolute_path`) when the
    file exists; ``package.module:name`` and URLs unchanged."""
    file, sep, name = value.rpartition(":")
    if not sep or not file.endswith(".py"):
        return value
    return f"{absolute_path(file)}:{name}"


def absolute_paths(data: Any) -> Any:
    """A copy of the nested config dict ``data`` with every path-valued key (:data:`PATH_KEYS`,
    :data:`SPEC_KEYS`, at any depth, in lists of sections too) made absolute where it names an
    existing local path relative to the working directory."""
    if isinstance(data, list):
        return [absolute_paths(v) for v in data]
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        if key in SKIPPED_KEYS:
            out[key] = value
        elif key in PATH_KEYS and isinstance(value, str):
            out[key] = absolute_path(value)
        elif key in SPEC_KEYS and isinstance(value, str):
            out[key] = absolute_spec(value)
        elif key in SPEC_KEYS and isinstance(value, list):
            out[key] = [absolute_spec(v) if isinstance(v, str) else v for v in value]
        else:
            out[key] = absolute_paths(value)
    return out


def run_config_yaml(cfg: Any) -> str:
    """A run's config dataclass as the YAML a run folder and its checkpoints keep: local paths
    absolute (:func:`absolute_paths`), keys in the dataclass's order."""
    import yaml

    return yaml.safe_dump(absolute_paths(dataclasses.asdict(cfg)), sort_keys=False)
