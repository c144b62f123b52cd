"""The visual report: `--report x.html` and `compare --html x.html` write one
self-contained HTML page whose embedded numbers are the JSON report's."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from corpus import invoke
from quantizer.calibrators import TensorStatistics

from quantizer.calibration_state import load_state
from quantizer.html_report import histogram_shares


class Page(HTMLParser):
    """What the tests read from a page: chart count, the body marker, the JSON islands,
    and anything that would fetch something or run a script."""

    def __init__(self, text: str):
        super().__init__()
        self.charts = 0
        self.marker = None
        self.islands: dict[str, str] = {}
        self.external: list[str] = []
        self.scripts: list[dict] = []
        self._island = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and "chart" in (attrs.get("class") or "").split():
            self.charts += 1
        if tag == "body":
            self.marker = attrs.get("data-charts")
        if tag == "script":
            self.scripts.append(attrs)
            self._island = attrs.get("id")
            self.islands[self._island] = ""
        for name in ("src", "href"):
            if attrs.get(name):
                self.external.append(attrs[name])

    def handle_endtag(self, tag):
        if tag == "script":
            self._island = None

    def handle_data(self, data):
        if self._island is not None:
            self.islands[self._island] += data

    def data(self, element_id: str):
        return json.loads(self.islands[element_id])


@pytest.fixture(scope="module")
def run_reports(tmp_path_factory):
    """One run writing the HTML report (and its calibration state), one writing JSON."""
    tmp = tmp_path_factory.mktemp("html_report")
    html_run = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "--calib", "min_max_asym", "-o", tmp / "a.onnx",
                      "--report", tmp / "r.html",
                      "--save-calibration", tmp / "state.npz", "-q")
    assert html_run.exit_code == 0, html_run.output
    json_run = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "--calib", "min_max_asym", "-o", tmp / "b.onnx",
                      "--report", tmp / "r.json", "-q")
    assert json_run.exit_code == 0, json_run.output
    return tmp


def _page(path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def test_html_report_parses_and_has_the_charts(run_reports):
    page = _page(run_reports / "r.html")
    charts = page.data("chart-data")
    assert len(charts["histograms"]) == 7  # every quantized activation of digits_cnn (the logits are float)
    assert page.charts == 1 + len(charts["histograms"])  # the SQNR chart and one per histogram
    assert page.marker == str(page.charts)
    assert page.external == []  # self-contained: nothing fetched
    assert all(s.get("type") == "application/json" for s in page.scripts)  # no JavaScript
    for h in charts["histograms"]:
        assert 0 < len(h["counts"]) <= 128
        assert len(h["methods"]) == 10  # the ten methods' ranges, from the same histograms


def test_embedded_data_is_the_json_report(run_reports):
    page = _page(run_reports / "r.html")
    embedded = page.data("report-data")
    written = json.loads((run_reports / "r.json").read_text())
    assert set(embedded) == set(written)
    timing_free = {"seconds", "steps", "output"}  # two runs: their times and output names differ
    for key in set(written) - timing_free:
        assert embedded[key] == written[key], key
    assert [t["tensor"] for t in embedded["tensors"]] == [t["tensor"] for t in written["tensors"]]
    assert [t["sqnr_db"] for t in embedded["tensors"]] == [t["sqnr_db"] for t in written["tensors"]]
    # the chart's tensors are the report's, in graph order, with the same SQNR
    charts = page.data("chart-data")
    by_tensor = {t["tensor"]: t for t in written["tensors"]}
    assert sorted(t["tensor"] for t in charts["tensors"]) == sorted(by_tensor)
    assert charts["tensors"][0]["tensor"] == "input" and charts["tensors"][-1]["tensor"] == "flat_out"
    for t in charts["tensors"]:
        assert t["sqnr_db"] == by_tensor[t["tensor"]]["sqnr_db"]
    for h in charts["histograms"]:
        entry = by_tensor[h["tensor"]]
        assert (h["scale"], h["zero_point"], h["range"]) == (entry["scale"], entry["zero_point"], entry["range"])


def _shares_by_overlap(stats: TensorStatistics, value_range, scale):
    """Independently of the page: each bin's values spread evenly over the bin cut to the
    observed [min, max] (a bin cut to a point holds them at that point); the share inside
    an interval is the overlap of bin and interval over the bin's extent."""
    hist = stats.histogram()
    a = np.clip(hist.edges[:-1], stats.minimum, stats.maximum)
    b = np.clip(hist.edges[1:], stats.minimum, stats.maximum)
    counts, total = hist.counts, hist.counts.sum()

    def inside(lo, hi, closed):
        overlap = np.clip(np.minimum(b, hi) - np.maximum(a, lo), 0, None) / np.where(b > a, b - a, 1)
        point = (a >= lo) & (a <= hi) if closed else (a > lo) & (a < hi)
        return float(np.sum(counts * np.where(b > a, overlap, point)))

    clipped = 1 - inside(value_range[0], value_range[1], closed=True) / total
    rounded = inside(-scale / 2, scale / 2, closed=False) / total
    return clipped, rounded


