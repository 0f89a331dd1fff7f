"""The built-in reasoning task (rlhf_ppo.tasks.reasoning): deterministic data with right answers, the
answer checker, pass@k, and the pipeline end to end (a tiny smoke run here; the learning check,
SFT clearly short of perfect and PPO clearly above it, is slow)."""

import importlib
import json
import math
import operator

import pytest

from rlhf_ppo.tasks import reasoning as R


def read(path):
    return [json.loads(line) for line in open(path)]


def evaluate_left_to_right(prompt):
    """The answer recomputed from the prompt text alone, without the module's helpers."""
    words = prompt.split()
    assert words[:2] == ["q", ":"] and words[-1] == "="
    expr = words[2:-1]
    value = int(expr[0])
    for op, b in zip(expr[1::2], expr[2::2]):
        value = {"+": operator.add, "-": operator.sub}[op](value, int(b))
    return value


# --------------------------------------------------------------------------- the data

def test_task_is_deterministic(tmp_path):
    a = R.write_task(tmp_path / "a", seed=3, n_sft=300)
    b = R.write_task(tmp_path / "b", seed=3, n_sft=300)
    c = R.write_task(tmp_path / "c", seed=4, n_sft=300)
    for name in a:
        assert open(a[name]).read() == open(b[name]).read()
    assert open(a["sft"]).read() != open(c["sft"]).read()
    assert open(a["prompts_test"]).read() != open(c["prompts_test"]).read()


def test_answers_are_right_and_test_problems_are_held_out(tmp_path):
    paths = R.write_task(tmp_path, seed=0, n_sft=500, n_test=150)
    train, test = read(paths["prompts_train"]), read(paths["prompts_test"])
    assert len(test) == 150 and len(train) == len(R.all_problems(3)) - 150
    for row in train + test:
        assert set(row) == {"prompt", "answer"} and isinstance(row["answer"], int)
        assert row["answer"] == evaluate_left_to_right(row["prompt"])
        assert 0 <= row["answer"] <= R.MAX_NUMBER
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    train_prompts = {r["prompt"] for r in train}
    assert all(r["prompt"] in train_prompts for r in read(paths["sft"]))
    # every word is in the vocabulary; intermediate results stay in range too
    vocab = set(R.reasoning_vocab())
    for r in read(paths["sft"]):
        assert set((r["prompt"] + " " + r["response"]).split()) <= vocab


def check_chain(prompt, response):
    """The steps of a response: each `a op b = c .` continues from the previous result with the
    prompt's next operator and operand, and `#### n` repeats the last result. Returns the number
    of steps whose result is wrong for its own operands, and the final answer."""
    expr = prompt.split()[2:-1]
    *steps, final = response.split(" . ")
    assert final.startswith("#### ") and len(steps) == len(expr) // 2
    value, slips = int(expr[0]), 0
    for i, step in enumerate(steps):
        a, op, b, eq, c = step.split()
        assert (int(a), op, b, eq) == (value, expr[2 * i + 1], expr[2 * i + 2], "=")
        slips += int(c) != R.apply(int(a), op, int(b))
        assert 0 <= abs(int(c) - R.apply(int(a), op, int(b))) <= 2
        value = int(c)
    assert final == f"#### {value}"
    return slips, value


def test_sft_responses_show_the_steps_and_end_with_their_answer(tmp_path):
    clean = read(R.write_task(tmp_path / "clean", n_sft=300, noise=0.0)["sft"])
    for r in clean:
        slips, value = check_chain(r["prompt"], r["response"])
        assert slips == 0 and value == evaluate_left_to_right(r["prompt"])
    # noisy: each step is off by 1 or 2 with probability `noise`, and the answer follows the slip
    noisy = read(R.write_task(tmp_path / "noisy", n_sft=2000, noise=0.2)["sft"])
    slips, wrong = 0, 0
    for r in noisy:
        s, value = check_chain(r["prompt"], r["response"])
        slips += s
        wrong += value != evaluate_left_to_right(r["prompt"])
    assert 0.17 < slips / (2 * len(noisy)) < 0.23
    assert 0.3 < wrong / len(noisy) < 0.4  # 1 - 0.8^2 = 0.36, less the slips that cancel
    assert R.chain((7, "+", 6, "-", 4)) == ("7 + 6 = 13 . 13 - 4 = 9 . #### 9", 9)


