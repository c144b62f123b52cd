"""The accuracy steps: loss-aware range choice (``auto``) and bias correction, against
numpy references and the float model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from builders import _init, make_model
from conftest import run, sqnr_db
from quantizer import quantize_model
from quantizer.algorithms import bias_correction, loss_aware
from quantizer.config import QuantizationConfig
from quantizer.qdq.params import spec_params
from quantizer.qdq.plan import build_plan
from quantizer.targets import load_target
import onnx_ir as ir

D = 16


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> MatMul -> y: the block of h1 is (relu, MatMul)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])],
                      [_init("w1", rng.normal(0, 0.5, (D, D)).astype(np.float32)),
                       _init("w2", rng.normal(0, 0.5, (D, D)).astype(np.float32))])


def _heavy_samples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_t(2, (64, D)) * 0.5).astype(np.float32)} for _ in range(count)]


def test_candidates_start_with_min_max_and_drop_near_duplicates():
    per_method = {"min_max_asym": (-4.0, 8.0), "mse_asym": (-2.0, 4.0), "sqnr_asym": (-2.0001, 4.0001),
                  "entropy_asym": (-1.0, 1.0)}
    names = [name for name, _ in loss_aware.candidate_ranges(per_method)]
    assert names[0] == "min_max_asym"
    assert "sqnr_asym" not in names  # within 0.5 % of the min-max width of mse_asym's range
    assert "min_max_asym x0.5" not in names  # (-2, 4): mse_asym's range again
    assert {"mse_asym", "entropy_asym", "min_max_asym x0.75", "min_max_asym x0.3"} <= set(names)


def test_block_choice_matches_a_numpy_brute_force():
    """h1's choice must be the candidate minimizing the error of relu(h1) @ w2, computed
    here in numpy on the same samples (tensors are measured one at a time)."""
    model = _mlp()
    samples = _heavy_samples(2, 1)
    w1, w2 = (onnx.numpy_helper.to_array(t) for t in model.graph.initializer)
    spec = load_target("ort-cpu").activations
    h1 = [s["x"] @ w1 for s in samples]
    per_method = {"min_max_asym": (float(min(h.min() for h in h1)), float(max(h.max() for h in h1))),
                  "narrow": (-1.0, 1.0), "middle": (-3.0, 3.5)}
    options = loss_aware.candidate_ranges(per_method)

    def block_error(low, high):
        total = 0.0
        for h in h1:
            p = spec_params(low, high, spec)
            deq = (p.quantize(h).astype(np.float32) - float(int(p.zero_point))) * p.scale
            ref, got = np.maximum(h, 0) @ w2, np.maximum(deq, 0) @ w2
            total += float(np.sum((got - ref) ** 2) / np.sum(ref ** 2))
        return total

    errors = [block_error(*r) for _, r in options]
    selection = loss_aware.choose_ranges(model, {m: {"h1": r} for m, r in per_method.items()}, samples, spec)
    choice = selection.choices["h1"]
    best = int(np.argmin(errors))
    if errors[best] > errors[0] * (1 - loss_aware.MIN_GAIN):
        best = 0
    assert choice.method == options[best][0]
    assert choice.loss == pytest.approx(errors[best], rel=1e-3)
    assert choice.min_max_loss == pytest.approx(errors[0], rel=1e-3)


def _errors(noise, signal=1.0):
    noise = np.asarray(noise, float)
    return np.stack([np.full_like(noise, signal), noise], axis=1)


def test_a_switch_needs_a_gain_beyond_the_sample_spread():
    per_tensor = _errors([1.0, 1.0, 1.0, 1.0])
    steady = _errors([0.8, 0.8, 0.8, 0.8])  # 0.97 dB better on every sample
    assert loss_aware.clearly_better(steady, per_tensor)
    assert not loss_aware.clearly_better(per_tensor, steady)
    # one sample much better, three worse: a higher total SQNR, but a mean gain within its standard error
    lucky = _errors([0.05, 1.2, 1.2, 1.2])
    assert loss_aware.sqnr_db(lucky) > loss_aware.sqnr_db(per_tensor)
    gains = 10 * np.log10(per_tensor[:, 1] / lucky[:, 1])
    assert 0 < gains.mean() < gains.std(ddof=1) / np.sqrt(len(gains))  # brute force: the one-SE test fails
    assert not loss_aware.clearly_better(lucky, per_tensor)
    # outputs that are not finite lose to finite ones, whatever the totals
    broken = _errors([0.1, np.inf, 0.1, 0.1])
    assert loss_aware.sqnr_db(broken) == float("-inf")
    assert not loss_aware.clearly_better(broken, per_tensor) and loss_aware.clearly_better(per_tensor, broken)
    assert loss_aware.clearly_better(_errors([0.5]), _errors([0.6]))  # one sample: any gain
    assert not loss_aware.clearly_better(_errors([0.6]), _errors([0.6]))
    assert not loss_aware.clearly_better(_errors([]), _errors([]))  # no samples: no evidence


@pytest.mark.parametrize("others, picked", [(("lucky",), loss_aware.PER_TENSOR), (("lucky", "steady"), "steady"),
                                            (("steady", "lucky"), "steady"), (("broken",), loss_aware.PER_TENSOR)])
def test_pick_by_output_keeps_the_per_tensor_choice_unless_another_is_clearly_better(others, picked):
    table = {loss_aware.PER_TENSOR: _errors([1.0] * 4), "lucky": _errors([0.05, 1.2, 1.2, 1.2]),
             "steady": _errors([0.8] * 4), "broken": _errors([0.1, np.inf, 0.1, 0.1])}
    names = [loss_aware.PER_TENSOR, *others]
    candidates = {name: {"t": (0.0, float(i + 1))} for i, name in enumerate(names)}
    best, scores = loss_aware.pick_by_output(candidates, lambda ranges: table[names[int(ranges["t"][1]) - 1]])
    assert best == picked
    assert scores == {name: loss_aware.sqnr_db(table[name]) for name in names}


def test_output_errors_match_a_numpy_reference():
    import onnxruntime as ort

    model = _mlp(2)
    samples = _heavy_samples(3, 7)
    references = [[run(model, s)] for s in samples]
    quantized = quantize_model(model, samples, "min_max_asym").model
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    errors = loss_aware.output_errors(session, samples, references)
    for (signal, noise), sample, (ref,) in zip(errors, samples, references):
        out = run(quantized, sample).astype(np.float64)
        assert signal == pytest.approx(float(np.sum(ref.astype(np.float64) ** 2)), rel=1e-9)
        assert noise == pytest.approx(float(np.sum((out - ref) ** 2)), rel=1e-6)
    total = 10 * np.log10(errors[:, 0].sum() / errors[:, 1].sum())
    assert loss_aware.output_sqnr_db(session, samples, references) == pytest.approx(total)


@pytest.mark.parametrize("target", ["ort-cpu-x86", "ort-cpu-vnni", "tensorrt"])
def test_auto_is_at_least_the_best_single_method_on_its_samples(target):
    model = _mlp(3)
    calib, held_out = _heavy_samples(16, 2), _heavy_samples(8, 4)
    auto = quantize_model(model, calib, "auto", target=target)
    info = auto.summary["calibration"]["auto"]
    scores = info["output_sqnr_db"]
    # the per-tensor choice, the methods with the best block totals, and mse (the bias check's probe) if not among them
    assert info["picked"] in scores and 1 + loss_aware.CHECKED_METHODS <= len(scores) <= 2 + loss_aware.CHECKED_METHODS
    assert info["picked"] in (max(scores, key=scores.get), loss_aware.PER_TENSOR)  # a near tie keeps the per-tensor choice
    methods = ["min_max", "mse", "entropy", "percentile", "sqnr"]
    form = "sym" if target == "tensorrt" else "asym"
    held = {m: np.mean([sqnr_db(run(model, s), run(quantize_model(model, calib, f"{m}_{form}", target=target).model, s))
                            for s in held_out]) for m in methods}
    ours = np.mean([sqnr_db(run(model, s), run(auto.model, s)) for s in held_out])
    assert ours >= sorted(held.values())[-2] - 0.5  # at worst the runner-up method on held-out data (mean dB)


def _depthwise(seed: int = 0) -> onnx.ModelProto:
    """Relu -> depthwise 3x3 Conv (few taps: rounding errors that do not cancel)."""
    rng = np.random.default_rng(seed)
    c = 8
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w", "b"], ["y"], name="dw", group=c, kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 12, 12])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 12, 12])],
                      [_init("w", rng.normal(0, 1, (c, 1, 3, 3)).astype(np.float32)),
                       _init("b", rng.normal(0, 0.1, c).astype(np.float32))])


def _positive_samples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.normal(1.0, 1.0, (1, 8, 12, 12))).astype(np.float32)} for _ in range(count)]


def test_bias_shift_matches_a_numpy_reference():
    model = onnx.shape_inference.infer_shapes(_depthwise())  # as stage 1 leaves it
    samples = _positive_samples(3, 0)
    target = load_target("ort-cpu")
    plan = build_plan(ir.from_proto(model), set(), target)
    found = bias_correction.correct_biases(model, plan, target.weights, samples)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    b = onnx.numpy_helper.to_array(model.graph.initializer[1])
    delta = bias_correction._quantized_weight(w, 0, target.weights) - w
    shifts = []
    for s in samples:  # the depthwise conv of relu(x) with W_q - W, written out
        r = np.pad(np.maximum(s["x"][0], 0), ((0, 0), (1, 1), (1, 1)))
        out = np.zeros((8, 12, 12))
        for i in range(3):
            for j in range(3):
                out += delta[:, 0, i, j, None, None] * r[:, i:i + 12, j:j + 12]
        shifts.append(out.mean(axis=(1, 2)))
    np.testing.assert_allclose(found.biases["b"], b - np.mean(shifts, axis=0), rtol=1e-4, atol=1e-6)


@st.composite
def _conv_cases(draw):
    rank = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2]))
    cin, cout = 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    spatial = [draw(st.integers(d * (k - 1) + 1, 9)) for k, d in zip(kernel, dilations)]
    auto_pad = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs = {"kernel_shape": kernel, "strides": strides, "group": group}
    if auto_pad == "NOTSET":
        attrs["pads"] = [draw(st.integers(0, 2)) for _ in range(2 * rank)]
    else:
        attrs["auto_pad"] = auto_pad
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):  # onnxruntime: SAME with dilation is undefined
        attrs["dilations"] = dilations
    return rank, cin, cout, spatial, attrs, draw(st.integers(1, 2)), draw(st.integers(0, 2**31))


@settings(max_examples=40, deadline=None)
@given(_conv_cases())
def test_conv_mean_error_from_tap_sums_matches_running_the_conv(case):
    """The mean of Conv(x, D) over positions, from the tap sums, equals onnxruntime's Conv
    run on x with weight D, for strides, dilations, pads, auto_pad, groups, 1-3 spatial axes."""
    rank, cin, cout, spatial, attrs, batch, seed = case
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.0, [batch, cin] + spatial).astype(np.float32)
    delta = rng.normal(0, 1.0, [cout, cin // attrs["group"]] + attrs["kernel_shape"]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "d"], ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("d", delta)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = run(model, {"x": x})
    expected = y.astype(np.float64).mean(axis=tuple(i for i in range(y.ndim) if i != 1))
    sums, count = bias_correction.conv_tap_sums(x, node, attrs["kernel_shape"])
    assert count == y.size // cout
    got = bias_correction._mean_error(node, delta, sums, count)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_gemm_mean_error_matches_the_product():
    rng = np.random.default_rng(3)
    x, delta = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "d", "b"], ["y"], transB=1, alpha=0.5)
    sums, count = bias_correction._layer_sums(node, x, delta.shape)
    got = bias_correction._mean_error(node, delta, sums, count)
    np.testing.assert_allclose(got, (0.5 * x.astype(np.float64) @ delta.T).mean(axis=0), rtol=1e-6)


def test_bias_correction_removes_the_mean_output_error():
    model = _depthwise(1)
    calib, held_out = _positive_samples(8, 1), _positive_samples(8, 2)
    plain = quantize_model(model, calib, config=QuantizationConfig(method="min_max_asym", bias_correction=False))
    corrected = quantize_model(model, calib, config=QuantizationConfig(method="min_max_asym", bias_correction=True))
    assert any(s["step"] == "correct_bias" and s["changed"] for s in corrected.summary["steps"])

    def mean_error(result):
        errors = [(run(result.model, s) - run(model, s)).mean(axis=(0, 2, 3)) for s in held_out]
        return float(np.abs(np.mean(errors, axis=0)).max())

    assert mean_error(corrected) < 0.5 * mean_error(plain)


def test_cli_auto_with_bias_correction_reports_both_steps(tmp_path):
    import json

    from click.testing import CliRunner

    from conftest import SAMPLE_CALIB, SAMPLE_MODEL
    from quantizer.cli.main import cli

    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(cli, [str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB), "--calib", "auto",
                                      "--bias-correction", "--accuracy-samples", "3", "-o", str(out),
                                      "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(report.read_text())
    assert summary["calibration"]["method"] == "auto"
    assert summary["calibration"]["auto"]["picked"] in summary["calibration"]["auto"]["output_sqnr_db"]
    changed = {s["step"]: s["changed"] for s in summary["steps"]}
    assert "on 3 samples" in changed["choose_ranges"] and "biases corrected" in changed["correct_bias"]


def test_unknown_method_names_auto_among_the_choices():
    from quantizer.errors import UsageError

    with pytest.raises(UsageError, match="choose auto or one of: min_max_asym"):
        QuantizationConfig(method="autto")


def test_large_feature_maps_are_measured_on_a_centre_window():
    big = np.arange(1 * 4 * 600 * 500, dtype=np.float32).reshape(1, 4, 600, 500)
    feed = {"t": big, "other": big + 1, "scalar": np.float32(2.0) * np.ones(3, np.float32)}
    cropped = loss_aware._cropped(feed, "t", 1 << 16)
    h, w = cropped["t"].shape[2:]
    assert cropped["t"].size <= 1 << 16 and cropped["other"].shape == cropped["t"].shape
    assert cropped["t"][0, 0, 0, 0] == big[0, 0, (600 - h) // 2, (500 - w) // 2]  # the centre window
    assert cropped["scalar"] is feed["scalar"]
    assert loss_aware._cropped({"t": big, "half": big[:, :, :300]}, "t", 1 << 16) is None  # sizes differ
    assert loss_aware._cropped({"t": big[:, :, :10, :10]}, "t", 1 << 16) is None  # small: measured whole


def test_recording_is_chunked_to_the_memory_budget():
    needs = {f"t{i}": [f"t{i}", f"in{i}"] for i in range(10)}
    sizes = {name: 100 for names in needs.values() for name in names}
    groups = loss_aware._chunks(list(needs), needs, lambda name: sizes[name], budget=450)
    assert [t for g in groups for t in g] == list(needs)  # every tensor once, in order
    for group in groups:
        held = {n for t in group for n in needs[t]}
        assert len(held) * 100 <= 450 or len(group) == 1


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_accuracy_samples_must_be_a_positive_integer(bad):
    from quantizer.errors import UsageError

    with pytest.raises(UsageError, match="`accuracy_samples` must be an integer >= 1"):
        QuantizationConfig(accuracy_samples=bad)


def test_cli_refuses_zero_accuracy_samples_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from conftest import SAMPLE_CALIB, SAMPLE_MODEL
    from quantizer.cli.main import cli

    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, [str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB), "--accuracy-samples", "0",
                                      "-o", str(out)])
    assert result.exit_code == 2 and "--accuracy-samples" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=12), st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=12),
       st.floats(0.05, 0.95))
def test_clearly_better_is_one_sided_and_sees_a_uniform_gain(noise_a, noise_b, factor):
    n = min(len(noise_a), len(noise_b))
    a, b = _errors(noise_a[:n]), _errors(noise_b[:n])
    assert not (loss_aware.clearly_better(a, b) and loss_aware.clearly_better(b, a))
    assert not loss_aware.clearly_better(a, a)
    assert loss_aware.clearly_better(_errors(np.asarray(noise_a) * factor), _errors(noise_a))  # better on every sample
