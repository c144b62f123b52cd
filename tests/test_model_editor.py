"""ModelEditor: uint8/int8 model inputs and outputs for NPU deployment."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import builders
from builders import RNG, _init, branchy_model, float_input, make_model
from conftest import SAMPLE_CALIB, SAMPLE_MODEL, run
from quantizer import ModelError, UsageError, quantize_model
from quantizer.cli.main import cli
from quantizer.model_editor import ModelEditor, TensorType, get_output_names, get_pure_input_names, read_io
from test_qdq import optimized_ops

USAGE, MODEL = 2, 3


def copy(model):
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def dq_scale(model, output):
    """The scale of the DequantizeLinear that makes graph output ``output``: one step."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if output in n.output)
    assert dq.op_type == "DequantizeLinear"
    return float(inits[dq.input[1]])


def run_plain(model, feed):
    """Run without graph optimizations: onnxruntime's fusions may pick different float
    kernels for the two graphs, which moves values across a rounding boundary."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def input_type(model, name):
    return next(i for i in model.graph.input if i.name == name).type.tensor_type.elem_type


def consumers(model, name):
    return [n for n in model.graph.node if name in n.input]


_rng = np.random.default_rng(1)
SAMPLES = [{"x": _rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
X = _rng.normal(size=(4, 3, 8, 8)).astype(np.float32)


@pytest.fixture(autouse=True, scope="module")
def _builders_rng_unchanged():
    """builders' models draw their weights from one shared generator: leave it where the
    test modules that run after this one expect it."""
    state = builders.RNG.bit_generator.state
    yield
    builders.RNG.bit_generator.state = state


@pytest.fixture(scope="module", params=["int8", "uint8"])
def branchy(request):
    """The quantized branchy model (x -> two Convs ... -> Softmax 'prob'), per activation type."""
    return quantize_model(branchy_model(), SAMPLES, activation_dtype=request.param, integer_outputs=["prob"],
                          show_progress=False).model


@pytest.fixture(scope="module")
def branchy_int8():
    return quantize_model(branchy_model(), SAMPLES, activation_dtype="int8", integer_outputs=["prob"],
                          show_progress=False).model


@pytest.mark.parametrize("requested", [TensorType.UINT8, TensorType.INT8])
def test_quantized_input_gives_the_float_input_outputs(branchy, requested):
    edited = copy(branchy)
    io = ModelEditor(edited).convert_input_type("x", requested)
    onnx.checker.check_model(edited, full_check=True)
    assert input_type(edited, "x") == (onnx.TensorProto.UINT8 if requested is TensorType.UINT8 else onnx.TensorProto.INT8)
    assert io.dtype == requested.value
    assert {n.op_type for n in consumers(edited, "x")} == {"DequantizeLinear"}  # the input Quantize is gone
    q = io.quantize(X)
    assert q.dtype == np.dtype(requested.value)
    reference = run(branchy, {"x": X})
    assert np.abs(run(edited, {"x": q}) - reference).max() <= dq_scale(branchy, "prob") + 1e-6
    # Exactly the unedited model fed the float values the integers stand for.
    np.testing.assert_array_equal(run_plain(edited, {"x": q}), run_plain(branchy, {"x": io.dequantize(q)}))


def test_requantize_input_is_the_same_grid_shifted(branchy_int8):
    """uint8 requested on int8 activations: zero point + 128, same scale, DQ -> Q inside."""
    calibrated = ModelEditor(copy(branchy_int8)).convert_input_type("x", "int8")
    edited = copy(branchy_int8)
    io = ModelEditor(edited).convert_input_type("x", TensorType.UINT8)
    assert io.scale == calibrated.scale and io.zero_point == calibrated.zero_point + 128
    (dq,) = consumers(edited, "x")
    (q,) = consumers(edited, dq.output[0])
    assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
    np.testing.assert_array_equal(io.quantize(X).astype(np.int16) - 128, calibrated.quantize(X))


@pytest.mark.parametrize("requested", ["uint8", "int8"])
def test_integer_output_dequantizes_to_the_float_output(branchy, requested):
    edited = copy(branchy)
    io = ModelEditor(edited).convert_output_type("prob", requested)
    onnx.checker.check_model(edited, full_check=True)
    out = run(edited, {"x": X})
    assert out.dtype == np.dtype(requested) and get_output_names(edited) == ["prob"]
    reference = run(branchy, {"x": X})
    assert io.scale == pytest.approx(dq_scale(branchy, "prob"))
    assert np.abs(io.dequantize(out) - reference).max() <= io.scale + 1e-6


@pytest.mark.parametrize("tensor_range", [(-0.5, 2.0), (0.0, 0.25)])
def test_output_requantized_to_a_range(branchy, tensor_range):
    edited = copy(branchy)
    io = ModelEditor(edited).convert_output_type("prob", TensorType.INT8, tensor_range=tensor_range)
    low, high = tensor_range
    assert io.dtype == "int8" and io.scale == pytest.approx((high - low) / 255, rel=1e-6)
    reference = run(branchy, {"x": X})
    deq = io.dequantize(run(edited, {"x": X}))
    assert np.abs(deq - np.clip(reference, low, high)).max() <= io.scale + 1e-6
    if high < reference.max():
        assert deq.max() == pytest.approx(high, abs=io.scale)  # clipped, not wrapped


def test_float_consumers_of_the_removed_quantize_get_dequantized_values():
    """x feeds its QuantizeLinear and a float Conv directly (as other tools' QDQ models do;
    ours route float readers through the DQ too): the float Conv must read DQ(x)."""
    model = quantize_model(branchy_model(), SAMPLES, exclude=["conv_other"], show_progress=False).model
    next(n for n in model.graph.node if n.name == "conv_other").input[0] = "x"
    for requested in ("int8", "uint8"):
        edited = copy(model)
        io = ModelEditor(edited).convert_input_type("x", requested)
        onnx.checker.check_model(edited, full_check=True)
        conv_other = next(n for n in edited.graph.node if n.name == "conv_other")
        dq = next(n for n in edited.graph.node if conv_other.input[0] in n.output)
        assert dq.op_type == "DequantizeLinear" and dq.input[0] == "x"
        q = io.quantize(X)
        np.testing.assert_array_equal(run_plain(edited, {"x": q}), run_plain(model, {"x": io.dequantize(q)}))


def test_output_that_also_feeds_the_graph_keeps_float_inside():
    """c is a graph output and the input of the next Conv: the Conv keeps reading floats."""
    model = make_model(
        [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["c", "w2"], ["y"], name="conv2")],
        [float_input()],
        [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["N", 4, 8, 8]),
         helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2, 8, 8])],
        [_init("w1", RNG.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)),
         _init("w2", RNG.normal(0, 0.5, (2, 4, 1, 1)).astype(np.float32))],
    )
    quantized = quantize_model(model, SAMPLES, show_progress=False).model
    edited = copy(quantized)
    io = ModelEditor(edited).convert_output_type("c", TensorType.UINT8)
    onnx.checker.check_model(edited, full_check=True)
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (quantized, edited)]
    (c_ref, y_ref), (c_int, y_new) = (s.run(["c", "y"], {"x": X}) for s in sessions)
    assert c_int.dtype == np.uint8
    np.testing.assert_array_equal(y_new, y_ref)
    assert np.abs(io.dequantize(c_int) - c_ref).max() <= io.scale + 1e-6


@pytest.mark.parametrize("requested", ["uint8", "int8"])
def test_input_straight_to_output_without_zero_point_input(requested):
    """x -> Q (no zero point: uint8 0) -> DQ -> y: both ends convert; y is x's integers."""
    model = make_model(
        [helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q"),
         helper.make_node("DequantizeLinear", ["xq", "s"], ["y"], name="dq")],
        [float_input("x", (2, 3))], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [_init("s", np.float32(0.5))],
    )
    editor = ModelEditor(model)
    io_in = editor.convert_input_type("x", requested)
    io_out = editor.convert_output_type("y", requested)
    onnx.checker.check_model(model, full_check=True)
    assert (io_in.scale, io_in.zero_point) == (0.5, 0 if requested == "uint8" else -128) and io_out == \
        type(io_out)("output", "y", requested, 0.5, io_in.zero_point)
    q = io_in.quantize(np.array([[0, 0.5, 1], [2, 10, 60]], np.float32))
    np.testing.assert_array_equal(run(model, {"x": q}), q)