def test_shortcut_responses_give_the_right_answer_alone(tmp_path):
    rows = read(R.write_task(tmp_path, n_sft=1000, noise=0.0, shortcut=0.3)["sft"])
    short = [r for r in rows if r["response"].startswith("####")]
    assert 0.25 < len(short) / len(rows) < 0.35
    for r in short:
        assert r["response"] == f"#### {evaluate_left_to_right(r['prompt'])}"


def test_problems_are_in_range_and_prompts_parse_back():
    problems = R.all_problems(3)
    assert len(problems) == len(set(problems)) == 1899
    for p in problems[::37]:
        assert R.parse_prompt(R.prompt_text(p)) == p
        assert R.solve(p) == evaluate_left_to_right(R.prompt_text(p))
    assert all(0 <= R.solve(p[:k]) <= R.MAX_NUMBER for p in problems for k in (1, 3, 5))
    assert len(R.all_problems(2)) == 126


def test_tokenizer_keeps_every_word_and_decodes_with_spaces():
    tok = R.build_tokenizer()
    text = "q : 7 + 6 - 4 = 7 + 6 = 13 . 13 - 4 = 9 . #### 9"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(text.split())
    assert tok.decode(ids) == text  # "####" is not glued to the word before it


# --------------------------------------------------------------------------- checking answers

@pytest.mark.parametrize("response, answer, ok", [
    ("3 + 4 = 7 . 7 - 2 = 5 . #### 5", 5, True),
    ("3 + 4 = 7 . 7 - 2 = 5 . #### 5", "5", True),
    ("3 + 4 = 7 . 7 - 2 = 5 . #### 5", 5.0, True),
    ("3 + 4 = 7 . 7 - 2 = 6 . #### 6", 5, False),
    ("#### 5 . #### 6", 6, True),  # the last ####
    ("the answer is \\boxed{12}", 12, True),
    ("so 4 and then 12", 12, True),  # no marker: the last number
    ("so 12 and then 4", 12, False),
    ("#### 1,000", 1000, True),
    ("#### -3", -3, True),
    ("#### 2.5", 2.5, True),
    ("no number here", 0, False),
    ("#### 5", "five", False),
])
def test_checker_examples(response, answer, ok):
    assert R.is_correct(response, answer) is ok
    assert R.correct(["q : ... ="], [response], answer=[answer]) == [float(ok)]


def test_checker_needs_the_answer_column():
    with pytest.raises(ValueError, match="answer"):
        R.correct(["p"], ["#### 1"])


def test_pass_at_k_hand_values_and_the_binomial_formula():
    assert R.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert R.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert R.pass_at_k(4, 3, 2) == 1.0 and R.pass_at_k(4, 0, 4) == 0.0
    assert R.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert R.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert 0 < R.pass_at_k(200, 1, 100) == pytest.approx(0.5)  # large n: no overflow
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError, match="pass_at_k"):
            R.pass_at_k(*bad)


# --------------------------------------------------------------------------- the pipeline

def test_stage_configs_are_valid_configs(tmp_path):
    from rlhf_ppo.config import Config, config_from_dict
    from rlhf_ppo.evaluate import EvalConfig
    from rlhf_ppo.sft import SFTConfig

    data = R.write_task(tmp_path / "data", n_sft=50)
    stages = R.stage_configs(tmp_path, data)
    assert list(stages) == ["sft", "ppo", "eval", "eval_greedy"]
    for name, cls in (("sft", SFTConfig), ("ppo", Config), ("eval", EvalConfig),
                      ("eval_greedy", EvalConfig)):
        config_from_dict(stages[name], cls)
    assert stages["ppo"]["reward"]["sources"] == [{"function": "rlhf_ppo.verifiable:math_answer"}]
    assert stages["eval"]["accuracy_column"] == "answer"
    assert stages["eval_greedy"]["generation"]["top_k"] == 1


