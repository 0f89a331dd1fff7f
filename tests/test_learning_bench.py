"""scripts/bench/learning_bench.py: the TRL settings mapping, the J statistics, the divergence flag and
the report writer (no training, no TRL needed)."""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
import learning_bench as lb  # noqa: E402

from rlhf_ppo.quickstart import stage_configs  # noqa: E402


@pytest.fixture()
def quickstart_ppo(tmp_path):
    data = {k: str(tmp_path / f"{k}.jsonl") for k in ("sft", "pairs", "prompts")}
    return {k: v for k, v in stage_configs(tmp_path, data)["ppo"].items() if k != "output_dir"}


def test_trl_settings_match_the_quickstart_config(quickstart_ppo):
    cfg = dict(quickstart_ppo, seed=3, iterations=7)
    s = lb.trl_settings(cfg)
    full = lb.full_config(cfg)  # the built config: the task module may write either layout
    p, o, g = full["ppo"], full["optim"], full["generation"]
    # TRL: local_batch_size = per_device_train_batch_size * gradient_accumulation_steps is the
    # rollout batch; minibatch = local_batch_size / num_mini_batches; optimizer steps happen
    # every gradient_accumulation_steps micro-batches -> one per minibatch needs no accumulation
    local_batch = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
    assert local_batch == p["batch_size"] == 32
    assert s["gradient_accumulation_steps"] == 1
    assert s["num_mini_batches"] == p["num_minibatches"]
    assert local_batch // s["num_mini_batches"] == p["batch_size"] // p["num_minibatches"]
    assert s["total_episodes"] == 7 * p["batch_size"]
    assert math.ceil(s["total_episodes"] / local_batch) == 7  # TRL's num_total_batches
    assert s["num_ppo_epochs"] == p["ppo_epochs"]
    assert s["learning_rate"] == o["lr"]
    assert s["lr_scheduler_type"] == "constant"  # TRL's own default is linear
    assert s["warmup_steps"] == 0
    assert s["max_grad_norm"] == 1.0  # rlhf_ppo's default (TRL passes it but never clips)
    assert s["temperature"] == 1.0  # TRL's own default is 0.7
    assert s["response_length"] == g["max_new_tokens"] == 28
    assert s["kl_coef"] == p["kl"]["coef"] == 0.5
    assert s["kl_estimator"] == "k1"
    assert s["vf_coef"] == p["critic"]["vf_coef"]
    assert (s["cliprange"], s["cliprange_value"], s["gamma"], s["lam"]) == (0.2, 0.2, 1.0, 0.95)
    assert s["whiten_rewards"] is False
    assert s["stop_token"] == "eos"
    assert s["missing_eos_penalty"] is None
    assert s["num_sample_generations"] == 0
    assert (s["save_strategy"], s["report_to"], s["bf16"], s["fp16"]) == ("no", "none", False, False)
    assert s["gradient_checkpointing"] is False
    assert s["seed"] == 3
    notes = " ".join(lb.trl_unmatched(cfg))
    assert "critic_lr" in notes and "never clips" in notes and "scale_value_loss" in notes
    # the quickstart's critic starts from the reward model, as TRL's value model does ...
    assert "model.critic" not in notes and "ppo.critic.lam=1.0" in notes
    # ... a shared head is reported as a difference
    shared = copy.deepcopy(cfg)
    shared["model"].update(critic="shared", critic_init="policy")
    assert "model.critic=shared" in " ".join(lb.trl_unmatched(shared))


def test_trl_settings_other_values_and_refusals(quickstart_ppo):
    from rlhf_ppo.config import apply_overrides

    cfg = apply_overrides(json.loads(json.dumps(quickstart_ppo)), [
        "ppo.kl.estimator=k3", "optim.scheduler=cosine", "optim.warmup_steps=10",
        "generation.temperature=0.8", "reward.missing_stop_penalty=1.5",
        "ppo.critic.value_clip=null", "optim.max_grad_norm=null"])
    s = lb.trl_settings(cfg)
    assert s["kl_estimator"] == "k3" and s["lr_scheduler_type"] == "cosine"
    assert s["warmup_steps"] == 3  # 10 optimizer steps / 4 per iteration, rounded up
    assert s["temperature"] == 0.8 and s["missing_eos_penalty"] == 1.5
    assert s["cliprange_value"] >= 1e9 and s["max_grad_norm"] == 0.0
    with pytest.raises(ValueError, match="k1 and k3"):
        lb.trl_settings(apply_overrides(json.loads(json.dumps(quickstart_ppo)),
                                        ["ppo.kl.estimator=k2"]))
    with pytest.raises(ValueError, match="one reward model"):
        lb.trl_settings(apply_overrides(json.loads(json.dumps(quickstart_ppo)),
                                        ["reward.sources=[{function: a.b:c}]",
                                         "model.critic_init=policy"]))


