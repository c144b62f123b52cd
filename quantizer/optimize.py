"""Stage 1: graph optimization with the field's libraries (onnx-ir + onnxscript).

The result is standard ONNX at opset >= 13 (per-channel Q/DQ needs it), with constants
folded, BatchNormalization and per-channel affine ops folded into the preceding
Conv/ConvTranspose/Gemm, Identity/Dropout removed, dead nodes dropped, unique names and
inferred shapes.  Numerically it is the same function as the input model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import onnxscript.optimizer
import onnxscript.rewriter
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as common_rules

from .checks import checker_failure, converter_failure, invalid_input
from .errors import ModelError, UsageError
from .model_io import fits_in_protobuf, load_model
from .rewrites import apply_rewrites, check_rewrite_names, wanted_opset
from .runtime import highest_qdq_opset
from .subgraphs import iter_graphs, repair_subgraph_outputs

MIN_OPSET = 13


class _ConvChannelAffine(pattern.RewriteRuleClassBase):
    """Conv/ConvTranspose(x, w[, b]) then Add or Mul by a per-channel constant -> one node.

    onnxscript folds only scalar affine ops; exporters such as Paddle's emit the Conv bias
    as a separate Add of a [1, C, 1, 1] constant, which blocks BatchNorm folding and adds a
    float op between the Conv and its activation.
    """

    def __init__(self, conv_type: str, op_type: str, with_bias: bool):
        super().__init__(f"Fold{conv_type}{'Bias' if with_bias else ''}{op_type}")
        self.conv_type = conv_type
        self.axis = 0 if conv_type == "Conv" else 1  # output channels of the weight
        self.op_type = op_type
        self.with_bias = with_bias

    def pattern(self, op, x, w, b, c):
        inputs = (x, w, b) if self.with_bias else (x, w)
        conv = getattr(op, self.conv_type)(*inputs, _allow_other_attributes=True, _outputs=["conv_out"])
        return getattr(op, self.op_type)(conv, c)

    def _channel_values(self, w: ir.Value, c: ir.Value) -> np.ndarray | None:
        if w.const_value is None or c.const_value is None:
            return None
        weight = w.const_value.numpy()
        const = c.const_value.numpy()
        channels = weight.shape[self.axis]
        if const.size == 1:
            return np.full(channels, const.reshape(()), dtype=weight.dtype)
        rank = weight.ndim  # conv output rank equals weight rank
        if const.ndim > rank or const.size != channels:
            return None
        padded = (1,) * (rank - const.ndim) + const.shape
        if padded[1] != channels or any(d != 1 for i, d in enumerate(padded) if i != 1):
            return None
        return const.reshape(channels).astype(weight.dtype)

    def check(self, context, x, w, c, conv_out, b=None, **_):
        result = pattern.MatchResult()
        if len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            return result.fail("conv output has other uses")
        group = conv_out.producer().attributes.get("group")
        if self.conv_type == "ConvTranspose" and group is not None and group.as_int() != 1:
            return result.fail("grouped ConvTranspose")
        if self.with_bias and b.const_value is None:
            return result.fail("conv bias is not constant")
        for value in (w, b) if self.with_bias else (w,):
            if len(value.uses()) != 1 or value.is_graph_input():
                return result.fail("conv parameters are shared")
        if self._channel_values(w, c) is None:
            return result.fail("not a per-channel constant")
        return result

    def rewrite(self, op, x, w, c, conv_out, b=None, **_):
        weight = w.const_value.numpy()
        values = self._channel_values(w, c)
        channels = weight.shape[self.axis]
        bias = b.const_value.numpy() if self.with_bias else np.zeros(channels, weight.dtype)
        if self.op_type == "Add":
            new_w, new_b = weight, bias + values
        else:
            shape = [1] * weight.ndim
            shape[self.axis] = channels
            new_w = weight * values.reshape(shape)
            new_b = bias * values
        attributes = conv_out.producer().attributes
        w_init = op.initializer(ir.tensor(new_w.astype(weight.dtype)), name=f"{w.name}_folded")
        b_init = op.initializer(ir.tensor(new_b.astype(weight.dtype)), name=f"{w.name}_bias_folded")
        return getattr(op, self.conv_type)(x, w_init, b_init, **attributes)


class _ScaleIntoConv(pattern.RewriteRuleClassBase):
    """Mul(x, scalar) feeding a Conv -> scale the Conv's weights instead.

    Exact for any padding (zero padding stays zero under scaling), unlike onnxscript's
    affine rule, which also needs the offset and therefore pads=0.
    """

    def __init__(self, with_bias: bool):
        super().__init__(f"FoldScalarMulIntoConv{'Bias' if with_bias else ''}")
        self.with_bias = with_bias

    def pattern(self, op, x, s, w, b):
        scaled = op.Mul(x, s, _outputs=["scaled"])
        inputs = (scaled, w, b) if self.with_bias else (scaled, w)
        return op.Conv(*inputs, _allow_other_attributes=True, _outputs=["conv_out"])

    def check(self, context, x, s, w, scaled, conv_out, b=None, **_):
        result = pattern.MatchResult()
        if s.const_value is None or s.const_value.numpy().size != 1:
            return result.fail("not a scalar constant")
        if len(scaled.uses()) != 1 or scaled.is_graph_output():
            return result.fail("scaled value has other uses")
        if w.const_value is None or len(w.uses()) != 1 or w.is_graph_input():
            return result.fail("weight not a private constant")
        return result

    def rewrite(self, op, x, s, w, scaled, conv_out, b=None, **_):
        weight = w.const_value.numpy()
        factor = s.const_value.numpy().reshape(()).astype(weight.dtype)
        w_init = op.initializer(ir.tensor(weight * factor), name=f"{w.name}_prescaled")
        inputs = (x, w_init, b) if self.with_bias else (x, w_init)
        return op.Conv(*inputs, **conv_out.producer().attributes)


_FOLDING_RULES = pattern.RewriteRuleSet(
    [
        _ConvChannelAffine.rule(conv_type, op_type, with_bias)
        for conv_type in ("Conv", "ConvTranspose")
        for op_type in ("Add", "Mul")
        for with_bias in (False, True)
    ]
    + [
        common_rules.affine_conv_fusion_rule,  # scalar Mul+Add before a 1x1 unpadded Conv
        _ScaleIntoConv.rule(False),
        _ScaleIntoConv.rule(True),
        common_rules.fuse_batchnorm_into_conv_rule,
        common_rules.fuse_batchnorm_into_conv_transpose_rule,
        common_rules.fuse_batchnorm_into_gemm_rule,
        common_rules.dropout_inference_rule,
        common_rules.dropout_zero_rule,
    ],
    commute=True,
)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _ensure_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert to an opset in [13, the newest at which onnxruntime runs Q/DQ]; refuse
    opsets newer than the installed onnx knows."""
    version = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if version > newest:
        raise ModelError(
            f"model opset {version} is newer than the installed onnx supports ({newest}); "
            "upgrade onnx/onnxruntime"
        )
    if version < MIN_OPSET:
        target = MIN_OPSET
    else:
        target = min(version, highest_qdq_opset(version))
        if target == version:
            return model
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeError/ValidationError
        error = converter_failure(model, version, target, exc)
        if target < version:  # going down: the quantized model would not load at this opset
            raise ModelError(f"the installed onnxruntime runs QuantizeLinear only up to opset {target}, and "
                             f"{error}") from exc
        raise error from exc
    converted.ir_version = max(converted.ir_version, 7)  # IR < 4 wants initializers as inputs
    return converted


