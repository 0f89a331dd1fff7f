"""The training report (rlhf_ppo/train_report.py): a run folder built by hand with known metrics,
samples and alarms, checked value by value; partial and old run folders; a real tiny
`rlhf-ppo train` writing it at the end and `rlhf-ppo report` rewriting it; and the page loaded in
headless Chromium (same mechanism and skip rule as tests/test_report.py)."""

import json
import logging
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_report import HOSTILE, chromium, dump_dom

from rlhf_ppo import train_report as tr
from rlhf_ppo.errors import DataError

ROOT = Path(__file__).resolve().parents[1]

# Five iterations. score_mean: 0.1 * i, but null (a NaN the trainer wrote as null) at iteration 3;
# kl 0.5 * i; entropy 4 - 0.5 * i; explained_variance -0.2 then rising; no grad_norm_policy.
METRICS = [{"iteration": i, "score_mean": None if i == 3 else 0.1 * i, "kl": 0.5 * i, "kl_coef": 0.05,
            "entropy": 4.0 - 0.5 * i, "response_length": 10.0 + i, "stop_rate": 0.5,
            "clipfrac": 0.01 * i, "explained_variance": -0.2 + 0.1 * i, "value_loss": 2.0 / i,
            "value_error": 1.0, "grad_norm": 10.0 ** (i - 2), "time/iteration": 2.0 * i,
            "time/rollout": 1.0, "time/score": 0.25, "time/update": 0.5, "tokens_per_second": 100.0}
           for i in range(1, 6)]
METRICS[3]["alarm/entropy_collapse"] = 1.0  # iteration 4, also in alarms.jsonl
METRICS[4]["alarm/value_error_growing"] = 1.0  # iteration 5, missing from alarms.jsonl
ALARMS = [{"iteration": 4, "alarm": "entropy_collapse", "message": "entropy 2 fell below 0.5x its start",
           "value": 2.0, "threshold": 0.5},
          {"iteration": 2, "alarm": "kl_acceleration", "message": "KL <b>doubled</b>", "value": 1.0,
           "threshold": 0.25}]
PROMPTS = ["the movie was", "i think <i>this</i>"]
CONFIG = """# an old run's partial config
model:
  name_or_path: builtin:tiny
reward:
  sources:
    - function: rlhf_ppo.rewards:keyword_share
      weight: 2.0
ppo:
  advantage_estimator: grpo
  kl:
    coef: 0.05
iterations: 8
"""


def response(it: int, j: int) -> str:
    return HOSTILE if (it, j) == (4, 1) else f"answer {j} at {it}"


def write_run(folder: Path) -> Path:
    """The hand-built run: samples of both prompts at iterations 0..4 (first, middle, last: 0, 2,
    4), score 0.1 * iteration + j, the response to prompt 1 at iteration 4 a hostile one."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(lines(METRICS))
    (folder / "alarms.jsonl").write_text(lines(ALARMS))
    samples = [{"iteration": it, "prompt": p, "response": response(it, j), "score": 0.1 * it + j,
                "stopped": j == 0} for it in range(5) for j, p in enumerate(PROMPTS)]
    (folder / "samples.jsonl").write_text(lines(samples))
    (folder / "config.yaml").write_text(CONFIG)
    return folder


class Tables(HTMLParser):
    """The text of each cell of each row of the tables by id: ``{id: [[cell, ...], ...]}``; and
    the number of ``<svg class=chart>`` and of alarm marks in them."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.charts = self.alarm_marks = 0
        self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "svg" and attrs.get("class") == "chart":
            self.charts += 1
        elif tag == "g" and attrs.get("class") == "alarm":
            self.alarm_marks += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(page: str) -> Tables:
    t = Tables()
    t.feed(page)
    return t


