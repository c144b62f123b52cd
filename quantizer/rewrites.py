"""Stage-1 rewrite rules that turn float-only spellings into ops with integer kernels.

Each family is opt-in (``optimize_model(..., rewrites=[...])``) and keeps the model the
same function up to float rounding:

``div_by_constant``
    ``Div(x, c)`` by a finite, nonzero float constant -> ``Mul(x, 1/c)`` (Mul has a
    quantized kernel, Div has none).
``sum_to_add``
    ``Sum(a, b)`` with exactly two inputs -> ``Add(a, b)``.
``hardswish``
    Decomposed HardSigmoid ``clamp(x + 3, 0, 6) / 6`` -> ``HardSigmoid(1/6, 0.5)`` and
    decomposed HardSwish ``x * clamp(x + 3, 0, 6) / 6`` or ``x * HardSigmoid(x)`` ->
    ``HardSwish`` (opset >= 14; float and float16).  The clamp is ``Clip`` with
    constant bounds, or ``Min(Max(.))`` / ``Max(Min(.))``; ``/ 6`` may be ``* (1/6)``.
``prelu_scalar``
    ``PRelu(x, slope)`` whose constant slope holds one value -> ``LeakyRelu(alpha)``.
``layer_norm``
    ``(x - mean) / sqrt(var + eps) * gamma [+ beta]`` over trailing axes ->
    ``LayerNormalization`` (opset >= 17, float32).
``gelu``
    ``x * 0.5 * (1 + Erf(x / sqrt(2)))`` in its usual association orders -> ``Gelu``
    (opset >= 20; float and float16).

Constants are matched by value with a tolerance of 1e-6 (relative, or the constant's
own precision when that is coarser), and a constant whose rank would widen the result
by broadcasting is never folded away.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript.rewriter import pattern

from .lowering import LOWERING_RULES

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
# onnxruntime's CPU kernels for HardSigmoid, HardSwish and Gelu take no double
_ACTIVATION_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------- helpers


def _array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is a constant (initializer or Constant), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    try:
        return value.const_value.numpy()
    except (OSError, ValueError, TypeError):  # e.g. external data that cannot be read
        return None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _scalar(value: ir.Value | None, rank: int | None) -> float | None:
    """The one element of a constant that broadcasts against a rank-``rank`` tensor
    without widening it (a [1, 1, 1] constant would turn a rank-2 result into rank 3)."""
    array = _array(value)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    if array.ndim > 0 and (rank is None or array.ndim > rank):
        return None
    return float(array.reshape(()))


def _close(got: float | None, want: float, dtype: np.dtype | None = None) -> bool:
    if got is None or not math.isfinite(got):
        return False
    tolerance = _TOLERANCE
    if dtype is not None and np.dtype(dtype).kind == "f":
        tolerance = max(tolerance, float(np.finfo(dtype).eps))
    return abs(got - want) <= tolerance * max(abs(want), 1.0)


def _constant_near(value: ir.Value | None, want: float, rank: int | None) -> bool:
    array = _array(value)
    return array is not None and _close(_scalar(value, rank), want, array.dtype)


def _onnx_opset(context) -> int:
    imports = context.graph_or_function.opset_imports or context.model.opset_imports
    return imports.get("", imports.get("ai.onnx", 1))


# ---------------------------------------------------------------------------- div_by_constant


class _DivByConstant(pattern.RewriteRuleClassBase):
    """Div(x, c) -> Mul(x, 1/c) for a float constant c with every value finite and nonzero.

    The reciprocal is computed in float64 and stored in c's dtype and shape, so
    broadcasting is unchanged; the result differs from the quotient by rounding only.
    """

    def __init__(self):
        super().__init__("DivByConstantToMul")

    def pattern(self, op, x, c):
        return op.Div(x, c)

    def check(self, context, x, c, **_):
        result = pattern.MatchResult()
        divisor = _array(c)
        if divisor is None:
            return result.fail("divisor is not a constant")
        if divisor.dtype.kind != "f" or c.dtype not in _FLOAT_TYPES:
            return result.fail("not a float division")
        if x.dtype is not None and x.dtype != c.dtype:
            return result.fail("dividend and divisor types differ")
        if divisor.size == 0 or not np.all(np.isfinite(divisor)) or np.any(divisor == 0):
            return result.fail("divisor has a zero or non-finite value")
        with np.errstate(over="ignore"):
            reciprocal = (1.0 / divisor.astype(np.float64)).astype(divisor.dtype)
        tiny = np.finfo(divisor.dtype).tiny
        if not np.all(np.isfinite(reciprocal)) or np.any(np.abs(reciprocal) < tiny):
            return result.fail("reciprocal over- or underflows the divisor's type")
        return result

    def rewrite(self, op, x, c, **_):
        divisor = c.const_value.numpy()
        reciprocal = (1.0 / divisor.astype(np.float64)).astype(divisor.dtype)
        return op.Mul(x, op.Constant(value=ir.tensor(reciprocal)))


# ---------------------------------------------------------------------------- sum_to_add


class _SumOfTwo(pattern.RewriteRuleClassBase):
    """Sum(a, b) -> Add(a, b); Sum of one or three and more inputs is left alone."""

    def __init__(self):
        super().__init__("SumOfTwoToAdd")

    def pattern(self, op, a, b):
        return op.Sum(a, b)

    def check(self, context, a, b, **_):
        result = pattern.MatchResult()
        if a is None or b is None:
            return result.fail("Sum does not have two inputs")
        return result

    def rewrite(self, op, a, b, **_):
        return op.Add(a, b)


# ---------------------------------------------------------------------------- hardswish


def _clamp(op, form: str, value, low, high):
    if form == "Clip":
        return op.Clip(value, low, high)
    if form == "MaxMin":  # Min(Max(v, low), high): Relu6 as exporters write it
        return op.Min(op.Max(value, low), high)
    return op.Max(op.Min(value, high), low)


def _hard_sigmoid_failure(x, offset, low, high, scale, scale_op: str) -> str | None:
    """Why clamp(x + offset, low, high) scale_op scale is not HardSigmoid(1/6, 1/2)."""
    if x.dtype not in _ACTIVATION_TYPES:
        return "not a float or float16 tensor"
    rank = _rank(x)
    wanted = ((offset, 3.0, "offset 3"), (low, 0.0, "lower bound 0"), (high, 6.0, "upper bound 6"),
              (scale, 6.0 if scale_op == "Div" else 1 / 6, "divisor 6"))
    for value, target, what in wanted:
        if not _constant_near(value, target, rank):
            return f"needs a constant {what}"
    return None


class _DecomposedHardSigmoid(pattern.RewriteRuleClassBase):
    """clamp(x + 3, 0, 6) / 6 (or * 1/6) -> HardSigmoid(x, alpha=1/6, beta=0.5)."""

    def __init__(self, clamp: str, scale_op: str):
        super().__init__(f"HardSigmoidFrom{clamp}{scale_op}")
        self.clamp = clamp
        self.scale_op = scale_op

    def pattern(self, op, x, offset, low, high, scale):
        clamped = _clamp(op, self.clamp, op.Add(x, offset), low, high)
        return getattr(op, self.scale_op)(clamped, scale)

    def check(self, context, x, offset, low, high, scale, **_):
        result = pattern.MatchResult()
        failure = _hard_sigmoid_failure(x, offset, low, high, scale, self.scale_op)
        return result.fail(failure) if failure else result

    def rewrite(self, op, x, **_):
        return op.HardSigmoid(x, alpha=1 / 6, beta=0.5)


class _DecomposedHardSwish(pattern.RewriteRuleClassBase):
    """(x * clamp(x + 3, 0, 6)) / 6 (or * 1/6) -> HardSwish(x), opset >= 14.

    The other association, x * (clamp(x + 3, 0, 6) / 6), becomes x * HardSigmoid(x)
    first and then HardSwish through ``_HardSigmoidTimesInput``.
    """

    def __init__(self, clamp: str, scale_op: str):
        super().__init__(f"HardSwishFrom{clamp}{scale_op}")
        self.clamp = clamp
        self.scale_op = scale_op

    def pattern(self, op, x, offset, low, high, scale):
        gated = op.Mul(x, _clamp(op, self.clamp, op.Add(x, offset), low, high))
        return getattr(op, self.scale_op)(gated, scale)

    def check(self, context, x, offset, low, high, scale, **_):
        result = pattern.MatchResult()
        if _onnx_opset(context) < 14:
            return result.fail("HardSwish needs opset 14")
        failure = _hard_sigmoid_failure(x, offset, low, high, scale, self.scale_op)
        return result.fail(failure) if failure else result

    def rewrite(self, op, x, **_):
        return op.HardSwish(x)


class _HardSigmoidTimesInput(pattern.RewriteRuleClassBase):
    """x * HardSigmoid(x, alpha=1/6, beta=0.5) -> HardSwish(x), opset >= 14."""

    def __init__(self):
        super().__init__("HardSwishFromHardSigmoid")

    def pattern(self, op, x):
        return op.Mul(x, op.HardSigmoid(x, _allow_other_attributes=True, _outputs=["gate"]))

    def check(self, context, x, gate, **_):
        result = pattern.MatchResult()
        if _onnx_opset(context) < 14:
            return result.fail("HardSwish needs opset 14")
        if x.dtype not in _ACTIVATION_TYPES:
            return result.fail("not a float or float16 tensor")
        attributes = gate.producer().attributes
        alpha = attributes.get_float("alpha", 0.2)  # the ONNX defaults
        beta = attributes.get_float("beta", 0.5)
        if abs(alpha - 1 / 6) > _TOLERANCE or abs(beta - 0.5) > _TOLERANCE:
            return result.fail("HardSigmoid is not alpha=1/6, beta=0.5")
        return result

    def rewrite(self, op, x, **_):
        return op.HardSwish(x)


# ---------------------------------------------------------------------------- prelu_scalar


class _ScalarPRelu(pattern.RewriteRuleClassBase):
    """PRelu(x, slope) with one slope value for every element -> LeakyRelu(x, alpha)."""

    def __init__(self):
        super().__init__("UniformPReluToLeakyRelu")

    def pattern(self, op, x, slope):
        return op.PRelu(x, slope)

    def check(self, context, x, slope, **_):
        result = pattern.MatchResult()
        values = _array(slope)
        if values is None or values.size == 0:
            return result.fail("slope is not a constant")
        if x.dtype not in _FLOAT_TYPES or values.dtype.kind != "f":
            return result.fail("not a float tensor")  # LeakyRelu has no integer kernel
        rank = _rank(x)
        if values.ndim > 0 and (rank is None or values.ndim > rank):
            return result.fail("slope could broadcast the output wider than x")
        first = values.reshape(-1)[0]
        if not np.isfinite(first) or not np.all(values == first):
            return result.fail("slope values differ")
        if float(np.float32(first)) != float(first):
            return result.fail("slope is not exact as a float attribute")
        return result

    def rewrite(self, op, x, slope, **_):
        return op.LeakyRelu(x, alpha=float(slope.const_value.numpy().reshape(-1)[0]))


# ---------------------------------------------------------------------------- layer_norm


def _reduced_axes(node: ir.Node, rank: int) -> list[int] | None:
    """The sorted, non-negative axes a ReduceMean with keepdims=1 reduces, or None."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:  # opset >= 18: axes input
        array = _array(node.inputs[1])
        if array is None:
            return None
        axes = [int(a) for a in array.reshape(-1)]
    else:
        axes = list(node.attributes.get_ints("axes", []))
    if not axes or any(not -rank <= a < rank for a in axes):
        return None  # no axes means all axes or none (noop_with_empty_axes): not handled
    return sorted(a % rank for a in axes)


