"""Stage-1 rewrite rules (quantizer/rewrites.py): each family replaces its pattern with
the fused ONNX op, leaves look-alikes alone, and keeps the function on random inputs."""

import collections
import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from quantizer import optimize_model
from quantizer.rewrites import RULES, apply_rewrites

RTOL, ATOL = 1e-5, 1e-6
F32 = TensorProto.FLOAT
SPECIAL = np.array([-6.0, -3.0, -0.5, 0.0, 0.5, 3.0, 6.0])  # kinks of Clip/HardSigmoid/Relu


def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs if isinstance(outputs, list) else [outputs], **attrs)


def const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def build(nodes, inits=(), *, opset=17, x_shape=("N", 3, "L"), x_type=F32, inputs=(), outputs=("y",)):
    """A checked model with input ``x`` (plus ``inputs``, same type and shape) and the
    given outputs, shapes left to inference."""
    graph_inputs = [helper.make_tensor_value_info(name, x_type, list(x_shape)) for name in ("x", *inputs)]
    graph_outputs = [helper.make_tensor_value_info(name, x_type, None) for name in outputs]
    graph = helper.make_graph(nodes, "rewrite_test", graph_inputs, graph_outputs, list(inits))
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # declares the outputs' shapes
    onnx.checker.check_model(model, full_check=True)
    return model


def op_counts(model):
    return collections.Counter(n.op_type for n in model.graph.node)


@functools.cache
def _session(serialized: bytes):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])


def run_all(model, feed):
    return _session(model.SerializeToString()).run(None, feed)


_NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
          TensorProto.INT64: np.int64, TensorProto.INT32: np.int32}


