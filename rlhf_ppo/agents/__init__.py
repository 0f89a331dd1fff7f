"""Tools and environments for multi-turn rollouts, in TRL's conventions (``tools=[...]``,
``environment_factory``) and a gymnasium / OpenEnv-style multi-turn protocol; see docs/agents.md.

The multi-turn sampler (:mod:`rlhf_ppo.agent_rollout`) runs them when the config has an
``agent`` section.
"""

from .environments import (
    AgentRunner,
    Episode,
    MultiTurnEnvironment,
    StepResult,
    environment_tools,
    environment_toolset,
)
from .parsing import (
    FORMATS,
    TEXT_PROTOCOL,
    ParsedTurn,
    TextProtocol,
    assistant_message,
    chat_tool_suffix,
    check_tool_template,
    detect_format,
    parse_tool_calls,
    tool_messages,
)
from .tools import ToolCall, ToolResult, ToolSet, load_tool, tool_schema

__all__ = [
    "FORMATS", "TEXT_PROTOCOL", "AgentRunner", "Episode", "MultiTurnEnvironment", "ParsedTurn",
    "StepResult", "TextProtocol", "ToolCall", "ToolResult", "ToolSet", "assistant_message",
    "chat_tool_suffix", "check_tool_template", "detect_format", "environment_tools",
    "environment_toolset", "load_tool", "parse_tool_calls", "tool_messages", "tool_schema",
]
