"""Reliability (issue 6): a bad-input corpus through the CLI and the API, atomic output,
determinism across processes, emitted-model validity and fidelity, subgraphs, custom
ops, Ctrl-C and external data.

Every corpus case is generated here.  For each: one line on stderr naming the problem,
the documented exit code of its class, no traceback, and nothing left in the output
directory (not even a temporary file).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import (
    _init,
    branchy_model,
    calibration_folder,
    conv_affine_model,
    conv_bn_relu_model,
    two_input_model,
)
from click.testing import CliRunner
from conftest import SAMPLE_CALIB, SAMPLE_MODEL, run
from onnx import TensorProto, helper, numpy_helper
from quantizer.cli.main import cli

from quantizer import (
    CalibrationDataError,
    ModelError,
    QuantizerError,
    UsageError,
    model_io,
    quantize_model,
)
from quantizer.errors import InternalError
from quantizer.model_io import load_model, save_model_atomic
from quantizer.verify import check_emitted, sqnr_db

INTERNAL, USAGE, MODEL, DATA, INTERRUPTED = 1, 2, 3, 4, 130
RNG = np.random.default_rng(6)
SAMPLE = np.load(sorted(SAMPLE_CALIB.glob("*.npy"))[0])  # float32[1, 1, 8, 8], input 'input'


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_failure(result, code, text, out_dir: Path):
    """One stderr line with ``text``, exit ``code``, no traceback, nothing in ``out_dir``."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert lines[0].startswith(("error: ", "internal error: ", "interrupted"))
    assert "Traceback" not in result.output and not result.stdout.strip()
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert list(out_dir.iterdir()) == [], list(out_dir.iterdir())


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


def _save(model, tmp_path, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
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
    return _save(helper.make_model(graph), tmp_path)


def _opset(version):
    def make(tmp_path):
        model = onnx.load(SAMPLE_MODEL)
        model.opset_import[0].version = version
        return _save(model, tmp_path)
    return make


def _removed_op(tmp_path):
    """An opset-1 model with an experimental op (Crop) that the converter cannot carry."""
    graph = helper.make_graph([helper.make_node("Crop", ["input"], ["y"], border=[0, 0, 1, 1])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 7, 7])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)])
    model.ir_version = 3
    return _save(model, tmp_path)


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
    "unknown_op": (lambda t: _save(_single_conv_graph([helper.make_node("Frobnicate", ["c"], ["g"])]), t),
                   "not valid ONNX (onnx.checker: No Op registered for Frobnicate"),
    "custom_op_not_in_ort": (
        lambda t: _save(_single_conv_graph([helper.make_node("Frob", ["c"], ["g"], domain="my.ops")], ["my.ops"]), t),
        "onnxruntime cannot load the model: "),
    "undefined_tensor": (lambda t: _save(_single_conv_graph([helper.make_node("Add", ["c", "nowhere"], ["g"])]), t),
                         "the input model is not valid ONNX (onnx.checker: Nodes in a graph must be topologically"),
    "tensor_defined_twice": (
        lambda t: _save(_single_conv_graph([helper.make_node("Relu", ["c"], ["g"]), helper.make_node("Neg", ["c"], ["g"])]), t),
        "the input model is not valid ONNX (onnx.checker: Graph must be in single static assignment"),
    "bad_attribute": (lambda t: _save(_single_conv_graph([helper.make_node("Relu", ["c"], ["g"], alpha=1.0)]), t),
                      "Unrecognized attribute: alpha for operator Relu"),
}


def test_output_without_shape_gets_one_from_shape_inference(tmp_path):
    model = _single_conv_graph([helper.make_node("Relu", ["c"], ["g"])], out_shape=None)
    result = invoke(_save(model, tmp_path), "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx")
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


# -- calibration data ---------------------------------------------------------------------

def _folder(files):
    """A calibration folder maker: {name: array | dict (npz) | bytes}."""
    return lambda tmp_path: calibration_folder(tmp_path, files)


def _nan_sample():
    sample = SAMPLE.copy()
    sample[...] = np.nan
    return sample


