"""Trackers through ``report_to``: every accelerate tracker is a known name, a missing package
stops at config time naming the pip extra, and the ones that run offline (TensorBoard, MLflow
with a local store, W&B offline, trackio) receive exactly the numbers of ``metrics.jsonl``.

The offline trackers are driven through :func:`trackers.start` and :class:`RunLog` on a bare
accelerator (no model: seconds, not minutes); one PPO run checks the trainer's wiring
(overwrite clears the old event files, a resume appends)."""

import glob
import json
import re
import typing
from pathlib import Path

import pytest
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, LoggerType

from rlhf_ppo import PPOTrainer, load_config, trackers
from rlhf_ppo.errors import ConfigError
from rlhf_ppo.jsonl import read_jsonl
from rlhf_ppo.runs import RunLog

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
RECORDS = [{"iteration": 1, "score_mean": 0.125, "kl": 0.5, "value_loss": 2.0},
           {"iteration": 2, "score_mean": 0.375, "kl": 0.25, "value_loss": 1.5},
           {"iteration": 3, "score_mean": 0.625, "kl": 0.0625, "value_loss": 1.25}]
CONFIG = {"ppo.kl.coef": 0.02, "model.name_or_path": "builtin:tiny"}


# --------------------------------------------------------------------------- names and checks

def test_every_accelerate_tracker_is_a_name_with_an_extra():
    names = typing.get_args(trackers.TrackerName)
    assert set(names) == {str(t) for t in LoggerType}  # "all" included
    assert set(trackers.PACKAGES) == set(LOGGER_TYPE_TO_CLASS)
    pyproject = (ROOT / "pyproject.toml").read_text()  # the extra named in the ConfigError exists
    for name, package in trackers.PACKAGES.items():
        assert re.search(rf'^{name} = \["{package}>=', pyproject, re.M), name


