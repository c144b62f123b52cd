"""Targets: presets as data, user files, constraints, and what each preset emits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import _init, float_input, make_model
from conftest import run, sqnr_db
from corpus import USAGE, assert_clean_failure, invoke, save_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from quantizer import quantize_model
from quantizer.errors import UsageError
from quantizer.qdq.params import activation_params
from quantizer.targets import (
    PRESETS,
    ScaleRule,
    TargetError,
    load_target,
    machine_preset,
)

RNG = np.random.default_rng(7)


def _residual_model() -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Add(x_conv) -> HardSwish -> Conv -> Resize -> y: residual,
    a fused activation, HardSwish and a shared-parameter op (the same weights every call)."""
    rng = np.random.default_rng(11)
    inits = [
        _init("w1", rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)),
        _init("b1", rng.normal(0, 0.1, 4).astype(np.float32)),
        _init("w2", rng.normal(0, 0.4, (4, 4, 3, 3)).astype(np.float32)),
        _init("b2", rng.normal(0, 0.1, 4).astype(np.float32)),
        _init("w3", rng.normal(0, 0.4, (2, 4, 1, 1)).astype(np.float32)),
        _init("scales", np.array([1, 1, 2, 2], np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "c1"], ["s"], name="residual"),
        helper.make_node("HardSwish", ["s"], ["h"], name="hswish"),
        helper.make_node("Conv", ["h", "w3"], ["c3"], name="conv3"),
        helper.make_node("Resize", ["c3", "", "scales"], ["y"], name="up", mode="nearest"),
    ]
    return make_model(nodes, [float_input(shape=(1, 3, 8, 8))],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 16, 16])], inits, opset=14)


