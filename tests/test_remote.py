"""Rewards behind HTTP (rlhf_ppo.remote, rlhf_ppo.serve): real servers on localhost (uvicorn in a
thread, or `rlhf-ppo serve-reward` in a subprocess), scored by `url` reward sources."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from contextlib import contextmanager

import pytest
import torch
import uvicorn
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from rollouts import rollout_of  # tests/rollouts.py

from rlhf_ppo import remote, serve
from rlhf_ppo.config import ConfigError, RewardConfig, RewardSource, load_config
from rlhf_ppo.data import Prompt
from rlhf_ppo.errors import RewardError, UnreadKeyWarning
from rlhf_ppo.rewards import RewardSum

FAST = dict(max_retries=2, backoff=0.01, timeout=5.0)  # retries without waiting in tests

FUNCTIONS = textwrap.dedent('''
    def words_times_label(prompts, responses, label, scale=1.0, **kwargs):
        """scale * label * words of the response + words of the prompt / 10"""
        return [scale * n * len(r.split()) + len(p.split()) / 10
                for p, r, n in zip(prompts, responses, label)]

    def trl_tokens(completions, completion_ids, stopped, **kwargs):
        """TRL style: None under 3 tokens (stop included), else tokens + 0.5 when stopped"""
        return [None if len(ids) < 3 else len(ids) + 0.5 * s
                for ids, s in zip(completion_ids, stopped)]

    def needs_answer(prompts, responses, answer):
        return [1.0 for _ in responses]

    def words_times_labels(prompts, responses, labels, **kwargs):
        """OpenRLHF's column name: labels * words of the response"""
        return [n * len(r.split()) for r, n in zip(responses, labels)]
