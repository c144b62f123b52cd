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
from typing import Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantizer.errors import ModelError, UsageError
from quantizer.model_io import load_model
from quantizer.naming import UniqueNames
from quantizer.qdq.params import activation_params
from quantizer.subgraphs import iter_graphs

from .metadata import QuantizedIO, write_io


class TensorType(enum.Enum):
    """Integer types a model input or output can be converted to."""

    UINT8 = "uint8"
    INT8 = "int8"


_ONNX_TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}
_NUMPY_TYPES = {"uint8": np.uint8, "int8": np.int8}


def parse_tensor_type(tensor_type) -> str:
    """'uint8' or 'int8' from a TensorType or its name; anything else is a UsageError."""
    if isinstance(tensor_type, TensorType):
        return tensor_type.value
    if isinstance(tensor_type, str) and tensor_type.lower() in _ONNX_TYPES:
        return tensor_type.lower()
    shown = tensor_type.name if isinstance(tensor_type, enum.Enum) else tensor_type
    raise UsageError(f"unsupported tensor type {shown!r}; supported: uint8, int8 (TensorType.UINT8, TensorType.INT8)")


def get_pure_input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs fed at run time (not backed by an initializer)."""
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def get_output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those of If/Loop/Scan bodies (which may read outer names)."""
    for sub in iter_graphs(graph):
        yield from sub.node


def _uses(graph: onnx.GraphProto, name: str, skip: onnx.NodeProto | None = None) -> list[tuple[onnx.NodeProto, int]]:
    """(node, input index) of every read of ``name``, except by ``skip``."""
    return [(node, i) for node in _all_nodes(graph)
            for i, value in enumerate(node.input) if value == name and not (skip is not None and node == skip)]


def _graph_names(graph: onnx.GraphProto) -> UniqueNames:
    """Fresh tensor/node names that collide with nothing in the model."""
    used = {i.name for i in graph.initializer} | {v.name for v in graph.input}
    used |= {v.name for v in graph.output} | {v.name for v in graph.value_info}
    for node in _all_nodes(graph):
        used.add(node.name)
        used.update(node.input)
        used.update(node.output)
    return UniqueNames(used)


