"""A built-in offline agentic task: the reasoning task's arithmetic (:mod:`.reasoning`) with a
calculator tool that the model may call through the text protocol (docs/agents.md).

The problems, held-out split, word vocabulary and noisy worked solutions are the reasoning
task's; the vocabulary gains four words for the tool (:data:`TOOL_WORDS`), set as the task's
``agent.call_open`` / ``agent.call_close`` / ``agent.result_template``. A demonstration that uses
the tool (a ``tool_share`` of them) writes every step as a call whose result is appended by the
tool, so its steps are exact; the others are the reasoning task's noisy chains::

    prompt:    q : 7 + 6 - 4 =
    with tool: 7 + 6 = call calc end result 13 . 13 - 4 = call calc end result 9 . #### 9
               ^ model ^^^^^^^^^^^^^ ^ tool ^^ ^ model ^^^^^^^^^^^^^^ ^ tool ^ ^ model ^^
    without:   7 + 6 = 13 . 13 - 4 = 9 . #### 9        (each step off by 1-2 w.p. ``noise``)

In a rollout the model's turn stops at ``end``; the tool (:class:`Calculator`, a TRL-style
``environment_factory`` class whose public method ``calc`` is the tool) appends ``result N``,
read but never trained, and the model writes its next turn. ``calc`` takes no arguments (the word
vocabulary cannot spell JSON): the k-th call of an episode returns the exact value of the
problem's first k+1 operands (``a op b``, then ``a op b op c``), the sub-expression the step it
ends computes. SFT (a prompt/response dataset) trains on the whole response, the tool's results
included; PPO trains on the model's tokens only.

``--no-tool`` runs the same pipeline without the ``agent`` section on the same demonstrations
with each call replaced by the worked step (``7 + 6 = 13 .``, exact as the tool's value was), so
the two differ only in the tool. ``python -m rlhf_ppo.tasks.calculator`` runs data, base model,
SFT, PPO and the evaluation (accuracy and tool calls per episode of the PPO policy vs the SFT
model, both with the tool) through the stage runner (:mod:`.stages`); docs/agents.md has the
figures.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, parse_override
from ..evaluate import EvalConfig, run_evaluate
from ..progress import setup_cli_logging
from ..sft import SFTConfig, run_sft
from ..trainer import PPOTrainer
from . import reasoning as R
from .quickstart import ppo_summary
from .stages import Stage, command_stage, run_pipeline
from .tiny import build_tiny_model

# --------------------------------------------------------------------------- the tool

CALL_OPEN, TOOL_NAME, CALL_CLOSE, RESULT = "call", "calc", "end", "result"
TOOL_WORDS = [CALL_OPEN, TOOL_NAME, CALL_CLOSE, RESULT]
"""the words the tool adds to the reasoning vocabulary: `call calc end` is a call, `result N` its answer"""
RESULT_TEMPLATE = f" {RESULT} {{content}} "
CALL = f"{CALL_OPEN} {TOOL_NAME} {CALL_CLOSE}"


def calculator_vocab() -> list[str]:
    """The reasoning task's vocabulary, then :data:`TOOL_WORDS`."""
    return R.reasoning_vocab() + TOOL_WORDS


class Calculator:
    """The tool, as a TRL ``environment_factory`` class (one instance per rollout): ``reset``
    reads the row's problem, ``calc`` (its one public method, so its one tool) answers."""

    def reset(self, prompt: str, **kwargs: Any) -> None:
        self.problem = R.parse_prompt(prompt)
        self.calls = 0

    def calc(self) -> int:
        """
        The exact value of the problem up to its next operator: the first call gives a op b, the
        second (a op b) op c; later calls repeat the whole problem's value.
        """
        self.calls += 1
        return R.solve(self.problem[: min(2 * self.calls + 1, len(self.problem))])


def agent_section() -> dict[str, Any]:
    """The PPO / evaluate ``agent`` section of the task: the calculator over the text protocol,
    at most one turn per step and one for the answer."""
    return dict(environment="rlhf_ppo.tasks.calculator:Calculator", protocol="text",
                max_turns=TASK["operands"], call_open=CALL_OPEN, call_close=CALL_CLOSE,
                result_template=RESULT_TEMPLATE)


# --------------------------------------------------------------------------- the data

TASK = dict(seed=0, operands=3, n_sft=20000, n_test=200, noise=0.2, tool_share=0.5)
"""The task :func:`write_task` writes by default (``tool`` is set by the pipeline)."""


def tool_form(response: str) -> str:
    """A worked solution with every step's result replaced by a call and its result:
    ``7 + 6 = 13 .`` -> ``7 + 6 = call calc end result 13 .``."""
    return re.sub(r"= (\d+) \.", lambda m: f"= {CALL} {RESULT} {m.group(1)} .", response)


def demonstration(problem: tuple, rng: random.Random, noise: float, tool_share: float,
                  tool: bool) -> str:
    """One SFT response: with probability ``tool_share`` the exact chain, every step through the
    tool (``tool``) or worked (not ``tool``, the same text less the calls); otherwise the
    reasoning task's noisy chain. The random draws do not depend on ``tool``."""
    if rng.random() < tool_share:
        exact, _ = R.chain(problem)
        return tool_form(exact) if tool else exact
    return R.chain(problem, rng, noise)[0]


