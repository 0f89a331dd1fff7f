"""The training report of a PPO run: ``rlhf-ppo report RUN_DIR``, and written to
``RUN_DIR/report.html`` at the end of every ``rlhf-ppo train``.

One self-contained page, built like evaluate's (:mod:`rlhf_ppo.report`: its styles, its error
hook, its JSON-lines reader, :func:`html.escape` on every piece of text from the run). It reads
what the run folder holds, each file optional, so it works on a run still going (a half-written
last line is left out), a run without samples and an old run:

- ``metrics.jsonl``: one chart per signal (score, KL and its coefficient, entropy, lengths, clip
  fractions, the critic's explained variance and value loss / error, gradient norms) against
  the iteration, with every alarm drawn as a red line at the iteration it fired;
- ``alarms.jsonl`` (rows ``iteration, alarm, message, value, threshold``) and the
  ``alarm/<name>`` flags of the metrics rows: the table of alarms;
- ``samples.jsonl``: the greedy samples of the same prompts at the first, middle and last
  sampled iterations, side by side;
- ``config.yaml``: the settings that matter, and the whole file behind a ``<details>``.

The charts are inline SVG drawn here (see the note at :func:`chart`). On load the page's script
records on ``<body>`` how many charts were laid out with a visible line, how many alarm marks and
table rows there are and how many JavaScript errors occurred (``data-charts-drawn``,
``data-alarm-rows``, ``data-js-errors``, ``data-ready``) for a headless browser test, as
evaluate's report does.
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import report
from .errors import DataError
from .jsonl import finite_number
from .report import _num as number

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
ALARMS_FILE = "alarms.jsonl"


@dataclass(frozen=True)
class Panel:
    """One chart: ``lines`` (metrics key, label) on the left axis, ``right`` on a second axis
    (a quantity of another scale, such as the KL coefficient beside the KL)."""

    title: str
    lines: tuple[tuple[str, str], ...]
    right: tuple[tuple[str, str], ...] = ()
    log_scale: bool = False


PANELS = (
    Panel("score (mean)", (("score_mean", "score"), ("score_processed_mean", "processed"))),
    Panel("KL to reference (per sequence)", (("kl", "KL"),), (("kl_coef", "kl_coef"),)),
    Panel("entropy (per token)", (("entropy", "entropy"),)),
    Panel("response length (tokens)", (("response_length", "length"),),
          (("stop_rate", "stop rate"), ("response/repeated_ngram_share", "repeated 3-grams"))),
    Panel("clip fraction", (("clipfrac", "policy"), ("vf_clipfrac", "value"))),
    Panel("critic: explained variance", (("explained_variance", "explained variance"),)),
    Panel("critic: value loss and value error",
          (("value_loss", "value loss"), ("value_error", "value error (RMS)"))),
    Panel("gradient norms (before clipping)", (("grad_norm", "joint"), ("grad_norm_policy", "policy"),
                                               ("grad_norm_critic", "critic")), log_scale=True),
    Panel("off-policy: log-prob gap (sampling vs recomputed)", (("tis/logprob_gap", "gap"),)),
)
"""the charts, in page order; a panel none of whose left-axis keys has a finite value is left out"""


@dataclass
class RunFiles:
    """What a run folder holds (each part empty when its file is absent)."""

    folder: Path
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    alarms: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    config_text: str = ""


# ---------------------------------------------------------------- reading


def read_run(folder: str | Path) -> RunFiles:
    """The files of a PPO run folder; DataError when ``folder`` has none of them."""
    import yaml

    folder = Path(folder)
    names = ("metrics.jsonl", "samples.jsonl", ALARMS_FILE, "config.yaml")
    if not folder.is_dir() or not any((folder / n).is_file() for n in names):
        raise DataError(f"run_dir: {str(folder)!r} is not a PPO run folder (expected some of "
                        f"{', '.join(names)})")
    run = RunFiles(folder)
    read = lambda name: (report.read_rows(folder / name, name, running=True)
                         if (folder / name).is_file() else [])
    run.metrics, run.samples = read("metrics.jsonl"), read("samples.jsonl")
    run.alarms = all_alarms(read(ALARMS_FILE), run.metrics)
    if (folder / "config.yaml").is_file():
        run.config_text = (folder / "config.yaml").read_text()
        run.config = current_layout(yaml.safe_load(run.config_text) or {})
    return run


def current_layout(config: dict) -> dict:
    """A saved config dict in today's layout (an old run's renamed keys moved); as saved when
    that fails (the report shows what it can)."""
    from .config import upgrade_quietly

    try:
        return upgrade_quietly(config)
    except Exception:  # an old or hand-edited file: the report reads what is there
        return config


def all_alarms(rows: list[dict], metrics: list[dict]) -> list[dict]:
    """The rows of ``alarms.jsonl`` plus an ``alarm/<name>`` flag of a metrics row that has no
    row there (a run whose alarms file is gone), sorted by iteration."""
    seen = {(r.get("iteration"), r.get("alarm")) for r in rows}
    out = list(rows)
    for m in metrics:
        for key, flag in m.items():
            name = key.removeprefix("alarm/")
            if key.startswith("alarm/") and flag and (m.get("iteration"), name) not in seen:
                out.append({"iteration": m.get("iteration"), "alarm": name, "message": "",
                            "value": None, "threshold": None})
    return sorted(out, key=lambda r: (_finite_or(r.get("iteration"), -1), str(r.get("alarm"))))


def _finite_or(x: Any, default: float) -> float:
    """``x`` as a float when it is a finite number, else ``default``."""
    value = finite_number(x)
    return default if value is None else value


def series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of ``key``, NaN where a row lacks it or holds null / a non-number,
    so that a chart's line breaks there."""
    xs = [_finite_or(m.get("iteration"), i + 1) for i, m in enumerate(metrics)]
    return xs, [_finite_or(m.get(key), math.nan) for m in metrics]