def test_clipped_and_rounded_shares_follow_the_histogram(run_reports):
    charts = _page(run_reports / "r.html").data("chart-data")
    state = load_state(run_reports / "state.npz")
    for h in charts["histograms"]:
        clipped, rounded = _shares_by_overlap(state.statistics[h["tensor"]], h["range"], h["scale"])
        assert h["clipped"] == pytest.approx(clipped, abs=1e-9), h["tensor"]
        assert h["rounded_to_zero"] == pytest.approx(rounded, abs=1e-9), h["tensor"]
        counts = state.statistics[h["tensor"]].counts
        assert sum(h["counts"]) == int(counts.sum())  # downsampling keeps every value
    shares = {h["tensor"]: h for h in charts["histograms"]}
    assert shares["input"]["clipped"] == 0.0  # pixels at exactly 1.0 are inside [0, 1]
    assert shares["relu1_out"]["rounded_to_zero"] > 0.3  # a Relu output: many exact zeros


def test_shares_match_the_raw_values():
    rng = np.random.default_rng(0)
    # exact zeros (a Relu) and values saturated at the maximum (a Clip at 6).  The shares are
    # as fine as the histogram's bins (here 2**-7): an int8 scale over the range is wider
    values = np.concatenate([rng.normal(0.5, 1.0, 50_000), np.zeros(10_000), np.full(1000, 6.0)]).astype(np.float32)
    stats = TensorStatistics()
    stats.update(values)
    hist = stats.histogram()
    for value_range, scale in (((-1.0, 3.0), 0.05), ((-3.0, 6.0), 0.5), ((0.0, 1.0), 0.02)):
        clipped, rounded = histogram_shares(hist.counts, hist.lo, hist.width, value_range, scale,
                                            stats.minimum, stats.maximum)
        expected_clipped = np.mean((values < value_range[0]) | (values > value_range[1]))
        expected_rounded = np.mean(np.abs(values) < scale / 2)
        assert clipped == pytest.approx(expected_clipped, abs=2e-3)
        assert rounded == pytest.approx(expected_rounded, abs=2e-3)


def test_json_suffix_stays_json(run_reports):
    text = (run_reports / "r.json").read_text()
    assert text.lstrip().startswith("{") and "<svg" not in text


def test_tune_writes_the_html_report(tmp_path):
    script = tmp_path / "evaluate.py"
    script.write_text("def evaluate(model_path):\n    return 1.0\n")
    result = invoke("tune", SAMPLE_MODEL, "--data", SAMPLE_CALIB, "--eval", script, "--calib", "min_max_asym",
                    "-o", tmp_path / "t.onnx", "--report", tmp_path / "t.html", "-q")
    assert result.exit_code == 0, result.output
    page = _page(tmp_path / "t.html")
    assert page.charts == int(page.marker) == 1 + len(page.data("chart-data")["histograms"]) > 1
    assert page.data("report-data")["autotune"]["passed"] is True


@pytest.fixture(scope="module")
def compared(tmp_path_factory, run_reports):
    tmp = tmp_path_factory.mktemp("compare_html")
    result = invoke("compare", SAMPLE_MODEL, run_reports / "a.onnx", "--data", SAMPLE_CALIB, "--json",
                    "--tensors", "--html", tmp / "c.html")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), tmp / "c.html"


def test_compare_html_has_the_json_numbers(compared):
    printed, path = compared
    page = _page(path)
    assert page.data("report-data") == printed
    outputs = printed["outputs"]
    assert [o["name"] for o in outputs] == ["logits"]
    assert page.charts == int(page.marker) == len([o for o in outputs if o["worst_samples"]]) + 1  # + tensors
    text = path.read_text()
    assert f"{outputs[0]['sqnr_db']:.2f}" in text  # the table shows the same SQNR


def test_compare_html_without_json_still_prints_the_table(tmp_path, run_reports):
    result = invoke("compare", SAMPLE_MODEL, run_reports / "a.onnx", "--data", SAMPLE_CALIB, "--max-samples", "4",
                    "--html", tmp_path / "c.html")
    assert result.exit_code == 0, result.output
    assert "compared 4 sample(s)" in result.stdout
    assert _page(tmp_path / "c.html").data("report-data")["samples"] == 4


def _chromium_dom(path) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    done = subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom",
                           path.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chromium_renders_the_report(run_reports):
    dom = _chromium_dom(run_reports / "r.html")
    page = Page(dom)
    assert page.charts == int(page.marker) == 8
    assert "<polyline" in dom and "<path" in dom


def test_chromium_renders_the_comparison(compared):
    dom = _chromium_dom(compared[1])
    page = Page(dom)
    assert page.charts == int(page.marker) >= 1