def test_page_shows_the_runs_values_alarms_and_samples(tmp_path):
    path = tr.write_train_report(write_run(tmp_path / "run"))
    assert path == tmp_path / "run" / "report.html"
    page = path.read_text()
    t = tables(page)
    facts = dict(t.tables["facts"])
    assert facts["iterations done"] == "5 of 8 (still running, stopped early, or interrupted)"
    # time/iteration 2, 4, 6, 8, 10: mean 6, sum 30
    assert facts["time per iteration (mean)"] == "6 s (rollout 1 s, score 0.25 s, update 0.5 s)"
    assert facts["training time (sum of iterations)"] == "30 s"
    assert facts["greedy samples"] == "10 at iterations 0, 1, 2, 3, 4"
    assert facts["alarms"] == "3"
    summary = {row[0]: row[1:] for row in t.tables["summary"][1:]}
    # first, last, min, max; the null score at iteration 3 left out
    assert summary["score_mean"] == ["0.1", "0.5", "0.1", "0.5"]
    assert summary["kl"] == ["0.5", "2.5", "0.5", "2.5"]
    assert summary["entropy"] == ["3.5", "1.5", "1.5", "3.5"]
    assert summary["explained_variance"] == ["-0.1", "0.3", "-0.1", "0.3"]
    assert summary["grad_norm"] == ["0.1", "1000", "0.1", "1000"]
    # every alarm, by iteration: the file's two and the metrics flag the file lacks
    assert t.tables["alarms"][1:] == [
        ["2", "kl_acceleration", "1", "0.25", "KL <b>doubled</b>"],
        ["4", "entropy_collapse", "2", "0.5", "entropy 2 fell below 0.5x its start"],
        ["5", "value_error_growing", "n/a", "n/a", ""]]
    assert "KL &lt;b&gt;doubled&lt;/b&gt;" in page
    # the same prompts at the first, middle and last sampled iterations, side by side
    side = t.tables["samples"]
    assert side[0] == ["prompt", "iteration 0", "iteration 2", "iteration 4"]
    assert side[1] == ["the movie was", "answer 0 at 0score 0, stopped",
                       "answer 0 at 2score 0.2, stopped", "answer 0 at 4score 0.4, stopped"]
    assert side[2][:3] == ["i think <i>this</i>", "answer 1 at 0score 1, no stop token",
                           "answer 1 at 2score 1.2, no stop token"]
    assert side[2][3].startswith(HOSTILE) and side[2][3].endswith("score 1.4, no stop token")
    assert len(t.tables["all-samples"]) == 1 + 10
    # config: the settings that matter, read from the partial file; the whole file collapsed
    config = dict(t.tables["config"])
    assert config["model"] == "builtin:tiny" and config["iterations"] == "8"
    assert config["reward sources"] == "function: rlhf_ppo.rewards:keyword_share (weight 2.0)"
    assert config["advantage estimator"] == "grpo" and config["KL coefficient"] == "0.05"
    assert "<summary>the whole config.yaml</summary><pre># an old run&#x27;s partial config" in page
    # eight charts (no tis/logprob_gap: left out), each with the three alarm iterations marked
    assert len(tr.PANELS) == 9 and t.charts == 8 and t.alarm_marks == 8 * 3
    assert "No values in this run for: off-policy: log-prob gap" in page


def test_text_from_the_run_is_escaped(tmp_path):
    page = tr.write_train_report(write_run(tmp_path / "run")).read_text()
    assert HOSTILE not in page and 'onerror="document' not in page
    assert "&lt;script&gt;document.body.setAttribute(&quot;data-pwned&quot;" in page
    assert "i think &lt;i&gt;this&lt;/i&gt;" in page and "<i>this</i>" not in page
    assert len(re.findall(r"<script>", page)) == 2  # the page's own: error hook and load check
    assert not re.search(r"https?://|<link|<img|<[^>]*\ssrc=", page)  # self-contained


