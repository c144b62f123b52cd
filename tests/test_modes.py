"""The kinds of quantization beside static Q/DQ: dynamic int8 and weight-only int8/int4.

Each emitted form is inspected (ops, types, attributes), checked against a numpy
reference, passes onnx.checker, loads in onnxruntime, and becomes the fused kernel in
onnxruntime's own optimized graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import _init, make_model
from click.testing import CliRunner
from conftest import run, sqnr_db
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from quantizer.cli.main import cli

from quantizer import QuantizationConfig, UsageError, quantize_model, runtime
from quantizer.fusion import _optimized_graph
from quantizer.inspect import inspect_model
from quantizer.qdq.blockwise import WeightGrid, gptq, quantize_blocks

K, N, V = 64, 48, 50


def matmul_model() -> onnx.ModelProto:
    """x -> MatMul(W1) -> Sigmoid -> MatMul(W2) -> y, x -> MatMul(W3) -> y3 (x read twice),
    x2 -> Gemm(W4^T, b) -> z, ids -> Gather(table) -> e."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
        # Sigmoid, not Relu: onnxruntime 1.32 leaves DQ -> MatMul -> Relu -> MatMul unfused
        # (the first MatMul stays DequantizeLinear + MatMul); see the README's weight-only section.
        helper.make_node("Sigmoid", ["m"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        helper.make_node("MatMul", ["x", "w3"], ["y3"], name="mm3"),
        helper.make_node("Gemm", ["x2", "w4", "b4"], ["z"], name="gemm", transB=1),
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8, K]),
              helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["B", K]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 8])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
               (("y", ["B", 8, N]), ("y3", ["B", 8, N]), ("z", ["B", N]), ("e", ["B", 8, K]))]
    inits = [_init("w1", rng.normal(0, 0.2, (K, N)).astype(np.float32)),
             _init("w2", rng.normal(0, 0.2, (N, N)).astype(np.float32)),
             _init("w3", rng.normal(0, 0.2, (K, N)).astype(np.float32)),
             _init("w4", rng.normal(0, 0.2, (N, K)).astype(np.float32)),
             _init("b4", rng.normal(0, 0.1, (N,)).astype(np.float32)),
             _init("table", rng.normal(0, 1.0, (V, K)).astype(np.float32))]
    return make_model(nodes, inputs, outputs, inits, opset=17)


def samples(n=4, seed=2):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(2, 8, K)).astype(np.float32), "x2": rng.normal(size=(3, K)).astype(np.float32),
             "ids": rng.integers(0, V, (2, 8)).astype(np.int64)} for _ in range(n)]


def outputs(model, feed, optimize=True) -> dict[str, np.ndarray]:
    """The outputs by name; ``optimize=False`` runs the graph as written (onnxruntime's fused
    MatMulNBits quantizes its activations to int8 at its default accuracy level)."""
    session = runtime.session(model, optimize=optimize)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return model


def optimized_ops(model) -> list[str]:
    return [n.op_type for n in _optimized_graph(model).graph.node]


def initializer(model, name) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


# -- dynamic ---------------------------------------------------------------------------

