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
from rlhf_ppo.config import AgentConfig, GenerationConfig, config_from_dict
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
    # TRL passes reward functions each completion's environment instance, after its episode
    assert [type(e).__name__ for e in r.environments] == ["ReviewEnv"] * 4
    assert [e.calls for e in r.environments] == [1] * 4 and r.completion_messages is None


def test_trl_reward_functions_read_the_environments(tmp_path, monkeypatch):
    """A reward function written for TRL's GRPOTrainer that scores from the environments' state
    (``environments=``) runs unchanged and scores each rollout from its own instance."""
    (tmp_path / "trl_env.py").write_text(TRL_ENV_SOURCE + """

def calls_reward(completions, environments, **kwargs):
    return [float(env.calls) for env in environments]
""")
    review, movie, about = 80, 20, 79
    script(monkeypatch, [review, movie, about, review, movie, about, EOS])  # two calls a rollout
    r, t = rollout_of(tmp_path, f"agent.environment={tmp_path}/trl_env.py:ReviewEnv",
                      "agent.call_open=review", "agent.call_close=about",
                      "agent.result_template= user {content} assistant ",
                      f"reward.sources=[{{function: '{tmp_path}/trl_env.py:calls_reward'}}]")
    scores, _ = t.rewards(r)
    assert scores.tolist() == [2.0] * 4


def test_protocol_choice(tool_spec):
    from rlhf_ppo.tasks.tiny import build_word_tokenizer

    tok = build_word_tokenizer()  # its chat template has no tools
    assert build_agent(AgentConfig(tools=[tool_spec]), tok).protocol == "text"
    with pytest.raises(AgentError, match="chat template"):
        build_agent(AgentConfig(tools=[tool_spec], protocol="chat"), tok)


def test_protocol_choice_for_a_reset_step_environment(env_spec):
    from rlhf_ppo.tasks.tiny import build_word_tokenizer

    tok = build_word_tokenizer()  # a chat template without tools: enough for user messages
    assert build_agent(AgentConfig(environment=env_spec), tok).protocol == "chat"
    assert build_agent(AgentConfig(environment=env_spec, protocol="text"), tok).protocol == "text"
    tok.chat_template = None
    assert build_agent(AgentConfig(environment=env_spec), tok).protocol == "text"
    with pytest.raises(AgentError, match="agent.protocol: chat needs a tokenizer with a chat template"):
        build_agent(AgentConfig(environment=env_spec, protocol="chat"), tok)


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
    for metrics in history:  # EchoGame: 3 turns, 2 observations of 4 words, a positive last reward
        assert {k: v for k, v in metrics.items() if k.startswith("agent/")} == {
            "agent/turns": 3.0, "agent/tool_calls": 0.0, "agent/tool_errors": 0.0,
            "agent/tool_timeouts": 0.0, "agent/observation_tokens": 8.0, "agent/success": 1.0}


def test_length_limits_are_the_whole_response_region(tmp_path, env_spec, monkeypatch):
    """With agent.max_total_tokens the overlong penalty, the seq-mean-token-sum-norm constant and
    the overlong_buffer check measure the whole transcript against it, not max_new_tokens."""
    import rlhf_ppo.ops as ops

    overrides = ("iterations=1", "ppo.batch_size=4", "agent.protocol=text", f"agent.environment={env_spec}",
                 "agent.max_tokens_per_turn=3", "agent.max_total_tokens=20", "generation.max_new_tokens=8")
    with pytest.raises(ConfigError, match=r"ppo.loss.overlong_buffer.*at most the response length limit 20"):
        tiny_config(tmp_path, *overrides, "ppo.loss.overlong_buffer=21")
    trainer = PPOTrainer(tiny_config(tmp_path, *overrides, "ppo.loss.overlong_buffer=10",
                                     "ppo.loss.aggregation=seq-mean-token-sum-norm"))
    assert trainer.update_settings.max_response_length == 20
    seen = []
    original = ops.overlong_penalty

    def spy(lengths, max_length, buffer, penalty):
        seen.append((lengths.tolist(), max_length))
        return original(lengths, max_length, buffer, penalty)
    monkeypatch.setattr(ops, "overlong_penalty", spy)
    script(monkeypatch, [GOOD])  # three turns of 3 model tokens, two observations of 4: 17 tokens
    trainer.step()
    assert seen == [([17] * 4, 20)]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_critic_free_estimators_train_on_environment_rollouts(tmp_path, env_spec, monkeypatch, name):
    """Each critic-free estimator trains on multi-turn rollouts: no advantage on the environment's
    tokens, finite and non-zero ones on the model's (the returns-to-go over holes are checked by
    hand in tests/test_multiturn.py)."""
    from rlhf_ppo import estimators

    assert set(estimators.ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                                          "reinforce_pp_baseline"}  # a new one joins this test
    trainer = PPOTrainer(tiny_config(tmp_path, "iterations=1", "ppo.batch_size=4",
                                     "ppo.samples_per_prompt=2", f"ppo.advantage_estimator={name}",
                                     "agent.protocol=text", f"agent.environment={env_spec}",
                                     "agent.max_tokens_per_turn=3", "agent.max_total_tokens=20"))
    calls = record_updates(trainer)
    metrics = trainer.train()[-1]
    (batch, _), = calls
    P = batch.prompt_length
    holes = batch.attention_mask[:, P:].bool() & ~batch.response_mask.bool()
    assert holes.sum(1).tolist() == [8] * 4
    assert (batch.advantages[holes] == 0).all()
    trained = batch.advantages[batch.response_mask.bool()]
    assert torch.isfinite(trained).all() and trained.abs().sum() > 0
    assert metrics["agent/turns"] == 3.0


