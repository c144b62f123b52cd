"""Stage 3: QDQ structure per the TFLite int8 spec, and onnxruntime fusing it."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from builders import _init, branchy_model, float_input, make_model
from conftest import SAMPLE_CALIB, SAMPLE_MODEL, run, sqnr_db
from quantizer import Calibrator, ModelError, optimize_model, quantize
from quantizer.qdq.params import activation_params


class Graph:
    """Index a quantized model for assertions."""

    def __init__(self, model):
        self.model = model
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers = collections.defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def nodes(self, op_type):
        return [n for n in self.model.graph.node if n.op_type == op_type]

    def node(self, name):
        return next(n for n in self.model.graph.node if n.name == name)

    def q_params(self, tensor):
        """(scale, zero_point) of the QuantizeLinear reading ``tensor``."""
        q = next(n for n in self.consumers[tensor] if n.op_type == "QuantizeLinear")
        return float(self.inits[q.input[1]]), self.inits[q.input[2]]

    def dq_source(self, value):
        """(quantized initializer, scale, zero point, axis) behind a DequantizeLinear output."""
        dq = self.producer[value]
        assert dq.op_type == "DequantizeLinear"
        axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
        return self.inits.get(dq.input[0]), self.inits[dq.input[1]], self.inits[dq.input[2]], axis


def calibrated(model, samples, method="min_max_asym"):
    calibrator = Calibrator(model, method)
    calibrator.collect_data(samples)
    return calibrator.compute_range()


@pytest.fixture(scope="module")
def branchy():
    model = optimize_model(branchy_model())
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    return model, samples, calibrated(model, samples)


@pytest.mark.parametrize("weight_range, qmax", [("full", 127), ("reduced", 63)])
def test_weights_per_channel_symmetric_and_int32_bias(branchy, weight_range, qmax):
    model, _, ranges = branchy
    g = Graph(quantize(model, ranges, weight_range=weight_range))
    conv = g.node("conv")
    weight_q, weight_scale, weight_zp, axis = g.dq_source(conv.input[1])
    assert weight_q.dtype == np.int8 and axis == 0
    assert weight_scale.shape == (4,) and not weight_zp.any()
    assert np.abs(weight_q).max() == qmax  # each channel's max maps to the grid's edge
    original = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    np.testing.assert_allclose(weight_q * weight_scale[:, None, None, None], original, atol=weight_scale.max() / 2 + 1e-7)

    bias_q, bias_scale, bias_zp, _ = g.dq_source(conv.input[2])
    input_scale, _ = g.q_params("x")
    assert bias_q.dtype == np.int32 and not bias_zp.any()
    np.testing.assert_array_equal(bias_scale, np.float32(input_scale) * weight_scale)


def test_placement_rules(branchy):
    model, _, ranges = branchy
    g = Graph(quantize(model, ranges))
    # Conv -> Relu has no Q/DQ between them; the Relu output is quantized from 0.
    relu = g.node("relu")
    assert g.producer[relu.input[0]].op_type == "Conv"
    scale, zp = g.q_params(relu.output[0])
    assert zp == -128
    # Concat inputs and output share one scale and zero point.
    concat = g.node("concat")
    params = [g.dq_source(i)[1:3] for i in concat.input] + [g.q_params(concat.output[0])]
    assert len({(float(s), int(z)) for s, z in params}) == 1
    # Softmax output: fixed [0, 1].  The Sigmoid's [0, 1] joins the Concat's shared range.
    sig_scale, sig_zp = g.q_params("s")
    assert sig_zp == -128 and sig_scale * 255 >= 1.0 and (sig_scale, sig_zp) == params[-1]
    softmax = g.node("softmax")
    assert g.q_params(softmax.output[0]) == pytest.approx((1 / 255, -128))
    # Pass-through ops keep their input's parameters.
    for name in ("maxpool", "reshape"):
        node = g.node(name)
        scale, zero_point = g.dq_source(node.input[0])[1:3]
        assert g.q_params(node.output[0]) == (float(scale), zero_point)
    # Graph inputs/outputs keep their names and stay float.
    assert [i.name for i in g.model.graph.input] == ["x"]
    assert [(o.name, o.type.tensor_type.elem_type) for o in g.model.graph.output] == [("prob", onnx.TensorProto.FLOAT)]


def test_quantized_outputs_close_to_float(branchy):
    model, samples, ranges = branchy
    for dtype in ("int8", "uint8"):
        q = quantize(model, ranges, activation_dtype=dtype)
        onnx.checker.check_model(q, full_check=True)
        assert sqnr_db(run(model, samples[0]), run(q, samples[0])) > 25


def optimized_ops(model):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    import tempfile, os
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_onnxruntime_fuses_sample_model_into_integer_kernels(dtype):
    model = optimize_model(SAMPLE_MODEL)
    ops = optimized_ops(quantize(model, calibrated(model, SAMPLE_CALIB), activation_dtype=dtype))
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 1
    assert "Conv" not in ops and "Gemm" not in ops and "Relu" not in ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # only at the model's edges


def test_onnxruntime_fuses_matmul_concat_sigmoid_softmax(branchy):
    model, _, ranges = branchy
    ops = optimized_ops(quantize(model, ranges, activation_dtype="uint8"))
    for fused in ("QLinearConv", "QLinearMatMul", "QLinearConcat", "QLinearSigmoid", "QLinearSoftmax", "QLinearAdd"):
        assert ops[fused] >= 1, fused
    assert "MatMul" not in ops and "Conv" not in ops


def test_bias_overflow_widens_weight_scale():
    """A huge bias over a tiny input scale must not saturate int32."""
    w = np.full((2, 1, 1, 1), 0.01, np.float32)
    b = np.array([1e6, -1.0], np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        [float_input("x", (1, 1, 2, 2))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 2, 2])],
        [_init("w", w), _init("b", b)],
    )
    x = np.full((1, 1, 2, 2), 1e-4, np.float32)
    q = quantize(optimize_model(model), {"x": (0.0, 1e-4), "y": (-2.0, 1e6 + 1)}, weight_range="full")
    g = Graph(q)
    bias_q, bias_scale, _, _ = g.dq_source(g.node("conv").input[2])
    assert np.abs(bias_q.astype(np.int64)).max() < np.iinfo(np.int32).max
    np.testing.assert_allclose(bias_q * bias_scale, b, rtol=1e-6)
    assert abs(run(q, {"x": x})[0, 0, 0, 0] - 1e6) / 1e6 < 0.01


def test_missing_range_leaves_nodes_float(branchy):
    model, _, ranges = branchy
    partial = {k: v for k, v in ranges.items() if k != "x"}
    from quantizer.quantize import quantize_with_plan

    outcome = quantize_with_plan(model, partial)
    assert "no range for tensor 'x'" in outcome.plan.float_reasons["conv"]
    assert all(n.input[0] == "x" for n in outcome.model.graph.node if n.name in ("conv", "conv_other"))


def test_already_quantized_model_is_refused(branchy):
    model, _, ranges = branchy
    with pytest.raises(ModelError, match="already quantized"):
        quantize(quantize(model, ranges), ranges)


@given(st.floats(-1e4, 1e4), st.floats(0, 1e4), st.sampled_from(["int8", "uint8"]))
def test_activation_params_represent_zero_and_cover_range(low, width, dtype):
    high = low + width
    p = activation_params(low, high, dtype)
    info = np.iinfo(p.zero_point.dtype)
    assert info.min <= int(p.zero_point) <= info.max
    assert p.quantize(np.float32(0.0)) == p.zero_point  # 0.0 exactly representable
    lo, hi = min(low, 0.0), max(high, 0.0)
    for value in (lo, hi):
        back = (int(p.quantize(np.float32(value))) - int(p.zero_point)) * float(p.scale)
        assert abs(back - value) <= float(p.scale) * 0.5 + 1e-6 * max(1.0, abs(value))
