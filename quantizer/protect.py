"""Automatic protection: keep float the shared-parameter nodes whose single scale would
wipe out one of their tensors.

Concat, Split, Slice, Resize and the pass-through ops quantize all their tensors with one
set of parameters, from the union of the members' ranges.  When one member spans a tiny
part of that union -- box coordinates in [0, 640] concatenated with scores in [0, 1]:
the shared step is 2.5, so every score becomes 0 or 2.5 -- that member is destroyed.
Leaving the joining node float lets each input keep the parameters of its own producer
and costs one float op -- when the concatenation itself then stays float (a model
output); if a Conv quantizes it anyway, nothing is gained and a note says so instead.

A tensor can also be destroyed by its own scale: a power spectrum spanning [1e-13, 279]
gets a step of 1.1, and most of its values -- the quiet frames -- round to 0.  When the
calibration histogram shows that more than 90 % of a tensor's nonzero values round to 0,
the nodes that would quantize it stay float.  (Lower bars catch tensors that survive int8:
PP-OCRv5 activations with 60-89 % of their values just above 0, the STFT's real and
imaginary parts at 79 %; the power spectrum sits at 97-98 %.)
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from .qdq.params import spec_params
from .qdq.plan import QuantPlan, _activation_indices, _is_constant, build_plan
from .qdq.rules import SHARED

MIN_STEPS = 8  # a member narrower than this many steps of the shared scale is destroyed
DOMINANT_SHARE = 0.5  # ... when another member spans at least this share of the union
UNDERFLOW_SHARE = 0.9  # more than this share of a tensor's nonzero values rounding to 0 destroys it
PROTECTED_REASON = "protected: its int8 scale would crush a tensor (see protected)"


def member_ranges(plan: QuantPlan, ranges: Mapping) -> dict[str, tuple[float, float]]:
    """Each planned tensor's own range: fixed, constant or calibrated (as insert.py uses)."""
    result = {}
    for name, value in plan.tensors.items():
        if name in plan.fixed_ranges:
            result[name] = plan.fixed_ranges[name]
        elif _is_constant(value):
            array = value.const_value.numpy()
            result[name] = (float(array.min(initial=0.0)), float(array.max(initial=0.0)))
        elif name in ranges:
            result[name] = tuple(float(v) for v in ranges[name])
    return result


def _crushed_members(plan: QuantPlan, own: Mapping, dtype: str, min_steps: float) -> dict[str, str]:
    """{tensor: why} for group members narrower than ``min_steps`` of the group's scale
    while another member dominates the group's range."""
    groups = collections.defaultdict(list)
    for name in own:
        groups[plan.group(name)].append(name)
    crushed = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        low = min(min(own[m][0] for m in members), 0.0)
        high = max(max(own[m][1] for m in members), 0.0)
        scale = float(spec_params(low, high, dtype).scale)
        width = {m: own[m][1] - own[m][0] for m in members}
        widest = max(members, key=lambda m: (width[m], m))
        if width[widest] < DOMINANT_SHARE * (high - low):
            continue
        for m in members:
            if 0 < width[m] < min_steps * scale:
                lo_w, hi_w = own[widest]
                crushed[m] = (f"'{m}' range [{own[m][0]:.4g}, {own[m][1]:.4g}] would get {width[m] / scale:.1f} "
                              f"steps of the scale {scale:.4g} shared with '{widest}' [{lo_w:.4g}, {hi_w:.4g}]")
    return crushed


def underflow_share(stats, low: float, high: float, dtype: str) -> float | None:
    """Share of a tensor's nonzero values that the scale of [low, high] rounds to 0, from its
    calibration histogram (None without one).  Values of a clamped tensor (min or max exactly
    0, as after Relu) in the bin holding 0 count as exact zeros."""
    if stats is None or not getattr(stats, "with_histogram", False) or stats.count == 0:
        return None
    hist = stats.histogram()
    if hist.counts.size == 0:
        return None
    scale = float(spec_params(min(low, 0.0), max(high, 0.0), dtype).scale)
    if scale <= 0:
        return None
    counts = hist.counts
    rounds_to_zero = float(counts[np.abs(hist.centers) < scale / 2].sum())
    exact_zeros = 0.0
    if stats.minimum == 0.0 or stats.maximum == 0.0:
        zero_bin = int(np.floor(-hist.lo / hist.width))
        if 0 <= zero_bin < counts.size:
            exact_zeros = float(counts[zero_bin])
    nonzero = float(counts.sum()) - exact_zeros
    return (rounds_to_zero - exact_zeros) / nonzero if nonzero > 0 else None


