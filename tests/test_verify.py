"""Written-model checks: determinism, validity (checker + onnxruntime) and fidelity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import (
    branchy_model,
    conv_affine_model,
    conv_bn_relu_model,
)
from conftest import SAMPLE_CALIB, SAMPLE_MODEL, run
from corpus import invoke, save_model
from test_input_checks import _if_model

from quantizer import (
    quantize_model,
)
from quantizer.model_io import save_model_atomic
from quantizer.verify import check_emitted, sqnr_db

RNG = np.random.default_rng(6)
SAMPLE = np.load(sorted(SAMPLE_CALIB.glob("*.npy"))[0])  # float32[1, 1, 8, 8], input 'input'


# -- determinism --------------------------------------------------------------------------

def test_byte_identical_output_across_processes(tmp_path):
    """Two processes with different hash seeds, same inputs and options -> same bytes."""
    if_model = save_model(_if_model(), tmp_path, "if.onnx")
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
    fidelity = json.loads(report.read_text())["fidelity"]
    checked = [p.name for p in sorted(SAMPLE_CALIB.glob("*.npy"))[:4]]  # --fidelity-samples default 4
    assert fidelity["samples"] == checked and fidelity["sample"] in checked
    assert "below --min-sqnr 200 dB" in warning[0] and f"sample {fidelity['sample']} (the worst of 4 samples)" in warning[0]
    assert "note: warning: output 'logits'" in result.stdout
    # the reported SQNR is the worst of the four samples, computed here independently
    each = {name: sqnr_db(run(SAMPLE_MODEL, {"input": np.load(SAMPLE_CALIB / name)}),
                          run(tmp_path / "q.onnx", {"input": np.load(SAMPLE_CALIB / name)})) for name in checked}
    worst = min(each, key=each.get)
    assert fidelity["sample"] == worst and abs(fidelity["sqnr_db"]["logits"] - each[worst]) < 0.01
    assert 15 < fidelity["sqnr_db"]["logits"] < 200 and (tmp_path / "q.onnx").exists()


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