''')


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fns(tmp_path_factory):
    path = tmp_path_factory.mktemp("remote_fns") / "remote_fns.py"
    path.write_text(FUNCTIONS)
    return str(path)


def make_rollout(tok, labels: list[int]):
    """Rows cycling through three prompt/response pairs, each stopped (EOS), with a `label` column."""
    pairs = [("the movie was", "good great"), ("i think the book is", "bad"),
             ("today", "very nice fun day")]
    prompts = [Prompt(pairs[i % 3][0], tok(pairs[i % 3][0])["input_ids"], extra={"label": n})
               for i, n in enumerate(labels)]
    return rollout_of(tok, prompts, [pairs[i % 3][1] for i in range(len(labels))])


@pytest.fixture(scope="module")
def rollout(tok):
    return make_rollout(tok, [1, 0, 2])


@contextmanager
def running(app):
    """``app`` served by uvicorn in a thread on a free localhost port; yields its scoring URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/score"
    finally:
        server.should_exit = True
        thread.join(10)


def served_function(spec: str, **kwargs):
    """The app `rlhf-ppo serve-reward function=spec` runs."""
    cfg = serve.ServeConfig(function=spec, kwargs=kwargs)
    return serve.build_app(serve.function_scorer(cfg), spec)


def raw_app(reply):
    """An app whose POST /score answers ``reply(body, call_number)`` (a starlette Response)."""
    app = FastAPI()
    app.state.calls = 0

    @app.post("/score")
    def score(body: dict = Body(...)):  # noqa: B008
        app.state.calls += 1
        return reply(body, app.state.calls)

    return app


def url_sum(tok, model_cfg, *sources, **cfg):
    return RewardSum(RewardConfig(sources=list(sources), **cfg), model_cfg, tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- same scores as local

def test_served_functions_score_as_local_functions(tok, model_cfg, fns, rollout):
    # prompts: "the movie was" (3 words), "i think the book is" (5), "today" (1); responses
    # "good great" (2 words, 3 tokens with EOS), "bad" (1, 2), "very nice fun day" (4, 5);
    # labels 1, 0, 2; scale 2 (the source's kwargs, sent in each request):
    # words_times_label = [2*1*2 + 0.3, 2*0*1 + 0.5, 2*2*4 + 0.1] = [4.3, 0.5, 16.1]
    # trl_tokens = [3 + 0.5, None (2 tokens), 5 + 0.5] = [3.5, None, 5.5]
    # weights 1 and 0.5: [4.3 + 1.75, 0.5 (row 1 not scored by the second), 16.1 + 2.75]
    words, trl = f"{fns}:words_times_label", f"{fns}:trl_tokens"
    with running(served_function(words)) as url_a, running(served_function(trl)) as url_b:
        remote_sum = url_sum(tok, model_cfg,
                             RewardSource(url=url_a, kwargs={"scale": 2}, **FAST),
                             RewardSource(url=url_b, weight=0.5, **FAST))
        total, metrics = remote_sum(rollout)
        raw, scored = remote_sum.score_sources(rollout)
    local_sum = url_sum(tok, model_cfg, RewardSource(function=words, kwargs={"scale": 2}),
                        RewardSource(function=trl, weight=0.5))
    local_total, local_metrics = local_sum(rollout)
    expected = torch.tensor([4.3 + 1.75, 0.5, 16.1 + 2.75])
    torch.testing.assert_close(total, expected)
    assert torch.equal(total, local_total) and metrics == local_metrics
    assert scored.tolist() == [[True, True, True], [True, False, True]]
    assert math.isnan(raw[1, 1]) and remote_sum.nonfinite_sources == []


def test_served_reward_model_scores_as_local_model(tok, model_cfg, char_reward_dir, rollout):
    # A reward model with its own (character) tokenizer reads the text of prompt and response
    # decoded together, in-process as on the server (the request's `query`).
    app = serve.build_app(serve.model_scorer(serve.ServeConfig(model=char_reward_dir)), "rm")
    with running(app) as url:
        remote_scores = url_sum(tok, model_cfg, RewardSource(url=url, **FAST))(rollout)[0]
    local_scores = url_sum(tok, model_cfg, RewardSource(model=char_reward_dir))(rollout)[0]
    torch.testing.assert_close(remote_scores, local_scores)
    assert len(set(local_scores.tolist())) == 3  # three different texts, three different scores


def test_rows_go_in_batches_of_rows_per_request_in_order(tok, model_cfg, fns):
    # 7 rows, 3 per request: ceil(7 / 3) = 3 requests (3 + 3 + 1 rows), sent concurrently;
    # the scores come back in row order: label * 10 * response words + prompt words / 10
    labels = [1, 2, 3, 4, 5, 6, 7]
    rows = make_rollout(tok, labels)
    app = served_function(f"{fns}:words_times_label", scale=10.0)
    with running(app) as url:
        scores = url_sum(tok, model_cfg, RewardSource(url=url, rows_per_request=3, concurrency=3,
                                                      **FAST))(rows)[0]
    words, prompt_words = [2, 1, 4], [3, 5, 1]
    expected = [10 * n * words[i % 3] + prompt_words[i % 3] / 10 for i, n in enumerate(labels)]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert (app.state.requests, app.state.responses) == (3, 7)


# --------------------------------------------------------------------------- failures

def test_server_that_is_down_is_named_after_the_retries(tok, model_cfg, rollout):
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    source = url_sum(tok, model_cfg, RewardSource(url=url, **FAST))
    with pytest.raises(RewardError) as e:
        source(rollout)
    message = str(e.value)
    assert "reward.sources[0]" in message and url in message
    assert "cannot connect" in message and "3 attempt(s)" in message  # 1 + max_retries 2
    assert '{"scores": [3 numbers or null]}' in message


def test_slow_server_times_out(tok, model_cfg, rollout):
    def slow(body, call):
        time.sleep(0.6)
        return JSONResponse({"scores": [0.0] * 3})

    app = raw_app(slow)
    with running(app) as url:
        source = url_sum(tok, model_cfg, RewardSource(url=url, timeout=0.2, max_retries=1, backoff=0.0))
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"no reply within timeout 0\.2 s after 2 attempt"):
            source(rollout)
        assert time.monotonic() - start < 1.0  # two 0.2 s timeouts, not two 0.6 s replies
    assert app.state.calls == 2


@pytest.mark.parametrize("reply, match", [
    (lambda n: JSONResponse({"scores": [1.0] * (n - 1)}), "the reply has 2 scores for 3 responses"),
    (lambda n: JSONResponse({"scores": [1.0, "high", 2.0]}), "score 1 of the reply is str 'high'"),
    (lambda n: JSONResponse({"scores": [1.0, True, 2.0]}), "score 1 of the reply is bool True"),
    (lambda n: PlainTextResponse("all good"), "the reply is not JSON"),
    (lambda n: JSONResponse({"score": [1.0] * n}), r"the reply is an object with keys \['score'\]"),
    (lambda n: JSONResponse([1.0] * n), "the reply is list"),
    (lambda n: JSONResponse({"detail": "no"}, status_code=404), "HTTP 404"),
], ids=["wrong-count", "string", "bool", "not-json", "wrong-key", "bare-list", "404"])
def test_wrong_replies_are_errors_without_retry(tok, model_cfg, rollout, reply, match):
    app = raw_app(lambda body, call: reply(len(body["responses"])))
    with running(app) as url:
        with pytest.raises(RewardError, match=match) as e:
            url_sum(tok, model_cfg, RewardSource(url=url, **FAST))(rollout)
    assert url in str(e.value) and "expected HTTP 200" in str(e.value)
    assert app.state.calls == 1  # the same request would get the same answer


def test_500_then_success_is_retried(tok, model_cfg, rollout):
    # call 1: HTTP 500, call 2: HTTP 503, call 3: OpenRLHF's {"rewards": [...]}, null = not scored
    def flaky(body, call):
        if call < 3:
            return JSONResponse({"detail": "warming up"}, status_code=[500, 503][call - 1])
        return JSONResponse({"rewards": [0.5, None, -1.0]})

    app = raw_app(flaky)
    with running(app) as url:
        scores, scored = url_sum(tok, model_cfg, RewardSource(url=url, **FAST)).score_sources(rollout)
    assert app.state.calls == 3
    assert scored[0].tolist() == [True, False, True]
    assert scores[0, 0] == 0.5 and scores[0, 2] == -1.0


def test_a_request_the_function_cannot_score_is_not_retried(tok, model_cfg, fns, rollout):
    # needs_answer has no **kwargs and requires `answer`, which is not a column: HTTP 422
    app = served_function(f"{fns}:needs_answer")
    with running(app) as url:
        with pytest.raises(RewardError, match=r"HTTP 422 .*needs the argument\(s\) answer"):
            url_sum(tok, model_cfg, RewardSource(url=url, **FAST))(rollout)
    assert app.state.requests == 0


def test_request_that_is_not_a_batch_gets_400(fns):
    app = served_function(f"{fns}:words_times_label")
    with running(app) as url:
        request = urllib.request.Request(url, data=b'{"prompts": ["a"], "responses": []}',
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=5)
    assert e.value.code == 400 and b"two lists of strings of equal length" in e.value.read()


def post_json(url: str, body: dict) -> tuple[int, dict]:
    """The status and JSON reply of a POST, as OpenRLHF's client sends it (``json=data``)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openrlhf_requests_are_scored_and_answered_with_rewards(fns):
    # OpenRLHF's agent executor posts {"query": [prompt + response], "prompts", "labels"} and reads
    # "rewards" (and "scores"); the response is the query minus its prompt:
    # " good great fun" (3 words) * 2 = 6, " nice<eos>" (1 word) * 0.5 = 0.5
    app = served_function(f"{fns}:words_times_labels")
    with running(app) as url:
        status, reply = post_json(url, {"query": ["the movie was good great fun", "today nice<eos>"],
                                        "prompts": ["the movie was", "today"], "labels": [2, 0.5]})
        assert status == 200 and reply == {"rewards": [6.0, 0.5], "scores": [6.0, 0.5]}
        status, reply = post_json(url, {"query": ["the movie was good"], "prompts": ["a movie"],
                                        "labels": [1]})
        assert status == 422 and "query 0 ('the movie was good') does not start with its prompt " \
            "('a movie')" in reply["detail"]
        status, reply = post_json(url, {"query": ["the movie was good"], "labels": [1]})
        assert status == 422 and '"query" without "responses" and no "prompts"' in reply["detail"]
        assert 'OpenRLHF\'s {"query": [prompt + response], "prompts": [prompt]}' in reply["detail"]
        # today's protocol is answered as before: "scores" only
        status, reply = post_json(url, {"prompts": ["a"], "responses": ["x y"], "labels": [3]})
        assert status == 200 and reply == {"scores": [6.0]}
    assert (app.state.requests, app.state.responses) == (2, 3)


# --------------------------------------------------------------------------- config and packages

def test_config_url_sources():
    with pytest.raises(ConfigError, match="exactly one of `model`, `function` or `url`"):
        RewardConfig(sources=[RewardSource(url="http://x/score", function="m:f")])
    with pytest.raises(ConfigError, match=r"reward.sources\[0\].url: expected an address starting"):
        RewardConfig(sources=[RewardSource(url="localhost:8000/score")])
    with pytest.raises(ConfigError, match=r"reward.sources\[0\].timeout"):
        RewardConfig(sources=[RewardSource(url="http://x/score", timeout=0)])
    with pytest.warns(UnreadKeyWarning, match=r"reward.sources\[0\].timeout: set to 5.0 but unread"):
        RewardConfig(sources=[RewardSource(function="m:f", timeout=5.0)])


def test_missing_packages_name_their_extra(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "httpx", None)  # `import httpx` raises ImportError
    with pytest.raises(RewardError, match=r"reward.sources\[0\].url \(http://x/s\): .*rlhf_ppo\[remote\]"):
        remote.RemoteReward(RewardSource(url="http://x/s"), "reward.sources[0]", tok)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ConfigError, match=r"pip install 'rlhf_ppo\[serve\]'"):
        serve.build_app(lambda rollout, fields: [], "x")


def test_serve_reward_command(tmp_path, fns):
    # The console command end to end: start, score over HTTP, stop with Ctrl-C, print what it did.
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ppo", "serve-reward", f"function={fns}:words_times_label",
         f"port={port}", "kwargs={scale: 3}", "log_level=warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        assert b"words_times_label" in health
        body = b'{"prompts": ["a b"], "responses": ["x y z"], "label": [2]}'
        request = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body,
                                         headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=5).read())
        # 3 * 2 * 3 words + 2 prompt words / 10, in float32 as a reward function's scores are
        assert reply == {"scores": [torch.tensor(18.2).item()]}
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "done: served " in out and "requests 1, responses 1" in out


def test_serve_config_needs_one_of_model_or_function():
    with pytest.raises(ConfigError, match="model: expected exactly one of `model` or `function`"):
        load_config(None, [], cls=serve.ServeConfig)
