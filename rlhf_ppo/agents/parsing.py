"""Tool calls parsed from the model's output text, and tool results rendered back as the next
message.

Formats (:data:`FORMATS`), the ones TRL 1.12 parses (``trl/chat_template_utils.py``: its
``qwen3``, ``qwen3_5``, ``glm4moe``, ``llama3``, ``gptoss`` and ``lfm2_2_5`` response templates),
plus a text protocol for tokenizers whose chat template has no tools:

==========  ===================================================================  ===================
format      one call, as the model writes it                                     models
==========  ===================================================================  ===================
hermes      ``<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>``      Qwen2.5, Qwen3,
            (a JSON list of calls inside one block is accepted too)              Hermes
qwen3_xml   ``<tool_call><function=f><parameter=a>1</parameter></function>``     Qwen3.5/3.6,
            ``</tool_call>``                                                     Nemotron 3
glm4        ``<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value>``         GLM-4.5/4.6/4.7
            ``</tool_call>``
llama3      ``{"name": "f", "parameters": {"a": 1}}`` (the whole turn)            Llama 3.1/3.2
gpt_oss     ``to=functions.f<|channel|>commentary json<|message|>{"a": 1}``      gpt-oss
            ``<|call|>``
pythonic    ``<|tool_call_start|>[f(a=1), g()]<|tool_call_end|>``                LFM2.5
text        ``<call>f {"a": 1}</call>`` (stop string ``</call>``)                any tokenizer
==========  ===================================================================  ===================

Values inside the XML-like formats are parsed as JSON when they are JSON, else kept as strings
(TRL's ``allow_non_json``). A call that cannot be parsed (bad JSON, no closing tag) is not
dropped: it becomes a :class:`~rlhf_ppo.agents.tools.ToolCall` with ``error`` set, saying what
was expected, which the tool set returns to the model (or raises, by its ``on_error``). TRL
instead falls back to plain text and ends the rollout.

The text protocol (:class:`TextProtocol`): the model writes ``<call>NAME {JSON arguments}`` and
generation stops at the stop string ``</call>`` (the closing tag may be missing from the text
when the sampler strips stop strings: a last unclosed call is accepted). The results are
appended as text, ``" <result> CONTENT </result> "`` per call, and generation continues. Spaces
around the markers keep them separate words for whitespace word-level tokenizers (the built-in
tiny models). Every marker is a field, so a task can choose its own.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AgentError
from .tools import ToolCall, ToolResult


@dataclass(frozen=True)
class ParsedTurn:
    """One model turn: the text outside tool calls, and the calls in the order written."""

    content: str
    tool_calls: list[ToolCall]


# --- helpers shared by the formats ---------------------------------------------------------------

def _split_blocks(text: str, open_tag: str, close_tag: str) -> tuple[str, list[tuple[str, bool]]]:
    """``(text outside the blocks, [(block body, closed?)])``; a last block without its closing
    tag runs to the end of the text."""
    outside, blocks, pos = [], [], 0
    while (start := text.find(open_tag, pos)) != -1:
        outside.append(text[pos:start])
        body_start = start + len(open_tag)
        end = text.find(close_tag, body_start)
        if end == -1:
            blocks.append((text[body_start:], False))
            pos = len(text)
            break
        blocks.append((text[body_start:end], True))
        pos = end + len(close_tag)
    outside.append(text[pos:])
    return "".join(outside).strip(), blocks


def _json_or_text(value: str) -> Any:
    """A JSON value when ``value`` is JSON, else the string itself (TRL's ``allow_non_json``)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _bad(raw: str, why: str, example: str) -> ToolCall:
    shown = raw if len(raw) <= 120 else raw[:117] + "..."
    return ToolCall("", {}, error=f"could not parse the tool call {shown!r}: {why}; expected {example}",
                    text=raw)


def _call_from_json(obj: Any, raw: str, example: str, args_key: str = "arguments") -> ToolCall:
    """A :class:`ToolCall` from ``{"name": ..., "arguments": {...}}`` (arguments may be a JSON
    string, as some models write them; missing arguments are ``{}``, as in TRL)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return _bad(raw, 'no "name" string', example)
    arguments = obj.get(args_key, obj.get("arguments", obj.get("parameters")))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            return _bad(raw, f"arguments are not JSON ({e})", example)
    if not isinstance(arguments, dict):
        return _bad(raw, f"arguments are {type(arguments).__name__}, not a JSON object", example)
    return ToolCall(obj["name"], arguments, text=raw)


# --- the formats -----------------------------------------------------------------------------------

HERMES_EXAMPLE = '<tool_call>{"name": "tool_name", "arguments": {"arg": "value"}}</tool_call>'


def parse_hermes(text: str) -> ParsedTurn:
    """Hermes / Qwen2.5 / Qwen3: a JSON object (or a list of them) per block."""
    content, blocks = _split_blocks(text, "<tool_call>", "</tool_call>")
    calls = []
    for body, closed in blocks:
        raw = f"<tool_call>{body}</tool_call>" if closed else f"<tool_call>{body}"
        if not closed:
            calls.append(_bad(raw, "no closing </tool_call>", HERMES_EXAMPLE))
            continue
        try:
            obj = json.loads(body)
        except ValueError as e:
            calls.append(_bad(raw, f"invalid JSON ({e})", HERMES_EXAMPLE))
            continue
        objs = obj if isinstance(obj, list) else [obj]
        calls.extend(_call_from_json(o, raw, HERMES_EXAMPLE) for o in objs)
    return ParsedTurn(content, calls)


QWEN3_XML_EXAMPLE = ("<tool_call><function=tool_name><parameter=arg>value</parameter></function>"
                     "</tool_call>")
_QWEN3_FUNCTION = re.compile(r"^\s*<function=([^\n>]+)>(.*?)(?:</function>\s*)?$", re.S)
_QWEN3_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\s*(.*?)\s*</parameter>", re.S)


def _parse_blocks(text: str, example: str, shape: str,
                  read: Callable[[str], tuple[str, dict[str, Any]] | None]) -> ParsedTurn:
    """The calls of the ``<tool_call>`` blocks of ``text``: ``read(body)`` gives a closed block's
    ``(name, arguments)``, or None when the body lacks ``shape`` (named in the error with
    ``example``); an unclosed block is a malformed call too."""
    content, blocks = _split_blocks(text, "<tool_call>", "</tool_call>")
    calls = []
    for body, closed in blocks:
        raw = f"<tool_call>{body}</tool_call>" if closed else f"<tool_call>{body}"
        found = read(body) if closed else None
        if found is None:
            why = "no closing </tool_call>" if not closed else f"no {shape}"
            calls.append(_bad(raw, why, example))
            continue
        calls.append(ToolCall(*found, text=raw))
    return ParsedTurn(content, calls)


def parse_qwen3_xml(text: str) -> ParsedTurn:
    """Qwen3.5 / Qwen3.6 / Nemotron 3: ``<function=NAME>`` with one ``<parameter=KEY>`` per
    argument inside each ``<tool_call>`` block."""
    def read(body: str) -> tuple[str, dict[str, Any]] | None:
        match = _QWEN3_FUNCTION.match(body)
        if match is None:
            return None
        return match.group(1).strip(), {k.strip(): _json_or_text(v)
                                        for k, v in _QWEN3_PARAMETER.findall(match.group(2))}
    return _parse_blocks(text, QWEN3_XML_EXAMPLE, "<function=NAME> ... </function>", read)


GLM4_EXAMPLE = "<tool_call>tool_name<arg_key>arg</arg_key><arg_value>value</arg_value></tool_call>"
_GLM4_NAME = re.compile(r"^\s*([^\s<]+)")
_GLM4_ARGUMENT = re.compile(r"<arg_key>([^<]+)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def parse_glm4(text: str) -> ParsedTurn:
    """GLM-4.5/4.6/4.7: the name, then ``<arg_key>``/``<arg_value>`` pairs, in each block."""
    def read(body: str) -> tuple[str, dict[str, Any]] | None:
        name = _GLM4_NAME.match(body)
        if name is None:
            return None
        return name.group(1), {k.strip(): _json_or_text(v) for k, v in _GLM4_ARGUMENT.findall(body)}
    return _parse_blocks(text, GLM4_EXAMPLE, "tool name after <tool_call>", read)


LLAMA3_EXAMPLE = '{"name": "tool_name", "parameters": {"arg": "value"}} as the whole message'
_LLAMA3_CALL = re.compile(r'^\s*(?:<\|python_tag\|>)?\s*(\{\s*"name".*)$', re.S)


def parse_llama3(text: str) -> ParsedTurn:
    """Llama 3.1 / 3.2: a turn that is one bare JSON object ``{"name", "parameters"}`` is a
    call (one per turn); any other turn is content."""
    text = text.replace("<|eot_id|>", "").replace("<|eom_id|>", "")
    match = _LLAMA3_CALL.match(text)
    if match is None:
        return ParsedTurn(text.strip(), [])
    raw = match.group(1).strip()
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return ParsedTurn("", [_bad(raw, f"invalid JSON ({e})", LLAMA3_EXAMPLE)])
    return ParsedTurn("", [_call_from_json(obj, raw, LLAMA3_EXAMPLE, args_key="parameters")])


GPT_OSS_EXAMPLE = 'to=functions.tool_name<|channel|>commentary json<|message|>{"arg": "value"}<|call|>'
_GPT_OSS_CALL = re.compile(r"to=functions\.([^\s<]+)[^\n]*?<\|message\|>(.*?)(<\|call\|>|$)", re.S)
_GPT_OSS_FINAL = re.compile(r"<\|channel\|>final<\|message\|>(.*?)(?:<\|return\|>|<\|end\|>|$)", re.S)


def parse_gpt_oss(text: str) -> ParsedTurn:
    """gpt-oss (harmony): calls on the commentary channel; content is the final channel."""
    calls = []
    for name, body, close in _GPT_OSS_CALL.findall(text):
        raw = f"to=functions.{name}...<|message|>{body}{close}"
        try:
            arguments = json.loads(body) if body.strip() else {}
        except ValueError as e:
            calls.append(_bad(raw, f"invalid JSON ({e})", GPT_OSS_EXAMPLE))
            continue
        calls.append(_call_from_json({"name": name, "arguments": arguments}, raw, GPT_OSS_EXAMPLE))
    final = _GPT_OSS_FINAL.search(text)
    return ParsedTurn(final.group(1).strip() if final else "", calls)


PYTHONIC_EXAMPLE = "<|tool_call_start|>[tool_name(arg='value')]<|tool_call_end|>"


def parse_pythonic(text: str) -> ParsedTurn:
    """LFM2.5: a Python list of calls with keyword arguments (literals) per block."""
    content, blocks = _split_blocks(text, "<|tool_call_start|>", "<|tool_call_end|>")
    calls = []
    for body, closed in blocks:
        raw = f"<|tool_call_start|>{body}<|tool_call_end|>"
        try:
            if not closed:
                raise ValueError("no closing <|tool_call_end|>")
            calls.extend(_python_calls(body, raw))
        except (SyntaxError, ValueError) as e:
            calls.append(_bad(raw, str(e), PYTHONIC_EXAMPLE))
    return ParsedTurn(content, calls)


def _python_calls(body: str, raw: str) -> list[ToolCall]:
    """``[f(a=1), g()]`` -> calls; raises ValueError/SyntaxError for anything else."""
    tree = ast.parse(body.strip(), mode="eval").body
    nodes = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("expected name(keyword=literal, ...) calls")
        calls.append(ToolCall(node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords},
                              text=raw))
    return calls


@dataclass(frozen=True)
class TextProtocol:
    """The plain-text tool protocol (see the module docstring); every marker can be changed."""

    call_open: str = "<call>"
    call_close: str = "</call>"
    result_template: str = " <result> {content} </result> "

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Where the sampler pauses a row: the end of a call."""
        return (self.call_close,)

    @property
    def example(self) -> str:
        return f'{self.call_open}tool_name {{"arg": "value"}}{self.call_close}'

    def parse(self, text: str) -> ParsedTurn:
        """Calls ``OPEN NAME {JSON} CLOSE`` (or ``OPEN NAME CLOSE`` without arguments)."""
        content, blocks = _split_blocks(text, self.call_open, self.call_close)
        return ParsedTurn(content, [self._call(body) for body, _ in blocks])

    def _call(self, body: str) -> ToolCall:
        raw = f"{self.call_open}{body}{self.call_close}"
        match = re.match(r"^\s*([A-Za-z_][\w.\-]*)\s*(.*?)\s*$", body, re.S)
        if match is None:
            return _bad(raw, "no tool name", self.example)
        name, args_text = match.groups()
        if not args_text:
            return ToolCall(name, {}, text=raw)
        try:
            arguments = json.loads(args_text)
        except ValueError as e:
            return _bad(raw, f"arguments are not JSON ({e})", self.example)
        return _call_from_json({"name": name, "arguments": arguments}, raw, self.example)

    def render_results(self, results: Sequence[ToolResult]) -> str:
        """The text appended after the model's call: one result block per call, in order."""
        return "".join(self.result_template.format(content=r.content) for r in results)


TEXT_PROTOCOL = TextProtocol()


@dataclass(frozen=True)
class ToolCallFormat:
    """A registered format: its parser, one call as the model writes it (for messages), and the
    substring that identifies it in a chat template's rendering of a call (``marker``)."""

    name: str
    parse: Callable[[str], ParsedTurn]
    example: str
    marker: str


# Detection tries the markers in this order: the specific ones before hermes' bare <tool_call>.
FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in [
    ToolCallFormat("qwen3_xml", parse_qwen3_xml, QWEN3_XML_EXAMPLE, "<function="),
    ToolCallFormat("glm4", parse_glm4, GLM4_EXAMPLE, "<arg_key>"),
    ToolCallFormat("pythonic", parse_pythonic, PYTHONIC_EXAMPLE, "<|tool_call_start|>"),
    ToolCallFormat("gpt_oss", parse_gpt_oss, GPT_OSS_EXAMPLE, "to=functions."),
    ToolCallFormat("hermes", parse_hermes, HERMES_EXAMPLE, "<tool_call>"),
    ToolCallFormat("llama3", parse_llama3, LLAMA3_EXAMPLE, '"parameters"'),
    ToolCallFormat("text", TEXT_PROTOCOL.parse, TEXT_PROTOCOL.example, TEXT_PROTOCOL.call_open),
]}


