"""The shell recipes in scripts/: every script parses (``bash -n``), the recipes keep their form
(usage header, ``set -euo pipefail``, short), scripts/README.md lists every script, and
``scripts/pipeline.sh`` runs SFT -> reward model -> PPO -> evaluate end to end on its offline
defaults (about 40 s on 2 CPU cores)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
SHELL_SCRIPTS = sorted(SCRIPTS.rglob("*.sh"))
RECIPES = sorted(SCRIPTS.glob("*.sh"))

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_the_recipes_and_gpu_scripts_are_there():
    names = {p.relative_to(SCRIPTS).as_posix() for p in SHELL_SCRIPTS}
    assert {"pipeline.sh", "ppo_multi_gpu.sh", "lora_smollm2.sh", "gpu/gpu_bench.sh",
            "gpu/gpu_check.sh", "gpu/gpu_session.sh"} <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(SCRIPTS).as_posix())
def test_shell_script_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: p.name)
def test_recipe_form(script):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert len(lines) < 80
    assert "set -euo pipefail" in lines
    header = lines[1:lines.index("set -euo pipefail")]
    assert all(x.startswith("#") or not x.strip() for x in header)
    assert any("Usage: " in x and f"bash scripts/{script.name}" in x for x in header)


def test_readme_lists_every_script():
    readme = (SCRIPTS / "README.md").read_text()
    for path in [*SCRIPTS.glob("*.sh"), *SCRIPTS.glob("bench/*.py"), *SCRIPTS.glob("gpu/*.sh")]:
        assert path.relative_to(SCRIPTS).as_posix() in readme, path


def test_multi_gpu_recipe_refuses_an_unknown_engine_and_a_bad_count():
    run = lambda *a: subprocess.run(["bash", str(SCRIPTS / "ppo_multi_gpu.sh"), *a],  # noqa: E731
                                    capture_output=True, text=True)
    res = run("2", "zero9")
    assert res.returncode == 2 and "deepspeed_zero3" in res.stderr and "fsdp" in res.stderr
    res = run("two", "fsdp")
    assert res.returncode == 2 and "number of processes" in res.stderr


@pytest.mark.slow  # ~40 s; the quickstart test covers the same stages in the default suite
def test_pipeline_end_to_end(tmp_path):
    """The tiny defaults, with one override per stage prefix to check where each goes."""
    out = tmp_path / "pipe"
    env = dict(os.environ, RLHF_PPO=f"{sys.executable} -m rlhf_ppo", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    res = subprocess.run(["bash", str(SCRIPTS / "pipeline.sh"), str(out), "seed=5",
                          "reward:seed=3", "evaluate:samples_per_prompt=2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sft, rm, policy = out / "sft" / "final", out / "reward" / "final", out / "ppo" / "final"
    for folder in (sft, rm, policy):
        assert (folder / "config.json").is_file(), folder

    # each stage starts from the previous stage's output
    stage = {name: yaml.safe_load((out / name / "config.yaml").read_text())
             for name in ("sft", "reward", "ppo")}
    assert stage["sft"]["data"]["path"] == str(ROOT / "configs" / "data" / "sft_tiny.jsonl")
    assert stage["reward"]["model"]["name_or_path"] == str(sft)
    assert stage["ppo"]["model"]["name_or_path"] == str(sft)
    assert [s["model"] for s in stage["ppo"]["reward"]["sources"]] == [str(rm)]
    assert (stage["sft"]["seed"], stage["reward"]["seed"], stage["ppo"]["seed"]) == (0, 3, 5)

    # PPO ran the configured number of iterations
    iterations = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["iterations"]
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, iterations + 1))

    # the evaluation scored the PPO policy against the SFT model with the reward model
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert Path(summary["policy_path"]).resolve() == policy.resolve()
    assert Path(summary["reference_path"]).resolve() == sft.resolve()
    assert summary["samples_per_prompt"] == 2
    for side in ("policy", "reference"):
        assert math.isfinite(summary[side]["score"]["mean"])
    assert (out / "eval" / "report.html").is_file()
    assert f"done: {out}/eval/report.html" in res.stdout
