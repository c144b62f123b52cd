"""Rewrite the graph by a QuantPlan: Q/DQ pairs on activations, quantized initializers
with a DequantizeLinear for weights, biases and constant operands."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..naming import UniqueNames
from .params import (
    FLOAT8,
    FLOAT8_MAX,
    ActivationParams,
    quantize_bias,
    quantize_weight,
    quantize_weight_float8,
    spec_params,
    weight_scales,
    widen_for_bias,
)
from .plan import QuantPlan, _is_constant


def _graph_names(graph: ir.Graph) -> UniqueNames:
    used = set(graph.initializers) | {v.name for v in graph.inputs}
    for node in graph:
        used.add(node.name or "")
        used.update(v.name for v in node.outputs if v.name)
    return UniqueNames(used)


class _Writer:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.names = _graph_names(graph)

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.names(base)
        value = ir.Value(
            name=name,
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            shape=ir.Shape(array.shape),
            const_value=ir.tensor(array, name=name),
        )
        self.graph.register_initializer(value)
        return value

    def dequantize(self, base: str, q: ir.Value, scale: np.ndarray, zero_point: np.ndarray,
                   axis: int | None, like: ir.Value) -> ir.Node:
        inputs = [q, self.constant(f"{base}_scale", scale), self.constant(f"{base}_zero_point", zero_point)]
        out = ir.Value(name=self.names(f"{base}_dequantized"), type=like.type, shape=like.shape)
        attrs = {"axis": ir.AttrInt64("axis", axis)} if axis is not None else {}
        return ir.Node("", "DequantizeLinear", inputs, attrs, outputs=[out], name=self.names(f"{base}_DequantizeLinear"))


def _input_scale(plan: QuantPlan, params: Mapping[str, ActivationParams], name: str) -> np.float32:
    """The scale a quantized op reads its input with: the tensor's own, or for the output
    of a Mul folded into a DequantizeLinear, its source's scale times the factor."""
    if name in params:
        return params[name].scale
    source, factor = plan.rescaled[name]
    return np.float32(np.float32(params[source].scale) * np.float32(factor))


def group_params(plan: QuantPlan, ranges: Mapping[str, tuple[float, float]], dtype) -> dict[str, ActivationParams]:
    """One parameter set per shared group, from the union of its members' ranges.
    ``dtype``: a dtype name or the target's activation spec (symmetric, scale rule); a
    group with a member in ``plan.wide`` takes the spec's 16-bit form."""
    group_range: dict[str, tuple[float, float]] = {}
    for name, value in plan.tensors.items():
        if name in plan.fixed_ranges:
            low, high = plan.fixed_ranges[name]
        elif _is_constant(value):
            array = value.const_value.numpy()
            low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        else:
            low, high = ranges[name]
        root = plan.group(name)
        old = group_range.get(root, (low, high))
        group_range[root] = (min(old[0], low), max(old[1], high))
    wide_roots = {plan.group(name) for name in plan.wide}
    by_group = {root: spec_params(*r, dtype.widened() if root in wide_roots else dtype)
                for root, r in group_range.items()}
    return {name: by_group[plan.group(name)] for name in plan.tensors}


