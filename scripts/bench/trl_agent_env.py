"""Agent code written for TRL 1.12's ``GRPOTrainer``, run unchanged by both trainers in
``scripts/bench/trl_agent_compat.py``. Nothing here imports TRL or rlhf_ppo.

- ``Env``: an ``environment_factory`` class. ``reset(**row)`` gets every column of the dataset row
  (``prompt`` and ``target``) and returns text that the trainer appends to the prompt's last
  message; its public method ``add`` is a tool; ``get_reward()`` scores the episode.
- ``multiply``: a standalone tool (``tools=[multiply]`` in TRL, ``agent.tools`` in rlhf_ppo).
- ``reward``: a reward function in TRL's signature that scores from the environments' state.

In TRL: ``GRPOTrainer(..., environment_factory=Env, tools=[multiply], reward_funcs=[reward])``.
In rlhf_ppo: ``agent.environment=scripts/bench/trl_agent_env.py:Env``,
``agent.tools=[scripts/bench/trl_agent_env.py:multiply]``,
``reward.sources=[{function: scripts/bench/trl_agent_env.py:reward}]``.
"""

from __future__ import annotations


class Env:
    """A running total that the model moves with the ``add`` tool; the episode earns 1.0 when
    the total ends at the row's ``target``. TRL keeps instances in a pool and calls ``reset``
    again for each new rollout, so ``reset`` sets every field."""

    def reset(self, target: int, **kwargs) -> str:
        self.target, self.total, self.calls = int(target), 0, []
        return f" Reach a total of {self.target} with the add tool."

    def add(self, a: int, b: int) -> int:
        """
        Adds two whole numbers to the running total.

        Args:
            a: The first number.
            b: The second number.

        Returns:
            The running total after the addition.
        """
        self.calls.append(("add", a, b))
        self.total += a + b
        return self.total

    def get_reward(self) -> float:
        return float(self.total == self.target)


def multiply(a: int, b: int) -> int:
    """
    Multiplies two whole numbers.

    Args:
        a: The first number.
        b: The second number.

    Returns:
        The product a * b.
    """
    return a * b


def reward(completions, environments, **kwargs) -> list[float]:
    """0.5 per call the episode made to its environment's tool (TRL passes ``environments``, one
    instance per completion, after its episode). Prints what it was given, so that a run shows
    that the environments reached it and what ``completions`` look like."""
    scores = [0.5 * len(env.calls) for env in environments]
    first = completions[0]
    shape = ([f"{m['role']}{'+' + str(len(m['tool_calls'])) + ' calls' if m.get('tool_calls') else ''}"
              for m in first] if isinstance(first, list) else type(first).__name__)
    print(f"[trl_agent_env.reward] {len(completions)} completions; environments: "
          f"{[type(e).__name__ for e in environments]}; env.calls of the first: "
          f"{environments[0].calls}; totals {[e.total for e in environments]}, targets "
          f"{[e.target for e in environments]}; first completion's messages: {shape}; "
          f"kwargs: {sorted(kwargs)} -> {scores}", flush=True)
    return scores