def _opset_for_rewrites(model: onnx.ModelProto, rewrites: Sequence[str]) -> onnx.ModelProto:
    """Raise the opset so that the requested rewrites can produce their ops (LayerNormalization
    needs 17, Gelu 20), where onnxruntime runs Q/DQ at that opset and the converter succeeds;
    otherwise the model stays as it is (the rewrite just does not fire)."""
    version = default_opset(model)
    wanted = wanted_opset(rewrites, (n.op_type for g in iter_graphs(model.graph) for n in g.node))
    if wanted <= version or highest_qdq_opset(wanted) < wanted or wanted > onnx.defs.onnx_opset_version():
        return model
    try:
        converted = onnx.version_converter.convert_version(model, wanted)
        if fits_in_protobuf(converted):
            onnx.checker.check_model(converted)
    except Exception:  # the converter lacks an adapter for some op: keep the model's opset
        return model
    converted.ir_version = max(converted.ir_version, 7)
    return converted


def _fix_input_shapes(model: ir.Model, input_shapes: Mapping[str, Sequence[int]]) -> None:
    inputs = {value.name: value for value in model.graph.inputs}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise UsageError(
                f"`input_shapes` names unknown input '{name}'; model inputs: {', '.join(inputs)}"
            )
        value = inputs[name]
        if value.shape is not None and len(value.shape) != len(dims):
            raise UsageError(
                f"`input_shapes` for '{name}' has rank {len(dims)}, "
                f"model input has rank {len(value.shape)} ({value.shape})"
            )
        if any(int(d) <= 0 for d in dims):
            raise UsageError(f"`input_shapes` for '{name}' must be positive integers: {list(dims)}")
        if value.shape is not None:
            for fixed, dim in zip(dims, value.shape):
                if isinstance(dim, int) and dim != int(fixed):
                    raise UsageError(
                        f"`input_shapes` for '{name}' gives {list(dims)}, but the model fixes "
                        f"that input to {list(value.shape)}"
                    )
        value.shape = ir.Shape([int(d) for d in dims])


