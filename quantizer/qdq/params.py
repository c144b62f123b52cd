"""Quantization parameters per the TFLite int8 spec: real = scale * (q - zero_point)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT32_MAX = np.iinfo(np.int32).max
# Weights are symmetric in [-127, 127]; "reduced" uses [-63, 63] so that x86 CPUs without
# VNNI (whose u8 x s8 kernels add pairs of products in saturating int16) stay exact.
WEIGHT_QMAX = {"full": 127, "reduced": 63}
_TINY = np.float32(1e-12)

ACTIVATION_DTYPES = {"int8": np.int8, "uint8": np.uint8}


@dataclass(frozen=True)
class ActivationParams:
    scale: np.float32
    zero_point: np.integer  # np.int8 or np.uint8 scalar

    def quantize(self, values: np.ndarray) -> np.ndarray:
        info = np.iinfo(self.zero_point.dtype)
        q = np.round(values / self.scale) + int(self.zero_point)
        return np.clip(q, info.min, info.max).astype(self.zero_point.dtype)


def activation_params(low: float, high: float, dtype: str = "int8", *, symmetric: bool = False,
                      scale_rule=None) -> ActivationParams:
    """Per-tensor parameters; the range is widened to include 0 exactly.

    ``symmetric``: zero point 0 and scale = max(|low|, |high|) / 127 (TensorRT; int8 only).
    ``scale_rule``: a targets.ScaleRule (power-of-two or minimum scale), applied before the
    zero point is chosen, so the range only grows.
    """
    np_dtype = ACTIVATION_DTYPES[dtype]
    info = np.iinfo(np_dtype)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        if np_dtype is not np.int8:
            raise ValueError("symmetric activations are int8 (zero point 0)")
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
