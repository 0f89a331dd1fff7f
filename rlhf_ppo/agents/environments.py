"""Environments, in two conventions, and a runner that calls many rows' environments at once.

1. **Tool environments**, TRL 1.12's ``environment_factory``: a class (or any zero-argument
   callable) that builds one instance per rollout. ``reset(**row)`` gets every column of the
   dataset row as keywords (``prompt`` included, as TRL passes them) and returns ``None`` or text
   appended to the prompt's last message; every public method other than ``reset`` and
   ``get_reward`` is a tool (schema from its type hints and docstring, as for plain tools); an
   optional ``get_reward()`` (sync or async) scores the finished rollout from the environment's
   state. A class written for TRL's GRPOTrainer works unchanged.
2. **Multi-turn environments** (:class:`MultiTurnEnvironment`), in the gymnasium / OpenEnv style,
   for environments that answer every model turn (a user simulator, a game):
   ``reset(row) -> observation`` and ``step(text) -> (observation, reward, done)``, sync or async.

:class:`AgentRunner` runs the pending calls of many rows concurrently on one event loop (async
environments awaited together, sync ones each in a thread), with a timeout per call, and checks
what comes back: a wrong type, an environment that hangs or never ends is an
:class:`~rlhf_ppo.errors.AgentError` naming the environment class, the row and what was expected.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import numbers
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ..errors import AgentError, raised
from .calls import CallTimeout, call_with_timeout
from .tools import ToolCall, ToolResult, ToolSet

logger = logging.getLogger(__name__)

RESERVED_METHODS = ("reset", "get_reward")
"""Methods of a tool environment that are not tools (TRL's reserved names)."""

ON_TURN_LIMIT = ("truncate", "raise")
"""``on_turn_limit`` values: ``truncate`` ends the episode (``truncated=True``); ``raise`` stops the run."""


StepTuple = tuple[str, float | None, bool]
"""What ``step`` returns: ``(observation, reward, done)``."""


@runtime_checkable
class MultiTurnEnvironment(Protocol):
    """An environment that answers every model turn; each method may be sync or ``async def``.

    - ``reset(row)``: start an episode for the dataset row (a dict of its columns); returns the
      first observation (text appended to the prompt) or None.
    - ``step(text)``: the model's turn (its text, special tokens removed); returns
      ``(observation, reward, done)``: the text appended before the model's next turn, the reward
      the turn earned (a number, or None for none) and whether the episode ended.
    - ``close()`` (optional): called once when the rollout is done with the episode, however it
      ended (``done``, a turn or token limit), to free what the episode holds (a server session,
      a subprocess); an error there is logged, not raised.
    """

    def reset(self, row: dict[str, Any]) -> str | None | Awaitable[str | None]: ...

    def step(self, text: str) -> StepTuple | Awaitable[StepTuple]: ...


@dataclass(frozen=True)
class StepResult:
    """A checked ``step`` value; ``truncated``: the turn limit ended the episode, not the environment."""

    observation: str
    reward: float | None
    done: bool
    truncated: bool = False


@dataclass
class Episode:
    """One rollout's environment and progress: ``turns`` steps taken so far; the runner updates it."""

    env: Any
    row: dict[str, Any]
    row_id: int
    turns: int = 0
    done: bool = False
    truncated: bool = False
    rewards: list[float | None] = field(default_factory=list)


def environment_tools(env: Any) -> list[Callable]:
    """The public methods of a tool environment that are tools (TRL's rule: bound methods not
    starting with ``_``, other than ``reset`` and ``get_reward``)."""
    return [member for name, member in inspect.getmembers(env, predicate=inspect.ismethod)
            if name not in RESERVED_METHODS and not name.startswith("_")]


def check_tool_environment(env: Any) -> None:
    """Raise when ``env`` (one instance from the factory) has no callable ``reset``."""
    if not callable(getattr(env, "reset", None)):
        raise AgentError(f"environment {type(env).__name__}: expected a callable `reset(**row)` "
                         "(TRL's environment_factory convention)")


def environment_toolset(env: Any, tools: Sequence[Callable] = (), **toolset_kwargs: Any) -> ToolSet:
    """The tools one rollout offers: the standalone ``tools`` plus ``env``'s methods (as TRL)."""
    return ToolSet([*tools, *environment_tools(env)], **toolset_kwargs)


def _where(env: Any, method: str, row_id: int) -> str:
    return f"environment {type(env).__name__}.{method} (row {row_id})"


def check_observation(value: Any, env: Any, method: str, row_id: int) -> str | None:
    """``value`` if it is text or None; else an :class:`AgentError` naming the class and row."""
    if value is None or isinstance(value, str):
        return value
    raise AgentError(f"{_where(env, method, row_id)} returned {type(value).__name__} {value!r}; "
                     "expected a string to append to the conversation, or None")


def check_reward(value: Any, env: Any, method: str, row_id: int) -> float | None:
    """``value`` as a float (None stays None); a non-number is an :class:`AgentError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AgentError(f"{_where(env, method, row_id)} returned reward {type(value).__name__} "
                         f"{value!r}; expected a number or None")
    return float(value)


def check_step(value: Any, env: Any, row_id: int) -> StepResult:
    """A ``step`` value checked against ``(observation: str, reward: float | None, done: bool)``."""
    expected = "expected a tuple (observation: str, reward: float | None, done: bool)"
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise AgentError(f"{_where(env, 'step', row_id)} returned {type(value).__name__} {value!r}; "
                         f"{expected}")
    observation, reward, done = value
    if not isinstance(observation, str):
        raise AgentError(f"{_where(env, 'step', row_id)} returned observation {type(observation).__name__} "
                         f"{observation!r}; {expected}")
    if isinstance(done, np.bool_):  # numpy's (gymnasium environments return it): a bool
        done = bool(done)
    if not isinstance(done, bool):
        raise AgentError(f"{_where(env, 'step', row_id)} returned done {type(done).__name__} {done!r}; "
                         f"{expected}")
    return StepResult(observation, check_reward(reward, env, "step", row_id), done)


class AgentRunner:
    """Calls the environments and tools of many rows at once, on an event loop it owns.

    ``timeout``: seconds per call into user code; ``max_turns``: steps after which a multi-turn
    episode that has not ended is cut (None: no limit), by ``on_turn_limit`` (:data:`ON_TURN_LIMIT`).
    The loop persists across calls, so an async environment may keep loop-bound state (an HTTP
    session) from one step to the next. Sync entry points: call them from the sampler's thread,
    not from inside a running event loop. Close the runner (or use it in a ``with``) when done.
    """

    def __init__(self, timeout: float | None = 30.0, max_turns: int | None = None,
                 on_turn_limit: Literal["truncate", "raise"] = "truncate"):
        if on_turn_limit not in ON_TURN_LIMIT:
            raise AgentError(f"on_turn_limit: expected one of {ON_TURN_LIMIT}, got {on_turn_limit!r}")
        self.timeout, self.max_turns, self.on_turn_limit = timeout, max_turns, on_turn_limit
        self._loop = asyncio.new_event_loop()

    def __enter__(self) -> AgentRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the event loop (threads of calls that hung are abandoned: they are daemons)."""
        if not self._loop.is_closed():
            self._loop.close()

    def _gather(self, coroutines: list[Awaitable]) -> list[Any]:
        """The values of ``coroutines`` run together; every one finishes (each is bounded by the
        timeout) before the first error, in row order, is raised, so none is left pending."""
        async def together():
            return await asyncio.gather(*coroutines, return_exceptions=True)
        values = self._loop.run_until_complete(together())
        for value in values:
            if isinstance(value, BaseException):
                raise value
        return values

    async def _call(self, env: Any, method: str, row_id: int, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(env, method, None)
        if not callable(fn):
            raise AgentError(f"{_where(env, method, row_id)}: the environment has no method {method!r}")
        try:
            return await call_with_timeout(fn, args, kwargs, timeout=self.timeout)
        except CallTimeout as e:
            raise AgentError(f"{_where(env, method, row_id)} {e}; expected it to return within the "
                             "timeout per call") from None
        except AgentError:  # already says where (an environment behind HTTP)
            raise
        except Exception as e:  # the environment's own code failed: say which, where and how
            hint = ("; expected reset(**row) to accept the row's columns as keywords (TRL's "
                    "convention: add **kwargs)") if method == "reset" and isinstance(e, TypeError) else ""
            raise AgentError(raised(_where(env, method, row_id), e, fn) + hint) from e

    # --- tool environments (TRL's environment_factory) ---

    def reset_tool_environments(self, envs: Sequence[Any], rows: Sequence[dict[str, Any]],
                                row_ids: Sequence[int] | None = None) -> list[str | None]:
        """``env.reset(**row)`` for every rollout at once: the text each appends to its prompt."""
        row_ids = list(range(len(envs))) if row_ids is None else row_ids
        for env in envs:
            check_tool_environment(env)

        async def one(env, row, row_id):
            return check_observation(await self._call(env, "reset", row_id, **row), env, "reset", row_id)
        return self._gather([one(e, r, i) for e, r, i in zip(envs, rows, row_ids, strict=True)])

    def run_tool_calls(self, toolsets: Sequence[ToolSet], calls: Sequence[Sequence[ToolCall]],
                       row_ids: Sequence[int] | None = None) -> list[list[ToolResult]]:
        """Each row's calls of this turn, in order within the row (they may change the same
        environment's state) and concurrently across rows."""
        row_ids = list(range(len(toolsets))) if row_ids is None else row_ids

        async def one(toolset, row_calls, row_id):
            return [await toolset.call(c, row=row_id) for c in row_calls]
        return self._gather([one(t, c, i) for t, c, i in zip(toolsets, calls, row_ids, strict=True)])

    def get_rewards(self, envs: Sequence[Any], row_ids: Sequence[int] | None = None) -> list[float | None]:
        """``env.get_reward()`` per finished rollout; None for an environment without one."""
        row_ids = list(range(len(envs))) if row_ids is None else row_ids

        async def one(env, row_id):
            if not callable(getattr(env, "get_reward", None)):
                return None
            return check_reward(await self._call(env, "get_reward", row_id), env, "get_reward", row_id)
        return self._gather([one(e, i) for e, i in zip(envs, row_ids, strict=True)])

    # --- multi-turn environments ---

    def reset_episodes(self, episodes: Sequence[Episode]) -> list[str | None]:
        """``env.reset(row)`` for every episode at once: the first observations."""
        async def one(ep):
            value = await self._call(ep.env, "reset", ep.row_id, ep.row)
            return check_observation(value, ep.env, "reset", ep.row_id)
        return self._gather([one(ep) for ep in episodes])

    def step_episodes(self, episodes: Sequence[Episode], texts: Sequence[str]) -> list[StepResult]:
        """``env.step(text)`` for every episode that has not ended, at once; updates each episode
        (turns, done, rewards) and applies the turn limit."""
        if any(ep.done for ep in episodes):
            ended = [ep.row_id for ep in episodes if ep.done]
            raise AgentError(f"rows {ended}: step called on an episode that has ended")

        async def one(ep, text):
            return check_step(await self._call(ep.env, "step", ep.row_id, text), ep.env, ep.row_id)
        results = self._gather([one(ep, t) for ep, t in zip(episodes, texts, strict=True)])
        return [self._advance(ep, r) for ep, r in zip(episodes, results, strict=True)]

    def close_episodes(self, episodes: Sequence[Episode]) -> None:
        """``env.close()`` of every episode whose environment has one, at once; an error or a
        timeout is logged as a warning, not raised (the rollout is complete by then)."""
        async def one(ep):
            if not callable(getattr(ep.env, "close", None)):
                return
            try:
                await self._call(ep.env, "close", ep.row_id)
            except Exception as e:  # AgentError (timeout), or what the environment raised
                logger.warning("%s.close (row %d) failed: %s: %s", type(ep.env).__name__, ep.row_id,
                               type(e).__name__, e)
        self._gather([one(ep) for ep in episodes])

    def _advance(self, episode: Episode, result: StepResult) -> StepResult:
        episode.turns += 1
        episode.rewards.append(result.reward)
        if not result.done and self.max_turns is not None and episode.turns >= self.max_turns:
            if self.on_turn_limit == "raise":
                raise AgentError(f"{_where(episode.env, 'step', episode.row_id)} did not end the episode "
                                 f"within max_turns={self.max_turns} turns; expected step() to return "
                                 "done=True (on_turn_limit='truncate' ends such episodes instead)")
            result = StepResult(result.observation, result.reward, True, truncated=True)
            episode.truncated = True
        episode.done = result.done
        return result
