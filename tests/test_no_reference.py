"""A run without KL (``ppo.kl.coef`` 0, no adaptive controller, no KL loss) has no reference model:
none is built and none runs, its policy updates are those of a run that has one (the reference
fed only the ``kl`` metric there), its ``kl`` metric is NaN, and it resumes exactly. Any KL setting
brings the reference back."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ppo import PPOTrainer, load_config
from rlhf_ppo import models as models_module
from rlhf_ppo.ppo_config import KLConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["ppo.batch_size=8", "ppo.forward.micro_batch_size=4", "generation.max_new_tokens=8",
         "ppo.forward.inference_batch_size=4", "sample_every=0"]
GRPO = ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.critic.vf_coef=0.1",
        "optim.critic_lr=null"]  # tiny.yaml's critic settings, back at their defaults
NO_KL = ["ppo.kl.coef=0"]
TIMING = ("time/", "tokens_per_second")
# what reads the reference: the metrics of the KL, and nothing else without a KL setting
KL_METRICS = ("kl", "reward_kl_penalty")
ESTIMATORS = {"shared-head": [], "grpo": GRPO}


def cfg_for(out, *overrides):
    return load_config(TINY, [f"output_dir={out}", *SMALL, *overrides])


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def without(m: dict, keys=()) -> str:
    """``m`` less its timings and ``keys``, as JSON (so that NaN equals NaN)."""
    return json.dumps({k: v for k, v in m.items() if not k.startswith(TIMING) and k not in keys},
                      sort_keys=True)


@pytest.fixture
def counts(monkeypatch) -> dict[str, int]:
    """How many reference models were built and how many reference forward passes ran."""
    n = {"built": 0, "forwards": 0}
    init, forward = models_module.ReferenceModel.__init__, models_module.ReferenceModel.forward

    def counted_init(self, *args, **kwargs):
        n["built"] += 1
        init(self, *args, **kwargs)

    def counted_forward(self, *args, **kwargs):
        n["forwards"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(models_module.ReferenceModel, "__init__", counted_init)
    monkeypatch.setattr(models_module.ReferenceModel, "forward", counted_forward)
    return n


@pytest.mark.parametrize(("coef", "adaptive", "loss_coef", "reads"), [
    (0.0, False, 0.0, False),
    (0.05, False, 0.0, True),  # the penalty in the rewards
    (0.0, True, 0.0, True),  # the adaptive controller measures the KL
    (0.0, False, 0.1, True),  # the KL loss term
])
def test_reads_reference_is_any_kl_setting(coef, adaptive, loss_coef, reads):
    assert KLConfig(coef=coef, adaptive=adaptive, loss_coef=loss_coef).reads_reference() is reads


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_without_kl_no_reference_is_built_or_run(tmp_path, counts, caplog, estimator):
    """The shared head and a critic-free estimator: no reference object, no reference forward,
    the `kl` metric NaN (null in metrics.jsonl), no KL penalty in the rewards, and the start
    lines say so."""
    caplog.set_level("INFO", logger="rlhf_ppo.trainer")
    trainer = PPOTrainer(cfg_for(tmp_path, "iterations=2", *ESTIMATORS[estimator], *NO_KL))
    assert trainer.ref is None and counts["built"] == 0
    history = trainer.train()
    assert counts == {"built": 0, "forwards": 0}
    assert all(math.isnan(m["kl"]) and m["reward_kl_penalty"] == 0.0 and m["kl_coef"] == 0.0
               and m["kl_loss"] == 0.0 for m in history)
    assert all(math.isfinite(m["policy_loss"]) and m["ppo_steps"] == 8 for m in history)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["kl"] for m in lines] == [None, None]
    assert "reference: none, nothing reads it" in caplog.text
    # the checkpoint holds the policy (and critic) alone, as with a reference
    saved = torch.load(tmp_path / "checkpoint-2" / "training_state" / "optimizer.pt",
                       weights_only=True)
    assert len(saved["param_groups"]) == (1 if estimator == "grpo" else 2)


def test_lora_without_kl_runs_no_reference_pass(tmp_path, counts):
    """With LoRA the reference is the policy with its adapter off: free in memory, but a forward
    pass per batch; without KL that pass is gone too."""
    trainer = PPOTrainer(cfg_for(tmp_path, "iterations=1", "peft.enabled=true", *GRPO, *NO_KL))
    assert trainer.ref is None
    trainer.train()
    assert counts == {"built": 0, "forwards": 0}


@pytest.mark.parametrize("setting", [
    ["ppo.kl.coef=0.05"],
    ["ppo.kl.coef=0", "ppo.kl.adaptive=true"],
    ["ppo.kl.coef=0", "ppo.kl.loss_coef=0.1"],
])
def test_any_kl_setting_builds_and_runs_the_reference(tmp_path, counts, setting):
    """One reference built; one forward per inference batch: 8 rows in batches of 4, 2."""
    trainer = PPOTrainer(cfg_for(tmp_path, "iterations=1", *GRPO, *setting))
    assert trainer.ref is not None and counts["built"] == 1
    m = trainer.step()
    assert counts["forwards"] == 2
    assert math.isfinite(m["kl"]) and m["reward_kl_penalty"] == -m["kl_coef"] * m["kl"]


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_updates_equal_those_of_a_run_with_the_reference(tmp_path, monkeypatch, estimator):
    """Without KL the reference fed only the KL metrics: a run forced to build and run it (the
    code path of before) reaches bit-identical weights and the same other metrics."""
    overrides = ["iterations=3", *ESTIMATORS[estimator], *NO_KL]
    without_ref = PPOTrainer(cfg_for(tmp_path / "none", *overrides))
    a = without_ref.train()
    with monkeypatch.context() as m:
        m.setattr(KLConfig, "reads_reference", lambda self: True)
        with_ref = PPOTrainer(cfg_for(tmp_path / "ref", *overrides))
    assert with_ref.ref is not None
    b = with_ref.train()
    wa, wb = weights(without_ref), weights(with_ref)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [without(m, KL_METRICS) for m in a] == [without(m, KL_METRICS) for m in b]
    assert all(math.isfinite(m["kl"]) for m in b)  # measured there, but read by nothing else


def test_resume_without_reference_is_exact(tmp_path):
    full = PPOTrainer(cfg_for(tmp_path / "full", "iterations=4", *GRPO, *NO_KL))
    full.train()
    PPOTrainer(cfg_for(tmp_path / "part", "iterations=2", *GRPO, *NO_KL)).train()
    resumed = PPOTrainer(cfg_for(tmp_path / "part", "iterations=4", "resume_from=latest", *GRPO,
                                 *NO_KL))
    assert resumed.iteration == 2 and resumed.ref is None
    resumed.train()

    def lines(out):
        return [without(json.loads(x)) for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert lines(tmp_path / "full") == lines(tmp_path / "part")  # exact; kl null in both
    wa, wb = weights(full), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_report_and_alarms_cope_without_kl(tmp_path):
    """The training report leaves the KL chart out (a coefficient, no KL) and keeps the others;
    the KL alarm never fires on NaN."""
    PPOTrainer(cfg_for(tmp_path, "iterations=2", *GRPO, *NO_KL)).train()
    html = (tmp_path / "report.html").read_text()  # written at the end of training
    assert 'aria-label="score (mean)"' in html
    assert 'aria-label="KL to reference (per sequence)"' not in html
    assert '<tr data-key="kl">' not in html and '<tr data-key="kl_coef">' in html
    alarms = (tmp_path / "alarms.jsonl").read_text()
    assert "kl_acceleration" not in alarms


@pytest.mark.slow  # ~13 s on 2 busy cores, most of it torchrun starting two processes
def test_two_processes_without_kl_complete(tmp_path):
    """DDP on 2 CPU processes (torchrun, gloo): no reference on either, the run saves once."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_worker.py"), "train", "", f"output_dir={out}",
           "iterations=2", "ppo.batch_size=8", "ppo.micro_batch_size=4", "sample_every=0", *GRPO,
           *NO_KL]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "NoneType processes=2" in run.stdout  # trainer.ref on the main process
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["iteration"], m["kl"]) for m in lines] == [(1, None), (2, None)]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sharded_engines_without_kl_complete(tmp_path, engine):
    """FSDP2 and ZeRO-3 with model.shard_frozen_models (the reference would be sharded): no
    reference to shard, the step and the gathered save complete. FSDP2 processes on gloo can
    abort at exit: judged by the outputs."""
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_worker.py"), "step", str(tmp_path / "two"),
           f"--engine={engine}", f"output_dir={tmp_path / 'run'}", "ppo.batch_size=8",
           "ppo.micro_batch_size=2", "generation.max_new_tokens=8", "model.shard_frozen_models=true",
           *GRPO, *NO_KL]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "NoneType processes=2" in run.stdout, run.stderr[-3000:]
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["kl"] is None or math.isnan(m["kl"])
    assert m["ppo_steps"] > 0 and math.isfinite(m["policy_loss"])
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