def _underflowing(plan: QuantPlan, own: Mapping, statistics: Mapping, dtype: str) -> dict[str, str]:
    """{node: why} for the quantized nodes touching a tensor that the scale of its own range
    mostly rounds to 0 (a scale shared with wider tensors is _crushed_members' case)."""
    found = {}
    for tensor, (low, high) in own.items():
        share = underflow_share(statistics.get(tensor), low, high, dtype)
        if share is None or share <= UNDERFLOW_SHARE:
            continue
        why = (f"'{tensor}' range [{low:.3g}, {high:.3g}]: {share:.0%} of its nonzero values round to 0 "
               "at its int8 scale")
        for node in plan.quantized_nodes:
            indices = _activation_indices(node, plan.rules) if node.op_type in plan.rules else []
            touched = [node.inputs[i].name for i in indices]
            touched += [v.name for v in node.outputs]
            if tensor in touched:
                found.setdefault(node.name, why)
    return found


def _joining_nodes(plan: QuantPlan, crushed: Mapping[str, str]) -> dict[str, tuple[str, list[str]]]:
    """{node: (why, far side)} for the shared-parameter nodes that tie a crushed tensor to a
    tensor that is not crushed.  The far side is where the crushed values go on (a Concat's
    output) or come from (a Split's input): protection helps only if it stays float."""
    found = {}
    for node in plan.quantized_nodes:
        if node.op_type not in plan.rules or plan.rules[node.op_type].output != SHARED:
            continue
        inputs = [node.inputs[i].name for i in _activation_indices(node, plan.rules)]
        outputs = [v.name for v in node.outputs]
        touched = [t for t in inputs + outputs if t in plan.tensors]
        small = [t for t in touched if t in crushed]
        if small and len(small) < len(touched):
            found[node.name] = (crushed[small[0]], outputs if small[0] in inputs else inputs)
    return found


def find_protected(model: onnx.ModelProto | ir.Model, ranges: Mapping, exclude: Iterable[str] = (),
                   activation_dtype: str = "int8", min_steps: float = MIN_STEPS,
                   statistics: Mapping | None = None, target=None) -> tuple[list[dict], list[str]]:
    """([{"node", "reason"}] to keep float, [notes]) given the calibrated ``ranges`` (and the
    calibration ``statistics`` with histograms, for the underflow check).

    A joining node is kept float only if its far side then stays float; otherwise (a
    Concat feeding a Conv, which quantizes the concatenation with the union range anyway)
    it is left quantized and a note says which tensor is crushed.  Repeats until no new
    node is found (leaving a node float splits its group, which can expose another one).
    With a ``target``, its placement and activation parameters are used (its activation
    spec replaces ``activation_dtype``).
    """
    if target is not None:
        activation_dtype = target.activations
    ir_model = model if isinstance(model, ir.Model) else ir.from_proto(model)
    skip = set(exclude)
    protected, notes, declined = [], [], set()
    for _ in range(len(ir_model.graph) + 1):
        plan = build_plan(ir_model, skip, target)
        own = member_ranges(plan, ranges)
        found = _joining_nodes(plan, _crushed_members(plan, own, activation_dtype, min_steps))
        found = {name: v for name, v in found.items() if name not in skip and name not in declined}
        if not found:  # no shared scale to split: are tensors crushed by their own scale?
            underflow = {name: why for name, why in _underflowing(plan, own, statistics or {}, activation_dtype).items()
                         if name not in skip}
            if not underflow:
                break
            protected += [{"node": name, "reason": why} for name, why in sorted(underflow.items())]
            skip |= set(underflow)
            continue
        after = build_plan(ir_model, skip | set(found), target)
        for name, (reason, far_side) in sorted(found.items()):
            still = [t for t in far_side if t in after.tensors]
            if still:
                declined.add(name)
                notes.append(f"{reason}; keeping '{name}' float would not help, '{still[0]}' is quantized "
                             f"anyway (`exclude` its consumers to keep it float)")
            else:
                protected.append({"node": name, "reason": reason})
                skip.add(name)
    return protected, notes
