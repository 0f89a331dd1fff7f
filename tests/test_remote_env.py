"""Environments behind HTTP (rlhf_ppo/agents/remote_env.py, `rlhf-ppo serve-env` in rlhf_ppo/serve.py):
real servers on localhost (uvicorn in a thread), episodes run by the agent runner and by
`generate_multiturn` with `agent.environment: http://127.0.0.1:PORT`."""

import json
import textwrap
import time
import urllib.request

import pytest
import torch
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from test_remote import free_port, running  # tests/test_remote.py

from rlhf_ppo import serve
from rlhf_ppo.agent_rollout import build_agent, generate_multiturn
from rlhf_ppo.agents import AgentRunner, Episode
from rlhf_ppo.agents.remote_env import RemoteEnvironment, load_environment
from rlhf_ppo.config import AgentConfig, ConfigError, GenerationConfig, load_config
from rlhf_ppo.data import Prompt
from rlhf_ppo.errors import AgentError

ENVS = textwrap.dedent('''
    import asyncio
    import time

    class WordGame:
        """Answers "user : W" with W the last word of the model's turn; turn k earns
        label + words / 10; ends on a turn holding "good", else goes on."""

        def reset(self, row):
            self.label = row["label"]
            return "user : the movie" if row["label"] % 2 else None

        def step(self, text):
            words = text.split()
            reward = self.label + len(words) / 10
            return f"user : {words[-1] if words else 'the'}", reward, "good" in words

    class SlowAsyncGame:
        """An async step that takes 0.2 s and ends the episode."""

        async def reset(self, row):
            return None

        async def step(self, text):
            await asyncio.sleep(0.2)
            return "ok", 1.0, True

    class SlowSyncGame(SlowAsyncGame):
        """The same with a blocking step (the server runs it in a thread)."""

        def step(self, text):
            time.sleep(0.2)
            return "ok", 1.0, True

    class NoStep:
        def reset(self, row):
            return None

    class Failing:
        def reset(self, row):
            return None

        def step(self, text):
            raise ValueError("the board is on fire")

    class WrongType:
        def reset(self, row):
            return None

        def step(self, text):
            return "ok", "high", False
''')

ROW = {"prompt": "the movie was", "label": 1}


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    path = tmp_path_factory.mktemp("remote_envs") / "remote_envs.py"
    path.write_text(ENVS)
    return str(path)


def env_app(envs: str, name: str, ttl: float = 3600.0):
    """The app `rlhf-ppo serve-env environment=envs:name` runs."""
    return serve.build_env_app(serve.load_env_class(f"{envs}:{name}"), name, ttl)


def base(url: str) -> str:
    return url.removesuffix("/score")  # test_remote.running yields the reward route


def raw_env_app(step_reply):
    """An app whose /reset opens session "s1" and whose /step answers ``step_reply()``."""
    app = FastAPI()
    app.state.steps = 0

    @app.post("/reset")
    def reset(body: dict = Body(...)):  # noqa: B008
        return {"session_id": "s1", "observation": None}

    @app.post("/step")
    def step(body: dict = Body(...)):  # noqa: B008
        app.state.steps += 1
        return step_reply()

    return app


def one_episode(env, text: str = "good", runner_timeout: float = 30.0):
    """reset(ROW) and one step through the agent runner, as a rollout runs them."""
    with AgentRunner(timeout=runner_timeout, max_turns=4) as runner:
        episode = Episode(env, ROW, 0)
        first = runner.reset_episodes([episode])
        return first, runner.step_episodes([episode], [text])[0]


# --------------------------------------------------------------------------- same rollout as in-process

def tiny_setup(rows: int = 4):
    """The tiny word-level model and tokenizer, and ``rows`` chat prompts with a `label` column."""
    from transformers import LlamaForCausalLM

    from rlhf_ppo.data import render_prompt
    from rlhf_ppo.tasks.tiny import build_word_tokenizer, tiny_llama_config

    tok = build_word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok)))
    prompts = []
    for i in range(rows):
        text, messages = render_prompt([{"role": "user", "content": "the movie was"}], tok, i, "prompt")
        prompts.append(Prompt(text, tok(text, add_special_tokens=False)["input_ids"], messages, {"label": i}))
    return model, tok, prompts


