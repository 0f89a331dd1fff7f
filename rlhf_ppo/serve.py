"""``rlhf-ppo serve-reward``: a reward model or a reward function behind HTTP, for ``url`` sources;
``rlhf-ppo serve-env``: a reset/step environment behind HTTP, for ``agent.environment: http://...``
(the protocol: :mod:`.agents.remote_env`; the server: :func:`build_env_app`).

It speaks the protocol of :mod:`.remote` (docs/rewards.md): ``POST /score`` with a batch, reply
``{"scores": [number | null]}``; ``GET /health`` says what it serves. A reward function is
called as a local ``function`` source calls it (:class:`.rewards.FunctionReward`: either style,
the same arguments); a reward model scores as a local ``model`` source does when its tokenizer
is not the policy's (:class:`.rewards.ModelReward`): through its chat template when it has one,
else the request's ``query`` (prompt and response decoded together). It reads text only, so a
reward model that shares the policy's tokenizer can score differently here than in-process, where
it reads the sampled token ids (the stop token included).

An OpenRLHF client's request, ``{"query": [prompt + response], "prompts", "labels"}``, is scored
too (each response is its query minus its prompt) and answered with ``{"rewards", "scores"}``,
the keys OpenRLHF reads.

Replies: 200 with the scores; 400 for a request that is not a batch; 422 when the function or
model fails on it (a RewardError: sending it again fails again) or an OpenRLHF query does not
start with its prompt; 500 for anything else. Non-finite scores go out as null (JSON has no
NaN): "not scored".
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .config import ModelConfig, RewardSource, check
from .data import Prompt
from .distributed import set_threads
from .errors import ConfigError, RewardError, raised
from .eval_models import pick_device
from .remote import REQUEST_FIELDS
from .rewards import FunctionReward, ModelReward
from .rollout import Rollout

logger = logging.getLogger(__name__)

Scorer = Callable[[Rollout, dict[str, Any]], list[float]]
"""scores of a request's rows, from the rows as a Rollout and the request's other fields"""


@dataclass
class ServeConfig:
    model: str | None = None
    """reward model to serve (`AutoModelForSequenceClassification`, num_labels 1): folder or hub id"""
    function: str | None = None
    """reward function to serve: `package.module:function` or `path/to/file.py:function`"""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """extra keyword arguments for the function (a request's fields of the same name win)"""
    host: str = "127.0.0.1"
    """address to listen on (`0.0.0.0`: every network interface)"""
    port: int = 8000
    """port to listen on"""
    route: str = "/score"
    """path of the scoring endpoint: sources use `url: http://HOST:PORT/score`"""
    batch_size: int = 32
    """sequences per reward-model forward pass"""
    device: str = "auto"
    """reward model's device: `auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the reward model is loaded in"""
    trust_remote_code: bool = False
    """allow model code from the hub to run; off unless you trust the source"""
    threads: int | None = None
    """CPU threads torch uses; null: `OMP_NUM_THREADS` when set, else half this machine's usable cores"""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """uvicorn's log level (`info` logs every request)"""

    def __post_init__(self) -> None:
        check((self.model is None) != (self.function is None), "model",
              "exactly one of `model` or `function`", {"model": self.model, "function": self.function})
        check(self.function is None or ":" in self.function, "function",
              "'package.module:function' or 'path/to/file.py:function'", self.function)
        check_listen(self)
        check(self.route.startswith("/"), "route", "a path starting with /", self.route)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(self.threads is None or self.threads >= 1, "threads", "an integer >= 1 or null",
              self.threads)


@dataclass
class ServeEnvConfig:
    environment: str | None = None
    """reset/step environment class to serve, one instance per session: `module:Class` or `file.py:Class`"""
    host: str = "127.0.0.1"
    """address to listen on (`0.0.0.0`: every network interface)"""
    port: int = 8000
    """port to listen on: clients use `agent.environment: http://HOST:PORT`"""
    session_ttl: float = 3600.0
    """seconds a session may stay idle before it is dropped (an episode cut by a token limit never closes)"""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """uvicorn's log level (`info` logs every request)"""

    def __post_init__(self) -> None:
        check(self.environment is not None and ":" in self.environment, "environment",
              "'package.module:Class' or 'path/to/file.py:Class'", self.environment)
        check_listen(self)
        check(self.session_ttl > 0, "session_ttl", "a number of seconds > 0", self.session_ttl)


# --------------------------------------------------------------------------- requests

def rows_of(body: Any) -> tuple[Rollout, dict[str, Any]]:
    """A request's rows as a Rollout of their responses (prompts, texts, completion ids, stopped;
    no prompt tokens: the server has not the policy's tokenizer) and its other fields (dataset
    columns and kwargs). Only ``prompts`` and ``responses`` are required. ValueError when the
    request is not a batch."""
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    if "responses" not in body and "query" in body:
        body = openrlhf_request(body)
    prompts, responses = body.get("prompts"), body.get("responses")
    if not (isinstance(prompts, list) and isinstance(responses, list) and len(prompts) == len(responses)
            and all(isinstance(x, str) for x in prompts + responses)):
        raise ValueError('expected "prompts" and "responses": two lists of strings of equal length')
    n = len(responses)
    defaults = {"query": [p + r for p, r in zip(prompts, responses)], "messages": [None] * n,
                "completion_ids": [[] for _ in range(n)], "stopped": [True] * n}
    fields = {k: body.get(k, v) for k, v in defaults.items()}
    for k, v in fields.items():
        if not isinstance(v, list) or len(v) != n:
            raise ValueError(f'expected "{k}" to be a list of {n} values, one per response')
    ids = fields["completion_ids"]
    R = max((len(x) for x in ids), default=0)
    response_ids = torch.zeros((n, R), dtype=torch.long)
    mask = torch.zeros((n, R), dtype=torch.long)
    for b, x in enumerate(ids):
        response_ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, :len(x)] = 1
    rollout = Rollout(input_ids=response_ids, attention_mask=mask, prompt_length=0,
                      response_mask=mask, stopped=torch.tensor(fields["stopped"], dtype=torch.bool),
                      prompts=[Prompt(p, [], messages=m) for p, m in zip(prompts, fields["messages"])],
                      response_texts=responses)
    others = {k: v for k, v in body.items() if k not in REQUEST_FIELDS}
    return rollout, {**others, "query": fields["query"]}