TWO = {"a": np.zeros((1, 3, 4, 5), np.float32), "b": np.zeros((1, 3, 4, 5), np.float32)}
DATA_CASES = {
    # case: (model, folder maker, message)
    "folder_missing": (SAMPLE_MODEL, lambda t: t / "nowhere", "calibration folder not found"),
    "folder_empty": (SAMPLE_MODEL, _folder({}), "no .npy or .npz calibration files"),
    "other_kinds": (SAMPLE_MODEL, _folder({"a.jpg": b"\xff\xd8", "notes.txt": b"hi"}), "no .npy or .npz calibration files"),
    "data_is_a_file": (SAMPLE_MODEL, lambda t: SAMPLE_MODEL, "calibration path is not a folder"),
    "corrupt_npy": (SAMPLE_MODEL, _folder({"a.npy": b"garbage"}), "cannot read calibration file a.npy: not a .npy file"),
    "npz_missing_input": (two_input_model(), _folder({"s.npz": {"a": TWO["a"]}}), "s.npz: missing input(s) b"),
    "npz_extra_input": (two_input_model(), _folder({"s.npz": {**TWO, "c": TWO["a"]}}), "s.npz: unknown input(s) c"),
    "npy_for_two_inputs": (two_input_model(), _folder({"s.npy": TWO["a"]}), ".npy files fit single-input models only"),
    "wrong_rank": (SAMPLE_MODEL, _folder({"a.npy": SAMPLE[0]}), "input 'input' expects float32[?,1,8,8], given float32[1,8,8] (wrong rank)"),
    "wrong_shape": (SAMPLE_MODEL, _folder({"a.npy": np.zeros((1, 1, 9, 8), np.float32)}), "(wrong shape)"),
    "wrong_dtype": (SAMPLE_MODEL, _folder({"a.npy": SAMPLE.astype(np.float64)}), "given float64[1,1,8,8] (wrong dtype)"),
    "empty_array": (SAMPLE_MODEL, _folder({"a.npy": np.zeros((0, 1, 8, 8), np.float32)}), "input 'input' is empty"),
    "all_nan": (SAMPLE_MODEL, _folder({"a.npy": _nan_sample()}), "NaN/Inf inputs (first: a.npy)"),
    "ort_fails": (two_input_model(), _folder({"s.npz": {"a": TWO["a"], "b": np.zeros((1, 3, 4, 6), np.float32)}}),
                  "onnxruntime failed on calibration sample s.npz: Non-zero status code returned while running Add"),
}


def _model_path(model, tmp_path):
    return model if isinstance(model, Path) else _save(model, tmp_path, "model.onnx")


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_calibration_data_cli(tmp_path, case):
    model, make, text = DATA_CASES[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = invoke(_model_path(model, tmp_path), "--data", make(tmp_path), "-o", out_dir / "q.onnx")
    assert_clean_failure(result, DATA, text, out_dir)
    assert "/onnxruntime_src/" not in result.stderr


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_calibration_data_api(tmp_path, case):
    model, make, text = DATA_CASES[case]
    with pytest.raises(CalibrationDataError) as info:
        quantize_model(model if isinstance(model, Path) else model, make(tmp_path), show_progress=False)
    assert text in str(info.value) and "\n" not in str(info.value) and info.value.exit_code == DATA


def test_some_nan_values_are_a_warning_not_an_error(tmp_path):
    sample = SAMPLE.copy()
    sample[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    folder = _folder({"a.npy": sample, "b.npy": SAMPLE})(tmp_path)
    result = invoke(SAMPLE_MODEL, "--data", folder, "-o", tmp_path / "q.onnx")
    assert result.exit_code == 0, result.output
    assert "warning: 3 NaN/Inf values in 'input' were ignored" in result.stdout


def test_calibration_data_of_the_wrong_python_type():
    with pytest.raises(UsageError, match="must be a folder path or an iterable of samples, got int"):
        quantize_model(SAMPLE_MODEL, 5, show_progress=False)


# -- output paths ----------------------------------------------------------------------

def test_output_equal_to_input_even_through_a_symlink(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(SAMPLE_MODEL, model)
    (tmp_path / "link.onnx").symlink_to(model)
    before = sorted(tmp_path.iterdir())
    for out in (model, tmp_path / "link.onnx", tmp_path / "." / "m.onnx"):
        result = invoke(model, "--data", SAMPLE_CALIB, "-o", out)
        assert result.exit_code == USAGE and "output path is the input model" in result.stderr
    assert sorted(tmp_path.iterdir()) == before and model.read_bytes() == SAMPLE_MODEL.read_bytes()


def test_output_directory_missing(tmp_path):
    result = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "no" / "q.onnx")
    assert_clean_failure(result, USAGE, "output directory does not exist", tmp_path)


def test_output_directory_not_writable(tmp_path, monkeypatch):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out_dir else real_access(p, mode))
    result = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out_dir / "q.onnx")
    assert_clean_failure(result, USAGE, "output directory is not writable", out_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_directory_read_only_for_real(tmp_path):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    out_dir.chmod(0o500)
    try:
        assert_clean_failure(invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out_dir / "q.onnx"),
                             USAGE, "not writable", out_dir)
    finally:
        out_dir.chmod(0o700)