class _DecomposedLayerNorm(pattern.RewriteRuleClassBase):
    """(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma -> LayerNormalization.

    The means reduce the same trailing axes with keepdims=1; the square is Pow(d, 2) or
    Mul(d, d); gamma has exactly the normalized shape (leading 1s allowed for a constant).
    A following Add of beta is folded by ``_LayerNormBias``.  Float32 only (stash_type 1
    computes in float32, as the decomposed graph did), opset >= 17.
    """

    def __init__(self, square: str):
        super().__init__(f"LayerNormFrom{square}")
        self.square = square

    def pattern(self, op, x, two, epsilon, gamma):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["mean"])
        centered = op.Sub(x, mean)
        squared = op.Pow(centered, two) if self.square == "Pow" else op.Mul(centered, centered)
        variance = op.ReduceMean(squared, _allow_other_inputs=True, _allow_other_attributes=True,
                                 _outputs=["variance"])
        normalized = op.Div(centered, op.Sqrt(op.Add(variance, epsilon)))
        return op.Mul(normalized, gamma)

    def check(self, context, x, epsilon, gamma, mean, variance, two=None, **_):
        result = pattern.MatchResult()
        if _onnx_opset(context) < 17:
            return result.fail("LayerNormalization needs opset 17")
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("not a float32 tensor")
        rank = _rank(x)
        if rank is None:
            return result.fail("rank of x unknown")
        axes = _reduced_axes(mean.producer(), rank)
        if axes is None or axes != list(range(axes[0], rank)):
            return result.fail("mean is not over trailing axes")
        if _reduced_axes(variance.producer(), rank) != axes:
            return result.fail("variance reduces other axes than the mean")
        if self.square == "Pow" and not _constant_near(two, 2.0, rank):
            return result.fail("Pow exponent is not 2")
        eps = _scalar(epsilon, rank)
        if eps is None or not math.isfinite(eps) or eps < 0:
            return result.fail("epsilon is not a non-negative scalar constant")
        if self._gamma_shape(x, gamma, axes[0]) is None:
            return result.fail("gamma does not have the normalized shape")
        return result

    @staticmethod
    def _gamma_shape(x: ir.Value, gamma: ir.Value, axis: int) -> tuple[int, ...] | None:
        """The normalized shape when gamma can be passed as LayerNormalization's scale."""
        wanted = tuple(x.shape[axis:])
        if not all(isinstance(d, int) for d in wanted) or gamma.dtype != x.dtype:
            return None
        have = None if gamma.shape is None else tuple(gamma.shape)
        if have == wanted:
            return wanted
        array = _array(gamma)
        if array is None or array.ndim > len(x.shape):
            return None
        stripped = array.shape[next((i for i, d in enumerate(array.shape) if d != 1), array.ndim):]
        padded = (1,) * (len(wanted) - len(stripped)) + stripped if len(stripped) <= len(wanted) else None
        return wanted if padded == wanted else None

    def rewrite(self, op, x, epsilon, gamma, mean, **_):
        rank = len(x.shape)
        axis = _reduced_axes(mean.producer(), rank)[0]
        wanted = self._gamma_shape(x, gamma, axis)
        scale = gamma
        if gamma.shape is None or tuple(gamma.shape) != wanted:
            scale = op.Constant(value=ir.tensor(gamma.const_value.numpy().reshape(wanted)))
        return op.LayerNormalization(x, scale, axis=axis, epsilon=_scalar(epsilon, rank),
                                     stash_type=int(ir.DataType.FLOAT))


