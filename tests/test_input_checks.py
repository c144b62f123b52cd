"""Bad input models through the CLI and the API: one line, the documented exit code,
nothing written; models with subgraphs and custom ops; the exit code of every error class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import (
    _init,
)
from conftest import SAMPLE_CALIB, SAMPLE_MODEL, run
from corpus import MODEL, assert_clean_failure, invoke, save_model
from onnx import TensorProto, helper

from quantizer import (
    CalibrationDataError,
    ModelError,
    QuantizerError,
    UsageError,
    quantize_model,
)
from quantizer.errors import InternalError
from quantizer.model_io import load_model, save_model_atomic
from quantizer.verify import check_emitted, sqnr_db

RNG = np.random.default_rng(6)
SAMPLE = np.load(sorted(SAMPLE_CALIB.glob("*.npy"))[0])  # float32[1, 1, 8, 8], input 'input'


# -- models for the corpus --------------------------------------------------------------

def _single_conv_graph(middle_nodes, domain_opsets=(), opset=13, out_shape=("N", 4, 4, 4)):
    """input[N,1,8,8] -> Conv -> (middle nodes: c -> g) -> Conv -> y."""
    inits = [_init("w", RNG.normal(size=(4, 1, 3, 3)).astype(np.float32)),
             _init("w2", RNG.normal(size=(4, 4, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"), *middle_nodes,
             helper.make_node("Conv", ["g", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    *(helper.make_opsetid(d, 1) for d in domain_opsets)])
    model.ir_version = 7
    return model


def _quantized_sample(tmp_path):
    path = tmp_path / "already_int8.onnx"
    onnx.save(quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, show_progress=False).model, path)
    return path


def _bytes(content):
    def make(tmp_path):
        path = tmp_path / "m.onnx"
        path.write_bytes(content(tmp_path) if callable(content) else content)
        return path
    return make


def _no_nodes(tmp_path):
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    return save_model(helper.make_model(graph), tmp_path)


def _opset(version):
    def make(tmp_path):
        model = onnx.load(SAMPLE_MODEL)
        model.opset_import[0].version = version
        return save_model(model, tmp_path)
    return make


def _removed_op(tmp_path):
    """An opset-1 model with an experimental op (Crop) that the converter cannot carry."""
    graph = helper.make_graph([helper.make_node("Crop", ["input"], ["y"], border=[0, 0, 1, 1])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 7, 7])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)])
    model.ir_version = 3
    return save_model(model, tmp_path)


MODEL_CASES = {
    "missing": (lambda t: t / "nope.onnx", "model file not found"),
    "directory": (lambda t: t, "is a directory"),
    "empty": (_bytes(b""), "model file is empty"),
    "truncated": (_bytes(SAMPLE_MODEL.read_bytes()[: SAMPLE_MODEL.stat().st_size // 2]), "not an ONNX model"),
    "text": (_bytes(b"name,value\nweights,1\n"), "not an ONNX model"),
    "png": (_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256))), "not an ONNX model"),
    "no_nodes": (_no_nodes, "its graph has no nodes"),
    "already_quantized": (_quantized_sample, "the model is already quantized"),
    "opset_too_new": (_opset(999), "model opset 999 is newer than the installed onnx supports"),
    "opset_unconvertible": (_removed_op, "cannot convert the model from opset 1 to 13: op(s) Crop have no ONNX schema"),
    "unknown_op": (lambda t: save_model(_single_conv_graph([helper.make_node("Frobnicate", ["c"], ["g"])]), t),
                   "not valid ONNX (onnx.checker: No Op registered for Frobnicate"),
    "custom_op_not_in_ort": (
        lambda t: save_model(_single_conv_graph([helper.make_node("Frob", ["c"], ["g"], domain="my.ops")], ["my.ops"]), t),
        "onnxruntime cannot load the model: "),
    "undefined_tensor": (lambda t: save_model(_single_conv_graph([helper.make_node("Add", ["c", "nowhere"], ["g"])]), t),
                         "the input model is not valid ONNX (onnx.checker: Nodes in a graph must be topologically"),
    "tensor_defined_twice": (
        lambda t: save_model(_single_conv_graph([helper.make_node("Relu", ["c"], ["g"]), helper.make_node("Neg", ["c"], ["g"])]), t),
        "the input model is not valid ONNX (onnx.checker: Graph must be in single static assignment"),
    "bad_attribute": (lambda t: save_model(_single_conv_graph([helper.make_node("Relu", ["c"], ["g"], alpha=1.0)]), t),
                      "Unrecognized attribute: alpha for operator Relu"),
}


def test_output_without_shape_gets_one_from_shape_inference(tmp_path):
    model = _single_conv_graph([helper.make_node("Relu", ["c"], ["g"])], out_shape=None)
    result = invoke(save_model(model, tmp_path), "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_cli(tmp_path, case):
    make, text = MODEL_CASES[case]
    (tmp_path / "in").mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model = make(tmp_path / "in")
    assert_clean_failure(invoke(model, "--data", SAMPLE_CALIB, "-o", out_dir / "q.onnx"), MODEL, text, out_dir)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_api(tmp_path, case):
    make, text = MODEL_CASES[case]
    with pytest.raises(ModelError) as info:
        quantize_model(make(tmp_path), SAMPLE_CALIB, show_progress=False)
    assert text in str(info.value) and "\n" not in str(info.value) and info.value.exit_code == MODEL


def test_model_given_as_wrong_python_type():
    with pytest.raises(UsageError, match="model must be a path, bytes or onnx.ModelProto, got int"):
        quantize_model(5, SAMPLE_CALIB)
    with pytest.raises(ModelError, match="cannot parse the given bytes"):
        quantize_model(b"\x08\x07garbage\xff\xff", SAMPLE_CALIB)
    assert load_model(SAMPLE_MODEL.read_bytes()).graph.node  # bytes of a real model load


# -- subgraphs, custom ops ----------------------------------------------------------------

def _if_model():
    """input -> Conv -> If(sum(input) > 0: Relu | Neg) -> Conv -> y."""
    branch = lambda op, out: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["c"], [out], name=f"{op.lower()}_in_branch")], f"{op}_branch", [],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4, 6, 6])])
    return _with_zero(_single_conv_graph([
        helper.make_node("ReduceSum", ["input"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["g"], name="if", then_branch=branch("Relu", "t"),
                         else_branch=branch("Neg", "e")),
    ]))


def _with_zero(model):
    model.graph.initializer.append(_init("zero", np.array(0, np.float32)))
    return model


def _loop_model():
    """input -> Conv -> Loop 3 times (v = v * 0.5 + c) -> Conv -> y."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["v_in", "half"], ["h"]), helper.make_node("Add", ["h", "c"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [_init("half", np.array(0.5, np.float32))])
    model = _single_conv_graph([helper.make_node("Loop", ["trips", "", "c"], ["g"], name="loop", body=body)])
    model.graph.initializer.append(_init("trips", np.array(3, np.int64)))
    return model


