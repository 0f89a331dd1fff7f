"""``rlhf-ppo serve-reward``: a reward model or a reward function behind HTTP, for ``url`` sources.

It speaks the protocol of :mod:`.remote` (docs/rewards.md): ``POST /score`` with a batch, reply
``{"scores": [number | null]}``; ``GET /health`` says what it serves. A reward function is
called as a local ``function`` source calls it (:class:`.rewards.FunctionReward`: either style,
the same arguments); a reward model scores as a local ``model`` source does when its tokenizer
is not the policy's (:class:`.rewards.ModelReward`): through its chat template when it has one,
else the request's ``query`` (prompt and response decoded together). It reads text only, so a
reward model that shares the policy's tokenizer can score differently here than in-process, where
it reads the sampled token ids (the stop token included).

Replies: 200 with the scores; 400 for a request that is not a batch; 422 when the function or
model fails on it (a RewardError: sending it again fails again); 500 for anything else.
Non-finite scores go out as null (JSON has no NaN): "not scored".
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .config import ModelConfig, RewardSource, check
from .data import Prompt
from .distributed import set_threads
from .errors import ConfigError, RewardError
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
    """CPU threads torch uses; null: `OMP_NUM_THREADS` when set, else this machine's usable cores"""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """uvicorn's log level (`info` logs every request)"""

    def __post_init__(self) -> None:
        check((self.model is None) != (self.function is None), "model",
              "exactly one of `model` or `function`", {"model": self.model, "function": self.function})
        check(self.function is None or ":" in self.function, "function",
              "'package.module:function' or 'path/to/file.py:function'", self.function)
        check(1 <= self.port <= 65535 or self.port == 0, "port", "a port number (0: any free one)",
              self.port)
        check(self.route.startswith("/"), "route", "a path starting with /", self.route)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(self.threads is None or self.threads >= 1, "threads", "an integer >= 1 or null",
              self.threads)


# --------------------------------------------------------------------------- requests

def rows_of(body: Any) -> tuple[Rollout, dict[str, Any]]:
    """A request's rows as a Rollout of their responses (prompts, texts, completion ids, stopped;
    no prompt tokens: the server has not the policy's tokenizer) and its other fields (dataset
    columns and kwargs). Only ``prompts`` and ``responses`` are required. ValueError when the
    request is not a batch."""
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
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

def import_server():
    """fastapi and uvicorn, or a ConfigError naming the extra that installs them."""
    try:
        import fastapi
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"rlhf-ppo serve-reward needs fastapi and uvicorn ({e}): "
                          "pip install 'rlhf_ppo[serve]'") from e
    return fastapi, uvicorn


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
        except ValueError as e:
            raise fastapi.HTTPException(400, str(e)) from None
        try:
            scores = score(rollout, fields)
        except RewardError as e:
            raise fastapi.HTTPException(422, str(e)) from None
        app.state.requests += 1
        app.state.responses += len(scores)
        return {"scores": [v if math.isfinite(v) else None for v in scores]}

    return app


def run_serve(cfg: ServeConfig) -> dict[str, Any]:
    """Serve until interrupted (Ctrl-C); returns what was scored."""
    _, uvicorn = import_server()
    logger.info("serve-reward: torch threads %d", set_threads(cfg.threads))
    score = function_scorer(cfg) if cfg.function is not None else model_scorer(cfg)
    name = cfg.function or cfg.model
    app = build_app(score, name, cfg.route)
    logger.info("serve-reward: %s at http://%s:%d%s", name, cfg.host, cfg.port, cfg.route)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return {"served": name, "requests": app.state.requests, "responses": app.state.responses}