def insert_qdq(model: ir.Model, plan: QuantPlan, ranges: Mapping[str, tuple[float, float]],
               activation_dtype: str | None = None, weight_qmax: int | None = None) -> dict[str, ActivationParams]:
    """Apply ``plan`` to ``model`` in place; returns the parameters of every Q/DQ tensor.

    Parameters follow the plan's target (its activation spec and weight range);
    ``activation_dtype`` / ``weight_qmax`` override them (asymmetric, no scale rule).
    """
    graph = model.graph
    writer = _Writer(graph)
    target = plan.target
    spec = activation_dtype if activation_dtype is not None else target.activations
    weight_qmax = weight_qmax if weight_qmax is not None else target.weights.qmax
    weight_rule = target.weights.scale
    params = group_params(plan, ranges, spec)
    biases = {(id(slot.node), slot.index): bias_index for _, bias_index, slot in plan.biases}

    # Weights and biases first: they read the input tensors' names before Q/DQ renames.
    # A weight that several nodes read with the same parameters is stored once, one
    # DequantizeLinear before its first reader (onnxruntime gives each reader its own
    # copy of the DequantizeLinear node when it fuses, the initializer stays shared).
    position = {id(n): i for i, n in enumerate(graph)}
    shared: dict[tuple, ir.Value] = {}  # (weight, axis, scales) -> the dequantized weight
    for slot in sorted(plan.weights, key=lambda s: position.get(id(s.node), -1)):
        node, index, axis = slot.node, slot.index, slot.axis
        weight_value = node.inputs[index]
        weight = weight_value.const_value.numpy().astype(np.float32)
        if target.weights.dtype == FLOAT8:  # symmetric amax / 448; the target's bias is float
            key = (id(weight_value), axis, FLOAT8)
            if key not in shared:
                scales = weight_scales(weight, axis, FLOAT8_MAX)
                q_weight = writer.constant(f"{weight_value.name}_quantized", quantize_weight_float8(weight, scales, axis))
                zero = np.zeros(scales.shape, ml_dtypes.float8_e4m3fn)
                dq = writer.dequantize(weight_value.name, q_weight, scales, zero, axis, weight_value)
                graph.insert_before(node, dq)
                shared[key] = dq.outputs[0]
            node.replace_input_with(index, shared[key])
            continue
        scales = weight_scales(weight, axis, weight_qmax)
        if not weight_rule.is_identity:
            scales = weight_rule.apply(scales)
        bias_index = biases.get((id(node), index))
        if bias_index is not None:
            bias_value = node.inputs[bias_index]
            bias = bias_value.const_value.numpy().astype(np.float32)
            input_scale = _input_scale(plan, params, node.inputs[0].name)
            scales = widen_for_bias(scales, bias, input_scale)
            if not weight_rule.is_identity:
                scales = weight_rule.apply(scales)
        key = (id(weight_value), axis, scales.tobytes())  # a bias can widen a reader's scales: its own copy
        if key not in shared:
            q_weight = writer.constant(f"{weight_value.name}_quantized", quantize_weight(weight, scales, axis, weight_qmax))
            dq = writer.dequantize(weight_value.name, q_weight, scales, np.zeros(scales.shape, np.int8), axis,
                                   weight_value)
            graph.insert_before(node, dq)
            shared[key] = dq.outputs[0]
        node.replace_input_with(index, shared[key])
        if bias_index is not None:
            q_bias, bias_scales = quantize_bias(bias, input_scale, scales)
            q_value = writer.constant(f"{bias_value.name}_quantized", q_bias)
            bias_axis = 0 if bias_scales.ndim == 1 else None
            dq = writer.dequantize(bias_value.name, q_value, bias_scales, np.zeros(bias_scales.shape, np.int32), bias_axis, bias_value)
            graph.insert_before(node, dq)
            node.replace_input_with(bias_index, dq.outputs[0])

    for node, index in plan.constant_uses:
        value = node.inputs[index]
        p = params[value.name]
        q_value = writer.constant(f"{value.name}_quantized", p.quantize(value.const_value.numpy()))
        dq = writer.dequantize(value.name, q_value, np.float32(p.scale), p.zero_point, None, value)
        graph.insert_before(node, dq)
        node.replace_input_with(index, dq.outputs[0])

    quantized: dict[str, ir.Value] = {}
    for name, value in plan.tensors.items():
        if _is_constant(value):
            continue
        p = params[name]
        scale = writer.constant(f"{name}_scale", np.float32(p.scale))
        zero_point = writer.constant(f"{name}_zero_point", p.zero_point)
        q_out = ir.Value(name=writer.names(f"{name}_quantized"),
                         type=ir.TensorType(ir.DataType.from_numpy(p.zero_point.dtype)), shape=value.shape)
        dq_out = ir.Value(name=writer.names(f"{name}_dequantized"), type=value.type, shape=value.shape)
        # A graph output keeps its name, on the dequantized value -- unless it is also a
        # graph input: input names are a contract, so that output stays the float input.
        was_output = value.is_graph_output() and not value.is_graph_input()
        if was_output or not value.is_graph_output():
            value.replace_all_uses_with(dq_out, replace_graph_outputs=was_output)
        else:
            for user, index in list(value.uses()):
                user.replace_input_with(index, dq_out)
        if was_output:  # keep the graph output's name on the dequantized value
            original = value.name
            value.name = writer.names(f"{original}_float")
            dq_out.name = original
        q = ir.Node("", "QuantizeLinear", [value, scale, zero_point], outputs=[q_out],
                    name=writer.names(f"{name}_QuantizeLinear"))
        quantized[name] = q_out
        dq = ir.Node("", "DequantizeLinear", [q_out, scale, zero_point], outputs=[dq_out],
                     name=writer.names(f"{name}_DequantizeLinear"))
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, [q, dq])
        else:
            graph.insert_before(graph.node(0), [q, dq])
    _fold_rescales(graph, writer, plan, params, quantized)
    return params


def _fold_rescales(graph: ir.Graph, writer: _Writer, plan: QuantPlan, params: Mapping[str, ActivationParams],
                   quantized: Mapping[str, ir.Value]) -> None:
    """Each folded Mul(x, c) becomes DequantizeLinear(Q(x), scale * c): the same values, no op."""
    values = {v.name: v for node in graph for v in node.outputs}
    for name, (source, factor) in plan.rescaled.items():
        value = values.get(name)
        if value is None or source not in quantized:
            continue
        p = params[source]
        scale = writer.constant(f"{name}_scale", np.float32(np.float32(p.scale) * np.float32(factor)))
        zero_point = writer.constant(f"{name}_zero_point", p.zero_point)
        dq_out = ir.Value(name=writer.names(f"{name}_dequantized"), type=value.type, shape=value.shape)
        dq = ir.Node("", "DequantizeLinear", [quantized[source], scale, zero_point], outputs=[dq_out],
                     name=writer.names(f"{name}_DequantizeLinear"))
        graph.insert_after(quantized[source].producer(), dq)
        value.replace_all_uses_with(dq_out)
