"""Normalization arithmetic stays float.

LayerNorm, RMSNorm, InstanceNorm or an L2 normalization written out as ops (ReduceMean or
ReduceSum, Sub, Mul/Pow, Sqrt, Reciprocal, Div) computes per-row statistics and divides
by them.  Quantized piece by piece, those statistics share one per-tensor scale across
every row: the squared deviations of a quiet row round to 0, its reciprocal standard
deviation is crushed or clipped, and the row comes out wrong (a byte-level classifier
built like this keeps 3-8 % of its top-1 classes).  This module finds that arithmetic by
its structure, not by one exact pattern:

- a *statistic* is the output of a reduction (ReduceMean, ReduceSum, ReduceSumSquare,
  ReduceL1, ReduceL2) or of elementwise/shape arithmetic whose non-constant inputs are
  all statistics;
- a statistic is *normalizing* when its derivation takes a square root, a reciprocal, a
  negative or fractional power, or divides by a statistic;
- a *normalizing node* combines a full tensor with a normalizing statistic (the Mul by
  1/sigma, the Div by sigma).

When a model has normalizing nodes, every node that computes a statistic feeding one,
those nodes themselves, the centering Sub of the reduced tensor and the square whose
mean is the variance are kept float (their own float op, so the target's integer kernels
run before and after the normalization, never inside it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..ir_values import constant_array

REASON = "normalization arithmetic (mean, variance, 1/sqrt) kept float"
REDUCERS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2"})
# Ops whose output is a statistic when their non-constant inputs all are.
STATISTIC_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Max", "Min", "Clip", "Neg", "Abs",
    "Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Expand", "Sum",
})


def _constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _takes_root_or_reciprocal(node: ir.Node, statistics: set[ir.Value]) -> bool:
    """Whether ``node`` (over statistics) takes a square root, a reciprocal, a negative
    or fractional power, or divides by a statistic."""
    if node.op_type in ("Sqrt", "Reciprocal"):
        return True
    if node.op_type == "Pow":
        exponent = constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
        return exponent is None or bool(np.any((exponent < 0) | (exponent != np.round(exponent))))
    if node.op_type == "Div":
        return len(node.inputs) > 1 and node.inputs[1] in statistics
    return False


def _is_square(node: ir.Node) -> bool:
    if node.op_type == "Mul":
        return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]
    if node.op_type == "Pow":
        exponent = constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0
    return False


def normalization_nodes(graph: ir.Graph) -> dict[str, str]:
    """{node name: reason} for the nodes of ``graph`` (top level) that compute or apply a
    normalization; empty when the graph has none."""
    statistics: set[ir.Value] = set()
    normalizing: set[ir.Value] = set()
    producers: dict[ir.Value, ir.Node] = {}
    normalizers: list[ir.Node] = []
    for node in graph:  # topological order
        inputs = [v for v in node.inputs if not _constant(v)]
        stat_inputs = [v for v in inputs if v in statistics]
        if node.op_type in REDUCERS:
            for out in node.outputs:
                statistics.add(out)
                producers[out] = node
                if node.op_type == "ReduceL2":
                    normalizing.add(out)
            continue
        if node.op_type in STATISTIC_OPS and inputs and len(stat_inputs) == len(inputs):
            makes_normalizing = _takes_root_or_reciprocal(node, statistics) or any(v in normalizing for v in inputs)
            for out in node.outputs:
                statistics.add(out)
                producers[out] = node
                if makes_normalizing:
                    normalizing.add(out)
            continue
        if node.op_type in ("Mul", "Div") and any(v in normalizing for v in stat_inputs) \
                and len(stat_inputs) < len(inputs):
            normalizers.append(node)
    if not normalizers:
        return {}
    def centering(value: ir.Value | None) -> ir.Node | None:
        """The Sub that centers a tensor on a statistic (x - mean(x)), if ``value`` is one."""
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "Sub" and any(v in statistics for v in producer.inputs):
            return producer
        return None

    keep: set[ir.Node] = set()
    pending: list[ir.Node] = list(normalizers)
    while pending:  # the normalizers and everything that computes their statistics
        node = pending.pop()
        if node in keep:
            continue
        keep.add(node)
        pending.extend(producers[v] for v in node.inputs if v in statistics)
        pending.extend(c for c in map(centering, node.inputs) if c is not None)
        if node.op_type in REDUCERS and node.inputs and node.inputs[0] is not None:
            square = node.inputs[0].producer()
            if square is not None and _is_square(square):
                pending.append(square)  # the squared deviations whose mean is the variance
    return {node.name: REASON for node in graph if node in keep and node.name}