def test_write_failure_is_a_usage_error_and_leaves_nothing(tmp_path, monkeypatch):
    """The directory looked writable but the write fails (read-only mount, disk full)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    result = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx")
    assert_clean_failure(result, USAGE, "cannot write", tmp_path)


def test_debug_shows_the_traceback(tmp_path):
    result = invoke(tmp_path / "nope.onnx", "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--debug")
    assert isinstance(result.exception, ModelError)


def test_library_warnings_do_not_reach_stderr(tmp_path):
    """onnx-ir logs a warning for a constant-only output; stderr must stay our one line."""
    graph = helper.make_graph([helper.make_node("Relu", ["c"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array([-1, 1], np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    result = invoke(_save(model, tmp_path), "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx")
    assert result.exit_code == MODEL and result.stderr.count("\n") == 1, result.stderr
    assert "nothing to quantize" in result.stderr


# -- atomic output -----------------------------------------------------------------------

def test_failed_verification_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"previous model")

    def broken(path):
        raise InternalError("the written model fails onnx.checker: simulated")

    monkeypatch.setattr("quantizer.verify.check_emitted", broken)
    result = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out)
    assert result.exit_code == INTERNAL and "simulated" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"] and out.read_bytes() == b"previous model"


def test_invalid_model_is_never_written(tmp_path):
    model = onnx.load(SAMPLE_MODEL)
    model.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(InternalError, match="fails onnx.checker"):
        save_model_atomic(model, tmp_path / "bad.onnx", verify=check_emitted)
    assert list(tmp_path.iterdir()) == []


# -- Ctrl-C ---------------------------------------------------------------------------

def test_keyboard_interrupt_from_the_dataset_leaves_nothing(tmp_path):
    def samples():
        yield SAMPLE
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(SAMPLE_MODEL, samples(), save_calibration=tmp_path / "state.npz", show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_during_the_post_write_check(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("quantizer.verify.measure_fidelity", interrupt)
    result = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx")
    assert result.exit_code == INTERRUPTED and "interrupted: no output written" in result.stderr
    assert list(tmp_path.iterdir()) == []


SLOW_CLI = textwrap.dedent("""
    import sys, time
    import quantizer.dataset as dataset
    original = dataset.iter_folder

    def slow(folder, specs):
        for index, sample in enumerate(original(folder, specs)):
            if index == 1:
                print("CALIBRATING", file=sys.stderr, flush=True)
            time.sleep(0.05)
            yield sample

    dataset.iter_folder = slow
    from quantizer.cli.main import main
    sys.argv = ["quantize", *sys.argv[1:]]
    main()
""")


def test_sigint_during_calibration_exits_130_and_writes_nothing(tmp_path):
    """A real SIGINT to a real CLI process while it is calibrating."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB),
         "-o", str(out_dir / "q.onnx"), "--save-calibration", str(out_dir / "state.npz")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    before = []
    for line in process.stderr:  # wait until calibration is under way
        if line.strip() == "CALIBRATING":
            break
        before.append(line)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == INTERRUPTED, stderr
    assert not "".join(before).strip() and not stdout.strip()
    assert stderr.strip() == "interrupted: no output written"
    assert list(out_dir.iterdir()) == []


# -- determinism --------------------------------------------------------------------------

def test_byte_identical_output_across_processes(tmp_path):
    """Two processes with different hash seeds, same inputs and options -> same bytes."""
    if_model = _save(_if_model(), tmp_path, "if.onnx")
    jobs = []
    for seed in ("1", "2"):
        for name, model, method in (("digits", SAMPLE_MODEL, "entropy_asym"), ("if", if_model, "percentile_sym")):
            out = tmp_path / f"{name}_{seed}.onnx"
            command = [sys.executable, "-m", "quantizer", str(model), "--data", str(SAMPLE_CALIB), "--calib", method,
                       "-o", str(out), "-q"]
            jobs.append((out, subprocess.Popen(command, env={**os.environ, "PYTHONHASHSEED": seed},
                                               stderr=subprocess.PIPE, text=True)))
    for out, process in jobs:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    for name in ("digits", "if"):
        assert (tmp_path / f"{name}_1.onnx").read_bytes() == (tmp_path / f"{name}_2.onnx").read_bytes()


def test_same_output_in_one_process_regardless_of_output_name(tmp_path):
    for name in ("a.onnx", "b.onnx"):
        assert invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / name, "-q").exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


# -- validity and fidelity ------------------------------------------------------------------

@pytest.mark.parametrize("builder", [conv_bn_relu_model, branchy_model, conv_affine_model])
def test_emitted_models_pass_the_full_check_and_load(tmp_path, builder):
    model = builder()
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    samples = [RNG.normal(size=shape).astype(np.float32) for _ in range(4)]
    result = quantize_model(model, samples, show_progress=False)
    path = tmp_path / "q.onnx"
    save_model_atomic(result.model, path, verify=check_emitted)
    onnx.checker.check_model(str(path), full_check=True)
    assert sqnr_db(run(model, {"x": samples[0]}), run(path, {"x": samples[0]})) > 15


