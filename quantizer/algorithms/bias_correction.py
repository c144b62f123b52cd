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

import itertools
import math
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

CORRECTED_OPS = frozenset({"Conv", "Gemm"})
MIN_RELATIVE_SHIFT = 1e-4  # of the layer output's RMS


@dataclass
class Corrections:
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # bias initializer -> corrected values
    relative_shift: dict[str, float] = field(default_factory=dict)  # node -> max |shift| / output RMS
    uncorrected: Any = None  # the model before the correction (the pipeline's check may return to it)
    kept: bool | None = None  # whether the check kept the correction (None: not checked yet)
    output_sqnr_db: dict = field(default_factory=dict)  # the check's output SQNR with and without
    float_outputs: list = field(default_factory=list)  # per sample, the uncorrected model's graph outputs

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


def _conv_geometry(node: onnx.NodeProto, spatial: Sequence[int], kernel: Sequence[int]):
    """(strides, dilations, pads at the start, output sizes) of a Conv over ``spatial``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = len(spatial)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = list(attrs.get("pads", [0] * 2 * rank))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    begins, outs = [], []
    for axis in range(rank):
        size, k, s, d = spatial[axis], kernel[axis], strides[axis], dilations[axis]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        else:
            begin, end = (0, 0) if auto_pad == "VALID" else (pads[axis], pads[axis + rank])
            out = (size + begin + end - d * (k - 1) - 1) // s + 1
        begins.append(begin)
        outs.append(out)
    return strides, dilations, begins, outs


def conv_tap_sums(x: np.ndarray, node: onnx.NodeProto, kernel: Sequence[int]) -> tuple[np.ndarray, int]:
    """For a Conv reading ``x`` (N, C, *spatial): S[c, t], the sum over the batch and every
    output position of the input value under kernel tap t (zero padding included), and the
    number of output positions.  By linearity the mean of Conv(x, D) over positions is
    sum_{c,t} D[o, c, t] * S[c, t] / count: the layer's mean error without running it.

    A tap reads a box of one stride phase of the input (indices r, r + s, ...): all of it
    but thin margins where the padding or the kernel's reach cuts it.  The box sum is the
    phase's total minus the margins, by inclusion-exclusion over the axes, from the phase's
    marginal sums: a few passes over ``x`` whatever the kernel size."""
    spatial = x.shape[2:]
    strides, dilations, begins, outs = _conv_geometry(node, spatial, kernel)
    rank, channels = len(spatial), x.shape[1]
    base = x[0] if x.shape[0] == 1 else x.sum(axis=0)  # (C, *spatial)
    marginals: dict[tuple, np.ndarray] = {}

    def marginal(phase: tuple, kept: tuple) -> np.ndarray:
        """The phase's sums over every spatial axis not in ``kept`` (numpy's pairwise sums
        in the input's precision: a margin is a small part of a total, never a difference
        of two large ones)."""
        key = (phase, kept)
        if key not in marginals:
            view = base[(slice(None),) + tuple(slice(r, None, s) for r, s in zip(phase, strides))]
            dropped = tuple(a + 1 for a in range(rank) if a not in kept)
            marginals[key] = view.sum(axis=dropped) if dropped else view
        return marginals[key]

    taps = list(np.ndindex(*kernel))
    sums = np.zeros((channels, len(taps)), np.float64)
    for t, tap in enumerate(taps):
        phase, outside = [], []
        for axis in range(rank):
            s, n = strides[axis], spatial[axis]
            start = tap[axis] * dilations[axis] - begins[axis]  # input index of output position 0
            first = max(0, -(start // s))  # the first position reading inside the input
            last = min(outs[axis] - 1, (n - 1 - start) // s)
            if first > last:
                break
            r = (start + first * s) % s
            low = (start + first * s - r) // s  # the box, in the phase's own indices
            length = len(range(r, n, s))
            phase.append(r)
            outside.append(np.r_[0:low, low + last - first + 1:length])
        else:
            for kept in itertools.chain.from_iterable(itertools.combinations(range(rank), k) for k in range(rank + 1)):
                if any(outside[a].size == 0 for a in kept):
                    continue
                part = marginal(tuple(phase), kept)
                if kept:
                    part = part[(slice(None),) + np.ix_(*[outside[a] for a in kept])]
                total = part.reshape(channels, -1).sum(axis=1, dtype=np.float64)
                sums[:, t] += -total if len(kept) % 2 else total
    return sums, int(x.shape[0] * math.prod(outs))


def _layer_sums(node: onnx.NodeProto, x: np.ndarray, weight_shape: Sequence[int]) -> tuple[np.ndarray, int]:
    """The input sums a layer's mean error is linear in, and the number of rows/positions."""
    if node.op_type == "Conv":
        return conv_tap_sums(x, node, weight_shape[2:])
    rows = x.reshape(-1, x.shape[-1])  # Gemm: (M, K)
    return rows.sum(axis=0, dtype=np.float64), rows.shape[0]


