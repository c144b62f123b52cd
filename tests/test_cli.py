"""CLI errors: one line, a documented exit code, no traceback, no output file."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from builders import two_input_model
from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from quantizer.cli.main import cli

USAGE, MODEL, DATA = 2, 3, 4


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, code, text):
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and text in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out.onnx"


def test_missing_model(tmp_path, out):
    r = invoke(tmp_path / "nope.onnx", "--data", SAMPLE_CALIB, "-o", out)
    assert_one_line_error(r, MODEL, "model file not found")
    assert not out.exists()


@pytest.mark.parametrize("content, text", [(b"", "model file is empty"), (b"\x08\x07garbage\xff\xff", "not an ONNX model")])
def test_not_an_onnx_model(tmp_path, out, content, text):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    assert_one_line_error(invoke(bad, "--data", SAMPLE_CALIB, "-o", out), MODEL, text)
    assert not out.exists()


def test_model_is_a_directory(tmp_path, out):
    assert_one_line_error(invoke(tmp_path, "--data", SAMPLE_CALIB, "-o", out), MODEL, "is a directory")


def test_no_calibration_files(tmp_path, out):
    empty = tmp_path / "calib"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    assert_one_line_error(invoke(SAMPLE_MODEL, "--data", empty, "-o", out), DATA, "no .npy or .npz calibration files")
    assert_one_line_error(invoke(SAMPLE_MODEL, "--data", tmp_path / "missing", "-o", out), DATA, "calibration folder not found")
    assert not out.exists()


@pytest.mark.parametrize(
    "array, text",
    [
        (np.zeros((1, 1, 8, 8), np.float64), "input 'input' expects float32[?,1,8,8], given float64[1,1,8,8]"),
        (np.zeros((1, 1, 9, 8), np.float32), "input 'input' expects float32[?,1,8,8], given float32[1,1,9,8] (wrong shape)"),
        (np.zeros((1, 8, 8), np.float32), "(wrong rank)"),
    ],
)
def test_calibration_array_that_does_not_fit(tmp_path, out, array, text):
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "a.npy", array)
    r = invoke(SAMPLE_MODEL, "--data", calib, "-o", out)
    assert_one_line_error(r, DATA, text)
    assert "a.npy" in r.output
    assert not out.exists()


def test_npz_with_wrong_input_name(tmp_path, out):
    import onnx

    model = tmp_path / "two.onnx"
    onnx.save(two_input_model(), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "s.npz", a=np.zeros((1, 3, 4, 5), np.float32), c=np.zeros((1, 3, 4, 5), np.float32))
    assert_one_line_error(invoke(model, "--data", calib, "-o", out), DATA, "missing input(s) b; unknown input(s) c")


def test_refuses_to_overwrite_input(tmp_path):
    import shutil

    model = tmp_path / "m.onnx"
    shutil.copy(SAMPLE_MODEL, model)
    before = model.read_bytes()
    assert_one_line_error(invoke(model, "--data", SAMPLE_CALIB, "-o", model), USAGE, "output path is the input model")
    assert model.read_bytes() == before


def test_missing_output_directory(tmp_path):
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "no" / "out.onnx")
    assert_one_line_error(r, USAGE, "output directory does not exist")


def test_unknown_method(out):
    assert_one_line_error(invoke(SAMPLE_MODEL, "--calib", "kl", "--data", SAMPLE_CALIB, "-o", out), USAGE, "unknown calibration method 'kl'")
    assert not out.exists()


def test_bad_percentile(out):
    r = invoke(SAMPLE_MODEL, "--calib", "percentile_sym", "--percentile", "0", "--data", SAMPLE_CALIB, "-o", out)
    assert_one_line_error(r, USAGE, "--percentile must be in (0, 100]")


def test_bad_input_shape_option(out):
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out, "--input-shape", "input")
    assert_one_line_error(r, USAGE, "--input-shape expects NAME=D1,D2")
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out, "--input-shape", "input=1,x,8,8")
    assert_one_line_error(r, USAGE, "--input-shape expects NAME=D1,D2")
    assert not out.exists()


@pytest.mark.parametrize("form", ["input=1,1,8,8", "input:1,1,8,8"])
def test_input_shape_takes_name_equals_dims_like_every_option(out, form):
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out, "--input-shape", form, "-q")
    assert r.exit_code == 0, r.output
    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 8, 8]


def test_success_writes_summary_and_fixed_shape(out):
    r = invoke(SAMPLE_MODEL, "--calib", "min_max_sym", "--data", SAMPLE_CALIB, "-o", out,
               "--input-shape", "input:1,1,8,8", "--activation-dtype", "uint8")
    assert r.exit_code == 0, r.output
    assert "left float" not in r.output  # every node of the sample model is quantized
    assert "Relu/Clip folded" in r.output and out.exists()


def test_optimize_only(out):
    r = invoke(SAMPLE_MODEL, "--optimize-only", "-o", out)
    assert r.exit_code == 0 and out.exists()


def test_optimize_with_a_target_applies_its_rewrites(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("HardSigmoid", ["x"], ["y"], name="hs")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = tmp_path / "hs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    plain, lowered = tmp_path / "plain.onnx", tmp_path / "lowered.onnx"
    assert invoke("optimize", model, "-o", plain).exit_code == 0
    r = invoke("optimize", model, "-o", lowered, "--target", "ort-cpu-x86")
    assert r.exit_code == 0, r.output
    assert [n.op_type for n in onnx.load(plain).graph.node] == ["HardSigmoid"]
    assert sorted(n.op_type for n in onnx.load(lowered).graph.node) == ["Add", "Clip", "Mul"]
    bad = invoke("optimize", model, "-o", tmp_path / "x.onnx", "--target", "nope")
    assert bad.exit_code == 2 and "unknown target 'nope'" in bad.stderr


def test_the_summary_says_when_auto_keeps_its_per_tensor_choice_on_a_near_tie():
    from quantizer import quantize_model
    from quantizer.cli.text import format_summary

    summary = dict(quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, "auto").summary)  # a Summary builds its parts on access
    summary["calibration"] = dict(summary["calibration"])
    summary["calibration"]["auto"].update(picked="per-tensor choice",
                                          output_sqnr_db={"per-tensor choice": 15.24, "sqnr_asym": 15.34})
    line = next(x for x in format_summary(summary, None).splitlines() if x.strip().startswith("auto:"))
    assert line.strip() == ("auto: per-tensor choice (15.2 dB output SQNR on the accuracy samples; sqnr_asym 15.3 dB; "
                            "sqnr_asym is higher but within the spread over the samples)")
    summary["calibration"]["auto"].update(picked="sqnr_asym")
    line = next(x for x in format_summary(summary, None).splitlines() if x.strip().startswith("auto:"))
    assert "spread" not in line and line.strip().startswith("auto: sqnr_asym (15.3 dB")
