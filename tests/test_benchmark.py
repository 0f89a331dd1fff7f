"""scripts/bench/benchmark.py: a 2-iteration run on the tiny benchmark model prints one JSON line with
every figure, and the helpers behind the comparison table compute what they claim."""

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "bench"
sys.path.insert(0, str(SCRIPTS))

import benchmark  # noqa: E402
import make_bench_models  # noqa: E402

REQUIRED = {"s_per_iter", "s_per_iter_all", "cpu_s_per_iter", "rollout", "ref_and_reward",
            "update", "other", "gen_tokens_per_s", "train_tokens_per_s", "peak_rss_mb", "bare",
            "ppo_over_bare", "optimizer_steps_per_iter", "load_avg_start", "load_avg_end"}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_models")
    summary = make_bench_models.build("tiny", out)
    return out / "tiny", summary


def test_bench_models_have_the_documented_size_and_no_eos(tiny_bench):
    folder, summary = tiny_bench
    # vocab 4096 x hidden 48 (tied) + 2 layers x (q,o 48x48; k,v 48x24; MLP 3 x 48x128;
    # 2 norms of 48) + final norm 48
    per_layer = 2 * 48 * 48 + 2 * 48 * 24 + 3 * 48 * 128 + 2 * 48
    assert summary["policy_params"] == 4096 * 48 + 2 * per_layer + 48
    assert benchmark.model_shape(str(folder / "policy"))["params"] == summary["policy_params"]
    assert not benchmark.has_eos(str(folder / "policy"))


def test_benchmark_runs_two_iterations_and_prints_the_figures(tiny_bench, capsys, tmp_path,
                                                               monkeypatch):
    folder, _ = tiny_bench
    monkeypatch.setenv("RLHF_PPO_CACHE", str(tmp_path / "cache"))
    B, P, R = 8, 6, 5
    code = benchmark.main(["--policy", str(folder / "policy"), "--reward", str(folder / "reward"),
                           "--batch", str(B), "--mini-batches", "2", "--epochs", "1",
                           "--prompt-len", str(P), "--response-len", str(R), "--iters", "2",
                           "--threads", "1", "--bare-repeats", "1", "--n-prompts", "16"])
    assert code == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert REQUIRED <= set(res)
    assert res["side"] == "rlhf_ppo" and res["optimizer_steps_per_iter"] == 2
    assert len(res["s_per_iter_all"]) == 2 and res["s_per_iter"] == res["s_per_iter_all"][1]
    for k in ("s_per_iter", "rollout", "ref_and_reward", "update", "peak_rss_mb"):
        assert res[k] > 0, k
    # the phases are parts of the iteration
    assert res["rollout"] + res["ref_and_reward"] + res["update"] <= res["s_per_iter"] * 1.01
    # exactly R tokens per response: generated tokens/s is B * R over the rollout seconds
    assert res["gen_tokens_per_s"] == pytest.approx(B * R / res["rollout"], rel=1e-2)
    assert res["train_tokens_per_s"] == pytest.approx(B * (P + R) / res["update"], rel=1e-2)
    bare = res["bare"]
    assert {"generate", "ref_forward", "reward_forward", "update", "sum"} <= set(bare)
    parts = bare["generate"] + bare["ref_forward"] + bare["reward_forward"] + bare["update"]
    assert bare["sum"] == pytest.approx(parts, abs=1e-3)
    assert res["ppo_over_bare"] == pytest.approx(res["s_per_iter"] / bare["sum"], rel=1e-2)


def test_prompts_have_exactly_the_asked_length(tiny_bench, tmp_path):
    from transformers import AutoTokenizer

    folder, _ = tiny_bench
    path = benchmark.write_prompts(tmp_path / "p.jsonl", str(folder / "policy"), 5, 7)
    tok = AutoTokenizer.from_pretrained(folder / "policy")
    rows = [json.loads(x)["prompt"] for x in path.read_text().splitlines()]
    assert len(rows) == 5 and all(len(tok(r)["input_ids"]) == 7 for r in rows)


def test_update_flops_by_hand():
    shape = {"layers": 2, "hidden": 4, "vocab": 10, "nonembed_params": 100, "params": 140}
    # L = 3 + 2 = 5: backbone 2*100*5 + attention 2*2*5*5*4 = 1000 + 400; head 2*4*10*2 = 160
    forward = 1000 + 400 + 160
    assert benchmark.update_model_flops(shape, 8, 2, 3, 2, "shared") == 3 * forward * 8 * 2
    # a separate critic adds its backbone (its one-output head is left out)
    assert benchmark.update_model_flops(shape, 8, 2, 3, 2, "separate") == 3 * (forward + 1400) * 16