# ---------------------------------------------------------------- charts
# Inline SVG drawn here rather than matplotlib PNGs (as evaluate's report): a page at the end of
# every train run must cost milliseconds, and matplotlib took ~3.5 s for these eight charts on
# the 2-core development machine (1.4 s of it the import), measured in December 2026.

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf")
"""line colours (matplotlib's, without its red: red marks the alarms)"""
WIDTH, HEIGHT = 440, 230
LEFT, RIGHT, TOP, BOTTOM = 56, 56, 40, 30  # margins: tick labels, title and legend, x axis


@dataclass(frozen=True)
class Axis:
    """A linear (or base-10 log) map from data values ``[lo, hi]`` to pixels ``[p0, p1]``."""

    lo: float
    hi: float
    p0: float
    p1: float
    log: bool = False

    @classmethod
    def fit(cls, values: list[float], p0: float, p1: float, log: bool = False,
            margin: float = 0.0) -> Axis:
        """An axis over the finite ``values``, widened by ``margin`` of the range on each side
        (a one-value range by a tenth of the value, so one point shows)."""
        finite = [math.log10(v) if log else v for v in values if math.isfinite(v)]
        lo, hi = min(finite), max(finite)
        if hi - lo < 1e-12 * max(1.0, abs(lo)):
            pad = abs(lo) * 0.1 if lo else 0.5
            lo, hi = lo - pad, hi + pad
        pad = (hi - lo) * margin
        return cls(lo - pad, hi + pad, p0, p1, log)

    def __call__(self, v: float) -> float:
        v = math.log10(v) if self.log else v
        return self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)

    def ticks(self, n: int = 5) -> list[float]:
        """Round values in the range, at most ``n`` steps apart, a step being 1, 2, 2.5 or 5
        times a power of ten (on a log axis: the powers of ten)."""
        if self.log:
            return [10.0 ** e for e in range(math.floor(self.lo), math.ceil(self.hi) + 1)
                    if self.lo <= e <= self.hi] or [10.0 ** self.lo, 10.0 ** self.hi]
        raw = (self.hi - self.lo) / n
        power = 10.0 ** math.floor(math.log10(raw))
        step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
        first = math.ceil(self.lo / step)
        return [k * step for k in range(first, math.floor(self.hi / step) + 1)]


def integer_ticks(lo: float, hi: float, most: int = 6) -> list[int]:
    """Whole iterations from ``lo`` to ``hi`` at a step of 1, 2, 5, 10, 20, 50... (at most
    ``most + 1`` ticks)."""
    step = 1
    while (hi - lo) / step > most:
        step *= 2.5 if str(step).startswith("2") else 2
        step = int(step)
    return list(range(math.ceil(lo / step) * step, int(hi) + 1, step))


def _path(xs: list[float], ys: list[float], x: Axis, y: Axis) -> str:
    """An SVG path through the points, lifted (a new ``M``) at each NaN so a gap shows."""
    out, pen = [], "M"
    for a, b in zip(xs, ys):
        if not math.isfinite(b) or (y.log and b <= 0):
            pen = "M"
            continue
        out.append(f"{pen}{x(a):.1f},{y(b):.1f}")
        pen = "L"
    return " ".join(out)


