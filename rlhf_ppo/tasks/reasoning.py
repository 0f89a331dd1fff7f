"""A built-in offline reasoning task: multi-step arithmetic with a chain of thought, a checked
answer, and PPO on the 0/1 correctness reward.

The package writes the problems itself (deterministic from a seed), so the whole run is offline,
like the quickstart (:mod:`rlhf_ppo.tasks.quickstart`)::

    prompt:   q : 7 + 6 - 4 =
    response: 7 + 6 = 13 . 13 - 4 = 9 . #### 9

Operands are 1..9, every intermediate result and answer is in 0..27, and every number is one
word of a word-level tokenizer, so the model must learn the addition and subtraction tables from
data. The SFT demonstrations are *noisy*: each step's result is off by 1 or 2 with probability
``noise``, and the chain (and the final ``#### n``) carries the slip on, as a careless
demonstrator would. A model trained on them (briefly) imitates the slips, so sampled at
temperature 1 it is right only part of the time, though the right answer is usually its most
likely one; PPO with the correctness reward (``rlhf_ppo.verifiable:math_answer``, also
:func:`correct`) then removes most of the slips.

:func:`run_reasoning` runs the pipeline (data, base model, SFT, PPO, evaluation with accuracy
and pass@k against the SFT model, sampled and greedy) under one folder, through the stage runner
(:mod:`.stages`); ``python -m rlhf_ppo.tasks.reasoning`` (or the older ``python -m
rlhf_ppo.reasoning``) does it from the command line. Answers are checked by
:mod:`rlhf_ppo.verifiable` (``math_answer``); pass@k is :func:`rlhf_ppo.ops.pass_at_k`.
docs/reasoning.md has the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, parse_override, set_overrides
from ..evaluate import EvalConfig, run_evaluate
from ..ops import pass_at_k  # noqa: F401  (re-exported: the unbiased pass@k estimator)
from ..progress import setup_cli_logging
from ..sft import SFTConfig, run_sft
from ..trainer import PPOTrainer
from ..verifiable import answers_match, math_answer
from ..verifiable import extract_answer as extract
from .quickstart import ppo_summary
from .stages import Stage, command_stage, run_pipeline
from .tiny import SPECIAL_TOKENS, build_tiny_model, build_word_tokenizer

# --------------------------------------------------------------------------- the task

MAX_OPERAND = 9
"""operands are 1..MAX_OPERAND"""
MAX_NUMBER = 3 * MAX_OPERAND
"""the largest number a problem can hold (every number 0..MAX_NUMBER is one token)"""
WORDS = ["q", ":", "+", "-", "=", ".", "####"]
PROMPT = "q : {expr} ="
STEP = "{a} {op} {b} = {c} ."


def reasoning_vocab() -> list[str]:
    """Every word of the task after the special tokens: the markup, then the numbers."""
    return SPECIAL_TOKENS + WORDS + [str(i) for i in range(MAX_NUMBER + 1)]


def apply(a: int, op: str, b: int) -> int:
    """``a op b`` for ``op`` in ``+`` / ``-``."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unknown operator {op!r}")


def all_problems(operands: int = 3) -> list[tuple[int, ...] | tuple]:
    """Every problem ``(a, op, b, op, c, ...)`` with ``operands`` operands in 1..MAX_OPERAND whose
    intermediate results and answer are all in 0..MAX_NUMBER, in a fixed order."""
    problems: list[tuple] = [(a,) for a in range(1, MAX_OPERAND + 1)]
    for _ in range(operands - 1):
        grown = []
        for p in problems:
            value = solve(p)
            for op in ("+", "-"):
                for b in range(1, MAX_OPERAND + 1):
                    if 0 <= apply(value, op, b) <= MAX_NUMBER:
                        grown.append(p + (op, b))
        problems = grown
    return problems


def solve(problem: tuple) -> int:
    """The value of ``(a, op, b, op, c, ...)`` evaluated left to right."""
    value = problem[0]
    for i in range(1, len(problem), 2):
        value = apply(value, problem[i], problem[i + 1])
    return value


def _in_range(problem: tuple) -> bool:
    """Every intermediate result of ``problem`` (and its start) is in 0..MAX_NUMBER."""
    value = problem[0]
    if not 0 <= value <= MAX_NUMBER:
        return False
    for i in range(1, len(problem), 2):
        value = apply(value, problem[i], problem[i + 1])
        if not 0 <= value <= MAX_NUMBER:
            return False
    return True