def test_trl_settings_and_run_config_read_either_layout(tmp_path):
    # a task module may still write the keys of before the `ppo` sections: same TRL settings,
    # same notes, same run config (in the current layout) as the sectioned keys
    reward = {"sources": [{"model": "/r"}]}
    old = {"reward": reward, "ppo": {"batch_size": 32, "micro_batch_size": 16, "kl_coef": 0.5,
                                     "critic_lam": 1.0, "whiten_advantages": False}}
    new = {"reward": reward, "ppo": {"batch_size": 32, "forward": {"micro_batch_size": 16},
                                     "kl": {"coef": 0.5}, "critic": {"lam": 1.0},
                                     "advantages": {"whiten": False}}}
    assert lb.trl_settings(old) == lb.trl_settings(new)
    assert lb.trl_unmatched(old) == lb.trl_unmatched(new)
    assert "ppo.advantages.whiten=False" in " ".join(lb.trl_unmatched(new))
    task = {"policy": "/p", "reward": "/r"}
    assert (lb.run_config(dict(task, ppo=old), [], 0.1, 0, 3, tmp_path)
            == lb.run_config(dict(task, ppo=new), [], 0.1, 0, 3, tmp_path))
    # null whitening is the estimator's rule: GRPO never whitens (TRL always does)
    grpo = {"reward": reward, "ppo": {"advantage_estimator": "grpo", "samples_per_prompt": 4}}
    assert "ppo.advantages.whiten=False" in " ".join(lb.trl_unmatched(grpo))
    assert "ppo.advantages.whiten" not in " ".join(lb.trl_unmatched({"reward": reward}))


def test_run_config_and_variants(quickstart_ppo, tmp_path):
    task = {"ppo": quickstart_ppo, "policy": "/p", "reward": "/r", "prompts": "/x.jsonl",
            "eval": {"num_prompts": 20, "samples_per_prompt": 32, "max_new_tokens": 28}}
    [(name, opts)] = lb.parse_variants(
        ["separate=model.critic=separate,model.critic_name_or_path={reward}"], "--variants")
    cfg = lb.run_config(task, opts, 0.1, 2, 5, tmp_path / "train")
    assert name == "separate" and cfg["model"]["critic"] == "separate"
    assert cfg["model"]["critic_name_or_path"] == "/r"
    assert (cfg["ppo"]["kl"]["coef"], cfg["seed"], cfg["iterations"], cfg["sample_every"]) == (0.1, 2, 5, 0)
    assert lb.full_config(quickstart_ppo)["ppo"]["kl"]["coef"] == 0.5  # the task's config is not changed
    ev = lb.eval_config(task, "/run/final", tmp_path / "eval", 0)
    assert ev["reference"] == "/p" and ev["data"] == {"path": "/x.jsonl", "shuffle": False}
    assert ev["reward"]["sources"] == [{"model": "/r"}]
    assert (ev["num_prompts"], ev["samples_per_prompt"], ev["generation"]["max_new_tokens"]) == (20, 32, 28)
    assert lb.parse_variants(["shipped="], "--variants") == [("shipped", [])]
    with pytest.raises(SystemExit):
        lb.parse_variants(["no-equals-sign"], "--variants")


def fake_rows() -> list[dict]:
    def row(label, kl_coef, seed, score, kl, ref=1.0, **kw):
        return {"label": label, "trainer": label.split("/")[0], "kl_coef": kl_coef, "seed": seed,
                "iterations": 10, "eval_seed": 0, "score": score, "kl": kl, "ref_score": ref,
                "s_per_iter": 0.5, "status": "ok", "task": "fake",
                "key": f"{label}{kl_coef}{seed}", **kw}
    return [
        row("rlhf_ppo/shipped", 0.5, 0, 5.0, 2.0),
        row("rlhf_ppo/shipped", 0.5, 1, 6.0, 3.0),
        row("rlhf_ppo/shipped", 0.5, 2, 4.0, 1.0),
        row("trl/default", 0.5, 0, 3.0, 1.0),
        row("trl/default", 0.5, 1, 3.5, 30.0),          # KL 30 > 10 x median(1, 2) = 15
        row("trl/default", 0.5, 2, 0.5, 0.5),           # score below the reference's 1.0
        row("rlhf_ppo/shipped", 2.5, 0, 2.0, 0.2),
        row("trl/default", 2.5, 0, None, None, status="nonfinite", nonfinite=True),
        row("trl/default", 2.5, 1, 2.5, 0.1),
    ]