def _dynamic_quantize_linear(x: np.ndarray):
    """onnx's DynamicQuantizeLinear: uint8, the range widened to hold 0."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((high - low) / 255)
    zero = np.uint8(np.clip(np.round(-low / scale), 0, 255))
    return np.clip(np.round(x / scale) + zero, 0, 255).astype(np.uint8), scale, zero


def test_dynamic_matmul_matches_a_numpy_reference_and_fuses():
    model = matmul_model()
    result = quantize_model(model, None, mode="dynamic", show_progress=False)
    q = checked(result.model)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 3  # x (shared by mm1 and mm3), r (mm2), x2 (gemm)
    assert ops.count("MatMulInteger") == 4 and "GatherBlockQuantized" in ops  # the table: 8-bit blocks of 32
    qmax = QuantizationConfig(mode="dynamic").resolved_target.weights.qmax
    mm1 = next(n for n in q.graph.node if n.op_type == "MatMulInteger" and n.input[1].startswith("mm1"))
    w_q, w_zero = initializer(q, mm1.input[1]), initializer(q, mm1.input[3])
    assert w_q.dtype == np.int8 and np.abs(w_q).max() == qmax and w_zero.shape == (N,) and not w_zero.any()
    w_scale = initializer(q, "mm1_weight_scale")
    w1 = initializer(model, "w1")
    np.testing.assert_allclose(w_scale, np.abs(w1).max(axis=0) / qmax, rtol=1e-6)

    feed = samples(1)[0]
    x_q, x_scale, x_zero = _dynamic_quantize_linear(feed["x"])
    reference = ((x_q.astype(np.int32) - int(x_zero)) @ w_q.astype(np.int32)).astype(np.float32) * (x_scale * w_scale)
    graph = onnx.ModelProto()
    graph.CopyFrom(q)
    graph.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, None))
    got = outputs(graph, feed)
    np.testing.assert_allclose(got["m"], reference, rtol=1e-5, atol=1e-5)
    floats = outputs(model, feed)
    assert all(sqnr_db(floats[name], got[name]) > 25 for name in ("y", "y3", "z"))
    assert sqnr_db(floats["e"], got["e"]) > 40

    # onnxruntime's optimized graph: every MatMulInteger fused (one consumer -> DynamicQuantizeMatMul,
    # a shared quantized activation -> DynamicQuantizeLinear + MatMulIntegerToFloat).
    fused = optimized_ops(q)
    assert "MatMulInteger" not in fused
    assert fused.count("DynamicQuantizeMatMul") == 2 and fused.count("MatMulIntegerToFloat") == 2
    assert result.summary["fusion"]["integer_nodes"] == 5  # and the GatherBlockQuantized
    assert set(result.summary["nodes"]["forms"]) == {"mm1", "mm2", "mm3", "gemm", "embed"}
    assert result.summary["mode"] == "dynamic" and result.summary["calibration"]["method"] == "none"


def test_dynamic_data_only_checks_the_result(tmp_path):
    result = quantize_model(matmul_model(), samples(2), mode="dynamic", show_progress=False)
    assert not [s for s in result.summary["steps"] if s["step"] in ("collect", "prepare_calibration")]
    assert any(s["step"] == "verify_stage1" for s in result.summary["steps"])


# -- weight-only -----------------------------------------------------------------------

GRIDS = [WeightGrid(bits, signed, symmetric) for bits in (4, 8) for signed in (True, False)
         for symmetric in (True, False)]


@settings(max_examples=40, deadline=None)
@given(grid=st.sampled_from(GRIDS), block=st.sampled_from([16, 32, 64]), k=st.integers(1, 130),
       n=st.integers(1, 6), seed=st.integers(0, 2 ** 16), spread=st.floats(1e-3, 1e3))
def test_block_round_trip_stays_within_half_a_step(grid, block, k, n, seed, spread):
    w = (np.random.default_rng(seed).normal(size=(k, n)) * spread).astype(np.float32)
    q = quantize_blocks(w, block, grid)
    assert q.scale.shape == (-(-k // block), n) and q.q.shape == (k, n)
    assert q.q.min() >= grid.qmin and q.q.max() <= grid.qmax
    rows = np.arange(k) // block
    error = np.abs(q.dequantize() - w)
    # Rounding moves a value by at most half a step; symmetric grids may clip the one
    # value at the short end (7 of [-8, 7]) by at most one step more.
    bound = q.scale[rows] * (1.5 if grid.symmetric else 0.5) * (1 + 1e-5) + 1e-30
    assert np.all(error <= bound)
    # The block's extreme value is represented exactly (up to float rounding).
    extreme = np.abs(w).max()
    assert np.isclose(np.abs(q.dequantize()).max(), extreme, rtol=1e-5) or not grid.symmetric


@pytest.mark.parametrize("bits,signed,symmetric,dtype", [
    (4, True, True, TensorProto.INT4), (4, False, False, TensorProto.UINT4),
    (8, True, True, TensorProto.INT8), (8, False, True, TensorProto.UINT8)])
def test_weight_only_emits_blocked_dequantize_that_onnxruntime_fuses(bits, signed, symmetric, dtype):
    model = matmul_model()
    result = quantize_model(model, None, mode="weight-only", weight_bits=bits, weight_signed=signed,
                            weight_symmetric=symmetric, block_size=16, show_progress=False)
    q = checked(result.model)
    assert next(o.version for o in q.opset_import if o.domain == "") == 21
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 4  # mm1, mm2, mm3, gemm
    for dq in dqs:
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs == {"axis": 0, "block_size": 16}
        weight = next(i for i in q.graph.initializer if i.name == dq.input[0])
        assert weight.data_type == dtype
        assert (len(dq.input) == 3) == (not (signed and symmetric))  # a zero point unless it is 0
    # numpy reference: x @ the block-dequantized weight, for mm3 (reads x directly)
    grid = WeightGrid(bits, signed, symmetric)
    w3 = quantize_blocks(initializer(model, "w3"), 16, grid).dequantize()
    feed = samples(1)[0]
    got, floats = outputs(q, feed, optimize=False), outputs(model, feed)
    np.testing.assert_allclose(got["y3"], feed["x"] @ w3, rtol=1e-4, atol=1e-4)
    fused_outputs = outputs(q, feed)
    assert sqnr_db(got["y3"], fused_outputs["y3"]) > 30  # the kernel computes what the graph says
    assert sqnr_db(floats["y3"], got["y3"]) > (14 if bits == 4 else 35)
    # Gather -> GatherBlockQuantized with blocks along each row, 8 bits (whatever weight_bits)
    table = quantize_blocks(initializer(model, "table").T, 16, WeightGrid(8, signed, symmetric)).dequantize().T
    np.testing.assert_allclose(got["e"], table[feed["ids"]], rtol=1e-5, atol=1e-6)
    fused = optimized_ops(q)
    assert fused.count("MatMulNBits") == 4 and "DequantizeLinear" not in fused
    assert fused.count("GatherBlockQuantized") == 1
    assert result.summary["fusion"]["integer_nodes"] == 5 and result.summary["nodes"]["quantized"] == 5


def test_gptq_lowers_the_layer_error_on_correlated_activations():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(K, K)) * np.linspace(3, 0.1, K)
    x = rng.normal(size=(400, K)) @ mixing
    w = rng.normal(size=(K, N)).astype(np.float32)
    grid = WeightGrid(4, True, True)
    rtn, optimal = quantize_blocks(w, 32, grid), gptq(w, x.T @ x, 32, grid)
    assert optimal.q.min() >= -8 and optimal.q.max() <= 7
    error_rtn = np.sum((x @ (rtn.dequantize() - w)) ** 2)
    error_gptq = np.sum((x @ (optimal.dequantize() - w)) ** 2)
    assert error_gptq < 0.8 * error_rtn


def test_gptq_runs_from_the_pipeline_and_needs_data():
    model = matmul_model()
    data = samples(48)
    rtn = quantize_model(model, data, mode="weight-only", show_progress=False, embeddings=False)
    result = quantize_model(model, data, mode="weight-only", weight_algorithm="gptq", show_progress=False)
    checked(result.model)
    assert any(s["step"] == "collect_hessians" for s in result.summary["steps"])
    feed = samples(4, seed=3)
    noise = {name: 0.0 for name in ("y", "y3", "z")}
    for name in noise:
        for f in feed:
            reference = outputs(model, f)[name]
            noise[name] += sqnr_db(reference, outputs(result.model, f)[name]) - sqnr_db(reference, outputs(rtn.model, f)[name])
    assert sum(noise.values()) > 0  # held-out SQNR gained over round to nearest
    with pytest.raises(UsageError, match="needs calibration data"):
        quantize_model(model, None, mode="weight-only", weight_algorithm="gptq", show_progress=False)


# -- a weight several nodes read (a weight-tied encoder: chython-rxnmap's 15 layers share 2) --

S = 128  # the shared weight is S x S


def shared_weight_model() -> onnx.ModelProto:
    """x -> MatMul(w) -> Sigmoid -> MatMul(Identity(w)) -> y: one weight read by two
    MatMuls, the second through an Identity as the PyTorch exporter writes a reused layer."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm1"),
             helper.make_node("Sigmoid", ["m"], ["r"], name="act"),
             helper.make_node("Identity", ["w"], ["w_again"], name="tie"),
             helper.make_node("MatMul", ["r", "w_again"], ["y"], name="mm2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8, S])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8, S])],
                      [_init("w", rng.normal(0, 0.1, (S, S)).astype(np.float32))], opset=17)


