"""Multi-turn sampling: the policy writes a turn, the tools or the environment answer, the answer
is appended to the row's context, and the policy writes its next turn, until every row is done.
The single-turn loop (:func:`rollout.generate`) stays as it is; this module drives its native
KV-cached sampler (:func:`rollout.sample_native`) one turn at a time.

A row pauses at the end of a tool call (the text protocol's stop string ``agent.call_close``; in
the chat protocol at the end of its turn, when the turn holds calls) or at the end of its turn
(EOS, a stop string of ``generation``, or ``agent.max_tokens_per_turn``). The paused rows' tool
calls or ``step`` calls run together (:class:`~rlhf_ppo.agents.AgentRunner`: concurrently, with a
timeout each). A row is done when its turn holds no call (tools), its environment says ``done``,
after ``agent.max_turns`` model turns, or when its response region reaches
``agent.max_total_tokens``.

Each row's KV cache is carried from one turn to the next (:mod:`rlhf_ppo.turn_cache`): a turn
prefills only the tokens appended since the row's previous turn (its last sampled token and the
observation), then samples with the cache. ``generate_multiturn(carry_cache=False)`` (and
``generation.repetition_penalty``) prefills the row's whole context every turn instead; both give
the same tokens and log-probs.

Protocols: ``text`` appends tool results as ``agent.result_template`` text and observations as
they are; the chat protocol (a chat template that can express tools) renders the prompts with the
tool schemas (``data.load_prompts(tools=...)``), appends tool results as ``role: tool`` messages
and a reset/step environment's observations as ``role: user`` messages, each with the template's
glue up to the next assistant header, and adds a TRL environment's reset text to the prompt's
last message.

Shape legend: ``B`` rows, ``P`` prompt length (left-padded), ``R`` response region length.
The returned :class:`~rlhf_ppo.rollout.Rollout`'s response region holds, per row: the model's
turns (``response_mask`` 1, log-probs recorded by the sampling pass as in single-turn sampling)
and the observations between them (``attention_mask`` 1, ``response_mask`` 0), then padding.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import turn_cache
from .agents import AgentRunner, Episode, TextProtocol, ToolSet, environment_toolset, load_tool
from .agents.parsing import (
    appended_suffix,
    assistant_message,
    chat_tool_suffix,
    detect_format,
    parse_tool_calls,
    tool_messages,
    tool_template_problem,
)
from .agents.remote_env import load_environment
from .config import AgentConfig, GenerationConfig
from .data import Prompt, left_pad, render_prompt
from .errors import AgentError
from .lm import transformer
from .rollout import Rollout, find_stops, generate, native_supported, sample_native, stop_token_ids
from .turn_cache import RowCache

logger = logging.getLogger(__name__)

RECORDED = ("logprobs", "entropy", "values")
"""Per-token values the sampling pass records on the model's tokens (0 on observations)."""


@dataclass
class Agent:
    """What a multi-turn rollout runs besides the policy, built once per run (:func:`build_agent`).

    ``environment``: the environment class (one instance per rollout) or None; ``multiturn``: it
    follows the reset(row)/step(text) protocol (it has a ``step`` method), else TRL's
    environment_factory convention (its public methods are tools); ``protocol``: ``"text"``,
    ``"chat"`` (a reset/step environment with a chat template) or the chat template's tool-call
    format (:data:`~rlhf_ppo.agents.FORMATS`)."""

    cfg: AgentConfig
    tools: list[Callable]
    environment: Callable[[], Any] | None
    multiturn: bool
    protocol: str
    text: TextProtocol
    runner: AgentRunner
    schemas: list[dict] | None = None
    """the tools' JSON schemas that the chat protocol renders into the prompt
    (``apply_chat_template(tools=...)``); None: the text protocol or no tools"""

    @property
    def chat(self) -> bool:
        """The conversation is rendered by the chat template (tool results as ``role: tool``
        messages, environment observations as ``role: user`` messages)."""
        return self.protocol != "text"

    def close(self) -> None:
        self.runner.close()


