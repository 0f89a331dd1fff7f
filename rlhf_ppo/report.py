"""The self-contained HTML report of ``rlhf-ppo evaluate``.

One file, no external URLs: inline CSS and JavaScript, plots drawn with matplotlib's Agg canvas and
embedded as base64 PNG data URIs. Every piece of text from the data (prompts, responses, paths) is
escaped with :func:`html.escape`. The page's script filters and sorts the samples table and, on
load, records on ``<body>`` how many images decoded, how many sample rows exist and how many
JavaScript errors occurred (``data-images-loaded``, ``data-sample-rows``, ``data-js-errors``), so
a headless browser can check the page.

A multi-turn sample (``*_transcript`` in its row) is shown whole, span by span along the action
mask: the model's own (trained) tokens as ``<span class=turn>``, the tools' or the environment's
observations (read, never trained) as ``<span class=obs>``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from .data import DataError

# Training curves, by the key the PPO trainer writes to metrics.jsonl.
CURVE_KEYS = {"score_mean": "score (mean)", "kl": "KL to reference (per sequence)",
              "entropy": "entropy (per token)", "clipfrac": "clip fraction"}


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a PPO ``metrics.jsonl``; DataError naming the file and line when one is not a
    JSON object."""
    return read_rows(path, "metrics_path")


def read_rows(path: str | Path, label: str, running: bool = False) -> list[dict]:
    """The JSON-object rows of a JSON-lines file; DataError naming ``label`` (the field or file
    the user knows it by), the file and the line when one is not a JSON object. ``running``: the
    file may still be written, so a last line without its newline is left out (half written)."""
    text = Path(path).read_text()
    if running and not text.endswith("\n"):
        text = text.rpartition("\n")[0]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{label}: {str(path)!r} line {i} is not JSON ({e})") from e
        if not isinstance(row, dict):
            raise DataError(f"{label}: {str(path)!r} line {i}: expected a JSON object")
        rows.append(row)
    return rows


