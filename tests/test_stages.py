"""The stage runner (rlhf_ppo.tasks.stages): what it reuses, what it reruns, and its marker. The
stages are counters, so these tests take milliseconds."""

import json

import pytest

from rlhf_ppo.tasks.stages import MARKER, Stage, command_stage, read_marker, run_stages


class Pipeline:
    """Three stages a -> b -> c; each call of a stage's function is counted and written into its
    folder (as the real stages write their outputs)."""

    def __init__(self, out, configs=None):
        self.out = out
        self.calls = {"a": 0, "b": 0, "c": 0}
        self.configs = configs or {"a": {"lr": 1}, "b": {"n": 2}, "c": {"k": [3]}}

    def stage(self, name):
        def run(cfg):
            self.calls[name] += 1
            (self.out / name).mkdir(parents=True, exist_ok=True)
            (self.out / name / "output.txt").write_text(str(self.calls[name]))
            return {"value": self.calls[name], "config_seen": cfg}

        return Stage(name, self.configs[name], run)

    def run(self, **kwargs):
        return run_stages(self.out, [self.stage(n) for n in ("a", "b", "c")], **kwargs)


def test_first_run_runs_every_stage_in_order_and_a_second_reuses_all(tmp_path):
    p = Pipeline(tmp_path)
    first = p.run()
    assert p.calls == {"a": 1, "b": 1, "c": 1} and list(first) == ["a", "b", "c"]
    assert first["b"]["config_seen"] == {"n": 2} and first["c"]["config_seen"] == {"k": [3]}
    again = p.run()
    assert p.calls == {"a": 1, "b": 1, "c": 1}  # no function called
    assert again == first  # the recorded summaries, as they read back from JSON


def test_a_changed_config_reruns_its_stage_and_every_later_one(tmp_path):
    p = Pipeline(tmp_path)
    p.run()
    p.configs["b"] = {"n": 5}
    s = p.run()
    assert p.calls == {"a": 1, "b": 2, "c": 2}  # a reused; b changed; c reads b's output
    assert s["b"]["config_seen"] == {"n": 5} and s["a"]["value"] == 1
    p.configs["c"] = {"k": [4]}
    p.run()
    assert p.calls == {"a": 1, "b": 2, "c": 3}  # only the last one
    p.configs["a"] = {"lr": 2}
    p.run()
    assert p.calls == {"a": 2, "b": 3, "c": 4}


def test_a_reused_stage_keeps_its_marker_and_outputs(tmp_path):
    p = Pipeline(tmp_path)
    p.run()
    before = {n: ((tmp_path / n / MARKER).stat().st_mtime_ns,
                  (tmp_path / n / "output.txt").stat().st_mtime_ns) for n in "abc"}
    p.run()
    after = {n: ((tmp_path / n / MARKER).stat().st_mtime_ns,
                 (tmp_path / n / "output.txt").stat().st_mtime_ns) for n in "abc"}
    assert after == before


def test_fresh_reruns_everything(tmp_path):
    p = Pipeline(tmp_path)
    p.run()
    s = p.run(fresh=True)
    assert p.calls == {"a": 2, "b": 2, "c": 2} and s["c"]["value"] == 2


def test_the_marker_records_config_and_summary(tmp_path):
    p = Pipeline(tmp_path, {"a": {"t": (1, 2), "x": float("nan")}, "b": {}, "c": {}})
    p.run()
    record = json.loads((tmp_path / "a" / MARKER).read_text())
    assert set(record) == {"config", "summary"}
    assert record["config"] == {"t": [1, 2], "x": None}  # as JSON reads it back
    assert record["summary"]["value"] == 1 and isinstance(record["summary"]["seconds"], float)
    assert read_marker(tmp_path / "a") == record
    assert not list((tmp_path / "a").glob(f"{MARKER}.*"))  # no temporary file left behind
    p.run()
    assert p.calls["a"] == 1  # the tuple and the NaN compare equal to their recorded JSON


@pytest.mark.parametrize("old", [
    '{"value": 1, "seconds": 3.0}',  # the old quickstart layout: the bare summary
    '{"stage_config": {"n": 2}, "summary": {"value": 1}}',  # the old reasoning layout
    '{"task": {}, "model": {}}',  # the old reasoning base marker
    '{"config": {"n": 2}, "summary": [1]}',  # a summary that is not a dict
    '[1, 2]',
    '{"config": {"n": 2}, "summ',  # cut short
    '',
], ids=["quickstart", "reasoning", "reasoning-base", "summary-list", "list", "truncated", "empty"])
def test_an_old_or_corrupt_marker_reruns_its_stage(tmp_path, old):
    p = Pipeline(tmp_path)
    p.run()
    (tmp_path / "b" / MARKER).write_text(old)
    assert read_marker(tmp_path / "b") is None
    p.run()
    assert p.calls == {"a": 1, "b": 2, "c": 2}
    assert read_marker(tmp_path / "b")["config"] == {"n": 2}


def test_a_missing_marker_reruns_and_a_failed_stage_leaves_none(tmp_path):
    p = Pipeline(tmp_path)
    p.run()
    (tmp_path / "c" / MARKER).unlink()
    p.run()
    assert p.calls == {"a": 1, "b": 1, "c": 2}

    def boom(cfg):
        raise RuntimeError("interrupted")

    p.configs["b"] = {"n": 9}
    with pytest.raises(RuntimeError, match="interrupted"):
        run_stages(tmp_path, [p.stage("a"), Stage("b", {"n": 9}, boom), p.stage("c")])
    assert not (tmp_path / "b" / MARKER).exists()  # never taken for finished
    p.run()
    assert p.calls == {"a": 1, "b": 2, "c": 3}


def test_stage_names_must_be_unique(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_stages(tmp_path, [Stage("a", {}, dict), Stage("a", {}, dict)])


def test_command_stage_parses_the_config_and_writes_stage_yaml(tmp_path):
    import yaml

    from rlhf_ppo.sft import SFTConfig

    seen = []
    config = {"output_dir": str(tmp_path / "sft"), "data": {"path": "x.jsonl"}, "train": {"epochs": 3}}

    def command(cfg):
        seen.append(cfg)
        (tmp_path / "sft").mkdir()
        return {"steps": 7}

    s = run_stages(tmp_path, [command_stage("sft", config, SFTConfig, command)])
    assert isinstance(seen[0], SFTConfig) and seen[0].train.epochs == 3
    assert s["sft"]["steps"] == 7
    assert yaml.safe_load((tmp_path / "sft" / "stage.yaml").read_text()) == config
