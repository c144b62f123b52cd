"""Input checks that turn known bad inputs into one-line errors before any long work.

A quantizer runs unattended in CI: every refusal here names the problem and what to do,
and happens before calibration so a bad model fails in seconds, not after a data pass.
"""

from __future__ import annotations

import collections
import re

import onnx

from .errors import ModelError, first_line

# Ops that only appear in a model that was quantized already (QDQ or QOperator form).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
    "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QGemm",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
})


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Quantizing twice would stack Q/DQ on integer tensors: refuse with the fix."""
    found = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    if found:
        counts = collections.Counter(n.op_type for n in found)
        ops = ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))
        raise ModelError(
            f"the model is already quantized ({ops}); give the float model "
            "(use `quantize edit` to change the inputs/outputs of a quantized model)"
        )


def refuse_ambiguous_names(model: onnx.ModelProto) -> None:
    """Duplicate initializer or graph-input names make the graph ambiguous (onnx.checker
    rejects them; onnxruntime picks one silently): a model error, before any work."""
    for what, names in (("initializer", [i.name for i in model.graph.initializer]),
                        ("graph input", [i.name for i in model.graph.input])):
        counts = collections.Counter(names)
        twice = sorted(name for name, n in counts.items() if n > 1)
        if twice:
            shown = ", ".join(repr(n) for n in twice[:3]) + (f" (+{len(twice) - 3})" if len(twice) > 3 else "")
            raise ModelError(f"the input model is not valid ONNX: {what} name(s) {shown} defined more than "
                             "once; fix the export")


def converter_failure(model: onnx.ModelProto, version: int, target: int, exc: Exception) -> ModelError:
    """A readable ModelError for a failed opset conversion (the C++ messages are raw)."""
    unknown = sorted({
        n.op_type for n in model.graph.node
        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)
    })
    if unknown:
        reason = f"op(s) {', '.join(unknown)} have no ONNX schema (experimental or removed ops)"
    else:
        text = first_line(exc)
        reason = re.sub(r"^.*?(Assertion|Unsupported|No )", r"\1", text)
    return ModelError(
        f"cannot convert the model from opset {version} to {target}: {reason}; "
        f"re-export it at opset {target} or newer"
    )


_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ [^(]*\([^)]*\)\s*")


def ort_message(exc: BaseException) -> str:
    """onnxruntime's first error line without the status prefix and C++ source location."""
    text = first_line(exc)
    text = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", text))
    return text.strip() or type(exc).__name__


def nothing_to_quantize(plan, subgraph_nodes: int) -> ModelError:
    """The error for a model where no main-graph node can run in int8 (e.g. all compute
    inside an If, as in silero-vad): writing an unquantized copy would pass CI silently."""
    reasons = collections.Counter(plan.float_reasons.values())
    listed = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3)) or "no nodes left after optimization"
    message = f"nothing to quantize: no node of the main graph can run in int8 ({listed})"
    if subgraph_nodes:
        message += (
            f"; the {subgraph_nodes} nodes inside If/Loop/Scan subgraphs stay float: "
            "export the model without control flow to quantize them"
        )
    return ModelError(message)


def checker_failure(model: onnx.ModelProto) -> str | None:
    """The first line of onnx.checker's full-check complaint, or None for a valid model."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        return first_line(exc)
    return None


def invalid_input(reason: str) -> ModelError:
    return ModelError(f"the input model is not valid ONNX (onnx.checker: {reason}); fix the export")


def check_stage1(original: onnx.ModelProto, optimized: onnx.ModelProto, plan) -> list[str]:
    """Checks between stage 1 and calibration; returns notes for the summary.

    An optimized model that fails onnx.checker is the input's fault when the input fails
    too (exit 3, fix the export), else ours (exit 1).  A model with nothing to quantize is
    refused here, before the calibration pass.
    """
    from .errors import InternalError
    from .model_io import fits_in_protobuf
    from .subgraphs import count_subgraph_nodes

    if fits_in_protobuf(optimized):
        reason = checker_failure(optimized)
        if reason is not None:
            if checker_failure(original) is not None:
                raise invalid_input(reason)
            raise InternalError(f"stage 1 produced a model that fails onnx.checker: {reason}")
    subgraph_nodes = count_subgraph_nodes(optimized)
    if not plan.quantized_nodes:
        raise nothing_to_quantize(plan, subgraph_nodes)
    notes = []
    if subgraph_nodes:
        owners = sum(1 for reason in plan.float_reasons.values() if reason == "has subgraphs")
        notes.append(f"{subgraph_nodes} nodes inside the subgraphs of {owners} If/Loop/Scan node(s) stay float")
    custom = sorted({r for r in plan.float_reasons.values() if r.startswith("custom-domain op")})
    if custom:
        notes.append(f"{len(custom)} custom-domain op type(s) stay float: "
                     + ", ".join(r.removeprefix("custom-domain op ") for r in custom))
    return notes
