"""Alarms while training (rlhf_ppo/alarms.py): each check on hand-built histories (fires at the
right iteration, quiet on a flat or noisy one), the once-per-episode reporting, the n-gram metric,
and end to end on the tiny model: runs built to misbehave fire the right alarm, a normal one none.
"""

import json
import logging
from pathlib import Path

import pytest
import torch

from rlhf_ppo.alarms import (
    CHECKS,
    AlarmLog,
    holding,
    new_alarms,
    repeated_ngram_share,
)
from rlhf_ppo.config import AlarmsConfig, load_config
from rlhf_ppo.errors import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
CFG = AlarmsConfig()  # warmup 3, window 3, quiet 5

# noise that averages to 0 over any 3 consecutive iterations is not needed: each flat history
# below wobbles by up to 10% and stays quiet
WOBBLE = [1.0, 1.1, 0.9, 1.05, 0.95, 1.1, 0.9, 1.0, 1.08, 0.92, 1.0, 1.1, 0.9, 1.05, 0.95]


def history(**series: list[float]) -> list[dict]:
    """Records ``{"iteration": i, key: series[key][i - 1], ...}``."""
    n = len(next(iter(series.values())))
    return [{"iteration": i + 1, **{k: v[i] for k, v in series.items()}} for i in range(n)]


def first_fired(h: list[dict], name: str, cfg: AlarmsConfig = CFG) -> int | None:
    """The first iteration at which ``name`` is reported (checking each prefix in turn)."""
    for i in range(1, len(h) + 1):
        if name in {a.name for a in new_alarms(h[:i], cfg)}:
            return i
    return None


def fired_names(h: list[dict], cfg: AlarmsConfig = CFG) -> set[str]:
    return {a.name for i in range(1, len(h) + 1) for a in new_alarms(h[:i], cfg)}


# --------------------------------------------------------------------------- each check

def test_length_drift_both_ways():
    # baseline: mean of iterations 1-3 = 10; current: mean of the last 3 after the warm-up.
    # longer: 10,10,10,12,14,16 -> at 6 the mean of 12,14,16 = 14 (1.4x), at 7 (14,16,18) = 16 >= 15
    h = history(response_length=[10, 10, 10, 12, 14, 16, 18, 20])
    assert first_fired(h, "length_drift") == 7
    alarm = next(a for a in holding(h[:7], CFG) if a.name == "length_drift")
    assert alarm.value == pytest.approx(1.6) and alarm.threshold == 1.5
    # shorter: at 5 the mean of (7, 6) = 6.5 <= 10 / 1.5 = 6.67
    assert first_fired(history(response_length=[10, 10, 10, 7, 6, 5]), "length_drift") == 5
    assert first_fired(history(response_length=[10 * w for w in WOBBLE]), "length_drift") is None


def test_repetition_rise():
    # baseline (0 + 0.03 + 0) / 3 = 0.01; fires at a mean >= 0.11: at 6 (0.02, 0.05, 0.2) = 0.09,
    # at 7 (0.05, 0.2, 0.4) = 0.217
    h = history(**{"response/repeated_ngram_share": [0, 0.03, 0, 0.02, 0.05, 0.2, 0.4]})
    assert first_fired(h, "repetition") == 7
    flat = history(**{"response/repeated_ngram_share": [0.05 * w for w in WOBBLE]})
    assert first_fired(flat, "repetition") is None


def test_entropy_collapse():
    # baseline 4; fires when the 3-iteration mean <= 0.25 * 4 = 1: at 7 (2, 1.5, 1) = 1.5, at 8
    # (1.5, 1, 0.5) = 1
    h = history(entropy=[4, 4, 4, 3, 2, 1.5, 1.0, 0.5, 0.2])
    assert first_fired(h, "entropy_collapse") == 8
    # a steady decline to half of the start is ordinary learning
    assert first_fired(history(entropy=[4 - 0.15 * i for i in range(15)]), "entropy_collapse") is None


def test_kl_acceleration():
    # warm-up mean 0.5 (at its middle, iteration 2); 0.5 nats per iteration up to 3.5 at 8, then
    # faster. At 10 (n=10): the window 7 -> 10 (3, 3.5, 4.5, 6.5) rose 1.17 per iteration; the
    # pace before (3 - 0.5) / (10 - 1 - 3 - 1) = 0.5, times 3 = 1.5 > 1.17: quiet. At 11: the
    # window 8 -> 11 (3.5, 4.5, 6.5, 9.5) rose 2 per iteration >= 3 * (3.5 - 0.5) / 6 = 1.5 and
    # KL 9.5 >= kl_min: fires.
    kl = [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4.5, 6.5, 9.5, 13.5]
    assert first_fired(history(kl=kl), "kl_acceleration", AlarmsConfig(kl_min=5)) == 11
    assert first_fired(history(kl=kl), "kl_acceleration") == 12  # default kl_min 10: 13.5
    # a steady climb (the tiny task's KL) never fires, nor a noisy plateau above kl_min
    assert first_fired(history(kl=[0.6 * i for i in range(20)]), "kl_acceleration") is None
    assert first_fired(history(kl=[12 * w for w in WOBBLE]), "kl_acceleration") is None


