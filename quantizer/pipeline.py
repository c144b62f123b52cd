"""The one call that runs all three stages and reports what it did."""

from __future__ import annotations

import collections
import platform
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import onnx

from .calibrate import Calibrator
from .checks import check_stage1, refuse_quantized
from .model_io import load_model
from .optimize import optimize_model
from .protect import PROTECTED_REASON, find_protected
from .qdq.plan import resolve_exclude
from .quantize import quantize_with_plan
from .report import SampleKeeper, report_summary


@dataclass
class QuantizationResult:
    model: onnx.ModelProto
    ranges: dict[str, tuple[float, float]]
    summary: dict = field(default_factory=dict)


def _model_bytes(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def quantize_model(
    model,
    dataset,
    method: str = "MIN_MAX_ASYM",
    *,
    percentage: float = 99.99,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    activation_dtype: str = "int8",
    weight_range: str = "auto",
    exclude: Iterable[str] = (),
    show_progress: bool | None = None,
    load_calibration: Sequence = (),
    save_calibration=None,
    ranges: Mapping[str, Sequence[float]] | None = None,
    range_overrides: Mapping[str, Sequence[float]] | None = None,
    protect: bool = True,
    report_samples: int = 0,
) -> QuantizationResult:
    """optimize -> calibrate -> quantize.

    ``dataset`` is a folder or an iterable of samples (or None when the statistics come
    from ``load_calibration`` states, or the ranges are given directly).
    ``save_calibration`` writes the state so other methods can reuse it without a model run.
    ``range_overrides`` replaces the ranges of the named tensors after calibration, e.g.
    ``{"x": (0, 1)}`` so that a uint8 input's parameters are exactly scale 1/255, zero point 0.
    ``exclude``: node names, op types or fnmatch globs to keep float.  ``protect`` keeps
    float the shared-parameter nodes whose one scale would crush a tensor (protect.py).
    ``report_samples`` > 0 adds ``summary["tensors"]``: per-tensor SQNR on that many samples.
    """
    timings = {}
    start = time.perf_counter()
    original = load_model(model)
    refuse_quantized(original)
    optimized = optimize_model(original, input_shapes)
    timings["optimize"] = time.perf_counter() - start
    exclude, unmatched = resolve_exclude(optimized.graph.node, exclude)
    stage1_notes = check_stage1(original, optimized, exclude)  # before the calibration pass
    keeper = SampleKeeper(dataset, report_samples)

    start = time.perf_counter()
    calibration_info = {"method": "given ranges", "samples": 0, "nonfinite_values": {}}
    if ranges is None:
        calibrator = Calibrator(optimized, method, percentage, exclude=exclude, show_progress=show_progress,
                                keep_histograms=True if (save_calibration or load_calibration or protect) else None)
        for state in load_calibration:
            calibrator.load_state(state)
        if dataset is not None:
            calibrator.collect_data(keeper.dataset)
        if save_calibration is not None:
            calibrator.save_state(save_calibration)
        ranges = calibrator.compute_range()
        calibration_info = {
            "method": calibrator.method.value,
            "samples": calibrator.samples_seen,
            "nonfinite_values": {n: s.nonfinite for n, s in calibrator.statistics.items() if s.nonfinite},
            "nonfinite_samples": calibrator.nonfinite_samples,
        }
    ranges = {**ranges, **(range_overrides or {})}
    timings["calibrate"] = time.perf_counter() - start

    start = time.perf_counter()
    statistics = calibrator.statistics if calibration_info["samples"] else None
    protected, crushed = (find_protected(optimized, ranges, exclude, activation_dtype, statistics=statistics)
                          if protect else ([], []))
    outcome = quantize_with_plan(optimized, ranges, activation_dtype, exclude | {p["node"] for p in protected}, weight_range)
    outcome.plan.float_reasons.update({p["node"]: PROTECTED_REASON for p in protected})
    timings["quantize"] = time.perf_counter() - start

    summary = build_summary(original, optimized, outcome, timings)
    if activation_dtype == "int8" and platform.machine().lower() in ("x86_64", "amd64"):
        summary["notes"].append(
            "onnxruntime on x86 fuses uint8 activations into integer kernels where int8 often stays "
            "float (DQ/Q around float ops); for CPU deployment try --activation-dtype uint8"
        )
    summary["calibration"] = {**calibration_info, "tensors": len(ranges)}
    if range_overrides:
        summary["calibration"]["overridden"] = {name: list(map(float, r)) for name, r in range_overrides.items()}
    summary["protected"] = protected
    summary["notes"].extend(crushed)
    summary["notes"].extend(stage1_notes)
    summary["notes"].extend(f"--exclude '{p}' matches no node name or op type (after optimization)" for p in unmatched)
    if report_samples > 0:
        summary.update(report_summary(optimized, outcome, keeper.samples(), ranges, report_samples))
    return QuantizationResult(outcome.model, ranges, summary)


def build_summary(original: onnx.ModelProto, optimized: onnx.ModelProto, outcome, timings: dict) -> dict:
    plan = outcome.plan
    quantized = collections.Counter(n.op_type for n in plan.quantized_nodes)
    float_nodes = [
        {"node": name, "op_type": _op_type(optimized, name), "reason": reason}
        for name, reason in sorted(plan.float_reasons.items())
    ]
    return {
        "nodes": {
            "original": len(original.graph.node),
            "optimized": len(optimized.graph.node),
            "quantized": sum(quantized.values()),
            "quantized_by_op": dict(sorted(quantized.items())),
            "activations_folded_into_q": len(plan.absorbed_nodes),
            "float": float_nodes,
        },
        "activation_dtype": str(next(iter(outcome.params.values())).zero_point.dtype) if outcome.params else None,
        "weight_range": outcome.weight_range,
        "size_bytes": {"before": _model_bytes(original), "after": _model_bytes(outcome.model)},
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "notes": [],
    }


def _op_type(model: onnx.ModelProto, name: str) -> str:
    for node in model.graph.node:
        if node.name == name:
            return node.op_type
    return "?"
