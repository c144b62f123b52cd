"""`inspect`: what a quantization would do, before any data: the stage-1 model's nodes
under the names `exclude` matches, and for each whether it would be quantized, folded
into a quantize, or kept float and why.  The same steps as a quantization run (load,
refusals, stage 1, scope, plan), nothing calibrated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from . import pipeline
from .config import QuantizationConfig
from .context import Context
from .summary import STATIC_FORM


@dataclass(frozen=True)
class NodeDecision:
    name: str  # as `exclude` matches it
    op_type: str
    decision: str  # "quantized", "folded" (a Relu/Clip folded into the quantize before it), "float"
    reason: str = ""  # why float
    form: str = ""  # what a quantized node becomes (the mode's form)

    def as_dict(self) -> dict:
        out = {"name": self.name, "op_type": self.op_type, "decision": self.decision}
        if self.reason:
            out["reason"] = self.reason
        if self.form:
            out["form"] = self.form
        return out


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple  # ints, dim names, or None for unknown

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Inspection:
    target: dict
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    nodes: tuple[NodeDecision, ...]
    original_nodes: int
    calibrated_tensors: int
    excluded: tuple[str, ...] = ()
    mode: str = "static"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def count(self, decision: str) -> int:
        return sum(1 for n in self.nodes if n.decision == decision)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs], "nodes": [n.as_dict() for n in self.nodes],
            "counts": {"original": self.original_nodes, "optimized": len(self.nodes),
                       "quantized": self.count("quantized"), "folded": self.count("folded"),
                       "float": self.count("float"), "calibrated_tensors": self.calibrated_tensors},
            "excluded": list(self.excluded), "notes": list(self.notes), "mode": self.mode,
        }


def _tensors(values) -> tuple[TensorInfo, ...]:
    out = []
    for value in values:
        t = value.type.tensor_type
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "unknown"
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim) \
            if t.HasField("shape") else None
        out.append(TensorInfo(value.name, dtype, shape if shape is not None else ()))
    return tuple(out)


STEPS = ("load", "refuse_quantized", "check_names", "optimize", "resolve_scope", "check_stage1")


def inspect_model(model, config: QuantizationConfig | None = None, **changes) -> Inspection:
    """The plan for ``model`` under ``config`` (or the defaults with ``changes``: target,
    exclude, input_shapes, ...), without calibration data."""
    config = QuantizationConfig.build(config, **changes)
    steps = [s for s in pipeline.steps_for(config) if s.name in STEPS]
    ctx = pipeline.run(pipeline.new_context(model, config), steps)
    return _inspection(ctx)


def _inspection(ctx: Context) -> Inspection:
    plan = ctx.plan
    quantized = {n.name for n in plan.quantized_nodes}
    folded = {n.name for n in plan.absorbed_nodes}
    nodes = []
    for node in ctx.stage1.graph.node:
        if node.name in quantized:
            nodes.append(NodeDecision(node.name, node.op_type, "quantized",
                                      form=plan.forms.get(node.name, STATIC_FORM)))
        elif node.name in folded:
            nodes.append(NodeDecision(node.name, node.op_type, "folded", "folded into the quantize of the op before it"))
        else:
            nodes.append(NodeDecision(node.name, node.op_type, "float", plan.float_reasons.get(node.name, "")))
    initializers = {i.name for i in ctx.stage1.graph.initializer}
    return Inspection(
        target=ctx.config.resolved_target.as_dict(),
        inputs=_tensors(v for v in ctx.stage1.graph.input if v.name not in initializers),
        outputs=_tensors(ctx.stage1.graph.output), nodes=tuple(nodes),
        original_nodes=len(ctx.original.graph.node), calibrated_tensors=len(plan.calibrated_tensors),
        excluded=tuple(sorted(ctx.excluded)), notes=tuple(dict.fromkeys(ctx.notes)), mode=ctx.config.mode,
    )