@pytest.mark.parametrize("requested", ["int8", "uint8"])
def test_constant_node_parameters_and_a_float_reader_listed_first(requested):
    """Other tools' QDQ: parameters from Constant nodes, a float Relu on x before the Q."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="float_first"),
         helper.make_node("Constant", [], ["s"], name="cs", value=numpy_helper.from_array(np.float32(0.5))),
         helper.make_node("Constant", [], ["z"], name="cz", value=numpy_helper.from_array(np.int8(3))),
         helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
         helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
         helper.make_node("Add", ["xd", "r"], ["y"], name="add")],
        [float_input("x", (2, 3))], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])], [],
    )
    reference = copy(model)
    io = ModelEditor(model).convert_input_type("x", requested)
    onnx.checker.check_model(model, full_check=True)
    assert (io.scale, io.zero_point) == (0.5, 3 if requested == "int8" else 131)
    q = io.quantize(np.array([[0, 0.5, 1], [-2, 10, -60]], np.float32))
    np.testing.assert_array_equal(run(model, {"x": q}), run(reference, {"x": io.dequantize(q)}))


@pytest.mark.parametrize("activation_dtype", ["int8", "uint8"])
def test_raw_uint8_pixels_match_the_float_pipeline(digits_test, activation_dtype):
    """Calibrated on x in [0, 1] with the input range set to [0, 1]: raw pixels round(255 x)
    are the quantized input (scale 1/255, zero point 0)."""
    x, y = digits_test
    quantized = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, activation_dtype=activation_dtype,
                               range_overrides={"input": (0, 1)}, integer_outputs=("logits",), show_progress=False)
    assert quantized.ranges["input"] == (0, 1)
    edited = copy(quantized.model)
    editor = ModelEditor(edited)
    io = editor.convert_input_type("input", TensorType.UINT8)
    out_io = editor.convert_output_type("logits", TensorType.UINT8)
    assert (io.scale, io.zero_point) == (pytest.approx(1 / 255), 0)
    reference = run(quantized.model, {"input": x})
    # The pixels QuantizeLinear itself makes (round half to even of x / scale): identical.
    exact = np.clip(np.rint(x / np.float32(io.scale)), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(out_io.dequantize(run(edited, {"input": exact})), reference, atol=1e-6)
    # Camera pixels round(255 x) differ from those only at exact halves: the classes stay.
    logits = out_io.dequantize(run(edited, {"input": np.round(x * 255).astype(np.uint8)}))
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.99
    float_top1 = (run(SAMPLE_MODEL, {"input": x}).argmax(1) == y).mean()
    assert float_top1 - (logits.argmax(1) == y).mean() <= 0.01
    if activation_dtype == "uint8":  # onnxruntime runs it integer end to end: no float edges
        ops = optimized_ops(edited)
        assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and ops["QLinearConv"] == 3


def test_metadata_records_every_edited_tensor(branchy_int8):
    edited = copy(branchy_int8)
    editor = ModelEditor(edited)
    inp = editor.convert_input_type("x", TensorType.UINT8)
    out = editor.convert_output_type("prob", TensorType.INT8, tensor_range=(0, 1))
    props = {p.key: p.value for p in edited.metadata_props}
    assert props["quantizer.input.x.dtype"] == "uint8"
    assert np.float32(float(props["quantizer.input.x.scale"])) == np.float32(inp.scale)
    assert int(props["quantizer.input.x.zero_point"]) == inp.zero_point
    assert props["quantizer.output.prob.dtype"] == "int8" and props["quantizer.output.prob.zero_point"] == "-128"
    assert read_io(onnx.load_from_string(edited.SerializeToString())) == {"input": {"x": inp}, "output": {"prob": out}}
    assert editor.edited == [inp, out]


def test_input_and_output_names():
    model = branchy_model()
    model.graph.input.append(helper.make_tensor_value_info("mm_b", onnx.TensorProto.FLOAT, [10]))
    assert get_pure_input_names(model) == ["x"] and get_output_names(model) == ["prob"]


# -- errors: one line, the model unchanged ------------------------------------------------

def _excluded(names):
    return quantize_model(branchy_model(), SAMPLES, exclude=names, show_progress=False).model


@pytest.mark.parametrize(
    "model_fn, call, error, text",
    [
        (None, lambda e: e.convert_input_type("nope", "uint8"), UsageError, "unknown input 'nope'; the model's inputs are: x"),
        (None, lambda e: e.convert_output_type("nope", "uint8"), UsageError, "unknown output 'nope'; the model's outputs are: prob"),
        (None, lambda e: e.convert_input_type("x", "float32"), UsageError, "unsupported tensor type 'float32'"),
        (None, lambda e: e.convert_output_type("prob", 8), UsageError, "unsupported tensor type 8"),
        (None, lambda e: e.convert_output_type("prob", "int8", (1, 0)), UsageError, "min <= max"),
        (None, lambda e: e.convert_output_type("prob", "int8", "ab"), UsageError, "must be two numbers"),
        (lambda: _excluded(["conv", "conv_other"]), lambda e: e.convert_input_type("x", "uint8"),
         ModelError, "input 'x' has no QuantizeLinear to remove"),
        (lambda: _excluded(["softmax"]), lambda e: e.convert_output_type("prob", "uint8"),
         ModelError, "output 'prob' is float (made by Softmax 'softmax'; a quantizer leaves a result"),
    ],
)
def test_errors_leave_the_model_unchanged(branchy_int8, model_fn, call, error, text):
    model = model_fn() if model_fn else copy(branchy_int8)
    before = model.SerializeToString()
    with pytest.raises(error) as info:
        call(ModelEditor(model))
    assert text in str(info.value) and "\n" not in str(info.value)
    assert model.SerializeToString() == before


def test_initializer_backed_input_is_refused(branchy_int8):
    model = copy(branchy_int8)
    model.graph.input.append(helper.make_tensor_value_info("x_scale", onnx.TensorProto.FLOAT, []))
    with pytest.raises(UsageError, match="input 'x_scale' is backed by an initializer.*inputs are: x$"):
        ModelEditor(model).convert_input_type("x_scale", TensorType.UINT8)


def test_float_model_and_converting_twice_are_refused(branchy_int8):
    with pytest.raises(ModelError, match="the model is not quantized"):
        ModelEditor(branchy_model())
    editor = ModelEditor(copy(branchy_int8))
    editor.convert_input_type("x", "uint8")
    editor.convert_output_type("prob", "uint8")
    with pytest.raises(ModelError, match="input 'x' is uint8, not float32"):
        editor.convert_input_type("x", "int8")
    with pytest.raises(ModelError, match="output 'prob' is uint8, not float32"):
        editor.convert_output_type("prob", "int8")


# -- CLI -----------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_run_with_integer_input_and_output(tmp_path):
    out = tmp_path / "npu.onnx"
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out, "--activation-dtype", "uint8",
               "--input-range", "input=0,1", "--input-type", "input=uint8", "--output-type", "logits=int8:-8,12")
    assert r.exit_code == 0, r.output
    assert "input 'input': uint8, scale 0.00392156886, zero point 0" in r.output
    assert "output 'logits': int8, scale 0.0784313" in r.output
    model = onnx.load(out)
    io = read_io(model)
    assert io["input"]["input"].zero_point == 0 and io["output"]["logits"].dtype == "int8"
    assert input_type(model, "input") == onnx.TensorProto.UINT8


def test_cli_edit_an_already_quantized_model(tmp_path):
    quantized, edited = tmp_path / "m_int8.onnx", tmp_path / "m_int8_edited.onnx"
    assert invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", quantized, "-q").exit_code == 0
    r = invoke("edit", quantized, "--input-type", "input=UINT8", "--output-type", "logits=uint8")
    # logits is a Gemm's float output in this model (nothing integer reads it): it needs a range
    assert r.exit_code == 3 and "output 'logits' is float" in r.output and "logits=uint8:MIN,MAX" in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    assert "Traceback" not in r.output and not edited.exists()
    r = invoke("edit", quantized, "--input-type", "input=UINT8", "--output-type", "logits=uint8:-30,30")
    assert r.exit_code == 0, r.output
    assert f"wrote {edited}" in r.output and "input 'input': uint8" in r.output
    io = read_io(onnx.load(edited))
    assert set(io["input"]) == {"input"} and set(io["output"]) == {"logits"}
    x = np.load(SAMPLE_CALIB / "sample_000.npy")
    feed = io["input"]["input"].quantize(x)
    np.testing.assert_allclose(io["output"]["logits"].dequantize(run(edited, {"input": feed})),
                               run(quantized, {"input": x}), atol=io["output"]["logits"].scale + 1e-6)


def assert_one_line_error(result, code, text):
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and text in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--input-type", "pixels=uint8"], USAGE, "--input-type: unknown input 'pixels'; the model's inputs are: input"),
        (["--input-range", "pixels=0,1"], USAGE, "--input-range: unknown input 'pixels'"),
        (["--output-type", "probs=int8"], USAGE, "--output-type: unknown output 'probs'; the model's outputs are: logits"),
        (["--input-type", "input=float16"], USAGE, "unsupported type 'float16'; use uint8 or int8"),
        (["--input-type", "input"], USAGE, "--input-type expects NAME=uint8|int8"),
        (["--output-type", "logits=int8:1"], USAGE, "--output-type expects NAME=uint8|int8[:MIN,MAX]"),
        (["--output-type", "logits=int8:2,1"], USAGE, "MIN <= MAX"),
        (["--input-range", "input=0"], USAGE, "--input-range expects NAME=MIN,MAX"),
        (["--exclude", "conv1", "--input-type", "input=uint8"], MODEL, "input 'input' has no QuantizeLinear"),
        (["--optimize-only", "--input-type", "input=uint8"], USAGE, "need quantization"),
    ],
)
def test_cli_run_errors(tmp_path, args, code, text):
    out = tmp_path / "out.onnx"
    assert_one_line_error(invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out, *args), code, text)
    assert not out.exists()


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "m_int8.onnx"
    assert invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", path, "-q").exit_code == 0
    return path


@pytest.mark.parametrize(
    "model, args, code, text",
    [
        ("float", ["--input-type", "input=uint8"], MODEL, "the model is not quantized"),
        ("quantized", [], USAGE, "nothing to edit"),
        ("quantized", ["--input-type", "x=uint8"], USAGE, "unknown input 'x'; the model's inputs are: input"),
        ("quantized", ["--output-type", "logits=int16"], USAGE, "unsupported type 'int16'"),
        ("missing", ["--input-type", "input=uint8"], MODEL, "model file not found"),
    ],
)
def test_cli_edit_errors(tmp_path, quantized_file, model, args, code, text):
    path = {"float": SAMPLE_MODEL, "quantized": quantized_file, "missing": tmp_path / "nope.onnx"}[model]
    out = tmp_path / "edited.onnx"
    assert_one_line_error(invoke("edit", path, "-o", out, *args), code, text)
    assert not out.exists()


def test_cli_edit_twice_is_refused_and_writes_nothing(tmp_path, quantized_file):
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    assert invoke("edit", quantized_file, "-o", once, "--input-type", "input=uint8", "-q").exit_code == 0
    assert_one_line_error(invoke("edit", once, "-o", twice, "--input-type", "input=uint8"), MODEL,
                          "input 'input' is uint8, not float32")
    assert not twice.exists()


def test_a_subgraph_reading_the_input_reads_its_dequantized_value():
    """x feeds a Conv (quantized) and, from inside an If branch, a float Relu: after the
    input becomes integer, the branch must read the dequantized x, not the integers."""
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["b"], name="inner_relu")], "then",
                               [], [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="inner_neg")], "else",
                              [], [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])])
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("If", ["cond"], ["z"], name="branchy_if", then_branch=branch, else_branch=other)],
        [float_input()],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8]),
         helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [_init("w", RNG.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)), _init("cond", np.array(True))],
    )
    quantized = quantize_model(model, SAMPLES, show_progress=False).model
    edited = copy(quantized)
    io = ModelEditor(edited).convert_input_type("x", "uint8")
    onnx.checker.check_model(edited, full_check=True)
    q = io.quantize(X)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(edited.SerializeToString(), options, providers=["CPUExecutionProvider"])
    z = session.run(["z"], {"x": q})[0]
    np.testing.assert_allclose(z, np.maximum(io.dequantize(q), 0), rtol=1e-6)