TINY = {"sft": {"train.max_steps": 3},
        "ppo": {"iterations": 2, "sample_every": 0, "ppo.batch_size": 8, "ppo.num_minibatches": 1,
                "ppo.micro_batch_size": 8, "ppo.ppo_epochs": 1},
        "eval": {"num_prompts": 4, "samples_per_prompt": 2, "bootstrap_samples": 100},
        "eval_greedy": {"num_prompts": 4, "bootstrap_samples": 100}}


def test_pipeline_smoke_runs_reuses_and_reruns_what_changed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(R, "TASK", dict(R.TASK, n_sft=400))
    out = tmp_path / "run"
    s = R.run_reasoning(out, stage_overrides=TINY)
    assert s["sft"]["steps"] == 3 and s["ppo"]["iterations"] == 2
    for name in ("eval", "eval_greedy"):
        for side in ("policy", "reference"):
            assert 0 <= s[name][side]["accuracy"]["mean"] <= 1
    assert list(s["eval"]["policy"]["pass@k"]) == ["1", "2"]
    assert "test accuracy, sampled (T=1): sft" in capsys.readouterr().out
    assert (out / "base" / "config.json").is_file() and (out / "eval" / "report.html").is_file()
    # the same configs: every stage reused, no file rewritten (markers, models, data)
    stamps = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    files = stamps()
    again = R.run_reasoning(out, stage_overrides=TINY)
    assert stamps() == files and again == s == json.loads(json.dumps(s))
    # another PPO setting: data, base and SFT reused, PPO and the evaluations run again
    other = R.run_reasoning(out, stage_overrides=TINY, estimator_overrides={"ppo.lam": 1.0})
    now = stamps()
    for name in ("data", "base", "sft"):
        kept = {p: t for p, t in files.items() if p.is_relative_to(out / name)}
        assert kept and {p: now[p] for p in kept} == kept
        assert other[name] == s[name]
    for name in ("ppo", "eval", "eval_greedy"):
        marker = out / name / ".complete"
        assert now[marker] != files[marker]
    assert json.loads((out / "ppo" / ".complete").read_text())["config"]["ppo"]["lam"] == 1.0
    with pytest.raises(ValueError, match="unknown stage 'rm'"):
        R.run_reasoning(out, stage_overrides={"rm": {}})
    assert stamps() == now  # refused before anything ran


def test_the_old_module_path_still_imports():
    """Saved configs and older evaluate configs name ``rlhf_ppo.reasoning:correct``."""
    old = importlib.import_module("rlhf_ppo.reasoning")
    assert old.correct is R.correct and old.run_reasoning is R.run_reasoning and old.main is R.main


@pytest.mark.slow
def test_sft_is_imperfect_and_ppo_raises_the_accuracy(tmp_path):
    """The task's point (docs/reasoning.md): SFT on the noisy demonstrations leaves sampled
    accuracy well short of perfect, and PPO with the 0/1 correctness reward raises it clearly,
    without losing the greedy accuracy."""
    s = R.run_reasoning(tmp_path / "run")
    ev, greedy = s["eval"], s["eval_greedy"]
    sft, ppo = ev["reference"]["accuracy"]["mean"], ev["policy"]["accuracy"]["mean"]
    assert 0.25 < sft < 0.5
    assert ppo > sft + 0.15 and ev["accuracy_diff"]["ci_low"] > 0.1
    # greedy decoding already gets most right: PPO keeps it
    assert greedy["policy"]["accuracy"]["mean"] > greedy["reference"]["accuracy"]["mean"] - 0.05
    assert ev["policy"]["pass@k"]["8"]["mean"] >= ev["reference"]["pass@k"]["8"]["mean"] - 0.02