def test_greedy_samples_are_multi_turn_episodes(tmp_path, env_spec):
    import json

    trainer = PPOTrainer(tiny_config(tmp_path, "iterations=1", "ppo.batch_size=4", "sample_every=1",
                                     "sample_prompts=2", "agent.protocol=text",
                                     f"agent.environment={env_spec}", "agent.max_tokens_per_turn=3",
                                     "agent.max_total_tokens=20"))
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 0, 1, 1]  # at the start and after iteration 1
    for row in rows:  # EchoGame: 3 turns of at most 3 tokens, its answer between them, rewards 1+2+3
        assert row["turns"] == 3 and row["observation_tokens"] == 8 and row["success"] == 1
        assert row["environment_reward"] == 6.0
        assert row["response"].count("user : the movie") == 2


VARIABLE_ENV = '''
class Game:
    """1 to 3 turns, by what the model wrote; reward = words of the turn / 3."""

    def reset(self, row):
        self.turns = 0

    def step(self, text):
        self.turns += 1
        return "user : the movie", len(text.split()) / 3, self.turns >= 1 + len(text.split()) % 3
'''


CLOSING_ENV = '''
CLOSED = []


class Game:
    """Never ends by itself; records each close with the turns it took."""

    def reset(self, row):
        self.turns = 0

    def step(self, text):
        self.turns += 1
        return "user : the movie", None, False

    async def close(self):
        CLOSED.append(self.turns)
'''