class OpenRLHFRequest(ValueError):
    """An OpenRLHF-style request (``query`` without ``responses``) that cannot be split: HTTP 422."""


def openrlhf_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenRLHF request, ``{"query": [prompt + response], "prompts": [...], "labels": [...]}``
    (its ``remote_rm_fn`` / agent executor), as ours: each response is its query minus its prompt.
    ``labels`` stays a column (a function's ``labels`` argument). OpenRLHFRequest when a query
    does not start with its prompt or ``prompts`` is missing."""
    queries, prompts = body["query"], body.get("prompts")
    expected = ('expected OpenRLHF\'s {"query": [prompt + response], "prompts": [prompt]} with each '
                'query starting with its prompt, or {"prompts": [...], "responses": [...]}')
    if not (isinstance(queries, list) and isinstance(prompts, list) and len(queries) == len(prompts)
            and all(isinstance(x, str) for x in queries + prompts)):
        raise OpenRLHFRequest(f'"query" without "responses" and {"no" if prompts is None else "unusable"} '
                              f'"prompts"; {expected}')
    for i, (q, p) in enumerate(zip(queries, prompts)):
        if not q.startswith(p):
            raise OpenRLHFRequest(f"query {i} ({q[:80]!r}) does not start with its prompt "
                                  f"({p[:80]!r}); {expected}")
    return {**body, "responses": [q[len(p):] for q, p in zip(queries, prompts)]}


# --------------------------------------------------------------------------- scorers

def function_scorer(cfg: ServeConfig) -> Scorer:
    """Scores by the reward function, called as a local ``function`` source calls it: the other
    fields of a request (dataset columns as lists, kwargs) are its keyword arguments."""
    base = FunctionReward(RewardSource(function=cfg.function, kwargs=cfg.kwargs), "serve-reward")

    def score(rollout: Rollout, fields: dict[str, Any]) -> list[float]:
        call = copy.copy(base)  # requests run in threads at once: each call its own kwargs
        call.kwargs = {**base.kwargs, **{k: v for k, v in fields.items() if k != "query"}}
        return call.score(rollout)[0].tolist()

    return score


def model_scorer(cfg: ServeConfig) -> Scorer:
    """Scores by the reward model, as a local ``model`` source with a tokenizer other than the
    policy's scores (one forward pass at a time: requests wait for the model)."""
    model_cfg = ModelConfig(dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    rm = ModelReward(RewardSource(model=cfg.model), "serve-reward", model_cfg, None, cfg.batch_size)
    rm.scorer.to(pick_device(cfg.device)).eval()
    lock = threading.Lock()

    def score(rollout: Rollout, fields: dict[str, Any]) -> list[float]:
        texts = (fields["query"] if rm.tokenizer.chat_template is None
                 else rm.chat_texts(rollout.prompts, rollout.response_texts))
        with lock:
            return rm.score_tokens(*rm.tokenize(texts)).tolist()

    return score


# --------------------------------------------------------------------------- the server

def import_server(command: str = "serve-reward"):
    """fastapi and uvicorn, or a ConfigError naming the extra that installs them."""
    try:
        import fastapi
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"rlhf-ppo {command} needs fastapi and uvicorn ({e}): "
                          "pip install 'rlhf_ppo[serve]'") from e
    return fastapi, uvicorn


def check_listen(cfg: ServeConfig | ServeEnvConfig) -> None:
    """The checks of the keys every server has (``port``)."""
    check(1 <= cfg.port <= 65535 or cfg.port == 0, "port", "a port number (0: any free one)", cfg.port)


def serve_app(app, cfg: ServeConfig | ServeEnvConfig, command: str, name: str, route: str) -> None:
    """Serve ``app`` at ``cfg.host:cfg.port`` until interrupted (Ctrl-C)."""
    _, uvicorn = import_server(command)
    logger.info("%s: %s at http://%s:%d%s", command, name, cfg.host, cfg.port, route)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)


