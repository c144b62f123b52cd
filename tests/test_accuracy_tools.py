"""Accuracy tools: per-tensor SQNR report, keep-float patterns, automatic protection of
crushed shared-scale tensors, and accuracy-driven autotune."""

import itertools
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from builders import _init, branchy_model, make_model
from conftest import SAMPLE_CALIB, SAMPLE_MODEL, FakeEval, run
from quantizer.qdq.plan import UNREAD_REASON
from quantizer import Calibrator, UsageError, autotune, quantize_model
from quantizer.autotune import FALLBACK_REASON
from quantizer.cli.main import cli
from quantizer.calibrators.statistics import TensorStatistics
from quantizer.protect import underflow_share
from quantizer.qdq.params import activation_params
from quantizer.qdq.plan import resolve_exclude
from quantizer.cli.text import report_lines

RNG = np.random.default_rng(7)


# ---------------------------------------------------------------- models


def mlp_model():
    """x -> MatMul -> Relu -> MatMul -> y: small enough to fake-quantize in numpy."""
    inits = [_init("w1", RNG.normal(0, 0.5, (8, 6)).astype(np.float32)),
             _init("w2", RNG.normal(0, 0.5, (6, 4)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)


def box_score_model(consumer=False):
    """Detection head: boxes in the hundreds and sigmoid scores in [0, 1] concatenated on
    the last axis into one output; the scores pass a Reshape on the way.  With
    ``consumer``, a MatMul reads the concatenation (so it is quantized anyway)."""
    inits = [_init("wb", RNG.uniform(0, 40, (16, 4)).astype(np.float32)),
             _init("ws", RNG.normal(0, 1, (16, 3)).astype(np.float32)),
             _init("shape", np.array([-1, 3], np.int64)),
             _init("wy", RNG.normal(0, 1, (7, 2)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "wb"], ["boxes"], name="box_head"),
             helper.make_node("MatMul", ["x", "ws"], ["logits"], name="score_head"),
             helper.make_node("Sigmoid", ["logits"], ["scores"], name="sigmoid"),
             helper.make_node("Reshape", ["scores", "shape"], ["scores_r"], name="reshape"),
             helper.make_node("Concat", ["boxes", "scores_r"], ["det"], name="concat", axis=-1)]
    output = helper.make_tensor_value_info("det", TensorProto.FLOAT, ["N", 7])
    if consumer:
        nodes.append(helper.make_node("MatMul", ["det", "wy"], ["y"], name="after"))
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    else:
        inits.pop()
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])], [output], inits)


def samples_of(shape, count=8, seed=0, low=None):
    rng = np.random.default_rng(seed)
    if low is not None:
        return [rng.uniform(low, 1, shape).astype(np.float32) for _ in range(count)]
    return [rng.normal(0, 1, shape).astype(np.float32) for _ in range(count)]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------- 1. tensor report