def build_agent(cfg: AgentConfig, tokenizer) -> Agent:
    """Load ``cfg``'s tools and environment class and choose the tool-call protocol.

    ``protocol: auto`` takes the chat template's tool format when the template can express tools
    (:func:`~rlhf_ppo.agents.parsing.tool_template_problem`), else the text protocol; a reset/step
    environment needs no tools in the template, only a chat template (:func:`_choose_protocol`). In the chat
    protocol the agent's ``schemas`` go into the prompts (``data.load_prompts(tools=...)``): those
    of ``agent.tools`` and of a TRL environment's public methods (read from one instance, as TRL)."""
    tools = [load_tool(spec, "agent.tools[]") for spec in cfg.tools]
    env = load_environment(cfg) if cfg.environment else None  # a class, or a URL: a server
    multiturn = env is not None and callable(getattr(env, "step", None))
    if multiturn and tools:
        raise AgentError(f"agent.tools: {cfg.environment} is a reset/step environment, which answers "
                         "every turn itself; expected no agent.tools with it (use a TRL-style "
                         "environment class, whose public methods are tools, to combine both)")
    protocol = _choose_protocol(cfg, tokenizer, multiturn)
    schemas = None
    if protocol != "text" and not multiturn:  # one instance shows a TRL environment's tools
        found = environment_toolset(env(), tools) if env is not None else ToolSet(tools)
        schemas = found.schemas or None
    return Agent(cfg, tools, env, multiturn, protocol,
                 TextProtocol(cfg.call_open, cfg.call_close, cfg.result_template),
                 AgentRunner(cfg.tool_timeout, cfg.max_turns if multiturn else None), schemas)


def _choose_protocol(cfg: AgentConfig, tokenizer, multiturn: bool) -> str:
    """``"text"``, ``"chat"`` (a reset/step environment's observations as ``role: user``
    messages: any chat template can express them) or the chat template's tool-call format.
    ``auto``: chat when the template can express what the agent needs, else text."""
    if cfg.protocol == "text":
        return "text"
    if multiturn:
        if getattr(tokenizer, "chat_template", None) is not None:
            return "chat"
        if cfg.protocol == "chat":
            raise AgentError("agent.protocol: chat needs a tokenizer with a chat template (to append the "
                             "environment's observations as user messages), but it has none; expected "
                             "agent.protocol: text or auto")
        return "text"
    if cfg.protocol == "auto" and tool_template_problem(tokenizer):
        return "text"
    return detect_format(tokenizer)  # protocol: chat without tool support raises here


@dataclass
class _Row:
    """One rollout in progress: its context and the response region built so far (lists)."""

    index: int
    """the row's position in the batch (named in errors)"""
    prompt: Prompt
    prompt_ids: list[int]
    budget: int
    """tokens the response region may still take"""
    ids: list[int] = field(default_factory=list)
    action: list[int] = field(default_factory=list)
    recorded: dict[str, list[float]] = field(default_factory=dict)
    turn_rewards: list[float] = field(default_factory=list)
    turns: int = 0
    done: bool = False
    stopped: bool = False
    toolset: ToolSet | None = None
    env: Any = None
    tool_calls: int = 0
    """the tool calls run for the row (a call that could not be parsed or run included)"""
    tool_errors: int = 0
    """the calls whose result was an error observation (raised, timed out, unknown, bad arguments)"""
    tool_timeouts: int = 0
    """the calls among ``tool_errors`` that hung past ``agent.tool_timeout``"""
    success: bool = False
    """the environment ended the episode with a positive reward (see :func:`episode_stats`)"""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """chat protocol: the conversation after the prompt as chat messages (the model's turns as
    ``assistant`` messages with their ``tool_calls``, tool results as ``tool`` messages, an
    environment's observations as ``user`` messages), as TRL passes a tool-calling rollout's
    completion to reward functions"""
    cache: RowCache | None = None
    """the KV cache of the first ``cache.length`` tokens of ``prompt_ids + ids``, carried to the
    next turn (:mod:`rlhf_ppo.turn_cache`); None: none yet, or the fresh-prefill path"""

    def add(self, ids: Sequence[int], trained: bool, recorded: dict[str, list[float]] | None = None):
        """Append a model turn (``trained``, with its recorded values) or an observation."""
        ids = list(ids)[: self.budget]
        self.ids += ids
        self.action += [int(trained)] * len(ids)
        self.turn_rewards += [0.0] * len(ids)
        for key, values in self.recorded.items():
            values += (recorded[key][: len(ids)] if trained and recorded else [0.0] * len(ids))
        self.budget -= len(ids)