def prompt_text(problem: tuple) -> str:
    """``q : 7 + 6 - 4 =``."""
    return PROMPT.format(expr=" ".join(str(x) for x in problem))


def parse_prompt(prompt: str) -> tuple:
    """The problem tuple of a :func:`prompt_text` (inverse of it)."""
    words = prompt.split()
    if words[:2] != ["q", ":"] or words[-1] != "=":
        raise ValueError(f"not a task prompt: {prompt!r}")
    return tuple(w if w in ("+", "-") else int(w) for w in words[2:-1])


def chain(problem: tuple, rng: random.Random | None = None, noise: float = 0.0
          ) -> tuple[str, int]:
    """The worked solution of ``problem`` and its final answer: one ``a op b = c .`` step per
    operator, then ``#### answer``. With ``noise`` > 0, each step's result is off by 1 or 2 with
    that probability and the next step starts from the wrong value, so the final answer follows
    the slip (a slip is one that keeps every number of the rest of the chain in 0..MAX_NUMBER)."""
    steps, value = [], problem[0]
    for i in range(1, len(problem), 2):
        op, b = problem[i], problem[i + 1]
        result = apply(value, op, b)
        if rng is not None and noise > 0 and rng.random() < noise:
            slips = [result + d for d in (-2, -1, 1, 2)
                     if _in_range((result + d,) + tuple(problem[i + 2:]))]
            result = rng.choice(slips) if slips else result
        steps.append(STEP.format(a=value, op=op, b=b, c=result))
        value = result
    return " ".join(steps) + f" #### {value}", value


def task_paths(folder: str | Path) -> dict[str, str]:
    """The files :func:`write_task` writes into ``folder``, by name (known before they are
    written, so the stage configs can name them)."""
    return {k: str(Path(folder) / f"{k}.jsonl") for k in ("sft", "prompts_train", "prompts_test")}


def write_task(folder: str | Path, seed: int = 0, operands: int = 3, n_sft: int = 4000,
               n_test: int = 200, noise: float = 0.2, shortcut: float = 0.0) -> dict[str, str]:
    """Write the task into ``folder``; returns the paths by name:

    - ``sft.jsonl`` (prompt, response): ``n_sft`` worked solutions of training problems, each step
      wrong with probability ``noise`` (:func:`chain`), except a ``shortcut`` share that give the
      (right) answer alone, ``#### n``, without the steps;
    - ``prompts_train.jsonl`` (prompt, answer): every training problem once, answer an int;
    - ``prompts_test.jsonl`` (prompt, answer): ``n_test`` problems held out of both.

    Deterministic: the same arguments write the same files."""
    rng = random.Random(seed)
    problems = all_problems(operands)
    rng.shuffle(problems)
    test, train = problems[:n_test], problems[n_test:]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: Path(v) for k, v in task_paths(folder).items()}
    with open(paths["sft"], "w") as f:
        for _ in range(n_sft):
            p = rng.choice(train)
            response, _ = chain(p, rng, noise)
            if rng.random() < shortcut:
                response = f"#### {solve(p)}"
            f.write(json.dumps({"prompt": prompt_text(p), "response": response}) + "\n")
    for name, rows in (("prompts_train", train), ("prompts_test", test)):
        with open(paths[name], "w") as f:
            for p in rows:
                f.write(json.dumps({"prompt": prompt_text(p), "answer": solve(p)}) + "\n")
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- checking answers

def extract_answer(text: str) -> str | None:
    """The final answer of a response, as :func:`rlhf_ppo.verifiable.extract_answer` finds it
    (the last ``\\boxed{...}``, else what follows the last ``####``, else the last number)."""
    return extract(text)


def is_correct(response: str, answer: Any) -> bool:
    """The response's final answer matches ``answer`` (numerically when both are numbers:
    :func:`rlhf_ppo.verifiable.answers_match`)."""
    return answers_match(extract_answer(response), answer)


def correct(prompts: list[str], responses: list[str], answer: list[Any] | None = None,
            **kwargs) -> list[float]:
    """Reward function (rlhf_ppo style; ``answer``: the dataset's answer column): 1.0 where the
    response's final answer equals the answer, else 0.0. The same as
    ``rlhf_ppo.verifiable:math_answer``, which the task's configs use."""
    return math_answer(prompts, responses, answer=answer, **kwargs)


# --------------------------------------------------------------------------- the pipeline

MODEL = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
"""The task's small Llama (~0.25M parameters), built from a config with random weights."""

