"""Embedding tables: a constant ``[V, D]`` table read by Gather along axis 0, quantized in
blocks along each row and emitted as onnxruntime's GatherBlockQuantized (com.microsoft),
which gathers the quantized rows and dequantizes only them.  Dynamic and weight-only
modes both use it; 8 bits (the rows feed a LayerNorm directly: 4-bit tables cost 2.2 dB
of output SQNR on the MiniLM encoder)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .blockwise import IR_TYPES, WeightGrid, quantize_blocks
from .matmuls import Rewriter
from .plan import QuantPlan, _is_constant, _is_float

EMBEDDING_BITS = 8
MS_DOMAIN = "com.microsoft"


@dataclass
class Table:
    """A Gather's constant [V, D] table, quantized in blocks of ``block_size`` along D."""

    node: ir.Node
    table: np.ndarray
    grid: WeightGrid
    block_size: int


def _table(node: ir.Node, block_size: int) -> np.ndarray | str:
    """The constant [V, D] table a Gather reads rows of, or why it stays float."""
    data = node.inputs[0]
    if not _is_constant(data) or not _is_float(data) or not _is_float(node.outputs[0]):
        return "the Gather's data is not a constant float table"
    table = data.const_value.numpy()
    axis = node.attributes["axis"].value if "axis" in node.attributes else 0
    if table.ndim != 2 or axis not in (0, -2):
        return "only 2-D tables gathered along axis 0 are quantized"
    if table.shape[1] % block_size:
        return f"the table's row length {table.shape[1]} is not a multiple of `block_size` {block_size}"
    if not np.isfinite(table).all():  # e.g. chython-rxnmap's -inf attention bias of padding
        return "the table holds inf or NaN values, which no integer block can represent"
    return table.astype(np.float32)


def table_form(mode: str, grid: WeightGrid, block_size: int) -> str:
    return f"{mode}: {grid.dtype} embedding table, blocks of {block_size} along each row (GatherBlockQuantized)"


def plan_tables(model: ir.Model, plan: QuantPlan, found: list, grid: WeightGrid, block_size: int, mode: str) -> None:
    """Add the Gather tables of ``model`` (not excluded) to ``plan`` and ``found``."""
    for node in model.graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or plan.float_reasons.get(node.name) == "excluded":
            continue
        table = _table(node, block_size)
        if isinstance(table, str):
            plan.float_reasons[node.name] = table
            continue
        plan.float_reasons.pop(node.name, None)
        plan.quantized_nodes.append(node)
        plan.forms[node.name] = table_form(mode, grid, block_size)
        found.append(Table(node, table, grid, block_size))


def gather_quantized(rewrite: Rewriter, item: Table) -> None:
    """Gather(table, ids) -> GatherBlockQuantized(table_q, ids, scales[, zero points])
    (quantize_axis 1).  8 bits are uint8 (onnxruntime's kernel takes no int8): a signed
    grid is shifted by 128, exactly; 4 bits are int4/uint4."""
    grid = item.grid
    quantized = quantize_blocks(item.table.T, item.block_size, grid)  # blocks along D
    q, zero = quantized.q.T.astype(np.int32), quantized.zero_point.T.astype(np.int32)
    if grid.bits == 8 and grid.signed:
        q, zero = q + 128, zero + 128
    dtype = IR_TYPES[grid.dtype] if grid.bits == 4 else np.uint8
    node = item.node
    base = node.name or "gather"
    inputs = [rewrite.constant(f"{base}_table_quantized", ir.tensor(q.astype(dtype))), node.inputs[1],
              rewrite.constant(f"{base}_table_scale", np.ascontiguousarray(quantized.scale.T))]
    if not (grid.bits == 4 and grid.signed and grid.symmetric):
        inputs.append(rewrite.constant(f"{base}_table_zero_point", ir.tensor(zero.astype(dtype))))
    gather = rewrite.node("GatherBlockQuantized", inputs, base, domain=MS_DOMAIN, gather_axis=0,
                          quantize_axis=1, block_size=item.block_size, bits=grid.bits)
    rewrite.replace(node, [gather], gather.outputs[0])
    if MS_DOMAIN not in rewrite.graph.opset_imports:
        rewrite.graph.opset_imports[MS_DOMAIN] = 1