def _row_dict(prompt: Prompt) -> dict[str, Any]:
    """The dataset row as environments see it: its columns, ``prompt`` included (as TRL)."""
    return {**prompt.extra, "prompt": prompt.messages if prompt.messages is not None else prompt.text}


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _start_rows(agent: Agent, prompts: list[Prompt], tokenizer, total: int,
                keys: tuple[str, ...]) -> list[_Row]:
    """A row per prompt with its environment reset; text a reset returns is appended to the prompt."""
    rows = [_Row(i, p, list(p.input_ids), total, recorded={k: [] for k in keys})
            for i, p in enumerate(prompts)]
    if agent.environment is None:
        toolset = ToolSet(agent.tools, agent.cfg.tool_timeout, agent.cfg.on_tool_error)
        for row in rows:
            row.toolset = toolset
        return rows
    envs = [agent.environment() for _ in rows]
    if agent.multiturn:
        episodes = [Episode(env, _row_dict(p), i) for i, (env, p) in enumerate(zip(envs, prompts))]
        first = agent.runner.reset_episodes(episodes)
        for row, ep in zip(rows, episodes):
            row.env = ep
    else:
        first = agent.runner.reset_tool_environments(envs, [_row_dict(p) for p in prompts])
        for row, env in zip(rows, envs):
            row.env, row.toolset = env, environment_toolset(
                env, agent.tools, timeout=agent.cfg.tool_timeout, on_error=agent.cfg.on_tool_error)
    for row, text in zip(rows, first):
        if text:
            _extend_prompt(agent, row, text, tokenizer)
    return rows


def _extend_prompt(agent: Agent, row: _Row, text: str, tokenizer) -> None:
    """Add the text an environment's ``reset`` returned to the row's prompt. As TRL: appended to
    the content of the prompt's last message and rendered again by the chat template (with the
    tool schemas) in the chat protocol; appended to the prompt text otherwise."""
    prompt = row.prompt
    if agent.chat and prompt.messages is not None:
        messages = [dict(m) for m in prompt.messages]
        messages[-1]["content"] = str(messages[-1].get("content") or "") + text
        rendered, _ = render_prompt(messages, tokenizer, row.index, "agent.environment reset",
                                    tools=agent.schemas)
        # as data.load_prompts: a rendered template holds the special tokens it needs
        row.prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        row.prompt = dataclasses.replace(prompt, text=rendered, messages=messages,
                                         input_ids=list(row.prompt_ids))
        return
    row.prompt_ids += _encode(tokenizer, text)
    row.prompt = dataclasses.replace(prompt, text=prompt.text + text, input_ids=list(row.prompt_ids))


def chat_user_suffix(tokenizer, text: str, tools: list[dict] | None = None) -> str:
    """The text the chat template puts after a finished assistant turn (its end-of-turn token
    included) for a ``role: user`` message ``text`` and the next assistant header: how a
    reset/step environment's observation is appended in the chat protocol. Found as
    :func:`~rlhf_ppo.agents.parsing.chat_tool_suffix` finds a tool message's (the difference of
    two renderings, the shorter cut after its last end-of-turn token)."""
    kwargs = {"tools": tools} if tools else {}
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "dummy"}]
    return appended_suffix(
        tokenizer, dummy, [{"role": "user", "content": text}],
        "agent.protocol: the chat template is not prefix-preserving (appending a user message "
        "changes how the earlier messages render), so an environment's observation cannot be "
        "appended to a turn; expected a template that renders earlier messages the same, or "
        "agent.protocol: text", **kwargs)


def _observation_ids(agent: Agent, tokenizer, observation: str) -> list[int]:
    """Tokens of a reset/step environment's observation: a ``role: user`` message with the
    template's glue (chat protocol) or the text itself."""
    if agent.chat:
        return _encode(tokenizer, chat_user_suffix(tokenizer, observation, agent.schemas))
    return _encode(tokenizer, observation)


def _sample_turn(model, rows: list[_Row], cfg: GenerationConfig, stop_ids: list[int], tokenizer,
                 device, record: bool, value_fn, carry: bool) -> tuple[dict[str, torch.Tensor],
                                                                    torch.Tensor, torch.Tensor]:
    """One turn of each row in ``rows``, KV-cached sampling (:func:`rollout.sample_native`) in
    chunks of ``generation.batch_size``: ``carry``: each row's cache from its previous turn and a
    prefill of the tokens appended since (:func:`_sample_carried`); else a fresh prefill of its
    whole context. Returns ``(outputs, lengths (b,), stopped (b,))``: ``outputs["response_ids"]``
    ``(b, r)`` and the recorded ``(b, r)`` values; each turn's length up to and including its
    first stop."""
    chunk = cfg.batch_size or len(rows)
    if carry:
        parts = [_sample_carried(model, rows[s:s + chunk], cfg, stop_ids, tokenizer, device, record,
                                 value_fn) for s in range(0, len(rows), chunk)]
    else:
        ids, mask = left_pad([r.prompt_ids + r.ids for r in rows], tokenizer.pad_token_id)
        parts = [sample_native(model, ids[s:s + chunk].to(device), mask[s:s + chunk].to(device), cfg,
                               stop_ids, tokenizer, record, value_fn) for s in range(0, len(rows), chunk)]
    width = max(p["response_ids"].shape[1] for p in parts)
    F = torch.nn.functional
    out = {k: torch.cat([F.pad(p[k].cpu(), (0, width - p[k].shape[1]),
                               value=tokenizer.pad_token_id if k == "response_ids" else 0.0)
                         for p in parts]) for k in parts[0]}
    lengths, stopped = find_stops(out["response_ids"], stop_ids, cfg.stop_strings, tokenizer)
    return out, lengths, stopped


