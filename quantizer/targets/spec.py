"""A target as data: the dataclasses, and reading them from a TOML/JSON mapping.

Presets and user files go through the same ``from_mapping``, so the documented schema
is exactly what the presets use.  Every error names the key (``activations.dtype``) and
the file; the loader turns it into one UsageError line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..qdq.params import FLOAT8, WEIGHT_QMAX, WIDE_DTYPES
from ..qdq.rules import KINDS, OUTPUTS, OpRule

ACTIVATION_DTYPES = ("uint8", "int8")  # the order is the default preference of a file without dtypes
ALLOWED_ACTIVATION_DTYPES = (*ACTIVATION_DTYPES, FLOAT8)  # float8 only where a target declares it
WEIGHT_DTYPES = ("int8", FLOAT8)
FLOAT8_OPSET = 19  # QuantizeLinear/DequantizeLinear with float8 types
BIAS_DTYPES = ("int32", "float")
# Kinds of quantization (QuantizationConfig.mode); a target lists the ones it runs.
MODES = ("static", "dynamic", "weight-only")
PLACEMENTS = ("outputs", "inputs")


class TargetError(ValueError):
    """A target that cannot be used: unknown name, invalid file, forbidden override."""


@dataclass(frozen=True)
class ScaleRule:
    """Constraints on a scale: rounded up to a power of two, and at least ``minimum``."""

    power_of_two: bool = False
    minimum: float = 0.0

    def apply(self, scale):
        """``scale`` (scalar or array, float32) under the constraints; never smaller."""
        scale = np.asarray(scale, dtype=np.float32)
        if self.minimum > 0:
            scale = np.maximum(scale, np.float32(self.minimum))
        if self.power_of_two:
            scale = np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
        return scale

    @property
    def is_identity(self) -> bool:
        return not self.power_of_two and self.minimum <= 0


@dataclass(frozen=True)
class ActivationSpec:
    dtype: str = "uint8"  # what the target uses unless overridden
    dtypes: tuple[str, ...] = ACTIVATION_DTYPES  # what an override may choose
    symmetric: bool = False  # zero point 0, scale = max|x| / 127
    scale: ScaleRule = ScaleRule()
    wide: str | None = None  # int16/uint16: what a tensor raised to 16 bits uses (None: no 16-bit tensors)
    wide_symmetric: bool = False

    def widened(self) -> ActivationSpec:
        """The spec of a 16-bit tensor."""
        return replace(self, dtype=self.wide, symmetric=self.wide_symmetric)


@dataclass(frozen=True)
class WeightSpec:
    range: str = "full"  # "full" [-127, 127] or "reduced" [-63, 63]
    ranges: tuple[str, ...] = tuple(WEIGHT_QMAX)
    per_channel: bool = True
    scale: ScaleRule = ScaleRule()
    dtype: str = "int8"  # or float8e4m3fn (symmetric, scale = amax / 448)

    @property
    def qmax(self) -> int:
        return WEIGHT_QMAX[self.range]


@dataclass(frozen=True)
class Target:
    """What a backend runs in integer arithmetic and how it wants its parameters.

    ops: op type -> OpRule, the ops the backend has integer kernels (or Q/DQ fusions) for.
    placement: "outputs" puts a Q/DQ pair after every quantized tensor (onnxruntime,
    TFLite); "inputs" only on the inputs of quantized ops (TensorRT's explicit mode).
    fused_activations: ops folded into the Q after a quantized op (Relu, Clip).
    fold_scalar_mul: a Mul by a positive scalar constant after a quantized tensor becomes
    a DequantizeLinear with a scaled scale (no op at run time).
    rewrites: stage-1 rewrite families (quantizer/rewrites.py) that help this backend.
    report_fusion: after writing, report which nodes onnxruntime runs in integer kernels.
    float_when_unread: an op without a weight (Add, Mul, Sigmoid, AveragePool, ...) whose
    result no integer op reads -- a residual join into a float LayerNormalization, a
    graph output -- stays float (with "outputs" placement): its Q/DQ would only round
    that result.
    float_output_ops: ops the backend runs with integer inputs and a float output
    (onnxruntime: MatMul as MatMulIntegerToFloat, Gemm as QGemm); with
    ``float_when_unread``, such an op whose result no integer op reads gets no Q.
    integer_outputs: graph outputs the deployment reads as integers (set per run from
    ``QuantizationConfig.integer_outputs``): they count as read by an integer op.
    modes: the kinds of quantization the backend runs fast (MODES): "static" Q/DQ,
    "dynamic" (int8 weights, activations quantized at run time), "weight-only" (int8/int4
    block-quantized weights, float compute).
    """

    name: str
    description: str = ""
    activations: ActivationSpec = ActivationSpec()
    weights: WeightSpec = WeightSpec()
    bias: str = "int32"
    ops: Mapping[str, OpRule] = field(default_factory=dict)
    placement: str = "outputs"
    fused_activations: frozenset[str] = frozenset({"Relu", "Clip"})
    fold_scalar_mul: bool = False
    rewrites: tuple[str, ...] = ()
    report_fusion: bool = False
    float_when_unread: bool = False
    float_output_ops: frozenset[str] = frozenset()
    integer_outputs: frozenset[str] = frozenset()
    modes: tuple[str, ...] = ("static",)
    requested: str = ""  # what the user asked for ("ort-cpu" resolves to a machine's preset)
    source: str = ""  # "preset" or the file it came from

    def choose(self, activation_dtype: str | None = None, weight_range: str | None = None) -> Target:
        """This target with an override of its activation dtype / weight range, checked
        against what it allows (None or "auto": the target's own choice)."""
        activations, weights = self.activations, self.weights
        if activation_dtype is not None and activation_dtype != activations.dtype:
            if activation_dtype not in activations.dtypes:
                why = " (it needs zero point 0: symmetric int8)" if activations.symmetric else ""
                raise TargetError(f"target {self.name} does not allow `activation_dtype` {activation_dtype}: "
                                  f"it allows {', '.join(activations.dtypes)}{why}")
            activations = replace(activations, dtype=activation_dtype)
        if weight_range not in (None, "auto") and weight_range != weights.range:
            if weight_range not in weights.ranges:
                raise TargetError(f"target {self.name} does not allow `weight_range` {weight_range}: "
                                  f"it allows {', '.join(weights.ranges)}")
            weights = replace(weights, range=weight_range)
        return replace(self, activations=activations, weights=weights)

    @property
    def min_opset(self) -> int:
        """The opset the quantized model needs (float8 Q/DQ: 19)."""
        return FLOAT8_OPSET if FLOAT8 in (self.activations.dtype, self.weights.dtype) else 13

    def as_dict(self) -> dict:
        """The resolved target, as recorded in the report and the model's metadata."""
        def scale(rule: ScaleRule) -> dict:
            return {"power_of_two": rule.power_of_two, "minimum": rule.minimum}

        return {
            "name": self.name, "requested": self.requested or self.name, "source": self.source,
            "description": self.description,
            "activations": {"dtype": self.activations.dtype, "dtypes": list(self.activations.dtypes),
                            "symmetric": self.activations.symmetric, "scale": scale(self.activations.scale),
                            "wide_dtype": self.activations.wide, "wide_symmetric": self.activations.wide_symmetric},
            "weights": {"dtype": self.weights.dtype, "range": self.weights.range, "qmax": self.weights.qmax,
                        "ranges": list(self.weights.ranges), "per_channel": self.weights.per_channel,
                        "scale": scale(self.weights.scale)},
            "bias": self.bias,
            "placement": {"qdq": self.placement, "fused_activations": sorted(self.fused_activations),
                          "fold_scalar_mul": self.fold_scalar_mul, "rewrites": list(self.rewrites),
                          "float_when_unread": self.float_when_unread,
                          "float_output_ops": sorted(self.float_output_ops),
                          "report_fusion": self.report_fusion},
            "modes": list(self.modes),
            "ops": {op: rule.as_dict() for op, rule in sorted(self.ops.items())},
        }


# -- reading a mapping -----------------------------------------------------------------

_SCHEMA = {
    "name": str, "description": str, "base": str, "modes": list,
    "activations": {"dtype": str, "dtypes": list, "symmetric": bool, "wide_dtype": str, "wide_symmetric": bool,
                    "scale": {"power_of_two": bool, "minimum": (int, float)}},
    "weights": {"dtype": str, "range": str, "ranges": list, "per_channel": bool,
                "scale": {"power_of_two": bool, "minimum": (int, float)}},
    "bias": {"dtype": str},
    "placement": {"qdq": str, "fused_activations": list, "fold_scalar_mul": bool, "rewrites": list,
                  "report_fusion": bool, "float_when_unread": bool, "float_output_ops": list},
    "ops": dict,
}


def check_keys(data: Mapping, schema: Mapping = _SCHEMA, prefix: str = "") -> None:
    """Unknown keys and wrong value types, named by their dotted key."""
    if not isinstance(data, Mapping):
        raise TargetError(f"`{prefix.rstrip('.') or 'target'}` must be a table, got {type(data).__name__}")
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise TargetError(f"unknown key `{where}` (known here: {known})")
        expected = schema[key]
        if isinstance(expected, dict):
            check_keys(value, expected, f"{where}.")
        elif expected is not dict and (not isinstance(value, expected) or
                                       (expected in ((int, float),) and isinstance(value, bool))):
            names = "number" if expected == (int, float) else {str: "string", list: "list", bool: "true or false"}[expected]
            raise TargetError(f"`{where}` must be a {names}, got {value!r}")
        elif expected is dict and not isinstance(value, Mapping):
            raise TargetError(f"`{where}` must be a table of op types, got {value!r}")


def merge(base: Mapping, override: Mapping) -> dict:
    """``override`` on top of ``base``, tables merged key by key (``ops`` per op)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _choice(value, allowed, key: str) -> str:
    if value not in allowed:
        raise TargetError(f"`{key}` must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _choices(values, allowed, key: str) -> tuple[str, ...]:
    if not values:
        raise TargetError(f"`{key}` must list at least one of {', '.join(allowed)}")
    return tuple(dict.fromkeys(_choice(v, allowed, key) for v in values))


def _scale(data: Mapping, key: str) -> ScaleRule:
    minimum = float(data.get("minimum", 0.0))
    if not math.isfinite(minimum) or minimum < 0:
        raise TargetError(f"`{key}.minimum` must be a finite number >= 0, got {data.get('minimum')!r}")
    return ScaleRule(bool(data.get("power_of_two", False)), minimum)


def _op_rule(op: str, value: Any) -> OpRule | None:
    key = f"ops.{op}"
    if value is False:
        return None  # removed by an override
    if isinstance(value, str):
        if value not in KINDS:
            raise TargetError(f"`{key}` must be one of {', '.join(KINDS)} (or a table, or false), got {value!r}")
        return KINDS[value]
    if not isinstance(value, Mapping):
        raise TargetError(f"`{key}` must be a kind name, a table or false, got {value!r}")
    check_keys(value, {"kind": str, "inputs": (str, list), "weight": int, "bias": int, "output": str}, f"{key}.")
    rule = KINDS[_choice(value["kind"], tuple(KINDS), f"{key}.kind")] if "kind" in value else OpRule(activations=(0,))
    inputs = value.get("inputs", "all" if rule.activations is None else list(rule.activations))
    if inputs == "all":
        activations = None
    elif isinstance(inputs, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in inputs):
        activations = tuple(inputs)
    else:
        raise TargetError(f"`{key}.inputs` must be \"all\" or a list of input indices >= 0, got {inputs!r}")
    for name in ("weight", "bias"):
        if name in value and (isinstance(value[name], bool) or value[name] < 0):
            raise TargetError(f"`{key}.{name}` must be an input index >= 0, got {value[name]!r}")
    return OpRule(activations=activations, weight=value.get("weight", rule.weight),
                  bias=value.get("bias", rule.bias), output=_choice(value.get("output", rule.output), OUTPUTS, f"{key}.output"))


def from_mapping(data: Mapping, *, known_rewrites=(), source: str = "preset") -> Target:
    """A Target from a merged mapping (a preset, or a user file on top of its base)."""
    check_keys(data)
    if not data.get("name"):
        raise TargetError("`name` is missing")
    act, wts = data.get("activations", {}), data.get("weights", {})
    dtypes = _choices(act.get("dtypes", ACTIVATION_DTYPES), ALLOWED_ACTIVATION_DTYPES, "activations.dtypes")
    dtype = _choice(act.get("dtype", dtypes[0]), dtypes, "activations.dtype")
    symmetric = bool(act.get("symmetric", False))
    if symmetric and "uint8" in dtypes:
        raise TargetError("`activations.symmetric` needs int8 activations only (`activations.dtypes` = [\"int8\"])")
    if FLOAT8 in dtypes and (not symmetric or len(dtypes) > 1):
        raise TargetError(f"{FLOAT8} activations are symmetric and the only choice: set `activations.symmetric` = "
                          f"true and `activations.dtypes` = [\"{FLOAT8}\"]")
    wide = _choice(act["wide_dtype"], WIDE_DTYPES, "activations.wide_dtype") if "wide_dtype" in act else None
    wide_symmetric = bool(act.get("wide_symmetric", False))
    if wide_symmetric and wide == "uint16":
        raise TargetError("`activations.wide_symmetric` needs `activations.wide_dtype` = \"int16\"")
    ranges = _choices(wts.get("ranges", tuple(WEIGHT_QMAX)), tuple(WEIGHT_QMAX), "weights.ranges")
    weight_range = _choice(wts.get("range", ranges[0]), ranges, "weights.range")
    placement = data.get("placement", {})
    rewrites = tuple(placement.get("rewrites", ()))
    for name in rewrites:
        _choice(name, tuple(known_rewrites), "placement.rewrites")
    ops = {}
    for op, value in (data.get("ops") or {}).items():
        rule = _op_rule(op, value)
        if rule is not None:
            ops[op] = rule
    if not ops:
        raise TargetError("`ops` lists no op type: nothing could be quantized")
    fused = placement.get("fused_activations", ["Relu", "Clip"])
    if not all(isinstance(f, str) for f in fused):
        raise TargetError(f"`placement.fused_activations` must list op types, got {fused!r}")
    float_outputs = placement.get("float_output_ops", [])
    if not all(isinstance(f, str) for f in float_outputs):
        raise TargetError(f"`placement.float_output_ops` must list op types, got {float_outputs!r}")
    return Target(
        name=str(data["name"]), description=str(data.get("description", "")),
        activations=ActivationSpec(dtype, dtypes, symmetric, _scale(act.get("scale", {}), "activations.scale"),
                                   wide, wide_symmetric),
        weights=WeightSpec(weight_range, ranges, bool(wts.get("per_channel", True)),
                           _scale(wts.get("scale", {}), "weights.scale"),
                           _choice(wts.get("dtype", "int8"), WEIGHT_DTYPES, "weights.dtype")),
        bias=_choice(data.get("bias", {}).get("dtype", "int32"), BIAS_DTYPES, "bias.dtype"),
        ops=ops, placement=_choice(placement.get("qdq", "outputs"), PLACEMENTS, "placement.qdq"),
        fused_activations=frozenset(fused), fold_scalar_mul=bool(placement.get("fold_scalar_mul", False)),
        rewrites=rewrites, report_fusion=bool(placement.get("report_fusion", False)),
        float_when_unread=bool(placement.get("float_when_unread", False)),
        float_output_ops=frozenset(float_outputs),
        modes=_choices(data.get("modes", ["static"]), MODES, "modes"), source=source,
    )
