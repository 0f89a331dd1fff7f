"""The quickstart: the built-in review corpus, and the whole pipeline end to end."""

import importlib
import json
import random

from rlhf_ppo.tasks import quickstart as q


def sentences(text):
    return [x.strip() for x in text.split(" .") if x.strip()]


def test_sentiment_hand_values():
    assert q.sentiment("the movie was great. i hated the plot.") == 0.0  # 1 positive, 1 negative
    assert q.sentiment("i loved the film. what a warm film. i would watch it again.") == 1.0
    assert q.sentiment("the pace is slow. i would not watch it again. the cast was great.") == -1 / 3
    assert q.sentiment("review of the night train :") == 0.0


def test_corpus_pairs_prefer_positive_varied_well_formed_reviews(tmp_path):
    paths = q.write_corpus(tmp_path, n_sft=50, n_pairs=400, seed=1)
    pairs = [json.loads(x) for x in open(paths["pairs"])]
    assert len(pairs) == 400 and all(p["chosen"] != p["rejected"] for p in pairs)
    vocab = set(q.review_vocab())
    for p in pairs:
        assert set((p["prompt"] + " " + p["chosen"] + " " + p["rejected"]).split()) <= vocab
        # a pair is never won by the less positive review unless it only differs in form
        assert q.sentiment(p["chosen"]) >= q.sentiment(p["rejected"]) or \
            sorted(p["chosen"].split()) == sorted(p["rejected"].split()) or \
            set(p["rejected"].split()) <= set(p["chosen"].split())
    kinds = {"repetition": 0, "sentiment": 0}
    for p in pairs:
        sents = sentences(p["rejected"])
        kinds["repetition" if len(set(sents)) < len(sents) else "sentiment"] += 1
    assert kinds["repetition"] > 40 and kinds["sentiment"] > 150
    sft = [json.loads(x) for x in open(paths["sft"])]
    assert len(sft) == 50 and all(r["prompt"].startswith("review of ") for r in sft)


def test_repetition_pair_has_equal_sentiment():
    rng = random.Random(0)
    for _ in range(50):
        chosen, rejected = q.repetition_pair(rng)
        assert q.sentiment(chosen) == q.sentiment(rejected) != 0
        assert len(set(sentences(rejected))) == 1 < len(sentences(rejected))


def test_quickstart_pipeline_end_to_end_and_reuse(tmp_path, capsys):
    out = tmp_path / "qs"
    s = q.run_quickstart(out)
    assert s["sft"]["heldout_loss_after"] < s["sft"]["heldout_loss_before"] - 2
    assert s["reward"]["heldout_accuracy"] >= 0.8
    ev = s["eval"]
    # the policy beats the SFT reference with a confidence interval that excludes zero ...
    assert ev["score_diff"]["ci_low"] > 0 and ev["win_rate"]["ci_low"] > 0.5
    # ... and writes positive reviews by the corpus's own measure, not just by the learned model
    truth = {side: ev[side]["sources"][1]["mean"] for side in ("policy", "reference")}
    assert truth["policy"] > 0.7 and truth["policy"] > truth["reference"] + 0.5
    for name in ("samples.jsonl", "summary.json", "report.html"):
        assert (out / "eval" / name).is_file()
    assert (out / "ppo" / "samples.jsonl").is_file()  # greedy samples during PPO
    assert "quickstart done" in capsys.readouterr().out
    # each stage recorded the config it ran with
    configs = q.stage_configs(out, q.corpus_paths(out / "data"))
    for name in ("sft", "reward", "ppo", "eval"):
        assert json.loads((out / name / ".complete").read_text())["config"] == configs[name]
    # a second run reuses every stage: it runs none and rewrites no file (markers, models, data)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {out / "base" / ".complete", out / "ppo" / "final" / "model.safetensors"} <= set(files)
    again = q.run_quickstart(out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files
    assert again == s


def test_the_old_module_path_still_imports():
    """Saved run configs name ``rlhf_ppo.quickstart:sentiment_reward``."""
    old = importlib.import_module("rlhf_ppo.quickstart")
    assert old.sentiment_reward is q.sentiment_reward and old.run_quickstart is q.run_quickstart
    from rlhf_ppo import builtin
    from rlhf_ppo.tasks import tiny

    assert builtin.VOCAB_WORDS is tiny.VOCAB_WORDS and builtin.resolve_model("x") == "x"
