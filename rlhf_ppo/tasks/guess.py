"""A number-guessing game, the multi-turn environment of ``configs/smollm2_agent.yaml``: the model
guesses a secret whole number from 1 to 10, and the environment answers every guess with
"higher" or "lower" until it is found or the turn limit ends the episode (docs/agents.md).

:class:`GuessNumber` follows the reset/step protocol (:class:`~rlhf_ppo.agents.MultiTurnEnvironment`):
``reset(row)`` reads the row's ``secret`` column; ``step(text)`` reads the first whole number of
the model's turn and returns ``(observation, reward, done)``. With a chat template the observations
are appended as ``role: user`` messages, so the rollout is the template's rendering of the whole
game::

    <|im_start|>user\\nI am thinking of a whole number from 1 to 10. ...<|im_end|>\\n<|im_start|>assistant\\n
    5<|im_end|>                                                   <- the model's turn (trained)
    \\n<|im_start|>user\\nNo, my number is higher than 5.<|im_end|>\\n<|im_start|>assistant\\n   <- read only
    8<|im_end|>                                                   <- the model's turn (trained)

``python -m rlhf_ppo.tasks.guess [PATH]`` writes the config's prompts (:func:`prompt_rows`),
``configs/data/smollm2_guess.jsonl`` by default.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

LOW, HIGH = 1, 10
"""the secret is a whole number in [LOW, HIGH]"""
PROMPT = (f"Let's play a game. I am thinking of a whole number from {LOW} to {HIGH}. Guess it: "
          "reply with one number only. After each guess I will tell you if my number is higher or lower.")
DATA = Path(__file__).resolve().parents[2] / "configs" / "data" / "smollm2_guess.jsonl"
"""where ``python -m rlhf_ppo.tasks.guess`` writes the prompts by default"""


class GuessNumber:
    """One game. Rewards: 1.0 on the turn that names the secret (the episode ends there), 0.0 for a
    wrong guess or a turn without a number (the episode goes on: the turn limit ends it)."""

    def reset(self, row: dict[str, Any]) -> None:
        """Start a game for the dataset ``row`` (its ``secret`` column); the prompt already asks
        for the first guess, so there is no first observation."""
        self.secret = int(row["secret"])

    def step(self, text: str) -> tuple[str, float, bool]:
        """``(observation, reward, done)`` for the model's turn ``text``: only its first whole
        number counts as the guess."""
        found = re.search(r"-?\d+", text)
        if found is None:
            return f"Please reply with one number from {LOW} to {HIGH}.", 0.0, False
        guess = int(found.group())
        if guess == self.secret:
            return "Correct!", 1.0, True
        side = "higher" if self.secret > guess else "lower"
        return f"No, my number is {side} than {guess}.", 0.0, False


def prompt_rows(n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` dataset rows: the game's instructions as a chat message and a ``secret`` drawn
    uniformly from [LOW, HIGH] with ``random.Random(seed)``, so the file is the same every time."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": PROMPT}], "secret": rng.randint(LOW, HIGH)}
            for _ in range(n)]


def write_prompts(path: str | Path = DATA, n: int = 32, seed: int = 0) -> Path:
    """Write :func:`prompt_rows` as JSONL to ``path``; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(n, seed)))
    return path


if __name__ == "__main__":
    print(write_prompts(*sys.argv[1:2]))
