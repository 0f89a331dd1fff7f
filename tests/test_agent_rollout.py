"""Multi-turn sampling (rlhf_ppo/agent_rollout.py) with the built-in tiny model: the response
region holds the model's turns (action 1) and the tools' or the environment's answers (attention
1, action 0); turn and token limits hold; an environment's step rewards land on the last model
token of their turn; ``rlhf-ppo train`` runs PPO on such rollouts.

The tiny random model rarely ends a turn or writes a call by itself, so the tests fix its token
choices: ``rlhf_ppo.rollout.draw`` (the sampler's token choice) is replaced by a script (the
policy still runs and its log-probs are still recorded). The tiny word vocabulary has no
``<call>``/``</call>``, so the tool tests use text-protocol markers that are words of it."""

import pytest
import torch
from rollouts import record_updates  # tests/rollouts.py
from test_trainer import tiny_config

from rlhf_ppo import PPOTrainer
from rlhf_ppo.agent_rollout import build_agent, generate_multiturn
from rlhf_ppo.config import AgentConfig, config_from_dict
from rlhf_ppo.errors import AgentError, ConfigError

ENV_SOURCE = '''
class EchoGame:
    """Answers every turn with "user : the movie" (4 words); turn k earns reward k; ends after 3."""

    def reset(self, row):
        self.turns = 0
        return None

    def step(self, text):
        self.turns += 1
        return "user : the movie", float(self.turns), self.turns >= 3
'''

TOOL_SOURCE = '''
def movie() -> str:
    """Gives a review of the movie."""
    return "great fun"
'''

TRL_ENV_SOURCE = '''
class ReviewEnv:
    """TRL's environment_factory convention: reset(**row), public methods are tools, get_reward."""

    def reset(self, prompt, **kwargs):
        self.calls = 0
        return "user :"

    def movie(self) -> str:
        """Gives a review of the movie."""
        self.calls += 1
        return "great fun"

    def get_reward(self):
        return 0.5 * self.calls
'''

GOOD, EOS = 9, 3  # the tiny vocabulary's "good" and "<eos>"
OBS = [77, 8, 17, 20]  # "user : the movie"


@pytest.fixture
def env_spec(tmp_path):
    path = tmp_path / "game.py"
    path.write_text(ENV_SOURCE)
    return f"{path}:EchoGame"


@pytest.fixture
def tool_spec(tmp_path):
    path = tmp_path / "tools.py"
    path.write_text(TOOL_SOURCE)
    return f"{path}:movie"


def script(monkeypatch, tokens: list[int]) -> None:
    """Make the sampler choose ``tokens`` in order (every row the same; the last one repeats)."""
    queue = list(tokens)

    def draw(probs, method=None):
        tok = queue.pop(0) if len(queue) > 1 else queue[0]
        return torch.full((probs.shape[0],), tok, dtype=torch.long, device=probs.device)
    monkeypatch.setattr("rlhf_ppo.rollout.draw", draw)


def rollout_of(tmp_path, *overrides, record=False):
    trainer = PPOTrainer(tiny_config(tmp_path / "run", "iterations=1", "ppo.batch_size=4",
                                     "agent.protocol=text", *overrides))
    rows = trainer.sampler.prompts[:4]
    return generate_multiturn(trainer.unwrapped.policy, rows, trainer.tokenizer, trainer.cfg.generation,
                              trainer.agent, record=record), trainer


def test_environment_turns_masks_and_rewards(tmp_path, env_spec, monkeypatch):
    script(monkeypatch, [GOOD])  # every turn runs to max_tokens_per_turn: "good good good"
    r, _ = rollout_of(tmp_path, f"agent.environment={env_spec}", "agent.max_tokens_per_turn=3",
                      "agent.max_total_tokens=40", record=True)
    turn = [GOOD] * 3
    # turn, observation, turn, observation, turn (done after the third step: no observation)
    assert r.response_ids.tolist() == [turn + OBS + turn + OBS + turn] * 4
    model, env = [1] * 3, [0] * 4
    assert r.response_mask.tolist() == [model + env + model + env + model] * 4
    assert r.attention_mask[:, r.prompt_length:].tolist() == [[1] * 17] * 4
    expected = torch.zeros(4, 17)
    expected[:, 2], expected[:, 9], expected[:, 16] = 1.0, 2.0, 3.0  # last model token of turn k
    assert torch.equal(r.turn_rewards, expected)
    assert r.stopped.tolist() == [True] * 4  # the environment ended every episode
    # log-probs recorded on the model's tokens only (log of a probability < 1: negative)
    assert (r.logprobs[r.response_mask.bool()] < 0).all()
    assert (r.logprobs[~r.response_mask.bool()] == 0).all()
    assert r.response_texts[0] == " user : the movie ".join(["good good good"] * 3)  # the whole transcript


def test_stop_token_ends_a_turn(tmp_path, env_spec, monkeypatch):
    script(monkeypatch, [EOS])  # every turn is one EOS
    r, _ = rollout_of(tmp_path, f"agent.environment={env_spec}", "agent.max_tokens_per_turn=3")
    assert r.response_ids[0].tolist() == [EOS] + OBS + [EOS] + OBS + [EOS]
    assert r.response_mask[0].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    assert r.turn_rewards[0].tolist() == [1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3]


def test_turn_limit_cuts_the_episode(tmp_path, env_spec, monkeypatch):
    script(monkeypatch, [GOOD])
    r, _ = rollout_of(tmp_path, f"agent.environment={env_spec}", "agent.max_tokens_per_turn=3",
                      "agent.max_turns=2")
    assert r.response_mask[0].tolist() == [1] * 3 + [0] * 4 + [1] * 3  # no answer after turn 2
    assert r.turn_rewards[0].tolist() == [0, 0, 1] + [0] * 4 + [0, 0, 2]  # turn 2 was still rewarded
    assert r.stopped.tolist() == [False] * 4  # cut, not ended by the environment