def test_aggregation_by_hand():
    groups = {(g["label"], g["kl_coef"]): g for g in lb.aggregate(fake_rows())}
    j = [5.0 - 0.5 * 2.0, 6.0 - 0.5 * 3.0, 4.0 - 0.5 * 1.0]  # 4.0, 4.5, 3.5
    g = groups[("rlhf_ppo/shipped", 0.5)]
    assert g["n"] == 3 and g["n_j"] == 3
    assert g["J_mean"] == pytest.approx(4.0)
    assert g["J_std"] == pytest.approx(statistics.stdev(j)) == pytest.approx(0.5)
    assert g["J_min"] == pytest.approx(3.5)
    assert g["score_mean"] == pytest.approx(5.0) and g["kl_mean"] == pytest.approx(2.0)
    assert g["diverged"] == 0 and g["s_per_iter"] == pytest.approx(0.5)
    t = groups[("trl/default", 0.5)]
    tj = [3.0 - 0.5, 3.5 - 15.0, 0.5 - 0.25]
    assert t["J_mean"] == pytest.approx(sum(tj) / 3) and t["J_min"] == pytest.approx(-11.5)
    assert t["diverged"] == 2
    one = groups[("rlhf_ppo/shipped", 2.5)]
    assert one["J_mean"] == pytest.approx(2.0 - 2.5 * 0.2) and one["J_std"] == 0.0
    nan = groups[("trl/default", 2.5)]
    assert nan["n"] == 2 and nan["n_j"] == 1 and nan["diverged"] == 1
    assert nan["J_mean"] == pytest.approx(2.5 - 0.25)
    assert [(g["label"], g["kl_coef"]) for g in lb.aggregate(fake_rows())] == [
        ("rlhf_ppo/shipped", 0.5), ("rlhf_ppo/shipped", 2.5), ("trl/default", 0.5),
        ("trl/default", 2.5)]


def test_divergence_flags():
    flags = {(r["label"], r["kl_coef"], r["seed"]): r for r in lb.annotate(fake_rows())}
    assert not any(flags[("rlhf_ppo/shipped", 0.5, s)]["diverged"] for s in (0, 1, 2))
    assert not flags[("trl/default", 0.5, 0)]["diverged"]
    assert "KL" in flags[("trl/default", 0.5, 1)]["diverged_reason"]
    assert flags[("trl/default", 0.5, 2)]["diverged_reason"] == "J below the reference's"
    assert flags[("trl/default", 2.5, 0)]["diverged_reason"] == "non-finite"
    assert flags[("trl/default", 2.5, 0)]["J"] is None
    # near-zero KLs of the other seeds: the floor keeps a small KL from counting as a blow-up
    assert not flags[("trl/default", 2.5, 1)]["diverged"]
    assert lb.objective({"score": 3.0, "kl": 2.0, "kl_coef": 0.25}) == pytest.approx(2.5)


def test_report_only_writes_table_and_png(tmp_path, capsys):
    with open(tmp_path / "runs.jsonl", "w") as f:
        for r in fake_rows():
            f.write(json.dumps(r) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({
        "task": "fake", "command": "learning_bench.py --seeds 0 1 2", "jobs": 2,
        "versions": {"torch": "x", "transformers": "y", "trl": "z"},
        "trl_unmatched": ["a note"]}))
    assert lb.main(["--report-only", "--output-dir", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "### kl_coef 0.5" in table and "### kl_coef 2.5" in table
    assert "| rlhf_ppo/shipped | 4.000 ± 0.500 | 3.500 |" in table
    assert "torch x, transformers y, trl z" in table and "- a note" in table
    assert "J below the reference's" in table
    png = (tmp_path / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "wrote" in capsys.readouterr().out


def test_a_trl_run_needs_the_trl_python(tmp_path, monkeypatch):
    """No machine-specific default: without --trl-python or $RLHF_PPO_TRL_PYTHON the benchmark
    stops before any work and says how to make the TRL venv (or to pass --no-trl)."""
    monkeypatch.delenv("RLHF_PPO_TRL_PYTHON", raising=False)
    assert lb.parse_args([]).trl_python is None
    with pytest.raises(SystemExit, match=r"(?s)python3 -m venv trl-venv.*trl==1\.12\.0.*--no-trl"):
        lb.main(["--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such interpreter"):
        lb.main(["--output-dir", str(tmp_path), "--trl-python", str(tmp_path / "python")])
    assert not (tmp_path / "task").exists() and not (tmp_path / "meta.json").exists()