@pytest.mark.parametrize("limit, turns", [("agent.max_turns=2", 2), ("agent.max_total_tokens=9", 2)])
def test_every_episode_is_closed_once_however_it_ended(tmp_path, monkeypatch, limit, turns):
    import sys

    (tmp_path / "closing.py").write_text(CLOSING_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("closing", None)
    script(monkeypatch, [GOOD])  # 3 tokens a turn; 9 tokens: turn, observation (4), 2 of a turn
    r, _ = rollout_of(tmp_path, "agent.environment=closing:Game", "agent.max_tokens_per_turn=3",
                      "agent.max_total_tokens=40", limit)
    import closing

    assert closing.CLOSED == [turns] * 4 and not r.stopped.any()


def test_resume_mid_run_of_an_agentic_run_is_exact(tmp_path):
    """As for single-turn runs (tests/test_checkpoint.py): 2 iterations, a checkpoint, 2 more on
    resume give the metrics, greedy samples and weights of 4 uninterrupted iterations, bit for bit."""
    import json

    from safetensors.torch import load_file

    (tmp_path / "game.py").write_text(VARIABLE_ENV)
    agent = ["ppo.batch_size=8", "ppo.forward.micro_batch_size=4", "agent.protocol=text",
             f"agent.environment={tmp_path / 'game.py'}:Game", "agent.max_tokens_per_turn=3",
             "agent.max_total_tokens=24", "generation.stop_token_ids=[4,5,6,7,8]",
             "ppo.kl.adaptive=true", "reward.normalize=true", "sample_every=2", "sample_prompts=2"]

    def lines(out, name):
        rows = [json.loads(x) for x in (out / name).read_text().splitlines()]
        return [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per_second"))}
                for m in rows]
    PPOTrainer(tiny_config(tmp_path / "full", "iterations=4", "save_every=2", *agent)).train()
    PPOTrainer(tiny_config(tmp_path / "part", "iterations=2", *agent)).train()
    resumed = PPOTrainer(tiny_config(tmp_path / "part", "iterations=4", "resume_from=latest", *agent))
    assert resumed.iteration == 2
    resumed.train()
    full, part = lines(tmp_path / "full", "metrics.jsonl"), lines(tmp_path / "part", "metrics.jsonl")
    assert [m["iteration"] for m in part] == [1, 2, 3, 4] and full == part
    assert {m["agent/turns"] for m in full} != {3.0}  # episodes of several lengths
    assert lines(tmp_path / "full", "samples.jsonl") == lines(tmp_path / "part", "samples.jsonl")
    wa, wb = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("full", "part"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_single_turn_config_has_no_agent(tmp_path):
    cfg = tiny_config(tmp_path)
    assert not cfg.agent.enabled and cfg.agent == AgentConfig()
    trainer = PPOTrainer(cfg)
    assert trainer.agent is None
    assert not [k for k in trainer.step() if k.startswith("agent/")]  # no agent metrics


SLOW_TOOL_SOURCE = '''
import time

def movie() -> str:
    """Gives a review of the movie, slowly."""
    time.sleep(1.0)
    return "great fun"
'''


def test_episode_counts_of_tool_calls_errors_and_timeouts(tmp_path, monkeypatch):
    from rlhf_ppo.metrics import agent_metrics

    (tmp_path / "slow.py").write_text(SLOW_TOOL_SOURCE)
    review, movie, about = 80, 20, 79
    # turn 1 calls movie (hangs past the 0.1 s timeout), turn 2 calls "good" (no such tool), turn 3 ends
    script(monkeypatch, [review, movie, about, review, GOOD, about, EOS])
    r, _ = rollout_of(tmp_path, f"agent.tools=[{tmp_path}/slow.py:movie]", "agent.call_open=review",
                      "agent.call_close=about", "agent.result_template= user {content} assistant ",
                      "agent.tool_timeout=0.1", "generation.max_new_tokens=200")
    read = r.attention_mask[:, r.prompt_length:] - r.response_mask  # observations: read, not sampled
    assert r.episode_stats["turns"].tolist() == [3] * 4
    assert r.episode_stats["tool_calls"].tolist() == [2] * 4
    assert r.episode_stats["tool_errors"].tolist() == [2] * 4
    assert r.episode_stats["tool_timeouts"].tolist() == [1] * 4
    assert r.episode_stats["observation_tokens"].tolist() == read.sum(1).tolist()
    assert (read.sum(1) > 0).all() and "success" not in r.episode_stats  # tools, no environment
    metrics = agent_metrics(r.subset([0, 2]))
    assert sorted(metrics) == ["agent/observation_tokens", "agent/tool_calls", "agent/tool_errors",
                               "agent/tool_timeouts", "agent/turns"]
    assert metrics["agent/tool_timeouts"].tolist() == [1.0, 1.0]
    from rlhf_ppo.rollout import Rollout
    both = Rollout.concat([r.subset([0]), r.subset([1, 2])], pad_id=0)  # dynamic sampling's join
    assert both.episode_stats["tool_calls"].tolist() == [2] * 3


def test_config_and_agent_errors(tmp_path, env_spec, tool_spec):
    with pytest.raises(ConfigError, match="agent.max_turns"):
        config_from_dict({"agent": {"max_turns": 0}})
    with pytest.raises(ConfigError, match="generation.backend"):
        config_from_dict({"agent": {"tools": [tool_spec]}, "generation": {"backend": "transformers"}})
    with pytest.raises(AgentError, match="reset/step environment"):
        build_agent(AgentConfig(tools=[tool_spec], environment=env_spec), None)


# --- the chat protocol: a Qwen2.5 (Hermes) chat template over a byte-level vocabulary ------------

def chat_tokenizer():
    """Bytes as tokens (no merges: every text tokenizes the same alone as inside a longer text)
    plus Qwen's special tokens, carrying Qwen2.5's chat template; nothing is downloaded."""
    from test_agents import QWEN2_5_TEMPLATE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bytes_only = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    bytes_only.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bytes_only.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bytes_only, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = QWEN2_5_TEMPLATE
    return tok


QUESTION = [{"role": "user", "content": "How is the movie?"}]
CALL = '<tool_call>\n{"name": "movie", "arguments": {}}\n</tool_call>'


def chat_setup(agent_cfg: AgentConfig, rows: int = 2):
    """A tiny random Llama over the byte vocabulary, the agent, and ``rows`` copies of QUESTION
    rendered as data.load_prompts renders them (with the agent's tool schemas)."""
    from transformers import LlamaForCausalLM

    from rlhf_ppo.data import Prompt, render_prompt
    from rlhf_ppo.tasks.tiny import tiny_llama_config

    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok)))
    agent = build_agent(agent_cfg, tok)
    text, messages = render_prompt(QUESTION, tok, 0, "prompt", tools=agent.schemas)
    prompts = [Prompt(text, tok(text, add_special_tokens=False)["input_ids"], messages, {"label": i})
               for i in range(rows)]
    return model, tok, agent, prompts


