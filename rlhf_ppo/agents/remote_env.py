"""Reset/step environments behind HTTP: ``agent.environment: http://HOST:PORT`` (docs/agents.md).

:class:`RemoteEnvironment` is a :class:`~.environments.MultiTurnEnvironment` (async ``reset`` and
``step``) whose episode runs on a server (``rlhf-ppo serve-env``, or any server that speaks the
protocol), one session per rollout, in the spirit of OpenEnv's environment servers and OpenRLHF's
agent ``reset/step`` API. The protocol, JSON over POST::

    POST {url}/reset  {"row": {COLUMN: value}}               -> {"session_id": str, "observation": str | null}
    POST {url}/step   {"session_id": str, "text": str}        -> {"observation": str, "reward": number | null,
                                                                  "done": bool}
    POST {url}/close  {"session_id": str}                     -> any 2xx reply

- ``row``: the dataset row as an in-process environment's ``reset(row)`` gets it (its columns,
  ``prompt`` included: text, or chat messages). The columns must be JSON values (str, number,
  bool, null, lists, objects with string keys): a column that is not (a tensor, a NaN) is an
  AgentError naming it before anything is sent.
- ``step``: the model's turn (its text, special tokens removed); the reply is what an in-process
  ``step`` returns. The server ends the session itself when it replies ``done: true``.
- ``close``: sent when the episode ends without ``done``: after ``max_turns`` steps (the rollout
  cuts the episode there), and when the rollout is done with an episode a token limit cut
  (:meth:`~.environments.AgentRunner.close_episodes`). A failed close is only logged; the server
  also drops sessions that stay idle (``rlhf-ppo serve-env session_ttl``).

Failures: each call (``reset`` or ``step``, retries included) gets ``timeout`` seconds in all.
A connection error, a timeout, HTTP 429 or 5xx is retried after ``backoff * 2**k`` seconds, at
most ``retries`` times, for ``reset``; ``step`` is retried only when the server cannot have run it
(no connection, HTTP 429/503), since running a turn twice would change the episode. What is left,
another status or a reply without the keys and types above, is an :class:`~rlhf_ppo.errors.AgentError`
naming the URL, the row (its prompt) and what was expected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import numbers
import time
from typing import Any

from ..config import AgentConfig
from ..errors import AgentError
from ..remote import Unreachable, post_retrying
from .tools import load_tool

logger = logging.getLogger(__name__)

RESET_REPLY = 'HTTP 200 with a JSON object {"session_id": str, "observation": str or null}'
STEP_REPLY = 'HTTP 200 with a JSON object {"observation": str, "reward": number or null, "done": bool}'
TIMEOUT_SHARE = 0.95
"""Share of ``agent.tool_timeout`` a remote call may use, so that its own error (naming the URL)
comes before the runner's timeout (naming only the class)."""


def is_url(spec: str) -> bool:
    """``agent.environment`` names a server rather than a class."""
    return spec.startswith(("http://", "https://"))


def load_environment(cfg: AgentConfig) -> type:
    """The environment class of ``cfg.environment``: a class spec is imported (``module:Class``,
    ``file.py:Class``); a URL gives a :class:`RemoteEnvironment` class for that server (called
    with no arguments, one instance per rollout), its timeout from ``agent.tool_timeout`` and its
    turn limit from ``agent.max_turns``."""
    spec = cfg.environment
    if not is_url(spec):
        return load_tool(spec, "agent.environment")
    url, timeout, max_turns = spec, TIMEOUT_SHARE * cfg.tool_timeout, cfg.max_turns

    class Remote(RemoteEnvironment):
        def __init__(self):
            super().__init__(url, timeout=timeout, max_turns=max_turns)

    Remote.__name__ = Remote.__qualname__ = RemoteEnvironment.__name__  # the name in runner errors
    return Remote


def _prompt_excerpt(row: dict[str, Any]) -> str:
    """A short text naming a row in errors (the runner's row number is not known here)."""
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")
    text = str(prompt)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def encode_row(row: dict[str, Any], where: str) -> bytes:
    """The reset request's body; a column that is not a JSON value is an AgentError naming it."""
    for name, value in row.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise AgentError(f"{where}: column {name!r} is {type(value).__name__} {str(value)[:80]!r}, "
                             f"which JSON cannot carry ({e}); expected the row's columns to be JSON "
                             "values (str, number, bool, null, lists, objects with string keys)") from None
    return json.dumps({"row": row}, allow_nan=False).encode()


def error_detail(reply) -> str:
    """The text of an error reply: FastAPI's ``{"detail": ...}`` (what serve-env sends), else the
    start of the body."""
    try:
        detail = json.loads(reply.content)["detail"]
    except (ValueError, TypeError, KeyError):
        return repr(reply.text[:300])
    return detail if isinstance(detail, str) else json.dumps(detail)[:300]


def check_reset_reply(data: Any, where: str) -> tuple[str, str | None]:
    """``(session_id, observation)`` of a reset reply, or an AgentError saying what is wrong."""
    if not isinstance(data, dict):
        raise AgentError(f"{where}: the reply is {type(data).__name__} {data!r:.200}; expected {RESET_REPLY}")
    session, observation = data.get("session_id"), data.get("observation")
    if not isinstance(session, str) or session == "":
        raise AgentError(f"{where}: the reply's session_id is {session!r} (keys {sorted(data)}); "
                         f"expected {RESET_REPLY}")
    if observation is not None and not isinstance(observation, str):
        raise AgentError(f"{where}: the reply's observation is {type(observation).__name__} "
                         f"{observation!r:.200}; expected {RESET_REPLY}")
    return session, observation