def test_secondary_drop():
    # score: warm-up 1, 1.1, 0.9 (mean 1, std 0.0816): +4 std = 1.33. source1: warm-up 0.5, 0.52,
    # 0.48 (std 0.0163, floored to 0.05 * 0.5 = 0.025): -4 * 0.025 = 0.4.
    score = [1, 1.1, 0.9, 1.2, 1.5, 1.8, 2.0, 2.2]
    source1 = [0.5, 0.52, 0.48, 0.5, 0.45, 0.38, 0.3, 0.25]
    h = history(score_mean=score, **{"reward/source0_mean": score, "reward/source1_mean": source1})
    # at 6: score mean (1.2, 1.5, 1.8) = 1.5 rose 6.1 std; source1 (0.5, 0.45, 0.38) = 0.443: 2.3 std
    # at 7: (0.45, 0.38, 0.3) = 0.377: 4.9 std down
    assert first_fired(h, "secondary_drop") == 7
    # one source is the score itself; both rising is fine
    one = history(score_mean=score, **{"reward/source0_mean": score})
    assert first_fired(one, "secondary_drop") is None
    up = history(score_mean=score, **{"reward/source0_mean": score, "reward/source1_mean": score})
    assert first_fired(up, "secondary_drop") is None


def test_secondary_drop_of_the_greedy_samples():
    """samples/score_mean, logged every 2 iterations (None between): its first value 2.0 against
    its last, the spread 5% of 2.0 = 0.1, so 4 spreads is a fall to 1.6 or below."""
    score = [1, 1.1, 0.9, 1.2, 1.5, 1.8, 2.0, 2.2, 2.4, 2.6]
    samples = [None, 2.0, None, 2.0, None, 1.7, None, 1.5, None, 1.4]
    h = history(score_mean=score, **{"samples/score_mean": samples})
    assert first_fired(h, "secondary_drop") == 8  # 2.0 -> 1.5: 5 spreads (1.7 was 3)
    steady = history(score_mean=score, **{"samples/score_mean": [None, 2.0, None, 2.1] * 2 + [None, 2.2]})
    assert first_fired(steady, "secondary_drop") is None


def test_explained_variance_streak():
    # below -1 at iterations 3, 4, 5: fires at 5 (no warm-up); NaN (critic-free) never counts
    h = history(explained_variance=[0.0, -0.5, -2, -3, -1.5, 0.2])
    assert first_fired(h, "explained_variance") == 5
    assert first_fired(history(explained_variance=[0.1, -2, -3, 0.0, -2, -2]),
                       "explained_variance") is None
    assert first_fired(history(explained_variance=[float("nan")] * 6), "explained_variance") is None
    assert first_fired(history(explained_variance=[None] * 6), "explained_variance") is None


def test_value_error_growth():
    # baseline 1; fires when the 3-iteration mean >= 10: at 6 (2, 8, 20) = 10
    h = history(value_error=[1, 1, 1, 2, 8, 20, 30])
    assert first_fired(h, "value_error_growth") == 6
    assert first_fired(history(value_error=[w for w in WOBBLE]), "value_error_growth") is None


def test_value_loss_and_grad_norm_jumps_absorb_the_old_warning():
    # the median of the previous 3 (1, 2, 3) is 2: 25 > 10 * 2 fires; no warm-up needed
    h = history(value_loss=[1, 2, 3, 25], grad_norm=[1, 1, 1, 1])
    assert first_fired(h, "value_loss_jump") == 4 and first_fired(h, "grad_norm_jump") is None
    alarm = next(a for a in holding(h, CFG) if a.name == "value_loss_jump")
    assert (alarm.value, alarm.threshold) == (25.0, 20.0)
    assert first_fired(history(grad_norm=[1, 1, 1, 1, 11]), "grad_norm_jump") == 5