def chat_ids(tok, messages: list[dict], tools) -> list[int]:
    """The template's rendering of the whole conversation, without the "\\n" Qwen's template
    writes after the last <|im_end|> (the model stops at <|im_end|>)."""
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False).removesuffix("\n")
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_protocol_renders_tools_and_results_with_the_template(tool_spec, monkeypatch):
    model, tok, agent, prompts = chat_setup(AgentConfig(tools=[tool_spec], protocol="auto"))
    assert agent.protocol == "hermes" and [s["function"]["name"] for s in agent.schemas] == ["movie"]
    assert '"name": "movie"' in prompts[0].text and "Gives a review of the movie." in prompts[0].text
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    script(monkeypatch, enc(CALL) + [eos] + enc("Great.") + [eos])
    r = generate_multiturn(model, prompts, tok, GenerationConfig(max_new_tokens=200), agent, record=True)
    conversation = QUESTION + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "movie", "arguments": {}}}]},
        {"role": "tool", "name": "movie", "content": "great fun"},
        {"role": "assistant", "content": "Great."}]
    whole = chat_ids(tok, conversation, agent.schemas)
    for b in range(2):
        assert r.input_ids[b].tolist() == whole  # no padding: both rows are the same length
    suffix = enc("\n<|im_start|>user\n<tool_response>\ngreat fun\n</tool_response><|im_end|>\n"
                 "<|im_start|>assistant\n")
    turn1, turn2 = len(enc(CALL)) + 1, len(enc("Great.")) + 1
    assert r.response_mask[0].tolist() == [1] * turn1 + [0] * len(suffix) + [1] * turn2
    assert r.response_ids[0, turn1:turn1 + len(suffix)].tolist() == suffix
    assert (r.logprobs[r.response_mask == 0] == 0).all() and (r.logprobs[r.response_mask == 1] < 0).all()
    assert r.stopped.all() and r.turn_rewards is None
    # a TRL-style reward function gets the conversation as messages, as TRL's tool loop builds it
    assert r.completion_messages == [conversation[len(QUESTION):]] * 2 and r.environments is None
    from rlhf_ppo.config import RewardSource
    from rlhf_ppo.rewards import FunctionReward

    fn = FunctionReward(RewardSource(function="rlhf_ppo.verifiable:exact_match"), "reward.sources[0]")
    fn.style, fn.accepts = "trl", None  # only the arguments are read here
    _, kwargs = fn.arguments(r)
    assert kwargs["completions"] == r.completion_messages
    assert kwargs["completions"] is not r.completion_messages  # a copy: a function may change it


def test_chat_protocol_environment_observations_are_user_messages(env_spec, monkeypatch):
    model, tok, agent, prompts = chat_setup(AgentConfig(environment=env_spec, protocol="chat"))
    assert agent.schemas is None  # a reset/step environment offers no tools
    eos = tok.eos_token_id
    ok = tok("ok", add_special_tokens=False)["input_ids"]
    script(monkeypatch, [*ok, eos] * 3)  # every turn: "ok<|im_end|>"
    r = generate_multiturn(model, prompts, tok, GenerationConfig(max_new_tokens=200), agent)
    said = {"role": "assistant", "content": "ok"}
    heard = {"role": "user", "content": "user : the movie"}
    assert r.input_ids[0].tolist() == chat_ids(tok, QUESTION + [said, heard, said, heard, said], None)
    obs = len(tok("\n<|im_start|>user\nuser : the movie<|im_end|>\n<|im_start|>assistant\n",
                  add_special_tokens=False)["input_ids"])
    assert r.response_mask[0].tolist() == ([1] * 3 + [0] * obs) * 2 + [1] * 3
    assert r.turn_rewards[0].nonzero().squeeze(1).tolist() == [2, 5 + obs, 8 + 2 * obs]


