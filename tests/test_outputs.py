"""Where output goes: output paths, atomic writes, Ctrl-C, models written with external data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLE_CALIB, SAMPLE_MODEL, run
from corpus import INTERNAL, INTERRUPTED, MODEL, SLOW_CLI, USAGE, assert_clean_failure, invoke, save_model
from onnx import TensorProto, helper, numpy_helper

from quantizer import (
    ModelError,
    model_io,
    quantize_model,
)
from quantizer.errors import InternalError
from quantizer.model_io import load_model, save_model_atomic
from quantizer.verify import check_emitted

RNG = np.random.default_rng(6)
SAMPLE = np.load(sorted(SAMPLE_CALIB.glob("*.npy"))[0])  # float32[1, 1, 8, 8], input 'input'


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
    result = invoke(save_model(model, tmp_path), "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx")
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
