"""Stage 3: turn a stage-1 model plus activation ranges into an int8 QDQ model."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from .checks import refuse_quantized
from .errors import InternalError, ModelError, UsageError, first_line
from .model_io import fits_in_protobuf, load_model
from .qdq.insert import insert_qdq
from .qdq.params import ActivationParams, resolve_weight_range
from .qdq.plan import QuantPlan, build_plan
from .targets import ACTIVATION_DTYPES, WEIGHT_QMAX, Target, TargetError, load_target


@dataclass
class QuantizeOutcome:
    model: onnx.ModelProto
    plan: QuantPlan
    params: dict[str, ActivationParams]
    weight_range: str
    target: Target | None = None


def _plan_with_ranges(model: ir.Model, ranges: Mapping, exclude: set[str], target: Target) -> QuantPlan:
    """Build the plan; nodes touching a tensor with no range fall back to float."""
    skip, reasons = set(exclude), {}
    while True:
        plan = build_plan(model, skip, target)
        missing = {t for t in plan.calibrated_tensors if t not in ranges}
        if not missing:
            plan.float_reasons.update(reasons)
            return plan
        for node in plan.quantized_nodes + plan.absorbed_nodes:
            touched = {v.name for v in node.inputs if v is not None} | {v.name for v in node.outputs}
            if touched & missing:
                skip.add(node.name)
                reasons[node.name] = f"no range for tensor '{min(touched & missing)}'"


def validate_ranges(ranges: Mapping) -> dict[str, tuple[float, float]]:
    """{tensor: (min, max)} with finite numbers and min <= max, else a UsageError."""
    checked = {}
    for name, pair in ranges.items():
        try:
            low, high = (float(v) for v in pair)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"range for tensor '{name}' must be two numbers [min, max], got {pair!r}") from exc
        if not (math.isfinite(low) and math.isfinite(high)):
            raise UsageError(f"range for tensor '{name}' must be finite, got [{low}, {high}]")
        if not low <= high:
            raise UsageError(f"range for tensor '{name}' has min > max: [{low}, {high}]")
        checked[name] = (low, high)
    return checked


def resolve_target(target, activation_dtype: str | None = None, weight_range: str | None = None) -> Target:
    """The target to quantize for, with the overrides checked against its constraints.

    ``target`` None is the placement of the low-level API before targets existed: the
    TFLite op table with any activation dtype (default int8) and weight range ("auto":
    this machine's onnxruntime CPU choice)."""
    from dataclasses import replace

    if activation_dtype is not None and activation_dtype not in ACTIVATION_DTYPES:
        raise UsageError(f"`activation_dtype` must be one of {', '.join(ACTIVATION_DTYPES)}, got {activation_dtype!r}")
    if weight_range is not None and weight_range not in (*WEIGHT_QMAX, "auto"):
        raise UsageError(f"`weight_range` must be full, reduced or auto, got {weight_range!r}")
    try:
        if target is None:
            base = load_target("tflite")
            base = replace(base, name="tflite-ops", requested="(none)",
                           activations=replace(base.activations, dtypes=ACTIVATION_DTYPES),
                           weights=replace(base.weights, ranges=tuple(WEIGHT_QMAX)))
            return base.choose(activation_dtype or "int8", resolve_weight_range(weight_range or "auto"))
        return load_target(target).choose(activation_dtype, weight_range)
    except TargetError as exc:
        raise UsageError(str(exc)) from exc


def insert(ir_model: ir.Model, ranges: Mapping, activation_dtype: str | None = None,
           exclude: Iterable[str] = (), weight_range: str | None = None, target=None,
           wide: Iterable[str] = ()) -> QuantizeOutcome:
    """Plan and insert Q/DQ into ``ir_model`` (a stage-1 model, changed in place) for
    ``target`` (a name, file or Target; see ``resolve_target`` for None).  ``wide``: tensors
    quantized at the target's 16-bit activation type (the model must be at opset 21)."""
    target = resolve_target(target, activation_dtype, weight_range)
    ranges = validate_ranges(ranges)
    plan = _plan_with_ranges(ir_model, ranges, set(exclude), target)
    plan.wide = set(wide) & set(plan.tensors)
    params = insert_qdq(ir_model, plan, ranges)
    return QuantizeOutcome(finish_model(ir_model), plan, params, target.weights.range, target)


def at_opset(model: onnx.ModelProto, version: int, purpose: str) -> onnx.ModelProto:
    """``model`` at opset ``version`` or newer (converted; a ModelError names ``purpose``)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), version)
    if current >= version:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception as exc:
        raise ModelError(f"{purpose} needs opset {version} and the model cannot be converted from opset "
                         f"{current}: {first_line(exc)}") from exc
    converted.ir_version = max(converted.ir_version, 9 if version < 21 else 10)
    return converted


def finish_model(ir_model: ir.Model) -> onnx.ModelProto:
    """A rewritten model as a checked ModelProto: unused nodes removed, sorted."""
    ir_passes.RemoveUnusedNodesPass()(ir_model)
    ir_passes.TopologicalSortPass()(ir_model)
    out = ir.to_proto(ir_model)
    try:
        if fits_in_protobuf(out):  # larger models are checked from the written file
            onnx.checker.check_model(out, full_check=True)
    except Exception as exc:
        raise InternalError(f"the quantized model fails onnx.checker: {first_line(exc)}") from exc
    return out


def quantize_with_plan(model, ranges: Mapping, activation_dtype: str | None = None,
                       exclude: Iterable[str] = (), weight_range: str | None = None,
                       target=None) -> QuantizeOutcome:
    """``insert`` on a stage-1 model given as a path or ModelProto (refused if quantized)."""
    proto = load_model(model)
    refuse_quantized(proto)
    resolved = resolve_target(target, activation_dtype, weight_range)
    proto = at_opset(proto, resolved.min_opset, f"target {resolved.name}")
    return insert(ir.from_proto(proto), ranges, exclude=exclude, target=resolved)


def quantize(model, ranges: Mapping, activation_dtype: str | None = None,
             exclude: Iterable[str] = (), weight_range: str | None = None, target=None) -> onnx.ModelProto:
    """Insert QDQ into a stage-1 model given ``{tensor: (min, max)}`` activation ranges.

    ``weight_range``: "full" ([-127, 127], the TFLite spec), "reduced" ([-63, 63], exact on
    x86 CPUs without VNNI), or "auto" (full where the local CPU has VNNI or is not x86).
    """
    return quantize_with_plan(model, ranges, activation_dtype, exclude, weight_range, target).model