def _forget_declared_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the shapes the exporter declared for outputs and intermediates.

    Only the inputs' shapes are a contract (the data is checked against them); a declared
    output or value_info shape is a claim that may be wrong, and constant folding would
    turn it into constants (a Shape of a wrongly declared tensor becomes a wrong Reshape
    target, silently).  Shape inference recomputes them from the graph.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.value_info[:]
    contract = {i.name for i in copy.graph.input} | {i.name for i in copy.graph.initializer}
    for output in copy.graph.output:
        if output.name in contract:
            continue  # an input passed through: its shape is the input's
        if output.type.HasField("tensor_type") and output.type.tensor_type.HasField("shape"):
            for dim in output.type.tensor_type.shape.dim:
                if dim.HasField("dim_value"):  # a number is a claim folding would trust;
                    dim.Clear()  # a symbolic name and the rank stay
    return copy


def _dense(sparse: onnx.SparseTensorProto, name: str) -> onnx.TensorProto:
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(dims, dtype=np.int64)), values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), dims) if indices.size else indices.reshape(0)
    dense[indices.reshape(-1)] = values.reshape(-1)
    return onnx.numpy_helper.from_array(dense.reshape(dims), name)


def _densify_sparse(proto: onnx.ModelProto) -> int:
    """Sparse initializers and Constant(sparse_value) as dense tensors, in place (onnx-ir
    reads no sparse tensors; the values are the same).  Returns how many were changed."""
    changed = 0
    for sparse in list(proto.graph.sparse_initializer):
        proto.graph.initializer.append(_dense(sparse, sparse.values.name))
        changed += 1
    del proto.graph.sparse_initializer[:]
    for graph in iter_graphs(proto.graph):
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            attr = next((a for a in node.attribute if a.name == "sparse_value"), None)
            if attr is not None:
                dense = _dense(attr.sparse_tensor, node.output[0])
                node.attribute.remove(attr)
                node.attribute.append(onnx.helper.make_attribute("value", dense))
                changed += 1
    return changed


def _restore_output_names(graph: ir.Graph, names: list[str]) -> int:
    """Give every graph output its own name back.  Removing a no-op (a Reshape to the same
    shape, an Identity) between two graph outputs leaves one value in both places, under
    one name: the model's outputs would be [t1, t1] instead of [t1, t0].  Such an output
    gets an Identity carrying its name.  Returns the number added."""
    added = 0
    for index, (value, name) in enumerate(zip(list(graph.outputs), names)):
        if value.name == name:
            continue
        for node in graph:  # an inner value under that name gives it up (inner names are ours)
            for out in node.outputs:
                if out.name == name:
                    out.name = None
        copy = ir.Value(name=name, type=value.type, shape=value.shape)
        graph.append(ir.Node("", "Identity", [value], outputs=[copy]))
        graph.outputs[index] = copy
        added += 1
    return added