def write_task(folder: str | Path, seed: int = 0, operands: int = 3, n_sft: int = 4000,
               n_test: int = 200, noise: float = 0.2, tool_share: float = 0.5,
               tool: bool = True) -> dict[str, str]:
    """Write the task into ``folder``: the reasoning task's ``prompts_train.jsonl`` /
    ``prompts_test.jsonl`` (:func:`reasoning.write_task`, the same held-out split for the same
    ``seed``) and ``sft.jsonl``, ``n_sft`` :func:`demonstration` of training problems. Returns the
    paths by name; deterministic."""
    paths = R.write_task(folder, seed=seed, operands=operands, n_sft=0, n_test=n_test)
    train = [R.parse_prompt(json.loads(line)["prompt"]) for line in open(paths["prompts_train"])]
    rng = random.Random(f"calculator-{seed}")
    with open(paths["sft"], "w") as f:
        for _ in range(n_sft):
            p = rng.choice(train)
            response = demonstration(p, rng, noise, tool_share, tool)
            f.write(json.dumps({"prompt": R.prompt_text(p), "response": response}) + "\n")
    return paths


# --------------------------------------------------------------------------- the pipeline

MAX_NEW_TOKENS = 28
"""the response region: a 3-operand solution with two calls is 22 tokens and EOS"""


def build_tokenizer():
    """The reasoning task's word tokenizer over :func:`calculator_vocab` (spaces between words)."""
    from tokenizers import decoders

    from .tiny import build_word_tokenizer

    tok = build_word_tokenizer(calculator_vocab())
    tok.backend_tokenizer.decoder = decoders.WordPiece(prefix="\x00\x00", cleanup=False)
    return tok


def stage_configs(out: Path, data: dict, tool: bool = True) -> dict[str, dict]:
    """The reasoning task's sft / ppo / eval configs (:func:`reasoning.stage_configs`) for the
    longer responses, with the calculator's ``agent`` section in ppo and eval when ``tool``."""
    configs = R.stage_configs(out, data)
    del configs["eval_greedy"]
    configs["sft"]["data"]["max_length"] = 40
    for name in ("ppo", "eval"):
        configs[name]["generation"]["max_new_tokens"] = MAX_NEW_TOKENS
        if tool:
            configs[name]["agent"] = agent_section()
    configs["ppo"]["sample_every"] = 0  # greedy samples are single-turn (docs/agents.md)
    return configs


def calculator_stages(out: Path, tool: bool = True,
                      stage_overrides: dict[str, dict[str, Any]] | None = None) -> list[Stage]:
    """The task's stages under ``out``: data, base, sft, ppo, eval (``stage_overrides`` as in
    :func:`reasoning.run_reasoning`, by stage name; ``data`` takes :func:`write_task`'s
    arguments)."""
    overrides = dict(stage_overrides or {})
    task = dict(TASK, tool=tool, **overrides.pop("data", {}))
    configs = stage_configs(out, R.task_paths(out / "data"), tool)
    R.apply_overrides(configs, overrides)

    def base(cfg: dict[str, Any]) -> dict[str, Any]:
        shutil.rmtree(out / "base", ignore_errors=True)
        build_tiny_model(out / "base", seed=cfg["seed"], tokenizer=build_tokenizer(), **cfg["model"])
        return {"vocab_size": len(calculator_vocab()), **cfg["model"]}

    return [
        Stage("data", task, lambda cfg: write_task(out / "data", **cfg)),
        Stage("base", {"seed": 0, "model": R.MODEL, "vocab": calculator_vocab()}, base),
        command_stage("sft", configs["sft"], SFTConfig, run_sft),
        command_stage("ppo", configs["ppo"], Config, lambda cfg: ppo_summary(PPOTrainer(cfg).train())),
        command_stage("eval", configs["eval"], EvalConfig, run_evaluate),
    ]


def run_calculator(output_dir: str | Path = "runs/calculator", fresh: bool = False, tool: bool = True,
                   stage_overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Data, base model, SFT, PPO and the evaluation under ``output_dir``, with the calculator
    (``tool``) or without it; returns every stage's summary. Stages are reused as in
    :func:`reasoning.run_reasoning` (a changed PPO seed reruns only ppo and eval)."""
    out = Path(output_dir)
    return run_pipeline(out, calculator_stages(out, tool, stage_overrides), fresh, "calculator",
                        summary_text)


def summary_text(out: Path, s: dict[str, dict], seconds: float) -> str:
    """The lines :func:`run_calculator` prints at the end."""
    ev = s["eval"]

    def acc(side: str) -> str:
        a = ev[side]["accuracy"]
        return f"{a['mean']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"

    def calls(side: str) -> str:
        agent = ev[side].get("agent")
        return f"{agent['tool_calls']['mean']:.2f}" if agent else "-"

    return "\n".join([
        f"calculator done in {seconds:.0f} s ({out})",
        R.ppo_line(s["ppo"]),
        f"  test accuracy (T=1): sft {acc('reference')} -> ppo {acc('policy')}",
        f"  tool calls per episode: sft {calls('reference')} -> ppo {calls('policy')}",
    ])


def main(argv: list[str] | None = None) -> int:
    """``python -m rlhf_ppo.tasks.calculator [--output-dir DIR] [--fresh] [--no-tool] [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="python -m rlhf_ppo.tasks.calculator",
                                     description="the built-in calculator task: SFT on noisy worked "
                                     "solutions that use a calculator tool half the time, PPO with "
                                     "the tool on the correctness reward, held-out accuracy")
    parser.add_argument("--output-dir", default="runs/calculator")
    parser.add_argument("--fresh", action="store_true", help="rerun every stage")
    parser.add_argument("--no-tool", action="store_true",
                        help="no agent section; the demonstrations' calls become worked steps")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides of the PPO stage's config, values parsed as YAML")
    args = parser.parse_args(argv)
    setup_cli_logging()
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    run_calculator(args.output_dir, fresh=args.fresh, tool=not args.no_tool,
                   stage_overrides={"ppo": overrides})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
