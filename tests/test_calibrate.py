"""Stage 2: streamed statistics equal numpy over all samples; data is checked per sample."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from builders import branchy_model, conv_bn_relu_model, two_input_model
from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from quantizer import CalibrationDataError, CalibrationMethod, Calibrator, UsageError, optimize_model
from quantizer.calibrators import TensorStatistics, symmetric_range


def all_activations(model, samples, names):
    """Brute force: run a model exposing every named tensor and keep everything."""
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    inputs = {i.name for i in model.graph.input}
    wanted = [n for n in names if n not in inputs]
    for name in wanted:
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    values = {n: [] for n in names}
    for sample in samples:
        for name, array in zip(wanted, session.run(wanted, sample)):
            values[name].append(array.ravel())
        for name in inputs & set(names):
            values[name].append(sample[name].ravel())
    return {n: np.concatenate(v) for n, v in values.items()}


def random_samples(count, shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=shapes[i % len(shapes)]).astype(np.float32) * 3} for i in range(count)]


@pytest.mark.parametrize("method", ["min_max_asym", "MIN_MAX_SYM"])
def test_min_max_matches_numpy_with_variable_shapes(method):
    model = optimize_model(branchy_model())
    samples = random_samples(7, [(1, 3, 8, 8), (3, 3, 8, 8)])
    calibrator = Calibrator(model, method)
    calibrator.collect_data(samples[:4])
    calibrator.collect_data(iter(samples[4:]))  # callable repeatedly, any iterable
    ranges = calibrator.compute_range()
    reference = all_activations(model, samples, list(ranges))
    assert calibrator.samples_seen == 7
    for name, (low, high) in ranges.items():
        values = reference[name]
        if CalibrationMethod.parse(method).symmetric:
            bound = np.abs(values).max()
            expected = (0.0, bound) if values.min() >= 0 else (-bound, bound)
        else:
            expected = (values.min(), values.max())
        assert (low, high) == pytest.approx(expected, rel=1e-6), name


def test_sample_model_ranges_cover_relu_outputs():
    model = optimize_model(SAMPLE_MODEL)
    calibrator = Calibrator(model, "min_max_sym")
    calibrator.collect_data(SAMPLE_CALIB)
    ranges = calibrator.compute_range()
    relu_outputs = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    assert relu_outputs and all(ranges[name][0] == 0.0 for name in relu_outputs)  # [0, a] for x >= 0
    assert ranges["logits"][0] == -ranges["logits"][1]


def test_npz_samples_for_two_inputs(tmp_path):
    model = optimize_model(two_input_model())
    rng = np.random.default_rng(0)
    for i, width in enumerate([4, 6, 9]):  # the model allows variable widths
        np.savez(tmp_path / f"s{i}.npz", a=rng.normal(size=(1, 3, 4, width)).astype(np.float32),
                 b=rng.normal(size=(1, 3, 4, width)).astype(np.float32))
    calibrator = Calibrator(model)
    calibrator.collect_data(tmp_path)
    assert set(calibrator.compute_range()) >= {"a", "b", "s"}


@pytest.mark.parametrize(
    "sample, message",
    [
        ({"x": np.zeros((1, 3, 8, 8), np.float64)}, "input 'x' expects float32\\[\\?,3,8,8\\], given float64\\[1,3,8,8\\]"),
        ({"x": np.zeros((1, 3, 8), np.float32)}, "wrong rank"),
        ({"x": np.zeros((1, 4, 8, 8), np.float32)}, "wrong shape"),
        ({"y": np.zeros((1, 3, 8, 8), np.float32)}, "missing input\\(s\\) x; unknown input\\(s\\) y"),
    ],
)
def test_bad_samples_name_the_input(sample, message):
    calibrator = Calibrator(optimize_model(conv_bn_relu_model()))
    with pytest.raises(CalibrationDataError, match=message):
        calibrator.collect_data([sample])


def test_unknown_method_fails_clearly():
    with pytest.raises(UsageError, match="unknown calibration method 'kl'"):
        Calibrator(optimize_model(conv_bn_relu_model()), "kl")


def test_no_samples_is_an_error():
    calibrator = Calibrator(optimize_model(conv_bn_relu_model()))
    calibrator.collect_data([])
    with pytest.raises(CalibrationDataError, match="no calibration samples"):
        calibrator.compute_range()


finite = st.floats(-1e6, 1e6, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(arrays(np.float32, st.integers(1, 50), elements=finite | st.just(np.nan)), min_size=1, max_size=6))
def test_streaming_statistics_equal_numpy_and_merge(chunks):
    stats, halves = TensorStatistics(), [TensorStatistics(), TensorStatistics()]
    for i, chunk in enumerate(chunks):
        stats.update(chunk)
        halves[i % 2].update(chunk)
    everything = np.concatenate(chunks)
    finite_values = everything[np.isfinite(everything)]
    assert stats.count == finite_values.size
    assert stats.nonfinite == everything.size - finite_values.size
    if finite_values.size:
        assert (stats.minimum, stats.maximum) == (finite_values.min(), finite_values.max())
    assert halves[0].merge(halves[1]) == stats


@given(st.floats(-100, 100), st.floats(0, 100))
def test_symmetric_range_semantics(low, width):
    high = low + width
    result = symmetric_range(low, high)
    bound = max(abs(low), abs(high))
    assert result == ((0.0, bound) if low >= 0 else (-bound, bound))
