"""Block-wise weight quantization (weight-only mode): int8/int4, signed or unsigned,
symmetric or asymmetric, one scale (and zero point) per ``block_size`` consecutive
weights along the reduction axis, as DequantizeLinear(block_size=..., axis=0) reads it
(opset 21) and onnxruntime's MatMulNBits runs it.

A weight is ``[K, N]`` (MatMul's B: K the reduction axis); blocks run along K, so the
scales are ``[ceil(K / block_size), N]``.  real = scale * (q - zero_point).

Round to nearest (``quantize_blocks``) and GPTQ (``gptq``: each row's rounding error is
fed back into the rows not yet quantized, weighted by the inverse Hessian of the layer's
calibration activations; Frantar et al. 2022) share ``block_params``.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

_TINY = np.float32(1e-12)
GPTQ_DAMPING = 0.01  # of the mean Hessian diagonal, added to it (the GPTQ paper's value)


# numpy types of the quantized tensors as onnx-ir writes them (int4/uint4 packed by onnx).
IR_TYPES = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8, "uint8": np.uint8}


@dataclass(frozen=True)
class WeightGrid:
    bits: int  # 8 or 4
    signed: bool
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def dtype(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"


@dataclass
class BlockQuantized:
    q: np.ndarray  # [K, N] integers (int8/uint8 container)
    scale: np.ndarray  # [blocks, N] float32
    zero_point: np.ndarray  # [blocks, N] integers (same container as q)
    block_size: int
    grid: WeightGrid

    def dequantize(self) -> np.ndarray:
        rows = np.arange(self.q.shape[0]) // self.block_size
        return ((self.q.astype(np.float32) - self.zero_point[rows].astype(np.float32)) * self.scale[rows])


def block_params(blocks: np.ndarray, grid: WeightGrid) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block: ``blocks`` is ``[..., rows, N]``, reduced over
    ``rows``.  Symmetric: the value of largest magnitude maps to the grid's far end
    (-8 of [-8, 7]), so all 2^bits levels are used; the zero point is the grid's middle.
    Asymmetric: [min, max] (widened to hold 0) spans the grid."""
    levels = grid.qmax - grid.qmin
    if grid.symmetric:
        middle = (grid.qmin + grid.qmax + 1) // 2  # 0 for signed, 8 / 128 for unsigned
        low, high = np.min(blocks, axis=-2), np.max(blocks, axis=-2)
        # The value of largest magnitude maps to its end of the grid: a negative one to
        # qmin (-8), a positive one to qmax (7); the other side then fits.
        scale = np.where(-low > high, -low / np.float32(middle - grid.qmin), high / np.float32(grid.qmax - middle))
        zero = np.full(scale.shape, middle)
    else:
        low = np.minimum(np.min(blocks, axis=-2), 0)
        high = np.maximum(np.max(blocks, axis=-2), 0)
        scale = (high - low) / np.float32(levels)
        zero = np.clip(np.round(grid.qmin - low / np.where(scale > _TINY, scale, 1)), grid.qmin, grid.qmax)
    scale = np.where(scale > _TINY, scale, np.float32(1.0)).astype(np.float32)
    return scale, zero.astype(np.int32)


def _round(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, grid: WeightGrid) -> np.ndarray:
    return np.clip(np.round(w / scale) + zero, grid.qmin, grid.qmax)


def _container(grid: WeightGrid):
    return np.int8 if grid.signed else np.uint8


def quantize_blocks(weight: np.ndarray, block_size: int, grid: WeightGrid) -> BlockQuantized:
    """Round to nearest, one scale per block of ``block_size`` rows (the last block may be short)."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight
    padded = padded.reshape(blocks, block_size, n)
    scale, zero = block_params(_pad_like_edge(padded, k, block_size), grid)
    q = _round(padded, scale[:, None, :], zero[:, None, :], grid).reshape(-1, n)[:k]
    container = _container(grid)
    return BlockQuantized(q.astype(container), scale, zero.astype(container), block_size, grid)


def _pad_like_edge(padded: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """A short last block padded with its own first row, so padding never widens its range."""
    pad = padded.shape[0] * block_size - k
    if pad:
        padded = padded.copy()
        padded[-1, block_size - pad:] = padded[-1, :1]
    return padded


def gptq(weight: np.ndarray, hessian: np.ndarray, block_size: int, grid: WeightGrid) -> BlockQuantized:
    """GPTQ with one scale per block (group = block, parameters from the block's weights
    as updated by the error feedback so far).  ``hessian`` is X^T X over the calibration
    activations of the layer's input, ``[K, K]``."""
    k, n = weight.shape
    w = weight.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += GPTQ_DAMPING * float(np.mean(np.diag(h)))
    try:
        inverse = np.linalg.inv(h)
        upper = np.linalg.cholesky(inverse).T  # upper Cholesky factor of H^-1
    except np.linalg.LinAlgError:
        return quantize_blocks(weight, block_size, grid)
    blocks = -(-k // block_size)
    scales = np.empty((blocks, n), np.float32)
    zeros = np.empty((blocks, n), np.int32)
    q = np.empty((k, n), np.float64)
    for b in range(blocks):
        start, stop = b * block_size, min(k, (b + 1) * block_size)
        scale, zero = block_params(w[start:stop].astype(np.float32), grid)
        scales[b], zeros[b] = scale, zero
        errors = np.empty((stop - start, n))
        for i in range(start, stop):  # sequential by construction: each row sees the earlier rows' error
            qi = _round(w[i], scale, zero, grid)
            q[i] = qi
            error = (w[i] - (qi - zero) * scale) / upper[i, i]
            w[i + 1:stop] -= np.outer(upper[i, i + 1:stop], error)
            errors[i - start] = error
        w[stop:] -= upper[start:stop, stop:].T @ errors  # the block's error, to every later row at once
    container = _container(grid)
    return BlockQuantized(q.astype(container), scales, zeros.astype(container), block_size, grid)