def _lines_svg(lines: list[tuple[str, list[float], list[float]]], x: Axis, y: Axis, first: int,
               dashed: bool) -> str:
    """Each ``(label, xs, ys)`` as a path, with a dot per point when there are few."""
    out = []
    for i, (label, xs, ys) in enumerate(lines):
        color = COLORS[(first + i) % len(COLORS)]
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        out.append(f'<path class="line" d="{_path(xs, ys, x, y)}" fill="none" stroke="{color}" '
                   f'stroke-width="1.5"{dash}><title>{html.escape(label)}</title></path>')
        finite = [(a, b) for a, b in zip(xs, ys) if math.isfinite(b) and not (y.log and b <= 0)]
        if len(finite) < 50:
            out += [f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="2.5" fill="{color}"><title>'
                    f'{html.escape(label)} {number(b)} at iteration {a:g}</title></circle>'
                    for a, b in finite]
    return "".join(out)


def _y_ticks(y: Axis, at: float, anchor: str) -> str:
    """Tick labels of a y axis, at pixel column ``at``."""
    return "".join(f'<text x="{at}" y="{y(v) + 3:.1f}" text-anchor="{anchor}">{number(v)}</text>'
                   for v in y.ticks())


def _alarms_svg(alarms: list[dict], x: Axis) -> str:
    """A red line at each iteration an alarm fired, named on hover and along the line."""
    names: dict[float, list[str]] = {}
    for a in alarms:
        it = _finite_or(a.get("iteration"), math.nan)
        if math.isfinite(it):
            names.setdefault(it, []).append(str(a.get("alarm")))
    out = []
    for it, found in sorted(names.items()):
        label = html.escape(", ".join(dict.fromkeys(found)))
        px = x(it)
        out.append(f'<g class="alarm"><line x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" '
                   f'y2="{HEIGHT - BOTTOM}" stroke="#d62728" stroke-width="1.2" opacity="0.7"/>'
                   f'<text x="{px - 2:.1f}" y="{TOP + 2}" fill="#d62728" font-size="8" '
                   f'transform="rotate(-90 {px - 2:.1f} {TOP + 2})" text-anchor="end">{label}</text>'
                   f'<title>alarm at iteration {it:g}: {label}</title></g>')
    return "".join(out)


def _legend(entries: list[tuple[str, bool]]) -> str:
    """One row of ``(label, dashed)`` entries under the title."""
    out, at = [], LEFT
    for i, (label, dashed) in enumerate(entries):
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        out.append(f'<line x1="{at}" x2="{at + 16}" y1="28" y2="28" stroke="{COLORS[i % len(COLORS)]}" '
                   f'stroke-width="1.5"{dash}/><text x="{at + 19}" y="31">{html.escape(label)}</text>')
        at += 26 + 6 * len(label)
    return "".join(out)


def chart(panel: Panel, metrics: list[dict], alarms: list[dict]) -> str | None:
    """One panel as an inline ``<svg class="chart">``: each key's values against the iteration
    (NaN / missing values leave a gap; a dot per point when few, so one iteration shows), the
    ``right`` keys dashed on their own axis, alarms as red vertical lines; None when no key of
    the left axis has a finite value (the right axis only gives it context: a run without a
    reference has a KL coefficient and no KL)."""
    left = [(label, *series(metrics, k)) for k, label in panel.lines]
    right = [(label, *series(metrics, k)) for k, label in panel.right]
    left = [s for s in left if any(math.isfinite(v) for v in s[2])]
    right = [s for s in right if any(math.isfinite(v) for v in s[2])]
    if not left:
        return None
    alarm_its = [_finite_or(a.get("iteration"), math.nan) for a in alarms]
    x = Axis.fit([v for s in left + right for v in s[1]] + alarm_its, LEFT, WIDTH - RIGHT)
    bottom, top = HEIGHT - BOTTOM, TOP + 6
    parts = [f'<text x="{LEFT}" y="14" font-size="12" font-weight="600">{html.escape(panel.title)}</text>',
             f'<rect x="{LEFT}" y="{top}" width="{WIDTH - LEFT - RIGHT}" height="{bottom - top}" '
             'fill="none" stroke="#bbb"/>',
             _legend([(s[0], False) for s in left] + [(s[0], bool(left)) for s in right])]
    for it in integer_ticks(x.lo, x.hi):
        parts.append(f'<text x="{x(it):.1f}" y="{bottom + 12}" text-anchor="middle">{it}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
                 "iteration</text>")
    for lines, column, anchor, first in ((left, LEFT - 4, "end", 0),
                                         (right, WIDTH - RIGHT + 4, "start", len(left))):
        if lines:
            positive = all(v > 0 for s in lines for v in s[2] if math.isfinite(v))
            log = panel.log_scale and positive and _spread(lines) > 10
            y = Axis.fit([v for s in lines for v in s[2]], bottom, top, log, margin=0.06)
            parts += [_y_ticks(y, column, anchor),
                      _lines_svg(lines, x, y, first, dashed=first > 0 and bool(left))]
    parts.append(_alarms_svg(alarms, x))
    return (f'<svg class="chart" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-size="9" font-family="sans-serif" role="img" '
            f'aria-label="{html.escape(panel.title)}">{"".join(parts)}</svg>')


