"""The typed summary of a run, built in one place (``build_summary``) from the context.

It reads like the JSON report (``summary["nodes"]["quantized"]``, ``summary.as_dict()``)
and has typed fields (``summary.nodes.quantized``).  Frontends only format it.
"""

from __future__ import annotations

import collections
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STATIC_FORM = "static: int8 Q/DQ with calibrated activation ranges"

__all__ = ["CalibrationSummary", "FloatNode", "NodeSummary", "Summary", "build_summary", "versions"]


@dataclass(frozen=True)
class FloatNode:
    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class NodeSummary:
    original: int
    optimized: int
    quantized_by_op: dict[str, int]
    quantized_names: tuple[str, ...]  # stage-1 node names, what `exclude` matches
    activations_folded_into_q: int
    float: tuple[FloatNode, ...]
    forms: dict[str, str] = field(default_factory=dict)  # quantized node -> what it became

    @property
    def quantized(self) -> int:
        return sum(self.quantized_by_op.values())

    def as_dict(self) -> dict:
        return {
            "original": self.original, "optimized": self.optimized, "quantized": self.quantized,
            "quantized_by_op": dict(self.quantized_by_op), "quantized_names": list(self.quantized_names),
            "activations_folded_into_q": self.activations_folded_into_q,
            "float": [{"node": f.node, "op_type": f.op_type, "reason": f.reason} for f in self.float],
            "forms": dict(self.forms),
        }


@dataclass(frozen=True)
class CalibrationSummary:
    method: str  # a method name, or "given ranges"
    samples: int
    tensors: int
    nonfinite_values: dict[str, int] = field(default_factory=dict)
    nonfinite_samples: tuple[str, ...] = ()
    overridden: dict[str, list[float]] = field(default_factory=dict)
    selection: dict | None = None  # the auto method: which candidates won, by how much
    bias_correction: dict | None = None  # how many biases were corrected, and whether the check kept them
    smooth_quant: dict | None = None  # SmoothQuant (when it smoothed any tensor): how many, their alphas
    adaround: dict | None = None  # how many weights AdaRound rounded, per-layer time, whether the check kept them

    def as_dict(self) -> dict:
        out = {"method": self.method, "samples": self.samples, "tensors": self.tensors,
               "nonfinite_values": dict(self.nonfinite_values), "nonfinite_samples": list(self.nonfinite_samples)}
        if self.selection is not None:
            out["auto"] = dict(self.selection)
        if self.bias_correction is not None:
            out["bias_correction"] = dict(self.bias_correction)
        if self.smooth_quant is not None:
            out["smooth_quant"] = dict(self.smooth_quant)
        if self.adaround is not None:
            out["adaround"] = dict(self.adaround)
        if self.overridden:
            out["overridden"] = dict(self.overridden)
        return out


@dataclass(frozen=True)
class Summary(Mapping):
    """What a run did.  Optional parts are None when the run had no such step."""

    nodes: NodeSummary
    activation_dtype: str | None
    weight_range: str
    size_bytes: dict[str, int]
    seconds: dict[str, float]
    notes: tuple[str, ...]
    calibration: CalibrationSummary
    protected: tuple[dict, ...]
    steps: tuple[dict, ...]
    versions: dict[str, str]
    input: str | None = None
    output: str | None = None
    tensors: list[dict] | None = None
    report_samples: int | None = None
    fidelity: dict | None = None
    io: tuple[dict, ...] = ()
    autotune: dict | None = None
    input_sha256: str | None = None
    target: dict | None = None  # the resolved target (targets.Target.as_dict())
    fusion: dict | None = None  # what onnxruntime runs in integer kernels (fusion.FusionReport)
    mode: str = "static"
    equalization: dict | None = None  # cross-layer equalization: pairs, skipped chains, absorbed biases

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "nodes": self.nodes.as_dict(), "activation_dtype": self.activation_dtype,
            "weight_range": self.weight_range, "size_bytes": dict(self.size_bytes),
            "seconds": dict(self.seconds), "notes": list(self.notes),
            "calibration": self.calibration.as_dict(), "protected": [dict(p) for p in self.protected],
            "steps": [dict(s) for s in self.steps], "versions": dict(self.versions), "mode": self.mode,
        }
        for name in ("input", "output", "tensors", "report_samples", "fidelity", "autotune", "input_sha256", "target", "fusion",
                     "equalization"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.io:
            out["io"] = [dict(io) for io in self.io]
        return out

    # Mapping over the JSON form, so callers can read it like the report file.
    def __getitem__(self, key: str):
        return self.as_dict()[key]

    def __iter__(self):
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())


