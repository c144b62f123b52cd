"""Stage-1 lowerings for backends without a kernel for an op: rewrite it into ops the
backend does run in integer arithmetic, with the same function.

- ``hard_activations_to_add_clip``: HardSigmoid(x) = alpha * Clip(x + beta/alpha, 0, 1/alpha)
  and HardSwish(x) = x * (Clip(x + 3, 0, 6) * 1/6).  onnxruntime has no integer
  HardSigmoid/HardSwish, so they stay float between DequantizeLinear and QuantizeLinear
  (PP-OCRv5's detector: 24 HardSwish, a quarter of its int8 run time).  Lowered, the Add
  runs as QLinearAdd, the Clip folds into its Q, the Mul by the constant folds into a
  DequantizeLinear's scale (targets with ``fold_scalar_mul``) and x * h is a QLinearMul.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


def _constant(op, value: float, like: ir.Value):
    dtype = like.dtype.numpy() if like.dtype is not None else np.float32
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


class _HardSigmoidToAddClip(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("HardSigmoidToAddClip")

    def pattern(self, op, x):
        return op.HardSigmoid(x, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, out, **_):
        result = pattern.MatchResult()
        if x.dtype not in _FLOATS:
            return result.fail("not a float tensor")
        alpha = out.producer().attributes.get_float("alpha", 0.2)
        if not (np.isfinite(alpha) and alpha > 0):
            return result.fail("alpha must be positive")
        return result

    def rewrite(self, op, x, out, **_):
        attrs = out.producer().attributes
        alpha, beta = attrs.get_float("alpha", 0.2), attrs.get_float("beta", 0.5)
        shifted = op.Add(x, _constant(op, beta / alpha, x))
        clipped = op.Clip(shifted, _constant(op, 0.0, x), _constant(op, 1.0 / alpha, x))
        return op.Mul(clipped, _constant(op, alpha, x))


class _HardSwishToAddClip(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("HardSwishToAddClip")

    def pattern(self, op, x):
        return op.HardSwish(x)

    def check(self, context, x, **_):
        result = pattern.MatchResult()
        return result if x.dtype in _FLOATS else result.fail("not a float tensor")

    def rewrite(self, op, x, **_):
        shifted = op.Add(x, _constant(op, 3.0, x))
        clipped = op.Clip(shifted, _constant(op, 0.0, x), _constant(op, 6.0, x))
        return op.Mul(x, op.Mul(clipped, _constant(op, 1.0 / 6.0, x)))


LOWERING_RULES: dict[str, list[pattern.RewriteRule]] = {
    "hard_activations_to_add_clip": [_HardSigmoidToAddClip.rule(), _HardSwishToAddClip.rule()],
}
