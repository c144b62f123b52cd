"""Decide, from the placement table, which nodes run int8 and which tensors get Q/DQ.

The same plan tells calibration which activations to observe, so the two stages can
never disagree about tensor names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ..subgraphs import HAS_SUBGRAPHS, has_subgraphs
from .rules import FIXED_RANGES, SHARED, OpRule, weight_axis

def _default_target():
    from ..targets import load_target

    return load_target("tflite")  # the TFLite int8 placement, for callers that name no target


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
    # Mul by a positive scalar folded into a DequantizeLinear: output -> (source, factor)
    rescaled: dict[str, tuple[str, float]] = field(default_factory=dict)
    forms: dict[str, str] = field(default_factory=dict)  # node name -> what it becomes (other modes than static)
    wide: set[str] = field(default_factory=set)  # tensors quantized at the target's 16 bits
    rules: Mapping[str, OpRule] = field(default_factory=dict)  # the target's op table
    target: Any = None  # targets.Target the plan was made for

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


def _activation_indices(node: ir.Node, rules: Mapping[str, OpRule]) -> list[int]:
    rule = rules[node.op_type]
    indices = range(len(node.inputs)) if rule.activations is None else rule.activations
    return [i for i in indices if i < len(node.inputs) and node.inputs[i] is not None]


def _ineligible_reason(node: ir.Node, target) -> str | None:
    if has_subgraphs(node):
        return HAS_SUBGRAPHS
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op {node.domain}::{node.op_type}"
    if node.op_type not in target.ops:
        return f"target {target.name} has no integer kernel for {node.op_type}"
    for i in _activation_indices(node, target.ops):
        if node.inputs[i].dtype is None:
            return f"type of input '{node.inputs[i].name}' is unknown (not inferable, e.g. after a custom op)"
        if not _is_float(node.inputs[i]):
            return f"input '{node.inputs[i].name}' is not float32"
    if any(not _is_float(out) for out in node.outputs):
        return "output is not float32"
    return None


def _absorbing_activation(value: ir.Value, skip: set[str], fused: frozenset[str]) -> ir.Node | None:
    """The lone Relu/Clip consuming ``value``, if the backend folds it into the Q."""
    if value.is_graph_output():
        return None
    users = list(value.consumers())
    if len(users) != 1:
        return None
    user = users[0]
    if user.op_type not in fused or user.domain not in ("", "ai.onnx"):
        return None
    if user.name in skip or not _is_float(user.outputs[0]):
        return None
    if any(v is not None and not _is_constant(v) for v in user.inputs[1:]):
        return None  # Clip with dynamic bounds
    return user


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip with both bounds constant and finite, else None."""
    if node.op_type != "Clip" or len(node.inputs) < 3 or any(v is None for v in node.inputs[1:3]):
        return None
    values = [v.const_value.numpy() if v.const_value is not None else None for v in node.inputs[1:3]]
    if any(v is None or v.size != 1 for v in values):
        return None
    low, high = (float(v.reshape(())) for v in values)
    return (low, high) if np.isfinite(low) and np.isfinite(high) and low < high else None


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


