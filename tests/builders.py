"""Tiny generated ONNX models for unit tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers, opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 15 else 8
    onnx.checker.check_model(model, full_check=True)
    return model


def float_input(name="x", shape=("N", 3, 8, 8)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def conv_bn_relu_model(opset=13, with_dropout=True) -> onnx.ModelProto:
    """x -> Conv -> BatchNorm -> Relu -> [Dropout] -> Identity -> Conv -> GAP -> Flatten -> Gemm."""
    c1, c2 = 4, 6
    inits = [
        _init("w1", RNG.normal(0, 0.5, (c1, 3, 3, 3)).astype(np.float32)),
        _init("gamma", RNG.uniform(0.5, 1.5, c1).astype(np.float32)),
        _init("beta", RNG.normal(0, 0.1, c1).astype(np.float32)),
        _init("mean", RNG.normal(0, 0.1, c1).astype(np.float32)),
        _init("var", RNG.uniform(0.5, 1.5, c1).astype(np.float32)),
        _init("w2", RNG.normal(0, 0.5, (c2, c1, 3, 3)).astype(np.float32)),
        _init("b2", RNG.normal(0, 0.1, c2).astype(np.float32)),
        _init("fc_w", RNG.normal(0, 0.5, (5, c2)).astype(np.float32)),
        _init("fc_b", RNG.normal(0, 0.1, 5).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
    ]
    last = "r1"
    if with_dropout:
        nodes.append(helper.make_node("Dropout", ["r1"], ["d1"], name="drop"))
        last = "d1"
    nodes += [
        helper.make_node("Identity", [last], ["i1"], name="ident"),
        helper.make_node("Conv", ["i1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    if opset < 12:  # Dropout's ratio input and training_mode came later; keep it plain
        pass
    return make_model(nodes, [float_input()], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits, opset)


def branchy_model() -> onnx.ModelProto:
    """Conv -> (Sigmoid, Relu) -> Concat -> MaxPool -> Reshape -> MatMul -> Add -> Softmax.

    Exercises shared Concat parameters, fixed [0, 1] Sigmoid/Softmax outputs, pass-through
    ops and a MatMul with a constant weight.
    """
    inits = [
        _init("w", RNG.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)),
        _init("b", RNG.normal(0, 0.1, 4).astype(np.float32)),
        _init("w_other", RNG.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32)),
        _init("shape", np.array([-1, 8 * 4 * 4], np.int64)),
        _init("mm_w", RNG.normal(0, 0.2, (128, 10)).astype(np.float32)),
        _init("mm_b", RNG.normal(0, 0.1, 10).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
        helper.make_node("Conv", ["x", "w_other"], ["c_other"], name="conv_other"),
        helper.make_node("Relu", ["c_other"], ["r"], name="relu"),
        helper.make_node("Concat", ["s", "r"], ["cat"], name="concat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["mp", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "mm_w"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "mm_b"], ["logits"], name="add"),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1),
    ]
    return make_model(
        nodes, [float_input()], [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 10])], inits
    )


def two_input_model() -> onnx.ModelProto:
    """Two float inputs added, then a Conv: for .npz calibration data."""
    inits = [_init("w", RNG.normal(0, 0.5, (2, 3, 1, 1)).astype(np.float32))]
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w"], ["y"], name="conv"),
    ]
    return make_model(
        nodes,
        [float_input("a", ("N", 3, 4, "W")), float_input("b", ("N", 3, 4, "W"))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, "W"])],
        inits,
    )


def conv_affine_model() -> onnx.ModelProto:
    """Paddle-style exports: Conv/ConvTranspose then Add of a [1,C,1,1] bias, Mul, BN."""
    c = 4
    inits = [
        _init("w", RNG.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32)),
        _init("bias", RNG.normal(0, 0.1, (1, c, 1, 1)).astype(np.float32)),
        _init("scale", RNG.uniform(0.5, 2, (1, c, 1, 1)).astype(np.float32)),
        _init("wt", RNG.normal(0, 0.5, (c, 2, 2, 2)).astype(np.float32)),
        _init("bias_t", RNG.normal(0, 0.1, (1, 2, 1, 1)).astype(np.float32)),
        _init("gamma", RNG.uniform(0.5, 1.5, 2).astype(np.float32)),
        _init("beta", RNG.normal(0, 0.1, 2).astype(np.float32)),
        _init("mean", RNG.normal(0, 0.1, 2).astype(np.float32)),
        _init("var", RNG.uniform(0.5, 1.5, 2).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "bias"], ["cb"], name="add_bias"),
        helper.make_node("Mul", ["scale", "cb"], ["cs"], name="mul_scale"),
        helper.make_node("Relu", ["cs"], ["r"], name="relu"),
        helper.make_node("ConvTranspose", ["r", "wt"], ["t"], name="deconv", strides=[2, 2]),
        helper.make_node("Add", ["t", "bias_t"], ["tb"], name="add_bias_t"),
        helper.make_node("BatchNormalization", ["tb", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    return make_model(nodes, [float_input()], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 16, 16])], inits)


def calibration_folder(tmp_path, files: dict):
    """tmp_path/calib with {name: array (.npy) | dict (.npz) | bytes | callable(path)}."""
    folder = tmp_path / "calib"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        if callable(content):
            content(folder / name)
        elif isinstance(content, bytes):
            (folder / name).write_bytes(content)
        elif isinstance(content, dict):
            np.savez(folder / name, **content)
        else:
            np.save(folder / name, content)
    return folder
