"""The guessing game of configs/smollm2_agent.yaml (rlhf_ppo/tasks/guess.py): the environment's
answers, the shipped prompts, and the config. The run itself needs SmolLM2 (tests/test_slow.py)."""

import json
from pathlib import Path

from rlhf_ppo import load_config
from rlhf_ppo.agents import load_tool
from rlhf_ppo.tasks import guess

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_agent.yaml"


def test_the_game_answers_the_first_number_of_each_turn():
    env = guess.GuessNumber()
    assert env.reset({"secret": 7, "prompt": []}) is None
    assert env.step("5") == ("No, my number is higher than 5.", 0.0, False)
    assert env.step("I guess 9, or maybe 3") == ("No, my number is lower than 9.", 0.0, False)
    assert env.step("I have no idea.") == ("Please reply with one number from 1 to 10.", 0.0, False)
    assert env.step("It is 7!") == ("Correct!", 1.0, True)


def test_the_shipped_prompts_are_the_generated_ones():
    rows = [json.loads(line) for line in guess.DATA.read_text().splitlines()]
    assert rows == guess.prompt_rows()
    assert {r["secret"] for r in rows} <= set(range(1, 11)) and len({r["secret"] for r in rows}) > 5
    assert rows[0]["messages"] == [{"role": "user", "content": guess.PROMPT}]


def test_the_config_loads_and_names_a_reset_step_environment():
    cfg = load_config(CONFIG, ["output_dir=/tmp/unused"])
    assert cfg.agent.enabled and cfg.agent.protocol == "auto" and cfg.generation.backend == "native"
    assert (ROOT / cfg.data.path).resolve() == guess.DATA
    env = load_tool(cfg.agent.environment, "agent.environment")
    assert env is guess.GuessNumber and callable(getattr(env, "step", None))  # reset/step: chat protocol