def _sample_carried(model, rows: list[_Row], cfg: GenerationConfig, stop_ids: list[int], tokenizer,
                    device, record: bool, value_fn) -> dict[str, torch.Tensor]:
    """One turn of a chunk of rows that continues each row's carried cache: only the tokens of
    its context not in the cache are fed (all of them on the first turn); each row keeps the
    batched cache's entries of its real tokens (cut to the tokens it keeps in :func:`_turn`)."""
    cache, past_mask = turn_cache.assemble([r.cache for r in rows], transformer(model).config)
    new = [(r.prompt_ids + r.ids)[r.cache.length if r.cache is not None else 0:] for r in rows]
    ids, mask = left_pad(new, tokenizer.pad_token_id)
    out = sample_native(model, ids.to(device), mask.to(device), cfg, stop_ids, tokenizer, record,
                        value_fn, cache=cache, past_mask=past_mask, keep_cache=True)
    caches = turn_cache.split(out.pop("cache_parts"), len(rows))
    for row, kept in zip(rows, caches or [None] * len(rows)):
        row.cache = kept
    return out


def _turn_config(gen: GenerationConfig, agent: Agent, rows: list[_Row]) -> GenerationConfig:
    """``generation`` for one turn: at most the tokens the rows may still take, and the text
    protocol's call end as a stop string (with tools: a reset/step environment takes no calls)."""
    per_turn = agent.cfg.max_tokens_per_turn or max(r.budget for r in rows)
    n = max(1, min(per_turn, max(r.budget for r in rows)))
    calls = agent.protocol == "text" and not agent.multiturn
    stops = list(gen.stop_strings) + ([agent.text.call_close] if calls else [])
    return dataclasses.replace(gen, max_new_tokens=n, min_new_tokens=min(gen.min_new_tokens, n),
                               stop_strings=stops)


def _calls_of(agent: Agent, text: str, ended_by_call: bool):
    """The tool calls of a model turn (empty: the turn ends the row's tool use)."""
    if agent.protocol == "text":
        return agent.text.parse(text).tool_calls if ended_by_call else []
    return parse_tool_calls(text, agent.protocol).tool_calls


def _timed_out(result) -> bool:
    """The call hung: ``ToolSet.call`` reports it as an error observation ending in "(timeout)"."""
    return result.error and result.content.endswith("(timeout)")


def _answer(agent: Agent, rows: list[_Row], texts: list[str], calls: list[list], tokenizer) -> None:
    """Run the paused rows' tool calls or environment steps together and append their answers."""
    if agent.multiturn:
        results = agent.runner.step_episodes([r.env for r in rows], texts)
        for row, res in zip(rows, results):
            if res.reward is not None:  # on the last model token of the turn that earned it
                row.turn_rewards[-1] += res.reward
            row.stopped = res.done and not res.truncated
            row.success = row.stopped and res.reward is not None and res.reward > 0
            row.done = res.done
            if not res.done:
                row.add(_observation_ids(agent, tokenizer, res.observation), trained=False)
                if agent.chat:
                    row.messages.append({"role": "user", "content": res.observation})
        return
    busy = [i for i, c in enumerate(calls) if c]
    for i, row in enumerate(rows):
        if not calls[i]:
            row.done = True
    if not busy:
        return
    results = agent.runner.run_tool_calls([rows[i].toolset for i in busy], [calls[i] for i in busy],
                                          [rows[i].index for i in busy])
    for i, res in zip(busy, results):
        rows[i].tool_calls += len(res)
        rows[i].tool_errors += sum(r.error for r in res)
        rows[i].tool_timeouts += sum(_timed_out(r) for r in res)
        text = (agent.text.render_results(res) if agent.protocol == "text"
                else chat_tool_suffix(tokenizer, res, **({"tools": agent.schemas} if agent.schemas else {})))
        rows[i].add(_encode(tokenizer, text), trained=False)
        if agent.chat:
            rows[i].messages += tool_messages(res)


