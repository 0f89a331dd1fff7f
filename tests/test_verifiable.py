"""Verifiable rewards (rlhf_ppo/verifiable.py): answer extraction, number parsing, the comparison,
the reward functions directly and through FunctionReward / RewardSum, and the GSM8K-style
example config and data."""

import json
from pathlib import Path

import pytest
import torch

from rlhf_ppo.config import ModelConfig, RewardConfig, RewardSource, load_config
from rlhf_ppo.data import Prompt, load_prompts
from rlhf_ppo.models import load_tokenizer
from rlhf_ppo.rewards import FunctionReward, RewardError, RewardSum
from rlhf_ppo.rollout import Rollout
from rlhf_ppo.verifiable import (
    answers_match,
    exact_match,
    extract_answer,
    format_reward,
    has_answer_format,
    math_answer,
    normalize_text,
    parse_number,
    reference_answer,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gsm8k_style.yaml"
DATA = ROOT / "configs" / "data" / "gsm8k_style.jsonl"


# --------------------------------------------------------------------------- extract_answer

@pytest.mark.parametrize("text, expected", [
    # 1. the last \boxed{...}
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{ 2 }", "2"),
    (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),                  # nested braces
    (r"\boxed{\text{a {b} c}} done", r"\text{a {b} c}"),
    (r"\boxed {7}", "7"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                         # escaped braces do not count
    (r"#### 5 but finally \boxed{6}", "6"),                     # boxed wins over ####
    (r"\boxed{}", ""),
    (r"\boxed{3} and then \boxed{4", "3"),                      # an unclosed box is skipped
    # 2. the number after the last ####
    ("work work\n#### 42", "42"),
    ("#### 1\nmore\n#### 72 dollars", "72"),
    ("#### The answer is 8.", "8"),
    ("it is 3 #### 1,234", "1,234"),
    ("#### Paris\nbecause 3", "Paris"),                         # no number: the rest of the line
    ("#### -3", "-3"),
    ("####\n  42\nthen 7", "42"),                              # the next non-empty line
    ("so 5 ####", "5"),                                         # nothing after: last number
    # 3. the last number
    ("I have 3 apples and 5 pears", "5"),
    ("The answer is 42.", "42"),                                # trailing period
    ("It is -7.", "-7"),
    ("a total of \u22125", "\u22125"),                          # Unicode minus
    ("x is 3.14 or 2.5", "2.5"),
    ("costs 1,234,567 units", "1,234,567"),
    ("he ate 3/4 of it", "3/4"),
    ("It costs $18.50.", "$18.50"),
    ("It costs \\$5", "\\$5"),
    ("a loss of -$20", "-$20"),
    ("up 50% today", "50%"),
    ("pages 10-12", "12"),                                      # a range, not -12
    ("1, 2, 3", "3"),                                           # a list, not thousands
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_of_a_non_string():
    assert extract_answer(None) is None


# --------------------------------------------------------------------------- parse_number

@pytest.mark.parametrize("value, expected", [
    (42, 42.0), (-3, -3.0), (2.5, 2.5), (42.0, 42.0),
    ("42", 42.0), (" 42. ", 42.0), ("-7", -7.0), ("\u22127", -7.0), ("+3", 3.0),
    ("1,234", 1234.0), ("1,234,567.5", 1234567.5), ("1{,}234", 1234.0),
    ("3.14", 3.14), (".5", 0.5), ("1e3", 1000.0),
    ("3/4", 0.75), ("-3/4", -0.75), (r"\frac{3}{4}", 0.75), (r"\dfrac{1}{2}", 0.5),
    (r"-\frac{1}{4}", -0.25), (r"\frac34", 0.75), (r"\frac{-3}{4}", -0.75),
    ("$5", 5.0), ("\\$5.50", 5.5), ("-$20", -20.0), ("50%", 50.0), ("50\\%", 50.0),
    ("x = 5", 5.0), ("(12)", 12.0),
    ("#### 42", 42.0), ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", 72.0),
    ("#### 1,234", 1234.0),
])
def test_parse_number(value, expected):
    assert parse_number(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", [
    None, True, False, "", "abc", "1,23", "3/0", "1/2/3", "inf", "nan", float("nan"),
    float("inf"), 10 ** 400, "1e400", "12 apples", "#### Paris", [1], r"\frac{x}{2}", 1j,
])
def test_parse_number_refuses(value):
    assert parse_number(value) is None


def test_parse_number_numpy_scalars():
    np = pytest.importorskip("numpy")
    assert parse_number(np.int64(7)) == 7.0
    assert parse_number(np.float32(0.5)) == 0.5


# --------------------------------------------------------------------------- comparison

@pytest.mark.parametrize("predicted, reference, ok", [
    ("42", 42, True), ("42", 42.0, True), ("42", "42", True), ("42.0", 42, True),
    ("42", "#### 42", True), ("42", "She sold 6 * 7 = <<6*7=42>>42.\n#### 42", True),
    ("1,234", 1234, True), ("$1,234.00", "1234", True), ("3/4", 0.75, True),
    (r"\frac{3}{4}", "3/4", True), ("0.1", 0.1 + 1e-9, True),       # relative tolerance
    ("1000000", 1000000.5, True), ("1000000", 1000002, False),
    ("0", 1e-10, True), ("0", 1e-8, False),                          # absolute tolerance
    ("41", 42, False), ("-42", 42, False),
    ("Paris", "paris", True), (" Paris. ", "#### paris", True), ("New York", "newyork", True),
    ("Paris", 42, False), ("42", "forty-two", False),
    (None, 42, False), ("42", None, False),
])
def test_answers_match(predicted, reference, ok):
    assert answers_match(predicted, reference) is ok


def test_normalize_text_and_reference_answer():
    assert normalize_text("  The  Answer. ") == "theanswer"
    assert normalize_text(42.0) == "42" and normalize_text(2.5) == "2.5"
    assert reference_answer("steps\n#### 42 ") == "42"
    assert reference_answer(42) == 42 and reference_answer("42") == "42"


# --------------------------------------------------------------------------- reward functions

def test_math_answer_formats():
    cases = [
        (r"The answer is \boxed{42}.", 42, 1.0),
        (r"The answer is \boxed{\frac{3}{4}}", "3/4", 1.0),
        ("Total: 6 * 7 = 42\n#### 42", "#### 42", 1.0),
        ("So she has 42 apples.", 42, 1.0),
        ("It dropped to -5 degrees.", -5, 1.0),
        ("It costs $11.75.", 11.75, 1.0),
        ("They have 1,495 books", "1495", 1.0),
        ("They have 1495 books", "1,495", 1.0),
        ("She ate 3/4 of the pie", 0.75, 1.0),
        ("So 50% are left", 50, 1.0),
        ("The answer is 41.", 42, 0.0),
        ("no idea", 42, 0.0),
    ]
    responses, refs, expected = zip(*cases)
    assert math_answer([""] * len(cases), list(responses), answer=list(refs)) == list(expected)


def test_math_answer_right_number_elsewhere_is_wrong():
    """The last number (or one earlier) being right does not rescue a wrong marked answer."""
    responses = [r"I first thought 42 but the answer is \boxed{41}",
                 r"\boxed{41}, and 42 was my first guess",
                 "6 * 7 = 42\n#### 41",
                 "#### 41\nalthough 42 also came to mind",
                 r"I first thought 41 but the answer is \boxed{42}"]
    refs = [42, "42", 42.0, "#### 42", "She has <<6*7=42>>42.\n#### 42"]
    assert math_answer(["p"] * 5, responses, answer=refs) == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_math_answer_reference_types():
    """The reference column as the loader may type it: int, float, str, GSM8K answer text."""
    responses = [r"\boxed{72}"] * 6
    refs = [72, 72.0, "72", " 72 ", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72", None]
    assert math_answer(["p"] * 6, responses, answer=refs) == [1.0] * 5 + [0.0]


def test_math_answer_column_name_and_scores():
    out = math_answer(["p", "q"], [r"\boxed{3}", "4"], answer_column="solution",
                      solution=["3", "5"], correct=2.0, wrong=-1.0, stopped=[True, True])
    assert out == [2.0, -1.0]


def test_missing_answer_column_names_it_and_the_columns_that_arrived():
    with pytest.raises(ValueError, match=r"'answer'.*\['id', 'solution'\]"):
        math_answer(["p"], ["1"], solution=["1"], id=[0], stopped=[True])
    with pytest.raises(ValueError, match=r"no dataset column 'target'.*\['answer'\]"):
        exact_match(["p"], ["1"], answer=["1"], answer_column="target")


def test_answer_column_of_the_wrong_length():
    with pytest.raises(ValueError, match="1 values for 2 responses"):
        math_answer(["p", "q"], ["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="not a list"):
        math_answer(["p"], ["1"], answer="1")


def test_exact_match():
    responses = ["Paris", " paris. ", "The capital is Paris", r"so \boxed{Paris}", "42", "42"]
    refs = ["Paris", "Paris", "Paris", "paris", 42, "#### 42"]
    assert exact_match(["p"] * 6, responses, answer=refs) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    # extract=True: the final answer, against the reference's part after ####
    assert exact_match(["p"] * 6, responses, answer=refs, extract=True) == \
        [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    # strings only: 1,234 is not "1234" (math_answer compares numbers)
    assert exact_match(["p"], ["1,234"], answer=[1234]) == [0.0]
    assert math_answer(["p"], ["1,234"], answer=[1234]) == [1.0]


def test_format_reward_default():
    responses = [r"\boxed{3}", "steps\n#### 3", "the answer is 3", r"\boxed{3} \boxed{4}",
                 "#### 3\n#### 4", r"\boxed{3}\n#### 3", r"\boxed{3", "#### three",
                 r"\boxed{\frac{1}{2}}"]
    expected = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward(["p"] * len(responses), responses) == expected
    assert [has_answer_format(r) for r in responses] == [bool(e) for e in expected]


def test_format_reward_pattern():
    responses = ["<think>a</think><answer>3</answer>", "<answer>3</answer>",
                 "<think>a\nb</think>\n<answer>3</answer>"]
    pattern = r"(?s)^<think>.*?</think>\s*<answer>.*?</answer>$"
    assert format_reward(["p"] * 3, responses, pattern=pattern, wrong=-0.5) == [1.0, -0.5, 1.0]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        format_reward(["p"], ["x"], pattern="(")


# --------------------------------------------------------------------------- through FunctionReward

def text_rollout(tok, prompt_texts, responses, extras):
    """A Rollout-like batch whose response texts are free text (the reward functions read only
    texts): one placeholder response token per row."""
    prompts = [Prompt(t, tok(t)["input_ids"], extra=e) for t, e in zip(prompt_texts, extras)]
    L = max(len(p.input_ids) for p in prompts)
    p_ids = torch.full((len(prompts), L), tok.pad_token_id, dtype=torch.long)
    p_mask = torch.zeros_like(p_ids)
    for i, p in enumerate(prompts):
        p_ids[i, L - len(p.input_ids):] = torch.tensor(p.input_ids)
        p_mask[i, L - len(p.input_ids):] = 1
    r_ids = torch.full((len(prompts), 1), tok.eos_token_id, dtype=torch.long)
    r_mask = torch.ones_like(r_ids)
    return Rollout(input_ids=torch.cat([p_ids, r_ids], 1),
                   attention_mask=torch.cat([p_mask, r_mask], 1), prompt_length=L,
                   response_mask=r_mask, stopped=torch.ones(len(prompts), dtype=torch.bool),
                   prompts=prompts, response_texts=list(responses))


RESPONSES = [r"I first thought 42 but the answer is \boxed{41}", "6 * 7 = 42\n#### 42",
             "So the answer is 3/4.", "i think the movie is good"]
EXTRAS = [{"answer": "She has <<6*7=42>>42.\n#### 42", "level": 1}, {"answer": 42, "level": 1},
          {"answer": 0.75, "level": 2}, {"answer": "7", "level": 2}]


def test_function_reward_passes_the_answer_column(tok):
    rollout = text_rollout(tok, ["the day is"] * 4, RESPONSES, EXTRAS)
    fr = FunctionReward(RewardSource(function="rlhf_ppo.verifiable:math_answer"),
                        "reward.sources[0]")
    assert fr(rollout).tolist() == [0.0, 1.0, 1.0, 0.0]
    extras = [{"gold": e["answer"]} for e in EXTRAS]
    fr = FunctionReward(RewardSource(function="rlhf_ppo.verifiable:math_answer",
                                     kwargs={"answer_column": "gold", "wrong": -1.0}),
                        "reward.sources[0]")
    assert fr(text_rollout(tok, ["the day is"] * 4, RESPONSES, extras)).tolist() == \
        [-1.0, 1.0, 1.0, -1.0]


def test_function_reward_missing_column_is_a_reward_error(tok):
    rollout = text_rollout(tok, ["the day is"] * 4, RESPONSES, [{"gold": 1}] * 4)
    fr = FunctionReward(RewardSource(function="rlhf_ppo.verifiable:math_answer"),
                        "reward.sources[0]")
    with pytest.raises(RewardError, match=r"reward.sources\[0\].*'answer'.*\['gold'\]"):
        fr(rollout)


def test_reward_sum_of_answer_and_format(tok, tiny_policy_dir):
    cfg = RewardConfig(sources=[
        RewardSource(function="rlhf_ppo.verifiable:math_answer"),
        RewardSource(function="rlhf_ppo.verifiable:format_reward", weight=0.2)])
    rs = RewardSum(cfg, ModelConfig(name_or_path=tiny_policy_dir), tok)
    scores, metrics = rs(text_rollout(tok, ["the day is"] * 4, RESPONSES, EXTRAS))
    assert torch.allclose(scores, torch.tensor([0.2, 1.2, 1.0, 0.0]))
    assert metrics["reward/source0_mean"] == pytest.approx(0.5)  # 2 of 4 right
    assert metrics["reward/source1_mean"] == pytest.approx(0.5)  # 2 of 4 well formatted


# --------------------------------------------------------------------------- the GSM8K-style example

def test_gsm8k_style_data_layout_and_answers():
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert 15 <= len(rows) <= 30
    for row in rows:
        assert set(row) == {"question", "answer"}
        assert row["answer"].rsplit("\n", 1)[-1].startswith("#### ")
        # the worked solution, read as a response, is right by its own reference
        assert math_answer([row["question"]], [row["answer"]], answer=[row["answer"]]) == [1.0]
        assert format_reward([row["question"]], [row["answer"]]) == [1.0]
    # and a response with another number is wrong for each
    wrong = math_answer([""] * len(rows), ["#### 100000"] * len(rows),
                        answer=[r["answer"] for r in rows])
    assert wrong == [0.0] * len(rows)


def test_gsm8k_style_config_loads_with_its_prompts(monkeypatch, tiny_policy_dir):
    monkeypatch.chdir(ROOT)  # the config's data.path is relative to the repository root
    cfg = load_config(CONFIG)
    assert cfg.data.prompt_column == "question"
    assert cfg.data.path == "configs/data/gsm8k_style.jsonl"
    assert cfg.model.name_or_path == "builtin:tiny"
    assert [s.function for s in cfg.reward.sources] == ["rlhf_ppo.verifiable:math_answer",
                                                        "rlhf_ppo.verifiable:format_reward"]
    assert cfg.reward.sources[0].kwargs == {"answer_column": "answer"}
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_policy_dir))  # the builtin tiny tokenizer
    prompts = load_prompts(cfg.data, tok)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert len(prompts) == len(rows)  # none longer than data.max_prompt_length
    assert [p.text for p in prompts] == [r["question"] for r in rows]
    assert [set(p.extra) for p in prompts] == [{"answer"}] * len(rows)
    # the reward sources load (the functions import) and score the answers
    rs = RewardSum(cfg.reward, ModelConfig(name_or_path=tiny_policy_dir), tok)
    scores, _ = rs(text_rollout(tok, [p.text for p in prompts[:2]],
                                [r["answer"] for r in rows[:2]], [p.extra for p in prompts[:2]]))
    assert torch.allclose(scores, torch.tensor([1.2, 1.2]))
