"""Dynamic quantization: int8 weights, activations quantized at run time.

Every MatMul/Gemm with a constant weight becomes, in the form onnxruntime's CPU provider
fuses (into DynamicQuantizeMatMul, or DynamicQuantizeLinear + MatMulIntegerToFloat when
several MatMuls read the same activation and share its quantization):

    x -> DynamicQuantizeLinear -> (x_q uint8, x_scale, x_zero_point)
    MatMulInteger(x_q, W_q int8 [K, N], x_zero_point, 0) -> Cast(float)
      -> Mul(x_scale * w_scale[N]) [-> Add(bias)]

Weights are symmetric per output channel, in the target's weight range ([-63, 63] on
x86 without VNNI, whose u8 x s8 kernels saturate pairs of products in int16).  No
calibration: the activation's range is its min/max on each run.  Conv stays float:
onnxruntime's ConvInteger has no fast kernel (its QLinearConv is the static mode's).
Embedding tables (Gather of a constant) become 8-bit GatherBlockQuantized (qdq/tables.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .qdq.matmuls import Rewriter, plan_weighted, weight_key
from .qdq.params import quantize_weight, weight_scales
from .qdq.blockwise import WeightGrid
from .qdq.plan import QuantPlan
from .qdq.tables import EMBEDDING_BITS, Table, gather_quantized, plan_tables


def form(qmax: int) -> str:
    return f"dynamic: uint8 activations quantized at run time, int8 per-channel weights [-{qmax}, {qmax}]"


# Embedding tables: 8-bit asymmetric blocks of 32 along each row (GatherBlockQuantized).
TABLE_GRID, TABLE_BLOCK = WeightGrid(EMBEDDING_BITS, signed=True, symmetric=False), 32


def plan_dynamic(model: ir.Model, skip, target, embeddings: bool = True) -> tuple[QuantPlan, list]:
    plan, found = plan_weighted(model, skip, form(target.weights.qmax), "dynamic")
    plan.target = target
    if embeddings:
        plan_tables(model, plan, found, TABLE_GRID, TABLE_BLOCK, "dynamic")
    return plan, found


def insert_dynamic(model: ir.Model, found: list, qmax: int) -> None:
    """Rewrite every node of ``found`` (from ``plan_dynamic`` on ``model``) in place."""
    graph = model.graph
    rewrite = Rewriter(graph)
    quantized_inputs: dict[str, ir.Node] = {}  # one DynamicQuantizeLinear per activation
    weights: dict[tuple, tuple[ir.Value, ir.Value, ir.Value]] = {}  # weight_key -> (w_q, w_zero, w_scale)
    for item in found:
        if isinstance(item, Table):
            gather_quantized(rewrite, item)
            continue
        node, x = item.node, item.node.inputs[0]
        dql = quantized_inputs.get(x.name)
        if dql is None:
            dql = rewrite.node("DynamicQuantizeLinear", [x], x.name, outputs=3)
            graph.insert_before(node, dql)
            quantized_inputs[x.name] = dql
        x_q, x_scale, x_zero = dql.outputs
        base = node.name or "matmul"
        key = weight_key(item)
        if key not in weights:  # a weight several nodes read is stored once
            scales = weight_scales(item.weight, 1, qmax)
            weights[key] = (rewrite.constant(f"{base}_weight_quantized", quantize_weight(item.weight, scales, 1, qmax)),
                            rewrite.constant(f"{base}_weight_zero_point", np.zeros(scales.shape, np.int8)),
                            rewrite.constant(f"{base}_weight_scale", scales))
        w_q, w_zero, w_scale = weights[key]
        integer = rewrite.node("MatMulInteger", [x_q, w_q, x_zero, w_zero], base)
        cast = rewrite.node("Cast", [integer.outputs[0]], base, to=int(ir.DataType.FLOAT))
        # Its own scale product: onnxruntime fuses the Mul only when it has one consumer.
        scale = rewrite.node("Mul", [x_scale, w_scale], f"{base}_scale")
        scaled = rewrite.node("Mul", [cast.outputs[0], scale.outputs[0]], base)
        nodes = [integer, cast, scale, scaled]
        if item.bias is not None:
            nodes.append(rewrite.node("Add", [scaled.outputs[0], rewrite.constant(f"{base}_bias", item.bias)], base))
        rewrite.replace(node, nodes, nodes[-1].outputs[0])
