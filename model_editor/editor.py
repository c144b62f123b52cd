"""Integer model inputs and outputs for NPU deployment, shaped like the Furiosa SDK's
ModelEditor.

An NPU deployment feeds raw uint8 camera pixels and wants integer outputs: a CPU-side
float QuantizeLinear of a large input can cost more than the NPU's whole first layer.
The editor therefore edits the QDQ graph itself (not just metadata):

- ``convert_input_type`` removes the QuantizeLinear after a graph input, so the input
  becomes the quantized integer tensor;
- ``convert_output_type`` removes the DequantizeLinear before a graph output, so the
  output is the quantized integer tensor (optionally requantized to a given range).

Every edited tensor's scale and zero point is recorded in the model's metadata
(``metadata.py``). A failing call raises before it changes anything.
"""

from __future__ import annotations

import enum
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnx import TensorProto, helper

from quantizer.errors import ModelError, UsageError
from quantizer.io_metadata import QuantizedIO, write_io
from quantizer.ir_values import constant_array
from quantizer.model_io import load_model
from quantizer.naming import UniqueNames
from quantizer.qdq.params import activation_params


class TensorType(enum.Enum):
    """Integer types a model input or output can be converted to."""

    UINT8 = "uint8"
    INT8 = "int8"


_IR_TYPES = {"uint8": ir.DataType.UINT8, "int8": ir.DataType.INT8}
_NUMPY_TYPES = {"uint8": np.uint8, "int8": np.int8}


def parse_tensor_type(tensor_type) -> str:
    """'uint8' or 'int8' from a TensorType or its name; anything else is a UsageError."""
    if isinstance(tensor_type, TensorType):
        return tensor_type.value
    if isinstance(tensor_type, str) and tensor_type.lower() in _IR_TYPES:
        return tensor_type.lower()
    shown = tensor_type.name if isinstance(tensor_type, enum.Enum) else tensor_type
    raise UsageError(f"unsupported tensor type {shown!r}; supported: uint8, int8 (TensorType.UINT8, TensorType.INT8)")


