"""Bias correction: fold into each bias the output shift that weight rounding causes.

Rounding a layer's weights to int8 changes the mean of its output: for a Conv or Gemm
y = W x + b, the quantized layer computes y + (W_q - W) x, whose per-channel mean over
the data is E[(W_q - W) x] -- nonzero whenever the rounding errors of a channel do not
cancel against the input's mean (few taps, as in depthwise 3x3 convolutions, or the
reduced [-63, 63] weight range of x86 CPUs without VNNI).  That shift passes through every
later layer.  This step measures it on calibration samples and subtracts it from the
bias: b' = b - E[(W_q - W) x], so that the quantized layer's output has the float layer's
per-channel mean (Nagel et al. 2019, empirical bias correction).

What it minimizes: the per-output-channel mean error of each Conv/Gemm output caused by
its weight quantization, on the recorded float inputs of ``samples``.  W_q is exactly what
Q/DQ insertion will emit (the target's weight range, per-channel axis and scale rule).
Each layer is corrected on its float input; the corrections of earlier layers make
those inputs' means the float ones, so the corrections compound as they would layer by
layer.  The function computed in float changes by the correction (that is the point); a
layer whose shift is below ``MIN_RELATIVE_SHIFT`` of its output's scale is left alone.
The pipeline then keeps the corrected biases only if the quantized model's outputs are
closer to float with them (``check_bias_correction``): a mean measured on a few samples
can also move a layer away from what the rest of the data needs.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from .. import runtime
from ..qdq.params import quantize_weight, spec_weight_scales
from .loss_aware import MEMORY_BUDGET, UNKNOWN_BYTES, recorded_chunks

CORRECTED_OPS = frozenset({"Conv", "Gemm"})
MIN_RELATIVE_SHIFT = 1e-4  # of the layer output's RMS


@dataclass
class Corrections:
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # bias initializer -> corrected values
    relative_shift: dict[str, float] = field(default_factory=dict)  # node -> max |shift| / output RMS
    uncorrected: Any = None  # the model before the correction (the pipeline's check may return to it)
    kept: bool | None = None  # whether the check kept the correction (None: not checked yet)
    output_sqnr_db: dict = field(default_factory=dict)  # the check's output SQNR with and without

    def summary(self) -> dict:
        shifts = sorted(self.relative_shift.values())
        return {"corrected": len(self.biases), "kept": self.kept,
                "output_sqnr_db": {k: round(v, 2) for k, v in self.output_sqnr_db.items()},
                "median_relative_shift": round(float(np.median(shifts)), 5) if shifts else 0.0,
                "max_relative_shift": round(float(shifts[-1]), 5) if shifts else 0.0}


def _quantized_weight(weight: np.ndarray, axis: int | None, spec) -> np.ndarray:
    """The weight as Q/DQ insertion emits it, dequantized (weights are symmetric, zero point 0)."""
    scales = spec_weight_scales(weight, axis, spec)
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    q = quantize_weight(weight, scales, axis, spec.qmax).astype(np.float32)
    return q * (scales.reshape(shape) if axis is not None else scales)


def _layers(model: onnx.ModelProto, plan) -> list[tuple[onnx.NodeProto, str, str, int | None]]:
    """(node, weight name, bias name, weight axis) of the quantized Conv/Gemm nodes with a
    constant weight and a constant bias."""
    initializers = {t.name for t in model.graph.initializer}
    slots = {(slot.node.name, slot.index): slot.axis for slot in plan.weights}
    found = []
    for node in model.graph.node:
        if node.op_type not in CORRECTED_OPS or (node.name, 1) not in slots or len(node.input) < 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0)):
            continue
        if node.input[1] in initializers and node.input[2] in initializers:
            found.append((node, node.input[1], node.input[2], slots[(node.name, 1)]))
    return found


def _shift_model(model: onnx.ModelProto, node: onnx.NodeProto, delta: np.ndarray) -> onnx.ModelProto:
    """A model computing node(x, W_q - W) without bias: the output error of the layer."""
    x = node.input[0]
    error_node = helper.make_node(node.op_type, [x, "delta"], ["error"], name="error", **{
        a.name: helper.get_attribute_value(a) for a in node.attribute})
    graph = helper.make_graph([error_node], "shift", [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("error", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(delta, "delta")])
    sub = helper.make_model(graph, opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")])
    sub.ir_version = model.ir_version
    return sub


def correct_biases(model: onnx.ModelProto, plan, weight_spec, samples: Sequence[Mapping[str, np.ndarray]], *,
                   sizes: Mapping[str, int] | None = None, memory_budget: int = MEMORY_BUDGET,
                   show_progress: bool | None = None) -> Corrections:
    """The corrected biases of ``model``'s quantized Conv/Gemm layers (``plan``: the Q/DQ
    plan; ``weight_spec``: the target's weight spec), measured on ``samples``."""
    initializers = {t.name: t for t in model.graph.initializer}
    layers = _layers(model, plan)
    names = [node.name for node, *_ in layers]
    by_name = {node.name: (node, w, b, axis) for node, w, b, axis in layers}
    needs = {node.name: [node.input[0], node.output[0]] for node, *_ in layers}
    sizes = sizes or {}
    size_of = lambda name: sizes.get(name, UNKNOWN_BYTES) * max(len(samples), 1)  # noqa: E731
    corrections = Corrections()
    progress = show_progress if show_progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(names), desc="correcting biases", unit="layer", disable=not progress, leave=False)
    for group, recorded in recorded_chunks(model, names, needs, samples, size_of, memory_budget):
        for name in group:
            bar.update(1)
            node, weight_name, bias_name, axis = by_name[name]
            weight = numpy_helper.to_array(initializers[weight_name]).astype(np.float32)
            bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float32)
            delta = (_quantized_weight(weight, axis, weight_spec) - weight).astype(np.float32)
            if not np.any(delta):
                continue
            try:
                session = runtime.session(_shift_model(model, node, delta))
                channel_axis = 1 if node.op_type == "Conv" else -1
                total, count, energy = np.zeros(bias.shape, np.float64), 0, 0.0
                for values in recorded:
                    error = session.run(None, {node.input[0]: values[node.input[0]]})[0]
                    moved = np.moveaxis(error, channel_axis, -1).reshape(-1, bias.size)
                    total += moved.sum(axis=0, dtype=np.float64)
                    count += moved.shape[0]
                    output = values[node.output[0]]
                    energy += float(np.vdot(output.ravel(), output.ravel())) / max(output.size, 1)
            except Exception:  # a layer onnxruntime will not run alone keeps its bias
                continue
            shift = total / max(count, 1)
            rms = np.sqrt(energy / max(len(recorded), 1))
            relative = float(np.abs(shift).max() / rms) if rms > 0 else 0.0
            if relative < MIN_RELATIVE_SHIFT:
                continue
            corrections.biases[bias_name] = (bias - shift).astype(bias.dtype)
            corrections.relative_shift[name] = relative
    bar.close()
    return corrections


def apply(model: onnx.ModelProto, corrections: Corrections) -> onnx.ModelProto:
    """A copy of ``model`` with the corrected biases (initializers shared by other nodes
    are left alone: a bias used twice cannot hold two corrections)."""
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    corrected = onnx.ModelProto()
    corrected.CopyFrom(model)
    for tensor in corrected.graph.initializer:
        if tensor.name in corrections.biases and uses.get(tensor.name, 0) == 1:
            tensor.CopyFrom(numpy_helper.from_array(corrections.biases[tensor.name], tensor.name))
    return corrected