def _spread(lines: list[tuple[str, list[float], list[float]]]) -> float:
    """max / min of the lines' finite values (all positive)."""
    finite = [v for s in lines for v in s[2] if math.isfinite(v)]
    return max(finite) / min(finite)


# ---------------------------------------------------------------- tables


def facts_table(run: RunFiles) -> str:
    """What the run did: iterations done of those configured, time per iteration, throughput,
    skipped updates, samples and alarms."""
    m, e = run.metrics, html.escape
    done = int(_finite_or(m[-1].get("iteration"), len(m))) if m else 0
    planned = run.config.get("iterations")
    state = ("" if not isinstance(planned, int) else f" of {planned}"
             + (" (still running, stopped early, or interrupted)" if done < planned else ""))
    mean = lambda key: _mean([_finite_or(r.get(key), math.nan) for r in m])
    times = ", ".join(f"{part} {number(mean(f'time/{part}'), 3)} s"
                      for part in ("rollout", "score", "update"))
    sampled = sorted({r.get("iteration") for r in run.samples}, key=lambda x: _finite_or(x, -1))
    rows = [("run folder", f"<code>{e(str(run.folder))}</code>"),
            ("iterations done", f"{done}{state}"),
            ("time per iteration (mean)", f"{number(mean('time/iteration'), 3)} s ({times})"),
            ("training time (sum of iterations)",
             f"{number(sum(x for x in series(m, 'time/iteration')[1] if math.isfinite(x)), 4)} s"),
            ("tokens per second of generation (mean)", number(mean("tokens_per_second"), 4)),
            ("updates skipped for NaN/inf", e(str(m[-1].get("nonfinite_skips", 0))) if m else "n/a"),
            ("greedy samples", f"{len(run.samples)} at iterations "
             f"{e(', '.join(map(str, sampled))) or 'none'}"),
            ("alarms", str(len(run.alarms)))]
    return _two_columns(rows, "facts")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _two_columns(rows: list[tuple[str, str]], table_id: str) -> str:
    """A ``<table>`` of (escaped header, HTML cell) rows."""
    body = "".join(f"<tr><th>{html.escape(a)}</th><td>{b}</td></tr>" for a, b in rows)
    return f"<table id={table_id}><tbody>{body}</tbody></table>"


SUMMARY_KEYS = ("score_mean", "kl", "kl_coef", "entropy", "response_length", "stop_rate",
                "response/repeated_ngram_share", "clipfrac", "explained_variance", "value_loss",
                "value_error", "grad_norm", "tis/logprob_gap")


def metrics_summary(metrics: list[dict]) -> str:
    """First, last, minimum and maximum of each main metric (NaN / missing values left out)."""
    rows = []
    for key in SUMMARY_KEYS:
        values = [v for v in series(metrics, key)[1] if math.isfinite(v)]
        if values:
            cells = "".join(f"<td>{number(v)}</td>" for v in (values[0], values[-1], min(values),
                                                               max(values)))
            rows.append(f"<tr data-key=\"{key}\"><th>{key}</th>{cells}</tr>")
    if not rows:
        return "<p class=meta>No metrics (metrics.jsonl) in this run folder yet.</p>"
    head = "<tr><th>metric</th><th>first</th><th>last</th><th>min</th><th>max</th></tr>"
    return f"<table id=summary class=summary><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def alarms_table(alarms: list[dict]) -> str:
    """Every alarm, one row each, in the order they fired."""
    if not alarms:
        return "<p class=meta>No alarm fired.</p>"
    e = html.escape
    rows = "".join(
        f"<tr class=alarm><td>{e(str(a.get('iteration')))}</td><td>{e(str(a.get('alarm')))}</td>"
        f"<td>{number(_finite_or(a.get('value'), math.nan))}</td>"
        f"<td>{number(_finite_or(a.get('threshold'), math.nan))}</td>"
        f"<td>{e(str(a.get('message') or ''))}</td></tr>" for a in alarms)
    head = "<tr><th>iteration</th><th>alarm</th><th>value</th><th>threshold</th><th>message</th></tr>"
    return f"<table id=alarms><thead>{head}</thead><tbody>{rows}</tbody></table>"


