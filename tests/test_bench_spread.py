"""The accuracy suite's standard error of a run's gap to float (benchmarks/tasks.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tasks  # noqa: E402


def hmean_by_definition(found, matched, expected):
    precision, recall = matched / found, matched / expected
    return 200.0 * precision * recall / (precision + recall)


@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 30), st.integers(1, 30)), min_size=1, max_size=20))
@settings(max_examples=60, deadline=None)
def test_det_hmean_from_sums_is_the_precision_recall_hmean(pages):
    units = np.array([(f, min(m, f, e), e) for f, m, e in pages], dtype=np.float64)
    found, matched, expected = units.sum(0)
    want = hmean_by_definition(found, matched, expected) if matched else 0.0
    assert float(tasks.Det().metric_from_sums(units.sum(0))) == pytest.approx(want)


def test_rec_and_detector_metrics_from_sums():
    assert float(tasks.Rec().metric_from_sums(np.array([3.0, 150.0]))) == pytest.approx(2.0)
    assert float(tasks.Detector().metric_from_sums(np.array([97.0, 100.0]))) == pytest.approx(97.0)
    batch = tasks.Detector().metric_from_sums(np.array([[1.0, 2.0], [3.0, 3.0]]))
    assert batch.tolist() == pytest.approx([50.0, 100.0])


def test_paired_gap_matches_a_brute_force_bootstrap():
    rng = np.random.default_rng(3)
    confident = rng.integers(1, 12, size=40).astype(np.float64)
    float_units = np.stack([confident, confident], axis=1)  # float keeps its own classes
    kept = np.minimum(confident, np.maximum(confident - rng.integers(0, 2, size=40), 0))
    units = np.stack([kept, confident], axis=1)
    task = tasks.Detector()
    gap, se = tasks.paired_gap(task, units, float_units, seed=5)
    picks = np.random.default_rng(5).integers(0, 40, size=(tasks.BOOTSTRAP, 40))
    gaps = []
    for row in picks:  # one resample at a time
        k, c = units[row].sum(0)
        gaps.append(100.0 * k / c - 100.0)
    assert gap == pytest.approx(100.0 * kept.sum() / confident.sum() - 100.0)
    assert se == pytest.approx(np.std(gaps, ddof=1))
    assert se > 0


def test_paired_gap_of_a_run_equal_to_float_is_zero_with_no_spread():
    units = np.array([[10.0, 9.0, 11.0], [5.0, 5.0, 5.0], [7.0, 3.0, 8.0]])
    assert tasks.paired_gap(tasks.Det(), units, units) == (0.0, 0.0)


def test_paired_gap_needs_the_same_units():
    with pytest.raises(ValueError):
        tasks.paired_gap(tasks.Det(), np.ones((3, 3)), np.ones((4, 3)))