def test_unknown_tracker_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["report_to=[tensorboard,weights_and_biases]"])
    msg = str(e.value)
    assert msg.startswith("report_to[1]:") and "weights_and_biases" in msg
    for name in ("all", "tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "swanlab"):
        assert f"'{name}'" in msg


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_missing_package_stops_at_config_time_naming_the_extra(monkeypatch, name):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, f"is_{name}_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"report_to=[{name}]"])
    assert str(e.value).startswith("report_to[0]:")
    assert f"pip install 'rlhf_ppo[{name}]'" in str(e.value)


def test_cli_refuses_a_missing_tracker_before_loading(tmp_path, cli, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)  # cli runs in-process
    out = cli("train", "--config", str(TINY), f"output_dir={tmp_path}", "report_to=[wandb]")
    assert out.returncode == 2, out.stderr
    assert "report_to[0]" in out.stderr and "pip install 'rlhf_ppo[wandb]'" in out.stderr
    assert not (tmp_path / "config.yaml").exists()  # nothing written, no model loaded


def test_all_means_every_installed_tracker(monkeypatch):
    import accelerate.utils

    for name in trackers.PACKAGES:
        monkeypatch.setattr(accelerate.utils, f"is_{name}_available",
                            lambda n=name: n in ("tensorboard", "mlflow"))
    assert trackers.resolve(["all"]) == ["tensorboard", "mlflow"]
    assert trackers.resolve(["mlflow", "all", "mlflow"]) == ["mlflow", "tensorboard"]
    assert load_config(TINY, ["report_to=[all]"]).report_to == ["all"]  # nothing to install


# --------------------------------------------------------------------------- offline trackers

def log_run(out: Path, names: list[str], records=RECORDS, resume: Path | None = None) -> Accelerator:
    """What the trainer does with trackers, without a model: start, log ``records``, end."""
    acc = Accelerator(log_with=names, project_dir=str(out), cpu=True)
    out.mkdir(parents=True, exist_ok=True)
    trackers.start(acc, names, CONFIG, out, resume)
    log = RunLog(out, True, acc)
    for r in records:
        log.metrics(r, step=r["iteration"])
    acc.end_training()
    return acc


def fake_checkpoint(out: Path, iteration: int) -> Path:
    """A checkpoint folder as far as a resume's trackers read it (its iteration)."""
    folder = out / f"checkpoint-{iteration}" / "training_state"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"iteration": iteration}))
    return folder.parent


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` of the TensorBoard events under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(records, key: str) -> list[tuple[int, float]]:
    return [(r["iteration"], r[key]) for r in records]


def test_tensorboard_events_hold_the_metrics_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    log_run(tmp_path, ["tensorboard"])
    got = tensorboard_scalars(tmp_path / "rlhf_ppo")
    saved = read_jsonl(tmp_path / "metrics.jsonl")
    assert saved == RECORDS
    assert set(got) == {"score_mean", "kl", "value_loss"}  # "iteration" is the step, not a scalar
    for key in got:  # float32 in the event file: these values are exact in float32
        assert got[key] == expected(saved, key)


@pytest.mark.slow  # ~17 s: MLflow creates its SQLite tables twice
def test_mlflow_local_store_gets_metrics_config_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log_run(tmp_path, ["mlflow"], RECORDS[:2])
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    log_run(tmp_path, ["mlflow"], RECORDS[2:], resume=fake_checkpoint(tmp_path, 2))
    assert json.loads((tmp_path / "trackers.json").read_text())["mlflow"] == run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.run_name == tmp_path.name
    assert client.get_experiment(run.info.experiment_id).name == "rlhf_ppo"
    assert run.data.params["ppo.kl.coef"] == "0.02"
    for key in ("score_mean", "kl"):
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert sorted(history) == expected(RECORDS, key)


def test_wandb_offline_writes_under_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_run(tmp_path, ["wandb"])
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    files = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1
    data = Path(files[0]).read_bytes()  # records hold each value as JSON text
    assert b"rlhf_ppo" in data and b"ppo.kl.coef" in data and tmp_path.name.encode() in data
    for r in RECORDS:
        assert json.dumps(r["score_mean"]).encode() in data


def test_trackio_logs_locally(tmp_path, monkeypatch):
    trackio = pytest.importorskip("trackio")
    import trackio.sqlite_storage as storage

    # trackio reads TRACKIO_DIR once, at import: point its store at tmp_path for this test
    for module in (trackio, storage, trackio.utils):
        monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio", raising=False)
    out = tmp_path / "run"
    log_run(out, ["trackio"], RECORDS[:2])
    log_run(out, ["trackio"], RECORDS[2:], resume=fake_checkpoint(out, 2))  # continues the run
    logs = storage.SQLiteStorage.get_logs(project="rlhf_ppo", run=out.name)
    assert [(m["step"], m["score_mean"]) for m in logs] == expected(RECORDS, "score_mean")
    assert storage.SQLiteStorage.get_runs("rlhf_ppo") == ["run"]


# --------------------------------------------------------------------------- through the trainer

@pytest.mark.slow
def test_trainer_overwrite_clears_old_events_and_resume_appends(tmp_path):
    pytest.importorskip("tensorboard")
    args = ["iterations=2", "save_every=1", "report_to=[tensorboard]", "threads=1"]
    PPOTrainer(load_config(TINY, [f"output_dir={tmp_path}", *args])).train()
    old = {p.name for p in tmp_path.rglob("events.out.tfevents*")}
    stale = tmp_path / "wandb" / "stale.txt"  # another tracker's file of the old run
    stale.parent.mkdir()
    stale.write_text("old run")
    history = PPOTrainer(load_config(TINY, [f"output_dir={tmp_path}", *args, "overwrite=true"])).train()
    new = {p.name for p in tmp_path.rglob("events.out.tfevents*")}
    assert new and not old & new and not stale.exists()
    assert tensorboard_scalars(tmp_path / "rlhf_ppo")["score_mean"] == [
        (m["iteration"], pytest.approx(m["score_mean"], rel=1e-6)) for m in history]
    # resumed from iteration 1: iteration 2 is logged again and replaces the earlier one
    resumed = PPOTrainer(load_config(TINY, [f"output_dir={tmp_path}", *args,
                                            f"resume_from={tmp_path / 'checkpoint-1'}"])).train()
    assert {p.name for p in tmp_path.rglob("events.out.tfevents*")} > new  # appended, kept
    scalars = tensorboard_scalars(tmp_path / "rlhf_ppo")["score_mean"]
    assert [s for s, _ in scalars] == [1, 2]  # purge_step dropped the first run's step 2
    assert scalars[1][1] == pytest.approx(resumed[1]["score_mean"], rel=1e-6)


def test_evaluate_reads_a_ppo_config_whose_trackers_are_not_installed(tmp_path, monkeypatch):
    """evaluate ignores a PPO run's report_to: a run logged to W&B is evaluated where wandb is
    not installed (the PPO config itself is refused there)."""
    import accelerate.utils
    import yaml

    from rlhf_ppo import ConfigError, load_config
    from rlhf_ppo.eval_config import load_eval_config

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "builtin:tiny"}, "report_to": ["wandb"],
                                    "data": {"path": "builtin:tiny"}}))
    with pytest.raises(ConfigError, match=r"rlhf_ppo\[wandb\]"):
        load_config(path)
    cfg = load_eval_config(path, ["policy=builtin:tiny"])
    assert cfg.data.path == "builtin:tiny"