def check_step_reply(data: Any, where: str) -> tuple[str, float | None, bool]:
    """``(observation, reward, done)`` of a step reply, or an AgentError saying what is wrong."""
    if not isinstance(data, dict):
        raise AgentError(f"{where}: the reply is {type(data).__name__} {data!r:.200}; expected {STEP_REPLY}")
    missing = [k for k in ("observation", "reward", "done") if k not in data]
    if missing:
        raise AgentError(f"{where}: the reply has no {', '.join(missing)} (keys {sorted(data)}); "
                         f"expected {STEP_REPLY}")
    observation, reward, done = data["observation"], data["reward"], data["done"]
    for key, value, ok in (("observation", observation, isinstance(observation, str)),
                           ("reward", reward, reward is None or (isinstance(reward, numbers.Real)
                                                                 and not isinstance(reward, bool))),
                           ("done", done, isinstance(done, bool))):
        if not ok:
            raise AgentError(f"{where}: the reply's {key} is {type(value).__name__} {value!r:.200}; "
                             f"expected {STEP_REPLY}")
    return observation, None if reward is None else float(reward), done


class RemoteEnvironment:
    """One episode on an environment server at ``url`` (the protocol: module docstring).

    ``timeout``: seconds a ``reset`` or ``step`` may take, retries included; ``retries``: attempts
    after the first (see the module docstring for which failures are retried); ``backoff``:
    seconds before the first retry, doubled for each next one; ``max_turns``: the rollout's turn
    limit (``agent.max_turns``), after which a session that has not ended is closed. Its methods
    run on the agent runner's event loop, which lives as long as the run: each instance keeps one
    ``httpx.AsyncClient`` from ``reset`` to the episode's end.

    Other settings than ``agent.tool_timeout``: a subclass in a file, named in
    ``agent.environment: my_env.py:MyServer``::

        class MyServer(RemoteEnvironment):
            def __init__(self):
                super().__init__("http://gpu-box:8000", timeout=120, retries=5)
    """

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
                 max_turns: int | None = None):
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff, self.max_turns = timeout, retries, backoff, max_turns
        self.session_id: str | None = None
        self.turns = 0
        self._row_name = "?"
        self._client, self._client_loop = None, None
        self._httpx = import_httpx_for_agent(url)
        # httpx logs every request at INFO: a line per turn of every row would flood the log
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))

    def _where(self, method: str) -> str:
        session = f"session {self.session_id}, " if self.session_id else ""
        return f"environment server {self.url}/{method} ({session}row with prompt {self._row_name})"

    async def _post(self, method: str, content: bytes, idempotent: bool, expected: str) -> Any:
        """The decoded JSON reply of ``POST {url}/{method}``, or an AgentError."""
        where = self._where(method)
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:  # a client serves one event loop
            self._client, self._client_loop = self._httpx.AsyncClient(timeout=self.timeout), loop
        try:
            reply = await post_retrying(self._client, self._httpx, f"{self.url}/{method}", content,
                                        self.timeout, self.retries, self.backoff,
                                        deadline=time.monotonic() + self.timeout, idempotent=idempotent)
        except Unreachable as e:
            raise AgentError(f"{where}: {e} after {e.attempts} attempt(s) (is the environment server "
                             f"running? rlhf-ppo serve-env); expected {expected}") from None
        if not 200 <= reply.status_code < 300:
            raise AgentError(f"{where}: HTTP {reply.status_code} ({error_detail(reply)}); "
                             f"expected {expected}")
        try:
            return json.loads(reply.content)
        except ValueError:
            raise AgentError(f"{where}: the reply is not JSON ({reply.content[:200]!r}); "
                             f"expected {expected}") from None

    async def reset(self, row: dict[str, Any]) -> str | None:
        """Open a session for ``row``; its first observation (text appended to the prompt) or None."""
        if self.session_id is not None:
            await self.close()
        self._row_name, self.turns = _prompt_excerpt(row), 0
        content = encode_row(row, self._where("reset"))
        data = await self._post("reset", content, idempotent=True, expected=RESET_REPLY)
        self.session_id, observation = check_reset_reply(data, self._where("reset"))
        return observation

    async def step(self, text: str) -> tuple[str, float | None, bool]:
        """The model's turn ``text`` -> ``(observation, reward, done)``."""
        if self.session_id is None:
            raise AgentError(f"{self._where('step')}: step called before reset (or after the episode "
                             "ended); expected reset(row) first")
        content = json.dumps({"session_id": self.session_id, "text": text}).encode()
        data = await self._post("step", content, idempotent=False, expected=STEP_REPLY)
        observation, reward, done = check_step_reply(data, self._where("step"))
        self.turns += 1
        if done:  # the server has ended the session itself
            self.session_id = None
            await self._close_client()
        elif self.max_turns is not None and self.turns >= self.max_turns:
            await self.close()  # the rollout cuts the episode here: no more steps will come
        return observation, reward, done

    async def close(self) -> None:
        """End the session on the server (``POST {url}/close``); a failure is logged, not raised."""
        if self.session_id is not None:
            content = json.dumps({"session_id": self.session_id}).encode()
            try:
                await self._post("close", content, idempotent=True, expected="HTTP 2xx")
            except AgentError as e:
                logger.warning("%s", e)
            self.session_id = None
        await self._close_client()

    async def _close_client(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def import_httpx_for_agent(url: str):
    """The httpx module, or an AgentError naming the extra that installs it."""
    try:
        import httpx
    except ImportError as e:
        raise AgentError(f"agent.environment ({url}): an environment behind HTTP needs the httpx "
                         "package: pip install 'rlhf_ppo[remote]'") from e
    return httpx