def sampled_points(samples: list[dict]) -> list[Any]:
    """The first, middle and last iterations at which samples were logged (fewer when fewer)."""
    its = sorted({r.get("iteration") for r in samples}, key=lambda x: _finite_or(x, -1))
    return list(dict.fromkeys([its[0], its[len(its) // 2], its[-1]])) if its else []


SAMPLE_COUNTS = ("turns", "tool_calls", "tool_errors", "tool_timeouts", "environment_reward")


def _sample_cell(row: dict | None) -> str:
    """A response with its score, stop and (multi-turn) episode counts."""
    if row is None:
        return "<td class=meta>(not sampled)</td>"
    ending = "stopped" if row.get("stopped") else "no stop token"
    counts = "".join(f", {html.escape(k.replace('_', ' '))} {number(_finite_or(row[k], math.nan))}"
                     for k in SAMPLE_COUNTS if k in row)
    return (f"<td><div class=response>{html.escape(str(row.get('response', '')))}</div>"
            f"<div class=meta>score {number(_finite_or(row.get('score'), math.nan))}, "
            f"{ending}{counts}</div></td>")


def samples_side_by_side(samples: list[dict]) -> str:
    """One row per prompt, one column per iteration of :func:`sampled_points`: how the greedy
    response to the same prompt moved during training."""
    points = sampled_points(samples)
    if not points:
        return ("<p class=meta>No samples (set <code>sample_every: N</code> to log greedy samples "
                "of fixed prompts every N iterations).</p>")
    by_key = {(r.get("iteration"), str(r.get("prompt"))): r for r in samples}
    prompts = list(dict.fromkeys(str(r.get("prompt")) for r in samples if r.get("iteration") in points))
    head = "<th>prompt</th>" + "".join(f"<th>iteration {html.escape(str(p))}</th>" for p in points)
    rows = "".join(f"<tr class=sample><td>{html.escape(prompt)}</td>"
                   + "".join(_sample_cell(by_key.get((p, prompt))) for p in points) + "</tr>"
                   for prompt in prompts)
    return (f"<table id=samples data-points=\"{len(points)}\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def all_samples(samples: list[dict]) -> str:
    """Every sample of the run, behind a ``<details>``."""
    if not samples:
        return ""
    rows = "".join(f"<tr><td>{html.escape(str(r.get('iteration')))}</td>"
                   f"<td>{html.escape(str(r.get('prompt')))}</td>{_sample_cell(r)}</tr>"
                   for r in samples)
    return (f"<details><summary>all {len(samples)} samples</summary><table id=all-samples><thead>"
            f"<tr><th>iteration</th><th>prompt</th><th>response</th></tr></thead><tbody>{rows}"
            "</tbody></table></details>")


def _get(config: dict, dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None when a part is missing."""
    for part in dotted.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(part)
    return config


def reward_sources(config: dict) -> str:
    """Each reward source as ``kind: target (weight w)``."""
    out = []
    for s in _get(config, "reward.sources") or []:
        if isinstance(s, dict):
            kind = next((k for k in ("model", "function", "url") if s.get(k)), "source")
            out.append(f"{kind}: {s.get(kind, '?')} (weight {s.get('weight', 1.0)})")
    return "; ".join(out)


CONFIG_KEYS = (("model", "model.name_or_path"), ("reference model", "model.ref_name_or_path"),
               ("critic", "model.critic"), ("data", "data.path"),
               ("advantage estimator", "ppo.advantage_estimator"),
               ("samples per prompt", "ppo.samples_per_prompt"), ("KL coefficient", "ppo.kl.coef"),
               ("KL estimator", "ppo.kl.estimator"), ("adaptive KL", "ppo.kl.adaptive"),
               ("learning rate", "optim.lr"), ("critic learning rate", "optim.critic_lr"),
               ("batch size (rollouts per iteration)", "ppo.batch_size"),
               ("PPO epochs", "ppo.ppo_epochs"), ("minibatches", "ppo.num_minibatches"),
               ("iterations", "iterations"), ("max new tokens", "generation.max_new_tokens"),
               ("temperature", "generation.temperature"), ("agent tools", "agent.tools"),
               ("agent environment", "agent.environment"), ("seed", "seed"))


def config_section(run: RunFiles) -> str:
    """The settings that shape a run, then the whole ``config.yaml`` behind a ``<details>``."""
    if not run.config_text:
        return "<p class=meta>No config.yaml in this run folder.</p>"
    rows = [(label, html.escape(str(value))) for label, key in CONFIG_KEYS
            if (value := _get(run.config, key)) not in (None, [], "")]
    rows.insert(1, ("reward sources", html.escape(reward_sources(run.config) or "n/a")))
    return (_two_columns(rows, "config") + "<details><summary>the whole config.yaml</summary>"
            f"<pre>{html.escape(run.config_text)}</pre></details>")


# ---------------------------------------------------------------- the page

CSS = report.CSS + """
#samples td, #all-samples td { max-width: 30em; }
.response { white-space: pre-wrap; }
#alarms tr.alarm td:nth-child(2) { color: #b00; font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
"""

SCRIPT = """
window.addEventListener('load', function () {
  var body = document.body;
  var charts = document.querySelectorAll('svg.chart');
  body.setAttribute('data-charts', charts.length);
  body.setAttribute('data-charts-drawn', Array.prototype.filter.call(charts, function (c) {
    var box = c.getBoundingClientRect(), line = c.querySelector('path.line, circle');
    return box.width > 0 && line !== null && line.getBBox().width + line.getBBox().height > 0;
  }).length);
  body.setAttribute('data-alarm-marks', document.querySelectorAll('svg.chart g.alarm').length);
  body.setAttribute('data-alarm-rows', document.querySelectorAll('#alarms tr.alarm').length);
  body.setAttribute('data-sample-rows', document.querySelectorAll('#samples tr.sample').length);
  body.setAttribute('data-js-errors', window.__reportErrors.length);
  body.setAttribute('data-ready', '1');
});
"""


def charts_section(run: RunFiles) -> str:
    """Every panel with values, and a line naming those left out."""
    charts, missing = [], []
    for panel in PANELS:
        svg = chart(panel, run.metrics, run.alarms)
        if svg is None:
            missing.append(panel.title)
        else:
            charts.append(svg)
    note = (f"<p class=meta>No values in this run for: {html.escape('; '.join(missing))}.</p>"
            if missing and run.metrics else "")
    if not run.metrics:
        return "<p class=meta>No metrics (metrics.jsonl) in this run folder yet.</p>"
    return f"<div class=charts>{''.join(charts)}</div>{note}"


def render_train_report(run: RunFiles) -> str:
    """The training report page of ``run``."""
    title = html.escape(f"rlhf-ppo training report: {run.folder}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<script>{report.ERROR_HOOK}</script>
<style>{CSS}</style></head>
<body>
<h1>{title}</h1>
<h2>Run</h2>
{facts_table(run)}
{metrics_summary(run.metrics)}
<h2>Training curves</h2>
<p class=meta>Red lines: an alarm fired at that iteration (see Alarms below).</p>
{charts_section(run)}
<h2>Alarms</h2>
{alarms_table(run.alarms)}
<h2>Samples</h2>
<p class=meta>Greedy responses to the same prompts at the first, middle and last sampled
iterations.</p>
{samples_side_by_side(run.samples)}
{all_samples(run.samples)}
<h2>Config</h2>
{config_section(run)}
<script>{SCRIPT}</script>
</body></html>
"""


def write_train_report(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Read the run folder ``run_dir`` and write its report to ``path`` (default
    ``RUN_DIR/report.html``); return the path."""
    run = read_run(run_dir)
    path = Path(path) if path is not None else Path(run_dir) / REPORT_FILE
    path.write_text(render_train_report(run), encoding="utf-8")
    return path


def write_at_end_of_training(run_dir: str | Path) -> Path | None:
    """:func:`write_train_report` for the trainer: a failure is logged as a warning, never
    raised, so that a finished run is never lost to its report."""
    try:
        path = write_train_report(run_dir)
    except Exception as e:  # the run is saved already: the report is a convenience
        logger.warning("could not write the training report of %s (%s: %s); try "
                       "`rlhf-ppo report %s`", run_dir, type(e).__name__, e, run_dir)
        return None
    logger.info("training report: %s", path)
    return path