def build_app(score: Scorer, name: str, route: str = "/score"):
    """The FastAPI app: ``POST route`` scores a batch, ``GET /health`` names what it serves.
    ``app.state.requests`` / ``app.state.responses`` count what was scored."""
    fastapi, _ = import_server()
    app = fastapi.FastAPI(title="rlhf-ppo serve-reward")
    app.state.requests, app.state.responses = 0, 0

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "serves": name}

    @app.post(route)
    def score_batch(body: Any = fastapi.Body(...)) -> dict:  # noqa: B008 (FastAPI's idiom)
        # a plain `def`: FastAPI runs it in a worker thread, so a slow batch blocks no other
        try:
            rollout, fields = rows_of(body)
        except OpenRLHFRequest as e:
            raise fastapi.HTTPException(422, str(e)) from None
        except ValueError as e:
            raise fastapi.HTTPException(400, str(e)) from None
        try:
            scores = score(rollout, fields)
        except RewardError as e:
            raise fastapi.HTTPException(422, str(e)) from None
        app.state.requests += 1
        app.state.responses += len(scores)
        scores = [v if math.isfinite(v) else None for v in scores]
        if "responses" not in body:  # OpenRLHF reads "rewards" (and "scores", for its filtering)
            return {"rewards": scores, "scores": scores}
        return {"scores": scores}

    return app


def run_serve(cfg: ServeConfig) -> dict[str, Any]:
    """Serve until interrupted (Ctrl-C); returns what was scored."""
    import_server()
    logger.info("serve-reward: torch threads %d", set_threads(cfg.threads))
    score = function_scorer(cfg) if cfg.function is not None else model_scorer(cfg)
    name = cfg.function or cfg.model
    app = build_app(score, name, cfg.route)
    serve_app(app, cfg, "serve-reward", name, cfg.route)
    return {"served": name, "requests": app.state.requests, "responses": app.state.responses}


# --------------------------------------------------------------------------- serve-env

class Sessions:
    """The open episodes of ``rlhf-ppo serve-env``: one environment instance per session id, made
    by ``factory`` at reset, dropped on close, when a step says done, or after ``ttl`` idle seconds.
    Used from the server's event loop only (the environments' sync methods run in threads, the
    bookkeeping does not), so it needs no lock."""

    def __init__(self, factory: Callable[[], Any], ttl: float):
        self.factory, self.ttl = factory, ttl
        self.envs: dict[str, Any] = {}
        self.last_used: dict[str, float] = {}
        self.opened = self.steps = 0

    def new(self) -> tuple[str, Any]:
        """A fresh session id and its environment instance."""
        session_id, env = uuid.uuid4().hex, self.factory()
        self.envs[session_id], self.last_used[session_id] = env, time.monotonic()
        self.opened += 1
        return session_id, env

    def get(self, session_id: Any) -> Any:
        """The environment of ``session_id``; KeyError for an unknown (ended, expired) session."""
        if not isinstance(session_id, str) or session_id not in self.envs:
            raise KeyError(session_id)
        self.last_used[session_id] = time.monotonic()
        return self.envs[session_id]

    def drop(self, session_id: str) -> bool:
        """Forget ``session_id``; False when it was not open."""
        self.last_used.pop(session_id, None)
        return self.envs.pop(session_id, None) is not None

    def expire(self) -> None:
        """Drop the sessions idle for longer than ``ttl`` seconds."""
        now = time.monotonic()
        for session_id in [s for s, t in self.last_used.items() if now - t > self.ttl]:
            logger.info("serve-env: session %s idle for over %g s, dropped", session_id, self.ttl)
            self.drop(session_id)


def step_reply(value: Any, where: str) -> dict[str, Any]:
    """The JSON reply of what ``step`` returned; ValueError when it is not ``(observation: str,
    reward: float | None, done: bool)`` with a finite reward (JSON has no NaN)."""
    expected = "expected a tuple (observation: str, reward: finite number or None, done: bool)"
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{where} returned {type(value).__name__} {value!r:.200}; {expected}")
    observation, reward, done = value
    reward_ok = reward is None or (isinstance(reward, numbers.Real) and not isinstance(reward, bool)
                                   and math.isfinite(reward))
    for key, v, ok in (("observation", observation, isinstance(observation, str)),
                       ("reward", reward, reward_ok), ("done", done, isinstance(done, bool))):
        if not ok:
            raise ValueError(f"{where} returned {key} {type(v).__name__} {v!r:.200}; {expected}")
    return {"observation": observation, "reward": None if reward is None else float(reward),
            "done": done}


