"""Weight-only quantization: int8/int4 block-quantized MatMul/Gemm weights, float activations.

Each MatMul/Gemm with a constant weight becomes

    DequantizeLinear(W_q [K, N] int4|uint4|int8|uint8, scale [K/B, N], zero_point,
                     axis=0, block_size=B) -> MatMul [-> Add(bias)]

standard ONNX at opset 21, which onnxruntime (>= 1.20; checked on 1.32 for all four
types) fuses into its MatMulNBits kernel, so the weight stays packed in memory and is
dequantized block by block inside the kernel.  A weight several nodes read is stored
once, as MatMulNBits nodes (com.microsoft) of one packed weight (``insert_weight_only``).  Weights are rounded to nearest
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
from .qdq.matmuls import Rewriter, WeightedNode, plan_weighted, weight_key
from .qdq.plan import QuantPlan
from .qdq.tables import EMBEDDING_BITS, MS_DOMAIN, Table, gather_quantized, plan_tables

OPSET = 21  # DequantizeLinear with block_size (and int4/uint4)
# What onnxruntime gives the MatMulNBits it fuses a DequantizeLinear -> MatMul into (its
# session.qdq_matmulnbits_accuracy_level default: int8 activations inside the kernel).
NBITS_ACCURACY_LEVEL = 4


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


def quantize_weight(items: list[WeightedNode], config, hessians: Mapping[str, np.ndarray] | None) -> BlockQuantized:
    """The block-quantized weight that ``items`` (nodes reading one weight, ``weight_key``)
    share; GPTQ weighs the rounding error over all their inputs (the sum of their X^T X)."""
    grid = grid_of(config)
    weight = items[0].weight
    if config.weight_algorithm == "gptq" and hessians is not None:
        inputs = dict.fromkeys(item.node.inputs[0].name for item in items)
        found = [hessians[name] for name in inputs if name in hessians]
        if found:
            return gptq(weight, np.sum(found, axis=0) if len(found) > 1 else found[0], config.block_size, grid)
    return quantize_blocks(weight, config.block_size, grid)


def nbits_arrays(quantized: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``quantized`` as onnxruntime's MatMulNBits reads it: B ``[N, blocks, block_size *
    bits / 8]`` uint8 (4 bits: two weights a byte, the first in the low nibble; K padded
    to whole blocks), scales ``[N * blocks]`` and zero points (uint8, 4 bits packed two a
    byte along the blocks), or None where every zero point is the default 2^(bits-1)."""
    grid, size = quantized.grid, quantized.block_size
    k, n = quantized.q.shape
    blocks = -(-k // size)
    shift = 1 << (grid.bits - 1) if grid.signed else 0  # int4 [-8, 7] -> uint4 [0, 15]
    q = np.pad(quantized.q.astype(np.int32) + shift, ((0, blocks * size - k), (0, 0)))
    q = q.T.reshape(n, blocks, size).astype(np.uint8)
    b = q[..., 0::2] | (q[..., 1::2] << 4) if grid.bits == 4 else q
    scales = np.ascontiguousarray(quantized.scale.T, dtype=np.float32).reshape(-1)
    if grid.signed and grid.symmetric:  # zero point 0 + shift: MatMulNBits' default
        return np.ascontiguousarray(b), scales, None
    zero = (quantized.zero_point.astype(np.int32) + shift).T.astype(np.uint8)  # [N, blocks]
    if grid.bits == 4:
        zero = np.pad(zero, ((0, 0), (0, blocks % 2)))
        zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return np.ascontiguousarray(b), scales, np.ascontiguousarray(zero).reshape(-1)


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def insert_weight_only(model: ir.Model, found: list[WeightedNode], config,
                       hessians: Mapping[str, np.ndarray] | None = None) -> None:
    """Rewrite every node of ``found`` (from ``plan_weight_only`` on ``model``) in place.

    A weight that one node reads becomes DequantizeLinear -> MatMul, which onnxruntime
    fuses into MatMulNBits.  A weight that several nodes read (``weight_key``: a model
    that reuses its layers) is quantized once and stored once, and each reader becomes a
    MatMulNBits (com.microsoft) of the one packed weight: onnxruntime fuses no
    DequantizeLinear whose integers or scales another node reads, and a DequantizeLinear
    it runs dequantizes the whole weight on every run (4x slower than float on a
    weight-tied 15-layer encoder), while a copy per reader made the "quantized" model
    larger than the float one.  Its accuracy level is the one onnxruntime gives the
    fused form by default (session.qdq_matmulnbits_accuracy_level)."""
    rewrite = Rewriter(model.graph)
    readers: dict[tuple, list[WeightedNode]] = {}
    for item in found:
        if not isinstance(item, Table):
            readers.setdefault(weight_key(item), []).append(item)
    quantized_of: dict[tuple, BlockQuantized] = {}
    packed: dict[tuple, list[ir.Value]] = {}  # weight_key -> MatMulNBits' B, scales[, zero points]
    dequantized: dict[tuple, list[ir.Value]] = {}  # weight_key -> DequantizeLinear's inputs
    for item in found:
        if isinstance(item, Table):
            gather_quantized(rewrite, item)
            continue
        node = item.node
        base = node.name or "matmul"
        key = weight_key(item)
        if key not in quantized_of:
            quantized_of[key] = quantize_weight(readers[key], config, hessians)
        quantized = quantized_of[key]
        if len(readers[key]) > 1 and (_rank(node.inputs[0]) or 0) >= 2:
            if key not in packed:
                b, scales, zero = nbits_arrays(quantized)
                packed[key] = [rewrite.constant(f"{base}_weight_nbits", b),
                               rewrite.constant(f"{base}_weight_nbits_scale", scales)]
                if zero is not None:
                    packed[key].append(rewrite.constant(f"{base}_weight_nbits_zero_point", zero))
            k, n = quantized.q.shape
            matmul = rewrite.node("MatMulNBits", [node.inputs[0], *packed[key]], base, domain=MS_DOMAIN, K=k, N=n,
                                  bits=quantized.grid.bits, block_size=quantized.block_size,
                                  accuracy_level=NBITS_ACCURACY_LEVEL)
            rewrite.graph.opset_imports.setdefault(MS_DOMAIN, 1)
            nodes = [matmul]
            if item.bias is not None:
                nodes.append(rewrite.node("Add", [matmul.outputs[0], rewrite.constant(f"{base}_bias", item.bias)],
                                          base))
            rewrite.replace(node, nodes, nodes[-1].outputs[0])
            continue
        if key not in dequantized:
            dtype = IR_TYPES[quantized.grid.dtype]
            dequantized[key] = [rewrite.constant(f"{base}_weight_quantized", ir.tensor(quantized.q.astype(dtype))),
                                rewrite.constant(f"{base}_weight_scale", quantized.scale)]
            if not (quantized.grid.signed and quantized.grid.symmetric):  # else the zero point is 0: omitted
                dequantized[key].append(rewrite.constant(f"{base}_weight_zero_point",
                                                         ir.tensor(quantized.zero_point.astype(dtype))))
        dq = rewrite.node("DequantizeLinear", dequantized[key], f"{base}_weight", axis=0,
                          block_size=config.block_size)
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