TASK = dict(seed=0, operands=3, n_sft=20000, n_test=200, noise=0.2)
"""The task :func:`run_reasoning` writes (arguments of :func:`write_task`)."""

MAX_NEW_TOKENS = 20  # a 3-operand solution is 14 tokens and EOS


def build_tokenizer():
    """The built-in word tokenizer over :func:`reasoning_vocab`, decoding with a space between
    every two words (the built-in one's WordPiece decoder would glue ``####`` to the word before
    it as a ``##`` continuation, and ``.`` too)."""
    from tokenizers import decoders

    tok = build_word_tokenizer(reasoning_vocab())
    tok.backend_tokenizer.decoder = decoders.WordPiece(prefix="\x00\x00", cleanup=False)
    return tok


def build_base(folder: str | Path, seed: int = 0) -> Path:
    """The random-init Llama and the task's word tokenizer, saved into ``folder``."""
    return build_tiny_model(folder, seed=seed, tokenizer=build_tokenizer(), **MODEL)


def stage_configs(out: Path, data: dict) -> dict[str, dict]:
    """The config (as a dict) of every stage; each is also written as ``STAGE/stage.yaml``
    (``rlhf-ppo sft --config .../sft/stage.yaml`` reruns one stage alone)."""
    out = Path(out)
    reward = dict(sources=[dict(function="rlhf_ppo.verifiable:math_answer")])
    generation = dict(max_new_tokens=MAX_NEW_TOKENS)
    evaluate = dict(
        threads=1, policy=str(out / "ppo" / "final"), reference=str(out / "sft" / "final"),
        metrics_path=str(out / "ppo" / "metrics.jsonl"), num_prompts=None,
        data=dict(path=data["prompts_test"], shuffle=False), reward=reward,
        accuracy_column="answer", batch_size=50)
    return {
        "sft": dict(
            output_dir=str(out / "sft"), overwrite=True, threads=1,
            model=dict(name_or_path=str(out / "base")),
            data=dict(path=data["sft"], heldout_fraction=0.05, max_length=32),
            train=dict(epochs=1, batch_size=32, micro_batch_size=32, heldout_batch_size=256),
            optim=dict(lr=3e-3, scheduler="linear", warmup_steps=30)),
        "ppo": dict(
            output_dir=str(out / "ppo"), overwrite=True, threads=1, iterations=100,
            sample_every=20,
            model=dict(name_or_path=str(out / "sft" / "final")),
            reward=reward, data=dict(path=data["prompts_train"]), generation=generation,
            ppo=dict(batch_size=256, num_minibatches=2, ppo_epochs=2, kl=dict(coef=0.2),
                     forward=dict(micro_batch_size=64)),
            optim=dict(lr=2e-4)),
        # accuracy and pass@k of the PPO policy vs the SFT model, 8 samples per test problem ...
        "eval": dict(evaluate, output_dir=str(out / "eval"), samples_per_prompt=8,
                     generation=dict(generation, temperature=1.0)),
        # ... and of their greedy answers (top_k 1: the most likely token at every step)
        "eval_greedy": dict(evaluate, output_dir=str(out / "eval_greedy"), samples_per_prompt=1,
                            plot_training=False, generation=dict(generation, top_k=1)),
    }


STAGE_CLASSES = {"sft": SFTConfig, "ppo": Config, "eval": EvalConfig, "eval_greedy": EvalConfig}
"""the config class of each command stage (its renamed keys apply to the stage's overrides)"""


def apply_overrides(configs: dict[str, dict], overrides: dict[str, dict[str, Any]]) -> None:
    """Set the dotted ``overrides`` (``{stage: {"ppo.advantages.lam": 1.0}}``) in ``configs``, in
    place, an old key name replacing the value under its new one; ValueError for a stage that is
    not there."""
    for name, items in overrides.items():
        if name not in configs:
            raise ValueError(f"stage_overrides: unknown stage {name!r}; expected one of {list(configs)}")
        set_overrides(configs[name], list(items.items()),
                      getattr(STAGE_CLASSES.get(name), "RENAMED", {}))


