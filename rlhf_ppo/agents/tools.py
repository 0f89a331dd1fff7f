"""Tools as TRL's GRPOTrainer takes them (``tools=[...]``): plain Python functions, sync or
async, with type hints and a Google-style docstring; their JSON schemas come from
``transformers.utils.get_json_schema``, the same function ``apply_chat_template(tools=...)`` uses,
so a tool written for TRL is offered to the model exactly as TRL offers it.

A :class:`ToolSet` runs the model's calls by name. What goes wrong is handled by one setting,
``on_error`` (see :data:`ON_ERROR`):

- ``"observe"`` (default, TRL's behaviour): the problem goes back to the model as the tool's
  result, ``"Error: <what happened, naming the tool>"``, and the rollout goes on: a tool that
  raised, did not return within ``timeout`` seconds, an unknown tool name, missing / unexpected /
  wrongly typed arguments, a call whose JSON could not be parsed;
- ``"raise"``: the same problem stops the run with :class:`~rlhf_ppo.errors.AgentError`, naming
  the tool and the row.

A tool's value becomes the observation as ``str(value)`` (a string as it is), as in TRL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import AgentError, RewardError, raised
from .calls import CallTimeout, call_with_timeout

ON_ERROR = ("observe", "raise")
"""``on_error`` values: ``observe`` sends the error text to the model; ``raise`` stops the run."""

OnError = Literal["observe", "raise"]

# JSON-schema type -> the Python types a parsed JSON value of that type has (bool is not a number)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}


@dataclass(frozen=True)
class ToolCall:
    """One tool call parsed from the model's output.

    ``error`` is set (and ``name``/``arguments`` may be empty) when the call's text could not be
    parsed; it says what was expected. ``text`` is the call as the model wrote it.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    text: str = ""


@dataclass(frozen=True)
class ToolResult:
    """A call's observation: ``content`` goes back to the model; ``error``: it reports a problem."""

    name: str
    content: str
    error: bool = False


def load_tool(spec: str, key: str = "tools[]") -> Callable:
    """Import ``package.module:function`` or ``path/to/file.py:function`` (as reward functions
    are imported); ``key`` is the config key named in errors."""
    from ..rewards import load_function

    try:
        return load_function(spec, key)
    except RewardError as e:
        raise AgentError(str(e)) from e


def tool_schema(tool: Callable) -> dict[str, Any]:
    """``{"type": "function", "function": {"name", "description", "parameters", ...}}`` for
    ``tool``, from its type hints and docstring (``transformers.utils.get_json_schema``)."""
    from transformers.utils import get_json_schema

    name = getattr(tool, "__name__", repr(tool))
    try:
        return get_json_schema(tool)
    except Exception as e:  # DocstringParsingException, TypeHintParsingException, ...
        raise AgentError(
            f"tool {name!r}: cannot build its JSON schema: {e}. Expected a function with a type hint "
            "on every argument and a Google-style docstring with a description and an `Args:` "
            "line per argument (https://huggingface.co/docs/transformers/en/chat_extras#passing-tools)"
        ) from e


def describe_parameters(schema: dict[str, Any]) -> str:
    """``"a (integer, required), b (number)"``: the arguments a schema expects, for messages."""
    params = schema["function"].get("parameters", {})
    required = set(params.get("required", []))
    parts = []
    for name, prop in params.get("properties", {}).items():
        kind = prop.get("type", "any")
        kind = "|".join(kind) if isinstance(kind, list) else kind
        parts.append(f"{name} ({kind}{', required' if name in required else ''})")
    return ", ".join(parts) or "no arguments"


def argument_problems(schema: dict[str, Any], arguments: Any) -> list[str]:
    """What is wrong with ``arguments`` for the tool of ``schema`` (empty: nothing): not an
    object, missing required names, unexpected names, values of the wrong JSON type."""
    if not isinstance(arguments, dict):
        return [f"arguments must be a JSON object, got {type(arguments).__name__}"]
    params = schema["function"].get("parameters", {})
    properties = params.get("properties", {})
    problems = []
    missing = [n for n in params.get("required", []) if n not in arguments]
    if missing:
        problems.append("missing " + ", ".join(repr(n) for n in missing))
    unexpected = [n for n in arguments if n not in properties]
    if unexpected:
        problems.append("unexpected " + ", ".join(repr(n) for n in unexpected))
    for name, value in arguments.items():
        kind = properties.get(name, {}).get("type")
        if isinstance(kind, str) and kind in _JSON_TYPES and not _has_json_type(value, kind):
            problems.append(f"{name!r} should be {kind}, got {type(value).__name__} {value!r}")
    return problems


def _has_json_type(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(value, _JSON_TYPES[kind])


class ToolSet:
    """Tools by name, their schemas (for ``apply_chat_template(tools=...)``), and a runner for the
    model's calls. ``timeout``: seconds per call (None: no limit); ``on_error``: see the module
    docstring."""

    def __init__(self, tools: Sequence[Callable], timeout: float | None = 30.0,
                 on_error: OnError = "observe"):
        if on_error not in ON_ERROR:
            raise AgentError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
        self.timeout, self.on_error = timeout, on_error
        self.functions: dict[str, Callable] = {}
        self.schemas: list[dict[str, Any]] = []
        for tool in tools:
            schema = tool_schema(tool)
            name = schema["function"]["name"]
            if name in self.functions:
                raise AgentError(f"tool {name!r} is given twice; expected one function per tool name")
            self.functions[name] = tool
            self.schemas.append(schema)
        self._schema_by_name = {s["function"]["name"]: s for s in self.schemas}

    @property
    def names(self) -> list[str]:
        return list(self.functions)

    async def call(self, call: ToolCall, row: int | None = None) -> ToolResult:
        """Run one call; a problem is an observation or an :class:`AgentError` (``on_error``).
        ``row``: the batch row, named in errors."""
        problem = self._check(call)
        if problem is None:
            fn = self.functions[call.name]
            try:
                value = await call_with_timeout(fn, kwargs=call.arguments, timeout=self.timeout)
                return ToolResult(call.name, value if isinstance(value, str) else str(value))
            except CallTimeout as e:
                problem = f"tool {call.name!r} {e} (timeout)"
            except Exception as e:  # the tool's own bug or refusal: reported, never swallowed
                problem = f"tool {call.name!r} raised {type(e).__name__}: {e}"
                if self.on_error == "raise":  # the run stops: its file and line, the error chained
                    self._problem(call.name, raised(f"tool {call.name!r}", e, fn), row)
        return self._problem(call.name, problem, row)

    def _check(self, call: ToolCall) -> str | None:
        """Why ``call`` cannot run (a parse error, unknown tool, bad arguments), or None."""
        if call.error is not None:
            return call.error
        if call.name not in self.functions:
            return f"unknown tool {call.name!r}; available tools: {', '.join(self.names) or 'none'}"
        schema = self._schema_by_name[call.name]
        problems = argument_problems(schema, call.arguments)
        if problems:
            return (f"tool {call.name!r} got bad arguments: {'; '.join(problems)}. Expected: "
                    f"{describe_parameters(schema)}")
        return None

    def _problem(self, name: str, problem: str, row: int | None) -> ToolResult:
        if self.on_error == "raise":
            where = "" if row is None else f" (row {row})"
            raise AgentError(f"{problem}{where}. on_tool_error='raise' stops the run; 'observe' "
                             "returns this error to the model as the tool's result")
        return ToolResult(name, f"Error: {problem}", error=True)

