"""Dataclasses from plain dicts, the machinery behind every command's config: typed
construction with errors that name the dotted key, renamed keys, dotted overrides, YAML, and
the field docstrings that feed ``--help`` and docs/config.md. Knows nothing of rlhf_ppo's own
sections (those are in :mod:`rlhf_ppo.config`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, UnreadKeyWarning


def check(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise ``ConfigError("key: expected ..., got ...")`` unless ``ok`` (every command's checks)."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def unread(section: Any, name: str, prefix: str, read: bool, because: str) -> None:
    """Warn (:class:`UnreadKeyWarning`) when field ``name`` of ``section`` differs from its default
    although nothing reads it (``read`` false ``because`` ...)."""
    default = next(f for f in dataclasses.fields(section) if f.name == name).default
    value = getattr(section, name)
    if not read and value != default:
        warnings.warn(f"{prefix}.{name}: set to {value!r} but unread because {because}",
                      UnreadKeyWarning, stacklevel=3)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return tp.__name__


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            # an old name of the section (its class's OLD_NAMES) that is close points to its new one
            old = getattr(cls, "OLD_NAMES", {})
            close = difflib.get_close_matches(str(k), sorted(names | set(old)), n=1, cutoff=0.75)
            hint = (f"did you mean {prefix + '.' if prefix else ''}{old.get(close[0], close[0])}? "
                    if close else "")
            raise ConfigError(
                f"{key}: unknown key; {hint}expected one of {', '.join(sorted(names))}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)  # Config.__post_init__ validates once every section is built


def apply_renamed(data: dict[str, Any], renamed: dict[str, str],
                  moved: dict[str, str] | None = None) -> dict[str, Any]:
    """Move values given under a renamed key (``old.dotted.key -> new.dotted.key``) to the new
    key, with a FutureWarning; a ConfigError when both are given. ``data`` changes in place;
    ``moved`` (if given) receives ``new -> old`` for every key moved."""
    for old, new in renamed.items():
        *old_path, old_leaf = old.split(".")
        node = data
        for part in old_path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        value = node.pop(old_leaf)
        *new_path, new_leaf = new.split(".")
        target = data
        for part in new_path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{part}: expected a mapping, got {target!r}")
        if new_leaf in target:
            raise ConfigError(f"{old}: renamed to {new}, and both are set; keep only {new}")
        target[new_leaf] = value
        if moved is not None:
            moved[new] = old
        warnings.warn(f"config key {old} is deprecated and will be removed: use {new}",
                      FutureWarning, stacklevel=3)
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b.c=value"`` as ``("a.b.c", value)``, the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(part == "" for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """Set ``data["a"]["b"]["c"] = value`` for ``key`` ``"a.b.c"``, creating missing sections, in
    place; a ConfigError (naming ``where``, default the key) when a part is not a section."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where or key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _pop_dotted(data: dict[str, Any], key: str) -> None:
    """Remove ``data["a"]["b"]["c"]`` for ``key`` ``"a.b.c"`` if it is there, in place."""
    *path, leaf = key.split(".")
    node: Any = data
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def set_overrides(data: dict[str, Any], items: list[tuple[str, Any]],
                  renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """Set each dotted ``(key, value)`` of ``items`` in the nested dict ``data``, in place. With
    ``renamed`` (old dotted key -> new), a key replaces the value under its other name too, so an
    old name wins over a file in the new layout and back (both names among ``items`` stay an
    error, :func:`apply_renamed`)."""
    aliases = {**(renamed or {}), **{new: old for old, new in (renamed or {}).items()}}
    given = set()
    for key, value in items:
        if key in aliases and aliases[key] not in given:
            _pop_dotted(data, aliases[key])
        set_dotted(data, key, value, where=f"override {key}={value!r}")
        given.add(key)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place
    (:func:`set_overrides`)."""
    return set_overrides(data, [parse_override(item) for item in overrides], renamed)


def config_to_yaml(cfg: Any) -> str:
    """A config dataclass as YAML text."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML."""
    Path(path).write_text(config_to_yaml(cfg))


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a config dataclass, by field name (a subclass's
    docstring of a field replaces its base class's)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # one line, even if wrapped
    return docs


def section_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """The docstring of every section (a dataclass-typed field), by dotted key, depth first."""
    docs, hints, out = field_docs(cls), typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[prefix + f.name] = docs.get(f.name, "")
            out.update(section_docs(hints[f.name], f"{prefix}{f.name}."))
    return out


def iter_fields(cls: type, prefix: str = "", overrides: dict[str, str] | None = None):
    """Yield (dotted key, type name, default, doc) for every leaf field, depth first. A class's
    ``NESTED_DOCS`` (dotted keys relative to it) replaces the docs of fields of its sections that
    mean something else in that command."""
    docs = {**field_docs(cls), **getattr(cls, "NESTED_DOCS", {}), **(overrides or {})}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = {k[len(f.name) + 1:]: v for k, v in docs.items() if k.startswith(f.name + ".")}
            yield from iter_fields(tp, key + ".", sub)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = [dataclasses.asdict(x) for x in default]
        yield key, _type_name(tp), default, docs.get(f.name, "")
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from iter_fields(typing.get_args(tp)[0], key + "[].")
