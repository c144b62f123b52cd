"""Bad calibration data through the CLI and the API: one line, exit 4 (or 2), nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import (
    calibration_folder,
    two_input_model,
)
from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from corpus import DATA, assert_clean_failure, invoke, save_model

from quantizer import (
    CalibrationDataError,
    UsageError,
    quantize_model,
)

RNG = np.random.default_rng(6)
SAMPLE = np.load(sorted(SAMPLE_CALIB.glob("*.npy"))[0])  # float32[1, 1, 8, 8], input 'input'


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
    "other_kinds": (SAMPLE_MODEL, _folder({"a.jpg": b"\xff\xd8", "notes.txt": b"hi"}), "cannot read calibration image a.jpg"),
    "no_arrays": (SAMPLE_MODEL, _folder({"notes.txt": b"hi"}), "no .npy or .npz calibration files"),
    "data_is_a_file": (SAMPLE_MODEL, lambda t: SAMPLE_MODEL, "calibration path is not a folder"),
    "corrupt_npy": (SAMPLE_MODEL, _folder({"a.npy": b"garbage"}), "cannot read calibration file a.npy: not a .npy file"),
    "npz_missing_input": (two_input_model(), _folder({"s.npz": {"a": TWO["a"]}}), "s.npz: missing input(s) b"),
    "npz_extra_input": (two_input_model(), _folder({"s.npz": {**TWO, "c": TWO["a"]}}), "s.npz: unknown input(s) c"),
    "npy_for_two_inputs": (two_input_model(), _folder({"s.npy": TWO["a"]}), ".npy files fit single-input models only"),
    "wrong_rank": (SAMPLE_MODEL, _folder({"a.npy": SAMPLE[0]}), "input 'input' expects float32[?,1,8,8], given float32[1,8,8] (wrong rank)"),
    "wrong_shape": (SAMPLE_MODEL, _folder({"a.npy": np.zeros((1, 1, 9, 8), np.float32)}), "(wrong shape)"),
    "wrong_dtype": (SAMPLE_MODEL, _folder({"a.npy": SAMPLE.astype(np.float64)}), "given float64[1,1,8,8] (wrong dtype); save it as float32: array.astype(np.float32)"),
    "empty_array": (SAMPLE_MODEL, _folder({"a.npy": np.zeros((0, 1, 8, 8), np.float32)}), "input 'input' is empty"),
    "all_nan": (SAMPLE_MODEL, _folder({"a.npy": _nan_sample()}), "NaN/Inf inputs (first: a.npy)"),
    "ort_fails": (two_input_model(), _folder({"s.npz": {"a": TWO["a"], "b": np.zeros((1, 3, 4, 6), np.float32)}}),
                  "onnxruntime failed on calibration sample s.npz: Non-zero status code returned while running Add"),
}


def _model_path(model, tmp_path):
    return model if isinstance(model, Path) else save_model(model, tmp_path, "model.onnx")


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