def _restore_output_dims(original: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    """Give the stage-1 outputs the declared symbolic dim names (``batch``) where the
    inferred shape agrees in rank and leaves the dim unknown; never a declared number."""
    declared = {o.name: o.type.tensor_type for o in original.graph.output if o.type.HasField("tensor_type")}
    for output in optimized.graph.output:
        want = declared.get(output.name)
        have = output.type.tensor_type
        if want is None or not want.HasField("shape") or not have.HasField("shape"):
            continue
        if len(want.shape.dim) != len(have.shape.dim):
            continue
        for d_want, d_have in zip(want.shape.dim, have.shape.dim):
            if d_want.dim_param and not d_have.HasField("dim_value"):
                d_have.dim_param = d_want.dim_param


def _same_pads(node: ir.Node) -> list[int] | None:
    """The explicit pads of a Conv with auto_pad SAME_UPPER/SAME_LOWER, counting dilations
    (an effective kernel of d*(k-1)+1); None when they depend on an unknown input size."""
    weight, data = node.inputs[1], node.inputs[0]
    kernel = node.attributes.get_ints("kernel_shape", None)
    if kernel is None and weight.shape is not None and all(isinstance(d, int) for d in weight.shape[2:]):
        kernel = list(weight.shape[2:])
    if not kernel:
        return None
    rank = len(kernel)
    strides = node.attributes.get_ints("strides", None) or [1] * rank
    dilations = node.attributes.get_ints("dilations", None) or [1] * rank
    sizes = list(data.shape[2:]) if data.shape is not None and len(data.shape) == rank + 2 else [None] * rank
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        effective = d * (k - 1) + 1
        if s == 1:
            total = effective - 1
        elif isinstance(size, int):
            total = max((-(-size // s) - 1) * s + effective - size, 0)
        else:
            return None
        small, large = total // 2, total - total // 2
        upper = node.attributes.get_string("auto_pad") == "SAME_UPPER"  # the odd pad goes at the end
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins + ends


def _explicit_same_pads(model: ir.Model) -> int:
    """Write SAME auto_pad as explicit pads ourselves: onnxscript's pad normalization
    ignores dilations (Conv(auto_pad=SAME_UPPER, dilations=2) got pads one step too small)."""
    changed = 0
    for node in model.graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        pads = _same_pads(node)
        if pads is None:
            continue  # the size decides the pads at run time: onnxscript's rule needs it too
        node.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")
        node.attributes["pads"] = ir.AttrInt64s("pads", pads)
        changed += 1
    return changed


def _user_names(graph: ir.Graph) -> dict[tuple, str]:
    """Keys under which a node's user-given name can be found again after rewriting:
    (op type, first input), (op type, first output), (first output)."""
    keys: dict[tuple, str] = {}
    for node in graph:
        if not node.name:
            continue
        first_in = node.inputs[0].name if node.inputs and node.inputs[0] is not None else None
        first_out = node.outputs[0].name if node.outputs else None
        for key in ((node.op_type, "in", first_in), (node.op_type, "out", first_out), ("out", first_out)):
            if key[-1] is not None:
                keys.setdefault(key, node.name)
    return keys


def _restore_user_names(graph: ir.Graph, keys: dict[tuple, str]) -> int:
    """Name the nodes that rewriting made (unnamed, or named by the optimizer) after the
    node they replace (a Conv with BatchNorm folded in keeps the Conv's name), so
    exclusions written against the user's model still match.  Returns how many nodes
    got a user's name back."""
    given = set(keys.values())
    used = {node.name for node in graph if node.name in given}
    restored = 0
    for node in graph:
        if node.name in given:
            continue
        first_in = node.inputs[0].name if node.inputs and node.inputs[0] is not None else None
        first_out = node.outputs[0].name if node.outputs else None
        for key in ((node.op_type, "in", first_in), (node.op_type, "out", first_out), ("out", first_out)):
            name = keys.get(key)
            if key[-1] is not None and name is not None and name not in used:
                node.name = name
                used.add(name)
                restored += 1
                break
    return restored


def _drop_unknown_reshape_allowzero(model: onnx.ModelProto) -> None:
    """onnxscript's rules may emit Reshape(allowzero=...) under opset 13, where the
    attribute does not exist yet.  It only matters when the shape holds a 0, so drop it
    when it is 0 or the constant shape has no zero."""
    if default_opset(model) >= 14:
        return
    constants = {init.name: init for init in model.graph.initializer}

    def harmless(node: onnx.NodeProto, attr: onnx.AttributeProto) -> bool:
        if attr.i == 0:
            return True
        shape = constants.get(node.input[1])
        return shape is not None and 0 not in onnx.numpy_helper.to_array(shape)

    for node in model.graph.node:
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
            kept = [a for a in node.attribute if not (a.name == "allowzero" and harmless(node, a))]
            del node.attribute[:]
            node.attribute.extend(kept)


# The optimizer runs again after the folding rules and target rewrites (until nothing
# changes), so its first run needs one round, not the library's default two: the same
# graph on PP-OCRv5 det/rec/cls, six silero-vad models, MiniLM, YOLOv8n-320 and the sample
# model for every preset's rewrites, in 25-50 % less stage-1 time on the larger ones.
FIRST_PASS_ITERATIONS = 1


def optimize_model(model, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                   conservative: bool = False, rewrites: Sequence[str] = ()) -> onnx.ModelProto:
    """Stage 1: return an optimized, numerically equivalent copy of ``model``.

    ``model`` is a path or ModelProto; ``input_shapes`` optionally fixes dynamic input
    dims, e.g. ``{"x": [1, 3, 224, 224]}``.  Node names given by the user survive, also on
    nodes that a rewrite merged (a BatchNorm folded into a Conv leaves the Conv's name).
    ``conservative`` skips the optimizer and the rewrite rules (opset conversion, clean-up
    and shapes only): the fallback when the optimized model does not compute the same
    outputs as the input.  ``rewrites`` names extra rule families of
    :mod:`quantizer.rewrites` (``"div_by_constant"``, ``"hardswish"``, ...) applied after
    the folding rules; unknown names raise ValueError, and ``conservative`` skips them too.
    """
    rewrites = check_rewrite_names(rewrites)
    original = load_model(model)
    converted = _ensure_opset(original)
    if rewrites and not conservative:
        converted = _opset_for_rewrites(converted, rewrites)
    proto = _forget_declared_shapes(converted)
    _densify_sparse(proto)
    try:
        ir_model = ir.from_proto(proto)
    except Exception as exc:
        reason = checker_failure(converted) if fits_in_protobuf(converted) else None
        if reason is not None:
            raise invalid_input(reason) from exc
        raise ModelError(f"cannot read the model graph: {exc}") from exc
    ir_passes.RemoveInitializersFromInputsPass()(ir_model)
    if input_shapes:
        _fix_input_shapes(ir_model, input_shapes)
    names = _user_names(ir_model.graph)
    output_names = [value.name for value in ir_model.graph.outputs]
    try:
        if not conservative:
            _explicit_same_pads(ir_model)
            onnxscript.optimizer.optimize_ir(ir_model, num_iterations=FIRST_PASS_ITERATIONS)
            onnxscript.rewriter.rewrite(ir_model, _FOLDING_RULES)
            if rewrites:
                apply_rewrites(ir_model, rewrites)
            onnxscript.optimizer.optimize_ir(ir_model)
        ir_passes.IdentityEliminationPass()(ir_model)
        repair_subgraph_outputs(ir_model)  # identity elimination may break If/Loop bodies
        ir_passes.RemoveUnusedNodesPass()(ir_model)
        _restore_user_names(ir_model.graph, names)
        _restore_output_names(ir_model.graph, output_names)
        ir_passes.NameFixPass()(ir_model)
        ir_passes.TopologicalSortPass()(ir_model)
    except Exception as exc:
        raise ModelError(f"graph optimization failed: {type(exc).__name__}: {exc}") from exc
    ir_model.producer_name = "onnx-int8-quantizer"
    optimized = ir.to_proto(ir_model)
    _drop_unknown_reshape_allowzero(optimized)
    try:
        optimized = onnx.shape_inference.infer_shapes(optimized, data_prop=True)
    except Exception:
        pass  # shapes are an aid for placement, not a requirement
    _restore_output_dims(original, optimized)
    return optimized