def build_env_app(factory: Callable[[], Any], name: str, session_ttl: float = 3600.0):
    """The FastAPI app of ``rlhf-ppo serve-env`` (the protocol: :mod:`.agents.remote_env`):
    ``POST /reset``, ``/step``, ``/close`` and ``GET /health``. ``app.state.sessions``: the
    :class:`Sessions`. Replies: 400 for a malformed request, 404 for an unknown session, 422 when
    the environment raised or returned a wrong value (the detail names the session and method)."""
    from .agents.calls import call_with_timeout

    fastapi, _ = import_server("serve-env")
    app = fastapi.FastAPI(title="rlhf-ppo serve-env")
    sessions = app.state.sessions = Sessions(factory, session_ttl)

    def where(env: Any, method: str, session_id: str) -> str:
        return f"environment {type(env).__name__}.{method} (session {session_id})"

    async def call(env: Any, method: str, session_id: str, *args: Any) -> Any:
        # async methods awaited on the server's loop, sync ones each in a thread: sessions run together
        try:
            return await call_with_timeout(getattr(env, method), args)
        except Exception as e:
            raise fastapi.HTTPException(422, raised(where(env, method, session_id), e,
                                                    getattr(env, method))) from None

    def session_of(body: Any, method: str) -> tuple[str, Any]:
        session_id = body.get("session_id") if isinstance(body, dict) else None
        try:
            return session_id, sessions.get(session_id)
        except KeyError:
            raise fastapi.HTTPException(404, f"{method}: unknown session {session_id!r} (ended by done, "
                                             f"closed, or idle for over {session_ttl:g} s); expected a "
                                             "session_id from /reset") from None

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "serves": name, "sessions": len(sessions.envs)}

    @app.post("/reset")
    async def reset(body: Any = fastapi.Body(...)) -> dict:  # noqa: B008 (FastAPI's idiom)
        sessions.expire()
        row = body.get("row") if isinstance(body, dict) else None
        if not isinstance(row, dict):
            raise fastapi.HTTPException(400, 'reset: expected a JSON object {"row": {column: value}}')
        session_id, env = sessions.new()
        try:
            observation = await call(env, "reset", session_id, row)
            if observation is not None and not isinstance(observation, str):
                raise fastapi.HTTPException(422, f"{where(env, 'reset', session_id)} returned "
                                                 f"{type(observation).__name__} {observation!r:.200}; "
                                                 "expected a string or None")
        except fastapi.HTTPException:
            sessions.drop(session_id)
            raise
        return {"session_id": session_id, "observation": observation}

    @app.post("/step")
    async def step(body: Any = fastapi.Body(...)) -> dict:  # noqa: B008
        session_id, env = session_of(body, "step")
        text = body.get("text")
        if not isinstance(text, str):
            raise fastapi.HTTPException(400, f"step (session {session_id}): expected a JSON object "
                                             '{"session_id": str, "text": str}')
        sessions.steps += 1
        try:
            reply = step_reply(await call(env, "step", session_id, text), where(env, "step", session_id))
        except (fastapi.HTTPException, ValueError) as e:
            sessions.drop(session_id)  # an environment that failed is in no state to go on
            raise e if isinstance(e, fastapi.HTTPException) else fastapi.HTTPException(422, str(e)) from None
        if reply["done"]:
            sessions.drop(session_id)
        return reply

    @app.post("/close")
    async def close(body: Any = fastapi.Body(...)) -> dict:  # noqa: B008
        session_id, _ = session_of(body, "close")
        sessions.drop(session_id)
        return {"closed": session_id}

    return app


def load_env_class(spec: str) -> Callable[[], Any]:
    """The environment class of ``spec``; a ConfigError unless it has ``reset`` and ``step``."""
    from .agents.tools import load_tool

    cls = load_tool(spec, "environment")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(f"environment: {spec} has no {' or '.join(missing)} method; expected a "
                          "reset(row) / step(text) environment class (docs/agents.md)")
    return cls


def run_serve_env(cfg: ServeEnvConfig) -> dict[str, Any]:
    """Serve ``cfg.environment`` until interrupted (Ctrl-C); returns what was served."""
    app = build_env_app(load_env_class(cfg.environment), cfg.environment, cfg.session_ttl)
    serve_app(app, cfg, "serve-env", cfg.environment, "")
    sessions = app.state.sessions
    return {"served": cfg.environment, "sessions": sessions.opened, "steps": sessions.steps}
