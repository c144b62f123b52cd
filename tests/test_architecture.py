"""The shape of the code: one pipeline, typed configuration, one-way dependencies,
messages that speak of parameters, user node names kept through stage 1."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import onnx
import pytest
from builders import conv_bn_relu_model
from click.testing import CliRunner
from conftest import ROOT, SAMPLE_CALIB, SAMPLE_MODEL
from quantizer.cli.main import cli
from quantizer.cli.text import for_cli

from quantizer import (
    ModelError,
    QuantizationConfig,
    Scope,
    UsageError,
    autotune,
    optimize_model,
    pipeline,
    quantize_model,
)


def _imports(folder: Path) -> set[str]:
    """Absolute imports of every module under ``folder`` (``__main__``, the `python -m`
    launcher of the command line, is not library code)."""
    found = set()
    for path in folder.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return found


def test_calibrators_import_nothing_from_the_quantizer():
    leaked = {m for m in _imports(ROOT / "calibrators") if m.split(".")[0] == "quantizer"}
    assert leaked == set()


def test_quantizer_modules_never_import_the_editor_or_the_cli():
    # The package root names the editor lazily (importlib, for old scripts); no import statement.
    leaked = {m for m in _imports(ROOT / "quantizer") if m.startswith(("quantizer.model_editor", "quantizer.cli"))}
    assert leaked == set()
    for path in (ROOT / "quantizer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert node.module not in ("model_editor", "cli"), path


# Library text may mention a flag only in comments; messages name parameters in backquotes.
FLAG = re.compile(r"""["'f][^"'\n]*?(?<![\w-])--[a-z][a-z-]+""")


@pytest.mark.parametrize("folder", ["quantizer", "calibrators", "model_editor"])
def test_no_cli_flag_text_in_the_library(folder):
    offenders = []
    for path in (ROOT / folder).rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if FLAG.search(code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_the_cli_maps_parameters_to_flags():
    assert for_cli("`exclude` pattern 'x' matches no node") == "--exclude pattern 'x' matches no node"
    assert for_cli("below `min_sqnr_db` 10 dB") == "below --min-sqnr 10 dB"
    assert for_cli("`input_shapes` for 'x'") == "--input-shape for 'x'"


def test_autotune_refuses_an_already_quantized_model_like_quantize(tmp_path):
    quantized = tmp_path / "q.onnx"
    onnx.save(quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, show_progress=False).model, quantized)
    with pytest.raises(ModelError) as from_quantize:
        quantize_model(quantized, SAMPLE_CALIB, show_progress=False)
    with pytest.raises(ModelError) as from_autotune:
        autotune(quantized, SAMPLE_CALIB, lambda model: 1.0, max_trials=1)
    assert "already quantized" in str(from_quantize.value)
    assert str(from_autotune.value) == str(from_quantize.value)


def test_quantize_and_autotune_run_the_same_steps():
    names = [s.name for s in pipeline.PIPELINE]
    assert [s.name for s in pipeline.PREPARE + pipeline.QUANTIZE + pipeline.FINISH] == names
    seen = []
    result = autotune(SAMPLE_MODEL, SAMPLE_CALIB, lambda model: seen.append(model) or 1.0, max_trials=1,
                      methods=("min_max_asym",))
    ran = [s["step"] for s in result.summary["steps"]]
    plain = [s["step"] for s in quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, "min_max_asym", show_progress=False,
                                                report_samples=4).summary["steps"]]
    assert ran == plain  # the same steps ran, in the same order
    assert "verify_stage1" in ran and "refuse_quantized" in ran


def test_configuration_is_typed_and_validated_once():
    config = QuantizationConfig(method="entropy_sym", exclude=["conv1", "conv1"])
    assert config.method.value == "ENTROPY_SYM" and config.exclude == Scope(("conv1",))
    with pytest.raises(UsageError, match="did you mean entropy_sym"):
        QuantizationConfig(method="entropy_symm")
    with pytest.raises(UsageError, match="`percentile` must be in"):
        QuantizationConfig(percentile=0)
    with pytest.raises(UsageError, match="`range_overrides` for 'x' must be finite"):
        QuantizationConfig(range_overrides={"x": (0, float("inf"))})
    base = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, config=config, show_progress=False)
    assert base.summary.calibration.method == "entropy_sym"
    assert base.summary.nodes.quantized == base.summary["nodes"]["quantized"]


def test_stage1_keeps_the_users_node_names():
    names = [n.name for n in optimize_model(SAMPLE_MODEL).graph.node]
    assert names[:3] == ["conv1", "relu1", "conv2"] and "flatten" in names  # BN folded into conv1
    assert not any(n.startswith("node_") for n in names)
    names = {n.name for n in optimize_model(conv_bn_relu_model()).graph.node}
    original = {n.name for n in conv_bn_relu_model().graph.node}
    assert names <= original | {n for n in names if not n.startswith("node_")}


def test_exclude_conv1_keeps_that_conv_float(tmp_path):
    report = tmp_path / "r.json"
    r = CliRunner().invoke(cli, [str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB), "-o", str(tmp_path / "o.onnx"),
                                 "--exclude", "conv1", "--report", str(report), "--report-samples", "0"])
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    assert {"node": "conv1", "op_type": "Conv", "reason": "excluded"} in data["nodes"]["float"]
    assert "conv1" not in data["nodes"]["quantized_names"] and "conv2" in data["nodes"]["quantized_names"]
    assert "matches no node" not in r.output
    model = onnx.load(tmp_path / "o.onnx")
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    assert conv1.input[1] == "conv1_w_folded" or not any(n.output[0] == conv1.input[1] and n.op_type ==
                                                         "DequantizeLinear" for n in model.graph.node)


def test_debug_shows_the_original_cause(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage\xff\xff")
    with pytest.raises(ModelError) as info:
        quantize_model(bad, SAMPLE_CALIB, show_progress=False)
    assert info.value.__cause__ is not None
