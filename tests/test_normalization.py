"""Normalization arithmetic written out as ops is found by structure and kept float."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from builders import _init, make_model
from conftest import run, sqnr_db
from quantizer import quantize_model
from quantizer.config import QuantizationConfig
from quantizer.algorithms.normalization import REASON, normalization_nodes

D, T = 32, 16


def _ln_nodes(form: str, x: str, out: str) -> tuple[list, list]:
    """A normalization of ``x`` over its last axis in one of the written-out forms."""
    n = helper.make_node
    inits = [_init("axes", np.array([-1], np.int64)), _init("eps", np.array(1e-5, np.float32)),
             _init("inv_d", np.array(1.0 / D, np.float32)), _init("two", np.array(2.0, np.float32)),
             _init("gamma", np.linspace(0.5, 1.5, D).astype(np.float32)),
             _init("beta", np.linspace(-0.2, 0.2, D).astype(np.float32))]
    if form == "reducemean_pow_sqrt_div":  # the exporter's LayerNorm
        nodes = [n("ReduceMean", [x, "axes"], ["mean"], name="mean"), n("Sub", [x, "mean"], ["d"], name="center"),
                 n("Pow", ["d", "two"], ["d2"], name="square"), n("ReduceMean", ["d2", "axes"], ["var"], name="var"),
                 n("Add", ["var", "eps"], ["var_eps"], name="add_eps"), n("Sqrt", ["var_eps"], ["std"], name="sqrt"),
                 n("Div", ["d", "std"], ["normed"], name="normalize")]
    elif form == "reducesum_mul_reciprocal":  # the byte-level classifier's LayerNorm
        nodes = [n("ReduceSum", [x, "axes"], ["sum"], name="sum"), n("Mul", ["sum", "inv_d"], ["mean"], name="mean"),
                 n("Sub", [x, "mean"], ["d"], name="center"), n("Mul", ["d", "d"], ["d2"], name="square"),
                 n("ReduceSum", ["d2", "axes"], ["ssum"], name="ssum"), n("Mul", ["ssum", "inv_d"], ["var"], name="var"),
                 n("Add", ["var", "eps"], ["var_eps"], name="add_eps"), n("Sqrt", ["var_eps"], ["std"], name="sqrt"),
                 n("Reciprocal", ["std"], ["rstd"], name="rstd"), n("Mul", ["d", "rstd"], ["normed"], name="normalize")]
    elif form == "rmsnorm":
        nodes = [n("Mul", [x, x], ["x2"], name="square"), n("ReduceMean", ["x2", "axes"], ["ms"], name="ms"),
                 n("Add", ["ms", "eps"], ["ms_eps"], name="add_eps"), n("Sqrt", ["ms_eps"], ["rms"], name="sqrt"),
                 n("Reciprocal", ["rms"], ["rrms"], name="rstd"), n("Mul", [x, "rrms"], ["normed"], name="normalize")]
    else:
        raise ValueError(form)
    nodes += [n("Mul", ["normed", "gamma"], ["scaled"], name="gamma_mul"),
              n("Add", ["scaled", "beta"], [out], name="beta_add")]
    return nodes, inits


FORMS = ["reducemean_pow_sqrt_div", "reducesum_mul_reciprocal", "rmsnorm"]
STATISTIC_NODES = {"reducemean_pow_sqrt_div": {"mean", "center", "square", "var", "add_eps", "sqrt", "normalize"},
                   "reducesum_mul_reciprocal": {"sum", "mean", "center", "square", "ssum", "var", "add_eps", "sqrt",
                                                "rstd", "normalize"},
                   "rmsnorm": {"square", "ms", "add_eps", "sqrt", "rstd", "normalize"}}


def _block_model(form: str) -> onnx.ModelProto:
    """MatMul -> normalization -> MatMul: rows of very different scale (as tokens are)."""
    rng = np.random.default_rng(0)
    nodes, inits = _ln_nodes(form, "h", "ln")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj_in"), *nodes,
             helper.make_node("MatMul", ["ln", "w2"], ["y"], name="proj_out")]
    inits += [_init("w1", rng.normal(0, 0.3, (D, D)).astype(np.float32)),
              _init("w2", rng.normal(0, 0.3, (D, D)).astype(np.float32))]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D])], inits, opset=18)


def _samples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    row_scale = np.geomspace(0.25, 4.0, T).astype(np.float32)[None, :, None]  # quiet and loud rows
    return [{"x": (rng.normal(0, 1, (1, T, D)).astype(np.float32) * row_scale)} for _ in range(count)]


@pytest.mark.parametrize("form", FORMS)
def test_finds_the_normalization_by_structure(form):
    found = normalization_nodes(ir.from_proto(_block_model(form)).graph)
    assert set(found) == STATISTIC_NODES[form]
    assert set(found.values()) == {REASON}


def test_a_mean_that_is_not_normalized_is_left_alone():
    """Squeeze-excitation style: ReduceMean feeding a MatMul and a gate, no square root."""
    n = helper.make_node
    rng = np.random.default_rng(1)
    nodes = [n("ReduceMean", ["x", "axes"], ["m"], name="pool"), n("MatMul", ["m", "w"], ["g"], name="fc"),
             n("Sigmoid", ["g"], ["s"], name="gate"), n("Mul", ["x", "s"], ["y"], name="excite")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D])],
                       [_init("axes", np.array([1], np.int64)), _init("w", rng.normal(size=(D, D)).astype(np.float32))], opset=18)
    assert normalization_nodes(ir.from_proto(model).graph) == {}


def _quantized_sources(node: ir.Node) -> set[str]:
    """The float tensors that reach ``node`` through a Q/DQ pair."""
    sources = set()
    for value in node.inputs:
        dq = value.producer() if value is not None else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = dq.inputs[0].producer()
            sources.add(q.inputs[0].name if q is not None else dq.inputs[0].name)
    return sources


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
@pytest.mark.parametrize("form", ["reducesum_mul_reciprocal", "rmsnorm"])
def test_kept_float_and_far_more_accurate(form, target):
    model = _block_model(form)
    calib, held_out = _samples(8, 0), _samples(4, 1)
    kept = quantize_model(model, calib, "min_max_asym", target=target)
    pieces = quantize_model(model, calib, config=QuantizationConfig(method="min_max_asym", target=target,
                                                                    protect_normalization=False))
    graph = ir.from_proto(kept.model).graph
    by_name = {node.name: node for node in graph}
    for name in STATISTIC_NODES[form]:  # still there, computing in float: no DQ in front of it
        assert name in by_name
        assert _quantized_sources(by_name[name]) <= {"h"}, name  # only the block's input is int8
    assert {by_name[n].inputs[0].producer().op_type for n in ("proj_in", "proj_out")} == {"DequantizeLinear"}
    kept_db = min(sqnr_db(run(model, s), run(kept.model, s)) for s in held_out)
    pieces_db = min(sqnr_db(run(model, s), run(pieces.model, s)) for s in held_out)
    assert kept_db > 17.0  # what int8 at the block's input and output leaves
    # Quantized piece by piece: below 0 dB on tensorrt (kept: 18.9).  On ort-cpu the pieces
    # that only float ops read stay float anyway (the placement's own rule), which leaves
    # 22.2-22.5 dB there against 24.6-24.7 kept (13-15 dB before that rule).
    assert kept_db > pieces_db + {"ort-cpu": 1.5, "tensorrt": 5.0}[target]
