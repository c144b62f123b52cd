"""Weight-only quantization: int8/int4 block-quantized MatMul/Gemm weights, float activations.

Each MatMul/Gemm with a constant weight becomes

    DequantizeLinear(W_q [K, N] int4|uint4|int8|uint8, scale [K/B, N], zero_point,
                     axis=0, block_size=B) -> MatMul [-> Add(bias)]

standard ONNX at opset 21, which onnxruntime (>= 1.20; checked on 1.32 for all four
types) fuses into its MatMulNBits kernel, so the weight stays packed in memory and is
dequantized block by block inside the kernel.  Weights are rounded to nearest
(``rtn``) or by GPTQ (``gptq``), which needs the calibration activations of each
layer's input, reduced here to X^T X (``collect_hessians``; memory K x K per input).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir

from . import runtime
from .checks import ort_message
from .dataset import input_specs, iter_samples
from .errors import CalibrationDataError
from .qdq.blockwise import IR_TYPES, BlockQuantized, WeightGrid, gptq, quantize_blocks
from .qdq.matmuls import Rewriter, WeightedNode, plan_weighted
from .qdq.plan import QuantPlan
from .qdq.tables import EMBEDDING_BITS, Table, gather_quantized, plan_tables

OPSET = 21  # DequantizeLinear with block_size (and int4/uint4)


def grid_of(config) -> WeightGrid:
    return WeightGrid(config.weight_bits, config.weight_signed, config.weight_symmetric)


def form(config) -> str:
    kind = "symmetric" if config.weight_symmetric else "asymmetric"
    return (f"weight-only: {grid_of(config).dtype} weights, {kind}, blocks of {config.block_size} "
            f"({config.weight_algorithm}), float activations")


def plan_weight_only(model: ir.Model, skip, config) -> tuple[QuantPlan, list]:
    """MatMul/Gemm weights, and with ``config.embeddings`` the Gather tables (embeddings)."""
    plan, found = plan_weighted(model, skip, form(config), "weight-only")
    plan.target = config.resolved_target
    if config.embeddings:
        plan_tables(model, plan, found, replace(grid_of(config), bits=EMBEDDING_BITS), config.block_size, "weight-only")
    return plan, found


def collect_hessians(model: onnx.ModelProto, tensors: Iterable[str], dataset) -> tuple[dict[str, np.ndarray], int]:
    """{tensor: X^T X} over ``dataset`` for each named activation (its last axis is K,
    every other axis a row), and the number of samples."""
    names = list(dict.fromkeys(tensors))
    session = runtime.session(model, extra_outputs=names)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for sample in iter_samples(dataset, input_specs(model)):
        try:
            arrays = session.run(names, sample)
        except Exception as exc:
            raise CalibrationDataError(f"onnxruntime failed on calibration sample {count}: {ort_message(exc)}") from exc
        for name, array in zip(names, arrays):
            rows = np.asarray(array, np.float64).reshape(-1, array.shape[-1])
            rows = rows[np.isfinite(rows).all(axis=1)]
            product = rows.T @ rows
            sums[name] = product if name not in sums else sums[name] + product
        count += 1
    return sums, count


def quantize_weight(item: WeightedNode, config, hessians: Mapping[str, np.ndarray] | None) -> BlockQuantized:
    grid = grid_of(config)
    if config.weight_algorithm == "gptq" and hessians is not None and item.node.inputs[0].name in hessians:
        return gptq(item.weight, hessians[item.node.inputs[0].name], config.block_size, grid)
    return quantize_blocks(item.weight, config.block_size, grid)


def insert_weight_only(model: ir.Model, found: list[WeightedNode], config,
                       hessians: Mapping[str, np.ndarray] | None = None) -> None:
    """Rewrite every node of ``found`` (from ``plan_weight_only`` on ``model``) in place."""
    rewrite = Rewriter(model.graph)
    for item in found:
        if isinstance(item, Table):
            gather_quantized(rewrite, item)
            continue
        node = item.node
        quantized = quantize_weight(item, config, hessians)
        base = node.name or "matmul"
        dtype = IR_TYPES[quantized.grid.dtype]
        q = rewrite.constant(f"{base}_weight_quantized", ir.tensor(quantized.q.astype(dtype)))
        scale = rewrite.constant(f"{base}_weight_scale", quantized.scale)
        inputs = [q, scale]
        if not (quantized.grid.signed and quantized.grid.symmetric):  # else the zero point is 0: omitted
            inputs.append(rewrite.constant(f"{base}_weight_zero_point", ir.tensor(quantized.zero_point.astype(dtype))))
        dq = rewrite.node("DequantizeLinear", inputs, f"{base}_weight", axis=0, block_size=config.block_size)
        dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(quantized.q.shape)
        if node.op_type == "MatMul":  # the node stays, reading the dequantized weight
            model.graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
            continue
        matmul = rewrite.node("MatMul", [node.inputs[0], dq.outputs[0]], base)
        nodes = [dq, matmul]
        if item.bias is not None:
            nodes.append(rewrite.node("Add", [matmul.outputs[0], rewrite.constant(f"{base}_bias", item.bias)], base))
        rewrite.replace(node, nodes, nodes[-1].outputs[0])