@torch.no_grad()
def generate_multiturn(model, prompts: list[Prompt], tokenizer, cfg: GenerationConfig, agent: Agent,
                       device: torch.device | str = "cpu", record: bool = False,
                       value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       carry_cache: bool = True) -> Rollout:
    """Sample one multi-turn rollout per prompt (see the module docstring) and build its
    ``Rollout``: ``turn_rewards`` ``(B, R)`` holds the environment's step rewards (and a TRL-style
    environment's ``get_reward()`` on the last model token) when there is an environment, else
    None; ``response_texts`` are the decoded response regions (model turns and observations);
    ``stopped``: the episode ended by itself (a turn without a call, the environment's ``done``),
    not by ``max_turns`` or a token limit. ``carry_cache``: each row's KV cache goes from one turn
    to the next (:mod:`rlhf_ppo.turn_cache`); False, or with ``generation.repetition_penalty``
    (which needs every token of the history at each turn): a fresh prefill of the whole history
    per turn. Both give the same tokens and log-probs (to float rounding)."""
    if not native_supported(model):
        raise AgentError(f"agent: multi-turn sampling needs the native sampler, but "
                         f"{type(model).__name__}'s backbone takes no KV cache argument")
    stop_ids = stop_token_ids(cfg, tokenizer)
    total = agent.cfg.max_total_tokens or cfg.max_new_tokens
    keys = (("logprobs", "entropy") + (("values",) if value_fn is not None else ())) if record else ()
    rows = _start_rows(agent, prompts, tokenizer, total, keys)
    carry = carry_cache and cfg.repetition_penalty == 1.0
    was_training = model.training
    model.eval()
    try:
        while active := [r for r in rows if not r.done]:
            _turn(model, active, cfg, agent, stop_ids, tokenizer, device, record, value_fn, carry)
        if agent.environment is not None and not agent.multiturn:
            for row, reward in zip(rows, agent.runner.get_rewards([r.env for r in rows])):
                row.success = reward is not None and reward > 0
                if reward is not None:
                    row.turn_rewards[max(i for i, a in enumerate(row.action) if a)] += reward
    finally:
        model.train(was_training)
        if agent.multiturn:  # however each episode ended: free what it holds (a server session)
            agent.runner.close_episodes([r.env for r in rows])
    return _assemble(rows, tokenizer, keys, agent)


def _turn(model, active: list[_Row], cfg: GenerationConfig, agent: Agent, stop_ids: list[int],
          tokenizer, device, record: bool, value_fn, carry: bool = False) -> None:
    """One model turn of every active row, then the tools' or the environment's answers."""
    turn_cfg = _turn_config(cfg, agent, active)
    out, lengths, stopped = _sample_turn(model, active, turn_cfg, stop_ids, tokenizer, device, record,
                                         value_fn, carry)
    texts, calls, paused = [], [], []
    per_turn = agent.cfg.max_tokens_per_turn or turn_cfg.max_new_tokens
    for b, row in enumerate(active):
        n = min(int(lengths[b]), row.budget, per_turn)
        ids = out["response_ids"][b, :n].tolist()
        ended = bool(stopped[b]) and n == int(lengths[b])  # a stop within the row's own limits
        row.add(ids, trained=True, recorded={k: out[k][b, :n].tolist() for k in row.recorded})
        if row.cache is not None:  # the turn's last token was never fed: it opens the next prefill
            row.cache = row.cache.cut(len(row.prompt_ids) + len(row.ids) - 1)
        row.turns += 1
        by_call = ended and ids[-1] not in stop_ids and agent.protocol == "text" and \
            agent.text.call_close in tokenizer.decode(ids, skip_special_tokens=False)
        row.stopped = ended
        text = tokenizer.decode(ids, skip_special_tokens=agent.protocol == "text")
        limit = row.turns >= agent.cfg.max_turns or row.budget <= 0
        if agent.chat:
            row.messages.append(_assistant_turn(agent, tokenizer, ids))
        if agent.multiturn:
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
            paused.append(row)
            continue
        row_calls = _calls_of(agent, text, by_call)
        if limit or not row_calls:
            row.done, row.stopped = True, ended and not row_calls
            continue
        calls.append(row_calls)
        paused.append(row)
    if paused:
        _answer(agent, paused, texts, calls, tokenizer)
    for row in active:  # a limit ends the episode even when the environment would go on
        if not row.done and (row.turns >= agent.cfg.max_turns or row.budget <= 0):
            row.done, row.stopped = True, False
        if row.done:
            row.cache = None  # free its memory


