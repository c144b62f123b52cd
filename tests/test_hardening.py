"""Hostile and careless inputs: never a silently wrong model, output paths that are not
plain files, one file under two names, every written file atomic, SIGTERM, and the model
and option classes a wider corpus broke on.  Each case checks the exit code, one line,
no traceback, nothing left behind and the input unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import _init
from conftest import SAMPLE_CALIB, SAMPLE_MODEL, sqnr_db
from corpus import INTERRUPTED, MODEL, SLOW_CLI, USAGE, assert_clean_failure, invoke
from onnx import TensorProto, helper
from quantizer.cli.main import main

from quantizer import ModelError, UsageError, quantize_model
from quantizer import pipeline as pipeline_module
from quantizer.errors import InternalError
from quantizer.model_io import save_model_atomic
from quantizer.verify import Reference, WrittenModelCheck

RNG = np.random.default_rng(7)


def _declared_output_model() -> onnx.ModelProto:
    """y = Reshape(relu(x @ w), [Shape(t)[0], -1]) where the exporter declared graph output
    t as [1, 8] although its batch is dynamic: folding Shape(t) from that claim turns the
    Reshape target into the constant [1, -1] and y's shape (N, 8) into (1, 8N)."""
    w = RNG.normal(size=(8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"),
        helper.make_node("Relu", ["t"], ["r"], name="relu"),
        helper.make_node("Shape", ["t"], ["s"], name="shape"),
        helper.make_node("Slice", ["s", "zero", "one"], ["s0"], name="slice"),
        helper.make_node("Concat", ["s0", "minus1"], ["target"], axis=0, name="cat"),
        helper.make_node("Reshape", ["r", "target"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 8])],
        [_init("w", w), _init("zero", np.array([0], np.int64)), _init("one", np.array([1], np.int64)),
         _init("minus1", np.array([-1], np.int64))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def _run_plain(model, feed):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


# -- silent wrong output ---------------------------------------------------------------

def test_a_wrongly_declared_output_shape_never_changes_the_function():
    model = _declared_output_model()
    samples = [RNG.normal(size=(5, 8)).astype(np.float32) for _ in range(16)]
    result = quantize_model(model, samples, show_progress=False)
    for batch in (5, 22):
        x = RNG.normal(size=(batch, 8)).astype(np.float32)
        want, got = _run_plain(model, {"x": x}), _run_plain(result.model, {"x": x})
        assert got["y"].shape == want["y"].shape == (batch, 8)
        assert sqnr_db(want["y"], got["y"]) > 20


def test_a_stage1_that_changes_outputs_falls_back_then_refuses(monkeypatch):
    samples = [RNG.normal(size=(1, 1, 8, 8)).astype(np.float32) for _ in range(4)]
    real = pipeline_module.optimize_model

    def breaks_when_optimizing(model, shapes=None, *, conservative=False, **options):
        out = real(model, shapes, conservative=conservative, **options)
        if not conservative:  # a rewrite gone wrong: the first Conv's weights doubled
            w = next(i for i in out.graph.initializer if len(i.dims) == 4)
            w.CopyFrom(onnx.numpy_helper.from_array(2 * onnx.numpy_helper.to_array(w), w.name))
        return out

    monkeypatch.setattr(pipeline_module, "optimize_model", breaks_when_optimizing)
    result = quantize_model(SAMPLE_MODEL, samples, show_progress=False)
    assert any("quantized the model without them" in n for n in result.summary["notes"])
    assert any(s["step"] == "verify_stage1" and "fell back" in s["changed"] for s in result.summary["steps"])
    x = samples[0]
    want, got = _run_plain(onnx.load(SAMPLE_MODEL), {"input": x}), _run_plain(result.model, {"input": x})
    assert np.abs(got["logits"] - want["logits"]).max() < 0.25 * np.abs(want["logits"]).max()

    def always_broken(model, shapes=None, *, conservative=False, **options):
        out = real(model, shapes, conservative=conservative)
        w = next(i for i in out.graph.initializer if len(i.dims) == 4)
        w.CopyFrom(onnx.numpy_helper.from_array(2 * onnx.numpy_helper.to_array(w), w.name))
        return out

    monkeypatch.setattr(pipeline_module, "optimize_model", always_broken)
    with pytest.raises(ModelError, match="stage 1 changes the model's output 'logits'.*even without optimizations"):
        quantize_model(SAMPLE_MODEL, samples, show_progress=False)


def test_a_broken_int8_output_is_an_error_and_nothing_is_written(tmp_path):
    int8 = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, show_progress=False).model
    sample = np.load(SAMPLE_CALIB / "sample_000.npy")
    wrong_shape = Reference("sample_000.npy", {"input": sample}, {"logits": np.zeros((1, 11), np.float32)})
    with pytest.raises(InternalError, match="output 'logits' has shape \\(1, 10\\) where the reference gives"):
        save_model_atomic(int8, tmp_path / "q.onnx", verify=WrittenModelCheck(int8, wrong_shape))
    assert list(tmp_path.iterdir()) == []


# -- output paths ----------------------------------------------------------------------

def test_a_device_or_fifo_output_is_refused_and_left_alone(tmp_path):
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", "/dev/null")
    assert r.exit_code == USAGE and "not a regular file" in r.output and os.path.exists("/dev/null")
    assert not os.path.isfile("/dev/null")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", fifo)
    assert_clean_failure(r, USAGE, "exists and is not a regular file", tmp_path, keep=("pipe",))
    assert fifo.is_fifo()
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--report", fifo)
    assert_clean_failure(r, USAGE, "--report path", tmp_path, keep=("pipe",))


def test_the_input_under_another_name_is_never_overwritten(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(SAMPLE_MODEL.read_bytes())
    alias = tmp_path / "alias.onnx"
    os.link(model, alias)  # same inode, another path: what a bind mount also gives
    before = model.read_bytes()
    for option in ("-o", "--report", "--save-ranges", "--save-calibration"):
        args = [model, "--data", SAMPLE_CALIB, option, alias]
        if option != "-o":
            args += ["-o", tmp_path / "q.onnx"]
        r = invoke(*args)
        assert_clean_failure(r, USAGE, "is the input model", tmp_path, keep=("m.onnx", "alias.onnx"))
    assert model.read_bytes() == before == alias.read_bytes()


@pytest.mark.parametrize("pair", [("--report", "-o"), ("--save-ranges", "--report"), ("--save-calibration", "-o"),
                                  ("--save-ranges", "--save-calibration")])
def test_two_outputs_may_not_be_the_same_file(tmp_path, pair):
    target = tmp_path / "same.json"
    args = [SAMPLE_MODEL, "--data", SAMPLE_CALIB]
    for option in pair:
        args += [option, target]
    if "-o" not in pair:
        args += ["-o", tmp_path / "q.onnx"]
    r = invoke(*args)
    assert_clean_failure(r, USAGE, "name the same file", tmp_path)


def test_a_failing_run_leaves_every_target_as_it_was(tmp_path, monkeypatch):
    targets = {name: tmp_path / name for name in ("q.onnx", "r.json", "ranges.json", "state.npz")}
    for path in targets.values():
        path.write_text("old")

    def broken(*args, **kwargs):
        raise InternalError("the int8 model is broken (simulated)")

    monkeypatch.setattr("quantizer.verify.measure_fidelity", broken)
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", targets["q.onnx"], "--report", targets["r.json"],
               "--save-ranges", targets["ranges.json"], "--save-calibration", targets["state.npz"])
    assert_clean_failure(r, 1, "simulated", tmp_path, keep=tuple(targets))
    assert all(path.read_text() == "old" for path in targets.values())


def test_a_long_legal_output_name_works_and_a_too_long_one_is_a_usage_error(tmp_path):
    out = tmp_path / ("m" * 245 + ".onnx")  # 250 bytes: legal on every common file system
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / ("m" * 300 + ".onnx"))
    assert_clean_failure(r, USAGE, "cannot", tmp_path, keep=(out.name,))


