"""The user's workflow around a run: inspect before, strict mode for CI, the CLI's own help."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import onnx
import pytest
from builders import conv_bn_relu_model
from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from corpus import MODEL, USAGE, assert_clean_failure, invoke, save_model

from quantizer import quantize_model
from quantizer.errors import StrictError
from quantizer.inspect import inspect_model
from quantizer.qdq.plan import resolve_exclude

STRICT = 5


# -- inspect -------------------------------------------------------------------------

def test_inspect_names_are_what_exclude_matches_and_decisions_match_a_run():
    result = inspect_model(SAMPLE_MODEL)
    names = [n.name for n in result.nodes]
    run = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB)
    assert sorted(n.name for n in result.nodes if n.decision == "quantized") == sorted(
        run.summary["nodes"]["quantized_names"])
    import onnx_ir as ir
    from quantizer.optimize import optimize_model

    stage1 = ir.from_proto(optimize_model(SAMPLE_MODEL, rewrites=result.target["placement"]["rewrites"]))
    for name in names:  # every listed name is accepted by `exclude` as it is
        matched, unmatched = resolve_exclude(stage1.graph, [name])
        assert matched == {name} and not unmatched
    excluded = inspect_model(SAMPLE_MODEL, exclude=[names[0], "no_such_node"])
    first = next(n for n in excluded.nodes if n.name == names[0])
    assert first.decision == "float" and first.reason == "excluded"
    assert any("'no_such_node' matches no node" in note for note in excluded.notes)
    assert [i.name for i in result.inputs] == ["input"] and result.inputs[0].dtype == "float"


def test_inspect_cli_text_and_json(tmp_path):
    text = invoke("inspect", SAMPLE_MODEL, "--exclude", "conv2")
    assert text.exit_code == 0, text.output
    assert "input  input: float[N,1,8,8]" in text.stdout and "conv2" in text.stdout and "float: excluded" in text.stdout
    data = json.loads(invoke("inspect", SAMPLE_MODEL, "--json", "--target", "tensorrt").stdout)
    assert data["target"]["name"] == "tensorrt"
    assert data["counts"]["quantized"] + data["counts"]["folded"] + data["counts"]["float"] == data["counts"]["optimized"]
    bad = invoke("inspect", tmp_path / "missing.onnx")
    assert_clean_failure(bad, MODEL, "model file not found", tmp_path)


# -- strict --------------------------------------------------------------------------

def test_strict_fails_the_fraction_percentile_run_and_writes_nothing(tmp_path):
    args = (SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--calib", "percentile_sym",
            "--percentile", "0.9999")
    loose = invoke(*args)
    assert loose.exit_code == 0 and "did you mean 99.99?" in loose.stdout  # a note, and a model
    (tmp_path / "q.onnx").unlink()
    strict = invoke(*args, "--strict")
    assert_clean_failure(strict, STRICT, "--percentile 0.9999 is below 1", tmp_path)


def test_strict_fails_on_low_fidelity_over_the_fidelity_samples(tmp_path):
    strict = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--min-sqnr", "200",
                    "--strict", "--fidelity-samples", "2")
    assert_clean_failure(strict, STRICT, "(the worst of 2 samples), below --min-sqnr 200 dB", tmp_path)


def test_strict_fails_an_exclude_pattern_that_matches_nothing(tmp_path):
    strict = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--exclude", "convv1",
                    "--strict")
    assert_clean_failure(strict, STRICT, "--exclude pattern 'convv1' matches no node", tmp_path)


def test_strict_nothing_quantized_keeps_its_documented_code(tmp_path):
    result = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--exclude", "*", "--strict")
    assert_clean_failure(result, MODEL, "nothing", tmp_path)


def test_strict_from_python_checks_fidelity_without_writing_a_file():
    with pytest.raises(StrictError, match="below `min_sqnr_db`"):
        from quantizer import pipeline
        from quantizer.config import CalibrationInputs, Outputs, QuantizationConfig

        ctx = pipeline.new_context(SAMPLE_MODEL, QuantizationConfig(strict=True), CalibrationInputs(SAMPLE_CALIB),
                                   Outputs(min_sqnr_db=200))
        pipeline.run(ctx)
    ok = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, strict=True)  # a good run passes
    assert ok.summary["nodes"]["quantized"] >= 7


def test_strict_without_samples_cannot_check_fidelity(tmp_path):
    ranges = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB).ranges
    with pytest.raises(StrictError, match="fidelity check skipped"):
        quantize_model(SAMPLE_MODEL, ranges=ranges, strict=True)


# -- the report ---------------------------------------------------------------------

def test_report_records_versions_input_hash_target_and_the_cli_method_name(tmp_path):
    report = tmp_path / "r.json"
    result = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx", "--calib", "ENTROPY_SYM",
                    "--report", report, "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["calibration"]["method"] == "entropy_sym"
    assert data["input"] == str(SAMPLE_MODEL)
    assert data["input_sha256"] == hashlib.sha256(SAMPLE_MODEL.read_bytes()).hexdigest()
    assert {"onnx-int8-quantizer", "onnx", "onnxruntime", "onnxscript"} <= set(data["versions"])
    assert data["target"]["requested"] == "ort-cpu"


# -- the CLI teaches itself ---------------------------------------------------------

@pytest.mark.parametrize("typo, command", [("inspct", "inspect"), ("optimise", "optimize"), ("targts", "targets")])
def test_a_mistyped_command_gets_the_nearest_one(capsys, typo, command):
    from quantizer.cli.main import main

    with pytest.raises(SystemExit) as info:
        main([typo, "x.onnx"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == USAGE and len(err) == 1
    assert err[0].startswith(f"error: unknown command '{typo}' (did you mean '{command}'?)")


def test_help_is_a_command_too():
    for args in (("help",), ("--help",)):
        result = invoke(*args)
        assert result.exit_code == 0 and "Commands:" in result.stdout and "inspect" in result.stdout
    sub = invoke("help", "inspect")
    assert sub.exit_code == 0 and "--exclude" in sub.stdout


@pytest.mark.parametrize("name, content, words", [
    ("model.pt", b"PK\x03\x04" + b"\x00" * 60, "looks like a zip archive (a PyTorch checkpoint"),
    ("old.pth", b"\x80\x02}q\x00" + b"\x00" * 60, "a pickled PyTorch checkpoint; export the model with torch.onnx.export"),
    ("m.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 60, "an HDF5 file"),
])
def test_a_file_that_is_not_onnx_says_what_it_looks_like_and_what_to_do(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    result = invoke(path, "--data", SAMPLE_CALIB, "-o", tmp_path / "q.onnx")
    assert_clean_failure(result, MODEL, words, tmp_path, keep=(name,))


def test_shell_completion_offers_methods_and_targets(monkeypatch, capsys):
    from quantizer.cli.main import main

    for words, cword, want in (("quantize run m.onnx --calib ent", "4", {"entropy_asym", "entropy_sym"}),
                               ("quantize m.onnx --target tens", "3", {"tensorrt", "tensorrt-fp8"})):
        monkeypatch.setenv("_QUANTIZE_COMPLETE", "bash_complete")
        monkeypatch.setenv("COMP_WORDS", words)
        monkeypatch.setenv("COMP_CWORD", cword)
        with pytest.raises(SystemExit):
            main([])
        offered = {line.split(",", 1)[1] for line in capsys.readouterr().out.splitlines() if "," in line}
        assert offered == want
