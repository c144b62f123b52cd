"""All three stages on the real sample model: int8 top-1 within 1 point of float."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import SAMPLE_CALIB, SAMPLE_MODEL, run
from quantizer import CalibrationMethod, quantize_model


def top1(model, x, y):
    return float((run(model, {"input": x}).argmax(1) == y).mean())


@pytest.mark.parametrize("method", ["min_max_asym", "min_max_sym"])
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_api_accuracy_within_one_point(digits_test, method, dtype):
    x, y = digits_test
    result = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, method, activation_dtype=dtype, show_progress=False)
    float_top1, int8_top1 = top1(SAMPLE_MODEL, x, y), top1(result.model, x, y)
    assert float_top1 > 0.95
    assert float_top1 - int8_top1 <= 0.01, (float_top1, int8_top1)
    assert result.summary["nodes"]["quantized"] >= 7
    assert result.summary["calibration"]["samples"] == 64


@pytest.mark.parametrize("method", [m.value for m in CalibrationMethod if m.family != "MIN_MAX"])
def test_every_histogram_method_end_to_end(digits_test, method):
    x, y = digits_test
    result = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, method, activation_dtype="uint8", show_progress=False)
    assert top1(SAMPLE_MODEL, x, y) - top1(result.model, x, y) <= 0.02
    assert result.summary["calibration"]["method"] == method.lower()  # as the CLI spells it


def test_python_iterable_dataset_gives_same_model_as_folder():
    samples = [np.load(p) for p in sorted(SAMPLE_CALIB.glob("*.npy"))]
    from_folder = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, show_progress=False)
    from_arrays = quantize_model(SAMPLE_MODEL, samples, show_progress=False)
    from_dicts = quantize_model(SAMPLE_MODEL, ({"input": s} for s in samples), show_progress=False)
    assert from_folder.ranges == from_arrays.ranges == from_dicts.ranges
    assert from_folder.model.SerializeToString(deterministic=True) == from_arrays.model.SerializeToString(deterministic=True)


def test_console_script_and_module_entry_points(tmp_path, digits_test):
    x, y = digits_test
    out = tmp_path / "digits_int8.onnx"
    report = tmp_path / "report.json"
    done = subprocess.run(
        ["quantize", str(SAMPLE_MODEL), "--calib", "MIN_MAX_ASYM", "--data", str(SAMPLE_CALIB),
         "-o", str(out), "--report", str(report)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "quantized" in done.stdout and "time:" in done.stdout
    data = json.loads(report.read_text())
    assert data["nodes"]["quantized"] >= 7
    stages = {"optimize", "calibrate", "quantize"}
    assert stages <= set(data["seconds"]) <= stages | {"report", "write"}
    ran = [s["step"] for s in data["steps"]]
    assert ran[:3] == ["load", "refuse_quantized", "check_outputs"] and "write_model" in ran  # summarize sees those before it
    assert data["size_bytes"]["after"] == out.stat().st_size < data["size_bytes"]["before"]
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert top1(SAMPLE_MODEL, x, y) - top1(out, x, y) <= 0.01

    opt = tmp_path / "opt.onnx"
    done = subprocess.run([sys.executable, "-m", "quantizer", "optimize", str(SAMPLE_MODEL), "-o", str(opt)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(opt).graph.node)