def parse_tool_calls(text: str, format: str = "hermes") -> ParsedTurn:
    """The model's turn ``text`` split into content and tool calls, in ``format`` (:data:`FORMATS`)."""
    if format not in FORMATS:
        raise AgentError(f"tool-call format {format!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[format].parse(text)


# --- chat templates ----------------------------------------------------------------------------------

# Distinct sentinels tell which part of a tool exchange a template drops (TRL's supports_tool_calling).
_TOOL = "probe_tool_a8f3e2b1"
_DESCRIPTION = "probe_description_7c1d"
_ARG_KEY, _ARG_VALUE, _RESULT = "probe_key_b9d4f5c2", "probe_value_d6e7a9f3", "probe_result_c4f9a8e2"
_PROBE_SCHEMA = {"type": "function", "function": {
    "name": _TOOL, "description": _DESCRIPTION,
    "parameters": {"type": "object", "properties": {_ARG_KEY: {"type": "string", "description": "x"}},
                   "required": [_ARG_KEY]}}}
_PROBE_MESSAGES = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": _TOOL, "arguments": {_ARG_KEY: _ARG_VALUE}}}]},
    {"role": "tool", "name": _TOOL, "content": _RESULT},
]


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def tool_template_problem(tokenizer) -> str | None:
    """Why ``tokenizer``'s chat template cannot express tools, or None when it can: it must render
    the tool schemas given as ``apply_chat_template(tools=...)``, an assistant message's
    ``tool_calls`` (name and arguments) and a ``role: tool`` message."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "the tokenizer has no chat template"
    try:
        prompt = _render(tokenizer, _PROBE_MESSAGES[:1], tools=[_PROBE_SCHEMA], add_generation_prompt=True)
        exchange = _render(tokenizer, _PROBE_MESSAGES)
    except Exception as e:  # jinja2 TemplateError, TypeError from templates that reject dicts, ...
        return f"the chat template fails on a tool conversation ({type(e).__name__}: {e})"
    if _TOOL not in prompt or _DESCRIPTION not in prompt:
        return "apply_chat_template(tools=...) does not render the tool schemas"
    missing = [what for what, s in [("tool call names", _TOOL), ("tool call arguments", _ARG_VALUE),
                                    ("role 'tool' messages", _RESULT)] if s not in exchange]
    if missing:
        return f"the chat template drops {', '.join(missing)}"
    return None


def check_tool_template(tokenizer) -> None:
    """Raise :class:`AgentError` saying what to do when the chat template cannot express tools."""
    problem = tool_template_problem(tokenizer)
    if problem is not None:
        raise AgentError(
            f"tools need a chat template that can express them, but {problem}. Use the text protocol "
            f"(tool-call format 'text': the model writes {TEXT_PROTOCOL.example} and the results "
            "are appended as text), or a tokenizer whose chat template supports tools "
            "(e.g. Qwen2.5-Instruct, Qwen3; SmolLM2-Instruct's plain ChatML template has no tools)")


def detect_format(tokenizer) -> str:
    """The tool-call format (a :data:`FORMATS` name) that ``tokenizer``'s chat template writes,
    found by rendering one assistant tool call; raises :class:`AgentError` when it cannot tell."""
    check_tool_template(tokenizer)
    rendered = _render(tokenizer, _PROBE_MESSAGES[:2])
    for fmt in FORMATS.values():
        if fmt.name != "text" and fmt.marker in rendered:
            return fmt.name
    raise AgentError(f"cannot tell the tool-call format of this chat template (its tool call renders "
                     f"as {rendered[-200:]!r}); expected one of {', '.join(FORMATS)}: name it explicitly")


def assistant_message(turn: ParsedTurn) -> dict[str, Any]:
    """The model's turn as a chat message with ``tool_calls`` in transformers' shape (calls that
    could not be parsed are left out: the template cannot render them)."""
    calls = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in turn.tool_calls if c.error is None]
    message: dict[str, Any] = {"role": "assistant", "content": turn.content}
    if calls:
        message["tool_calls"] = calls
    return message


def tool_messages(results: Sequence[ToolResult]) -> list[dict[str, Any]]:
    """One ``{"role": "tool", "name", "content"}`` message per result, as TRL appends them."""
    return [{"role": "tool", "name": r.name, "content": r.content} for r in results]


def chat_tool_suffix(tokenizer, results: Sequence[ToolResult], **template_kwargs: Any) -> str:
    """The text the chat template puts after the model's turn ended (its end-of-turn token
    included): the tool messages, then the header of the next assistant turn.

    As TRL's ``_get_tool_suffix_ids``: render a dummy conversation ending with an assistant tool
    call with and without the tool messages (plus the generation prompt) and keep the difference.
    The dummy is cut after its last end-of-turn (eos) token, because templates such as Qwen's put
    ``"\\n"`` after ``<|im_end|>``, which belongs to the suffix. Needs a prefix-preserving template.
    """
    name = results[0].name if results else _TOOL  # gpt-oss derives the tool header from the name
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": name, "arguments": {}}}]}]
    return appended_suffix(
        tokenizer, dummy, tool_messages(results),
        "the chat template is not prefix-preserving: appending tool messages changes how the earlier "
        "messages render, so the tool results cannot be appended to a turn; use a training chat "
        "template (TRL's get_training_chat_template) or the text protocol", **template_kwargs)


def appended_suffix(tokenizer, dummy: list[dict], appended: list[dict], not_prefix_error: str,
                    **template_kwargs: Any) -> str:
    """The text the chat template renders for ``appended`` messages after the conversation
    ``dummy`` (ending with a finished assistant turn), plus the next assistant header: the
    difference of the two renderings, the shorter cut after its last end-of-turn (eos) token,
    because templates such as Qwen's put ``"\\n"`` after ``<|im_end|>``, which belongs to the
    suffix. AgentError(``not_prefix_error``) when the template renders ``dummy`` differently once
    messages follow it."""
    prefix = _render(tokenizer, dummy, **template_kwargs)
    full = _render(tokenizer, dummy + appended, add_generation_prompt=True, **template_kwargs)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos in prefix:
        prefix = prefix[: prefix.rindex(eos) + len(eos)]
    if not full.startswith(prefix):
        raise AgentError(not_prefix_error)
    return full[len(prefix):]