def _assistant_turn(agent: Agent, tokenizer, ids: list[int]) -> dict[str, Any]:
    """A model turn as a chat message: its text without special tokens and, with tools, the calls
    parsed from it in the template's format (:func:`~rlhf_ppo.agents.parsing.assistant_message`)."""
    if agent.multiturn:
        return {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
    message = assistant_message(parse_tool_calls(tokenizer.decode(ids, skip_special_tokens=False),
                                                 agent.protocol))
    content = message["content"]
    for token in tokenizer.all_special_tokens:
        content = content.replace(token, "")
    message["content"] = content.strip()
    return message


def _assemble(rows: list[_Row], tokenizer, keys: tuple[str, ...], agent: Agent) -> Rollout:
    """The ``Rollout`` of the finished rows: prompts left-padded to P, response regions
    right-padded to R (pad token, both masks 0, recorded values 0); with an environment, each
    row's instance (``environments``), in the chat protocol the conversations as messages."""
    with_rewards = agent.environment is not None
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([r.prompt_ids for r in rows], pad)
    B, R = len(rows), max(len(r.ids) for r in rows)

    def grid(values: list[list], fill, dtype) -> torch.Tensor:
        return torch.tensor([v + [fill] * (R - len(v)) for v in values], dtype=dtype).view(B, R)
    response_ids = grid([r.ids for r in rows], pad, torch.long)
    attention = grid([[1] * len(r.ids) for r in rows], 0, torch.long)
    recorded = {k: grid([r.recorded[k] for r in rows], 0.0, torch.float32) for k in keys}
    if with_rewards:
        recorded["turn_rewards"] = grid([r.turn_rewards for r in rows], 0.0, torch.float32)
    return Rollout(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, attention], dim=1), prompt_length=prompt_ids.shape[1],
        response_mask=grid([r.action for r in rows], 0, torch.long),
        stopped=torch.tensor([r.stopped for r in rows], dtype=torch.bool),
        prompts=[r.prompt for r in rows],
        response_texts=tokenizer.batch_decode([r.ids for r in rows], skip_special_tokens=True),
        episode_stats=episode_stats(rows, with_success=with_rewards),
        environments=[r.env.env if agent.multiturn else r.env for r in rows] if with_rewards else None,
        completion_messages=[r.messages for r in rows] if agent.chat else None, **recorded)


def episode_stats(rows: list[_Row], with_success: bool) -> dict[str, torch.Tensor]:
    """Per row ``(B,)``: ``turns`` (model turns), ``tool_calls``, ``tool_errors``,
    ``tool_timeouts`` (those of the errors that hung), ``observation_tokens`` (tokens of the
    response region the model read but did not sample: tool results, observations, template glue)
    and, with an environment (``with_success``), ``success``: a reset/step environment ended the
    episode itself (``done``, not cut by a limit) with a positive reward on that last step, or a
    TRL-style environment's ``get_reward()`` is positive. ``rlhf-ppo evaluate`` reports their
    means, ``metrics.jsonl`` too (:func:`rlhf_ppo.metrics.agent_metrics`)."""
    stats = {key: torch.tensor([getattr(r, key) for r in rows], dtype=torch.long)
             for key in ("turns", "tool_calls", "tool_errors", "tool_timeouts")}
    stats["observation_tokens"] = torch.tensor([len(r.action) - sum(r.action) for r in rows],
                                               dtype=torch.long)
    if with_success:
        stats["success"] = torch.tensor([r.success for r in rows], dtype=torch.bool)
    return stats


def sample_rollout(model, prompts: list[Prompt], tokenizer, cfg: GenerationConfig,
                   device: torch.device | str, agent: Agent | None = None, record: bool = False,
                   value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Rollout:
    """One rollout of ``prompts``: multi-turn with ``agent`` (its tools or environment answer the
    turns, :func:`generate_multiturn`), else the single-turn :func:`rollout.generate`."""
    if agent is None:
        return generate(model, prompts, tokenizer, cfg, device, record=record, value_fn=value_fn)
    return generate_multiturn(model, prompts, tokenizer, cfg, agent, device, record=record,
                              value_fn=value_fn)