def shared_samples(n=8, seed=5):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(2, 8, S)).astype(np.float32)} for _ in range(n)]


def stored_bytes(model: onnx.ModelProto) -> int:
    return sum(len(numpy_helper.to_array(t).tobytes()) if t.data_type not in (TensorProto.INT4, TensorProto.UINT4)
               else (int(np.prod(t.dims)) + 1) // 2 for t in model.graph.initializer)


@pytest.mark.parametrize("kwargs,ratio,kernel", [
    ({"mode": "static"}, 0.3, ("QLinearMatMul", "MatMulIntegerToFloat")),
    ({"mode": "dynamic"}, 0.3, "DynamicQuantizeMatMul"),
    ({"mode": "weight-only", "weight_bits": 8}, 0.3, "MatMulNBits"),
    ({"mode": "weight-only", "weight_bits": 4}, 0.18, "MatMulNBits"),
    ({"mode": "weight-only", "weight_bits": 4, "weight_symmetric": True, "weight_algorithm": "gptq"}, 0.18,
     "MatMulNBits"),
    ({"mode": "weight-only", "weight_bits": 4, "weight_signed": False, "block_size": 16}, 0.2, "MatMulNBits")])
def test_a_weight_read_by_several_nodes_is_stored_once(kwargs, ratio, kernel):
    """Each mode used to quantize a shared weight once per reader: on chython-rxnmap
    (85 MB float) static and dynamic wrote 162 MB, weight-only int8 186 MB."""
    model = shared_weight_model()
    data = shared_samples()
    result = quantize_model(model, data, show_progress=False, **kwargs)
    q = checked(result.model)
    assert stored_bytes(q) <= ratio * stored_bytes(model)
    feed = shared_samples(1, seed=6)[0]
    floats, got = outputs(model, feed), outputs(q, feed)
    assert sqnr_db(floats["y"], got["y"]) > (12 if kwargs.get("weight_bits") == 4 else 25)
    fused = optimized_ops(q)
    kernels = kernel if isinstance(kernel, tuple) else (kernel,)
    assert sum(map(fused.count, kernels)) == 2 and "DequantizeLinear" not in fused and "MatMulInteger" not in fused
    if kwargs["mode"] == "weight-only":  # both readers: MatMulNBits of one packed weight
        readers = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
        assert len(readers) == 2 and readers[0].input[1:] == readers[1].input[1:]
        assert result.summary["fusion"]["integer_nodes"] == 2


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("k,block", [(48, 32), (64, 16), (40, 64)])
def test_nbits_arrays_are_what_matmulnbits_reads(grid, k, block):
    """The packed form of a shared weight computes x @ the block-dequantized weight (at
    accuracy level 0, float activations), K not a multiple of the block size included."""
    from quantizer.weight_only import nbits_arrays
    rng = np.random.default_rng(k + block)
    quantized = quantize_blocks(rng.normal(0, 0.3, (k, 24)).astype(np.float32), block, grid)
    b, scales, zero = nbits_arrays(quantized)
    assert b.shape == (24, -(-k // block), block * grid.bits // 8) and (zero is None) == (grid.signed and grid.symmetric)
    inputs = ["x", "b", "s"] + (["z"] if zero is not None else [])
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=24, bits=grid.bits,
                            block_size=block, accuracy_level=0)
    inits = [_init("b", b), _init("s", scales)] + ([_init("z", zero)] if zero is not None else [])
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.normal(size=(3, k)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": x}), x @ quantized.dequantize(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,kwargs", [("dynamic", {}), ("weight-only", {"block_size": 16})])
def test_a_table_or_weight_with_inf_stays_float(mode, kwargs):
    """chython-rxnmap's distance table has a -inf row (the attention bias of padding): in
    blocks of 16 weight-only quantized it, and every output of the model became NaN."""
    model = matmul_model()
    for name, row in (("table", 3), ("w3", 5)):
        tensor = next(t for t in model.graph.initializer if t.name == name)
        array = numpy_helper.to_array(tensor).copy()
        array[row] = -np.inf
        tensor.CopyFrom(numpy_helper.from_array(array, name))
    result = quantize_model(model, None, mode=mode, show_progress=False, **kwargs)
    reasons = {f["node"]: f["reason"] for f in result.summary["nodes"]["float"]}
    assert "inf or NaN" in reasons["embed"] and "inf or NaN" in reasons["mm3"]
    feed = samples(1)[0]
    got, floats = outputs(result.model, feed), outputs(model, feed)
    assert np.array_equal(got["e"], floats["e"]) and np.isfinite(got["y"]).all()


# -- configuration, inspect, CLI --------------------------------------------------------

def test_modes_are_configuration_checked_against_the_target():
    assert QuantizationConfig(mode="weight_only").weight_bits == 4
    with pytest.raises(UsageError, match="target tensorrt does not run `mode` dynamic"):
        QuantizationConfig(mode="dynamic", target="tensorrt")
    with pytest.raises(UsageError, match="`weight_bits` is for `mode` weight-only"):
        QuantizationConfig(weight_bits=4)
    with pytest.raises(UsageError, match="`block_size` must be one of"):
        QuantizationConfig(mode="weight-only", block_size=48)
    with pytest.raises(UsageError, match="`mode` must be one of"):
        QuantizationConfig(mode="fp4")


def test_inspect_says_what_each_node_becomes():
    inspection = inspect_model(matmul_model(), mode="weight-only", weight_bits=8)
    decided = {n.name: n for n in inspection.nodes}
    assert decided["mm1"].decision == "quantized" and "int8 weights" in decided["mm1"].form
    assert "GatherBlockQuantized" in decided["embed"].form
    assert decided["act"].decision == "float"
    assert inspection.as_dict()["mode"] == "weight-only"


def test_cli_modes(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(matmul_model(), path)
    runner = CliRunner()
    report = tmp_path / "r.json"
    r = runner.invoke(cli, [str(path), "--mode", "dynamic", "-o", str(tmp_path / "d.onnx"), "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert "4 x dynamic: uint8 activations" in r.output and "DynamicQuantizeMatMul" in r.output
    assert json.loads(report.read_text())["mode"] == "dynamic"
    r = runner.invoke(cli, [str(path), "--mode", "weight-only", "--weight-bits", "4", "--block-size", "16",
                            "-o", str(tmp_path / "w.onnx")])
    assert r.exit_code == 0, r.output
    assert "int4 weights, asymmetric, blocks of 16 (rtn)" in r.output and "int8 embedding table" in r.output
    r = runner.invoke(cli, [str(path), "--weight-bits", "4", "--data", str(tmp_path)])
    assert r.exit_code == 2 and "--weight-bits is for --mode weight-only" in r.output
    r = runner.invoke(cli, [str(path), "--mode", "dynamic", "--target", "tensorrt"])
    assert r.exit_code == 2 and "does not run --mode dynamic" in r.output
    r = runner.invoke(cli, ["inspect", str(path), "--mode", "dynamic"])
    assert r.exit_code == 0 and "mm1" in r.output and "dynamic: uint8" in r.output
    assert run(onnx.load(tmp_path / "w.onnx"), samples(1)[0]).shape == (2, 8, N)


# -- FP8 (tensorrt-fp8) ----------------------------------------------------------------

def test_fp8_target_emits_float8_qdq_with_amax_scales(tmp_path):
    import ml_dtypes
    from conftest import SAMPLE_CALIB, SAMPLE_MODEL, SAMPLE_TEST

    result = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, target="tensorrt-fp8", show_progress=False)
    q = checked(result.model)
    assert next(o.version for o in q.opset_import if o.domain == "") == 19
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    inits = {i.name: i for i in q.graph.initializer}
    zero_points = [inits[n.input[2]] for n in qdq if len(n.input) > 2]
    assert zero_points and all(z.data_type == TensorProto.FLOAT8E4M3FN for z in zero_points)
    assert result.summary["activation_dtype"] == "float8_e4m3fn"
    # activations: per tensor, scale = amax / 448 of the calibrated range
    quantize_x = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    low, high = result.ranges["input"]
    assert np.isclose(float(initializer(q, quantize_x.input[1])), max(-low, high) / 448, rtol=1e-6)
    # weights: per output channel, scale = amax / 448, values rounded to E4M3 (numpy reference)
    from quantizer import optimize_model

    stage1 = {i.name: numpy_helper.to_array(i) for i in optimize_model(SAMPLE_MODEL).graph.initializer}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    dq = next(n for n in q.graph.node if n.output[0] == conv.input[1])
    w_q, scale = initializer(q, dq.input[0]), initializer(q, dq.input[1])
    w = stage1[dq.input[0].removesuffix("_quantized")]
    np.testing.assert_allclose(scale, np.abs(w).reshape(len(w), -1).max(1) / 448, rtol=1e-6)
    reference = (w / scale.reshape(-1, 1, 1, 1)).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(w_q.astype(np.float32), reference.astype(np.float32))
    assert np.abs(w_q.astype(np.float32)).max() == 448
    # onnxruntime's CPU provider runs it (Q/DQ emulation): close to float on held-out digits.
    # (runtime.session runs float8 models at the basic level: see runtime.py.)
    test = np.load(SAMPLE_TEST)
    x = test["x"][:64].astype(np.float32)
    session = runtime.session(q)
    floats = np.concatenate([run(SAMPLE_MODEL, {"input": x[i:i + 1]}) for i in range(len(x))])
    fp8 = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    assert sqnr_db(floats, fp8) > 20 and np.mean(floats.argmax(1) == fp8.argmax(1)) > 0.95


def test_fp8_targets_are_checked():
    from quantizer.targets import TargetError, load_target

    assert load_target("tensorrt-fp8").min_opset == 19 and load_target("tensorrt").min_opset == 13
    with pytest.raises(TargetError, match="float8e4m3fn activations are symmetric"):
        load_target({"base": "tensorrt", "name": "x", "activations": {"dtypes": ["float8e4m3fn", "int8"]}})


# -- 16-bit tensors ---------------------------------------------------------------------

ORT_UINT16 = {"base": "ort-cpu", "name": "ort-cpu-uint16", "activations": {"wide_dtype": "uint16"}}


@pytest.mark.parametrize("target,dtype", [("tflite", TensorProto.INT16), (ORT_UINT16, TensorProto.UINT16)])
def test_wide_tensors_are_quantized_at_the_targets_16_bits(target, dtype):
    from conftest import SAMPLE_CALIB, SAMPLE_MODEL

    plain = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, target=target, show_progress=False, report_samples=4)
    wide = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, target=target, show_progress=False, report_samples=4,
                          wide_tensors=["input"])
    q = checked(wide.model)
    assert next(o.version for o in q.opset_import if o.domain == "") == 21
    quantize_input = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    zero_point = next(i for i in q.graph.initializer if i.name == quantize_input.input[2])
    assert zero_point.data_type == dtype
    before = {e["tensor"]: e for e in plain.summary["tensors"]}
    after = {e["tensor"]: e for e in wide.summary["tensors"]}
    assert before["input"]["bits"] == 8 and after["input"]["bits"] == 16
    assert all(e["bits"] == 8 for name, e in after.items() if name != "input")  # the report shows every width
    assert after["input"]["sqnr_db"] > before["input"]["sqnr_db"] + 30  # 256x finer steps: ~48 dB
    if target == "tflite":
        assert after["input"]["zero_point"] == 0  # the 16x8 spec: symmetric int16


def test_wide_tensors_need_a_target_that_declares_them():
    with pytest.raises(UsageError, match="target tensorrt declares no 16-bit activations"):
        QuantizationConfig(target="tensorrt", wide_tensors=["x"])


def test_cli_wide_tensor(tmp_path):
    from conftest import SAMPLE_CALIB, SAMPLE_MODEL

    report = tmp_path / "r.json"
    r = CliRunner().invoke(cli, [str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB), "--target", "tflite", "--wide-tensor",
                                 "input", "-o", str(tmp_path / "o.onnx"), "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert {e["tensor"]: e["bits"] for e in json.loads(report.read_text())["tensors"]}["input"] == 16
    r = CliRunner().invoke(cli, [str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB), "--target", "tensorrt",
                                 "--wide-tensor", "input"])
    assert r.exit_code == 2 and "(--wide-tensor needs" in r.output


def test_autotune_raises_sensitive_tensors_to_16_bits_before_keeping_nodes_float():
    from conftest import SAMPLE_CALIB, SAMPLE_MODEL

    from quantizer import autotune

    metrics = iter([1.0, 0.5, 0.995])  # float, the plain trial, the 16-bit trial

    def evaluate(model):
        return next(metrics)

    result = autotune(SAMPLE_MODEL, SAMPLE_CALIB, evaluate, tolerable_loss=0.01, max_trials=3,
                      methods=("min_max_asym",), target="tflite", algorithms=())
    first, second = result.trials
    assert not first.wide and second.wide and not second.excluded and result.passed
    q = checked(result.model)
    widened = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"
               and next(i for i in q.graph.initializer if i.name == n.input[2]).data_type == TensorProto.INT16}
    assert set(second.wide) <= widened
