"""Checkpoints, exact resume, signals, interrupted saves, non-finite values and output folders."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_ppo import ConfigError, PPOTrainer, load_config
from rlhf_ppo.checkpoint import ABORT_ENV, CheckpointError, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["ppo.batch_size=8", "ppo.micro_batch_size=4", "generation.max_new_tokens=8"]
TIMING = ("time/", "tokens_per_second")


def cfg_for(out, *overrides):
    return load_config(TINY, [f"output_dir={out}", *SMALL, *overrides])


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def metrics_lines(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_timing(m):
    return {k: v for k, v in m.items() if not k.startswith(TIMING)}


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(Path(out) / "final" / "model.safetensors")


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    full = PPOTrainer(cfg_for(tmp_path / "full", "iterations=4", "save_every=2",
                              "ppo.adaptive_kl=true", "reward.normalize=true")).train()
    PPOTrainer(cfg_for(tmp_path / "part", "iterations=2", "ppo.adaptive_kl=true",
                       "reward.normalize=true")).train()
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["checkpoint-2"]
    resumed = PPOTrainer(cfg_for(tmp_path / "part", "iterations=4", "resume_from=latest",
                                 "ppo.adaptive_kl=true", "reward.normalize=true"))
    assert resumed.iteration == 2
    resumed.train()
    a, b = metrics_lines(tmp_path / "full"), metrics_lines(tmp_path / "part")
    assert [m["iteration"] for m in b] == [1, 2, 3, 4]
    assert [without_timing(m) for m in a] == [without_timing(m) for m in b]  # exact, not approx
    wa, wb = final_weights(tmp_path / "full"), final_weights(tmp_path / "part")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(full) == 4


def test_keep_last_and_complete_marker(tmp_path):
    PPOTrainer(cfg_for(tmp_path, "iterations=4", "save_every=1", "keep_last=2")).train()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-3", "checkpoint-4"]
    assert all((tmp_path / n / ".complete").is_file() for n in names)
    assert not list(tmp_path.glob(".tmp-*"))


def test_output_dir_with_another_run_is_refused(tmp_path):
    PPOTrainer(cfg_for(tmp_path, "iterations=1")).train()
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="holds a run.*resume_from=latest.*overwrite=true"):
        PPOTrainer(cfg_for(tmp_path, "iterations=1"))
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing lost
    with pytest.raises(ConfigError, match=r"ppo\.kl\.coef \(saved 0\.02, now 0\.5\)"):
        PPOTrainer(cfg_for(tmp_path, "iterations=2", "resume_from=latest", "ppo.kl_coef=0.5"))
    PPOTrainer(cfg_for(tmp_path, "iterations=1", "overwrite=true", "seed=3")).train()
    assert len(metrics_lines(tmp_path)) == 1 and metrics_lines(tmp_path)[0]["iteration"] == 1


def test_a_checkpoint_saved_with_the_flat_ppo_keys_resumes(tmp_path):
    """Checkpoints written before the ppo sections (issue 24) hold the flat keys in their saved
    config: resuming compares them in the new layout, and a real difference is still named."""
    import yaml

    from rlhf_ppo.config import PPO_RENAMED

    PPOTrainer(cfg_for(tmp_path, "iterations=1")).train()
    saved = tmp_path / "checkpoint-1" / "training_state" / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    flat = {k: v for k, v in data["ppo"].items() if not isinstance(v, dict)}
    for old, new in PPO_RENAMED.items():
        *section, leaf = new.split(".")
        flat[old] = data["ppo"][section[0]][leaf] if section else data["ppo"][leaf]
        flat.pop(new, None)
    flat["whiten_advantages"] = True  # always written then (the default), read only by gae
    saved.write_text(yaml.safe_dump({**data, "ppo": flat}))
    assert "kl_coef" in yaml.safe_load(saved.read_text())["ppo"]
    trainer = PPOTrainer(cfg_for(tmp_path, "iterations=2", "resume_from=latest"))
    assert trainer.iteration == 1
    with pytest.raises(ConfigError, match=r"ppo\.kl\.coef \(saved 0\.02, now 0\.5\)"):
        PPOTrainer(cfg_for(tmp_path, "iterations=2", "resume_from=latest", "ppo.kl.coef=0.5"))


def test_resume_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        PPOTrainer(cfg_for(tmp_path, "resume_from=latest"))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        PPOTrainer(cfg_for(tmp_path, f"resume_from={tmp_path}"))


def test_checkpoint_files_load_only_tensors(tmp_path):
    """A pickle that would run code is refused: checkpoints are read with weights_only=True."""
    PPOTrainer(cfg_for(tmp_path, "iterations=1")).train()
    target = tmp_path / "checkpoint-1" / "training_state" / "optimizer.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"state": Evil()}, target)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        PPOTrainer(cfg_for(tmp_path, "iterations=2", "resume_from=latest"))
    assert not (tmp_path / "pwned").exists()
    loads = [(path, line) for path in (ROOT / "rlhf_ppo").glob("*.py")
             for line in path.read_text().splitlines() if "torch.load(" in line and "def " not in line]
    assert loads  # the scan found the package's loads (checkpoint.py reads the trainer state)
    for path, line in loads:  # every torch.load in the package is safe
        assert "weights_only=True" in line, (path, line)


def _train_process(out, *overrides, env=None):
    cmd = [sys.executable, "-m", "rlhf_ppo", "train", "--config", str(TINY), f"output_dir={out}",
           *SMALL, *overrides]
    # One thread, as this test process runs (conftest): float results then match bitwise.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_and_exits_nonzero(tmp_path, signum):
    proc = _train_process(tmp_path, "iterations=100000")
    deadline = time.time() + 120
    while time.time() < deadline:
        m = tmp_path / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "resume_from=latest" in err and "Traceback" not in err
    (ckpt,) = list_checkpoints(tmp_path)
    k = int(ckpt.name.split("-")[1])
    assert k == len(metrics_lines(tmp_path)) >= 2
    # the message names the iteration that was then finished and checkpointed
    assert f"received: finishing iteration {k}, then writing a checkpoint" in err, err[-2000:]
    resumed = PPOTrainer(cfg_for(tmp_path, f"iterations={k + 1}", "resume_from=latest"))
    resumed.train()
    assert [m["iteration"] for m in metrics_lines(tmp_path)] == list(range(1, k + 2))


def test_sigusr1_writes_a_checkpoint_and_training_goes_on(tmp_path):
    proc = _train_process(tmp_path, "iterations=100000")

    def wait_lines(n):
        deadline = time.time() + 120
        while time.time() < deadline:
            m = tmp_path / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= n:
                return len(m.read_text().splitlines())
            time.sleep(0.1)
        raise AssertionError("training made no progress")

    wait_lines(1)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path) and time.time() < deadline:
        time.sleep(0.1)
    (first,) = list_checkpoints(tmp_path)
    k = int(first.name.split("-")[1])
    wait_lines(k + 2)  # still training after the checkpoint
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM


@pytest.mark.parametrize("stage", ["model", "optimizer", "state"])
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, stage):
    reference = tmp_path / "reference"
    PPOTrainer(cfg_for(reference, "iterations=3", "save_every=1")).train()
    run = tmp_path / "run"
    proc = _train_process(run, "iterations=3", "save_every=1",
                          env={ABORT_ENV: f"checkpoint-2:{stage}"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1"]
    assert (run / ".tmp-checkpoint-2").is_dir()  # the partial save, never renamed into place
    PPOTrainer(cfg_for(run, "iterations=3", "save_every=1", "resume_from=latest")).train()
    assert [without_timing(m) for m in metrics_lines(run)] == \
        [without_timing(m) for m in metrics_lines(reference)]
    wa, wb = final_weights(reference), final_weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


NAN_REWARD = '''
import math
calls = 0
def nan_on_second_call(prompts, responses, **kwargs):
    global calls
    calls += 1
    return [math.nan if calls == 2 else 0.5 for _ in responses]
'''


def _nan_config(tmp_path, mode):
    fn = tmp_path / "nan_reward.py"
    fn.write_text(NAN_REWARD)
    return cfg_for(tmp_path / "run", "iterations=3", f"on_nonfinite={mode}", "ppo.adaptive_kl=true",
                   f"reward.sources=[{{function: '{fn}:nan_on_second_call'}}]")


def test_nonfinite_score_stops_with_iteration_and_stage(tmp_path):
    trainer = PPOTrainer(_nan_config(tmp_path, "error"))
    trainer.step()
    before = weights(trainer)
    with pytest.raises(Exception, match=r"iteration 2, stage score.*reward\.sources\[0\]"):
        trainer.step()
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_score_skips_the_update_when_asked(tmp_path):
    trainer = PPOTrainer(_nan_config(tmp_path, "skip"))
    trainer.step()
    before, coef = weights(trainer), trainer.kl_ctl.value
    m = trainer.step()
    assert m["nonfinite_skipped"] == 1.0 and m["nonfinite_stage"] == "score"
    assert m["ppo_steps"] == 0 and trainer.kl_ctl.value == coef
    assert all(torch.equal(before[k], v) for k, v in weights(trainer).items())
    m3 = trainer.step()
    assert m3["nonfinite_skipped"] == 0.0 and m3["nonfinite_skips"] == 1 and m3["ppo_steps"] > 0


def test_nonfinite_gradient_never_reaches_the_weights(tmp_path, monkeypatch):
    from rlhf_ppo import trainer as trainer_module

    real = trainer_module.ops.policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(trainer_module.ops, "policy_loss", poisoned)
    trainer = PPOTrainer(cfg_for(tmp_path, "iterations=2", "on_nonfinite=skip",
                                 "ppo.num_minibatches=2", "ppo.micro_batch_size=4"))
    # One micro-batch per minibatch, 2 minibatches per epoch: the 3rd call (epoch 2, first
    # minibatch) has a NaN loss, so 2 steps are taken and the update stops there.
    m = trainer.step()
    assert m["nonfinite_skipped"] == 1.0 and m["ppo_steps"] == 2
    assert all(torch.isfinite(v).all() for v in weights(trainer).values())
    with pytest.raises(Exception, match="iteration 2, stage update"):
        calls["n"] = 2  # poison the next call again, now with on_nonfinite=error
        trainer.cfg.on_nonfinite = "error"
        trainer.step()


def test_resume_accepts_output_only_changes_and_refuses_the_others(tmp_path):
    from rlhf_ppo.runs import config_diff

    # output-only keys may change (peft.save_merged among them); the others are named
    assert config_diff({"peft": {"save_merged": False, "r": 8}, "sample_every": 0},
                       {"peft": {"save_merged": True, "r": 16}, "sample_every": 5}) == [
        "peft.r (saved 8, now 16)"]
    PPOTrainer(cfg_for(tmp_path, "iterations=1")).train()
    resumed = PPOTrainer(cfg_for(tmp_path, "iterations=2", "resume_from=latest", "sample_every=1",
                                 "sample_prompts=2", "keep_last=3"))
    assert resumed.iteration == 1
    with pytest.raises(ConfigError) as err:
        PPOTrainer(cfg_for(tmp_path, "iterations=2", "resume_from=latest", "optim.lr=0.5"))
    message = str(err.value)
    assert "optim.lr (saved" in message and "now 0.5" in message
    assert "overwrite" not in message  # never sent to the key that deletes the run
