"""AdaRound: round each weight up or down by what the layer's output loses.

Round-to-nearest minimizes every weight's own error |W - W_q|, not the layer's: the
output error of channel c of y = W x is sum_k (W_q - W)_ck x_k, and the rounding errors of
one channel add up through the correlations of its inputs.  AdaRound (Nagel et al. 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization") picks, for every weight,
floor(W/s) or floor(W/s) + 1 so that those errors cancel on the data.

What it minimizes, for each quantized Conv/Gemm/MatMul with a constant weight, on the
layer's recorded float inputs x (``samples``, e.g. the accuracy samples) and x~, the same
inputs quantized-dequantized on the grid the layer will read them on (its input's range;
x~ = x for an input without one):

    ||W x - W_q x~||^2 / ||W x - W_rtn x~||^2  +  lambda * mean(1 - |2 h(V) - 1|^beta)

with W_q = s * (floor(W / s) + h(V)), h the rectified sigmoid
clip(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1), V initialised so that h(V) = frac(W / s)
(W_q = W), Adam on V for ``iterations`` steps, the regularizer off for the first
``WARMUP`` of them and beta annealed linearly from 20 to 2 after that (it drives h to 0 or
1); the result rounds h at 1/2.  s is exactly the scale Q/DQ insertion emits (the
target's weight range, per-channel axis and scale rule); weights at the grid's end
(|round(W/s)| = qmax, which fix the scale) keep their nearest rounding.  The first term is
normalized by round-to-nearest's error, so lambda needs no tuning per layer.

The squared error is computed through the inputs' Gram matrices G = sum x x^T,
Gq = sum x~ x~^T and M = sum x x~^T (one per group; Conv inputs as im2col patches, at most
``MAX_ROWS`` output positions per layer): with d = W_q - W it is d Gq d^T + 2 d.W (Gq - M)
+ const, so an iteration costs one product with Gq (low-rank: ``gram_factor``), whatever
the number of samples.  x is the *float* model's activation (as bias correction measures;
the paper's asymmetric variant feeds the already-quantized model's, error of earlier layers
included); x~ adds this layer's own input rounding, which the chosen rounding then offsets
(on the sample model it lifts the quantized output SQNR 36.4 -> 37.6 dB over float x alone;
on the detector, float x alone made the quantized model worse and the check dropped it).  With few input rows per weight column
(a classifier's last Gemm sees one row per sample) G is shrunk toward its diagonal,
(1 - rho) G + rho diag(G) with rho = K / (K + rows): on a diagonal G every weight's error
counts alone and nearest is optimal, so directions the rows never showed are rounded as
nearest would, not fitted to the few rows.  A layer whose rounding does not
reconstruct better than round-to-nearest keeps round-to-nearest.  The stage-1 model then
holds W' = s * q, which insertion quantizes back to exactly q; the pipeline keeps the
rounded weights only if the quantized model's output SQNR is not lower with them.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from ..qdq.params import quantize_weight, spec_weight_scales
from .loss_aware import MEMORY_BUDGET, UNKNOWN_BYTES, _fake_quantize, recorded_chunks

ROUNDED_OPS = frozenset({"Conv", "Gemm", "MatMul"})
DEFAULT_ITERATIONS = 500
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's values)
WARMUP = 0.2  # share of the iterations without the rounding regularizer
BETA = (20.0, 2.0)  # the regularizer's exponent, annealed from the first to the second
LAMBDA = 10.0  # weight of the regularizer against the normalized reconstruction error (tuned on
# random correlated layers: 1 leaves 20-30 % of h(V) undecided after 500 iterations, 10 under 1 %)
LEARNING_RATE = 0.05  # Adam's step on V (the init spans about +-2.4)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
ENERGY = 0.9999  # share of the input Gram matrix's trace the optimization sees (the check sees all)
MAX_ROWS = 1 << 14  # input rows (output positions x samples) the Gram matrix is built from
SEED = 0


@dataclass
class LayerResult:
    seconds: float
    error_ratio: float  # reconstruction error of the AdaRounded weights / round-to-nearest's
    changed: float  # share of the weights rounded the other way than nearest
    undecided: float  # share of h(V) strictly between 0 and 1 when the iterations ended


@dataclass
class Rounding:
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # weight initializer -> s * q
    integers: dict[str, np.ndarray] = field(default_factory=dict)  # weight initializer -> q (int8, as emitted)
    layers: dict[str, LayerResult] = field(default_factory=dict)  # node -> result (rounded layers)
    unrounded: Any = None  # the model before (the pipeline's check may return to it)
    kept: bool | None = None  # whether the check kept the rounding (None: not checked yet)
    output_sqnr_db: dict = field(default_factory=dict)  # the check's output SQNR with and without

    def summary(self) -> dict:
        ratios = sorted(r.error_ratio for r in self.layers.values())
        return {"rounded": len(self.weights), "kept": self.kept,
                "output_sqnr_db": {k: round(v, 2) for k, v in self.output_sqnr_db.items()},
                "median_error_ratio": round(float(np.median(ratios)), 4) if ratios else 1.0,
                "seconds": round(sum(r.seconds for r in self.layers.values()), 3),
                "layers": {name: {"seconds": round(r.seconds, 3), "error_ratio": round(r.error_ratio, 4),
                                  "changed": round(r.changed, 4), "undecided": round(r.undecided, 4)}
                           for name, r in self.layers.items()}}


# -- the layers and their matrices ---------------------------------------------------------

def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _layers(model: onnx.ModelProto, plan) -> list[tuple[onnx.NodeProto, str, int | None]]:
    """(node, weight name, weight axis) of the quantized Conv/Gemm/MatMul nodes whose
    weight (input 1) is a constant used by that node alone and whose input 0 is not."""
    initializers = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    slots = {(slot.node.name, slot.index): slot.axis for slot in plan.weights}
    found = []
    for node in model.graph.node:
        if node.op_type not in ROUNDED_OPS or (node.name, 1) not in slots or len(node.input) < 2:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or node.input[0] in initializers or uses[node.input[1]] != 1:
            continue
        attrs = _attrs(node)
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            continue
        if node.op_type == "MatMul" and len(weight.dims) != 2:
            continue
        if node.op_type == "Conv" and len(weight.dims) < 3:
            continue
        found.append((node, node.input[1], slots[(node.name, 1)]))
    return found


def roundable(model: onnx.ModelProto, plan, weight_spec) -> list[str]:
    """The nodes whose weights ``adaround`` would round (none unless the weights are int8)."""
    return [node.name for node, *_ in _layers(model, plan)] if weight_spec.dtype == "int8" else []


def weight_rows(op_type: str, attrs: Mapping, weight: np.ndarray) -> np.ndarray:
    """``weight`` as (groups, output channels per group, K): row c of group g holds what
    output channel c multiplies the group's K input values (im2col columns) with."""
    if op_type == "Conv":
        groups = int(attrs.get("group", 1))
        return weight.reshape(groups, weight.shape[0] // groups, -1)
    matrix = weight if op_type == "Gemm" and attrs.get("transB", 0) else weight.T
    return matrix[None]


def rows_to_weight(op_type: str, attrs: Mapping, rows: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The inverse of ``weight_rows``."""
    if op_type == "Conv":
        return rows.reshape(shape)
    matrix = rows[0]
    return matrix if op_type == "Gemm" and attrs.get("transB", 0) else np.ascontiguousarray(matrix.T)


def conv_pads(attrs: Mapping, spatial: Sequence[int], kernel: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding of each spatial axis, as ONNX Conv defines it (``pads`` or ``auto_pad``)."""
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        return pads
    if auto_pad == "VALID":
        return [(0, 0)] * rank
    flat = list(attrs.get("pads", [0] * (2 * rank)))
    return list(zip(flat[:rank], flat[rank:]))


def conv_patches(x: np.ndarray, attrs: Mapping, kernel: Sequence[int], limit: int | None = None,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """im2col: the input patches of a Conv's output positions, (N * P, C * prod(kernel))
    with columns ordered (channel, kernel tap) as the weight's (C/group, *kernel) flattens,
    and the P positions' coordinates in the output (all of them, or ``limit`` // N drawn
    at random without replacement).  Vectorized: one gather per kernel tap."""
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = conv_pads(attrs, x.shape[2:], kernel)
    padded = np.pad(x, [(0, 0), (0, 0), *pads])
    out = [(padded.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(rank)]
    total = int(np.prod(out))
    positions = np.arange(total)
    if limit is not None and total * x.shape[0] > limit:
        rng = rng or np.random.default_rng(SEED)
        positions = np.sort(rng.choice(total, size=max(1, limit // x.shape[0]), replace=False))
    coords = np.unravel_index(positions, out)
    taps = []
    for tap in np.ndindex(*kernel):
        index = tuple(c * s + t * d for c, s, t, d in zip(coords, strides, tap, dilations))
        taps.append(padded[(slice(None), slice(None), *index)])  # (N, C, P)
    stacked = np.stack(taps, axis=2)  # (N, C, taps, P)
    n, c, t, p = stacked.shape
    return stacked.transpose(0, 3, 1, 2).reshape(n * p, c * t), coords


def input_rows(op_type: str, attrs: Mapping, x: np.ndarray, kernel: Sequence[int], limit: int,
               rng: np.random.Generator) -> np.ndarray:
    """The layer's input as rows (M, K_total): im2col patches for Conv, the last axis for
    Gemm/MatMul (at most ``limit`` rows, drawn at random)."""
    if op_type == "Conv":
        return conv_patches(x, attrs, kernel, limit, rng)[0]
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > limit:
        rows = rows[np.sort(rng.choice(rows.shape[0], size=limit, replace=False))]
    return rows


def shrunk(gram_matrix: np.ndarray, rows: int) -> np.ndarray:
    """(1 - rho) G + rho diag(G), rho = K / (K + rows): G estimated from few rows, pulled
    toward independent columns (where round-to-nearest is the optimum)."""
    k = gram_matrix.shape[-1]
    rho = k / (k + max(rows, 1))
    diagonal = np.einsum("gkk->gk", gram_matrix)
    out = (1.0 - rho) * gram_matrix
    out[:, np.arange(k), np.arange(k)] += rho * diagonal
    return out


def gram(rows: np.ndarray, groups: int, other: np.ndarray | None = None) -> np.ndarray:
    """Per group, X^T X of its columns (X^T Y with ``other`` = Y): (groups, K, K) in float64."""
    def grouped(matrix):
        return matrix.astype(np.float64).reshape(matrix.shape[0], groups, -1).transpose(1, 0, 2)

    left = grouped(rows)
    return np.matmul(left.transpose(0, 2, 1), left if other is None else grouped(other))


# -- the optimization ------------------------------------------------------------------------

@dataclass
class Grams:
    """Sums over a layer's input rows x (float) and x~ (x quantized as the layer will read
    it), per group (groups, K, K): G = x x^T, Gq = x~ x~^T, M = x x~^T."""

    float: np.ndarray
    quantized: np.ndarray
    cross: np.ndarray

    @classmethod
    def of(cls, gram_matrix: np.ndarray) -> Grams:
        """Float inputs only (x~ = x)."""
        return cls(gram_matrix, gram_matrix, gram_matrix)


def reconstruction_error(q: np.ndarray, a: np.ndarray, scales: np.ndarray, grams: Grams | np.ndarray) -> float:
    """sum over rows and channels of (W_q x~ - W x)^2 with W_q = s q, W = s a: the layer's
    output error (with x~ = x: sum of d G d^T, d = W_q - W)."""
    grams = grams if isinstance(grams, Grams) else Grams.of(grams)
    d = scales * (q - a)
    w = scales * a
    error = np.sum(d * np.matmul(d, grams.quantized)) + 2.0 * np.sum(d * _input_term(w, grams))
    if grams.quantized is not grams.float:  # the input's own rounding: sum of W (x~ - x)(x~ - x)^T W^T
        spread = grams.quantized - grams.cross - grams.cross.transpose(0, 2, 1) + grams.float
        error += np.sum(w * np.matmul(w, spread))
    return float(error)


def _input_term(w: np.ndarray, grams: Grams) -> np.ndarray:
    """W (Gq - M): what the input's rounding adds to the gradient of the output error (0 for float inputs)."""
    if grams.quantized is grams.float:
        return np.zeros_like(w)
    return np.matmul(w, grams.quantized - grams.cross)


def rectified_sigmoid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h(V) and dh/dV."""
    sig = 1.0 / (1.0 + np.exp(-v))
    raw = sig * (ZETA - GAMMA) + GAMMA
    inside = (raw > 0) & (raw < 1)
    return np.clip(raw, 0.0, 1.0), np.where(inside, sig * (1.0 - sig) * (ZETA - GAMMA), 0.0)


def gram_factor(gram_matrix: np.ndarray, energy: float = ENERGY) -> np.ndarray:
    """F (groups, K, r) in float32 with F F^T = G on the eigen-directions holding ``energy``
    of its trace (all of them when that saves little): each iteration then costs two
    (C x K) @ (K x r) products instead of one (C x K) @ (K x K)."""
    values, vectors = np.linalg.eigh(gram_matrix)  # ascending
    values = np.clip(values, 0.0, None)
    k = values.shape[-1]
    share = np.cumsum(values[..., ::-1], axis=-1) / np.maximum(values.sum(axis=-1, keepdims=True), 1e-300)
    rank = int(np.max(np.argmax(share >= energy, axis=-1))) + 1
    rank = k if rank > k // 2 else rank
    top = vectors[..., ::-1][..., :rank] * np.sqrt(values[..., ::-1][..., None, :rank])
    return np.ascontiguousarray(top.astype(np.float32))


def beta_at(step: int, iterations: int) -> float | None:
    """The regularizer's exponent at ``step`` (1-based): None during the warm-up, then
    annealed linearly from BETA[0] to BETA[1]."""
    warm = int(WARMUP * iterations)
    if step <= warm:
        return None
    return BETA[1] + (BETA[0] - BETA[1]) * max(0.0, 1.0 - (step - warm) / max(1, iterations - warm))


def round_layer(a: np.ndarray, scales: np.ndarray, grams: Grams | np.ndarray, qmax: int,
                iterations: int = DEFAULT_ITERATIONS) -> tuple[np.ndarray, dict]:
    """AdaRound of one layer.  ``a``: W / s as (groups, C, K); ``scales``: s broadcast to
    ``a``'s shape; ``grams``: the inputs' Grams (or G alone: float inputs).  Returns the integer weights q
    (float array, each floor(a) or floor(a) + 1, or round(a) at the grid's end) and
    {"error_ratio", "changed", "undecided"}; round-to-nearest when it is not beaten."""
    nearest = np.clip(np.rint(a), -qmax, qmax)
    fixed = np.abs(nearest) >= qmax
    base = np.floor(a)
    grams = grams if isinstance(grams, Grams) else Grams.of(grams)
    rtn_error = reconstruction_error(nearest, a, scales, grams)
    free = ~fixed
    if rtn_error <= 0 or not free.any():
        return nearest, {"error_ratio": 1.0, "changed": 0.0, "undecided": 0.0}
    frac = np.clip(a - base, 0.0, 1.0)
    v = np.where(free, -np.log((ZETA - GAMMA) / (np.clip(frac, 1e-4, 1 - 1e-4) - GAMMA) - 1.0), 0.0)  # h(v) = frac
    v = v.astype(np.float32)
    # float32 from here: d = s * (base - a + offset), offset = h on free weights, nearest - floor on fixed ones.
    mask = free.astype(np.float32)
    start = (scales * (base - a + np.where(fixed, nearest - base, 0.0))).astype(np.float32)
    s = scales.astype(np.float32)
    factor = gram_factor(grams.quantized)  # Gq ~ F F^T: d Gq = (d F) F^T
    offset_term = _input_term(scales * a, grams).astype(np.float32)
    factor_t = np.ascontiguousarray(factor.transpose(0, 2, 1))
    gain = np.float32(2.0 / rtn_error)  # d(error / rtn_error) / d offset = gain * s * (d G)
    pull = np.float32(2.0 * LAMBDA / free.sum())
    m, u = np.zeros_like(v), np.zeros_like(v)
    b1, b2 = ADAM_BETAS
    for step in range(1, iterations + 1):
        sig = 1.0 / (1.0 + np.exp(-v))
        h = np.clip(sig * np.float32(ZETA - GAMMA) + np.float32(GAMMA), 0.0, 1.0)
        grad = np.matmul(np.matmul(start + s * h * mask, factor), factor_t) + offset_term
        grad *= gain * s
        beta = beta_at(step, iterations)
        if beta is not None:
            centred = 2.0 * h - 1.0
            grad -= (pull * np.float32(beta)) * np.sign(centred) * np.abs(centred) ** np.float32(beta - 1)
        # dh/dV: zero where the rectified sigmoid is clipped (h exactly 0 or 1) and on fixed weights
        grad *= sig * (1.0 - sig) * np.float32(ZETA - GAMMA) * mask * ((h > 0) & (h < 1))
        m = b1 * m + (1 - b1) * grad
        u = b2 * u + (1 - b2) * grad * grad
        v -= np.float32(LEARNING_RATE / (1 - b1 ** step)) * m / (np.sqrt(u / np.float32(1 - b2 ** step)) + ADAM_EPS)
    h, _ = rectified_sigmoid(v.astype(np.float64))
    q = np.where(free, base + (h >= 0.5), nearest)
    error = reconstruction_error(q, a, scales, grams)
    if error >= rtn_error:
        return nearest, {"error_ratio": 1.0, "changed": 0.0, "undecided": 0.0}
    undecided = float(np.mean((h[free] > 0) & (h[free] < 1)))
    return q, {"error_ratio": error / rtn_error, "changed": float(np.mean(q != nearest)), "undecided": undecided}


# -- the step ------------------------------------------------------------------------------

def adaround(model: onnx.ModelProto, plan, weight_spec, samples: Sequence[Mapping[str, np.ndarray]], *,
             iterations: int = DEFAULT_ITERATIONS, input_ranges: Mapping[str, tuple[float, float]] | None = None,
             activation_spec=None, sizes: Mapping[str, int] | None = None,
             memory_budget: int = MEMORY_BUDGET, show_progress: bool | None = None) -> Rounding:
    """The AdaRounded weights of ``model``'s quantized Conv/Gemm/MatMul layers (``plan``:
    the Q/DQ plan; ``weight_spec``: the target's weight spec), on ``samples``.
    ``input_ranges`` (with ``activation_spec``, the target's activation spec): the layer
    inputs' ranges; a layer whose input has one is fitted to read it quantized-dequantized
    on that grid, so that its rounding also offsets its input's rounding."""
    rounding = Rounding()
    if weight_spec.dtype != "int8":
        return rounding
    initializers = {t.name: t for t in model.graph.initializer}
    layers = _layers(model, plan)
    by_name = {node.name: (node, w, axis) for node, w, axis in layers}
    needs = {node.name: [node.input[0]] for node, *_ in layers}
    sizes = sizes or {}
    size_of = lambda name: sizes.get(name, UNKNOWN_BYTES) * max(len(samples), 1)  # noqa: E731
    progress = show_progress if show_progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(layers), desc="adaround", unit="layer", disable=not progress, leave=False)
    rng = np.random.default_rng(SEED)
    for group, recorded in recorded_chunks(model, list(by_name), needs, samples, size_of, memory_budget):
        for name in group:
            bar.update(1)
            start = time.perf_counter()
            node, weight_name, axis = by_name[name]
            inputs = [values[node.input[0]] for values in recorded]
            held = (input_ranges or {}).get(node.input[0])
            read = None if held is None or activation_spec is None else \
                [_fake_quantize(x, *held, activation_spec) for x in inputs]
            result = _round_one(node, numpy_helper.to_array(initializers[weight_name]).astype(np.float32), axis,
                                weight_spec, inputs, read, iterations, rng)
            if result is None:
                continue
            q, adjusted, info = result
            rounding.weights[weight_name] = adjusted
            rounding.integers[weight_name] = q
            rounding.layers[name] = LayerResult(time.perf_counter() - start, **info)
    bar.close()
    return rounding


def _round_one(node: onnx.NodeProto, weight: np.ndarray, axis: int | None, spec, inputs: list[np.ndarray],
               read: list[np.ndarray] | None, iterations: int, rng: np.random.Generator):
    """(q as emitted, s * q, info) for one layer, or None when it keeps its weights;
    ``read``: the inputs as the quantized layer reads them (None: as ``inputs``)."""
    attrs = _attrs(node)
    scales = spec_weight_scales(weight, axis, spec)
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    full_scales = np.broadcast_to(scales.reshape(shape) if axis is not None else scales, weight.shape)
    rows = weight_rows(node.op_type, attrs, weight)
    groups = rows.shape[0]
    kernel = weight.shape[2:]
    limit = max(1, MAX_ROWS // max(len(inputs), 1))
    sums, count = None, 0
    try:
        for index, x in enumerate(inputs):
            if x.dtype != np.float32 or (node.op_type == "Conv" and x.ndim != weight.ndim):
                return None
            seed = int(rng.integers(1 << 31))  # the same rows of x and of its quantized form
            matrix = input_rows(node.op_type, attrs, x, kernel, limit, np.random.default_rng(seed))
            if read is None:
                part = (gram(matrix, groups),)
            else:
                other = input_rows(node.op_type, attrs, read[index], kernel, limit, np.random.default_rng(seed))
                part = (gram(matrix, groups), gram(other, groups), gram(matrix, groups, other))
            sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
            count += matrix.shape[0]
    except (ValueError, IndexError, MemoryError):  # an input the layer cannot be read from as rows
        return None
    if sums is None or sums[0].shape[-1] != rows.shape[-1]:
        return None
    sums = [shrunk(m, count) for m in sums]
    total = Grams.of(sums[0]) if read is None else Grams(*sums)
    s = weight_rows(node.op_type, attrs, full_scales).astype(np.float64)
    a = rows.astype(np.float64) / s
    with _one_blas_thread():
        q_rows, info = round_layer(a, s, total, spec.qmax, iterations)
    if not info["changed"]:
        return None
    q = rows_to_weight(node.op_type, attrs, q_rows, weight.shape)
    adjusted = (q.astype(np.float32) * full_scales).astype(np.float32)
    # What insertion will emit from the adjusted weight must be q itself, at the same scales.
    emitted = spec_weight_scales(adjusted, axis, spec)
    if not np.allclose(emitted, scales, rtol=1e-6, atol=0) or \
            not np.array_equal(quantize_weight(adjusted, emitted, axis, spec.qmax), q.astype(np.int8)):
        return None
    return q.astype(np.int8), adjusted, info


def _one_blas_thread():
    """Small matrix products run faster on one BLAS thread than on a pool that spins
    beside onnxruntime's (measured: (64 x 288) @ (288 x 288) 0.4 ms vs 2.2 ms)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not installed: BLAS keeps its own threads
        return contextlib.nullcontext()
    return threadpool_limits(1, "blas")


def apply(model: onnx.ModelProto, rounding: Rounding) -> onnx.ModelProto:
    """A copy of ``model`` whose rounded weights are s * q."""
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for tensor in rounded.graph.initializer:
        if tensor.name in rounding.weights:
            tensor.CopyFrom(numpy_helper.from_array(rounding.weights[tensor.name], tensor.name))
    return rounded