def _samples(n=8):
    return [{"x": RNG.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _qdq(model: onnx.ModelProto):
    """[(op_type, zero point array, quantized input array or None)] of every Q/DQ."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [(n.op_type, inits[n.input[2]], inits.get(n.input[0])) for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


@pytest.fixture(scope="module")
def samples():
    return _samples()


# -- presets and resolution --------------------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_declares_its_choices(name):
    target = load_target(name)
    data = target.as_dict()
    assert data["name"] == name and target.ops
    assert target.activations.dtype in target.activations.dtypes
    assert target.weights.range in target.weights.ranges
    json.dumps(data)  # recordable


def test_ort_cpu_resolves_for_this_machine_and_keeps_what_was_asked():
    target = load_target("ort-cpu")
    assert target.name == machine_preset() and target.requested == "ort-cpu"
    if target.name == "ort-cpu-x86":
        assert (target.activations.dtype, target.weights.range) == ("uint8", "reduced")


def test_preset_parameters():
    x86, vnni, arm = load_target("ort-cpu-x86"), load_target("ort-cpu-vnni"), load_target("ort-cpu-arm")
    assert (x86.activations.dtype, x86.weights.qmax) == ("uint8", 63)
    assert (vnni.activations.dtype, vnni.weights.qmax) == ("uint8", 127)
    assert (arm.activations.dtype, arm.weights.qmax) == ("int8", 127)
    trt = load_target("tensorrt")
    assert trt.activations.symmetric and trt.activations.dtypes == ("int8",) and trt.bias == "float"
    assert trt.placement == "inputs" and "Add" in trt.ops
    tfl = load_target("npu")
    assert tfl.name == "tflite" and tfl.bias == "int32" and tfl.weights.qmax == 127
    assert not tfl.activations.symmetric and tfl.activations.dtypes == ("int8",)


def test_unknown_target_suggests_the_near_name():
    with pytest.raises(TargetError, match="did you mean tensorrt"):
        load_target("tensorrtt")


# -- constraints ---------------------------------------------------------------------

@pytest.mark.parametrize("target, change, words", [
    ("tensorrt", {"activation_dtype": "uint8"}, "does not allow `activation_dtype` uint8"),
    ("tflite", {"activation_dtype": "uint8"}, "does not allow `activation_dtype` uint8"),
    ("tflite", {"weight_range": "reduced"}, "does not allow `weight_range` reduced"),
    ("tensorrt", {"weight_range": "reduced"}, "it allows full"),
])
def test_an_override_the_target_forbids_is_a_usage_error_naming_the_constraint(tmp_path, target, change, words):
    with pytest.raises(UsageError, match=words):
        quantize_model(_residual_model(), _samples(2), target=target, **change)


def test_overrides_the_target_allows_are_applied(samples):
    result = quantize_model(_residual_model(), samples, target="ort-cpu-x86", activation_dtype="int8",
                            weight_range="full")
    assert result.summary["activation_dtype"] == "int8" and result.summary["weight_range"] == "full"
    assert result.summary["target"]["activations"]["dtype"] == "int8"


def test_cli_refuses_a_forbidden_override_in_one_line(tmp_path):
    path = save_model(_residual_model(), tmp_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "0.npy", _samples(1)[0]["x"])
    result = invoke(path, "--data", calib, "--target", "tensorrt", "--activation-dtype", "uint8")
    assert_clean_failure(result, USAGE, "--activation-dtype uint8", tmp_path, keep=("m.onnx", "calib"))


# -- what each preset emits ------------------------------------------------------------

def test_tensorrt_model_has_zero_point_0_everywhere_and_qdq_on_op_inputs_only(samples):
    model = quantize_model(_residual_model(), samples, target="tensorrt").model
    onnx.checker.check_model(model, full_check=True)
    qdq = _qdq(model)
    assert qdq and all(zp.dtype == np.int8 and np.all(zp == 0) for _, zp, _ in qdq)
    assert not any(zp.dtype == np.int32 for _, zp, _ in qdq)  # float bias
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers["y"].op_type == "Resize"  # nothing quantized after the last quantized op
    add = next(n for n in model.graph.node if n.op_type == "Add")
    assert all(producers[i].op_type == "DequantizeLinear" for i in add.input)  # residual inputs
    relu = [n for n in model.graph.node if n.op_type == "Relu"]
    assert relu, "TensorRT fuses Relu itself: it stays in the graph"
    out = run(model, samples[0])
    ref = run(_residual_model(), samples[0])
    assert sqnr_db(ref, out) > 15  # symmetric int8 spends half its codes on Relu outputs


def test_tflite_model_has_int8_asymmetric_activations_and_full_range_weights(samples):
    model = quantize_model(_residual_model(), samples, target="tflite").model
    qdq = _qdq(model)
    activations = [zp for op, zp, q in qdq if q is None]
    assert activations and all(zp.dtype == np.int8 for zp in activations)
    assert any(int(zp) != 0 for zp in activations)  # asymmetric
    weights = [q for op, zp, q in qdq if q is not None and q.dtype == np.int8 and q.ndim == 4]
    assert weights and all(q.min() >= -127 and q.max() <= 127 for q in weights)
    assert max(int(np.abs(q).max()) for q in weights) == 127
    assert any(q is not None and q.dtype == np.int32 for _, _, q in qdq)  # int32 bias
    assert any(n.op_type == "HardSwish" for n in model.graph.node)  # TFLite has an int8 HardSwish


def test_ort_cpu_x86_model_has_uint8_activations_reduced_weights_and_no_float_hardswish(samples):
    result = quantize_model(_residual_model(), samples, target="ort-cpu-x86")
    model = result.model
    qdq = _qdq(model)
    assert all(zp.dtype == np.uint8 for _, zp, q in qdq if q is None or q.dtype != np.int8 and q.dtype != np.int32)
    weights = [q for _, _, q in qdq if q is not None and q.dtype == np.int8 and q.ndim == 4]
    assert weights and all(np.abs(q).max() <= 63 for q in weights)
    assert not any(n.op_type in ("HardSwish", "HardSigmoid") for n in model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["quantizer.target"] == "ort-cpu-x86"
    assert json.loads(meta["quantizer.target.spec"])["activations"]["dtype"] == "uint8"
    fusion = result.summary["fusion"]
    assert fusion["integer_nodes"] == fusion["quantized_nodes"] and not fusion["float_islands"], fusion
    ref = run(_residual_model(), samples[0])
    assert sqnr_db(ref, run(model, samples[0])) > 20


def test_default_target_is_ort_cpu_for_this_machine(samples):
    result = quantize_model(_residual_model(), samples)
    assert result.summary["target"]["name"] == machine_preset()
    assert result.summary["target"]["requested"] == "ort-cpu"
    assert not any("activation_dtype` uint8" in n for n in result.summary["notes"])  # no advice needed


# -- user target files -------------------------------------------------------------

def test_a_user_toml_target_overrides_a_preset(tmp_path, samples):
    path = tmp_path / "npu.toml"
    path.write_text('base = "tflite"\nname = "my-npu"\n[activations.scale]\npower_of_two = true\n'
                    '[ops]\nResize = false\nTanh = false\n')
    target = load_target(path)
    assert target.name == "my-npu" and "Resize" not in target.ops and "Conv" in target.ops
    result = quantize_model(_residual_model(), samples, target=str(path))
    assert result.summary["target"]["name"] == "my-npu"
    assert not any(n["node"] == "up" for n in [{"node": q} for q in result.summary["nodes"]["quantized_names"]])
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    act_scales = [float(inits[n.input[1]]) for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    assert act_scales and all(np.log2(s) == np.round(np.log2(s)) for s in act_scales)


def test_a_user_json_target_with_its_own_op_rule(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"base": "ort-cpu-x86", "ops": {"Tanh": {"kind": "signed_unit"},
                                                              "Erf": {"inputs": [0], "output": "calibrated"}}}))
    target = load_target(path)
    assert target.ops["Tanh"].output == "signed_unit" and target.ops["Erf"].activations == (0,)
    assert target.name == "t"


@pytest.mark.parametrize("text, words", [
    ('base = "tflite"\n[activations]\ndtyp = "int8"\n', "unknown key `activations.dtyp`"),
    ('base = "tflite"\n[activations]\ndtype = "int4"\n', "`activations.dtype` must be one of int8"),
    ('base = "tflite"\n[weights]\nper_channel = "yes"\n', "`weights.per_channel` must be a true or false"),
    ('base = "nowhere"\n', "`base` must be one of"),
    ('base = "tflite"\n[ops]\nConv = "weird"\n', "`ops.Conv` must be one of"),
    ('base = "tflite"\n[ops.Conv]\ninputs = [-1]\n', "`ops.Conv.inputs`"),
    ('base = "tensorrt"\n[activations]\ndtypes = ["uint8", "int8"]\n', "`activations.symmetric` needs int8"),
    ('name = "empty"\n', "`ops` lists no op type"),
    ('base = "tflite"\n[placement]\nrewrites = ["magic"]\n', "`placement.rewrites` must be one of"),
    ('base = "tflite"\n[placement]\nfloat_output_ops = "MatMul"\n', "placement.float_output_ops"),
    ('base = "tflite"\n[placement]\nfloat_output_ops = [1]\n', "`placement.float_output_ops` must list op types"),
    ('base = "tflite"\n[placement]\nfloat_when_unread = "yes"\n', "placement.float_when_unread"),
    ("this is = not toml [", "not valid TOML"),
])
def test_an_invalid_target_file_gets_one_line_naming_the_key(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TargetError, match="target file .*bad.toml") as info:
        load_target(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_cli_invalid_target_file_is_a_usage_error(tmp_path):
    path = save_model(_residual_model(), tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "tflite"\n[weights]\nrange = "huge"\n')
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "0.npy", _samples(1)[0]["x"])
    result = invoke(path, "--data", calib, "--target", bad)
    assert_clean_failure(result, USAGE, "weights.range must be one of full", tmp_path, keep=("m.onnx", "calib", "bad.toml"))


def test_cli_targets_lists_every_preset_and_shows_one_in_full():
    result = invoke("targets")
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert f"{name}:" in result.stdout
    one = invoke("targets", "tensorrt", "--json")
    assert one.exit_code == 0
    data = json.loads(one.stdout)
    assert data["activations"]["symmetric"] is True and data["bias"] == "float"
    full = invoke("targets", "tflite")
    assert "HardSwish: inputs 0; output calibrated" in full.stdout


# -- parameter rules -------------------------------------------------------------------

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(low=finite, high=finite)
def test_symmetric_params_have_zero_point_0_and_cover_the_range(low, high):
    low, high = min(low, high), max(low, high)
    p = activation_params(low, high, "int8", symmetric=True)
    assert int(p.zero_point) == 0
    amax = max(-min(low, 0), max(high, 0))
    if amax > 1e-9:
        assert np.isclose(float(p.scale), amax / 127, rtol=1e-6)
        assert 127 * float(p.scale) >= amax * (1 - 1e-6)


@settings(max_examples=200, deadline=None)
@given(low=finite, high=finite, minimum=st.sampled_from([0.0, 1e-3, 0.5]))
def test_power_of_two_and_minimum_scale_rules_only_widen_the_range(low, high, minimum):
    low, high = min(low, high), max(low, high)
    rule = ScaleRule(power_of_two=True, minimum=minimum)
    plain = activation_params(low, high, "uint8")
    p = activation_params(low, high, "uint8", scale_rule=rule)
    s = float(p.scale)
    assert s >= float(plain.scale) * (1 - 1e-7) and s >= minimum * (1 - 1e-7)
    assert np.log2(s) == np.round(np.log2(s))
    lo, hi = (0 - int(p.zero_point)) * s, (255 - int(p.zero_point)) * s
    assert lo <= min(low, 0) + s and hi >= max(high, 0) - s  # within one step at the clamped ends


# -- placement conventions ---------------------------------------------------------

def _scalar_mul_model():
    rng = np.random.default_rng(12)
    inits = [_init("w1", rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)),
             _init("w2", rng.normal(0, 0.4, (4, 4, 3, 3)).astype(np.float32)),
             _init("half", np.array(0.5, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "half"], ["m"], name="scale"),
             helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make_model(nodes, [float_input(shape=(1, 3, 8, 8))],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)


def test_a_scalar_mul_folds_into_the_dequantize_scale(samples):
    # ort-cpu folds it; the Conv-weight folding of stage 1 would take it first, so keep stage 1 out of it
    from quantizer.quantize import quantize

    stage1 = onnx.shape_inference.infer_shapes(_scalar_mul_model())
    from quantizer.runtime import session

    sess = session(stage1, extra_outputs=["c1"])
    outs = [sess.run(["c1", "y"], s) for s in samples]
    ranges = {"x": (min(float(s["x"].min()) for s in samples), max(float(s["x"].max()) for s in samples)),
              "c1": (min(float(o[0].min()) for o in outs), max(float(o[0].max()) for o in outs)),
              "y": (min(float(o[1].min()) for o in outs), max(float(o[1].max()) for o in outs))}
    model = quantize(stage1, ranges, target="ort-cpu-x86")
    assert not any(n.op_type == "Mul" for n in model.graph.node)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "c1")
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
    assert any(np.isclose(float(inits[d.input[1]]), 0.5 * float(inits[q.input[1]]), rtol=0) for d in dqs)
    ref = run(stage1, samples[0])
    assert sqnr_db(ref, run(model, samples[0])) > 20
    kept = quantize(stage1, ranges, target="tflite")  # no folding there: QLinearMul-style Mul stays
    assert any(n.op_type == "Mul" for n in kept.graph.node)


def _embedding_model():
    rng = np.random.default_rng(13)
    table = rng.normal(0, 1, (1000, 16)).astype(np.float32)
    inits = [_init("table", table), _init("w", rng.normal(0, 0.3, (16, 8)).astype(np.float32)),
             _init("pos", rng.normal(0, 0.1, (1, 5, 16)).astype(np.float32))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("Add", ["e", "pos"], ["s"], name="add_pos"),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="proj")]
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8])], inits)


def test_an_embedding_table_is_quantized_like_a_weight():
    model = _embedding_model()
    samples = [{"ids": RNG.integers(0, 1000, (1, 5)).astype(np.int64)} for _ in range(8)]
    result = quantize_model(model, samples)
    q = result.model
    tables = [i for i in q.graph.initializer if list(i.dims) == [1000, 16]]
    assert len(tables) == 1 and tables[0].data_type in (TensorProto.INT8, TensorProto.UINT8)
    assert q.ByteSize() < model.ByteSize() / 2
    assert sqnr_db(run(model, samples[0]), run(q, samples[0])) > 20
    assert "embed" in result.summary["nodes"]["quantized_names"]


def test_the_readme_target_file_example_loads_with_every_key(tmp_path):
    from conftest import ROOT

    text = (ROOT / "README.md").read_text()
    block = text.split("A complete file", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "my-npu.toml"
    path.write_text(block)
    target = load_target(path)
    assert target.name == "my-npu" and target.activations.scale.power_of_two and target.weights.scale.power_of_two
    assert "Resize" not in target.ops and target.ops["Gelu"].output == "calibrated" and "Erf" in target.ops
    as_json = tmp_path / "my-npu.json"
    import tomllib

    as_json.write_text(json.dumps(tomllib.loads(block)))
    same = {"source": "", "requested": ""}
    assert load_target(as_json).as_dict() | same == target.as_dict() | same


def _tanh_model():
    rng = np.random.default_rng(14)
    inits = [_init("w1", rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)),
             _init("w2", rng.normal(0, 0.4, (4, 4, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["c1"], ["t"], name="tanh"),
             helper.make_node("Conv", ["t", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return make_model(nodes, [float_input(shape=(1, 3, 8, 8))],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)


def test_fusion_report_names_a_quantized_op_onnxruntime_runs_in_float(samples):
    # A target claiming an integer Tanh for onnxruntime: it has none, so Tanh runs float
    # between a DequantizeLinear and a QuantizeLinear, and the report says so.
    claims = {"base": "ort-cpu-x86", "name": "claims-tanh", "ops": {"Tanh": "signed_unit"}}
    result = quantize_model(_tanh_model(), samples, target=claims)
    fusion = result.summary["fusion"]
    assert fusion["float_islands"] == {"Tanh": 1} and fusion["float_island_nodes"] == ["tanh"]
    assert fusion["quantized_nodes"] == 3 and fusion["integer_nodes"] == 2
    assert fusion["onnxruntime_ops"].get("QLinearConv") == 2
    note = next(n for n in result.summary["notes"] if n.startswith("onnxruntime runs"))
    assert "2 of 3 quantized nodes" in note and "1 Tanh" in note and "33% of the quantized nodes run float" in note
    plain = quantize_model(_tanh_model(), samples, target="ort-cpu-x86")  # Tanh left float: no island
    assert plain.summary["fusion"]["float_island_nodes"] == []
    assert "tanh" not in plain.summary["nodes"]["quantized_names"]


def test_no_fusion_report_for_targets_that_are_not_onnxruntime(samples):
    result = quantize_model(_tanh_model(), samples, target="tflite")
    assert "fusion" not in result.summary and not any(s["step"] == "fusion_report" for s in result.summary["steps"])


def test_the_tensor_report_reads_a_folded_mul_source_with_its_own_scale():
    # s is quantized once and read only by the folded Mul's DequantizeLinear (scale x 0.5):
    # the report must compare s with s's own parameters, not with that one.
    rng = np.random.default_rng(21)
    inits = [_init("w1", rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)),
             _init("w0", rng.normal(0, 0.4, (4, 3, 1, 1)).astype(np.float32)),
             _init("half", np.array(0.5, np.float32)),
             _init("w2", rng.normal(0, 0.4, (4, 4, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("Add", ["c1", "c0"], ["s"], name="sum"),
             helper.make_node("Mul", ["s", "half"], ["m"], name="scale"),  # not foldable into a Conv
             helper.make_node("Add", ["m", "c0"], ["a"], name="add"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]  # an integer reader of the Adds
    model = make_model(nodes, [float_input(shape=(1, 3, 8, 8))],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    samples = _samples(4)
    result = quantize_model(model, samples, target="ort-cpu-x86", report_samples=2)
    assert not any(n.op_type == "Mul" for n in result.model.graph.node)  # folded into a scale
    entry = next(e for e in result.summary["tensors"] if e["tensor"] == "s")
    assert entry["sqnr_db"] > 25, entry  # read with half the scale it would be about 0 dB


def test_a_conv_with_bias_reading_a_folded_mul_gets_the_scaled_input_scale():
    # PP-OCRv5 cls: x * Relu6(x + 3) / 6 -> Conv(bias).  div_by_constant makes the /6 a Mul,
    # which folds into a DequantizeLinear; the Conv's int32 bias needs that scaled scale.
    rng = np.random.default_rng(22)
    inits = [_init("w1", rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)),
             _init("w2", rng.normal(0, 0.4, (4, 4, 1, 1)).astype(np.float32)),
             _init("b2", rng.normal(0, 0.1, 4).astype(np.float32)),
             _init("three", np.array(3, np.float32)), _init("zero", np.array(0, np.float32)),
             _init("six", np.array(6, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "three"], ["a"], name="plus3"),
             helper.make_node("Clip", ["a", "zero", "six"], ["r6"], name="relu6"),
             helper.make_node("Mul", ["c1", "r6"], ["m"], name="gate"),
             helper.make_node("Div", ["m", "six"], ["h"], name="div6"),
             helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv2")]
    model = make_model(nodes, [float_input(shape=(1, 3, 8, 8))],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits, opset=13)
    samples = _samples(6)
    result = quantize_model(model, samples, target="ort-cpu-x86")
    q = result.model
    assert not any(n.op_type in ("Div", "HardSwish") for n in q.graph.node)
    assert any(n.op_type == "DequantizeLinear" and onnx.numpy_helper.to_array(
        next(i for i in q.graph.initializer if i.name == n.input[0])).dtype == np.int32
        for n in q.graph.node if any(i.name == n.input[0] for i in q.graph.initializer))  # an int32 bias
    assert sqnr_db(run(model, samples[0]), run(q, samples[0])) > 20


def _post_ln_block(d: int = 16, t: int = 12) -> onnx.ModelProto:
    """A post-LN transformer sublayer: MatMul -> bias Add -> residual Add -> LayerNorm -> MatMul.
    The residual stream carries a few loud channels (BERT's outlier dimensions)."""
    rng = np.random.default_rng(31)
    gamma = np.ones(d, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="dense"),
             helper.make_node("Add", ["m1", "b1"], ["biased"], name="bias"),
             helper.make_node("Add", ["biased", "x"], ["joined"], name="residual"),
             helper.make_node("LayerNormalization", ["joined", "g", "b"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w2"], ["y"], name="proj")]
    inits = [_init("w1", rng.normal(0, 0.3, (d, d)).astype(np.float32)), _init("b1", rng.normal(0, 0.1, d).astype(np.float32)),
             _init("g", gamma), _init("b", np.zeros(d, np.float32)),
             _init("w2", rng.normal(0, 0.3, (d, d)).astype(np.float32))]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", d])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", d])], inits, opset=18)


def _loud_rows(n: int, seed: int, d: int = 16, t: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    loud = np.ones(d, np.float32)
    loud[:2] = 30.0  # two outlier channels of the residual stream
    return [{"x": (rng.normal(0, 1, (1, t, d)) * loud).astype(np.float32)} for _ in range(n)]


def test_ort_cpu_leaves_float_the_results_only_float_ops_read(tmp_path):
    """The residual and bias Adds feed only a float LayerNormalization: no Q/DQ on them
    (it would round the outlier-dominated sum on one scale and run nothing in integer
    arithmetic), and the MatMul before them keeps integer inputs with a float output
    (MatMulIntegerToFloat); the LayerNorm's output, which the next MatMul reads, and that
    MatMul's inputs are int8.  A target file that turns the rule off quantizes every Add."""
    model, calib, held_out = _post_ln_block(), _loud_rows(8, 0), _loud_rows(4, 1)
    result = quantize_model(model, calib, "min_max_asym", target="ort-cpu-x86", show_progress=False)
    quantized = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "ln"}  # not m1, biased, joined, nor the graph output y
    fusion = result.summary["fusion"]
    assert fusion["integer_nodes"] == fusion["quantized_nodes"] == 2  # dense and proj
    assert fusion["onnxruntime_ops"].get("com.microsoft:MatMulIntegerToFloat", 0) == 2
    path = tmp_path / "every-add.toml"
    path.write_text('base = "ort-cpu-x86"\nname = "every-add"\n[placement]\nfloat_when_unread = false\n'
                    'float_output_ops = []\n')
    every = quantize_model(model, calib, "min_max_asym", target=str(path), show_progress=False)
    assert {"m1", "biased", "joined"} <= {n.input[0] for n in every.model.graph.node if n.op_type == "QuantizeLinear"}
    ours = min(sqnr_db(run(model, s), run(result.model, s)) for s in held_out)
    theirs = min(sqnr_db(run(model, s), run(every.model, s)) for s in held_out)
    assert ours > theirs + 1.5, (ours, theirs)  # measured: 23.2 vs 20.8 dB
    # With a static input shape onnxruntime fuses MatMul + bias Add into a float Gemm first:
    # the MatMul then keeps its output Q (QLinearMatMul), and nothing runs in float.
    static = quantize_model(model, calib, "min_max_asym", target="ort-cpu-x86", input_shapes={"x": (1, 12, 16)},
                            show_progress=False)
    assert {n.input[0] for n in static.model.graph.node if n.op_type == "QuantizeLinear"} == {"x", "ln", "m1"}
    ops = static.summary["fusion"]["onnxruntime_ops"]
    assert "Gemm" not in ops and ops.get("QLinearMatMul", 0) == 1, ops
    # an output the deployment reads as an integer (the model editor's) keeps its Q/DQ
    kept = quantize_model(model, calib, "min_max_asym", target="ort-cpu-x86", integer_outputs=["y"],
                          show_progress=False)
    assert next(n for n in kept.model.graph.node if "y" in n.output).op_type == "DequantizeLinear"
    assert next(n for n in result.model.graph.node if "y" in n.output).op_type == "MatMul"


def test_an_embedding_table_read_only_by_float_ops_is_still_stored_as_int8():
    """Gather -> Add -> LayerNormalization: nothing integer reads the rows, but the table is
    most of a text encoder's file; it stays an int8 initializer behind a DequantizeLinear."""
    rng = np.random.default_rng(41)
    vocab, d = 500, 16
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed"),
             helper.make_node("Add", ["rows", "pos"], ["summed"], name="add_pos"),
             helper.make_node("LayerNormalization", ["summed", "g", "b"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w"], ["y"], name="proj")]
    inits = [_init("table", rng.normal(0, 1, (vocab, d)).astype(np.float32)),
             _init("pos", rng.normal(0, 0.1, (1, 8, d)).astype(np.float32)),
             _init("g", np.ones(d, np.float32)), _init("b", np.zeros(d, np.float32)),
             _init("w", rng.normal(0, 0.3, (d, d)).astype(np.float32))]
    model = make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, d])], inits, opset=18)
    samples = [{"ids": rng.integers(0, vocab, (1, 8)).astype(np.int64)} for _ in range(8)]
    result = quantize_model(model, samples, target="ort-cpu-x86", show_progress=False)
    tables = [i for i in result.model.graph.initializer if list(i.dims) == [vocab, d]]
    assert len(tables) == 1 and tables[0].data_type in (TensorProto.INT8, TensorProto.UINT8)
    x = samples[0]
    assert sqnr_db(run(model, x), run(result.model, x)) > 25