class _LayerNormBias(pattern.RewriteRuleClassBase):
    """LayerNormalization(x, gamma) + beta -> LayerNormalization(x, gamma, beta) when
    beta has the normalized shape (as gamma must)."""

    def __init__(self):
        super().__init__("LayerNormBias")

    def pattern(self, op, x, gamma, beta):
        return op.Add(op.LayerNormalization(x, gamma, _allow_other_attributes=True, _outputs=["normed"]), beta)

    def check(self, context, x, gamma, beta, normed, **_):
        result = pattern.MatchResult()
        if len(normed.producer().outputs) != 1:
            return result.fail("LayerNormalization has extra outputs")
        if gamma.shape is None or beta.shape is None or tuple(beta.shape) != tuple(gamma.shape):
            return result.fail("beta does not have the normalized shape")
        if not all(isinstance(d, int) for d in beta.shape) or beta.dtype != x.dtype:
            return result.fail("beta does not have the normalized shape")
        return result

    def rewrite(self, op, x, gamma, beta, normed, **_):
        return op.LayerNormalization(x, gamma, beta, **normed.producer().attributes)


# ---------------------------------------------------------------------------- gelu


class _DecomposedGelu(pattern.RewriteRuleClassBase):
    """x * 0.5 * (1 + Erf(x / sqrt(2))) -> Gelu(x) (exact, approximate="none"), opset >= 20.

    ``order`` is where the 0.5 sits: "input" (x * 0.5) * gate, "gate" x * (gate * 0.5),
    "last" (x * gate) * 0.5; ``erf_scale`` is Div by sqrt(2) or Mul by 1/sqrt(2).
    """

    def __init__(self, order: str, erf_scale: str):
        super().__init__(f"GeluHalf{order.title()}{erf_scale}")
        self.order = order
        self.erf_scale = erf_scale

    def pattern(self, op, x, root, half, one):
        gate = op.Add(op.Erf(getattr(op, self.erf_scale)(x, root)), one)
        if self.order == "input":
            return op.Mul(op.Mul(x, half), gate)
        if self.order == "gate":
            return op.Mul(x, op.Mul(gate, half))
        return op.Mul(op.Mul(x, gate), half)

    def check(self, context, x, root, half, one, **_):
        result = pattern.MatchResult()
        if _onnx_opset(context) < 20:
            return result.fail("Gelu needs opset 20")
        if x.dtype not in _ACTIVATION_TYPES:
            return result.fail("not a float or float16 tensor")
        rank = _rank(x)
        wanted_root = math.sqrt(2) if self.erf_scale == "Div" else math.sqrt(0.5)
        for value, target in ((root, wanted_root), (half, 0.5), (one, 1.0)):
            if not _constant_near(value, target, rank):
                return result.fail(f"needs a constant {target}")
        return result

    def rewrite(self, op, x, **_):
        return op.Gelu(x)