def test_logprob_gap_growth():
    # baseline 0.01; bound max(0.05, 3 * 0.01) = 0.05: at 5 the mean of (0.02, 0.05) = 0.035, at 6
    # of (0.02, 0.05, 0.09) = 0.0533
    h = history(**{"tis/logprob_gap": [0.01, 0.01, 0.01, 0.02, 0.05, 0.09]})
    assert first_fired(h, "logprob_gap") == 6
    # fp32 exactness: a tiny gap tripling stays under logprob_gap_min
    assert first_fired(history(**{"tis/logprob_gap": [1e-6, 1e-6, 1e-6, 5e-6, 5e-6, 5e-6]}),
                       "logprob_gap") is None


def test_flat_noisy_history_fires_nothing():
    h = history(response_length=[14 * w for w in WOBBLE], entropy=[4 * w for w in WOBBLE],
                kl=[2 * w for w in WOBBLE], score_mean=WOBBLE, value_error=WOBBLE,
                value_loss=WOBBLE, grad_norm=WOBBLE, explained_variance=[0.2 * w for w in WOBBLE],
                **{"response/repeated_ngram_share": [0.02 * w for w in WOBBLE],
                   "tis/logprob_gap": [0.01 * w for w in WOBBLE],
                   "reward/source0_mean": WOBBLE, "reward/source1_mean": WOBBLE})
    assert fired_names(h) == set()
    assert set(CHECKS) == {"length_drift", "repetition", "entropy_collapse", "kl_acceleration",
                           "secondary_drop", "explained_variance", "value_error_growth",
                           "value_loss_jump", "grad_norm_jump", "logprob_gap"}


def test_a_lasting_condition_is_reported_once_and_again_after_quiet():
    # length doubled at iterations 4-9: holds at 4..10 (reported at 4; at 10 the mean of 20, 20,
    # 10 is 16.7), not at 11..16, holds again at 17 (10, 10, 25: 15) after 6 quiet iterations
    lengths = [10, 10, 10, 20, 20, 20, 20, 20, 20, 10, 10, 10, 10, 10, 10, 10, 25, 25, 25]
    h = history(response_length=lengths)
    reported = [i for i in range(1, len(h) + 1)
                if "length_drift" in {a.name for a in new_alarms(h[:i], CFG)}]
    assert reported == [4, 17]
    assert holding(h, AlarmsConfig(enabled=False)) == []


def test_alarm_log_writes_rows_metrics_and_warnings(tmp_path, caplog):
    log = AlarmLog(CFG, tmp_path)
    h = history(response_length=[10, 10, 10, 12, 20])  # at 5: (12 + 20) / 2 = 16 = 1.6 x 10
    with caplog.at_level(logging.WARNING):
        assert log.check(h[:3], h[3]) == {}
        assert log.check(h[:4], h[4]) == {"alarm/length_drift": 1.0}
    assert "alarm length_drift at iteration 5: mean response length 16.0 tokens is 1.6x" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "alarms.jsonl").read_text().splitlines()]
    assert rows == [{"iteration": 5, "alarm": "length_drift", "message": rows[0]["message"],
                     "value": 1.6, "threshold": 1.5}]
    AlarmLog(CFG, tmp_path, iteration=4)  # resumed from iteration 4: the later row is dropped
    assert (tmp_path / "alarms.jsonl").read_text() == ""
    AlarmLog(CFG, tmp_path / "other", is_main=False)  # other processes write nothing
    assert not (tmp_path / "other").exists()


def test_repeated_ngram_share():
    # row 0: 5 7 5 7 5 -> 3-grams (5,7,5) (7,5,7) (5,7,5): 1 of 3 repeats an earlier one;
    # row 1: 1 2 3 4 then padding: no repeat; row 2: two tokens, no 3-gram: 0.
    # row 3: 9 9 9 9 with the middle masked (an environment's token): 9 9 9 -> 1 gram, no repeat
    ids = torch.tensor([[5, 7, 5, 7, 5], [1, 2, 3, 4, 0], [8, 8, 0, 0, 0], [9, 9, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0]])
    torch.testing.assert_close(repeated_ngram_share(ids, mask),
                               torch.tensor([1 / 3, 0.0, 0.0, 0.0]))
    loop = torch.tensor([[4] * 10])  # 8 grams (4,4,4): 7 repeat the first
    torch.testing.assert_close(repeated_ngram_share(loop, torch.ones_like(loop)),
                               torch.tensor([7 / 8]))


def test_config_checks_and_docs():
    with pytest.raises(ConfigError, match="alarms.length_ratio"):
        load_config(TINY, ["alarms.length_ratio=0.5"])
    with pytest.raises(ConfigError, match="alarms.warmup"):
        load_config(TINY, ["alarms.warmup=0"])
    assert load_config(TINY, ["alarms.enabled=false"]).alarms.enabled is False


# --------------------------------------------------------------------------- end to end