def test_total_token_limit_cuts_the_observation(tmp_path, env_spec, monkeypatch):
    script(monkeypatch, [GOOD])
    r, _ = rollout_of(tmp_path, f"agent.environment={env_spec}", "agent.max_tokens_per_turn=3",
                      "agent.max_total_tokens=12")
    # 3 + 4 + 3 = 10 tokens, then 2 of the second observation's 4 words
    assert r.response_ids[0].tolist() == [GOOD] * 3 + OBS + [GOOD] * 3 + OBS[:2]
    assert r.response_mask[0].tolist() == [1] * 3 + [0] * 4 + [1] * 3 + [0] * 2
    assert r.stopped.tolist() == [False] * 4
    # default: the response region is at most generation.max_new_tokens (16), each turn too
    r, _ = rollout_of(tmp_path / "b", f"agent.environment={env_spec}")
    assert r.response_ids.shape[1] == 16 and r.response_mask[0].tolist() == [1] * 16


def test_a_tool_call_pauses_the_row_and_its_result_is_read_not_trained(tmp_path, tool_spec,
                                                                        monkeypatch):
    # text protocol with markers from the tiny vocabulary: "review NAME about" is a call of NAME
    review, movie, about = 80, 20, 79
    script(monkeypatch, [review, movie, about, EOS])
    r, t = rollout_of(tmp_path, f"agent.tools=[{tool_spec}]", "agent.call_open=review",
                      "agent.call_close=about", "agent.result_template= user {content} assistant ")
    # the call, the result " user great fun assistant " (4 words, read only), then the turn's end
    assert r.response_ids[0].tolist() == [review, movie, about, 77, 10, 14, 78, EOS]
    assert r.response_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 1]
    assert r.attention_mask[0, r.prompt_length:].tolist() == [1] * 8
    assert r.turn_rewards is None and r.stopped.all()
    assert t.tokenizer.convert_ids_to_tokens([review, about]) == ["review", "about"]


def test_trl_environment_factory_class(tmp_path, monkeypatch):
    (tmp_path / "trl_env.py").write_text(TRL_ENV_SOURCE)
    review, movie, about = 80, 20, 79
    script(monkeypatch, [review, movie, about, EOS])
    r, t = rollout_of(tmp_path, f"agent.environment={tmp_path}/trl_env.py:ReviewEnv",
                      "agent.call_open=review", "agent.call_close=about",
                      "agent.result_template= user {content} assistant ")
    # reset's text goes to the end of the prompt (read, outside the response region)
    assert r.input_ids[0, r.prompt_length - 2:r.prompt_length].tolist() == [77, 8]
    assert r.prompts[0].input_ids[-2:] == [77, 8]
    assert r.response_ids[0].tolist() == [review, movie, about, 77, 10, 14, 78, EOS]
    assert r.response_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 1]
    # get_reward() (one call: 0.5) on the last model token of the rollout
    assert r.turn_rewards[0].tolist() == [0] * 7 + [0.5]


def test_protocol_choice(tool_spec):
    from rlhf_ppo.tasks.tiny import build_word_tokenizer

    tok = build_word_tokenizer()  # its chat template has no tools
    assert build_agent(AgentConfig(tools=[tool_spec]), tok).protocol == "text"
    with pytest.raises(AgentError, match="chat template"):
        build_agent(AgentConfig(tools=[tool_spec], protocol="chat"), tok)


def test_a_turn_without_a_call_ends_the_row(tmp_path, tool_spec, monkeypatch):
    script(monkeypatch, [GOOD, EOS])
    r, _ = rollout_of(tmp_path, f"agent.tools=[{tool_spec}]")
    assert r.response_ids[0].tolist() == [GOOD, EOS] and r.response_mask[0].tolist() == [1, 1]


def test_ppo_trains_on_environment_rollouts_with_holes(tmp_path, env_spec, monkeypatch):
    trainer = PPOTrainer(tiny_config(tmp_path, "iterations=2", "ppo.batch_size=4",
                                     "agent.protocol=text", f"agent.environment={env_spec}",
                                     "agent.max_tokens_per_turn=3", "agent.max_total_tokens=20"))
    calls = record_updates(trainer)
    history = trainer.train()
    assert len(history) == 2 and len(calls) == 2
    for batch, _ in calls:
        P = batch.prompt_length
        holes = batch.attention_mask[:, P:].bool() & ~batch.response_mask.bool()
        assert holes.sum(1).tolist() == [8] * 4  # two observations of 4 words in every row
        assert (batch.advantages[holes] == 0).all() and (batch.returns[holes] == 0).all()
        assert all(torch.isfinite(torch.tensor(v)) for v in history[-1].values()
                   if isinstance(v, float))


def test_single_turn_config_has_no_agent(tmp_path):
    cfg = tiny_config(tmp_path)
    assert not cfg.agent.enabled and cfg.agent == AgentConfig()
    assert PPOTrainer(cfg).agent is None


def test_config_and_agent_errors(tmp_path, env_spec, tool_spec):
    with pytest.raises(ConfigError, match="agent.max_turns"):
        config_from_dict({"agent": {"max_turns": 0}})
    with pytest.raises(ConfigError, match="generation.backend"):
        config_from_dict({"agent": {"tools": [tool_spec]}, "generation": {"backend": "transformers"}})
    with pytest.raises(AgentError, match="reset/step environment"):
        build_agent(AgentConfig(tools=[tool_spec], environment=env_spec), None)
