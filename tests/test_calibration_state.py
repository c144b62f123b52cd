"""Streamed histograms: exact, order-independent, mergeable, flat in memory; state files."""

import json
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from builders import conv_bn_relu_model
from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from quantizer import CalibrationDataError, Calibrator, optimize_model
from quantizer.calibration_state import load_ranges, save_ranges
from quantizer.calibrators.statistics import BINS, TensorStatistics
from quantizer.cli.main import cli

values = arrays(np.float32, st.integers(1, 200), elements=st.floats(-1e4, 1e4, width=32))


def brute_force_counts(stats, chunks):
    everything = np.concatenate([c.ravel() for c in chunks]).astype(np.float64)
    indices = np.floor(everything / 2.0**stats.level).astype(np.int64) - stats.offset
    return np.bincount(indices, minlength=stats.counts.size)


@settings(max_examples=80, deadline=None)
@given(st.lists(values, min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_histogram_exact_and_order_independent(chunks, random):
    forward = TensorStatistics()
    for chunk in chunks:
        forward.update(chunk)
    shuffled = list(chunks)
    random.shuffle(shuffled)
    backward = TensorStatistics()
    for chunk in shuffled:
        backward.update(chunk)
    assert forward == backward
    assert forward.counts.size <= BINS
    np.testing.assert_array_equal(forward.counts, brute_force_counts(forward, chunks))
    assert forward.counts.sum() == forward.count


@settings(max_examples=80, deadline=None)
@given(st.lists(values, min_size=2, max_size=9), st.data())
def test_merge_of_disjoint_shards_equals_one_run(chunks, data):
    cut_a = data.draw(st.integers(0, len(chunks)))
    cut_b = data.draw(st.integers(cut_a, len(chunks)))
    shards = [chunks[:cut_a], chunks[cut_a:cut_b], chunks[cut_b:]]
    parts = []
    for shard in shards:
        stats = TensorStatistics()
        for chunk in shard:
            stats.update(chunk)
        parts.append(stats)
    whole = TensorStatistics()
    for chunk in chunks:
        whole.update(chunk)
    assert parts[0].merge(parts[1]).merge(parts[2]) == whole
    assert parts[0].merge(parts[1].merge(parts[2])) == whole  # associative
    assert parts[2].merge(parts[0]).merge(parts[1]) == whole  # and commutative


def test_range_growth_keeps_every_count():
    stats = TensorStatistics()
    stats.update(np.linspace(-0.001, 0.001, 1000))
    stats.update(np.array([1e6, -3e5]))
    assert stats.count == stats.counts.sum() == 1002
    assert stats.histogram().lo <= -3e5 and stats.histogram().edges[-1] > 1e6


def test_nan_counted_and_all_nan_tensor_named():
    model = optimize_model(conv_bn_relu_model())
    rng = np.random.default_rng(0)
    sample = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    sample[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    clean = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    calibrator = Calibrator(model)
    calibrator.collect_data([sample, clean])
    assert calibrator.statistics["x"].nonfinite == 3 and calibrator.statistics["x"].count == 2 * 192 - 3
    ranges = calibrator.compute_range()  # the NaN/Inf values are excluded, not fatal
    finite = np.concatenate([sample[np.isfinite(sample)], clean.ravel()])
    assert ranges["x"] == (finite.min(), finite.max())
    all_nan = Calibrator(model)
    all_nan.collect_data([np.full((1, 3, 8, 8), np.nan, np.float32)])
    with pytest.raises(CalibrationDataError, match="tensor '.+' had no finite values"):
        all_nan.compute_range()


def traced_peak(samples, warm_up):
    """Peak Python/numpy memory while streaming ``samples``.

    The warm-up pass sizes every histogram to its final extent first (the state is
    O(tensors x bins) by construction), so what is measured is what streaming adds.
    """
    calibrator = Calibrator(optimize_model(conv_bn_relu_model()), keep_histograms=True)
    calibrator.collect_data(warm_up)
    tracemalloc.start()
    calibrator.collect_data(samples)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert all(s.counts.size <= BINS for s in calibrator.statistics.values())
    return peak


def test_memory_flat_in_number_of_samples():
    rng = np.random.default_rng(0)
    samples = [rng.standard_t(3, size=(16, 3, 8, 8)).astype(np.float32) for i in range(64)]
    before, many, after = traced_peak(samples[:8], samples), traced_peak(samples, samples), traced_peak(samples[:8], samples)
    few = max(before, after)  # the same measurement twice: its spread is allocator noise, not streaming
    # The statistics of one sample are computed while the next one runs: at most two
    # samples' activations are alive (how often both are depends on timing).  Within 10 %
    # plus one more sample's activations and two samples' bytes (allocator noise): keeping
    # even a tenth of the 56 extra samples would add 28 samples' bytes and 5 samples' activations.
    calibrator = Calibrator(optimize_model(conv_bn_relu_model()))
    activations = sum(a.nbytes for a in calibrator.session().run(calibrator._outputs, {"x": samples[0]}))
    assert many <= few * 1.10 + activations + 2 * samples[0].nbytes, (before, many, after, activations)
    assert many < 64 * samples[0].nbytes / 4  # far below keeping even the inputs of all samples


def test_state_round_trip_and_refusal(tmp_path):
    model = optimize_model(SAMPLE_MODEL)
    full = Calibrator(model, keep_histograms=True)
    full.collect_data(SAMPLE_CALIB)
    files = sorted(SAMPLE_CALIB.glob("*.npy"))
    shards = []
    for i, part in enumerate((files[:20], files[20:])):
        shard = Calibrator(model, keep_histograms=True)
        shard.collect_data([np.load(f) for f in part])
        shard.save_state(tmp_path / f"shard{i}.npz")
        shards.append(tmp_path / f"shard{i}.npz")
    merged = Calibrator(model, "min_max_sym")
    for path in shards:
        merged.load_state(path)
    assert merged.samples_seen == 64
    assert merged.statistics == full.statistics
    other = Calibrator(optimize_model(conv_bn_relu_model()))
    with pytest.raises(CalibrationDataError, match="different model"):
        other.load_state(shards[0])


def test_cli_save_load_state_and_ranges_round_trip(tmp_path):
    runner = CliRunner()
    state, ranges = tmp_path / "state.npz", tmp_path / "ranges.json"
    direct, reused, from_json = (tmp_path / n for n in ("direct.onnx", "reused.onnx", "json.onnx"))
    args = [str(SAMPLE_MODEL), "-q", "--no-bias-correction"]  # a correction needs samples: not with a state alone
    r = runner.invoke(cli, args + ["--data", str(SAMPLE_CALIB), "--save-calibration", str(state),
                                   "--save-ranges", str(ranges), "-o", str(tmp_path / "first.onnx")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, args + ["--calib", "min_max_sym", "--data", str(SAMPLE_CALIB), "-o", str(direct)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, args + ["--calib", "min_max_sym", "--load-calibration", str(state), "-o", str(reused)])
    assert r.exit_code == 0, r.output
    assert direct.read_bytes() == reused.read_bytes()  # no model run needed for another method
    r = runner.invoke(cli, args + ["--ranges", str(ranges), "-o", str(from_json)])
    assert r.exit_code == 0, r.output
    assert from_json.read_bytes() == (tmp_path / "first.onnx").read_bytes()
    data = json.loads(ranges.read_text())
    assert data["input"] == [0.0, 1.0]


def test_ranges_json_errors(tmp_path):
    from quantizer import UsageError

    bad = tmp_path / "bad.json"
    bad.write_text('{"x": [2, 1]}')
    with pytest.raises(UsageError, match="min > max"):
        load_ranges(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(UsageError, match="must map tensor names"):
        load_ranges(bad)
    save_ranges({"x": (-1.5, 2.0)}, tmp_path / "ok.json")
    assert load_ranges(tmp_path / "ok.json") == {"x": (-1.5, 2.0)}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6000), min_size=1, max_size=12), st.integers(1, 5000), st.booleans())
def test_batched_updates_give_exactly_one_update_per_array(sizes, limit, with_nan):
    from quantizer.calibrators.statistics import BatchedUpdates

    rng = np.random.default_rng(len(sizes) * 7919 + limit)
    chunks = [rng.standard_t(2, size).astype(np.float32) * 10.0 ** rng.integers(-3, 4) for size in sizes]
    if with_nan and chunks[0].size:
        chunks[0][0] = np.nan
    one_by_one, batched = TensorStatistics(), TensorStatistics()
    batches = BatchedUpdates(batched, limit=limit)
    for chunk in chunks:
        one_by_one.update(chunk)
        batches.add(chunk)
    batches.flush()
    assert batched == one_by_one
    assert (batched.level, batched.offset, batched.nonfinite) == (one_by_one.level, one_by_one.offset, one_by_one.nonfinite)
    np.testing.assert_array_equal(batched.counts, one_by_one.counts)