def test_chat_protocol_trl_environment_reset_text_joins_the_last_message(tmp_path, monkeypatch):
    (tmp_path / "trl_env.py").write_text(TRL_ENV_SOURCE)
    model, tok, agent, prompts = chat_setup(AgentConfig(environment=f"{tmp_path}/trl_env.py:ReviewEnv"))
    assert [s["function"]["name"] for s in agent.schemas] == ["movie"]  # the environment's method
    eos = tok.eos_token_id
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    script(monkeypatch, enc(CALL) + [eos] + enc("Fun.") + [eos])
    r = generate_multiturn(model, prompts, tok, GenerationConfig(max_new_tokens=200), agent)
    asked = [{"role": "user", "content": "How is the movie?user :"}]  # reset's text, as TRL
    prompt = tok.apply_chat_template(asked, tools=agent.schemas, tokenize=False, add_generation_prompt=True)
    assert r.prompts[0].text == prompt and r.prompts[0].messages == asked
    assert r.input_ids[0, :r.prompt_length].tolist() == enc(prompt)
    assert tok.decode(r.response_ids[0]).endswith(
        "</tool_response><|im_end|>\n<|im_start|>assistant\nFun.<|im_end|>")
    assert r.turn_rewards[0].tolist()[-1] == 0.5  # get_reward(): one call


# --- the KV cache carried from turn to turn ------------------------------------------------------

def count_forward_tokens(model) -> list[int]:
    """A list that receives the number of input tokens (padding included) of every backbone pass."""
    from rlhf_ppo.lm import transformer

    counts: list[int] = []
    transformer(model).base_model.register_forward_pre_hook(
        lambda module, args, kwargs: counts.append(kwargs["input_ids"].numel()), with_kwargs=True)
    return counts


def both_ways(trainer, rows, cfg):
    """The rollout with the carried cache and with a fresh prefill per turn, from one seed."""
    out = []
    for carry in (True, False):
        torch.manual_seed(1)
        out.append(generate_multiturn(trainer.unwrapped.policy, rows, trainer.tokenizer, cfg, trainer.agent,
                                      record=True, carry_cache=carry))
    return out


@pytest.mark.parametrize("batch_size, sync_every", [(None, None), (3, None), (None, 4)])
def test_carried_cache_samples_what_a_fresh_prefill_samples(tmp_path, env_spec, batch_size, sync_every,
                                                            monkeypatch):
    """Real sampling: turns end at a stop token (a third of the vocabulary) or after 4 tokens, rows
    run out of their 18-token budget at different turns (the active rows and the chunks change),
    observations sit between padding. ``sync_every=4`` (as on an accelerator): rows that stopped
    run on for up to 3 steps, their cache entries of tokens after the stop must be cut."""
    if sync_every is not None:
        import functools

        from rlhf_ppo.rollout import sample_native
        monkeypatch.setattr("rlhf_ppo.agent_rollout.sample_native",
                            functools.partial(sample_native, sync_every=sync_every))
    _, trainer = rollout_of(tmp_path, f"agent.environment={env_spec}", "agent.max_tokens_per_turn=4",
                            "agent.max_total_tokens=18", "agent.max_turns=4")
    import dataclasses
    cfg = dataclasses.replace(trainer.cfg.generation, batch_size=batch_size,
                              stop_token_ids=list(range(4, len(trainer.tokenizer), 3)))
    carried, fresh = both_ways(trainer, trainer.sampler.prompts[:4], cfg)
    assert torch.equal(carried.input_ids, fresh.input_ids)
    assert torch.equal(carried.response_mask, fresh.response_mask)
    assert torch.allclose(carried.logprobs, fresh.logprobs, atol=1e-5, rtol=0)
    assert torch.allclose(carried.entropy, fresh.entropy, atol=1e-5, rtol=0)
    lengths = carried.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # the rows did differ


def test_carried_cache_prefills_only_the_appended_tokens(tmp_path, env_spec, monkeypatch):
    script(monkeypatch, [GOOD])  # 3 turns of 3 tokens (2 fed back each) and 2 observations of 4
    _, trainer = rollout_of(tmp_path, f"agent.environment={env_spec}", "agent.max_tokens_per_turn=3",
                            "agent.max_total_tokens=40")
    counts = count_forward_tokens(trainer.unwrapped.policy)
    carried, fresh = both_ways(trainer, trainer.sampler.prompts[:4], trainer.cfg.generation)
    B, P = 4, carried.prompt_length
    assert torch.allclose(carried.logprobs, fresh.logprobs, atol=1e-5, rtol=0)
    per_turn = len(counts) // 2
    carried_tokens, fresh_tokens = sum(counts[:per_turn]), sum(counts[per_turn:])
    # carried: the prompt, then per turn the last token of the previous turn and the observation
    # (1 + 4), each turn followed by 2 single-token decoding steps
    assert carried_tokens == B * (P + 2 + (5 + 2) + (5 + 2))
    # fresh: turn k prefills the whole history (P, P + 7, P + 14 wide), then 2 decoding steps
    assert fresh_tokens == B * ((P + 2) + (P + 7 + 2) + (P + 14 + 2))