def test_pool_and_table_ratios():
    def run(s, iters, rss, **kw):
        return {"s_per_iter": s, "s_per_iter_all": iters, "rollout": 1.0, "ref_and_reward": 0.5,
                "update": 0.5, "other": 0.0, "gen_tokens_per_s": 10.0, "train_tokens_per_s": 5.0,
                "peak_rss_mb": rss, "cpu_s_per_iter": s, **kw}

    # pooled median over the iterations after each round's first: [2, 4] + [3, 5] -> 3.5
    ours = benchmark.pool([
        run(3, [9, 2, 4], 100.0, bare={"sum": 1.5, "cpu_sum": 1.5}, ppo_over_bare=2.0,
            cpu_ppo_over_bare=2.0),
        run(4, [9, 3, 5], 120.0, bare={"sum": 1.0, "cpu_sum": 1.0}, ppo_over_bare=4.0,
            cpu_ppo_over_bare=4.0)])
    assert ours["s_per_iter"] == 3.5 and ours["peak_rss_mb"] == 120.0
    # iteration over bare phases: each round's own ratio, then the median over rounds
    assert ours["ppo_over_bare"] == 3.0 and ours["bare"]["sum"] == 1.25
    trl = benchmark.pool([run(6, [9, 6, 6], 200.0), run(10, [9, 10, 10], 180.0)])
    table = benchmark.markdown_table([("small:rlhf_ppo/shared", ours), ("small:trl", trl)])
    row = next(x for x in table.splitlines() if "rlhf_ppo/shared" in x)
    # vs TRL: the median of the per-round ratios 3/6 and 4/10 (not the pooled 3.5 / 8 = 0.44);
    # RSS: 120 / 200
    assert "| 0.45x |" in row and "| 0.60x |" in row
    assert "0.44x" not in row


def test_checkpointing_variants_run_with_the_flag_and_trl_without(monkeypatch, tmp_path):
    """``--critics shared shared+ckpt``: one process per variant, only the ``+ckpt`` one with
    ``--gradient-checkpointing`` (which the rlhf_ppo config turns into
    model.gradient_checkpointing); TRL's command never gets it."""
    cmds = []

    def child(cmd):
        cmds.append(cmd)
        return {"error": "not run", "cmd": " ".join(cmd)}

    monkeypatch.setattr(benchmark, "_child", child)
    monkeypatch.setattr(benchmark, "write_prompts", lambda path, *a: path)
    monkeypatch.setattr(benchmark, "has_eos", lambda policy: False)
    args = benchmark.parse_args(["--policy", "p", "--reward", "r", "--rounds", "1",
                                 "--critics", "shared", "shared+ckpt",
                                 "--compare-trl", "/trl/python"])
    res = benchmark.compare(args, "p", "r", args.critics)
    assert list(res) == ["rlhf_ppo/shared", "rlhf_ppo/shared+ckpt", "trl"]
    plain, ckpt, trl = cmds
    assert "--gradient-checkpointing" not in plain and "--gradient-checkpointing" in ckpt
    assert ckpt[ckpt.index("--critic") + 1] == "shared"
    assert trl[0] == "/trl/python" and "--gradient-checkpointing" not in trl
    for argv, flag in ((ckpt, True), (plain, False)):
        cfg = benchmark.rlhf_config(benchmark.parse_args(argv[2:]), tmp_path / "p.jsonl",
                                    str(tmp_path / "run"))
        assert cfg.model.gradient_checkpointing is flag
    with pytest.raises(SystemExit):  # an unknown variant is a usage error
        benchmark.parse_args(["--policy", "p", "--reward", "r", "--critics", "shared+fast"])


def test_trl_python_comes_from_the_option_or_the_environment(monkeypatch, capsys):
    """``--compare-trl`` names the TRL venv's python, or takes it from ``--trl-python`` or
    ``$RLHF_PPO_TRL_PYTHON``; without any, the run stops with how to make the venv."""
    base = ["--policy", "p", "--reward", "r"]
    monkeypatch.delenv("RLHF_PPO_TRL_PYTHON", raising=False)
    assert benchmark.parse_args(base).compare_trl is None
    assert benchmark.parse_args([*base, "--compare-trl", "/a/python"]).compare_trl == "/a/python"
    assert benchmark.parse_args([*base, "--compare-trl", "--trl-python", "/b/python"]
                                ).compare_trl == "/b/python"
    with pytest.raises(SystemExit, match=r"python3 -m venv trl-venv && trl-venv/bin/pip install "
                                         r"torch==2\.13\.0 && trl-venv/bin/pip install trl==1\.12\.0"):
        benchmark.main([*base, "--compare-trl"])
    with pytest.raises(SystemExit, match="/no/such/python: no such interpreter"):
        benchmark.main([*base, "--compare-trl", "/no/such/python"])
    monkeypatch.setenv("RLHF_PPO_TRL_PYTHON", sys.executable)
    args = benchmark.parse_args([*base, "--compare-trl"])
    assert benchmark.resolve_trl_python(args.compare_trl) == sys.executable