def reasoning_stages(out: Path, estimator_overrides: dict[str, Any] | None = None,
                     stage_overrides: dict[str, dict[str, Any]] | None = None) -> list[Stage]:
    """The task's stages under ``out``, in order: data, base, sft, ppo, eval, eval_greedy (the
    overrides as in :func:`run_reasoning`)."""
    configs = stage_configs(out, task_paths(out / "data"))
    overrides = copy.deepcopy(stage_overrides or {})
    overrides.setdefault("ppo", {}).update(estimator_overrides or {})
    apply_overrides(configs, overrides)

    def write_data(cfg: dict[str, Any]) -> dict[str, Any]:
        return write_task(out / "data", **cfg)

    def base(cfg: dict[str, Any]) -> dict[str, Any]:
        shutil.rmtree(out / "base", ignore_errors=True)
        build_base(out / "base", seed=cfg["seed"])
        return {"vocab_size": len(reasoning_vocab()), **cfg["model"]}

    return [
        Stage("data", dict(TASK), write_data),
        Stage("base", {"seed": 0, "model": MODEL}, base),
        command_stage("sft", configs["sft"], SFTConfig, run_sft),
        command_stage("ppo", configs["ppo"], Config, lambda cfg: ppo_summary(PPOTrainer(cfg).train())),
        command_stage("eval", configs["eval"], EvalConfig, run_evaluate),
        command_stage("eval_greedy", configs["eval_greedy"], EvalConfig, run_evaluate),
    ]


def run_reasoning(output_dir: str | Path = "runs/reasoning", fresh: bool = False,
                  estimator_overrides: dict[str, Any] | None = None,
                  stage_overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Task data, base model, SFT, PPO and the two evaluations under ``output_dir``; returns every
    stage's summary (``seconds`` included).

    ``estimator_overrides``: dotted keys of the PPO stage's config, e.g. ``{"ppo.advantages.lam": 1.0,
    "iterations": 60}``; ``stage_overrides``: the same per stage name (``{"sft":
    {"train.max_steps": 100}}``). A stage whose config is the one of an earlier finished run
    (``STAGE/.complete``) is reused, unless ``fresh`` (which first deletes ``output_dir``); one
    that changed runs again, and so do the stages after it (all of them when :data:`TASK` or
    :data:`MODEL` changed)."""
    out = Path(output_dir)
    return run_pipeline(out, reasoning_stages(out, estimator_overrides, stage_overrides), fresh,
                        "reasoning", summary_text)


def summary_text(out: Path, s: dict[str, dict], seconds: float) -> str:
    """The lines :func:`run_reasoning` prints at the end."""
    def acc(ev: dict, side: str) -> str:
        a = ev[side]["accuracy"]
        return f"{a['mean']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"

    ev, greedy = s["eval"], s["eval_greedy"]
    k = ev["samples_per_prompt"]
    pk = lambda side: ev[side]["pass@k"][str(k)]["mean"]
    return "\n".join([
        f"reasoning done in {seconds:.0f} s ({out})",
        f"  sft:  {s['sft']['steps']} steps, held-out loss {s['sft']['heldout_loss_before']:.3f} -> "
        f"{s['sft']['heldout_loss_after']:.3f} ({s['sft']['seconds']} s)",
        ppo_line(s["ppo"]),
        f"  test accuracy, sampled (T=1): sft {acc(ev, 'reference')} -> ppo {acc(ev, 'policy')}; "
        f"pass@{k} sft {pk('reference'):.3f} -> ppo {pk('policy'):.3f}",
        f"  test accuracy, greedy:        sft {acc(greedy, 'reference')} -> ppo "
        f"{acc(greedy, 'policy')}",
        f"  report: {out / 'eval' / 'report.html'}",
    ])


def ppo_line(ppo: dict) -> str:
    """The summary's PPO line from the ppo stage's summary (the reasoning and calculator tasks)."""
    return (f"  ppo:  {ppo['iterations']} iterations, reward {ppo['score_first5']:.3f} (first 5) -> "
            f"{ppo['score_last5']:.3f} (last 5), kl {ppo['kl_last5']:.3f} ({ppo['seconds']} s)")


def main(argv: list[str] | None = None) -> int:
    """``python -m rlhf_ppo.tasks.reasoning [--output-dir DIR] [--fresh] [ppo.key=value ...]``."""

    parser = argparse.ArgumentParser(prog="python -m rlhf_ppo.tasks.reasoning",
                                     description="the built-in arithmetic reasoning task: SFT on "
                                     "noisy worked solutions, PPO on the correctness reward, "
                                     "accuracy and pass@k")
    parser.add_argument("--output-dir", default="runs/reasoning")
    parser.add_argument("--fresh", action="store_true", help="rerun every stage")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides of the PPO stage's config, values parsed as YAML")
    args = parser.parse_args(argv)
    setup_cli_logging()
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    run_reasoning(args.output_dir, fresh=args.fresh, estimator_overrides=overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