def _fake_quant(values, low, high):
    """Independent int8 asymmetric fake quantization (TFLite: range widened to 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = np.float32((high - low) / 255)
    zero_point = np.clip(np.round(-128 - low / scale), -128, 127)
    q = np.clip(np.round(values / scale) + zero_point, -128, 127)
    return ((q - zero_point) * scale).astype(np.float32), float(scale), int(zero_point)


def _weight_fake_quant(w):
    scales = (np.abs(w).max(axis=0) / 127).astype(np.float32)  # per output column
    return (np.clip(np.round(w / scales), -127, 127) * scales).astype(np.float32)


def _sqnr(reference, approx):
    reference, approx = np.asarray(reference, np.float64), np.asarray(approx, np.float64)
    return 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - approx) ** 2))


def test_tensor_report_matches_an_independent_numpy_computation():
    model = mlp_model()
    samples = samples_of((5, 8), count=6)
    result = quantize_model(model, samples, activation_dtype="int8", weight_range="full", report_samples=3,
                            show_progress=False)
    entries = {e["tensor"]: e for e in result.summary["tensors"]}
    # y, the graph output, only float reads: the last MatMul has a float output (no Q)
    assert set(entries) == {"x", "r"} and result.summary["report_samples"] == 3

    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    w1, w2 = inits["w1"], inits["w2"]
    every = np.concatenate(samples)  # ranges: min/max over all calibration samples
    r_all = np.maximum(every @ w1, 0)
    ranges = {"x": (every.min(), every.max()), "r": (r_all.min(), r_all.max())}

    x = np.concatenate(samples[:3])  # the report's samples: the first three
    x_q, *x_params = _fake_quant(x, *ranges["x"])
    r_float, r_q_in = np.maximum(x @ w1, 0), np.maximum(x_q @ _weight_fake_quant(w1), 0)
    r_q, *r_params = _fake_quant(r_q_in, *ranges["r"])
    expected = {"x": (x, x_q, x_params), "r": (r_float, r_q, r_params)}

    for name, (reference, approx, (scale, zero_point)) in expected.items():
        entry = entries[name]
        assert entry["scale"] == pytest.approx(scale, rel=1e-5) and entry["zero_point"] == zero_point, name
        assert entry["range"] == pytest.approx(ranges[name], rel=1e-5, abs=1e-6), name
        assert entry["sqnr_db"] == pytest.approx(_sqnr(reference, approx), abs=0.01), name
        assert entry["max_abs_error"] == pytest.approx(np.abs(reference - approx).max(), rel=0.02, abs=1e-4), name
    assert entries["r"]["node"] == "relu" and entries["x"]["node"] is None
    db = [e["sqnr_db"] for e in result.summary["tensors"]]
    assert db == sorted(db)  # worst first


def test_report_from_a_one_shot_iterator_equals_the_list_report():
    model, samples = mlp_model(), samples_of((5, 8), count=6, seed=3)
    from_list = quantize_model(model, samples, report_samples=2, show_progress=False)
    from_iter = quantize_model(model, iter(samples), report_samples=2, show_progress=False)
    assert from_iter.summary["tensors"] == from_list.summary["tensors"]
    assert from_iter.summary["report_samples"] == 2
    assert "tensors" not in quantize_model(model, samples, show_progress=False).summary  # off by default


def test_report_lines_show_the_ten_worst_and_point_to_the_json():
    tensors = [{"tensor": f"t{i}", "node": f"n{i}", "op_type": "Conv", "range": [0.0, 1.0], "grid": [0, 1],
                "scale": 0.01, "zero_point": -128, "sqnr_db": 10.0 + i, "max_abs_error": 0.1, "mse": 0.01}
               for i in range(12)]
    lines = report_lines({"tensors": tensors, "report_samples": 4})
    assert "all 12 in the JSON report" in lines[0] and len(lines) == 2 + 10
    assert "t0 (n0)" in lines[2] and not any("t10" in line for line in lines)


def test_cli_report_has_every_tensor_and_prints_the_worst(tmp_path):
    report = tmp_path / "r.json"
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "o.onnx", "--report", report, "--report-samples", 2)
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    assert data["report_samples"] == 2 and len(data["tensors"]) == 7  # the logits (a Gemm's float output) have no Q
    assert {"tensor", "node", "range", "scale", "zero_point", "sqnr_db"} <= set(data["tensors"][0])
    assert all(15 < t["sqnr_db"] < 70 for t in data["tensors"])
    assert "per-tensor SQNR" in r.output and data["tensors"][0]["tensor"] in r.output
    assert data["protected"] == []


# ---------------------------------------------------------------- 2. keep-float patterns


def test_resolve_exclude_names_op_types_and_globs():
    nodes = [helper.make_node("Conv", [], [], name=n) for n in ("conv1", "conv2", "blocks[0]")]
    nodes.append(helper.make_node("Softmax", [], [], name="head/softmax"))
    names, unmatched = resolve_exclude(nodes, ["conv1", "Softmax", "blocks[0]", "nope", "head/*"])
    assert names == {"conv1", "head/softmax", "blocks[0]"} and unmatched == ["nope"]
    assert resolve_exclude(nodes, ["Conv"])[0] == {"conv1", "conv2", "blocks[0]"}
    assert resolve_exclude(nodes, ["conv?"])[0] == {"conv1", "conv2"}
    assert resolve_exclude(nodes, "conv2")[0] == {"conv2"}  # one string is one pattern


def test_exclude_keeps_exactly_the_matched_nodes_float():
    model = branchy_model()
    samples = samples_of((2, 3, 8, 8))
    base = quantize_model(model, samples, show_progress=False)
    result = quantize_model(model, samples, exclude=["Sigmoid", "mat*", "nothing*"], show_progress=False)
    excluded = {f["node"] for f in result.summary["nodes"]["float"] if f["reason"] == "excluded"}
    assert excluded == {"sigmoid", "matmul"}
    unread = {f["node"] for f in base.summary["nodes"]["float"]}  # what only float ops read (ort-cpu)
    assert all(f["reason"] == UNREAD_REASON for f in base.summary["nodes"]["float"])
    # everything else quantized as in the run without exclude
    assert {f["node"] for f in result.summary["nodes"]["float"]} - unread == excluded
    assert result.summary["nodes"]["quantized"] <= base.summary["nodes"]["quantized"] - 2
    assert any("'nothing*' matches no node" in note for note in result.summary["notes"])

    graph = result.model.graph
    producer = {o: n for n in graph.node for o in n.output}
    node = {n.name: n for n in graph.node}
    # Float ops read dequantized tensors and feed a quantize: clean Q/DQ at their borders.
    assert node["sigmoid"].op_type == "Sigmoid" and producer[node["sigmoid"].input[0]].op_type == "DequantizeLinear"
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == node["sigmoid"].output[0] for n in graph.node)
    assert node["matmul"].input[1] == "mm_w"  # float weight, no DequantizeLinear
    assert producer[node["matmul"].input[0]].op_type == "DequantizeLinear"
    assert producer[node["conv"].input[1]].op_type == "DequantizeLinear"  # the rest still int8


def test_cli_exclude_by_op_type_and_glob(tmp_path):
    report = tmp_path / "r.json"
    r = invoke(SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", tmp_path / "o.onnx", "--report", report,
               "--report-samples", 0, "--exclude", "Gemm", "--exclude", "conv[12]")
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    excluded = {f["node"] for f in data["nodes"]["float"] if f["reason"] == "excluded"}
    assert excluded == {"fc", "conv1", "conv2"} and "tensors" not in data
    assert data["nodes"]["quantized_by_op"]["Conv"] == 1 and "Gemm" not in data["nodes"]["quantized_by_op"]


# ---------------------------------------------------------------- 3. automatic protection


@pytest.fixture(scope="module")
def box_scores():
    model = box_score_model()
    samples = samples_of((8, 16), low=0.0)
    reference = run(model, {"x": samples[0]})
    assert reference[:, :4].min() > 50 and reference[:, :4].max() < 640
    assert 0 <= reference[:, 4:].min() and reference[:, 4:].max() <= 1
    return model, samples, reference


def test_protection_keeps_the_box_score_concat_float(box_scores):
    """TFLite's placement quantizes the whole head (on ort-cpu nothing integer reads the
    graph output, so the head's results stay float there and protection has no work)."""
    model, samples, reference = box_scores
    protected = quantize_model(model, samples, target="tflite", show_progress=False)
    plain = quantize_model(model, samples, target="tflite", protect=False, show_progress=False)

    assert [p["node"] for p in protected.summary["protected"]] == ["concat"]  # not the Reshape
    assert "'scores_r'" in protected.summary["protected"][0]["reason"]
    assert plain.summary["protected"] == []
    score_error = {name: np.abs(run(r.model, {"x": samples[0]}) - reference)[:, 4:].max()
                   for name, r in (("protected", protected), ("plain", plain))}
    assert score_error["protected"] < 0.01  # ~ one 1/255 step of the scores' own scale
    assert score_error["plain"] > 0.2  # one shared step of ~2.5 for values in [0, 1]
    reasons = {f["node"]: f["reason"] for f in protected.summary["nodes"]["float"]}
    assert reasons["concat"].startswith("protected")
    for other in ("box_head", "score_head", "sigmoid", "reshape"):
        assert other not in reasons