def random_feed(model, seed=0, sizes=None, scale=4.0):
    """Random values for every input; symbolic dims take ``sizes[name]`` (default 2)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (sizes or {}).get(d.dim_param, 2)
                 for d in tensor_type.shape.dim]
        dtype = _NUMPY[tensor_type.elem_type]
        if np.dtype(dtype).kind == "i":
            data = rng.integers(-20, 20, size=shape)
        else:
            data = rng.normal(0.0, scale, size=shape)
            mask = rng.random(shape) < 0.2
            data[mask] = rng.choice(SPECIAL, size=int(mask.sum()))
        feed[value.name] = data.astype(dtype)
    return feed


def assert_same_function(original, rewritten, feed):
    for want, got in zip(run_all(original, feed), run_all(rewritten, feed), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ model builders

def div_model(divisor, *, as_node=False, dtype=np.float32, x_type=F32):
    if as_node:
        nodes = [node("Constant", [], "c", value=const("c_value", divisor, dtype)), node("Div", ["x", "c"], "y")]
        return build(nodes, x_type=x_type)
    return build([node("Div", ["x", "c"], "y")], [const("c", divisor, dtype)], x_type=x_type)


def hardswish_inits(dtype=np.float32):
    return [const("three", 3.0, dtype), const("zero", 0.0, dtype), const("six", 6.0, dtype),
            const("sixth", 1 / 6, dtype)]


def clamp_nodes(form, source="a", out="clamped"):
    """clamp(source, zero, six) as Clip, Relu + Clip, Min(Max(.)) or Max(Min(.))."""
    if form == "Clip":
        return [node("Clip", [source, "zero", "six"], out)]
    if form == "ReluClip":  # Relu then Clip with only an upper bound
        return [node("Relu", [source], "relu"), node("Clip", ["relu", "", "six"], out)]
    if form == "MaxMin":
        return [node("Max", [source, "zero"], "lower"), node("Min", ["six", "lower"], out)]
    return [node("Min", [source, "six"], "upper"), node("Max", ["upper", "zero"], out)]


def hardswish_model(form="Clip", scale="Div", order="outer", *, opset=17, offset=3.0, divisor=6.0,
                    dtype=np.float32):
    """x * clamp(x + 3, 0, 6) / 6 in one of its spellings.

    order "outer": (x * clamp) / 6; "commuted": (clamp * x) * (1/6) written as
    Mul(sixth, Mul(clamp, x)); "inner": x * (clamp / 6); "gate": clamp / 6 alone
    (HardSigmoid).
    """
    inits = [const("offset", offset, dtype), const("zero", 0.0, dtype), const("six", 6.0, dtype),
             const("divisor", divisor, dtype), const("sixth", 1 / divisor, dtype)]
    nodes = [node("Add", ["x", "offset"], "a")] + clamp_nodes(form)
    by = ["divisor"] if scale == "Div" else ["sixth"]
    if order == "outer":
        nodes += [node("Mul", ["x", "clamped"], "m"), node(scale, ["m", *by], "y")]
    elif order == "commuted":
        nodes += [node("Mul", ["clamped", "x"], "m"), node(scale, ["m", *by] if scale == "Div" else [*by, "m"], "y")]
    elif order == "inner":
        nodes += [node(scale, ["clamped", *by], "g"), node("Mul", ["g", "x"], "y")]
    else:
        nodes += [node(scale, ["clamped", *by], "y")]
    return build(nodes, inits, opset=opset, x_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def hardsigmoid_times_x(alpha=1 / 6, beta=0.5, opset=17):
    return build([node("HardSigmoid", ["x"], "g", alpha=alpha, beta=beta), node("Mul", ["g", "x"], "y")],
                 opset=opset)


def prelu_model(slope):
    return build([node("PRelu", ["x", "slope"], "y")], [const("slope", slope)])


def sum_model(count):
    nodes = [node("Relu", ["x"], "r"), node("Neg", ["x"], "n")]
    return build(nodes + [node("Sum", ["x", "r", "n"][:count], "y")])


def layer_norm_model(*, opset=17, square="Pow", bias=True, axis=-1, gamma_shape=(8,)):
    rng = np.random.default_rng(3)
    def mean(source, out):  # axes an input from opset 18, an attribute before
        if opset >= 18:
            return node("ReduceMean", [source, "axes"], out)
        return node("ReduceMean", [source], out, axes=[axis])

    inits = [const("axes", [axis], np.int64)] if opset >= 18 else []
    inits += [const("two", 2.0), const("eps", 1e-5), const("gamma", rng.uniform(0.5, 1.5, gamma_shape)),
              const("beta", rng.normal(0, 0.2, gamma_shape))]
    squared = node("Pow", ["d", "two"], "d2") if square == "Pow" else node("Mul", ["d", "d"], "d2")
    nodes = [mean("x", "mu"), node("Sub", ["x", "mu"], "d"), squared, mean("d2", "var"),
             node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "sd"), node("Div", ["d", "sd"], "n"),
             node("Mul", ["n", "gamma"], "y" if not bias else "ng")]
    if bias:
        nodes.append(node("Add", ["beta", "ng"], "y"))
    return build(nodes, inits, opset=opset, x_shape=("N", "T", 8))


def gelu_model(order="input", erf_scale="Div", *, opset=20):
    inits = [const("root", np.sqrt(2.0) if erf_scale == "Div" else np.sqrt(0.5)), const("one", 1.0),
             const("half", 0.5)]
    nodes = [node(erf_scale, ["x", "root"], "s"), node("Erf", ["s"], "e"), node("Add", ["one", "e"], "gate")]
    if order == "input":
        nodes += [node("Mul", ["x", "half"], "xh"), node("Mul", ["xh", "gate"], "y")]
    elif order == "gate":
        nodes += [node("Mul", ["half", "gate"], "gh"), node("Mul", ["x", "gh"], "y")]
    else:
        nodes += [node("Mul", ["gate", "x"], "xg"), node("Mul", ["xg", "half"], "y")]
    return build(nodes, inits, opset=opset)


# ------------------------------------------------------------------ positive cases

# case -> (builder, family, op that must appear, ops that must be gone)
POSITIVE = {
    "div_scalar": (lambda: div_model(7.0), "div_by_constant", "Mul", {"Div"}),
    "div_per_channel": (lambda: div_model([[2.0], [-0.25], [3.0]]), "div_by_constant", "Mul", {"Div"}),
    "div_constant_node": (lambda: div_model([[1.5], [-3.0], [0.1]], as_node=True), "div_by_constant", "Mul",
                          {"Div"}),
    "div_float64": (lambda: div_model(3.0, dtype=np.float64, x_type=TensorProto.DOUBLE), "div_by_constant",
                    "Mul", {"Div"}),
    "sum_two": (lambda: sum_model(2), "sum_to_add", "Add", {"Sum"}),
    "hardswish_clip_div": (lambda: hardswish_model("Clip", "Div"), "hardswish", "HardSwish",
                           {"Clip", "Div", "Mul", "Add"}),
    "hardswish_clip_mul": (lambda: hardswish_model("Clip", "Mul"), "hardswish", "HardSwish",
                           {"Clip", "Mul", "Add"}),
    "hardswish_commuted_div": (lambda: hardswish_model("Clip", "Div", "commuted"), "hardswish", "HardSwish",
                               {"Clip", "Div", "Mul", "Add"}),
    "hardswish_commuted_mul": (lambda: hardswish_model("Clip", "Mul", "commuted"), "hardswish", "HardSwish",
                               {"Clip", "Mul", "Add"}),
    "hardswish_inner_div": (lambda: hardswish_model("Clip", "Div", "inner"), "hardswish", "HardSwish",
                            {"Clip", "Div", "Mul", "HardSigmoid"}),
    "hardswish_inner_mul": (lambda: hardswish_model("Clip", "Mul", "inner"), "hardswish", "HardSwish",
                            {"Clip", "Mul", "HardSigmoid"}),
    "hardswish_relu6_maxmin": (lambda: hardswish_model("MaxMin", "Div"), "hardswish", "HardSwish",
                               {"Max", "Min", "Clip", "Div", "Mul"}),
    "hardswish_relu6_minmax": (lambda: hardswish_model("MinMax", "Mul", "inner"), "hardswish", "HardSwish",
                               {"Max", "Min", "Clip", "Mul"}),
    "hardswish_relu_clip": (lambda: hardswish_model("ReluClip", "Div"), "hardswish", "HardSwish",
                            {"Relu", "Clip", "Div", "Mul"}),
    "hardswish_from_hardsigmoid": (hardsigmoid_times_x, "hardswish", "HardSwish", {"HardSigmoid", "Mul"}),
    "hardsigmoid_div": (lambda: hardswish_model("Clip", "Div", "gate"), "hardswish", "HardSigmoid",
                        {"Clip", "Div", "Add"}),
    "hardsigmoid_mul_opset13": (lambda: hardswish_model("Clip", "Mul", "gate", opset=13), "hardswish",
                                "HardSigmoid", {"Clip", "Mul", "Add"}),
    "prelu_scalar": (lambda: prelu_model(0.25), "prelu_scalar", "LeakyRelu", {"PRelu"}),
    "prelu_uniform_channels": (lambda: prelu_model([[0.1], [0.1], [0.1]]), "prelu_scalar", "LeakyRelu",
                               {"PRelu"}),
    "layer_norm_pow_opset17": (layer_norm_model, "layer_norm", "LayerNormalization",
                               {"ReduceMean", "Sub", "Pow", "Sqrt", "Div", "Mul", "Add"}),
    "layer_norm_mul_opset18": (lambda: layer_norm_model(opset=18, square="Mul"), "layer_norm",
                               "LayerNormalization", {"ReduceMean", "Sub", "Mul", "Sqrt", "Div", "Add"}),
    "layer_norm_no_bias": (lambda: layer_norm_model(bias=False, gamma_shape=(1, 1, 8)), "layer_norm",
                           "LayerNormalization", {"ReduceMean", "Sub", "Pow", "Sqrt", "Div", "Mul", "Add"}),
    "gelu_half_input": (gelu_model, "gelu", "Gelu", {"Erf", "Div", "Mul", "Add"}),
    "gelu_half_gate": (lambda: gelu_model("gate"), "gelu", "Gelu", {"Erf", "Div", "Mul", "Add"}),
    "gelu_half_last_mul": (lambda: gelu_model("last", "Mul"), "gelu", "Gelu", {"Erf", "Mul", "Add"}),
}


@functools.cache
def rewritten(case):
    builder, family, _, _ = POSITIVE[case]
    model = builder()
    return model, optimize_model(model, rewrites=[family])


@pytest.mark.parametrize("case", sorted(POSITIVE))
def test_rule_replaces_the_pattern(case):
    fused_op, gone = POSITIVE[case][2:]
    original, optimized = rewritten(case)
    counts = op_counts(optimized)
    assert counts[fused_op] == 1, counts
    assert not gone & set(counts), counts
    assert all(n.domain in ("", "ai.onnx") for n in optimized.graph.node)  # standard ONNX only
    onnx.checker.check_model(optimized, full_check=True)
    # the default pipeline does not do it
    assert fused_op not in op_counts(optimize_model(original)) or fused_op in op_counts(original)


@pytest.mark.parametrize("case", sorted(POSITIVE))
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3), length=st.integers(1, 9),
       scale=st.sampled_from([0.1, 1.0, 4.0, 30.0]))
def test_rule_keeps_the_function(case, seed, n, length, scale):
    original, optimized = rewritten(case)
    feed = random_feed(original, seed, {"N": n, "L": length, "T": length}, scale)
    assert_same_function(original, optimized, feed)


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(), (1,), (3, 1), (1, 3, 1), (1, 1, 5)]), seed=st.integers(0, 2**32 - 1),
       magnitude=st.floats(-3, 3))
def test_div_by_random_constant(shape, seed, magnitude):
    rng = np.random.default_rng(seed)
    divisor = rng.choice([-1.0, 1.0], size=shape) * 10.0 ** (magnitude + rng.uniform(-1, 1, size=shape))
    model = div_model(divisor.astype(np.float32)) if shape != (1, 1, 5) else build(
        [node("Div", ["x", "c"], "y")], [const("c", divisor)], x_shape=("N", 3, 5))
    optimized = optimize_model(model, rewrites=["div_by_constant"])
    assert op_counts(optimized) == {"Mul": 1}
    assert_same_function(model, optimized, random_feed(model, seed, {"N": 2, "L": 5}))


@settings(max_examples=15, deadline=None)
@given(slope=st.floats(-4, 4, width=32, allow_subnormal=False), seed=st.integers(0, 2**32 - 1))
def test_prelu_random_scalar_slope(slope, seed):
    model = prelu_model(np.full((3, 1), slope, np.float32))
    optimized = optimize_model(model, rewrites=["prelu_scalar"])
    assert op_counts(optimized) == {"LeakyRelu": 1}
    alpha = optimized.graph.node[0].attribute[0]
    assert alpha.name == "alpha" and alpha.f == np.float32(slope)
    assert_same_function(model, optimized, random_feed(model, seed))


def test_float16_hardswish():
    model = hardswish_model("Clip", "Mul", "inner", dtype=np.float16)
    optimized = optimize_model(model, rewrites=["hardswish"])
    assert op_counts(optimized) == {"HardSwish": 1}
    feed = random_feed(model, seed=6, sizes={"N": 3, "L": 50})
    for want, got in zip(run_all(model, feed), run_all(optimized, feed), strict=True):
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------ negative cases

def _shared_gate():
    """Clip(x + 3, 0, 6) / 6 whose Clip is also a model output: not removable."""
    nodes = [node("Add", ["x", "three"], "a"), node("Clip", ["a", "zero", "six"], "clamped"),
             node("Div", ["clamped", "six"], "y")]
    return build(nodes, hardswish_inits(), outputs=("y", "clamped"))


def _int_hardswish():
    nodes = [node("Add", ["x", "three"], "a"), node("Clip", ["a", "zero", "six"], "c"),
             node("Mul", ["x", "c"], "m"), node("Div", ["m", "six"], "y")]
    inits = [const(n, v, np.int64) for n, v in (("three", 3), ("zero", 0), ("six", 6))]
    return build(nodes, inits, x_type=TensorProto.INT64)


# case -> (builder, family, op that must stay, op that must not appear)
NEGATIVE = {
    "div_by_constant_with_zero": (lambda: div_model([[1.0], [0.0], [2.0]]), "div_by_constant", "Div", "Mul"),
    "div_by_infinity": (lambda: div_model([[1.0], [np.inf], [2.0]]), "div_by_constant", "Div", "Mul"),
    "div_integer": (lambda: div_model(3, dtype=np.int64, x_type=TensorProto.INT64), "div_by_constant", "Div",
                    "Mul"),
    "div_by_input": (lambda: build([node("Div", ["x", "z"], "y")], inputs=("z",)), "div_by_constant", "Div",
                     "Mul"),
    "div_reciprocal_overflows": (lambda: div_model(1e-39), "div_by_constant", "Div", "Mul"),
    "sum_three": (lambda: sum_model(3), "sum_to_add", "Sum", "Add"),
    "hardsigmoid_other_alpha": (lambda: hardsigmoid_times_x(alpha=0.2), "hardswish", "HardSigmoid", "HardSwish"),
    "hardsigmoid_other_beta": (lambda: hardsigmoid_times_x(beta=0.4), "hardswish", "HardSigmoid", "HardSwish"),
    "clip_divided_by_5": (lambda: hardswish_model("Clip", "Div", "gate", divisor=5.0), "hardswish", "Clip",
                          "HardSigmoid"),
    "clip_offset_2": (lambda: hardswish_model("Clip", "Div", offset=2.0), "hardswish", "Clip", "HardSwish"),
    "hardswish_opset13": (lambda: hardswish_model("Clip", "Div", opset=13), "hardswish", "Clip", "HardSwish"),
    "hardswish_from_hardsigmoid_opset13": (lambda: hardsigmoid_times_x(opset=13), "hardswish", "HardSigmoid",
                                           "HardSwish"),
    "hardsigmoid_shared_clip": (_shared_gate, "hardswish", "Clip", "HardSigmoid"),
    "hardswish_integer": (_int_hardswish, "hardswish", "Clip", "HardSwish"),
    "hardswish_double": (lambda: hardswish_model("Clip", "Mul", dtype=np.float64), "hardswish", "Clip",
                         "HardSwish"),  # onnxruntime has no double HardSwish kernel
    "prelu_per_channel": (lambda: prelu_model([[0.1], [0.2], [0.3]]), "prelu_scalar", "PRelu", "LeakyRelu"),
    "prelu_slope_input": (lambda: build([node("PRelu", ["x", "z"], "y")], inputs=("z",)), "prelu_scalar", "PRelu",
                          "LeakyRelu"),
    "layer_norm_opset16": (lambda: layer_norm_model(opset=16), "layer_norm", "ReduceMean", "LayerNormalization"),
    "layer_norm_leading_axis": (lambda: layer_norm_model(axis=1, gamma_shape=(1, 1, 1)), "layer_norm",
                                "ReduceMean", "LayerNormalization"),
    "gelu_opset19": (lambda: gelu_model(opset=19), "gelu", "Erf", "Gelu"),
}


# Below the opset of the fused op the rule itself refuses (optimize_model raises the opset
# first when it can: test_optimize_raises_the_opset_a_rewrite_needs).
OPSET_GATED = {"hardswish_opset13", "hardswish_from_hardsigmoid_opset13", "layer_norm_opset16", "gelu_opset19"}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_look_alike_is_left_alone(case):
    builder, family, kept, absent = NEGATIVE[case]
    model = builder()
    if case in OPSET_GATED:
        ir_model = ir.from_proto(model)
        assert apply_rewrites(ir_model, [family]) == {family: 0}
        counts = op_counts(ir.to_proto(ir_model))
        assert kept in counts and absent not in counts, counts
        return
    optimized = optimize_model(model, rewrites=[family])
    counts = op_counts(optimized)
    assert kept in counts and absent not in counts, counts
    assert op_counts(optimize_model(model)) == counts  # same as without the rewrite
    assert_same_function(model, optimized, random_feed(model, seed=1))


# ------------------------------------------------------------------ API and pipeline


def everything_model():
    """One model with a pattern of each of the simple families in a row."""
    nodes = [node("Div", ["x", "c"], "q"), node("Add", ["q", "three"], "a"), node("Clip", ["a", "zero", "six"], "h"),
             node("Mul", ["q", "h"], "m"), node("Div", ["m", "six"], "hs"), node("PRelu", ["hs", "slope"], "p"),
             node("Sum", ["p", "q"], "y")]
    inits = hardswish_inits() + [const("c", [[2.0], [4.0], [-8.0]]), const("slope", 0.125)]
    return build(nodes, inits)


def test_default_rewrites_change_nothing():
    model = everything_model()
    default = optimize_model(model)
    assert optimize_model(model, rewrites=()).SerializeToString() == default.SerializeToString()
    assert {"Div", "Clip", "PRelu", "Sum"} <= set(op_counts(default))


FUSIONS = [name for name in RULES if name != "hard_activations_to_add_clip"]  # that one lowers HardSwish again


def test_all_families_together_and_counts():
    model = everything_model()
    optimized = optimize_model(model, rewrites=FUSIONS)
    assert op_counts(optimized) == {"Mul": 1, "HardSwish": 1, "LeakyRelu": 1, "Add": 1}
    assert_same_function(model, optimized, random_feed(model, seed=2))

    ir_model = ir.from_proto(model)
    counts = apply_rewrites(ir_model, ["div_by_constant", "hardswish", "prelu_scalar", "sum_to_add", "gelu"])
    assert counts == {"div_by_constant": 2, "hardswish": 1, "prelu_scalar": 1, "sum_to_add": 1, "gelu": 0}
    assert_same_function(model, ir.to_proto(ir_model), random_feed(model, seed=3))


def test_apply_rewrites_matches_min_max_without_the_optimizer():
    model = hardswish_model("MinMax", "Mul", "commuted")
    ir_model = ir.from_proto(model)
    assert apply_rewrites(ir_model, "hardswish") == {"hardswish": 1}
    rewritten_model = ir.to_proto(ir_model)
    assert op_counts(rewritten_model) == {"HardSwish": 1}
    assert_same_function(model, rewritten_model, random_feed(model, seed=4))


def test_shared_divisor_is_rewritten_at_each_use():
    nodes = [node("Div", ["x", "c"], "a"), node("Div", ["a", "c"], "b"), node("Div", ["c", "b"], "y")]
    model = build(nodes, [const("c", [[3.0], [5.0], [0.5]])])
    ir_model = ir.from_proto(model)
    assert apply_rewrites(ir_model, ["div_by_constant"]) == {"div_by_constant": 2}
    result = ir.to_proto(ir_model)
    onnx.checker.check_model(result, full_check=True)
    counts = op_counts(result)
    assert counts["Mul"] == 2 and counts["Div"] == 1  # c / b divides by a tensor
    assert set(counts) == {"Mul", "Div", "Constant"}  # the reciprocals (optimize_model lifts them)
    assert_same_function(model, result, random_feed(model, seed=5))


def test_unknown_rewrite_is_refused_before_anything_changes():
    ir_model = ir.from_proto(everything_model())
    with pytest.raises(ValueError, match="'nope'"):
        apply_rewrites(ir_model, ["div_by_constant", "nope"])
    assert "Div" in {n.op_type for n in ir_model.graph}
    with pytest.raises(ValueError, match="'no_such_rule'"):
        optimize_model(everything_model(), rewrites=["no_such_rule"])


def test_conservative_skips_rewrites():
    model = everything_model()
    counts = op_counts(optimize_model(model, conservative=True, rewrites=list(RULES)))
    assert counts == op_counts(model)


def test_rule_families_are_exposed():
    assert set(RULES) == {"div_by_constant", "sum_to_add", "hardswish", "prelu_scalar", "layer_norm", "gelu",
                          "hard_activations_to_add_clip"}
    assert all(RULES.values())


# -- lowerings: ops a backend has no integer kernel for, rewritten into ops it has ---------

def _hard_activation_model(op, **attrs):
    return build([node(op, ["x"], "y", **attrs)], opset=17)


@pytest.mark.parametrize("op, attrs", [
    ("HardSwish", {}),
    ("HardSigmoid", {}),
    ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.25}),
])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 4.0, 12.0]))
def test_hard_activations_lower_to_add_clip_mul_with_the_same_function(op, attrs, seed, scale):
    model = _hard_activation_model(op, **attrs)
    lowered = optimize_model(model, rewrites=["hard_activations_to_add_clip"])
    counts = op_counts(lowered)
    assert op not in counts and counts["Add"] == 1 and counts["Clip"] == 1
    assert counts["Mul"] == (2 if op == "HardSwish" else 1)
    assert_same_function(model, lowered, random_feed(model, seed=seed, scale=scale))


def test_hard_sigmoid_with_a_non_positive_alpha_is_not_lowered():
    model = _hard_activation_model("HardSigmoid", alpha=-0.2, beta=0.5)
    assert "HardSigmoid" in op_counts(optimize_model(model, rewrites=["hard_activations_to_add_clip"]))


@pytest.mark.parametrize("case, opset", [("hardswish_opset13", 14), ("layer_norm_opset16", 17), ("gelu_opset19", 20)])
def test_optimize_raises_the_opset_a_rewrite_needs(case, opset):
    builder, family, _, fused = NEGATIVE[case]
    model = builder()
    optimized = optimize_model(model, rewrites=[family])
    assert fused in op_counts(optimized)
    assert next(o.version for o in optimized.opset_import if o.domain in ("", "ai.onnx")) == opset
    assert_same_function(model, optimized, random_feed(model, seed=1))
    plain = optimize_model(model)  # without the rewrite the opset stays
    assert next(o.version for o in plain.opset_import if o.domain in ("", "ai.onnx")) < opset