# ---------------------------------------------------------------------------- registry

_CLAMPS = ("Clip", "MaxMin", "MinMax")

RULES: dict[str, list[pattern.RewriteRule]] = {
    "div_by_constant": [_DivByConstant.rule()],
    "sum_to_add": [_SumOfTwo.rule()],
    "hardswish": (
        [_DecomposedHardSwish.rule(clamp, scale_op) for clamp in _CLAMPS for scale_op in ("Div", "Mul")]
        + [_DecomposedHardSigmoid.rule(clamp, scale_op) for clamp in _CLAMPS for scale_op in ("Div", "Mul")]
        + [_HardSigmoidTimesInput.rule()]
    ),
    "prelu_scalar": [_ScalarPRelu.rule()],
    "layer_norm": [_DecomposedLayerNorm.rule("Pow"), _DecomposedLayerNorm.rule("Mul"), _LayerNormBias.rule()],
    "gelu": [_DecomposedGelu.rule(order, scale) for order in ("input", "gate", "last") for scale in ("Div", "Mul")],
}

RULES.update(LOWERING_RULES)

# The opset a family's fused op needs, and the ops whose presence makes its pattern
# possible: stage 1 raises an older model's opset to apply it (see optimize_model).
OPSET_NEEDS: dict[str, tuple[int, frozenset[str]]] = {
    "hardswish": (14, frozenset({"Clip", "Min", "Max", "HardSigmoid"})),
    "layer_norm": (17, frozenset({"ReduceMean"})),
    "gelu": (20, frozenset({"Erf"})),
}