class ModelEditor:
    """Edit the inputs/outputs of a quantized (QDQ) model in place.

    ``model`` is an ``onnx.ModelProto`` (edited in place, as in the Furiosa SDK) or a path.
    Quantize first: the editor removes Q/DQ nodes that the quantizer inserted.
    """

    def __init__(self, model):
        self.model = load_model(model)
        if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in self.model.graph.node):
            raise ModelError("the model is not quantized (no QuantizeLinear/DequantizeLinear nodes); "
                             "quantize it first, then convert its input/output types")
        self.edited: list[QuantizedIO] = []

    # -- lookups -------------------------------------------------------------------------

    def _constant(self, name: str) -> np.ndarray | None:
        graph = self.model.graph
        for init in graph.initializer:
            if init.name == name:
                return numpy_helper.to_array(init)
        for node in graph.node:
            if node.op_type == "Constant" and list(node.output) == [name]:
                attr = next((a for a in node.attribute if a.name == "value"), None)
                return numpy_helper.to_array(attr.t) if attr is not None else None
        return None

    def _qdq_params(self, node: onnx.NodeProto, what: str) -> tuple[np.float32, np.integer]:
        """The per-tensor (scale, zero point) of a QuantizeLinear/DequantizeLinear node."""
        scale = self._constant(node.input[1])
        if len(node.input) > 2 and node.input[2]:
            zero_point = self._constant(node.input[2])
        else:  # ONNX default: uint8 0, or the type named by opset 21's output_dtype
            output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
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

    def _add_constant(self, names: UniqueNames, base: str, value) -> str:
        name = names(base)
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def _rename(self, old: str, new: str) -> None:
        """Rename tensor ``old`` to ``new`` wherever it is produced or read."""
        graph = self.model.graph
        for node in _all_nodes(graph):
            for i, value in enumerate(node.input):
                if value == old:
                    node.input[i] = new
            for i, value in enumerate(node.output):
                if value == old:
                    node.output[i] = new
        for output in graph.output:
            if output.name == old:
                output.name = new
        self._drop_value_info(old)

    def _drop_value_info(self, name: str) -> None:
        """Graph inputs/outputs carry their own type; a stale value_info would contradict it."""
        infos = self.model.graph.value_info
        for i in reversed(range(len(infos))):
            if infos[i].name == name:
                del infos[i]

    def _record(self, io: QuantizedIO) -> QuantizedIO:
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
        graph = self.model.graph
        pure = get_pure_input_names(self.model)
        if tensor_name not in pure:
            listed = ", ".join(pure) or "(none)"
            if any(i.name == tensor_name for i in graph.initializer):
                raise UsageError(f"input '{tensor_name}' is backed by an initializer (a constant, not fed at "
                                 f"run time); the model's inputs are: {listed}")
            raise UsageError(f"unknown input '{tensor_name}'; the model's inputs are: {listed}")
        graph_input = next(i for i in graph.input if i.name == tensor_name)
        elem_type = graph_input.type.tensor_type.elem_type
        if elem_type != TensorProto.FLOAT:
            raise ModelError(f"input '{tensor_name}' is {helper.tensor_dtype_to_np_dtype(elem_type).name}, not float32: "
                             "no QuantizeLinear to remove (already converted?)")
        if tensor_name in get_output_names(self.model):
            raise ModelError(f"input '{tensor_name}' is also a graph output; its type cannot change")
        quantize = next((n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor_name), None)
        if quantize is None:
            raise ModelError(f"input '{tensor_name}' has no QuantizeLinear to remove (its consumers run in float)")
        scale, zero_point = self._qdq_params(quantize, f"input '{tensor_name}'")
        calibrated = zero_point.dtype.name
        new_zero_point = _shifted(zero_point, dtype)
        quantized = quantize.output[0]

        # Validated: edit. The float input's other readers need its dequantized value.
        names = _graph_names(graph)
        float_uses = _uses(graph, tensor_name, skip=quantize)
        graph.node.remove(quantize)
        graph_input.type.tensor_type.elem_type = _ONNX_TYPES[dtype]
        self._drop_value_info(tensor_name)
        new_nodes, dequantized = [], names(f"{tensor_name}_float")
        if dtype == calibrated:  # the input IS the quantized tensor
            params = [tensor_name, *quantize.input[1:]]
            if quantized in get_output_names(self.model):  # keep that output's name
                new_nodes.append(helper.make_node("Identity", [tensor_name], [quantized],
                                                  name=names(f"{tensor_name}_Identity")))
            else:
                self._rename(quantized, tensor_name)
            if float_uses:
                new_nodes.append(helper.make_node("DequantizeLinear", params, [dequantized],
                                                  name=names(f"{tensor_name}_DequantizeLinear")))
        else:  # same grid in the other type: DQ -> Q restores the calibrated tensor exactly
            scale_name = self._add_constant(names, f"{tensor_name}_input_scale", scale)
            zero_name = self._add_constant(names, f"{tensor_name}_input_zero_point", new_zero_point)
            new_nodes.append(helper.make_node("DequantizeLinear", [tensor_name, scale_name, zero_name], [dequantized],
                                              name=names(f"{tensor_name}_DequantizeLinear")))
            new_nodes.append(helper.make_node("QuantizeLinear", [dequantized, *quantize.input[1:]], [quantized],
                                              name=names(f"{tensor_name}_requantize")))
        for node, i in float_uses:
            node.input[i] = dequantized
        # The new nodes read only the input and constants: they go first, after the
        # Constant nodes (if any) that make their parameters.
        needed = {name for node in new_nodes for name in node.input}
        constants = []
        for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in needed]:
            constants.append(onnx.NodeProto())
            constants[-1].CopyFrom(node)
            graph.node.remove(node)
        for offset, node in enumerate(constants + new_nodes):
            graph.node.insert(offset, node)
        return self._record(QuantizedIO("input", tensor_name, dtype, float(scale), int(new_zero_point)))

    def convert_output_type(self, tensor_name: str, tensor_type,
                            tensor_range: Sequence[float] | None = None) -> QuantizedIO:
        """Make graph output ``tensor_name`` the quantized integer tensor.

        The output's DequantizeLinear is removed. With ``tensor_range`` (min, max), or when
        the requested type differs from the activations' type, the output is requantized
        to the new parameters instead (DequantizeLinear -> QuantizeLinear). Float nodes
        that read the output keep reading its dequantized value. Returns the parameters to
        dequantize with.
        """
        dtype = parse_tensor_type(tensor_type)
        if tensor_range is not None:
            tensor_range = _check_range(tensor_name, tensor_range)
        graph = self.model.graph
        outputs = get_output_names(self.model)
        if tensor_name not in outputs:
            raise UsageError(f"unknown output '{tensor_name}'; the model's outputs are: {', '.join(outputs)}")
        graph_output = next(o for o in graph.output if o.name == tensor_name)
        elem_type = graph_output.type.tensor_type.elem_type
        if elem_type != TensorProto.FLOAT:
            raise ModelError(f"output '{tensor_name}' is {helper.tensor_dtype_to_np_dtype(elem_type).name}, not float32: "
                             "no DequantizeLinear to remove (already converted?)")
        index, dequantize = next(((i, n) for i, n in enumerate(graph.node) if tensor_name in n.output), (None, None))
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            made_by = f"made by {dequantize.op_type} '{dequantize.name}'" if dequantize is not None else "not made by a node"
            raise ModelError(f"output '{tensor_name}' has no DequantizeLinear to remove (it is {made_by}, in float)")
        scale, zero_point = self._qdq_params(dequantize, f"output '{tensor_name}'")
        if tensor_range is not None:
            params = activation_params(*tensor_range, dtype)
            new_scale, new_zero_point = params.scale, params.zero_point
        else:
            new_scale, new_zero_point = scale, _shifted(zero_point, dtype)
        requantize = not (new_scale == scale and new_zero_point == zero_point and dtype == zero_point.dtype.name)

        names = _graph_names(graph)
        source = dequantize.input[0]
        float_uses = _uses(graph, tensor_name)
        graph_output.type.tensor_type.elem_type = _ONNX_TYPES[dtype]
        self._drop_value_info(tensor_name)
        if requantize or float_uses:  # keep the DQ, under a fresh name, for them
            dequantized = names(f"{tensor_name}_dequantized")
            dequantize.output[0] = dequantized
            for node, i in float_uses:
                node.input[i] = dequantized
        else:
            graph.node.remove(dequantize)
            index -= 1
        if requantize:
            scale_name = self._add_constant(names, f"{tensor_name}_output_scale", new_scale)
            zero_name = self._add_constant(names, f"{tensor_name}_output_zero_point", new_zero_point)
            graph.node.insert(index + 1, helper.make_node(
                "QuantizeLinear", [dequantized, scale_name, zero_name], [tensor_name],
                name=names(f"{tensor_name}_requantize")))
        elif _renamable(graph, source):
            self._rename(source, tensor_name)
        else:  # a graph input/output or a constant keeps its name: copy it out
            graph.node.insert(index + 1, helper.make_node("Identity", [source], [tensor_name],
                                                          name=names(f"{tensor_name}_Identity")))
        return self._record(QuantizedIO("output", tensor_name, dtype, float(new_scale), int(new_zero_point)))


def _shifted(zero_point: np.integer, dtype: str) -> np.integer:
    """The zero point of the same grid in ``dtype``: uint8 = int8 + 128."""
    shift = {("int8", "uint8"): 128, ("uint8", "int8"): -128}.get((zero_point.dtype.name, dtype), 0)
    return _NUMPY_TYPES[dtype](int(zero_point) + shift)


def _renamable(graph: onnx.GraphProto, name: str) -> bool:
    if any(name == v.name for v in (*graph.input, *graph.output, *graph.initializer)):
        return False
    return any(name in n.output for n in graph.node)


def _check_range(name: str, tensor_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in tensor_range)
    except (TypeError, ValueError):
        raise UsageError(f"range for output '{name}' must be two numbers (min, max), got {tensor_range!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise UsageError(f"range for output '{name}' must be finite with min <= max, got ({low}, {high})")
    return low, high