def rollout_with(environment: str, model, tok, prompts):
    agent = build_agent(AgentConfig(environment=environment, max_turns=3, max_tokens_per_turn=4), tok)
    torch.manual_seed(1)
    try:
        return agent, generate_multiturn(model, prompts, tok, GenerationConfig(max_new_tokens=64), agent)
    finally:
        agent.close()


def test_served_environment_rolls_out_as_the_class_in_process(envs):
    model, tok, prompts = tiny_setup()
    local_agent, local = rollout_with(f"{envs}:WordGame", model, tok, prompts)
    app = env_app(envs, "WordGame")
    with running(app) as url:
        agent, remote = rollout_with(base(url), model, tok, prompts)
    assert agent.multiturn and agent.protocol == local_agent.protocol == "chat"
    for key in ("input_ids", "attention_mask", "response_mask", "turn_rewards", "stopped"):
        assert torch.equal(getattr(remote, key), getattr(local, key)), key
    assert remote.response_texts == local.response_texts
    # the episodes really ran: 4 sessions, several turns; turn k of row b earned label b + words / 10
    # (at most 4 words: 4 tokens per turn) on the last model token of the turn
    sessions = app.state.sessions
    assert sessions.opened == 4 and sessions.envs == {}  # each ended by done or closed at max_turns
    ends = (remote.response_mask[:, :-1] == 1) & (remote.response_mask[:, 1:] == 0)
    turns = ends.sum(1) + remote.response_mask[:, -1]
    assert sessions.steps == int(turns.sum()) and turns.max() > 1
    for b in range(1, 4):  # row 0's reward is 0 for a turn without words: not seen below
        rewards = remote.turn_rewards[b][remote.turn_rewards[b] != 0]
        assert len(rewards) == turns[b]
        words = ((rewards - b) * 10).tolist()
        assert all(abs(w - round(w)) < 1e-4 and round(w) in range(5) for w in words), words


# --------------------------------------------------------------------------- failures

def test_server_that_is_down_is_named_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = RemoteEnvironment(url, timeout=5.0, retries=2, backoff=0.01)
    with pytest.raises(AgentError) as e:
        one_episode(env)
    message = str(e.value)
    assert f"environment server {url}/reset" in message and "'the movie was'" in message
    assert "cannot connect" in message and "after 3 attempt(s)" in message  # 1 + retries 2
    assert '{"session_id": str, "observation": str or null}' in message


def test_slow_server_times_out_with_the_url_before_the_runner_does(envs):
    def slow():
        time.sleep(0.6)
        return {"observation": "ok", "reward": 0.0, "done": True}

    app = raw_env_app(slow)
    with running(app) as url:
        # agent.tool_timeout 0.4: the client gives up at 0.95 * 0.4 s, naming the URL; a step is
        # not sent again after a timeout (the server may have run it)
        env = load_environment(AgentConfig(environment=base(url), tool_timeout=0.4))()
        start = time.monotonic()
        with pytest.raises(AgentError, match=r"/step \(session s1, row with prompt 'the movie was'\): "
                                             r"no reply within timeout 0\.38 s after 1 attempt"):
            one_episode(env, runner_timeout=0.4)
        assert time.monotonic() - start < 0.55
    assert app.state.steps == 1


@pytest.mark.parametrize("reply, match", [
    (lambda: {"observation": "ok", "reward": 1.0}, "the reply has no done"),
    (lambda: {"observation": "ok", "reward": "high", "done": False}, "the reply's reward is str 'high'"),
    (lambda: {"observation": "ok", "reward": 1.0, "done": "yes"}, "the reply's done is str 'yes'"),
    (lambda: {"observation": None, "reward": 1.0, "done": False}, "the reply's observation is NoneType"),
    (lambda: ["ok", 1.0, False], "the reply is list"),
    (lambda: JSONResponse({"detail": "no"}, status_code=500), r"HTTP 500 .*after 1 attempt|HTTP 500"),
], ids=["no-done", "string-reward", "string-done", "null-observation", "bare-list", "500"])
def test_wrong_step_replies_are_errors(reply, match):
    app = raw_env_app(reply)
    with running(app) as url:
        with pytest.raises(AgentError, match=match) as e:
            one_episode(RemoteEnvironment(base(url), timeout=5.0, backoff=0.01))
    assert f"{base(url)}/step (session s1" in str(e.value)
    assert '{"observation": str, "reward": number or null, "done": bool}' in str(e.value)
    assert app.state.steps == 1  # a step is never sent twice once the server has answered


