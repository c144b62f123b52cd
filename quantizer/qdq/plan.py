"""Decide, from the placement table, which nodes run int8 and which tensors get Q/DQ.

The same plan tells calibration which activations to observe, so the two stages can
never disagree about tensor names.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable

import onnx_ir as ir

from ..subgraphs import HAS_SUBGRAPHS, has_subgraphs
from .rules import (
    ABSORBED_ACTIVATIONS,
    RULES,
    SHARED,
    UNIT_INTERVAL,
    weight_axis,
)

UNIT_RANGE = (0.0, 1.0)


@dataclass
class WeightSlot:
    node: ir.Node
    index: int
    axis: int | None


@dataclass
class QuantPlan:
    quantized_nodes: list[ir.Node] = field(default_factory=list)
    absorbed_nodes: list[ir.Node] = field(default_factory=list)  # Relu/Clip folded into Q
    float_reasons: dict[str, str] = field(default_factory=dict)  # node name -> why float
    tensors: dict[str, ir.Value] = field(default_factory=dict)  # every tensor to Q/DQ
    constant_uses: list[tuple[ir.Node, int]] = field(default_factory=list)  # const activations
    fixed_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    weights: list[WeightSlot] = field(default_factory=list)
    biases: list[tuple[ir.Node, int, WeightSlot]] = field(default_factory=list)
    parent: dict[str, str] = field(default_factory=dict)  # union-find over shared params

    def group(self, name: str) -> str:
        root = name
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(name, name) != root:  # path compression
            self.parent[name], name = root, self.parent[name]
        return root

    def share(self, names: list[str]) -> None:
        roots = [self.group(n) for n in names]
        for root in roots[1:]:
            if root != roots[0]:
                self.parent[root] = roots[0]

    @property
    def calibrated_tensors(self) -> list[str]:
        """Non-constant tensors whose range must come from calibration."""
        return [
            name
            for name, value in self.tensors.items()
            if name not in self.fixed_ranges and not _is_constant(value)
        ]


def _is_constant(value: ir.Value) -> bool:
    return value.const_value is not None and not value.is_graph_input()


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def _activation_indices(node: ir.Node) -> list[int]:
    rule = RULES[node.op_type]
    indices = range(len(node.inputs)) if rule.activations is None else rule.activations
    return [i for i in indices if i < len(node.inputs) and node.inputs[i] is not None]


def _ineligible_reason(node: ir.Node) -> str | None:
    if has_subgraphs(node):
        return HAS_SUBGRAPHS
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op {node.domain}::{node.op_type}"
    if node.op_type not in RULES:
        return f"no int8 placement rule for {node.op_type}"
    for i in _activation_indices(node):
        if node.inputs[i].dtype is None:
            return f"type of input '{node.inputs[i].name}' is unknown (not inferable, e.g. after a custom op)"
        if not _is_float(node.inputs[i]):
            return f"input '{node.inputs[i].name}' is not float32"
    if any(not _is_float(out) for out in node.outputs):
        return "output is not float32"
    return None


def _absorbing_activation(value: ir.Value, skip: set[str]) -> ir.Node | None:
    """The lone Relu/Clip consuming ``value``, if onnxruntime can fold it into the Q."""
    if value.is_graph_output():
        return None
    users = list(value.consumers())
    if len(users) != 1:
        return None
    user = users[0]
    if user.op_type not in ABSORBED_ACTIVATIONS or user.domain not in ("", "ai.onnx"):
        return None
    if user.name in skip or not _is_float(user.outputs[0]):
        return None
    if any(v is not None and not _is_constant(v) for v in user.inputs[1:]):
        return None  # Clip with dynamic bounds
    return user


def resolve_exclude(nodes: Iterable, patterns: Iterable[str]) -> tuple[set[str], list[str]]:
    """Node names matched by keep-float patterns, and the patterns that matched nothing.

    A pattern matches a node whose name or op type equals it or fnmatch-es it (case
    sensitive), so ``conv1``, ``Softmax`` and ``head/*`` all work.  Equality counts on its
    own because real node names may contain glob characters (``blocks[0]``).
    """
    patterns = list(dict.fromkeys([patterns] if isinstance(patterns, str) else patterns))
    exact = set(patterns)
    globs = [p for p in patterns if any(c in p for c in "*?[")]
    names: set[str] = set()
    used: set[str] = set()
    for node in nodes:
        name = node.name or ""
        hits = {p for p in (name, node.op_type) if p in exact}
        hits.update(p for p in globs if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(node.op_type, p))
        if hits:
            names.add(name)
            used |= hits
    return names, [p for p in patterns if p not in used]


def build_plan(model: ir.Model, skip: Iterable[str] = frozenset()) -> QuantPlan:
    """Plan the Q/DQ placement; nodes matched by ``skip`` (names, op types or globs, see
    ``resolve_exclude``) stay float ("excluded")."""
    plan = QuantPlan()
    graph = model.graph
    skip, _ = resolve_exclude(graph, skip)
    candidates: list[ir.Node] = []
    for node in graph:
        reason = "excluded" if node.name in skip else _ineligible_reason(node)
        if reason is None:
            candidates.append(node)
        elif node.op_type not in ABSORBED_ACTIVATIONS or node.name in skip:
            plan.float_reasons[node.name] = reason

    def add_tensor(value: ir.Value) -> None:
        plan.tensors.setdefault(value.name, value)
        plan.parent.setdefault(value.name, value.name)

    def quantize_inputs(node: ir.Node) -> list[str]:
        rule = RULES[node.op_type]
        names = []
        for i in _activation_indices(node):
            value = node.inputs[i]
            if i == rule.weight and _is_constant(value):
                continue
            add_tensor(value)
            names.append(value.name)
            if _is_constant(value):
                plan.constant_uses.append((node, i))
        if rule.weight is not None and rule.weight < len(node.inputs):
            value = node.inputs[rule.weight]
            if _is_constant(value):
                axis = weight_axis(node.op_type, _attrs(node), len(value.shape or ()))
                slot = WeightSlot(node, rule.weight, axis)
                plan.weights.append(slot)
                bias = node.inputs[rule.bias] if rule.bias is not None and rule.bias < len(node.inputs) else None
                if bias is not None and _is_constant(bias) and _bias_fits(node, bias, value, axis):
                    plan.biases.append((node, rule.bias, slot))
        return names

    # Anchors first: ops that compute in int8.  Shared-parameter ops (pass-through,
    # Concat, Resize) join only next to a quantized tensor, so float regions stay clean.
    for node in candidates:
        rule = RULES[node.op_type]
        if rule.output == SHARED:
            continue
        plan.quantized_nodes.append(node)
        quantize_inputs(node)
        for out in node.outputs:
            if rule.output == UNIT_INTERVAL:
                add_tensor(out)
                plan.fixed_ranges[out.name] = UNIT_RANGE
                continue
            absorbed = _absorbing_activation(out, set(skip))
            if absorbed is not None:
                plan.absorbed_nodes.append(absorbed)
                add_tensor(absorbed.outputs[0])
            else:
                add_tensor(out)

    pending = [n for n in candidates if RULES[n.op_type].output == SHARED]
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            touches = [v.name for v in node.outputs] + [node.inputs[i].name for i in _activation_indices(node)]
            if not any(name in plan.tensors for name in touches):
                continue
            pending.remove(node)
            changed = True
            plan.quantized_nodes.append(node)
            names = quantize_inputs(node)
            for out in node.outputs:
                add_tensor(out)
            plan.share(names + [out.name for out in node.outputs])

    for node in pending:
        plan.float_reasons[node.name] = "no quantized neighbour (would only add Q/DQ)"
    for node in graph:
        if node.op_type in ABSORBED_ACTIVATIONS and node not in plan.absorbed_nodes:
            plan.float_reasons.setdefault(node.name, "runs in float (not after a quantized op)")
    return plan


def _bias_fits(node: ir.Node, bias: ir.Value, weight: ir.Value, axis: int | None) -> bool:
    """An int32 bias needs a 1-D bias matching the weight's output channels."""
    if bias.shape is None or len(bias.shape) != 1 or weight.shape is None:
        return False
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            return False
    if axis is None:
        return True
    return weight.shape[axis] == bias.shape[0]