def _scan_model():
    """input -> Conv -> Scan over the batch (running sum) -> Conv -> y."""
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "row"], ["acc_out"]), helper.make_node("Identity", ["acc_out"], ["row_out"])],
        "body",
        [helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [4, 6, 6]),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, [4, 6, 6])],
        [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4, 6, 6]),
         helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [4, 6, 6])])
    model = _single_conv_graph([helper.make_node("Scan", ["init", "c"], ["final", "g"], name="scan", body=body,
                                                 num_scan_inputs=1)])
    model.graph.initializer.append(_init("init", np.zeros((4, 6, 6), np.float32)))
    return model


def _branch_ops(model):
    """The op types inside every subgraph of the main graph, by owner node name."""
    return {node.name: [[n.op_type for n in g.node] for g in
                        [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]]
            for node in model.graph.node if any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)}


@pytest.mark.parametrize("builder, owner", [(_if_model, "if"), (_loop_model, "loop"),
                                            (_scan_model, "scan")])
def test_subgraphs_stay_float_and_the_main_graph_is_quantized(tmp_path, builder, owner):
    model = builder()
    onnx.checker.check_model(model, full_check=True)
    out = tmp_path / "q.onnx"
    result = invoke(save_model(model, tmp_path), "--data", SAMPLE_CALIB, "-o", out, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "has subgraphs: " + owner in result.stdout and "inside the subgraphs of 1 If/Loop/Scan" in result.stdout
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["nodes"]["quantized_by_op"]["Conv"] == 2
    assert {"node": owner, "op_type": model.graph.node[-2].op_type, "reason": "has subgraphs"} in summary["nodes"]["float"]
    quantized = onnx.load(out)
    assert "QuantizeLinear" not in str(_branch_ops(quantized))  # subgraphs untouched
    assert sqnr_db(run(model, {"input": SAMPLE}), run(out, {"input": SAMPLE})) > 15


def test_branch_returning_an_outer_value_stays_valid():
    """Identity elimination must not leave a branch returning an outer-scope value."""
    from quantizer import optimize_model

    then_branch = helper.make_graph([helper.make_node("Identity", ["c"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4, 6, 6])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["c"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4, 6, 6])])
    model = _with_zero(_single_conv_graph([
        helper.make_node("ReduceSum", ["input"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["g"], then_branch=then_branch, else_branch=else_branch)]))
    optimized = optimize_model(model)
    onnx.checker.check_model(optimized, full_check=True)
    np.testing.assert_allclose(run(optimized, {"input": SAMPLE}), run(model, {"input": SAMPLE}), rtol=1e-5, atol=1e-5)


def test_only_control_flow_in_the_main_graph_is_refused_clearly(tmp_path):
    then_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 2])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 2])])
    graph = helper.make_graph([helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
                                    helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    with pytest.raises(ModelError, match=r"nothing to quantize: .*1 x has subgraphs.*the 2 nodes inside If/Loop/Scan"):
        quantize_model(model, [{"x": np.ones((1, 2), np.float32), "flag": np.array(True)}], show_progress=False)


def test_custom_domain_op_left_float_and_reported(tmp_path):
    """com.microsoft::Gelu runs in onnxruntime but has no ONNX schema: float, reported."""
    model = _single_conv_graph([helper.make_node("Gelu", ["c"], ["g"], name="gelu", domain="com.microsoft")],
                               ["com.microsoft"])
    result = quantize_model(model, SAMPLE_CALIB, show_progress=False)
    reasons = {f["node"]: f["reason"] for f in result.summary["nodes"]["float"]}
    assert reasons["gelu"] == "custom-domain op com.microsoft::Gelu"
    assert reasons["conv2"].startswith("type of input 'g' is unknown")
    assert any("custom-domain op type(s) stay float: com.microsoft::Gelu" in n for n in result.summary["notes"])
    path = tmp_path / "q.onnx"
    save_model_atomic(result.model, path, verify=check_emitted)
    assert sqnr_db(run(model, {"input": SAMPLE}), run(path, {"input": SAMPLE})) > 15


def _silero(name):
    silero_vad = pytest.importorskip("silero_vad")
    path = Path(silero_vad.__file__).parent / "data" / name
    if not path.exists():
        pytest.skip(f"{name} not shipped by this silero-vad")
    return path


def _vad_calibration(tmp_path, with_sr=True):
    folder = tmp_path / "vad_calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        arrays = {"input": (rng.normal(size=(1, 576)) * 0.1).astype(np.float32), "state": np.zeros((2, 1, 128), np.float32)}
        np.savez(folder / f"s{i}.npz", **arrays, **({"sr": np.array(16000, np.int64)} if with_sr else {}))
    return folder


def test_silero_vad_all_compute_inside_if_is_refused_clearly(tmp_path):
    model = _silero("silero_vad.onnx")
    before = sorted(model.parent.iterdir())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = invoke(model, "--data", _vad_calibration(tmp_path), "-o", out_dir / "vad_int8.onnx")
    assert_clean_failure(result, MODEL, "nothing to quantize: no node of the main graph can run in int8", out_dir)
    assert "has subgraphs" in result.stderr and "export the model without control flow" in result.stderr
    assert sorted(model.parent.iterdir()) == before  # nothing written next to the input


def test_silero_vad_op15_main_graph_quantized(tmp_path):
    model = _silero("silero_vad_16k_op15.onnx")
    out = tmp_path / "vad_int8.onnx"
    result = invoke(model, "--data", _vad_calibration(tmp_path), "-o", out, "--activation-dtype", "uint8")
    assert result.exit_code == 0, result.output
    assert "has subgraphs" in result.stdout and "Conv 6" in result.stdout
    onnx.checker.check_model(str(out), full_check=True)


def test_every_error_class_has_its_documented_code():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for error in (InternalError, UsageError, ModelError, CalibrationDataError):
        assert issubclass(error, QuantizerError)
        assert f"| {error.exit_code} |" in readme and f"`{error.__name__}`" in readme
    assert "| 130 |" in readme