def test_a_run_still_going_without_samples_alarms_or_config(tmp_path):
    """One iteration done, the second half written: a chart of one point each, and notes."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(METRICS[0]) + "\n" + '{"iteration": 2, "kl"')
    page = tr.write_train_report(run).read_text()
    t = tables(page)
    assert dict(t.tables["facts"])["iterations done"] == "1"
    assert "No alarm fired." in page and "No samples (set <code>sample_every: N</code>" in page
    assert "No config.yaml in this run folder." in page
    assert t.charts == 8 and t.alarm_marks == 0
    svg = tr.chart(tr.PANELS[0], METRICS[:1], [])
    assert svg.count("<circle") == 1 and 'd="M' in svg  # one point, drawn as a dot


def test_chart_gaps_at_missing_values_and_left_out_when_empty():
    # score_mean is null at iteration 3: the line lifts there (two M moves), four dots
    svg = tr.chart(tr.Panel("score", (("score_mean", "score"),)), METRICS, [])
    path = re.search(r'<path class="line" d="([^"]*)"', svg).group(1)
    assert path.count("M") == 2 and path.count("L") == 2 and svg.count("<circle") == 4
    assert tr.chart(tr.Panel("x", (("grad_norm_policy", "policy"),)), METRICS, []) is None
    # gradient norms 0.1 .. 1000 span four decades: log ticks at the powers of ten
    svg = tr.chart(next(p for p in tr.PANELS if p.log_scale), METRICS, [])
    assert [t for t in ("0.1<", "1<", "10<", "100<", "1000<") if t in svg] == [
        "0.1<", "1<", "10<", "100<", "1000<"]


def test_not_a_run_folder_names_it(tmp_path):
    with pytest.raises(DataError, match=r"run_dir: .*empty.* is not a PPO run folder"):
        tr.read_run(tmp_path / "empty")


def test_report_command(tmp_path, cli):
    run = write_run(tmp_path / "run")
    result = cli("report", run, "--output", tmp_path / "page.html")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"report: {tmp_path / 'page.html'}"
    assert "entropy_collapse" in (tmp_path / "page.html").read_text()
    result = cli("report", tmp_path / "nothing")
    assert result.returncode == 1 and "is not a PPO run folder" in result.stderr


def test_a_failing_report_is_a_warning_at_the_end_of_training(tmp_path, monkeypatch, caplog):
    def broken(run):
        raise ValueError("boom")

    monkeypatch.setattr(tr, "render_train_report", broken)
    with caplog.at_level(logging.WARNING, logger="rlhf_ppo.train_report"):
        assert tr.write_at_end_of_training(write_run(tmp_path / "run")) is None
    assert "could not write the training report" in caplog.text and "ValueError: boom" in caplog.text
    assert not (tmp_path / "run" / "report.html").exists()


def test_training_ends_with_the_report(tmp_path):
    """The trainer's own call, on the cheapest real run: one iteration, samples at 0 and 1."""
    from test_trainer import tiny_config

    from rlhf_ppo.trainer import PPOTrainer

    PPOTrainer(tiny_config(tmp_path, "iterations=1", "sample_every=1", "sample_prompts=2",
                           "ppo.batch_size=4", "generation.max_new_tokens=4")).train()
    t = tables((tmp_path / "report.html").read_text())
    assert dict(t.tables["facts"])["iterations done"] == "1 of 1"
    assert t.tables["samples"][0] == ["prompt", "iteration 0", "iteration 1"]
    assert t.charts == 8


@pytest.mark.slow
def test_train_writes_the_report_and_the_command_rewrites_it(tmp_path, cli):
    """`rlhf-ppo train` on the tiny model: 2 iterations, greedy samples every iteration (0, 1, 2);
    then `rlhf-ppo report` writes the same page, and it loads in a real browser."""
    out = tmp_path / "run"
    result = cli("train", "--config", ROOT / "configs" / "tiny.yaml", f"output_dir={out}",
                 "iterations=2", "sample_every=1", "sample_prompts=2", "ppo.batch_size=4",
                 "generation.max_new_tokens=6")
    assert result.returncode == 0, result.stderr[-2000:]
    page = (out / "report.html").read_text()
    t = tables(page)
    assert dict(t.tables["facts"])["iterations done"] == "2 of 2"
    assert t.tables["samples"][0] == ["prompt", "iteration 0", "iteration 1", "iteration 2"]
    assert len(t.tables["samples"]) == 1 + 2
    assert t.charts == 8  # the shared critic: explained variance and value loss too
    (out / "report.html").unlink()
    assert cli("report", out).returncode == 0
    assert tables((out / "report.html").read_text()).tables["facts"] == t.tables["facts"]
    check_in_browser(out / "report.html", tmp_path, charts=8, alarm_rows=0, sample_rows=2)


def check_in_browser(path: Path, tmp_path: Path, charts: int, alarm_rows: int, sample_rows: int):
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install -y chromium)")
    body = dump_dom(binary, path.resolve().as_uri(), tmp_path / "profile")
    assert body.get("data-ready") == "1", body
    assert body["data-js-errors"] == "0"
    assert body["data-charts"] == str(charts) and body["data-charts-drawn"] == str(charts)
    assert body["data-alarm-rows"] == str(alarm_rows)
    assert body["data-sample-rows"] == str(sample_rows)
    assert "data-pwned" not in body  # the hostile response stayed text
    return body


def test_page_in_headless_chromium(tmp_path):
    path = tr.write_train_report(write_run(tmp_path / "run"))
    body = check_in_browser(path, tmp_path, charts=8, alarm_rows=3, sample_rows=2)
    assert body["data-alarm-marks"] == str(8 * 3)
