"""Quantization parameters per the TFLite int8 spec: real = scale * (q - zero_point)."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

INT32_MAX = np.iinfo(np.int32).max
# Weights are symmetric in [-127, 127]; "reduced" uses [-63, 63] so that x86 CPUs without
# VNNI (whose u8 x s8 kernels add pairs of products in saturating int16) stay exact.
WEIGHT_QMAX = {"full": 127, "reduced": 63}
_TINY = np.float32(1e-12)

# FP8 (E4M3, finite, no negative zero: float8e4m3fn, QDQ at opset 19): symmetric, zero
# point 0, scale = amax / 448 (its largest finite value).
FLOAT8 = "float8e4m3fn"
FLOAT8_MAX = 448.0
ACTIVATION_DTYPES = {"int8": np.int8, "uint8": np.uint8, FLOAT8: ml_dtypes.float8_e4m3fn,
                     "int16": np.int16, "uint16": np.uint16}  # 16 bits: the wide tensors of a target that has them
WIDE_DTYPES = ("int16", "uint16")


def is_float8(dtype) -> bool:
    return np.dtype(dtype) == np.dtype(ml_dtypes.float8_e4m3fn)


@dataclass(frozen=True)
class ActivationParams:
    scale: np.float32
    zero_point: np.generic  # np.int8 / np.uint8 scalar, or float8_e4m3fn 0

    @property
    def grid(self) -> tuple[float, float]:
        """The smallest and largest quantized values."""
        if is_float8(self.zero_point.dtype):
            return -FLOAT8_MAX, FLOAT8_MAX
        info = np.iinfo(self.zero_point.dtype)
        return float(info.min), float(info.max)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        low, high = self.grid
        if is_float8(self.zero_point.dtype):  # round to nearest representable, saturating
            return np.clip(values / self.scale, low, high).astype(self.zero_point.dtype)
        q = np.round(values / self.scale) + int(self.zero_point)
        return np.clip(q, low, high).astype(self.zero_point.dtype)


def activation_params(low: float, high: float, dtype: str = "int8", *, symmetric: bool = False,
                      scale_rule=None) -> ActivationParams:
    """Per-tensor parameters; the range is widened to include 0 exactly.

    ``symmetric``: zero point 0 and scale = max(|low|, |high|) / 127 (TensorRT; int8 only).
    ``scale_rule``: a targets.ScaleRule (power-of-two or minimum scale), applied before the
    zero point is chosen, so the range only grows.
    """
    np_dtype = ACTIVATION_DTYPES[dtype]
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if dtype == FLOAT8:
        scale = np.float32(max(-low, high) / FLOAT8_MAX)
        if not np.isfinite(scale) or scale <= _TINY:
            scale = np.float32(1.0)
        if scale_rule is not None and not scale_rule.is_identity:
            scale = np.float32(scale_rule.apply(scale))
        return ActivationParams(scale=scale, zero_point=np_dtype(0))
    info = np.iinfo(np_dtype)
    if symmetric:
        if np_dtype not in (np.int8, np.int16):
            raise ValueError("symmetric activations are int8 or int16 (zero point 0)")
        scale = np.float32(max(-low, high) / info.max)
    else:
        scale = np.float32((high - low) / (info.max - info.min))
    if not np.isfinite(scale) or scale <= _TINY:
        scale = np.float32(1.0)  # an all-zero tensor: any scale represents it exactly
    if scale_rule is not None and not scale_rule.is_identity:
        scale = np.float32(scale_rule.apply(scale))
    if symmetric:
        zero_point = 0
    elif high > 0 and abs(low + high) <= 1e-7 * high and (scale_rule is None or scale_rule.is_identity):
        # A symmetric range [-a, a]: the exact zero point is the grid's midpoint minus a
        # half step; pick it deterministically instead of by float rounding noise.
        zero_point = (info.min + info.max + 1) // 2
    else:
        zero_point = np.clip(np.round(info.min - low / scale), info.min, info.max)
    return ActivationParams(scale=scale, zero_point=np_dtype(zero_point))


def resolve_weight_range(weight_range: str) -> str:
    """'auto' -> the weight range of this machine's onnxruntime CPU target."""
    if weight_range in WEIGHT_QMAX:
        return weight_range
    if weight_range != "auto":
        raise ValueError(weight_range)
    from ..targets import load_target

    return load_target("ort-cpu").weights.range


def weight_scales(weight: np.ndarray, axis: int | None, qmax: int = 127) -> np.ndarray:
    """Symmetric scales, one per channel along ``axis`` (or one for the whole tensor)."""
    if axis is None:
        amax = np.abs(weight).max(initial=0.0)
    else:
        reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
        amax = np.abs(weight).max(axis=reduce_axes, initial=0.0)
    scales = np.asarray(amax, dtype=np.float32) / qmax
    return np.where(scales > _TINY, scales, np.float32(1.0)).astype(np.float32)


def spec_weight_scales(weight: np.ndarray, axis: int | None, spec) -> np.ndarray:
    """The scales Q/DQ insertion emits for ``weight`` under a target's weight spec
    (``targets.WeightSpec``: its range and scale rule), before any widening for an int32 bias."""
    scales = weight_scales(weight, axis, spec.qmax)
    return scales if spec.scale.is_identity else spec.scale.apply(scales)


def widen_for_bias(
    w_scales: np.ndarray, bias: np.ndarray, input_scale: float
) -> np.ndarray:
    """Widen weight scales where bias / (input_scale * weight_scale) would overflow int32."""
    needed = np.abs(bias.astype(np.float64)) / (float(input_scale) * INT32_MAX * 0.99)
    if w_scales.ndim == 0:
        return np.maximum(w_scales, np.float32(needed.max(initial=0.0))).astype(np.float32)
    return np.maximum(w_scales, needed.astype(np.float32)).astype(np.float32)


def quantize_weight(weight: np.ndarray, scales: np.ndarray, axis: int | None, qmax: int = 127) -> np.ndarray:
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.round(weight / scales.reshape(shape if axis is not None else ()))
    return np.clip(q, -qmax, qmax).astype(np.int8)


def quantize_weight_float8(weight: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    """float8e4m3fn weights with ``scales`` = amax / 448 per channel (``weight_scales(..., 448)``)."""
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    q = weight / scales.reshape(shape if axis is not None else ())
    return np.clip(q, -FLOAT8_MAX, FLOAT8_MAX).astype(ml_dtypes.float8_e4m3fn)


def quantize_bias(bias: np.ndarray, input_scale: float, w_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias and its scale (input scale x weight scale, per channel)."""
    scales = (np.float32(input_scale) * w_scales).astype(np.float32)
    q = np.round(bias.astype(np.float64) / scales.astype(np.float64))
    return np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int32), scales


def spec_params(low: float, high: float, spec) -> ActivationParams:
    """``activation_params`` under a target's activation spec (``targets.ActivationSpec``),
    or a plain dtype name (asymmetric, no scale rule)."""
    if isinstance(spec, str):
        return activation_params(low, high, spec)
    return activation_params(low, high, spec.dtype, symmetric=spec.symmetric, scale_rule=spec.scale)
