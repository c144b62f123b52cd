"""The MatMul/Gemm nodes with a constant weight, for the modes that quantize weights
only (dynamic, weight-only): which nodes qualify, their weight as ``[K, N]`` (the
reduction axis first, whatever Gemm's transB says), their bias, and the rewrite that
replaces a node by the nodes of its quantized form."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..naming import UniqueNames
from ..subgraphs import HAS_SUBGRAPHS, has_subgraphs
from .plan import QuantPlan, _attrs, _is_constant, _is_float, resolve_exclude


@dataclass
class WeightedNode:
    node: ir.Node
    weight: np.ndarray  # [K, N] float32, alpha folded in
    bias: np.ndarray | None  # broadcastable to [M, N], beta folded in


def _weighted(node: ir.Node) -> WeightedNode | str:
    """The node's weight and bias, or why it cannot be quantized this way."""
    if has_subgraphs(node):
        return HAS_SUBGRAPHS
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return f"only MatMul and Gemm with a constant weight are quantized in this mode ({node.op_type})"
    x, w = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or not _is_constant(w):
        return "the second input is not a constant weight"
    if not (_is_float(x) and _is_float(w) and _is_float(node.outputs[0])) or _is_constant(x):
        return "not a float32 MatMul of an activation by a weight"
    weight = w.const_value.numpy().astype(np.float32)
    if weight.ndim != 2:
        return f"the weight has rank {weight.ndim}, not 2"
    if not np.isfinite(weight).all():
        return "the weight holds inf or NaN values, which no integer can represent"
    bias = None
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        if attrs.get("transA", 0):
            return "Gemm with transA"
        if attrs.get("transB", 0):
            weight = weight.T
        weight = weight * np.float32(attrs.get("alpha", 1.0))
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None:
            if not _is_constant(c):
                return "Gemm with a bias that is not constant"
            bias = c.const_value.numpy().astype(np.float32) * np.float32(attrs.get("beta", 1.0))
            if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, weight.shape[1])):
                return "Gemm bias is not a per-output vector"
    return WeightedNode(node, np.ascontiguousarray(weight), bias)


def weight_key(item: WeightedNode) -> tuple:
    """Nodes with equal keys read one weight initializer the same way (as the same
    ``[K, N]`` matrix): they share its quantized form, stored once.  A model that reuses
    a layer's weights (a recurrent or weight-tied encoder) would otherwise store one
    quantized copy per use -- larger than the float model."""
    node = item.node
    attrs = _attrs(node) if node.op_type == "Gemm" else {}
    return id(node.inputs[1]), bool(attrs.get("transB", 0)), float(attrs.get("alpha", 1.0))


def plan_weighted(model: ir.Model, skip: Iterable[str], form: str, mode: str) -> tuple[QuantPlan, list[WeightedNode]]:
    """The plan of a weights-first mode: every qualifying MatMul/Gemm becomes ``form``;
    every other node stays float with the reason."""
    plan = QuantPlan()
    skip, _ = resolve_exclude(model.graph, skip)
    found = []
    for node in model.graph:
        if node.name in skip:
            plan.float_reasons[node.name] = "excluded"
            continue
        result = _weighted(node)
        if isinstance(result, str):
            plan.float_reasons[node.name] = result if node.op_type in ("MatMul", "Gemm") else \
                f"{mode} mode quantizes MatMul and Gemm weights only"
            continue
        found.append(result)
        plan.quantized_nodes.append(node)
        plan.forms[node.name] = form
    return plan, found


class Rewriter:
    """Builds the replacement nodes of one graph, with names unique in it."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        used = set(graph.initializers) | {v.name for v in graph.inputs}
        for node in graph:
            used.add(node.name or "")
            used.update(v.name for v in node.outputs if v.name)
        self.names = UniqueNames(used)

    def constant(self, base: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
        name = self.names(base)
        tensor = array if not isinstance(array, np.ndarray) else ir.tensor(array, name=name)
        tensor.name = name
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def node(self, op_type: str, inputs: Sequence[ir.Value | None], base: str, outputs: int = 1,
             domain: str = "", **attributes) -> ir.Node:
        outs = [ir.Value(name=self.names(f"{base}_{op_type}_out{i}" if outputs > 1 else f"{base}_{op_type}_out"))
                for i in range(outputs)]
        return ir.Node(domain, op_type, list(inputs), attributes=[_attr(k, v) for k, v in attributes.items()],
                       outputs=outs, name=self.names(f"{base}_{op_type}"))

    def replace(self, node: ir.Node, new_nodes: Sequence[ir.Node], result: ir.Value) -> None:
        """``node`` replaced by ``new_nodes``, whose ``result`` takes over its output
        (a graph output keeps its name)."""
        old = node.outputs[0]
        result.type, result.shape = old.type, old.shape
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], list(new_nodes), [old], [result])


def _attr(name: str, value) -> ir.Attr:
    if isinstance(value, int):
        return ir.AttrInt64(name, value)
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    raise TypeError(f"attribute {name}: {value!r}")
