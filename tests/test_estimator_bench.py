"""scripts/bench/estimator_bench.py: the run settings (equal responses per iteration for every
estimator) and the report (table and plot) from saved results, without training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
import estimator_bench as eb  # noqa: E402

from rlhf_ppo import estimators  # noqa: E402
from rlhf_ppo.config import config_from_dict, set_dotted  # noqa: E402


def _result(out: Path, name: str, seed: int, acc: float, group: int) -> None:
    run = out / "runs" / f"{name.split()[0]}-seed{seed}"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({
        "estimator": name, "seed": seed, "group": group, "curve": [0.3, 0.4 + seed / 10, 0.5],
        "s_per_iter": 1.0 + seed, "train_seconds": 3.0, "accuracy": acc, "sft_accuracy": 0.35,
        "pass@8": 0.9, "pass@1": acc, "peak_rss_mb": 400.0 + seed}))


def test_report_table_has_mean_and_spread_over_seeds(tmp_path):
    _result(tmp_path, "ppo (gae)", 0, 0.5, 1)
    _result(tmp_path, "ppo (gae)", 1, 0.7, 1)
    _result(tmp_path, "grpo", 0, 0.6, 4)
    text = eb.report(tmp_path)
    # mean 0.6, sample sd sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    assert "| ppo (gae) | 1 | 0.600 ± 0.141 | 0.600 | 0.900 | 1.50 | 400 | 2 |" in text
    assert "| grpo | 4 | 0.600 ± 0.000 | 0.600 | 0.900 | 1.00 | 400 | 1 |" in text
    assert "test accuracy 0.350" in text and (tmp_path / "estimators.png").is_file()


def test_every_estimator_config_is_valid_with_its_group():
    for name, overrides in eb.ESTIMATORS.items():
        group = 1 if estimators.get(overrides["ppo.advantage_estimator"]).critic else 4
        data = {"ppo": {"batch_size": 256, "samples_per_prompt": group}}
        for key, value in {**overrides, "ppo.forward.micro_batch_size": 128}.items():
            set_dotted(data, key, value)
        cfg = config_from_dict(data)
        assert cfg.ppo.batch_size // cfg.ppo.samples_per_prompt == (256 if group == 1 else 64), name
