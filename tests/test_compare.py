"""`quantize compare` / quantizer.compare.compare_models: every number checked against
numpy over the same samples, run through onnxruntime here, independently."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from corpus import DATA, USAGE, assert_clean_failure, invoke
from onnx import TensorProto, helper
from quantizer.model_editor import ModelEditor

from quantizer import CalibrationDataError, UsageError, quantize_model
from quantizer.compare import compare_models
from quantizer.io_metadata import read_io

STRICT = 5
FILES = sorted(SAMPLE_CALIB.glob("*.npy"))


@pytest.fixture(scope="module")
def int8_proto():
    return quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, show_progress=False).model


@pytest.fixture
def int8_path(int8_proto, tmp_path):
    path = tmp_path / "digits_int8.onnx"
    onnx.save(int8_proto, path)
    return path


def session(model, extra=(), plain=False):
    model = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    if extra:
        clone = onnx.ModelProto()
        clone.CopyFrom(model)
        clone.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra)
        model = clone
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if plain:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def logits(model, n=None, feed=lambda x: x, out=lambda y: y):
    """[(file name, float64 logits)] of ``model`` over the first ``n`` calibration files."""
    s = session(model)
    return [(p.name, np.asarray(out(s.run(None, {"input": feed(np.load(p))})[0]), np.float64)) for p in FILES[:n]]


def sqnr(f, q):
    noise = np.sum((f - q) ** 2)
    return math.inf if noise == 0 else 10 * math.log10(np.sum(f ** 2) / noise)


def expected(reference, approx):
    f = np.stack([a for _, a in reference])
    q = np.stack([a for _, a in approx])
    per_sample = sorted(((sqnr(a, b), i, name) for i, ((name, a), (_, b)) in enumerate(zip(reference, approx))))
    return {
        "sqnr_db": sqnr(f, q),
        "max_abs_error": float(np.abs(f - q).max()),
        "mean_abs_error": float(np.abs(f - q).mean()),
        "cosine": float(np.dot(f.ravel(), q.ravel()) / (np.linalg.norm(f) * np.linalg.norm(q))),
        "top1": 100.0 * float(np.mean(f.argmax(-1) == q.argmax(-1))),
        "worst": [(name, value) for value, _, name in per_sample],
    }


def check_numbers(result, want, worst=3):
    out = result.output("logits")
    assert out.sqnr_db == pytest.approx(want["sqnr_db"], abs=1e-6)
    assert out.max_abs_error == pytest.approx(want["max_abs_error"], rel=1e-6)
    assert out.mean_abs_error == pytest.approx(want["mean_abs_error"], rel=1e-6)
    assert out.cosine == pytest.approx(want["cosine"], abs=1e-9)
    assert out.top1_agreement == pytest.approx(want["top1"])
    assert [s.sample for s in out.worst_samples] == [n for n, _ in want["worst"][:worst]]
    assert [s.sqnr_db for s in out.worst_samples] == pytest.approx([v for _, v in want["worst"][:worst]], abs=1e-6)


def test_every_number_matches_numpy(int8_path):
    reference, approx = logits(SAMPLE_MODEL), logits(int8_path)
    want = expected(reference, approx)
    result = compare_models(SAMPLE_MODEL, int8_path, SAMPLE_CALIB, worst=5)
    assert result.samples == 64 and [o.name for o in result.outputs] == ["logits"]
    check_numbers(result, want, worst=5)
    out = result.output("logits")
    assert out.shape == (1, 10) and out.values == 640 and out.top1_rows == 64 and out.nonfinite == 0
    assert 15 < out.sqnr_db < 60 and want["top1"] > 80  # a real (lossy) int8 model
    assert result.below(out.sqnr_db + 1) == [out] and result.below(out.sqnr_db - 1) == []


def test_max_samples_and_worst(int8_path):
    want = expected(logits(SAMPLE_MODEL, 8), logits(int8_path, 8))
    result = compare_models(SAMPLE_MODEL, int8_path, SAMPLE_CALIB, max_samples=8, worst=8)
    assert result.samples == 8
    check_numbers(result, want, worst=8)
    assert compare_models(SAMPLE_MODEL, int8_path, SAMPLE_CALIB, max_samples=8, worst=0).output("logits").worst_samples == []
    with pytest.raises(UsageError, match="`max_samples`"):
        compare_models(SAMPLE_MODEL, int8_path, SAMPLE_CALIB, max_samples=0)


def test_float_against_itself_is_exact():
    result = compare_models(SAMPLE_MODEL, SAMPLE_MODEL, SAMPLE_CALIB, max_samples=16, tensors=True)
    out = result.output("logits")
    assert out.sqnr_db == math.inf and out.max_abs_error == 0 and out.mean_abs_error == 0
    assert out.cosine == 1.0 and out.top1_agreement == 100.0
    assert all(s.sqnr_db == math.inf for s in out.worst_samples)
    assert result.tensors and all(t.sqnr_db == math.inf and t.max_abs_error == 0 for t in result.tensors)
    assert result.as_dict()["outputs"][0]["sqnr_db"] == "inf"


def test_tensors_match_numpy_worst_first(int8_proto, int8_path):
    result = compare_models(SAMPLE_MODEL, int8_path, SAMPLE_CALIB, max_samples=10, tensors=True)
    found = {t.name: t for t in result.tensors}
    # The int8 model's value of a quantized tensor is its DequantizeLinear output; a tensor
    # it does not round (a Conv output before its Relu) is read as is.
    assert found["relu1_out"].int8_tensor == "relu1_out_dequantized"
    assert found["bn1_out"].int8_tensor == "bn1_out"
    assert "input" in found and "logits" not in found and "conv1_out" not in found  # conv1_out: float only
    names = list(found)
    float_s = session(SAMPLE_MODEL, [n for n in names if n != "input"], plain=True)
    int8_s = session(int8_proto, [found[n].int8_tensor for n in names], plain=True)
    sums = {n: [0.0, 0.0, 0.0] for n in names}
    for path in FILES[:10]:
        x = np.load(path)
        ref = dict(zip([o.name for o in float_s.get_outputs()], float_s.run(None, {"input": x})), input=x)
        got = dict(zip([o.name for o in int8_s.get_outputs()], int8_s.run(None, {"input": x})))
        for n in names:
            f, q = ref[n].astype(np.float64), got[found[n].int8_tensor].astype(np.float64)
            sums[n][0] += np.sum(f ** 2)
            sums[n][1] += np.sum((f - q) ** 2)
            sums[n][2] = max(sums[n][2], np.abs(f - q).max())
    for n in names:
        assert found[n].sqnr_db == pytest.approx(10 * math.log10(sums[n][0] / sums[n][1]), abs=1e-6), n
        assert found[n].max_abs_error == pytest.approx(sums[n][2], rel=1e-6), n
    values = [t.sqnr_db for t in result.tensors]
    assert values == sorted(values)


def test_edited_int8_model_with_uint8_input_and_output(tmp_path):
    # logits, an output only float would read, keeps its Q/DQ when the run is told it is an integer output
    int8_proto = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, integer_outputs=("logits",), show_progress=False).model
    int8_path = tmp_path / "digits_int8.onnx"
    onnx.save(int8_proto, int8_path)
    edited = onnx.ModelProto()
    edited.CopyFrom(int8_proto)
    editor = ModelEditor(edited)
    editor.convert_input_type("input", "uint8")
    editor.convert_output_type("logits", "uint8")
    path = tmp_path / "digits_uint8.onnx"
    onnx.save(editor.model, path)
    io = read_io(editor.model)
    assert session(path).get_inputs()[0].type == "tensor(uint8)"
    approx = logits(path, feed=io["input"]["input"].quantize, out=io["output"]["logits"].dequantize)
    want = expected(logits(SAMPLE_MODEL), approx)
    result = compare_models(SAMPLE_MODEL, path, SAMPLE_CALIB)
    check_numbers(result, want)
    plain = compare_models(SAMPLE_MODEL, int8_path, SAMPLE_CALIB).output("logits")
    assert result.output("logits").sqnr_db == pytest.approx(plain.sqnr_db, abs=0.05)  # the same grid


def relu_model(shape, name="x"):
    graph = helper.make_graph([helper.make_node("Relu", [name], ["y"])], "relu",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_class_like_is_rank_two_only_and_iterables_are_named_by_index():
    rng = np.random.default_rng(3)
    maps = [rng.normal(size=(2, 3, 4, 4)).astype(np.float32) for _ in range(5)]
    result = compare_models(relu_model(["N", 3, 4, 4]), relu_model(["N", 3, 4, 4]), (m for m in maps), worst=5)
    out = result.output("y")
    assert result.samples == 5 and not out.class_like and out.top1_agreement is None  # NCHW: not classes
    assert sorted(s.sample for s in out.worst_samples) == ["0", "1", "2", "3", "4"]  # a generator: all of it
    rows = [rng.normal(size=(4, 7)).astype(np.float32) for _ in range(3)]
    out = compare_models(relu_model(["N", 7]), relu_model(["N", 7]), rows).output("y")
    assert out.class_like and out.top1_rows == 12 and out.top1_agreement == 100.0


def test_an_output_in_one_model_only_is_noted_and_skipped(tmp_path, int8_path):
    model = onnx.load(SAMPLE_MODEL)
    model.graph.output.append(helper.make_tensor_value_info("relu1_out", TensorProto.FLOAT, None))
    wider = tmp_path / "wider.onnx"
    onnx.save(model, wider)
    result = compare_models(wider, int8_path, SAMPLE_CALIB, max_samples=4)
    assert [o.name for o in result.outputs] == ["logits"]
    assert result.notes == ["output 'relu1_out' is only in the float model: skipped"]


def test_mismatched_models_are_one_line_usage_errors(tmp_path, int8_path):
    other = tmp_path / "other.onnx"
    onnx.save(relu_model(["N", 3, 8, 8]), other)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("compare", other, int8_path, "--data", SAMPLE_CALIB)
    assert_clean_failure(result, USAGE, "different inputs", out)
    assert "'x'" in result.stderr and "'input'" in result.stderr
    model = onnx.load(SAMPLE_MODEL)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    wrong_shape = tmp_path / "wrong_shape.onnx"
    onnx.save(model, wrong_shape)
    result = invoke("compare", wrong_shape, int8_path, "--data", SAMPLE_CALIB)
    assert_clean_failure(result, USAGE, "input 'input' is float32[?,1,16,8] in the float model", out)
    result = invoke("compare", SAMPLE_MODEL, int8_path)
    assert_clean_failure(result, USAGE, "--data is required", out)


def test_no_samples(tmp_path, int8_path):
    with pytest.raises(CalibrationDataError, match="no samples"):
        compare_models(SAMPLE_MODEL, int8_path, [])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(invoke("compare", SAMPLE_MODEL, int8_path, "--data", empty), DATA, "no .npy", empty)


def test_cli_table_json_and_min_sqnr(int8_path):
    library = compare_models(SAMPLE_MODEL, int8_path, SAMPLE_CALIB, max_samples=12)
    measured = library.output("logits").sqnr_db
    args = ["compare", SAMPLE_MODEL, int8_path, "--data", SAMPLE_CALIB, "--max-samples", 12]
    table = invoke(*args)
    assert table.exit_code == 0, table.output
    assert "compared 12 sample(s)" in table.stdout and f"{measured:.2f}" in table.stdout
    assert "worst samples of 'logits': " + library.output("logits").worst_samples[0].sample in table.stdout
    as_json = invoke(*args, "--json", "--worst", 2)
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["samples"] == 12 and data["tensors"] is None
    assert data["outputs"][0]["sqnr_db"] == pytest.approx(measured)
    assert len(data["outputs"][0]["worst_samples"]) == 2
    failed = invoke(*args, "--min-sqnr", measured + 0.5)
    assert failed.exit_code == STRICT
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: output 'logits'") and "below --min-sqnr" in lines[0]
    assert "Traceback" not in failed.output
    passed = invoke(*args, "--min-sqnr", measured - 0.5)
    assert passed.exit_code == 0 and not passed.stderr.strip()
    tensors = invoke(*args, "--tensors")
    assert tensors.exit_code == 0 and "relu1_out" in tensors.stdout and "(int8: relu1_out_dequantized)" in tensors.stdout


def test_memory_does_not_grow_with_samples(int8_path):
    batch = np.concatenate([np.load(p) for p in FILES])  # 64 digits a sample: outputs worth keeping

    def peak(n):
        tracemalloc.start()
        try:
            compare_models(SAMPLE_MODEL, int8_path, (batch for _ in range(n)), tensors=True)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    few, many = [peak(8), peak(8)], [peak(64), peak(64)]
    # Keeping every output would add > 64 x 1.3 MB of tensors (the tensors alone of one sample).
    assert max(many) < 1.2 * min(few), (few, many)


def test_latency_is_the_median_per_sample_without_the_warm_up():
    from quantizer.compare import latency_of
    lat = latency_of([9.0, 1.0, 3.0, 2.0], [7.0, 2.0, 2.0, 4.0])  # the first sample: warm-up
    assert (lat.float_seconds, lat.int8_seconds, lat.samples, lat.warmup_excluded) == (2.0, 2.0, 3, True)
    assert lat.speedup == 1.0
    single = latency_of([5.0], [2.0])
    assert (single.samples, single.warmup_excluded, single.speedup) == (1, False, 2.5)


def test_compare_reports_latency_of_both_models(int8_path):
    result = compare_models(SAMPLE_MODEL, int8_path, SAMPLE_CALIB, max_samples=6)
    lat = result.latency
    assert lat.samples == 5 and lat.warmup_excluded
    assert 0 < lat.float_seconds < math.inf and 0 < lat.int8_seconds < math.inf
    assert lat.speedup == pytest.approx(lat.float_seconds / lat.int8_seconds)
    assert result.as_dict()["latency"]["int8_ms"] == pytest.approx(lat.int8_seconds * 1e3)
    one = compare_models(SAMPLE_MODEL, int8_path, SAMPLE_CALIB, max_samples=1).latency
    assert one.samples == 1 and not one.warmup_excluded


def test_cli_says_when_int8_ran_slower(int8_path, monkeypatch):
    import quantizer.compare as compare_module
    args = ["compare", SAMPLE_MODEL, int8_path, "--data", SAMPLE_CALIB, "--max-samples", 3]
    monkeypatch.setattr(compare_module, "latency_of", lambda f, q: compare_module.Latency(1e-3, 4e-3, 2, True))
    slow = invoke(*args)
    assert slow.exit_code == 0, slow.output
    assert "float 1 ms, int8 4 ms: 0.25x float speed" in slow.stdout
    assert "note: the int8 model ran slower than float here" in slow.stdout
    monkeypatch.setattr(compare_module, "latency_of", lambda f, q: compare_module.Latency(4e-3, 1e-3, 2, True))
    fast = invoke(*args)
    assert "4.00x float speed" in fast.stdout and "ran slower" not in fast.stdout
