"""Automatic protection: keep float the shared-parameter nodes whose single scale would
wipe out one of their tensors.

Concat, Split, Slice, Resize and the pass-through ops quantize all their tensors with one
set of parameters, from the union of the members' ranges.  When one member spans a tiny
part of that union -- box coordinates in [0, 640] concatenated with scores in [0, 1]:
the shared step is 2.5, so every score becomes 0 or 2.5 -- that member is destroyed.
Leaving the joining node float lets each input keep the parameters of its own producer
and costs one float op -- when the concatenation itself then stays float (a model
output); if a Conv quantizes it anyway, nothing is gained and a note says so instead.
The decision reads the calibrated ranges only, never op names.
"""

from __future__ import annotations

import collections
from typing import Iterable, Mapping

import onnx
import onnx_ir as ir

from .qdq.params import activation_params
from .qdq.plan import QuantPlan, _activation_indices, _is_constant, build_plan
from .qdq.rules import RULES, SHARED

MIN_STEPS = 8  # a member narrower than this many steps of the shared scale is destroyed
DOMINANT_SHARE = 0.5  # ... when another member spans at least this share of the union
PROTECTED_REASON = "protected: one shared scale would crush a tensor (see protected)"


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
        scale = float(activation_params(low, high, dtype).scale)
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


def _joining_nodes(plan: QuantPlan, crushed: Mapping[str, str]) -> dict[str, tuple[str, list[str]]]:
    """{node: (why, far side)} for the shared-parameter nodes that tie a crushed tensor to a
    tensor that is not crushed.  The far side is where the crushed values go on (a Concat's
    output) or come from (a Split's input): protection helps only if it stays float."""
    found = {}
    for node in plan.quantized_nodes:
        if RULES[node.op_type].output != SHARED:
            continue
        inputs = [node.inputs[i].name for i in _activation_indices(node)]
        outputs = [v.name for v in node.outputs]
        touched = [t for t in inputs + outputs if t in plan.tensors]
        small = [t for t in touched if t in crushed]
        if small and len(small) < len(touched):
            found[node.name] = (crushed[small[0]], outputs if small[0] in inputs else inputs)
    return found


def find_protected(model: onnx.ModelProto, ranges: Mapping, exclude: Iterable[str] = (),
                   activation_dtype: str = "int8", min_steps: float = MIN_STEPS) -> tuple[list[dict], list[str]]:
    """([{"node", "reason"}] to keep float, [notes]) given the calibrated ``ranges``.

    A joining node is kept float only if its far side then stays float; otherwise (a
    Concat feeding a Conv, which quantizes the concatenation with the union range anyway)
    it is left quantized and a note says which tensor is crushed.  Repeats until no new
    node is found (leaving a node float splits its group, which can expose another one).
    """
    ir_model = ir.from_proto(model)
    skip = set(exclude)
    protected, notes, declined = [], [], set()
    for _ in range(len(model.graph.node) + 1):
        plan = build_plan(ir_model, skip)
        found = _joining_nodes(plan, _crushed_members(plan, member_ranges(plan, ranges), activation_dtype, min_steps))
        found = {name: v for name, v in found.items() if name not in skip and name not in declined}
        if not found:
            break
        after = build_plan(ir_model, skip | set(found))
        for name, (reason, far_side) in sorted(found.items()):
            still = [t for t in far_side if t in after.tensors]
            if still:
                declined.add(name)
                notes.append(f"{reason}; keeping '{name}' float would not help, '{still[0]}' is quantized "
                             f"anyway (--exclude its consumers to keep it float)")
            else:
                protected.append({"node": name, "reason": reason})
                skip.add(name)
    return protected, notes