def test_cli_prints_protection_and_no_protect_disables_it(box_scores, tmp_path):
    model, samples, _ = box_scores
    path, calib = tmp_path / "det.onnx", tmp_path / "calib"
    onnx.save(model, path)
    calib.mkdir()
    for i, sample in enumerate(samples):
        np.save(calib / f"{i}.npy", sample)
    r = invoke(path, "--data", calib, "-o", tmp_path / "a.onnx", "--target", "tflite")
    assert r.exit_code == 0 and "protected (kept float" in r.output and "concat:" in r.output, r.output
    r = invoke(path, "--data", calib, "-o", tmp_path / "b.onnx", "--no-protect", "--target", "tflite")
    assert r.exit_code == 0 and "protected" not in r.output, r.output


def test_protection_that_would_not_help_is_only_noted():
    """A MatMul quantizes the concatenation with the union range anyway: keeping the
    Concat float gains nothing, so it stays int8 and a note names the crushed tensor."""
    result = quantize_model(box_score_model(consumer=True), samples_of((8, 16), low=0.0), show_progress=False)
    assert result.summary["protected"] == [] and result.summary["nodes"]["float"] == []
    assert any("'scores_r'" in n and "keeping 'concat' float would not help" in n for n in result.summary["notes"])


def test_protection_does_not_fire_on_plain_cnns():
    assert quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, show_progress=False).summary["protected"] == []
    branchy = quantize_model(branchy_model(), samples_of((2, 3, 8, 8)), target="tflite", show_progress=False)
    assert branchy.summary["protected"] == [] and branchy.summary["nodes"]["float"] == []