def png_data_uri(fig) -> str:
    """A matplotlib ``Figure`` rendered by the Agg canvas as a ``data:image/png;base64,`` URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global backend state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def score_histogram(policy_scores: list[float], reference_scores: list[float]) -> str:
    """Overlaid histograms of the policy's and the reference's scores (shared bins), as a data URI."""
    import numpy as np
    from matplotlib.figure import Figure

    both = np.asarray(list(policy_scores) + list(reference_scores), dtype=float)
    lo, hi = float(both.min()), float(both.max())
    bins = np.linspace(lo, hi, 21) if hi > lo else np.linspace(lo - 0.5, lo + 0.5, 3)
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.hist(reference_scores, bins=bins, alpha=0.55, label="reference", color="tab:gray")
    ax.hist(policy_scores, bins=bins, alpha=0.55, label="policy", color="tab:blue")
    ax.set_xlabel("score")
    ax.set_ylabel("responses")
    ax.legend()
    return png_data_uri(fig)


def training_curves(metrics: list[dict]) -> str | None:
    """One panel per key of :data:`CURVE_KEYS` found in the metrics rows (null values skipped),
    against the iteration, as a data URI; None when no key has a value."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = {}
    for key in CURVE_KEYS:
        points = [(m.get("iteration", i + 1), m[key]) for i, m in enumerate(metrics)
                  if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
        if points:
            series[key] = points
    if not series:
        return None
    cols = min(2, len(series))
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows))
    for i, (key, points) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(CURVE_KEYS[key], fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return png_data_uri(fig)


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _ci(stat: dict) -> str:
    return (f"{_num(stat['mean'])} <span class=ci>[{_num(stat['ci_low'])}, "
            f"{_num(stat['ci_high'])}]</span>")


def summary_table(summary: dict) -> str:
    """The policy-vs-reference table (means with their confidence intervals)."""
    p, r = summary["policy"], summary["reference"]
    level = f"{summary['bootstrap']['level']:.0%}"
    rows = [("score (mean, CI)", _ci(p["score"]), _ci(r["score"]))]
    for ps, rs in zip(p["sources"], r["sources"]):
        label = f"{ps['source']}: {ps['name']}"
        rows.append((html.escape(label), _ci(ps), _ci(rs)))
    if "accuracy" in p and "accuracy" in r:  # evaluate's accuracy_column
        rows.append(("accuracy (mean, CI)", _ci(p["accuracy"]), _ci(r["accuracy"])))
        for k in p.get("pass@k", {}):
            if k in r.get("pass@k", {}):
                rows.append((f"pass@{html.escape(k)} (CI)", _ci(p["pass@k"][k]),
                             _ci(r["pass@k"][k])))
    for key, label in (("response_length", "response length (tokens)"), ("stop_rate", "stop rate"),
                       ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2")):
        rows.append((label, _num(p[key]), _num(r[key])))
    rows += _agent_rows(summary)
    both = [("win rate of the policy (ties 1/2)", summary["win_rate"]),
            ("score difference (policy - reference)", summary["score_diff"]),
            *([("accuracy difference (policy - reference)", summary["accuracy_diff"])]
              if "accuracy_diff" in summary else []),
            ("KL(policy || reference), k1 per response", summary["kl"])]
    body = "".join(f"<tr><th>{a}</th><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)
    body += "".join(f"<tr><th>{a}</th><td colspan=2>{_ci(s)}</td></tr>" for a, s in both)
    return (f"<table class=summary><thead><tr><th>metric ({level} bootstrap CI over prompts)</th>"
            f"<th>policy</th><th>reference</th></tr></thead><tbody>{body}</tbody></table>")


AGENT_ROWS = {"success_rate": "success rate (per episode, CI)", "turns": "model turns per episode (CI)",
              "tool_calls": "tool calls per episode (CI)",
              "tool_errors": "tool errors per episode (CI)"}


def _agent_rows(summary: dict) -> list[tuple[str, str, str]]:
    """The multi-turn rows of the summary table (none for a single-turn evaluation)."""
    p, r = summary["policy"].get("agent"), summary["reference"].get("agent")
    if p is None or r is None:
        return []
    rows = []
    for key, label in AGENT_ROWS.items():
        if key in p and key in r:
            if key == "success_rate":
                label = f"{label[:-1]}, from the {html.escape(str(summary.get('success_from')))})"
            rows.append((label, _ci(p[key]), _ci(r[key])))
    return rows


def transcript_html(spans: list[dict]) -> str:
    """A multi-turn transcript: each span escaped, the model's as ``<span class=turn>``, the
    observations as ``<span class=obs>``."""
    return "".join(f'<span class={"turn" if s["trained"] else "obs"}>{html.escape(s["text"])}</span>'
                   for s in spans)


def _response_cell(row: dict, side: str) -> str:
    ending = "stopped" if row[f"{side}_stopped"] else "no stop token"
    transcript = row.get(f"{side}_transcript")
    if transcript is None:
        return (f'<td title="{row[f"{side}_length"]} tokens, {ending}">'
                f'{html.escape(row[f"{side}_response"])}</td>')
    counts = ", ".join(f"{row[f'{side}_{k}']:g} {k.replace('_', ' ')}"
                       for k in ("turns", "tool_calls", "tool_errors"))
    return (f'<td title="{row[f"{side}_length"]} model tokens, {ending}; {counts}">'
            f"{transcript_html(transcript)}</td>")


def samples_table(rows: list[dict]) -> str:
    """Every sample pair as a table row; numbers also in data attributes for sorting."""
    out = []
    for r in rows:
        diff = r["policy_score"] - r["reference_score"]
        attrs = (f'data-index="{r["prompt_index"] * 1000000 + r["sample"]}" '
                 f'data-policy-score="{r["policy_score"]!r}" '
                 f'data-reference-score="{r["reference_score"]!r}" data-diff="{diff!r}" '
                 f'data-kl="{r["kl"]!r}"')
        cells = [f'<td>{r["prompt_index"]}.{r["sample"]}</td>', f'<td>{html.escape(r["prompt"])}</td>',
                 _response_cell(r, "policy"), f'<td>{_num(r["policy_score"])}</td>',
                 _response_cell(r, "reference"), f'<td>{_num(r["reference_score"])}</td>',
                 f"<td>{_num(diff)}</td>", f'<td>{_num(r["kl"])}</td>']
        out.append(f"<tr {attrs}>{''.join(cells)}</tr>")
    head = ("<tr><th><button data-sort=index>#</button></th><th>prompt</th>"
            "<th>policy response</th><th><button data-sort=policy-score>policy score</button></th>"
            "<th>reference response</th>"
            "<th><button data-sort=reference-score>reference score</button></th>"
            "<th><button data-sort=diff>difference</button></th>"
            "<th><button data-sort=kl>KL</button></th></tr>")
    return (f"<table id=samples><thead>{head}</thead><tbody>{''.join(out)}</tbody></table>")


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
table.summary td { font-variant-numeric: tabular-nums; }
.ci { color: #666; }
#samples td { white-space: pre-wrap; max-width: 28em; }
#samples button { font: inherit; border: none; background: none; cursor: pointer; padding: 0; }
#samples button:after { content: " \\2195"; color: #999; }
.meta { color: #555; }
.turn { background: #e3efff; }
.obs { color: #6a5a00; background: #fff6d6; font-style: italic; }
"""

# Filter (substring over the row text) and sort (click a header; again to reverse). On load it
# applies `#q=TEXT&sort=KEY` from the URL (`-KEY`: descending) and records on <body> what a
# headless browser test checks.
SCRIPT = """
(function () {
  var tbody = document.querySelector('#samples tbody');
  var rows = Array.prototype.slice.call(tbody.rows);
  var filter = document.getElementById('filter');
  var state = {key: 'index', desc: false};
  function visible() { return rows.filter(function (r) { return !r.hidden; }); }
  function applyFilter(q) {
    q = q.toLowerCase();
    rows.forEach(function (r) { r.hidden = q !== '' && r.textContent.toLowerCase().indexOf(q) < 0; });
    document.getElementById('shown').textContent = visible().length;
  }
  function sortBy(key, desc) {
    state = {key: key, desc: desc};
    var attr = 'data-' + key;
    rows.sort(function (a, b) {
      var d = parseFloat(a.getAttribute(attr)) - parseFloat(b.getAttribute(attr));
      return desc ? -d : d;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }
  filter.addEventListener('input', function () { applyFilter(filter.value); });
  document.querySelectorAll('#samples button[data-sort]').forEach(function (b) {
    b.addEventListener('click', function () {
      var key = b.getAttribute('data-sort');
      sortBy(key, state.key === key ? !state.desc : true);
    });
  });
  window.addEventListener('load', function () {
    var params = new URLSearchParams(location.hash.slice(1));
    if (params.get('sort')) {
      var key = params.get('sort');
      sortBy(key.replace(/^-/, ''), key.charAt(0) === '-');
    }
    if (params.get('q') !== null) { filter.value = params.get('q'); applyFilter(filter.value); }
    var body = document.body, shown = visible();
    body.setAttribute('data-images-total', document.images.length);
    body.setAttribute('data-images-loaded', Array.prototype.filter.call(document.images,
      function (i) { return i.complete && i.naturalWidth > 0; }).length);
    body.setAttribute('data-sample-rows', rows.length);
    body.setAttribute('data-visible-rows', shown.length);
    body.setAttribute('data-first-row', shown.length ? shown[0].getAttribute('data-index') : '');
    body.setAttribute('data-js-errors', window.__reportErrors.length);
    body.setAttribute('data-ready', '1');
  });
})();
"""

ERROR_HOOK = ("window.__reportErrors = [];"
              "window.onerror = function (msg) { window.__reportErrors.push(String(msg)); };")


def render_report(summary: dict, rows: list[dict], metrics: list[dict] | None = None) -> str:
    """The report page: summary table, score histograms, training curves (when ``metrics``, the
    rows of a PPO metrics.jsonl, has any curve key) and the table of all samples."""
    hist = score_histogram([r["policy_score"] for r in rows], [r["reference_score"] for r in rows])
    curves = training_curves(metrics) if metrics else None
    e = html.escape
    if curves is not None:
        curves_html = f'<img alt="training curves" src="{curves}">'
    else:
        curves_html = "<p class=meta>No training metrics (metrics.jsonl) found for this policy.</p>"
    b = summary["bootstrap"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>rlhf-ppo evaluation: {e(summary['policy_path'])}</title>
<script>{ERROR_HOOK}</script>
<style>{CSS}</style></head>
<body>
<h1>Policy vs reference</h1>
<p class=meta>policy: <code>{e(summary['policy_path'])}</code><br>
reference: <code>{e(summary['reference_path'])}</code><br>
{summary['num_prompts']} prompts &times; {summary['samples_per_prompt']} samples per model, paired
by prompt and sample index (same seeds). Confidence intervals: {b['level']:.0%} percentile
bootstrap over prompts, {b['samples']} resamples.</p>
<h2>Summary</h2>
{summary_table(summary)}
<h2>Scores</h2>
<img alt="score histograms" src="{hist}">
<h2>Training</h2>
{curves_html}
<h2>Samples</h2>
<p><label>filter <input id=filter type=search placeholder="text in prompt or responses"></label>
<span class=meta><span id=shown>{len(rows)}</span> of {len(rows)} shown; click a column header
to sort</span></p>
{_legend(rows)}{samples_table(rows)}
<script>{SCRIPT}</script>
</body></html>
"""


def _legend(rows: list[dict]) -> str:
    """The key to a multi-turn transcript's styles (empty for single-turn samples)."""
    if not rows or "policy_transcript" not in rows[0]:
        return ""
    return ("<p class=meta>Transcripts: <span class=turn>the model's turns (trained tokens)</span> "
            "and <span class=obs>observations of the tools / environment (read, not trained)"
            "</span>.</p>\n")


def write_report(path: str | Path, summary: dict, rows: list[dict],
                 metrics: list[dict] | None = None) -> Path:
    """Render :func:`render_report` into ``path``; return the path."""
    path = Path(path)
    path.write_text(render_report(summary, rows, metrics), encoding="utf-8")
    return path