def _scalar_factor(node: ir.Node, skip: set[str], rules: Mapping[str, OpRule]) -> tuple[ir.Value, float] | None:
    """(source, c) for a Mul(source, c) whose c is one positive finite constant and whose
    output has the source's shape: foldable into the scale of a DequantizeLinear."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or node.name in skip:
        return None
    if len(node.inputs) != 2 or any(v is None for v in node.inputs) or has_subgraphs(node):
        return None
    source, const = node.inputs
    if _is_constant(source) and not _is_constant(const):
        source, const = const, source
    if _is_constant(source) or not _is_constant(const) or not _is_float(source) or not _is_float(node.outputs[0]):
        return None
    array = const.const_value.numpy()
    if array.size != 1 or (array.ndim > 0 and (source.shape is None or array.ndim > len(source.shape))):
        return None  # a rank-raising constant would change the output's shape
    factor = float(array.reshape(()))
    out = node.outputs[0]
    if not (np.isfinite(factor) and factor > 0) or out.is_graph_output():
        return None
    if any(u.op_type in rules and rules[u.op_type].output == SHARED for u in out.consumers()):
        return None  # a shared-parameter consumer would need the scaled parameters as its own
    return source, factor


def build_plan(model: ir.Model, skip: Iterable[str] = frozenset(), target=None) -> QuantPlan:
    """Plan the Q/DQ placement for ``target`` (a targets.Target; default: the TFLite int8
    placement); nodes matched by ``skip`` (names, op types or globs, see
    ``resolve_exclude``) stay float ("excluded")."""
    target = target if target is not None else _default_target()
    rules = target.ops
    plan = QuantPlan(rules=rules, target=target)
    graph = model.graph
    skip, _ = resolve_exclude(graph, skip)
    on_outputs = target.placement == "outputs"
    fused = target.fused_activations if on_outputs else frozenset()
    rescales: dict[str, tuple[ir.Node, ir.Value, float]] = {}
    if target.fold_scalar_mul:
        for node in graph:
            found = _scalar_factor(node, skip, rules)
            if found is not None:
                rescales[node.outputs[0].name] = (node, *found)
    rescale_nodes = {id(entry[0]) for entry in rescales.values()}
    candidates: list[ir.Node] = []
    for node in graph:
        if id(node) in rescale_nodes:
            continue  # decided by its source and its consumers, below
        reason = "excluded" if node.name in skip else _ineligible_reason(node, target)
        if reason is None:
            candidates.append(node)
        elif node.op_type not in fused or node.name in skip:
            plan.float_reasons[node.name] = reason
    readers = None
    if on_outputs and target.float_when_unread:
        readers = _IntegerReaders(candidates, rules, fused, rescale_nodes, target.integer_outputs)
        for node in readers.drop_unread(candidates):
            candidates.remove(node)
            plan.float_reasons[node.name] = UNREAD_REASON

    def add_tensor(value: ir.Value) -> None:
        plan.tensors.setdefault(value.name, value)
        plan.parent.setdefault(value.name, value.name)

    def rescale(value: ir.Value) -> str:
        """Fold the scalar Mul making ``value``; returns the quantized tensor it reads."""
        node, source, factor = rescales[value.name]
        if value.name not in plan.rescaled:
            if source.name in rescales:
                root = rescale(source)
                factor *= plan.rescaled[source.name][1]
            else:
                add_tensor(source)
                root = source.name
            plan.rescaled[value.name] = (root, factor)
            plan.quantized_nodes.append(node)
        return plan.rescaled[value.name][0]

    def quantize_inputs(node: ir.Node) -> list[str]:
        rule = rules[node.op_type]
        names = []
        for i in _activation_indices(node, rules):
            value = node.inputs[i]
            if i == rule.weight and _is_constant(value):
                continue
            if value.name in rescales:
                rescale(value)
                continue
            add_tensor(value)
            names.append(value.name)
            if _is_constant(value):
                plan.constant_uses.append((node, i))
        if rule.weight is not None and rule.weight < len(node.inputs):
            value = node.inputs[rule.weight]
            if _is_constant(value):
                axis = weight_axis(node.op_type, _attrs(node), len(value.shape or ())) if target.weights.per_channel else None
                slot = WeightSlot(node, rule.weight, axis)
                plan.weights.append(slot)
                bias = node.inputs[rule.bias] if rule.bias is not None and rule.bias < len(node.inputs) else None
                if (target.bias == "int32" and bias is not None and _is_constant(bias)
                        and _bias_fits(node, bias, value, axis)):
                    plan.biases.append((node, rule.bias, slot))
        return names

    # Anchors first: ops that compute in int8.  Shared-parameter ops (pass-through,
    # Concat, Resize) join only next to a quantized tensor, so float regions stay clean.
    for node in candidates:
        rule = rules[node.op_type]
        if rule.output == SHARED:
            continue
        plan.quantized_nodes.append(node)
        quantize_inputs(node)
        if not on_outputs:
            continue
        for out in node.outputs:
            if rule.output in FIXED_RANGES:
                add_tensor(out)
                plan.fixed_ranges[out.name] = FIXED_RANGES[rule.output]
                continue
            absorbed = _absorbing_activation(out, set(skip), fused)
            if absorbed is not None:
                plan.absorbed_nodes.append(absorbed)
                add_tensor(absorbed.outputs[0])
                bounds = _clip_bounds(absorbed)
                if bounds is not None:
                    # Relu6-like: its bounds are the range, so that no calibration method
                    # cuts off the mass saturated at the upper bound.
                    plan.fixed_ranges[absorbed.outputs[0].name] = bounds
            elif (readers is not None and node.op_type in target.float_output_ops and not readers.reads(out)
                  and not _fuses_into_float_gemm(node, out)):
                continue  # integer inputs, float output (onnxruntime's MatMulIntegerToFloat, QGemm)
            else:
                add_tensor(out)

    pending = [n for n in candidates if rules[n.op_type].output == SHARED]
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            touches = [v.name for v in node.outputs] + [node.inputs[i].name for i in _activation_indices(node, rules)]
            table = readers is not None and node.op_type == "Gather" and _is_constant(node.inputs[0])
            if not table and not any(name in plan.tensors or name in plan.rescaled for name in touches):
                continue  # (an embedding table is stored as int8 even where only float ops read its rows)
            pending.remove(node)
            changed = True
            plan.quantized_nodes.append(node)
            names = quantize_inputs(node)
            if on_outputs:
                for out in node.outputs:
                    add_tensor(out)
                names += [out.name for out in node.outputs]
            plan.share(names)

    for name, (node, source, _) in rescales.items():
        if name in plan.rescaled:
            continue
        if source.name in plan.tensors or source.name in plan.rescaled:
            rescale(node.outputs[0])
        else:
            plan.float_reasons[node.name] = "scalar Mul between float tensors (no quantized tensor to fold it into)"
    for node in pending:
        plan.float_reasons[node.name] = "no quantized neighbour (would only add Q/DQ)"
    for node in graph:
        if node.op_type in fused and node not in plan.absorbed_nodes:
            plan.float_reasons.setdefault(node.name, "runs in float (not after a quantized op)")
    return plan


def _fuses_into_float_gemm(node: ir.Node, out: ir.Value) -> bool:
    """onnxruntime turns a MatMul with a static input shape followed by a bias Add into a
    float Gemm (MatMulAddFusion) before its Q/DQ fusions: without a Q on the MatMul's
    output it would then run in float, so that output keeps its Q (QLinearMatMul)."""
    if node.op_type != "MatMul" or node.inputs[0] is None:
        return False
    shape = node.inputs[0].shape
    static = shape is not None and all(isinstance(d, int) for d in shape)
    return static and any(user.op_type == "Add" and any(_is_constant(v) for v in user.inputs if v is not out)
                          for user in out.consumers())


UNREAD_REASON = "no integer op reads its result (a Q/DQ would only round it)"


class _IntegerReaders:
    """Which tensors an integer op reads, looking through the readers that pass a tensor
    on (shared-parameter ops, fused activations, folded scalar Muls); a graph output has
    no integer reader unless the deployment reads it as one (``integer_outputs``).
    ``drop_unread`` takes the candidates without a weight that compute their own output
    parameters (Add, Mul, Sigmoid, AveragePool, ...) and that no integer op reads out of
    the quantized set, to a fixpoint: a residual Add into a float LayerNormalization, then
    the bias Add before it."""

    def __init__(self, candidates: list[ir.Node], rules: Mapping[str, OpRule], see_through: frozenset[str],
                 rescale_nodes: set[int], integer_outputs: frozenset[str] = frozenset()):
        self.quantized = {id(n) for n in candidates}
        self.rules, self.see_through, self.rescale_nodes = rules, see_through, rescale_nodes
        self.integer_outputs = integer_outputs

    def reads(self, value: ir.Value, seen: set[int] | None = None) -> bool:
        if value.is_graph_output() and value.name in self.integer_outputs:
            return True  # the deployment reads it as an integer (the model editor's outputs)
        seen = set() if seen is None else seen
        for user in value.consumers():
            if id(user) in seen:
                continue
            seen.add(id(user))
            passes = (id(user) in self.rescale_nodes or user.op_type in self.see_through
                      or (id(user) in self.quantized and self.rules[user.op_type].output == SHARED))
            if passes:
                if any(self.reads(out, seen) for out in user.outputs):
                    return True
            elif id(user) in self.quantized:
                return True
        return False

    def drop_unread(self, candidates: list[ir.Node]) -> list[ir.Node]:
        rules = self.rules
        elementwise = [n for n in candidates if rules[n.op_type].weight is None and rules[n.op_type].output != SHARED]
        dropped: list[ir.Node] = []
        changed = True
        while changed:
            changed = False
            for node in elementwise:
                if id(node) in self.quantized and not any(self.reads(out) for out in node.outputs):
                    self.quantized.discard(id(node))
                    dropped.append(node)
                    changed = True
        return dropped


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