def power_spectrum_model(seed: int = 0):
    """re^2 + im^2 of two projections, then its square root and a dense layer: the power
    spans many decades, so one linear int8 scale rounds most of it to 0."""
    rng = np.random.default_rng(seed)  # its own: the weights must not depend on the tests run before
    inits = [_init("wr", rng.normal(0, 1, (16, 16)).astype(np.float32)),
             _init("wi", rng.normal(0, 1, (16, 16)).astype(np.float32)),
             _init("wo", rng.normal(0, 1, (16, 4)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "wr"], ["re"], name="real"),
             helper.make_node("MatMul", ["x", "wi"], ["im"], name="imag"),
             helper.make_node("Mul", ["re", "re"], ["re2"], name="re_sq"),
             helper.make_node("Mul", ["im", "im"], ["im2"], name="im_sq"),
             helper.make_node("Add", ["re2", "im2"], ["power"], name="power"),
             helper.make_node("Sqrt", ["power"], ["mag"], name="mag"),
             helper.make_node("MatMul", ["mag", "wo"], ["y"], name="dense")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)


def loud_and_quiet_samples(count=32, seed=3):
    """Frames of speech-like audio: 1 in 20 loud, the rest quiet over 2.5 decades."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        loud = rng.random((8, 1)) < 0.05
        gain = np.where(loud, 10.0 ** rng.uniform(-0.3, 0, (8, 1)), 10.0 ** rng.uniform(-4, -1.5, (8, 1)))
        samples.append((rng.normal(0, 1, (8, 16)) * gain).astype(np.float32))
    return samples


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 31), st.sampled_from(["normal", "lognormal", "relu", "power"]),
       st.sampled_from(["int8", "uint8"]))
def test_underflow_share_matches_a_brute_force_count(seed, kind, dtype):
    rng = np.random.default_rng(seed)
    x = {"normal": lambda: rng.normal(0, 1, 50000),
         "lognormal": lambda: rng.lognormal(0, 2.5, 50000),
         "relu": lambda: np.maximum(rng.normal(0, 1, 50000), 0),
         "power": lambda: (rng.normal(0, 1, 50000) * 10.0 ** rng.uniform(-3, 0, 50000)) ** 2}[kind]()
    x = x.astype(np.float32)
    stats = TensorStatistics()
    stats.update(x)
    low, high = float(x.min()), float(x.max())
    scale = float(activation_params(min(low, 0.0), max(high, 0.0), dtype).scale)
    nonzero = x[x != 0]
    expected = np.mean(np.abs(nonzero) < scale / 2)
    got = underflow_share(stats, low, high, dtype)
    # bin centres stand in for the values; a Relu's bin holding 0 counts as exact zeros
    assert abs(got - expected) < 0.03, (got, expected)


def test_protection_keeps_a_tensor_its_own_scale_crushes_float():
    """On TFLite's placement every Mul/Add here is int8.  (On ort-cpu the squares and
    their sum stay float anyway: only Sqrt, a float op, reads them -- see below.)"""
    model, samples = power_spectrum_model(), loud_and_quiet_samples()
    protected = quantize_model(model, samples, target="tflite", show_progress=False)
    plain = quantize_model(model, samples, target="tflite", protect=False, show_progress=False)
    reasons = {p["node"]: p["reason"] for p in protected.summary["protected"]}
    assert {"re_sq", "im_sq", "power"} <= set(reasons), reasons
    assert "round to 0" in reasons["power"]
    assert {"real", "imag", "dense"}.isdisjoint(reasons)  # their tensors survive int8
    assert plain.summary["protected"] == []
    errors = {}
    for name, result in (("protected", protected), ("plain", plain)):
        signal = noise = 0.0
        for x in loud_and_quiet_samples(8, seed=4):
            reference = run(model, {"x": x})
            signal += float(np.sum(reference.astype(np.float64) ** 2))
            noise += float(np.sum((run(result.model, {"x": x}) - reference).astype(np.float64) ** 2))
        errors[name] = 10 * np.log10(signal / noise)
    assert errors["protected"] > errors["plain"] + 2, errors  # measured: 28.0 vs 21.9 dB (seeds 1-5: +1.1 to +9.6)


def test_ort_cpu_leaves_float_what_only_float_ops_read():
    """onnxruntime's placement quantizes an Add/Mul only where an integer op reads its
    result: the power spectrum's squares and sum feed Sqrt (float), so they stay float and
    protection has nothing to do; the projections still run in integer kernels, with a
    float output where only float ops read it (no Q: MatMulIntegerToFloat)."""
    model, samples = power_spectrum_model(), loud_and_quiet_samples()
    result = quantize_model(model, samples, target="ort-cpu-x86", show_progress=False)
    graph = result.model.graph
    produced_by = {o: n for n in graph.node for o in n.output}
    for name in ("re_sq", "im_sq", "power"):
        node = next(n for n in graph.node if n.name == name)
        assert {produced_by[i].op_type for i in node.input} <= {"MatMul", "Mul"}, name  # float in, no Q/DQ
    quantized_outputs = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert quantized_outputs == {"x", "mag"}  # the input and what the last MatMul reads
    assert result.summary["protected"] == []
    fusion = result.summary["fusion"]
    assert fusion["integer_nodes"] == fusion["quantized_nodes"] == 3  # real, imag, dense
    signal = noise = 0.0
    for x in loud_and_quiet_samples(8, seed=4):
        reference = run(model, {"x": x})
        signal += float(np.sum(reference.astype(np.float64) ** 2))
        noise += float(np.sum((run(result.model, {"x": x}) - reference).astype(np.float64) ** 2))
    assert 10 * np.log10(signal / noise) > 28.5  # measured 30.8 dB (protected int8 squares on tflite: 28.0)


# ---------------------------------------------------------------- 4. autotune


def test_autotune_stops_at_the_first_trial_within_the_loss(count_collections):
    fake = FakeEval(2.0, 1.9, 1.985, 2.0)  # 1.985 is within 1 % of 2.0
    methods = ("min_max_asym", "percentile_asym", "entropy_asym")
    result = autotune(SAMPLE_MODEL, SAMPLE_CALIB, fake, tolerable_loss=0.01, max_trials=10, methods=methods)
    assert [(t.method, t.metric, t.passed) for t in result.trials] == [
        ("min_max_asym", 1.9, False), ("percentile_asym", 1.985, True)]
    assert len(fake.models) == 3 and result.passed and result.best.number == 2 and result.baseline == 2.0
    assert result.trials[1].loss == pytest.approx(0.0075)
    assert fake.models[-1] is result.model and result.summary["calibration"]["method"] == "percentile_asym"
    assert result.summary["autotune"]["chosen_trial"] == 2 and len(count_collections) == 1  # one model run


def test_autotune_honours_max_trials_and_falls_back_to_float_nodes(count_collections):
    fake = FakeEval(1.0, 0.5, 0.6, 0.8, 0.7, 0.9)
    result = autotune(SAMPLE_MODEL, SAMPLE_CALIB, fake, tolerable_loss=0.01, max_trials=4,
                      methods=("min_max_asym", "entropy_asym"), algorithms=())
    assert len(result.trials) == 4 and len(fake.models) == 5 and not result.passed
    first, second, third, fourth = result.trials
    assert (first.excluded, second.excluded) == ([], [])
    assert third.method == fourth.method == "entropy_asym"  # fallbacks on the best method so far
    assert third.excluded and fourth.excluded[:len(third.excluded)] == third.excluded  # one unit, then two
    assert len(fourth.excluded) > len(third.excluded)
    assert result.best is third and fake.models[3] is result.model  # the best metric, 0.8
    reasons = {f["node"]: f["reason"] for f in result.summary["nodes"]["float"]}
    assert reasons[third.excluded[0]] == FALLBACK_REASON
    assert len(count_collections) == 1


def test_autotune_doubles_the_fallback_and_stops_before_every_node_is_float():
    fake = FakeEval(1.0, *[0.5] * 20)
    result = autotune(SAMPLE_MODEL, SAMPLE_CALIB, fake, tolerable_loss=0.01, max_trials=20,
                      methods=("min_max_asym",), algorithms=())
    sizes = [len(t.excluded) for t in result.trials]
    last = result.trials[-1].excluded
    assert sizes[0] == 0 and sizes == sorted(set(sizes)) and len(last) >= 3, sizes  # 1, 2, 4, ... units
    # the next size would keep every quantized node float: a float copy, never a trial
    assert all(any(n.op_type == "QuantizeLinear" for n in m.graph.node) for m in fake.models[1:])
    assert len(result.trials) <= 2 + int(np.log2(len(last))) + 1
    assert set(last) == set(result.trials[-1].excluded) and not result.passed
    for before, after in zip(result.trials[1:], result.trials[2:]):
        assert after.excluded[:len(before.excluded)] == before.excluded  # the same ranking, grown


def test_autotune_rejects_bad_arguments():
    with pytest.raises(UsageError, match="max_trials"):
        autotune(SAMPLE_MODEL, SAMPLE_CALIB, FakeEval(1.0), max_trials=0)
    with pytest.raises(UsageError, match="unknown calibration method"):
        autotune(SAMPLE_MODEL, SAMPLE_CALIB, FakeEval(1.0), methods=("kl",))
    with pytest.raises(UsageError, match="finite number"):
        autotune(SAMPLE_MODEL, SAMPLE_CALIB, FakeEval(float("nan")))


def test_cli_tune_with_an_evaluation_script(tmp_path):
    script = tmp_path / "evaluate.py"
    script.write_text(
        "import numpy as np, onnxruntime as ort\n"
        f"data = np.load({str(SAMPLE_CALIB / 'sample_000.npy')!r})\n"
        "def evaluate(model_path):\n"
        "    out = ort.InferenceSession(model_path, providers=['CPUExecutionProvider']).run(None, {'input': data})[0]\n"
        "    return float(out.max())\n"
    )
    out, report = tmp_path / "tuned.onnx", tmp_path / "tune.json"
    r = invoke("tune", SAMPLE_MODEL, "--data", SAMPLE_CALIB, "--eval", script, "--tolerable-loss", 0.5,
               "--max-trials", 3, "-o", out, "--report", report)
    assert r.exit_code == 0, r.output
    assert "trial 1/3: auto" in r.output and "-> pass" in r.output and out.exists()
    data = json.loads(report.read_text())
    assert data["autotune"]["passed"] and len(data["autotune"]["trials"]) == 1
    r = invoke("tune", SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out)
    assert r.exit_code == 2 and "--eval is required" in r.output
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    r = invoke("tune", SAMPLE_MODEL, "--data", SAMPLE_CALIB, "--eval", bad, "-o", out)
    assert r.exit_code == 2 and "must define evaluate" in r.output


@pytest.mark.parametrize(
    "script_text, message",
    [
        (None, "--eval is required"),
        ("x = 1\n", "must define evaluate"),
        ("def evaluate(path):\n    raise RuntimeError('metric broke')\n", "evaluate() failed: RuntimeError: metric broke"),
    ],
)
def test_tune_errors_are_one_line_and_write_nothing(tmp_path, script_text, message):
    out = tmp_path / "tuned.onnx"
    args = ["tune", SAMPLE_MODEL, "--data", SAMPLE_CALIB, "-o", out]
    if script_text is not None:
        script = tmp_path / "eval.py"
        script.write_text(script_text)
        args += ["--eval", script]
    r = invoke(*args)
    lines = [line for line in r.output.splitlines() if line.strip() and not line.startswith("trial")]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.output
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_fallback_unit_keeps_its_tensor_float_with_the_consumers_that_would_quantize_it():
    from quantizer import pipeline
    from quantizer.autotune import fallback_order
    from quantizer.config import CalibrationInputs, QuantizationConfig
    from quantizer.report import report_summary

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(0, 0.5, (2, 4, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("Add", ["c1", "c0"], ["a"], name="shift_add"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    ctx = pipeline.new_context(model, QuantizationConfig(report_samples=2), CalibrationInputs(samples))
    pipeline.run(ctx, pipeline.PREPARE + pipeline.QUANTIZE)
    entries = report_summary(ctx.stage1, ctx.outcome, ctx.data.samples(2), ctx.ranges, 2)["tensors"]
    units = {unit[0]: unit for unit in fallback_order(ctx.stage1, ctx.outcome.plan, entries)}
    assert units["shift_add"] == ["shift_add", "conv2"]  # conv2 would quantize the Add's output anyway
    assert units["conv1"] == ["conv1", "shift_add"]  # ... and the Add would quantize conv1's output