def test_fidelity_warning_below_min_sqnr(tmp_path):
    report = tmp_path / "report.json"
    result = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--min-sqnr", "200",
                    "--report", report)
    assert result.exit_code == 0, result.output  # a warning, not a failure
    warning = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning: output 'logits' of the int8 model has SQNR")
    assert "below --min-sqnr 200 dB" in warning[0] and "sample_000.npy" in warning[0]
    assert "note: warning: output 'logits'" in result.stdout
    fidelity = json.loads(report.read_text())["fidelity"]
    assert fidelity["sample"] == "sample_000.npy" and 15 < fidelity["sqnr_db"]["logits"] < 200
    assert (tmp_path / "q.onnx").exists()


def test_fidelity_quiet_by_default_and_measured_with_integer_io(tmp_path):
    result = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--activation-dtype", "uint8",
                    "--input-range", "input=0,1", "--input-type", "input=uint8", "--output-type", "logits=uint8")
    assert result.exit_code == 0 and not result.stderr.strip(), result.output
    sqnr = float(result.stdout.split("output SQNR logits ")[1].split(" dB")[0])
    assert sqnr > 15  # the integer input/output were (de)quantized with their recorded parameters


def test_fidelity_skipped_without_samples(tmp_path):
    ranges = tmp_path / "ranges.json"
    assert invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "a.onnx", "--save-ranges", ranges).exit_code == 0
    result = invoke(SAMPLE_MODEL, "--ranges", ranges, "-o", tmp_path / "b.onnx")
    assert result.exit_code == 0 and "fidelity check skipped: no calibration samples" in result.stdout


def test_sqnr_edge_cases():
    assert sqnr_db(np.ones(3), np.ones(3)) == float("inf")
    assert sqnr_db(np.zeros(3), np.ones(3)) == float("-inf")
    assert sqnr_db(np.ones(3), np.array([1, np.nan, 1])) == float("-inf")
    assert abs(sqnr_db(np.array([1.0, np.nan]), np.array([0.9, 5.0])) - 20) < 1e-9  # NaN reference ignored


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
    result = invoke(_save(model, tmp_path), "--data", SAMPLE_CALIB, "-o", out, "--report", tmp_path / "r.json")
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


# -- external data (models over 2 GB), with the threshold lowered ---------------------------

def test_large_model_written_with_external_data_next_to_the_output(tmp_path, monkeypatch):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    model = in_dir / "m.onnx"
    shutil.copy(SAMPLE_MODEL, model)
    assert invoke(model, "--data", SAMPLE_CALIB, "-o", out_dir / "small.onnx", "-q").exit_code == 0

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 20_000)  # the sample model is ~100 kB
    result = invoke(model, "--data", SAMPLE_CALIB, "-o", out_dir / "large.onnx")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in in_dir.iterdir()) == ["m.onnx"]  # nothing beside the input
    assert sorted(p.name for p in out_dir.iterdir()) == ["large.onnx", "large.onnx.data", "small.onnx"]
    written = onnx.load(out_dir / "large.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer)
    onnx.checker.check_model(str(out_dir / "large.onnx"), full_check=True)
    assert np.array_equal(run(out_dir / "large.onnx", {"input": SAMPLE}), run(out_dir / "small.onnx", {"input": SAMPLE}))

    # and read back as an input: external data beside the model is loaded
    result = invoke(SAMPLE_MODEL, "--optimize-only", "-o", in_dir / "opt_large.onnx")
    assert result.exit_code == 0 and (in_dir / "opt_large.onnx.data").exists()
    assert load_model(in_dir / "opt_large.onnx").graph.initializer[0].raw_data


def test_save_with_external_data_keeps_the_in_memory_model(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    model = onnx.load(SAMPLE_MODEL)
    before = model.SerializeToString()
    size = save_model_atomic(model, tmp_path / "m.onnx", verify=check_emitted)
    assert model.SerializeToString() == before
    assert size == (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_missing_external_data_is_a_model_error(tmp_path):
    model = onnx.load(SAMPLE_MODEL)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.bin", size_threshold=0)
    (tmp_path / "m.bin").unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_clean_failure(invoke(tmp_path / "m.onnx", "--data", SAMPLE_CALIB, "-o", out_dir / "q.onnx"),
                         MODEL, "cannot read the external data of m.onnx", out_dir)


def test_every_error_class_has_its_documented_code():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for error in (InternalError, UsageError, ModelError, CalibrationDataError):
        assert issubclass(error, QuantizerError)
        assert f"| {error.exit_code} |" in readme and f"`{error.__name__}`" in readme
    assert "| 130 |" in readme