def wanted_opset(names: Iterable[str], op_types: Iterable[str]) -> int:
    """The lowest opset at which every named family whose trigger ops occur can fire (0: any)."""
    present = set(op_types)
    needs = [OPSET_NEEDS[n][0] for n in names if n in OPSET_NEEDS and OPSET_NEEDS[n][1] & present]
    return max(needs, default=0)  # lowerings into ops a backend runs in integer arithmetic
_RULE_SETS = {name: pattern.RewriteRuleSet(rules, commute=True) for name, rules in RULES.items()}


def check_rewrite_names(names: Iterable[str]) -> tuple[str, ...]:
    """The names as a tuple without repeats (a lone string is one name); ValueError
    naming the first unknown one."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        if name not in RULES:
            raise ValueError(f"unknown rewrite {name!r}; known rewrites: {', '.join(RULES)}")
    return tuple(dict.fromkeys(names))


def apply_rewrites(model: ir.Model, names: Iterable[str]) -> dict[str, int]:
    """Apply the named rule families to ``model`` in place, in the order given.

    Returns how many times each family fired, keyed by name.  Unknown names raise
    ValueError before anything is changed.
    """
    names = check_rewrite_names(names)
    if names:  # the rules check ranks and dims, which the folding before may have lost
        ir_passes.ShapeInferencePass(strict_mode=False)(model)  # leaves the model as is if it fails
    counts = {}
    for name in names:
        counts[name] = _RULE_SETS[name].apply_to_model(model)
    if any(counts.values()):
        ir_passes.RemoveUnusedNodesPass()(model)  # the replaced constants
    return counts