def versions() -> dict[str, str]:
    """Versions of this tool and the libraries that decide the output bytes."""
    found = {}
    for package in ("onnx-int8-quantizer", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def build_summary(ctx) -> Summary:
    """The one place a Summary is made: everything comes from the pipeline context."""
    outcome = ctx.outcome
    plan = outcome.plan
    op_types = {node.name: node.op_type for node in ctx.stage1.graph.node}
    quantized = collections.Counter(n.op_type for n in plan.quantized_nodes)
    float_nodes = tuple(FloatNode(name, op_types.get(name, "?"), reason)
                        for name, reason in sorted(plan.float_reasons.items()))
    nodes = NodeSummary(
        original=len(ctx.original.graph.node), optimized=len(ctx.stage1.graph.node),
        quantized_by_op=dict(sorted(quantized.items())),
        quantized_names=tuple(n.name for n in plan.quantized_nodes),
        activations_folded_into_q=len(plan.absorbed_nodes), float=float_nodes,
        forms={n.name: plan.forms.get(n.name, STATIC_FORM) for n in plan.quantized_nodes},
    )
    calibrator = ctx.calibrator
    if calibrator is not None and ctx.inputs.ranges is None:
        calibration = CalibrationSummary(
            method=ctx.config.method_name, samples=calibrator.samples_seen, tensors=len(ctx.ranges),
            nonfinite_values={n: s.nonfinite for n, s in calibrator.statistics.items() if s.nonfinite},
            nonfinite_samples=tuple(calibrator.nonfinite_samples),
            overridden={n: list(map(float, r)) for n, r in ctx.config.range_overrides.items()},
            selection=ctx.range_selection.summary() if ctx.range_selection is not None else None,
            bias_correction=ctx.bias_corrections.summary() if ctx.bias_corrections is not None else None,
            smooth_quant=ctx.smoothing.summary() if ctx.smoothing is not None and ctx.smoothing.alphas else None,
            adaround=ctx.rounding.summary() if ctx.rounding is not None else None,
        )
    elif ctx.config.mode != "static":
        calibration = CalibrationSummary("none" if ctx.hessians is None else "gptq activations (X^T X)", 0, 0)
    else:
        calibration = CalibrationSummary(
            "given ranges", 0, len(ctx.ranges),
            overridden={n: list(map(float, r)) for n, r in ctx.config.range_overrides.items()})
    activation_dtype = str(next(iter(outcome.params.values())).zero_point.dtype) if outcome.params else None
    written = ctx.written
    report = ctx.tensor_report or {}
    return Summary(
        nodes=nodes, activation_dtype=activation_dtype, weight_range=outcome.weight_range,
        size_bytes={"before": ctx.original.ByteSize(),
                    "after": written.size if written is not None else outcome.model.ByteSize()},
        seconds={k: round(v, 3) for k, v in ctx.timings.items()},
        notes=tuple(dict.fromkeys(ctx.notes)),  # a step run again (stage-1 fallback) adds no repeats
        calibration=calibration, protected=tuple(ctx.protected),
        steps=tuple(ctx.steps), versions=versions(),
        input=str(ctx.source) if ctx.source_path is not None else None,
        output=str(written.path) if written is not None else None,
        tensors=report.get("tensors"), report_samples=report.get("report_samples"),
        fidelity=written.fidelity.as_dict() if written is not None and written.fidelity is not None else None,
        io=tuple(ctx.io), autotune=ctx.autotune,
        input_sha256=ctx.input_sha256,
        target=outcome.target.as_dict() if outcome.target is not None else None,
        fusion=ctx.fusion.as_dict() if ctx.fusion is not None else None,
        mode=ctx.config.mode,
        equalization=ctx.equalization.summary() if ctx.equalization is not None else None,
    )