def test_a_symlink_loop_as_output_is_a_usage_error(tmp_path):
    loop = tmp_path / "loop.onnx"
    os.symlink(loop, loop)
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", loop)
    assert r.exit_code == USAGE and "Traceback" not in r.output, r.output
    assert os.path.islink(loop)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    import signal

    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB),
         "-o", str(tmp_path / "q.onnx"), "--save-calibration", str(tmp_path / "state.npz")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.strip() == "CALIBRATING":
            break
    time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == INTERRUPTED and "interrupted: no output written" in err
    assert list(tmp_path.iterdir()) == []


# -- models ----------------------------------------------------------------------------

def _duplicate_initializer(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.initializer.append(model.graph.initializer[0])
    return model


def _duplicate_input(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.input.append(model.graph.input[0])
    return model


@pytest.mark.parametrize("damage, text", [(_duplicate_initializer, "initializer name(s)"),
                                          (_duplicate_input, "graph input name(s) 'input'")])
def test_ambiguous_names_are_model_errors(tmp_path, damage, text):
    path = tmp_path / "m.onnx"
    onnx.save(damage(onnx.load(SAMPLE_MODEL)), path)
    r = invoke(path, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx")
    assert_clean_failure(r, MODEL, text, tmp_path, keep=("m.onnx",))


def test_an_output_that_is_an_input_keeps_its_name():
    w = RNG.normal(size=(4, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])], [_init("w", w)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    samples = [RNG.normal(size=(1, 1, 8, 8)).astype(np.float32) for _ in range(4)]
    result = quantize_model(model, samples, show_progress=False).model
    assert [i.name for i in result.graph.input] == ["x"] and [o.name for o in result.graph.output] == ["y", "x"]
    out = _run_plain(result, {"x": samples[0]})
    np.testing.assert_array_equal(out["x"], samples[0])  # passed through, not requantized


# -- options and results ----------------------------------------------------------------

def test_ranges_for_unknown_tensors_only_are_refused_not_a_float_copy(tmp_path):
    ranges = tmp_path / "ranges.json"
    ranges.write_text('{"nope": [0, 1]}')
    r = invoke(SAMPLE_MODEL, "--ranges", ranges, "-o", tmp_path / "q.onnx")
    assert_clean_failure(r, MODEL, "nothing to quantize", tmp_path, keep=("ranges.json",))


def test_infinite_ranges_and_nan_floors_are_refused(tmp_path):
    with pytest.raises(UsageError, match="must be finite"):
        quantize_model(SAMPLE_MODEL, None, ranges={"input": [float("-inf"), 1.0]}, show_progress=False)
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--min-sqnr", "nan")
    assert_clean_failure(r, USAGE, "--min-sqnr must be a number, got nan", tmp_path)


def test_an_eval_script_calling_sys_exit_is_an_error(tmp_path):
    script = tmp_path / "eval.py"
    script.write_text("import sys\ndef evaluate(path):\n    sys.exit(0)\n")
    r = invoke("tune", SAMPLE_MODEL, "--data", SAMPLE_CALIB, "--eval", script, "-o", tmp_path / "q.onnx")
    assert_clean_failure(r, USAGE, "evaluate() called sys.exit(0)", tmp_path, keep=("eval.py",))


@pytest.mark.parametrize("args, text", [
    (["--no-such-option"], "No such option"),
    (["--percentile", "lots"], "'lots' is not a valid float"),
    (["tune", "--max-trials", "x"], "'x' is not a valid integer"),
])
def test_click_usage_errors_are_one_line(capsys, args, text):
    model = [str(SAMPLE_MODEL)] if args[0] != "tune" else []
    argv = [*args[:1], *model, *args[1:]] if args[0] == "tune" else [*model, *args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == USAGE and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0]


def test_names_with_newlines_stay_on_one_line(tmp_path):
    out = tmp_path / "two\nlines" / "q.onnx"
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out)
    assert_clean_failure(r, USAGE, "output directory does not exist", tmp_path)
    assert "two\\nlines" in r.output


def _conv_model(**attributes) -> onnx.ModelProto:
    w = np.random.default_rng(3).normal(size=(4, 2, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attributes)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("w", w)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize("auto_pad, strides, dilations, pads", [
    ("SAME_UPPER", [1, 1], [2, 2], [2, 2, 2, 2]),   # effective kernel 5: 4 pads, not 2
    ("SAME_LOWER", [1, 1], [3, 1], [3, 1, 3, 1]),   # 6 and 2 pads, split evenly
    ("SAME_UPPER", [2, 2], [2, 2], [2, 2, 2, 2]),   # 9 -> 5 outputs: (5-1)*2 + 5 - 9 = 4 pads
    ("SAME_LOWER", [2, 2], [1, 1], [1, 1, 1, 1]),
    ("SAME_LOWER", [1, 1], [1, 1], [1, 1, 1, 1]),
    ("SAME_UPPER", [2, 2], [1, 1], [1, 1, 1, 1]),
])
def test_same_auto_pad_with_dilations_becomes_the_right_explicit_pads(auto_pad, strides, dilations, pads):
    from quantizer import optimize_model

    model = _conv_model(auto_pad=auto_pad, strides=strides, dilations=dilations)
    conv = optimize_model(model).graph.node[0]
    got = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    explicit = _conv_model(strides=strides, dilations=dilations, pads=got["pads"])
    x = RNG.normal(size=(1, 2, 9, 9)).astype(np.float32)
    y = _run_plain(explicit, {"x": x})["y"]
    assert got["auto_pad"] in (b"NOTSET", "NOTSET")
    assert y.shape[2:] == tuple(-(-9 // s) for s in strides)  # SAME: ceil(size / stride)
    assert list(got["pads"]) == pads


def test_odd_same_pads_go_at_the_end_for_upper_and_the_start_for_lower():
    from quantizer import optimize_model

    for auto_pad, want in (("SAME_UPPER", [0, 0, 1, 1]), ("SAME_LOWER", [1, 1, 0, 0])):
        w = np.ones((1, 1, 2, 2), np.float32)  # an even kernel: one pad per axis, on one side
        graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto_pad, name="c")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("w", w)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 7
        conv = optimize_model(model).graph.node[0]
        pads = next(helper.get_attribute_value(a) for a in conv.attribute if a.name == "pads")
        assert list(pads) == want
        x = RNG.normal(size=(1, 1, 4, 4)).astype(np.float32)
        np.testing.assert_allclose(_run_plain(optimize_model(model), {"x": x})["y"], _run_plain(model, {"x": x})["y"],
                                   rtol=1e-6)


def test_a_model_at_the_newest_onnx_opset_quantizes_into_a_loadable_model(tmp_path):
    from quantizer.runtime import highest_qdq_opset

    newest = onnx.defs.onnx_opset_version()
    model = onnx.load(SAMPLE_MODEL)
    model.opset_import[0].version = newest
    model.ir_version = 11
    path = tmp_path / "newest.onnx"
    onnx.save(model, path)
    r = invoke(path, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "-q")
    assert r.exit_code == 0, r.output
    written = onnx.load(tmp_path / "q.onnx")
    assert written.opset_import[0].version == highest_qdq_opset(newest) <= newest
    ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])


def test_an_opset_onnxruntime_cannot_quantize_at_is_converted_down_or_refused(tmp_path, monkeypatch):
    from quantizer import optimize as optimize_module

    monkeypatch.setattr(optimize_module, "highest_qdq_opset", lambda upto: 17)
    model = onnx.load(SAMPLE_MODEL)
    model.opset_import[0].version = 21
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = quantize_model(path, SAMPLE_CALIB, show_progress=False)
    assert result.model.opset_import[0].version == 17

    def cannot(*args, **kwargs):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", cannot)
    r = invoke(path, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx")
    assert_clean_failure(r, MODEL, "runs QuantizeLinear only up to opset 17", tmp_path, keep=("m.onnx",))


def test_a_sparse_constant_is_read_as_its_dense_value():
    values = helper.make_tensor("c", TensorProto.FLOAT, [3], [1.5, -2.0, 4.0])
    indices = helper.make_tensor("c_indices", TensorProto.INT64, [3, 1], [0, 5, 7])  # [NNZ, rank] form
    sparse = helper.make_sparse_tensor(values, indices, [8])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "c"], ["y"], name="add")]
    nodes.insert(0, helper.make_node("Constant", [], ["c"], sparse_value=sparse, name="const"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [_init("w", RNG.normal(size=(8, 8)).astype(np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    samples = [RNG.normal(size=(2, 8)).astype(np.float32) for _ in range(8)]
    result = quantize_model(model, samples, show_progress=False)
    x = samples[0]
    assert sqnr_db(_run_plain(model, {"x": x})["y"], _run_plain(result.model, {"x": x})["y"]) > 25
    zero_input = {"x": np.zeros((1, 8), np.float32)}  # y = c exactly where the MatMul is 0
    np.testing.assert_allclose(_run_plain(model, zero_input)["y"][0], [1.5, 0, 0, 0, 0, -2.0, 0, 4.0], atol=0.05)
    np.testing.assert_allclose(_run_plain(result.model, zero_input)["y"][0], [1.5, 0, 0, 0, 0, -2.0, 0, 4.0], atol=0.05)


def test_sigterm_during_tune_removes_its_temporary_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "eval.py"
    script.write_text("import os, signal\n"
                      "def evaluate(path):\n"
                      "    assert os.path.exists(path)\n"
                      "    os.kill(os.getpid(), signal.SIGTERM)\n"
                      "    return 1.0\n")
    done = subprocess.run([sys.executable, "-m", "quantizer", "tune", str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB),
                           "--eval", str(script), "-o", str(out / "q.onnx")],
                          capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)}, timeout=120)
    assert done.returncode == INTERRUPTED and "interrupted: no output written" in done.stderr, done.stderr
    # (this sandbox's shell writes a '.ses' marker into TMPDIR: only our folders count)
    assert [p.name for p in scratch.iterdir() if p.is_dir() or "quantize" in p.name] == []
    assert list(out.iterdir()) == []


def test_a_name_with_a_newline_in_a_message_stays_on_one_line(tmp_path):
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--input-type", "in\nput=uint8")
    assert_clean_failure(r, USAGE, "unknown input 'in\\nput'", tmp_path)