def _mean_error(node: onnx.NodeProto, delta: np.ndarray, sums: np.ndarray, count: int) -> np.ndarray:
    """Per output channel, the mean over rows/positions of node(x, delta) (no bias)."""
    mean = sums / max(count, 1)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        group = int(attrs.get("group", 1))
        out_channels, in_per_group = delta.shape[:2]
        d = delta.astype(np.float64).reshape(group, out_channels // group, in_per_group, -1)
        m = mean.reshape(group, in_per_group, -1)
        return np.einsum("gokt,gkt->go", d, m).reshape(out_channels)
    d = delta.astype(np.float64)
    return float(attrs.get("alpha", 1.0)) * (mean @ (d.T if attrs.get("transB", 0) else d))


def correct_biases(model: onnx.ModelProto, plan, weight_spec, samples: Sequence[Mapping[str, np.ndarray]], *,
                   show_progress: bool | None = None) -> Corrections:
    """The corrected biases of ``model``'s quantized Conv/Gemm layers (``plan``: the Q/DQ
    plan; ``weight_spec``: the target's weight spec), measured on ``samples``.

    One pass of the float model over the samples, every layer's input and output an
    extra output, each reduced at once to the sums its mean error is linear in
    (``conv_tap_sums``) and to its output energy, then dropped: one sample's activations
    are alive at a time."""
    initializers = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    layers = []
    for node, weight_name, bias_name, axis in _layers(model, plan):
        weight = numpy_helper.to_array(initializers[weight_name]).astype(np.float32)
        delta = (_quantized_weight(weight, axis, weight_spec) - weight).astype(np.float32)
        if np.any(delta):
            layers.append((node, bias_name, delta))
    corrections = Corrections()
    if not layers or not samples:
        return corrections
    graph_outputs = [o.name for o in model.graph.output]
    wanted = sorted({name for node, *_ in layers for name in (node.input[0], node.output[0])}
                    - graph_inputs - set(graph_outputs))
    session = runtime.session(model, extra_outputs=wanted)
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    counts = {node.name: 0 for node, *_ in layers}
    energy = {node.name: 0.0 for node, *_ in layers}
    failed: set[str] = set()
    progress = show_progress if show_progress is not None else sys.stderr.isatty()
    for sample in tqdm(samples, desc="correcting biases", unit="sample", disable=not progress, leave=False):
        values = dict(zip(names, session.run(names, dict(sample))))
        corrections.float_outputs.append([values[name] for name in graph_outputs])
        values.update({k: v for k, v in sample.items() if k in graph_inputs})
        for node, _, delta in layers:
            if node.name in failed:
                continue
            try:
                layer_sums, count = _layer_sums(node, values[node.input[0]], delta.shape)
            except Exception:  # a layout this reduction does not know: the layer keeps its bias
                failed.add(node.name)
                continue
            sums[node.name] = sums[node.name] + layer_sums if node.name in sums else layer_sums
            counts[node.name] += count
            output = values[node.output[0]]
            energy[node.name] += float(np.vdot(output.ravel(), output.ravel())) / max(output.size, 1)
        del values
    for node, bias_name, delta in layers:
        if node.name in failed or node.name not in sums:
            continue
        bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float32)
        try:
            shift = _mean_error(node, delta, sums[node.name], counts[node.name]).reshape(bias.shape)
        except ValueError:
            continue
        rms = np.sqrt(energy[node.name] / len(samples))
        relative = float(np.abs(shift).max() / rms) if rms > 0 else 0.0
        if relative < MIN_RELATIVE_SHIFT:
            continue
        corrections.biases[bias_name] = (bias - shift).astype(bias.dtype)
        corrections.relative_shift[node.name] = relative
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