def test_unknown_session_and_failing_environments_are_named(envs):
    with running(env_app(envs, "Failing")) as url:
        env = RemoteEnvironment(base(url), timeout=5.0)
        with pytest.raises(AgentError, match=r"HTTP 422 .*environment Failing.step \(session [0-9a-f]{32}\) "
                                             r"raised ValueError: the board is on fire"):
            one_episode(env)
        env = RemoteEnvironment(base(url), timeout=5.0)
        env.session_id = "nope"
        with pytest.raises(AgentError, match=r"HTTP 404 .*unknown session 'nope'"):
            one_episode_step_only(env)
    with running(env_app(envs, "WrongType")) as url:
        with pytest.raises(AgentError, match=r"HTTP 422 .*WrongType.step .*returned reward str 'high'"):
            one_episode(RemoteEnvironment(base(url), timeout=5.0))


def one_episode_step_only(env):
    with AgentRunner(timeout=30.0) as runner:
        return runner.step_episodes([Episode(env, ROW, 0)], ["good"])


def test_a_column_that_json_cannot_carry_is_named_before_sending():
    env = RemoteEnvironment(f"http://127.0.0.1:{free_port()}")
    with AgentRunner() as runner:
        with pytest.raises(AgentError, match=r"column 'label' is Tensor .*expected the row's columns "
                                             r"to be JSON values"):
            runner.reset_episodes([Episode(env, {"prompt": "x", "label": torch.tensor(1)}, 0)])


def test_sessions_end_on_done_on_close_at_max_turns_and_after_the_ttl(envs):
    app = env_app(envs, "WordGame", ttl=0.3)
    with running(app) as url:
        sessions = app.state.sessions
        _, result = one_episode(RemoteEnvironment(base(url)), text="good")  # done: the server drops it
        assert result.done and sessions.envs == {}
        _, result = one_episode(RemoteEnvironment(base(url), max_turns=1), text="bad")  # cut: closed
        assert not result.done and sessions.envs == {}
        one_episode(RemoteEnvironment(base(url), max_turns=2), text="bad")  # left open
        assert len(sessions.envs) == 1
        time.sleep(0.4)
        one_episode(RemoteEnvironment(base(url)), text="good")  # any reset drops idle sessions
        assert sessions.envs == {} and sessions.opened == 4


# --------------------------------------------------------------------------- concurrency

@pytest.mark.parametrize("name", ["SlowAsyncGame", "SlowSyncGame"])
def test_episodes_of_many_rows_run_at_once(envs, name):
    # 8 rows, each step takes 0.2 s on the server: 1.6 s one after another, ~0.2 s together
    app = env_app(envs, name)
    with running(app) as url:
        spec = load_environment(AgentConfig(environment=base(url)))
        episodes = [Episode(spec(), {**ROW, "label": i}, i) for i in range(8)]
        with AgentRunner(timeout=10.0) as runner:
            runner.reset_episodes(episodes)
            start = time.monotonic()
            results = runner.step_episodes(episodes, ["x"] * 8)
            elapsed = time.monotonic() - start
    assert [r.reward for r in results] == [1.0] * 8 and app.state.sessions.steps == 8
    assert elapsed < 0.8, elapsed


# --------------------------------------------------------------------------- the command

def test_serve_env_config_and_http_errors(envs):
    with pytest.raises(ConfigError, match="environment: expected 'package.module:Class'"):
        load_config(None, [], cls=serve.ServeEnvConfig)
    with pytest.raises(ConfigError, match="has no step method"):
        serve.load_env_class(f"{envs}:NoStep")
    with running(env_app(envs, "WordGame")) as url:
        request = urllib.request.Request(f"{base(url)}/reset", data=b'{"rows": []}',
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=5)
        assert e.value.code == 400 and b'{\\"row\\"' in e.value.read()
        health = json.loads(urllib.request.urlopen(f"{base(url)}/health", timeout=5).read())
        assert health == {"status": "ok", "serves": "WordGame", "sessions": 0}


def test_serve_env_help(cli):
    result = cli("serve-env", "--help")
    assert result.returncode == 0
    assert "session_ttl" in result.stdout and "reset/step environment class" in result.stdout
