"""Stage 1: the optimized model is the same function, in standard ONNX, opset >= 13."""

import collections

import numpy as np
import onnx
import pytest

from builders import branchy_model, conv_affine_model, conv_bn_relu_model
from conftest import SAMPLE_MODEL, run
from quantizer import ModelError, UsageError, optimize_model


def op_counts(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def test_sample_model_equivalent_on_real_data(digits_test):
    x, _ = digits_test
    optimized = optimize_model(SAMPLE_MODEL)
    np.testing.assert_allclose(run(optimized, {"input": x}), run(SAMPLE_MODEL, {"input": x}), atol=1e-4)
    counts = op_counts(optimized)
    assert "BatchNormalization" not in counts  # folded into the Convs
    assert counts["Conv"] == 3


@pytest.mark.parametrize("opset", [11, 13])
def test_folds_batchnorm_dropout_identity_and_converts_opset(opset):
    model = conv_bn_relu_model(opset=opset)
    optimized = optimize_model(model)
    counts = op_counts(optimized)
    assert not {"BatchNormalization", "Dropout", "Identity"} & set(counts)
    assert all(o.version >= 13 for o in optimized.opset_import if o.domain in ("", "ai.onnx"))
    assert all(n.domain in ("", "ai.onnx") for n in optimized.graph.node)  # standard ONNX only
    names = [n.name for n in optimized.graph.node]
    assert all(names) and len(set(names)) == len(names)
    onnx.checker.check_model(optimized, full_check=True)
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(optimized, {"x": x}), run(model, {"x": x}), rtol=1e-4, atol=1e-5)


def test_random_inputs_branchy_model():
    model = branchy_model()
    optimized = optimize_model(model)
    for seed in range(3):
        x = np.random.default_rng(seed).normal(size=(2, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(run(optimized, {"x": x}), run(model, {"x": x}), rtol=1e-5, atol=1e-6)


def test_input_shape_fixing():
    optimized = optimize_model(conv_bn_relu_model(), {"x": [2, 3, 8, 8]})
    dims = [d.dim_value for d in optimized.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 8, 8]


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({"nope": [1, 3, 8, 8]}, "unknown input 'nope'"),
        ({"x": [1, 3, 8]}, "rank 3"),
        ({"x": [1, 4, 8, 8]}, "fixes that input"),
    ],
)
def test_input_shape_errors(shapes, message):
    with pytest.raises(UsageError, match=message):
        optimize_model(conv_bn_relu_model(), shapes)


def test_too_new_opset_is_refused():
    model = conv_bn_relu_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    with pytest.raises(ModelError, match="newer than the installed onnx"):
        optimize_model(model)


def test_per_channel_affine_folds_into_conv_and_conv_transpose():
    model = conv_affine_model()
    optimized = optimize_model(model)
    assert op_counts(optimized) == {"Conv": 1, "Relu": 1, "ConvTranspose": 1}
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(optimized, {"x": x}), run(model, {"x": x}), rtol=1e-4, atol=1e-5)


def test_scalar_mul_folds_into_padded_conv():
    from builders import _init, float_input, make_model
    from onnx import TensorProto, helper

    rng = np.random.default_rng(2)
    model = make_model(
        [helper.make_node("Mul", ["x", "s"], ["xs"], name="prescale"),
         helper.make_node("Conv", ["xs", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [float_input()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [_init("s", np.float32(1 / 255)), _init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
         _init("b", rng.normal(size=4).astype(np.float32))],
    )
    optimized = optimize_model(model)
    assert op_counts(optimized) == {"Conv": 1}
    x = rng.uniform(0, 255, size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(optimized, {"x": x}), run(model, {"x": x}), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [lambda: onnx.load(SAMPLE_MODEL), branchy_model, conv_affine_model,
                                   lambda: conv_bn_relu_model(opset=11)])
@pytest.mark.parametrize("rewrites", [(), ("div_by_constant", "sum_to_add", "prelu_scalar", "hardswish"),
                                      ("div_by_constant", "layer_norm", "gelu", "hard_activations_to_add_clip")])
def test_one_first_optimizer_round_gives_the_graph_of_two(monkeypatch, build, rewrites):
    """Stage 1 runs onnxscript's optimizer for one round before the folding rules (it runs
    again after them): the graph is the one two rounds give, node for node."""
    import quantizer.optimize as optimize

    model = build()
    fast = optimize_model(model, rewrites=rewrites)
    monkeypatch.setattr(optimize, "FIRST_PASS_ITERATIONS", 2)
    slow = optimize_model(model, rewrites=rewrites)
    assert [n.SerializeToString() for n in fast.graph.node] == [n.SerializeToString() for n in slow.graph.node]
    assert sorted(i.SerializeToString() for i in fast.graph.initializer) == \
        sorted(i.SerializeToString() for i in slow.graph.initializer)


def test_two_outputs_joined_by_a_removed_no_op_keep_their_own_names():
    """A Reshape to the same shape between two graph outputs is removed by the optimizer;
    the output it made must keep its name (found by the property tests: the outputs came
    out as [t1, t1] for [t1, t0], so a caller reading 't0' got nothing)."""
    from onnx import TensorProto, helper

    shape = [1, 2, 1, 1]
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["t0"]),
             helper.make_node("Reshape", ["t0", "k"], ["t1"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("t1", TensorProto.FLOAT, shape),
                               helper.make_tensor_value_info("t0", TensorProto.FLOAT, shape)],
                              [onnx.numpy_helper.from_array(np.array(shape, np.int64), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    optimized = optimize_model(model)
    assert [o.name for o in optimized.graph.output] == ["t1", "t0"]
    onnx.checker.check_model(optimized, full_check=True)
    x = {"x": np.random.default_rng(0).normal(size=(1, 2, 4, 4)).astype(np.float32)}
    for want, got in zip(run(model, x), run(optimized, x)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
