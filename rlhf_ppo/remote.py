"""Reward servers: a ``reward.sources`` entry with a ``url`` is scored over HTTP.

The protocol (docs/rewards.md), one POST of JSON per batch of at most ``rows_per_request``
responses::

    request   {"prompts": [str], "responses": [str], "query": [str], "messages": [list | null],
               "completion_ids": [[int]], "stopped": [bool], COLUMN: [value per row], KWARG: value}
    response  {"scores": [number | null]}      (OpenRLHF's {"rewards": [...]} is read too)

- ``prompts``: the prompt texts as the policy sees them (chat prompts rendered by its template);
- ``responses``: the response texts (special tokens and stop strings removed);
- ``query``: prompt and response decoded together, as OpenRLHF's ``serve_rm`` reads its ``query``
  and as a local reward model with a tokenizer other than the policy's reads the text;
- ``messages``: the prompt's chat messages (null for a text prompt);
- ``completion_ids``: the response token ids, the stop token included;
- ``stopped``: the response ended with a stop token;
- every other dataset column as a list (one value per row) and the entry's ``kwargs`` as they
  are, as a reward function receives them; the fields above win over a column of the same name.

A null (or NaN) score means "not scored": left out of the weighted sum, as a TRL-style reward
function's None. Requests go out together (``concurrency`` at once; asyncio and httpx); one that
fails by a connection error, a timeout, HTTP 429 or 5xx is sent again after ``backoff * 2**k``
seconds, at most ``max_retries`` times. Another HTTP status, a body that is not JSON or not one
number per response is a RewardError at once: sending it again would get the same answer.
The sending with retries (:func:`post_retrying`) is shared with environments behind HTTP
(:mod:`.agents.remote_env`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import numbers
import time
from types import ModuleType

import torch

from .config import RewardSource
from .errors import RewardError
from .rollout import Rollout

REQUEST_FIELDS = ("prompts", "responses", "query", "messages", "completion_ids", "stopped")
"""the fields rlhf_ppo fills in every request (a dataset column of the same name is not sent)"""
RETRIED_STATUS = (429,)
"""HTTP statuses below 500 that are retried (too many requests)"""
HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def import_httpx(where: str) -> ModuleType:
    """The httpx module, or a RewardError naming the extra that installs it."""
    try:
        import httpx
    except ImportError as e:
        raise RewardError(f"{where}: a `url` reward source needs the httpx package: "
                          "pip install 'rlhf_ppo[remote]'") from e
    return httpx


def expected(n: int) -> str:
    """What a reply must be, for error messages."""
    return f'HTTP 200 with a JSON object {{"scores": [{n} numbers or null]}}'


def transcripts(rollout: Rollout, policy_tokenizer) -> list[str]:
    """Prompt and response of each row decoded together (special tokens removed): decoding them
    apart loses the space between them for many tokenizers (as :class:`.rewards.ModelReward`)."""
    return [policy_tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(rollout.input_ids, rollout.attention_mask)]


def request_rows(rollout: Rollout, policy_tokenizer) -> dict[str, list]:
    """Every per-row field of a request for the whole rollout: ``{name: [value per row]}``."""
    columns: dict[str, list] = {}
    for p in rollout.prompts:
        for k, v in p.extra.items():
            if k not in REQUEST_FIELDS:
                columns.setdefault(k, []).append(v)
    lengths = rollout.response_mask.sum(-1).tolist()
    ours = {
        "prompts": [p.text for p in rollout.prompts],
        "responses": list(rollout.response_texts),
        "query": transcripts(rollout, policy_tokenizer),
        "messages": [p.messages for p in rollout.prompts],
        "completion_ids": [rollout.response_ids[b, :int(n)].tolist() for b, n in enumerate(lengths)],
        "stopped": rollout.stopped.tolist(),
    }
    return {**columns, **ours}


def encode_batches(rows: dict[str, list], kwargs: dict, n: int, rows_per_request: int,
                   where: str) -> list[tuple[bytes, int]]:
    """The JSON bodies of the requests and the number of responses in each: rows ``[s, s + k)``
    of every per-row field, plus ``kwargs`` (a per-row field wins over a kwarg of its name)."""
    bodies = []
    for s in range(0, n, rows_per_request):
        body = {**kwargs, **{k: v[s:s + rows_per_request] for k, v in rows.items()}}
        try:
            content = json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise RewardError(f"{where}: the request cannot be written as JSON ({e}); expected "
                              "dataset columns and kwargs that are JSON values") from e
        bodies.append((content, min(rows_per_request, n - s)))
    return bodies


def parse_scores(content: bytes, n: int, where: str) -> list[float]:
    """The ``n`` scores of a reply body (null -> NaN), or a RewardError saying what is wrong."""
    try:
        data = json.loads(content)
    except ValueError:
        raise RewardError(f"{where}: the reply is not JSON ({content[:200]!r}); expected "
                          f"{expected(n)}") from None
    key = "scores" if isinstance(data, dict) and "scores" in data else "rewards"
    values = data.get(key) if isinstance(data, dict) else None
    if not isinstance(values, list):
        got = f"an object with keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise RewardError(f"{where}: the reply is {got}; expected {expected(n)} (or "
                          '{"rewards": [...]})')
    if len(values) != n:
        raise RewardError(f"{where}: the reply has {len(values)} scores for {n} responses; "
                          f"expected {expected(n)}")
    for i, v in enumerate(values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise RewardError(f"{where}: score {i} of the reply is {type(v).__name__} {v!r}; "
                              f"expected {expected(n)}")
    return [math.nan if v is None else float(v) for v in values]


def retried_status(status: int, idempotent: bool) -> bool:
    """Whether a reply with HTTP ``status`` is worth sending again: 429 or 5xx; for a request
    the server must not run twice only 429 and 503, which say it was not run."""
    if not idempotent:
        return status in (429, 503)
    return status >= 500 or status in RETRIED_STATUS


class Unreachable(Exception):
    """No usable reply after ``attempts`` attempts; the message says why the last one failed."""

    def __init__(self, failure: str, attempts: int):
        self.attempts = attempts
        super().__init__(failure)


async def post_retrying(client, httpx: ModuleType, url: str, content: bytes, timeout: float,
                        max_retries: int, backoff: float, deadline: float | None = None,
                        idempotent: bool = True):
    """The reply to a POST of ``content`` to ``url``, sent again after ``backoff * 2**k`` seconds
    when it may succeed the next time, at most ``max_retries`` times: after a connection error, a
    timeout, HTTP 429 or 5xx. ``idempotent=False`` (a request the server must not run twice, as an
    environment's step): only when the server cannot have run it (no connection, HTTP 429/503).
    ``deadline`` (``time.monotonic()`` seconds, or None): no attempt or wait goes past it.

    Returns the reply (2xx, or another status that sending again would not change); raises
    :class:`Unreachable` after the last attempt."""
    failure, attempt = "", 0
    for attempt in range(1, max_retries + 2):
        if attempt > 1:
            wait = backoff * 2 ** (attempt - 2)
            if deadline is not None and time.monotonic() + wait >= deadline:
                attempt -= 1
                break
            await asyncio.sleep(wait)
        budget = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if budget <= 0:
            attempt -= 1
            break
        try:
            # wait_for bounds the whole request; httpx's timeout bounds each read and connect
            reply = await asyncio.wait_for(client.post(url, content=content, headers=HEADERS), budget)
        except (asyncio.TimeoutError, httpx.TimeoutException) as e:
            failure = f"no reply within timeout {budget:.3g} s"
            if idempotent or isinstance(e, httpx.ConnectTimeout):
                continue
            break
        except httpx.TransportError as e:  # refused, reset, unknown host
            failure = f"cannot connect ({type(e).__name__}: {e})"
            if idempotent or isinstance(e, httpx.ConnectError):
                continue
            break
        if not retried_status(reply.status_code, idempotent):
            return reply
        failure = f"HTTP {reply.status_code} ({reply.text[:200]!r})"
    raise Unreachable(failure, attempt)


async def post_batch(client, httpx: ModuleType, content: bytes, n: int, source: RewardSource,
                     where: str) -> list[float]:
    """One request's scores, sent again after a connection error, a timeout, HTTP 429 or 5xx."""
    try:
        reply = await post_retrying(client, httpx, source.url, content, source.timeout,
                                    source.max_retries, source.backoff)
    except Unreachable as e:
        raise RewardError(f"{where}: {e} after {e.attempts} attempt(s) (is the reward server "
                          f"running?); expected {expected(n)}") from None
    if not 200 <= reply.status_code < 300:
        raise RewardError(f"{where}: HTTP {reply.status_code} ({reply.text[:200]!r}); "
                          f"expected {expected(n)}")
    return parse_scores(reply.content, n, where)


async def post_batches(bodies: list[tuple[bytes, int]], source: RewardSource,
                       where: str) -> list[list[float]]:
    """The scores of every request in order, ``source.concurrency`` requests in flight at once;
    the first error cancels the others."""
    httpx = import_httpx(where)
    slots = asyncio.Semaphore(source.concurrency)
    async with httpx.AsyncClient(timeout=source.timeout) as client:

        async def one(content: bytes, n: int) -> list[float]:
            async with slots:
                return await post_batch(client, httpx, content, n, source, where)

        tasks = [asyncio.ensure_future(one(content, n)) for content, n in bodies]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class RemoteReward:
    """A reward server at ``source.url`` (the protocol: module docstring), scored like a reward
    function: its scores are weighted and processed as a function's, null/NaN means not scored."""

    def __init__(self, source: RewardSource, key: str, policy_tokenizer):
        self.source, self.key, self.name = source, key, source.url
        self.kwargs = dict(source.kwargs)
        self.policy_tokenizer = policy_tokenizer
        import_httpx(f"{key}.url ({source.url})")  # a missing package fails at start, not mid-run
        # httpx logs every request at INFO: a line per batch would flood the training log
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        """Scores ``[B]`` (NaN where the server sent null)."""
        return self.score(rollout)[0]

    def score(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` and the mask ``[B]`` of the responses the server scored (not null/NaN)."""
        where = f"{self.key} ({self.source.url})"
        n = len(rollout.prompts)
        if n == 0:
            return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
        bodies = encode_batches(request_rows(rollout, self.policy_tokenizer), self.kwargs, n,
                                self.source.rows_per_request, where)
        results = asyncio.run(post_batches(bodies, self.source, where))
        scores = torch.tensor([v for batch in results for v in batch], dtype=torch.float32)
        return scores, ~torch.isnan(scores)