def repeat_great(prompts: list[str], responses: list[str], **kwargs) -> list[float]:
    """Pays for repetition: a quarter point per "great" in the response."""
    return [r.split().count("great") / 4 for r in responses]


# the ten words the tiny model samples most at the start: as stop tokens they end its responses
# after ~6 words, so a reward for length has room to double them
STOP_IDS = "[63, 14, 80, 79, 44, 18, 23, 43, 75, 11]"


def run_tiny(tmp_path, *overrides: str) -> tuple[list[dict], list[dict]]:
    """Train the tiny task; return the metrics history and the rows of alarms.jsonl."""
    from rlhf_ppo.trainer import PPOTrainer

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "threads=1", *overrides])
    history = PPOTrainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "alarms.jsonl").read_text().splitlines()]
    on_disk = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in m.items() if k.startswith("alarm/")} for m in on_disk] == \
        [{k: v for k, v in m.items() if k.startswith("alarm/")} for m in history]
    return history, rows


def fired_at(history: list[dict], rows: list[dict]) -> dict[str, list[int]]:
    """``{alarm: [iterations]}`` from the metrics, checked against alarms.jsonl."""
    out: dict[str, list[int]] = {}
    for m in history:
        for key in m:
            if key.startswith("alarm/"):
                out.setdefault(key.removeprefix("alarm/"), []).append(m["iteration"])
    assert sorted((r["iteration"], r["alarm"]) for r in rows) == \
        sorted((i, name) for name, its in out.items() for i in its)
    return out


@pytest.mark.slow
def test_wiring_on_a_short_run_with_a_planted_threshold(tmp_path, caplog):
    """Three iterations, a length alarm at any 1% change after a 1-iteration warm-up: the alarm
    reaches the log, alarms.jsonl and the metrics; resuming keeps the file consistent."""
    over = ("iterations=3", "ppo.batch_size=8", "ppo.ppo_epochs=1", "save_every=1", "keep_last=0",
            "alarms.warmup=1", "alarms.window=1", "alarms.length_ratio=1.01")
    with caplog.at_level(logging.WARNING, logger="rlhf_ppo.alarms"):
        history, rows = run_tiny(tmp_path, *over)
    fired = fired_at(history, rows)
    assert "length_drift" in fired and fired["length_drift"][0] == 2
    assert "alarm length_drift at iteration 2: " in caplog.text
    assert all(0.0 <= m["response/repeated_ngram_share"] <= 1.0 for m in history)
    # resumed from iteration 1 (before any alarm): the same alarms, the same file
    resumed, rows2 = run_tiny(tmp_path, *over, f"resume_from={tmp_path}/checkpoint-1")
    assert rows2 == rows and [m.get("alarm/length_drift") for m in resumed] == \
        [m.get("alarm/length_drift") for m in history]


@pytest.mark.slow
def test_a_normal_tiny_run_fires_nothing(tmp_path):
    history, rows = run_tiny(tmp_path, "iterations=12")
    assert rows == [] and not any(k.startswith("alarm/") for m in history for k in m)


def test_a_reward_for_length_fires_length_drift(tmp_path):
    history, rows = run_tiny(tmp_path, "iterations=10", f"generation.stop_token_ids={STOP_IDS}",
                             "reward.sources=[{function: 'rlhf_ppo.rewards:response_length'}]")
    fired = fired_at(history, rows)
    # lengths 5.9, 5.0, 8.1, 7.8, 11.1, ...: the baseline 6.3 (iterations 1-3), x 1.5 = 9.5
    assert set(fired) == {"length_drift"} and fired["length_drift"][0] <= 9, fired
    print({m["iteration"]: round(m["response_length"], 1) for m in history}, fired)


@pytest.mark.slow
def test_a_reward_for_repetition_fires_repetition(tmp_path):
    history, rows = run_tiny(tmp_path, "iterations=20",
                             f"reward.sources=[{{function: '{__file__}:repeat_great'}}]")
    fired = fired_at(history, rows)
    # the share of repeated 3-grams jumps at iteration 15 (0.02 -> 0.12); fires at 16 on this CPU
    assert "repetition" in fired and 12 <= fired["repetition"][0] <= 19, fired
    print({m["iteration"]: round(m["response/repeated_ngram_share"], 3) for m in history}, fired)


def test_a_critic_learning_rate_100x_too_high_fires_explained_variance(tmp_path):
    history, rows = run_tiny(tmp_path, "iterations=6", "optim.critic_lr=0.3")  # tiny: 3e-3
    fired = fired_at(history, rows)
    assert set(fired) == {"explained_variance"} and fired["explained_variance"] == [4], fired
    print({m["iteration"]: round(m["explained_variance"], 2) for m in history}, fired)
