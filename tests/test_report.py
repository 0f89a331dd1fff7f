"""The evaluation report page: structure and escaping without a browser, then loaded in headless
Chromium (images decode, every sample row is there, filter and sort work, no JavaScript error)."""

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rlhf_ppo.data import DataError, Prompt
from rlhf_ppo.evaluate import EvalConfig, SideSamples, build_summary, sample_rows
from rlhf_ppo.report import read_metrics, render_report, training_curves, write_report

# A response that would run script if it were not escaped: the <img> fails to load and its
# onerror handler marks <body>; the <script> would do the same.
HOSTILE = ('<script>document.body.setAttribute("data-pwned", "1")</script>'
           '<img src=x onerror="document.body.setAttribute(\'data-pwned\', \'1\')"> & "quotes"')


def make_inputs(n_prompts: int = 3, k: int = 2):
    """A summary and sample rows as ``run_evaluate`` builds them, from made-up samples."""
    prompts = [Prompt(f"prompt {i} <b>bold</b>", [1]) for i in range(n_prompts)]
    pol, ref = SideSamples(), SideSamples()
    for j in range(n_prompts * k):
        pol.texts.append(HOSTILE if j == 1 else f"policy answer {j} good")
        ref.texts.append(f"reference answer {j}")
        pol.scores.append(0.1 * j)
        ref.scores.append(0.25)
        pol.source_scores.append([0.1 * j])
        ref.source_scores.append([0.25])
        for side, n in ((pol, 3 + j), (ref, 4)):
            side.tokens.append(list(range(n)))
            side.lengths.append(n)
            side.stopped.append(j % 2 == 0)
    kl = [0.5 * j for j in range(n_prompts * k)]
    cfg = EvalConfig(policy="runs/x/final", bootstrap_samples=50)
    summary = build_summary(cfg, pol, ref, kl, ["rlhf_ppo.rewards:keyword_share"], (n_prompts, k),
                            {"policy": "runs/<x>/final", "reference": "builtin:tiny"})
    return summary, sample_rows(prompts, k, pol, ref, kl)


METRICS = [{"iteration": i, "score_mean": 0.1 * i, "kl": 0.2 * i, "entropy": 4.0 - 0.1 * i,
            "clipfrac": None if i == 2 else 0.01 * i} for i in range(1, 6)]


class _Page(HTMLParser):
    """Collects <body> attributes, image sources, script tags and the samples table's rows."""

    def __init__(self):
        super().__init__()
        self.body, self.images, self.scripts, self.sample_rows = {}, [], 0, 0
        self._in_samples = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body" and not self.body:
            self.body = attrs
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "table":
            self._in_samples = attrs.get("id") == "samples"
        elif tag == "tr" and self._in_samples and "data-index" in attrs:
            self.sample_rows += 1


def parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


def test_page_structure_images_and_no_external_urls():
    summary, rows = make_inputs()
    page = render_report(summary, rows, METRICS)
    parsed = parse(page)
    assert parsed.sample_rows == 6
    # two plots (score histograms, training curves), each a PNG embedded as base64
    assert len(parsed.images) == 2
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    # self-contained: no URL outside data: URIs, no external script or stylesheet
    assert not re.search(r"https?://|//cdn|<link|src=\"(?!data:)", page)
    # the summary table shows the numbers with their intervals
    assert "win rate of the policy" in page and "KL(policy || reference)" in page
    assert f"{summary['win_rate']['mean']:.4g}" in page
    # no metrics: one plot, and a note instead of the curves
    assert len(parse(render_report(summary, rows, None)).images) == 1


def test_all_text_is_escaped():
    summary, rows = make_inputs()
    page = render_report(summary, rows)
    assert HOSTILE not in page and 'onerror="document' not in page
    assert "&lt;script&gt;document.body.setAttribute(&quot;data-pwned&quot;" in page
    assert "&amp; &quot;quotes&quot;" in page
    assert "prompt 0 &lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert "runs/&lt;x&gt;/final" in page  # paths too
    assert parse(page).scripts == 2  # the page's own: the error hook and the table script


def test_training_curves_skip_missing_values_and_unknown_keys():
    assert training_curves([{"iteration": 1, "lr": 0.1}]) is None
    assert training_curves([{"iteration": 1, "kl": None}]) is None
    assert training_curves(METRICS).startswith("data:image/png;base64,")


def test_read_metrics_names_the_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "kl": 0.5}\n\n{"iteration": 2, "kl": NaN-oops}\n')
    with pytest.raises(DataError, match="line 3 is not JSON"):
        read_metrics(path)
    path.write_text('{"iteration": 1, "kl": null}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        read_metrics(path)


def chromium() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


def dump_dom(binary: str, url: str, profile: Path) -> dict:
    """Load ``url`` headless and return the <body> attributes of the DOM after the load event."""
    out = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return parse(out.stdout).body


def test_page_in_headless_chromium(tmp_path):
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install -y chromium)")
    summary, rows = make_inputs(n_prompts=4, k=2)
    path = write_report(tmp_path / "report.html", summary, rows, METRICS)
    body = dump_dom(binary, path.resolve().as_uri(), tmp_path / "profile")
    assert body.get("data-ready") == "1", body
    assert body["data-js-errors"] == "0"
    assert body["data-images-total"] == "2" and body["data-images-loaded"] == "2"
    assert body["data-sample-rows"] == "8" and body["data-visible-rows"] == "8"
    assert "data-pwned" not in body  # the hostile response stayed text
    # filter and sort, applied from the URL: "policy answer" is in every policy response but the
    # hostile one (row 1); by policy score (0.1 * row), descending, row 7 = pair 3.1 comes first
    body = dump_dom(binary, path.resolve().as_uri() + "#q=policy%20answer&sort=-policy-score",
                    tmp_path / "profile")
    assert body["data-visible-rows"] == "7" and body["data-sample-rows"] == "8"
    assert body["data-first-row"] == str(3 * 1000000 + 1)
    assert body["data-js-errors"] == "0"
