"""scripts/bench/forecast_task.py: the corpus writer, the hidden truth and the preference rules (fast: no
model is trained here)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "forecast_task.py"


@pytest.fixture(scope="module")
def ft():
    spec = importlib.util.spec_from_file_location("forecast_task", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["forecast_task"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("forecast_task", None)


def _rows(path):
    return [json.loads(line) for line in open(path)]


SUNNY = "forecast for paris on monday , sunny :"
RAINY = "forecast for oslo on friday , rainy :"


def test_corpus_is_deterministic(ft, tmp_path):
    kw = dict(n_sft=60, n_pairs=300)
    a = ft.write_corpus(tmp_path / "a", seed=3, **kw)
    b = ft.write_corpus(tmp_path / "b", seed=3, **kw)
    c = ft.write_corpus(tmp_path / "c", seed=4, **kw)
    for k in ("sft", "pairs", "warmup_pairs", "prompts"):
        assert Path(a[k]).read_bytes() == Path(b[k]).read_bytes(), k
    assert Path(a["pairs"]).read_bytes() != Path(c["pairs"]).read_bytes()
    # rewriting an unchanged corpus leaves the files alone
    before = Path(a["pairs"]).stat().st_mtime_ns
    ft.write_corpus(tmp_path / "a", seed=3, **kw)
    assert Path(a["pairs"]).stat().st_mtime_ns == before


def test_corpus_contents(ft, tmp_path):
    paths = ft.write_corpus(tmp_path, n_sft=200, n_pairs=10)
    prompts = [r["prompt"] for r in _rows(paths["prompts"])]
    assert len(prompts) == 30 and len(set(prompts)) == 30
    assert all(sum(ft.prompt_condition(p) == c for p in prompts) == 6 for c in ft.CONDITIONS)
    sft = _rows(paths["sft"])
    # every consistency mix, and every word in the tokenizer's vocabulary
    scores = [ft.consistency(r["prompt"], r["response"]) for r in sft]
    assert min(scores) == -1.0 and max(scores) == 1.0 and -0.3 < sum(scores) / len(scores) < 0.3
    vocab = set(ft.forecast_vocab())
    assert all(w in vocab for r in sft for w in (r["prompt"] + " " + r["response"]).split())


def test_keywords_are_disjoint_and_every_filler_has_one(ft):
    for c, words in ft.KEYWORDS.items():
        assert c in words
        for other, theirs in ft.KEYWORDS.items():
            assert other == c or not words & theirs
        for fillers in ft.LEXICON[c].values():
            for f in fillers:
                assert any(w in words for w in f.split()), f


@pytest.mark.parametrize("prompt,response,expected", [
    # 2 of 2 sentences for the requested condition
    (SUNNY, "temperatures will be warm . the sky will be clear .", 1.0),
    # one each way: (1 + -1) / 2
    (SUNNY, "temperatures will be warm . there will be showers .", 0.0),
    (SUNNY, "temperatures will be freezing . there will be showers .", -1.0),
    # the same text for the prompt it fits
    (RAINY, "temperatures will be freezing . there will be showers .", 0.0),
    (RAINY, "expect heavy rain in the morning . take an umbrella .", 1.0),
    (SUNNY, "expect heavy rain in the morning . take an umbrella .", -1.0),
    # 2 of 3: (1 + 1 - 1) / 3
    (SUNNY, "wear sunscreen . winds will be light . expect thick fog in the evening .", 1 / 3),
    # a sentence without keywords counts 0: (1 + 0) / 2
    (SUNNY, "the sky will be clear . it will feel in the morning .", 0.5),
    # a sentence with one keyword each way counts 0; a trailing fragment counts
    (SUNNY, "temperatures will be warm icy . the sky will be bright", 0.5),
    # decoded text ("day." without a space) reads the same
    (SUNNY, "skies will stay clear all day. remember to wear sunscreen.", 1.0),
    (SUNNY, "", 0.0),
    ("forecast for paris on monday :", "the sky will be clear .", 0.0),
])
def test_consistency_by_hand(ft, prompt, response, expected):
    assert ft.consistency(prompt, response) == pytest.approx(expected)


def test_truth_and_form_rewards(ft):
    responses = ["the sky will be clear .", "there will be showers .",
                 "the sky will be clear . the sky will be clear .", "the sky will be boots ."]
    # "boots" (wear thick boots) is a snowy keyword, even in the wrong slot
    assert ft.truth_reward([SUNNY] * 4, responses) == [1.0, -1.0, 1.0, -1.0]
    assert ft.form_reward([SUNNY] * 4, responses) == [1.0, 1.0, 0.0, 0.0]
    assert ft.well_formed("skies will stay clear all day. wear sunscreen.") == 1.0
    assert ft.well_formed("the sky will be clear") == 0.0  # no final "."
    assert ft.well_formed("there will be warm .") == 0.0  # a filler in another slot


def test_pairs_follow_their_rule(ft, tmp_path):
    n = 1200
    paths = ft.write_corpus(tmp_path, n_sft=1, n_pairs=n, cross_share=0.3)
    pairs = _rows(paths["pairs"])
    assert len(pairs) == n
    kinds = {k: [p for p in pairs if p["kind"] == k]
             for k in ("repetition", "corruption") + ft.CONSISTENCY_KINDS}
    assert sum(map(len, kinds.values())) == n
    assert abs(len(kinds["repetition"]) / n - 0.25) < 0.05
    assert abs(len(kinds["corruption"]) / n - 0.25) < 0.05
    assert all(kinds[k] for k in kinds)
    for p in pairs:
        assert p["chosen"] != p["rejected"]
        if p["kind"] in ("minimal", "same_prompt"):
            assert ft.consistency(p["prompt"], p["chosen"]) > \
                ft.consistency(p["prompt"], p["rejected"])
        elif p["kind"] == "cross_prompt":  # each side's prompt is inside its text
            assert p["prompt"] == ""
            (pc, c), (pr, r) = (x.split(" : ", 1) for x in (p["chosen"], p["rejected"]))
            assert ft.prompt_condition(pc) != ft.prompt_condition(pr) or pc != pr
            assert ft.consistency(pc, c) > ft.consistency(pr, r)
        elif p["kind"] == "repetition":  # equal consistency, distinct sentences win
            assert ft.consistency(p["prompt"], p["chosen"]) == \
                ft.consistency(p["prompt"], p["rejected"])
            assert ft.well_formed(p["chosen"]) == 1.0
            assert ft.is_forecast(p["rejected"]) and ft.well_formed(p["rejected"]) == 0.0
        else:  # corruption: a clean forecast beats broken text
            assert ft.well_formed(p["chosen"]) == 1.0 and not ft.is_forecast(p["rejected"])
    minimal = kinds["minimal"]
    # a minimal pair differs in one sentence
    for p in minimal:
        a, b = (x.split(" . ") for x in (p["chosen"], p["rejected"]))
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    warmup = _rows(paths["warmup_pairs"])
    assert warmup == minimal