def get_pure_input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs fed at run time (not backed by an initializer)."""
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def get_output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def _graph_names(graph: ir.Graph) -> UniqueNames:
    """Fresh tensor/node names that collide with nothing in the model (subgraphs included)."""
    used = set(graph.initializers) | {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    for node in graph.all_nodes():
        used.add(node.name or "")
        used.update(v.name for v in node.inputs if v is not None and v.name)
        used.update(v.name for v in node.outputs if v.name)
    return UniqueNames(used)


def _qdq_params(node: ir.Node, what: str) -> tuple[np.float32, np.integer]:
    """The per-tensor (scale, zero point) of a QuantizeLinear/DequantizeLinear node."""
    scale = constant_array(node.inputs[1])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        zero_point = constant_array(node.inputs[2])
    else:  # ONNX default: uint8 0, or the type named by opset 21's output_dtype
        output_dtype = node.attributes.get_int("output_dtype", 0)
        zero_point = helper.tensor_dtype_to_np_dtype(output_dtype or TensorProto.UINT8).type(0)
    if scale is None or zero_point is None:
        raise ModelError(f"{what}: the scale/zero point of {node.op_type} '{node.name}' are not constants")
    if scale.size != 1 or np.asarray(zero_point).size != 1:
        raise ModelError(f"{what}: {node.op_type} '{node.name}' is per-channel; only per-tensor is supported")
    zero_point = np.asarray(zero_point).reshape(())
    if zero_point.dtype.name not in _NUMPY_TYPES:
        raise ModelError(f"{what}: {node.op_type} '{node.name}' is {zero_point.dtype.name}; "
                         "only uint8/int8 tensors can be converted")
    return np.float32(scale.reshape(())), zero_point[()]


def _initializer(graph: ir.Graph, names: UniqueNames, base: str, array) -> ir.Value:
    array = np.asarray(array)
    name = names(base)
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _node(names: UniqueNames, op_type: str, inputs, like: ir.Value, dtype=None,
          node_name: str = "", output_name: str | None = None) -> ir.Node:
    """A new default-domain node with one output shaped like ``like`` (of ``dtype``)."""
    out = ir.Value(name=output_name, type=ir.TensorType(dtype) if dtype is not None else like.type, shape=like.shape)
    return ir.Node("", op_type, list(inputs), outputs=[out], name=names(node_name))


def _quantize_float_output(graph: ir.Graph, index: int, y: ir.Value, tensor_name: str, dtype: str,
                           tensor_range: tuple[float, float]) -> QuantizedIO:
    """Graph output ``index`` (``y``, computed in float) becomes its QuantizeLinear to
    ``tensor_range``; nodes that read ``y`` inside the graph keep reading the float value."""
    params = activation_params(*tensor_range, dtype)
    names = _graph_names(graph)
    scale = _initializer(graph, names, f"{tensor_name}_output_scale", params.scale)
    zero_point = _initializer(graph, names, f"{tensor_name}_output_zero_point", params.zero_point)
    made = _node(names, "QuantizeLinear", [y, scale, zero_point], y, _IR_TYPES[dtype], node_name=f"{tensor_name}_quantize")
    graph.append(made)
    graph.outputs[index] = made.outputs[0]
    y.name = names(f"{tensor_name}_float")
    made.outputs[0].name = tensor_name
    return QuantizedIO("output", tensor_name, dtype, float(params.scale), int(params.zero_point))


class ModelEditor:
    """Edit the inputs/outputs of a quantized (QDQ) model in place.

    ``model`` is an ``onnx.ModelProto`` (edited in place, as in the Furiosa SDK) or a path.
    Quantize first: the editor removes Q/DQ nodes that the quantizer inserted.  Each call
    edits the model as onnx-ir, then writes it back into ``model``: a call that fails
    leaves ``model`` as it was.
    """

    def __init__(self, model):
        self.model = load_model(model)
        if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in self.model.graph.node):
            raise ModelError("the model is not quantized (no QuantizeLinear/DequantizeLinear nodes); "
                             "quantize it first, then convert its input/output types")
        self.edited: list[QuantizedIO] = []

    def _apply(self, edit) -> QuantizedIO:
        ir_model = ir.from_proto(self.model)
        io = edit(ir_model.graph)
        ir_passes.RemoveUnusedNodesPass()(ir_model)
        ir_passes.TopologicalSortPass()(ir_model)  # new nodes after the Constants they read
        self.model.CopyFrom(ir.to_proto(ir_model))
        write_io(self.model, io)
        self.edited = [e for e in self.edited if (e.kind, e.name) != (io.kind, io.name)] + [io]
        return io

    # -- the API -------------------------------------------------------------------------

    def convert_input_type(self, tensor_name: str, tensor_type) -> QuantizedIO:
        """Make graph input ``tensor_name`` the quantized integer tensor.

        The input's QuantizeLinear is removed. When the requested type differs from the
        quantized activations' type, the input gets the same grid shifted by 128 (same
        scale, zero point +-128) and a DequantizeLinear -> QuantizeLinear pair inside the
        graph converts it exactly. Float nodes that read the input directly read its
        dequantized value instead. Returns the parameters to quantize with.
        """
        dtype = parse_tensor_type(tensor_type)
        pure = get_pure_input_names(self.model)
        if tensor_name not in pure:
            listed = ", ".join(pure) or "(none)"
            if any(i.name == tensor_name for i in self.model.graph.initializer):
                raise UsageError(f"input '{tensor_name}' is backed by an initializer (a constant, not fed at "
                                 f"run time); the model's inputs are: {listed}")
            raise UsageError(f"unknown input '{tensor_name}'; the model's inputs are: {listed}")

        def edit(graph: ir.Graph) -> QuantizedIO:
            x = next(v for v in graph.inputs if v.name == tensor_name)
            if x.dtype != ir.DataType.FLOAT:
                raise ModelError(f"input '{tensor_name}' is {x.dtype.name.lower()}, not float32: "
                                 "no QuantizeLinear to remove (already converted?)")
            if x.is_graph_output():
                raise ModelError(f"input '{tensor_name}' is also a graph output; its type cannot change")
            quantize = next((n for n in graph if n.op_type == "QuantizeLinear" and n.inputs[0] is x), None)
            if quantize is None:
                raise ModelError(f"input '{tensor_name}' has no QuantizeLinear to remove (its consumers run in float)")
            scale, zero_point = _qdq_params(quantize, f"input '{tensor_name}'")
            calibrated = zero_point.dtype.name
            new_zero_point = _shifted(zero_point, dtype)
            names = _graph_names(graph)
            float_uses = [(node, i) for node, i in x.uses() if node is not quantize]
            x.type = ir.TensorType(_IR_TYPES[dtype])
            quantized = quantize.outputs[0]
            added = []
            if dtype == calibrated:  # the input IS the quantized tensor
                params = list(quantize.inputs[1:])
                if quantized.is_graph_output():  # keep that output's name, on a copy of the input
                    copy = _node(names, "Identity", [x], quantized, node_name=f"{tensor_name}_Identity")
                    added.append(copy)
                    graph.outputs[list(graph.outputs).index(quantized)] = copy.outputs[0]
                quantized.replace_all_uses_with(x)
                graph.remove(quantize, safe=True)
                if added:
                    copy.outputs[0].name = quantized.name
                dequantize_inputs = [x, *params]
            else:  # same grid in the other type: DQ -> Q restores the calibrated tensor exactly
                scale_value = _initializer(graph, names, f"{tensor_name}_input_scale", scale)
                zero_value = _initializer(graph, names, f"{tensor_name}_input_zero_point", new_zero_point)
                dequantize_inputs = [x, scale_value, zero_value]
            if float_uses or dtype != calibrated:
                dequantize = _node(names, "DequantizeLinear", dequantize_inputs, x, ir.DataType.FLOAT,
                                   node_name=f"{tensor_name}_DequantizeLinear",
                                   output_name=names(f"{tensor_name}_float"))
                added.append(dequantize)
                for node, i in float_uses:
                    node.replace_input_with(i, dequantize.outputs[0])
                if dtype != calibrated:
                    quantize.replace_input_with(0, dequantize.outputs[0])
                    quantize.name = names(f"{tensor_name}_requantize")
            graph.extend(added)
            return QuantizedIO("input", tensor_name, dtype, float(scale), int(new_zero_point))

        return self._apply(edit)

    def convert_output_type(self, tensor_name: str, tensor_type,
                            tensor_range: Sequence[float] | None = None) -> QuantizedIO:
        """Make graph output ``tensor_name`` the quantized integer tensor.

        The output's DequantizeLinear is removed. With ``tensor_range`` (min, max), or when
        the requested type differs from the activations' type, the output is requantized
        to the new parameters instead (DequantizeLinear -> QuantizeLinear). Float nodes
        that read the output keep reading its dequantized value. An output computed in
        float (no DequantizeLinear: a result the quantizer left float) is quantized to
        ``tensor_range``, which it then needs. Returns the parameters to dequantize with.
        """
        dtype = parse_tensor_type(tensor_type)
        if tensor_range is not None:
            tensor_range = _check_range(tensor_name, tensor_range)
        outputs = get_output_names(self.model)
        if tensor_name not in outputs:
            raise UsageError(f"unknown output '{tensor_name}'; the model's outputs are: {', '.join(outputs)}")

        def edit(graph: ir.Graph) -> QuantizedIO:
            index = outputs.index(tensor_name)
            y = graph.outputs[index]
            if y.dtype != ir.DataType.FLOAT:
                raise ModelError(f"output '{tensor_name}' is {y.dtype.name.lower()}, not float32: "
                                 "no DequantizeLinear to remove (already converted?)")
            dequantize = y.producer()
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                made_by = (f"made by {dequantize.op_type} '{dequantize.name}'" if dequantize is not None
                           else "not made by a node")
                if tensor_range is None:
                    raise ModelError(
                        f"output '{tensor_name}' is float ({made_by}; a quantizer leaves a result that only float "
                        f"ops read unquantized): give its range, `output_types` {tensor_name}={dtype}:MIN,MAX, or "
                        f"make it an integer output in the quantize run (`integer_outputs`)")
                return _quantize_float_output(graph, index, y, tensor_name, dtype, tensor_range)
            scale, zero_point = _qdq_params(dequantize, f"output '{tensor_name}'")
            if tensor_range is not None:
                params = activation_params(*tensor_range, dtype)
                new_scale, new_zero_point = params.scale, params.zero_point
            else:
                new_scale, new_zero_point = scale, _shifted(zero_point, dtype)
            requantize = not (new_scale == scale and new_zero_point == zero_point and dtype == zero_point.dtype.name)
            names = _graph_names(graph)
            source = dequantize.inputs[0]
            keep_dequantize = requantize or bool(y.uses())  # float readers inside keep its value
            if requantize:
                scale_value = _initializer(graph, names, f"{tensor_name}_output_scale", new_scale)
                zero_value = _initializer(graph, names, f"{tensor_name}_output_zero_point", new_zero_point)
                made = _node(names, "QuantizeLinear", [y, scale_value, zero_value], y, _IR_TYPES[dtype],
                             node_name=f"{tensor_name}_requantize")
                graph.append(made)
                result = made.outputs[0]
            elif _renamable(source):
                result = source  # the quantized tensor itself becomes the output
            else:  # a graph input/output or a shared tensor keeps its name: copy it out
                made = _node(names, "Identity", [source], source, node_name=f"{tensor_name}_Identity")
                graph.append(made)
                result = made.outputs[0]
            graph.outputs[index] = result
            if keep_dequantize:
                y.name = names(f"{tensor_name}_dequantized")
            else:
                graph.remove(dequantize, safe=True)
            result.name = tensor_name
            return QuantizedIO("output", tensor_name, dtype, float(new_scale), int(new_zero_point))

        return self._apply(edit)


def _shifted(zero_point: np.integer, dtype: str) -> np.integer:
    """The zero point of the same grid in ``dtype``: uint8 = int8 + 128."""
    shift = {("int8", "uint8"): 128, ("uint8", "int8"): -128}.get((zero_point.dtype.name, dtype), 0)
    return _NUMPY_TYPES[dtype](int(zero_point) + shift)


def _renamable(value: ir.Value) -> bool:
    """A tensor made by a node inside the graph (not a graph input/output or an initializer)."""
    return (value.producer() is not None and not value.is_graph_input() and not value.is_graph_output()
            and not value.is_initializer())


def _check_range(name: str, tensor_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in tensor_range)
    except (TypeError, ValueError):
        raise UsageError(f"range for output '{name}' must be two numbers (min, max), got {tensor_range!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise UsageError(f"range for output '{name}' must be finite with min <= max, got ({low}, {high})")
    return low, high
