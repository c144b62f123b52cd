"""Histogram range searches: the PERCENTILE, ENTROPY, MSE and SQNR calibration families.

Each public function is ``f(stats, symmetric, **options) -> (lo, hi)`` and works on the
tensor's histogram alone (the raw values are gone by the time ranges are computed).
_ASYM searches lo and hi of the signed values.  _SYM searches a over |x| and returns
[-a, a], or [0, a] when every observed value is >= 0.  Candidate bounds are histogram
edges (the outermost ones replaced by the observed min / max), so a result is exact to one
bin width and never leaves [min, max] widened to include 0.

ENTROPY, MSE and SQNR score every candidate on the int8 grid the quantizer will really
build from it (quantizer.qdq.params.activation_params): the range is widened to include
0, scale s = (hi - lo) / 255, zero_point = round(-128 - lo / s) clamped to [-128, 127],
so the representable values are s * k for k in [-128 - zp, 127 - zp].  That matters at
the ends: [-a, a] represents -128 s .. 127 s, not -a .. a, and the rounded zero point
moves an asymmetric grid by up to s / 2.

Search strategy (all vectorized; each candidate costs O(1) or O(levels) numpy work via
prefix sums, except SQNR, whose exact rounding noise costs O(bins) per candidate):
  * 1-D searches (_SYM, PERCENTILE) try every edge, except SQNR_SYM, which tries every
    16th edge and then every edge near the best few (see ``_search``).
  * 2-D searches (_ASYM) try a coarse grid of (lo, hi) edge pairs, then repeatedly
    shrink the step 4x in windows around the best few pairs down to single edges.
"""

from __future__ import annotations

import math

import numpy as np

from quantizer.errors import UsageError

from .statistics import Histogram, TensorStatistics

Range = tuple[float, float]

QMIN, QMAX = -128, 127
STEPS = QMAX - QMIN  # 255 steps between the lowest and highest int8 level

# Search sizes: coarse candidates per axis and seeds kept per refinement round.  They
# trade time for the risk of missing a narrow optimum of a jagged objective; the
# defaults meet 10 ms (1-D) / 50 ms (2-D) per 2048-bin tensor on one core.
_SEEDS = 4
_COARSE = {
    "ENTROPY_SYM": 1 << 30,  # exhaustive: O(128) per candidate
    "MSE_SYM": 1 << 30,  # exhaustive: O(1) per candidate
    "SQNR_SYM": 128,
    "ENTROPY_ASYM": 48,
    "MSE_ASYM": 256,
    "SQNR_ASYM": 32,
}
_CHUNK = 1 << 20  # matrix elements evaluated at once (bounds memory, stays in cache)


# -- public range functions ---------------------------------------------------------------


def percentile_range(stats: TensorStatistics, symmetric: bool, *, percentage: float = 99.99, **_) -> Range:
    """_SYM: the p-th percentile of |x|; _ASYM: (100 - p) / 2 % cut from each tail.

    Inside the bin where the cumulative count crosses the target the value is linearly
    interpolated, i.e. values are assumed spread evenly over their bin.
    """
    percentage = float(percentage)
    if not 0.0 < percentage <= 100.0:
        raise UsageError(f"percentile percentage must be in (0, 100], got {percentage}")
    trivial = _trivial_range(stats, symmetric)
    if trivial is not None:
        return trivial
    hist = stats.histogram()
    if symmetric:
        magnitudes = _magnitude_histogram(hist)
        amax = max(abs(stats.minimum), abs(stats.maximum))
        bound = float(_quantile(magnitudes, percentage / 100.0, 0.0, amax)[0])
        return _symmetric_result(stats, bound)
    tail = (100.0 - percentage) / 200.0
    lo, hi = _quantile(hist, np.array([tail, 1.0 - tail]), stats.minimum, stats.maximum)
    return float(lo), float(hi)


def entropy_range(stats: TensorStatistics, symmetric: bool, **_) -> Range:
    """The range minimizing KL(P || Q), TensorRT-style, on the real int8 grid.

    P is the histogram inside the range with the clipped tail mass added to the edge bins;
    Q merges P into the int8 levels that the range maps the bin centers to and spreads each
    level's mass evenly over its nonzero bins.  A candidate whose step is below one bin
    width is skipped: with at most one bin per level Q == P and KL is trivially 0.
    _SYM works on the histogram of |x| with levels 0..127 (step 2a/255), or 0..255
    (step a/255) when every value is >= 0.  Ties (e.g. KL == 0 everywhere, as for a few
    distinct values) go to the widest range: clip nothing without a reason.
    """
    trivial = _trivial_range(stats, symmetric)
    if trivial is not None:
        return trivial
    hist = stats.histogram()
    if symmetric:
        magnitudes = _magnitude_histogram(hist)
        bounds = _magnitude_bounds(magnitudes, stats)
        positive = stats.minimum >= 0
        steps = bounds / STEPS if positive else 2.0 * bounds / STEPS
        top_level = STEPS if positive else QMAX
        prefix = _Prefix(magnitudes)
        edge_index = np.arange(1, bounds.size + 1)

        def objective(_, ib):
            return prefix.kl(np.zeros_like(ib), edge_index[ib], steps[ib], np.zeros(ib.size), 0, top_level)

        best = _best_1d(objective, bounds, "ENTROPY_SYM", abs_tol=1e-9)
        return _symmetric_result(stats, bounds[best]) if best is not None else _full_range(stats, True)

    prefix = _Prefix(hist)
    axes = _asymmetric_axes(hist, stats)

    def objective(ia, ib):
        lo, hi = axes.lo_model[ia], axes.hi_model[ib]
        step, kmin, _ = _grid(lo, hi)
        return prefix.kl(axes.lo_edge[ia], axes.hi_edge[ib], step, QMIN - kmin, QMIN, QMAX)

    return _best_2d(objective, axes, "ENTROPY_ASYM", abs_tol=1e-9, stats=stats)


def mse_range(stats: TensorStatistics, symmetric: bool, **_) -> Range:
    """The range minimizing the expected squared quantize -> dequantize error.

    Per bin (values at the bin center): values beyond the grid's ends cost
    (x - nearest end)^2, values inside cost s^2 / 12, the mean rounding error of values
    spread over a step.  Prefix sums of count, count*x and count*x^2 make each candidate
    O(1).  Both forms are scored on the signed histogram so that the two ends of the int8
    grid (-128 s vs 127 s) are charged correctly.
    """
    return _error_search(stats, symmetric, "MSE")


def sqnr_range(stats: TensorStatistics, symmetric: bool, **_) -> Range:
    """The range maximizing 10 log10(sum x^2 / sum (x - deq(q(x)))^2) on the real grid.

    The noise of each bin is its center's exact error on the candidate's grid (rounding
    inside, clipping outside), not the s^2 / 12 model.  For a fixed tensor sum x^2 is
    constant, so this differs from MSE only in that rounding-noise model: it rewards grids
    whose levels happen to line up with where the values actually sit (few distinct
    values, spikes), and otherwise lands close to the MSE range.
    """
    return _error_search(stats, symmetric, "SQNR")


# -- degenerate inputs and result shapes ------------------------------------------------------


def _trivial_range(stats: TensorStatistics, symmetric: bool) -> Range | None:
    """The answer when there is nothing to search: no values, or a single distinct value."""
    if stats.count == 0:
        return (0.0, 0.0)
    if not stats.with_histogram:
        raise UsageError("histogram calibration methods need statistics collected with a histogram")
    if stats.minimum == stats.maximum:
        return _full_range(stats, symmetric)
    return None


def _full_range(stats: TensorStatistics, symmetric: bool) -> Range:
    if symmetric:
        return _symmetric_result(stats, max(abs(stats.minimum), abs(stats.maximum)))
    return (float(stats.minimum), float(stats.maximum))


def _symmetric_result(stats: TensorStatistics, bound: float) -> Range:
    bound = float(bound)
    return (0.0, bound) if stats.minimum >= 0 else (-bound, bound)


# -- histogram helpers ---------------------------------------------------------------------


def _magnitude_histogram(hist: Histogram) -> Histogram:
    """Histogram of |x| on the same bins.

    ``Histogram.folded`` indexes bins from 0, which for a histogram far from 0 (e.g. values
    around 1000 with a spread of 1e-3) would allocate up to 2**50 bins, so it is used only
    when the histogram straddles 0; one-signed histograms are kept or mirrored instead.
    """
    top = hist.lo + hist.width * len(hist.counts)
    if hist.lo >= 0:
        return hist
    if top <= 0:
        return Histogram(hist.counts[::-1].copy(), -top, hist.width)
    return hist.folded()


def _magnitude_bounds(magnitudes: Histogram, stats: TensorStatistics) -> np.ndarray:
    """Candidate a values for _SYM: every upper edge of the |x| histogram, the last = max|x|."""
    bounds = magnitudes.lo + magnitudes.width * np.arange(1, len(magnitudes.counts) + 1)
    bounds[-1] = max(abs(stats.minimum), abs(stats.maximum))
    return bounds


def _quantile(hist: Histogram, fractions, low: float, high: float) -> np.ndarray:
    """Values below which ``fractions`` of the mass lie, interpolating inside the bin."""
    counts = hist.counts
    cumulative = np.cumsum(counts)
    targets = np.atleast_1d(np.asarray(fractions, dtype=np.float64)) * cumulative[-1]
    index = np.minimum(np.searchsorted(cumulative, targets, side="left"), len(counts) - 1)
    inside = counts[index]
    before = cumulative[index] - inside
    fraction = np.divide(targets - before, inside, out=np.zeros_like(targets), where=inside > 0)
    values = hist.lo + hist.width * (index + np.clip(fraction, 0.0, 1.0))
    return np.clip(values, low, high)


def _grid(lo, hi):
    """Step and integer limits [kmin, kmax] of the int8 grid built for [lo, hi] (lo <= 0 <= hi)."""
    step = (hi - lo) / STEPS
    with np.errstate(divide="ignore", invalid="ignore"):
        zero_point = np.clip(np.rint(QMIN - lo / step), QMIN, QMAX)
    return step, QMIN - zero_point, QMAX - zero_point


def _xlogx(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    logs = np.log(x, out=np.zeros_like(x), where=x > 0)
    return x * logs


class _Prefix:
    """Prefix sums over one histogram that make a candidate cost O(1) or O(levels)."""

    def __init__(self, hist: Histogram):
        counts = np.asarray(hist.counts, dtype=np.float64)
        self.counts, self.lo, self.width = counts, float(hist.lo), float(hist.width)
        self.bins = counts.size
        self.centers = hist.centers
        self.total = float(counts.sum())

        def prefix(values):
            return np.concatenate(([0.0], np.cumsum(values)))

        self.mass = prefix(counts)
        self.nonzero = prefix(counts > 0)
        self.plogp = prefix(_xlogx(counts))
        self.first = prefix(counts * self.centers)
        self.second = prefix(counts * self.centers**2)

    def bins_below(self, value):
        """How many bin centers are < value."""
        with np.errstate(invalid="ignore"):
            index = np.ceil((value - self.lo) / self.width - 0.5)
        return np.clip(np.nan_to_num(index, nan=0.0), 0, self.bins).astype(np.int64)

    def bins_at_most(self, value):
        """How many bin centers are <= value."""
        with np.errstate(invalid="ignore"):
            index = np.floor((value - self.lo) / self.width - 0.5) + 1
        return np.clip(np.nan_to_num(index, nan=0.0), 0, self.bins).astype(np.int64)

    # ENTROPY ----------------------------------------------------------------------------
    def kl(self, start, stop, step, zero_point, qlow: int, qhigh: int) -> np.ndarray:
        """KL(P || Q) for candidates keeping bins [start, stop); inf where invalid.

        Bin j is in level round(center_j / step) + zero_point, clipped to [qlow, qhigh].
        With P' the counts inside plus the tails added to the edge bins (total N) and
        M_k, n_k the mass and nonzero-bin count of level k:
            N * KL = sum_j P'_j log P'_j - sum_k M_k log(M_k / n_k).
        """
        start, stop = np.asarray(start, np.int64), np.asarray(stop, np.int64)
        step, zero_point = np.asarray(step, np.float64), np.asarray(zero_point, np.float64)
        valid = (step >= self.width) & (stop - start >= 2)
        out = np.full(step.shape, np.inf)
        rows = np.flatnonzero(valid)
        levels = np.arange(qlow + 1, qhigh + 1, dtype=np.float64)  # inner boundaries
        chunk = max(1, _CHUNK // (levels.size + 2))
        for begin in range(0, rows.size, chunk):
            pick = rows[begin: begin + chunk]
            out[pick] = self._kl_rows(start[pick], stop[pick], step[pick], zero_point[pick], levels)
        return out

    def _kl_rows(self, start, stop, step, zero_point, levels):
        first, last = start[:, None], stop[:, None]
        # First bin whose center rounds to level >= q: center >= step * (q - zp - 0.5).
        inner = self.bins_below(step[:, None] * (levels - zero_point[:, None] - 0.5))
        bounds = np.concatenate((first, np.clip(inner, first, last), last), axis=1)
        # Level masses: the clipped tails belong to the outermost nonempty levels.
        mass_bounds = np.where(bounds <= first, 0, np.where(bounds >= last, self.bins, bounds))
        mass = np.diff(self.mass[mass_bounds], axis=1)
        nonzero = np.diff(self.nonzero[bounds], axis=1)
        # An empty edge bin becomes nonzero once its tail is added to it.
        rows = np.arange(start.size)
        low_tail = self.mass[start + 1]
        high_tail = self.total - self.mass[stop - 1]
        gained_low = (low_tail > 0) & (self.counts[start] == 0)
        gained_high = (high_tail > 0) & (self.counts[stop - 1] == 0)
        nonzero[rows, (bounds[:, 1:] <= first).sum(axis=1)] += gained_low
        nonzero[rows, (bounds[:, 1:] <= last - 1).sum(axis=1)] += gained_high
        plogp = (self.plogp[stop] - self.plogp[start]
                 - _xlogx(self.counts[start]) - _xlogx(self.counts[stop - 1])
                 + _xlogx(low_tail) + _xlogx(high_tail))
        ratio = np.divide(mass, nonzero, out=np.ones_like(mass), where=nonzero > 0)
        merged = (mass * np.log(ratio, out=np.zeros_like(ratio), where=ratio > 0)).sum(axis=1)
        return np.maximum(plogp - merged, 0.0) / self.total

    # MSE / SQNR ---------------------------------------------------------------------------
    def expected_error(self, lo, hi) -> np.ndarray:
        """Clipping error beyond the grid ends plus s^2 / 12 per value inside, per candidate."""
        step, kmin, kmax = _grid(lo, hi)
        low_end, high_end = step * kmin, step * kmax
        below, inside_end = self.bins_below(low_end), self.bins_at_most(high_end)
        n0, n1, n2 = self.mass, self.first, self.second
        clip_low = n2[below] - 2 * low_end * n1[below] + low_end**2 * n0[below]
        above0, above1, above2 = n0[-1] - n0[inside_end], n1[-1] - n1[inside_end], n2[-1] - n2[inside_end]
        clip_high = above2 - 2 * high_end * above1 + high_end**2 * above0
        rounding = step**2 / 12.0 * (n0[inside_end] - n0[below])
        error = np.maximum(clip_low, 0.0) + np.maximum(clip_high, 0.0) + rounding
        return np.where(step > 0, error, np.inf)

    def exact_noise(self, lo, hi) -> np.ndarray:
        """sum_j count_j (c_j - deq(q(c_j)))^2 with each bin center quantized on the grid."""
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        step, kmin, kmax = _grid(lo, hi)
        occupied = self.counts > 0
        centers, counts = self.centers[occupied], self.counts[occupied]
        out = np.full(step.shape, np.inf)
        rows = np.flatnonzero(step > 0)
        chunk = max(1, _CHUNK // max(centers.size, 1))
        for begin in range(0, rows.size, chunk):
            pick = rows[begin: begin + chunk]
            s = step[pick, None]
            levels = np.rint(centers / s)
            np.clip(levels, kmin[pick, None], kmax[pick, None], out=levels)
            levels *= s
            levels -= centers
            levels *= levels
            out[pick] = levels @ counts
        return out


# -- candidate sets and searches -------------------------------------------------------------


class _Axes:
    """Candidate lo and hi bounds for _ASYM: signed-histogram edges <= 0 and >= 0.

    ``*_model`` is the bound the grid is built from (0 when the data never cross 0 on that
    side: the quantizer widens the range to include 0 anyway), ``*_out`` the bound returned
    (the data min / max in that case, as the spec asks), ``*_edge`` the edge index.
    """

    def __init__(self, hist: Histogram, stats: TensorStatistics):
        n = len(hist.counts)
        values = hist.lo + hist.width * np.arange(n + 1)
        values[0], values[n] = stats.minimum, stats.maximum
        zero = int(np.clip(round(-hist.lo / hist.width), 0, n))
        if stats.minimum < 0:
            self.lo_edge = np.arange(0, zero + 1)
            self.lo_model = self.lo_out = values[self.lo_edge]
        else:
            self.lo_edge, self.lo_model, self.lo_out = np.array([0]), np.array([0.0]), np.array([stats.minimum])
        if stats.maximum > 0:
            self.hi_edge = np.arange(zero, n + 1)
            self.hi_model = self.hi_out = values[self.hi_edge]
        else:
            self.hi_edge, self.hi_model, self.hi_out = np.array([n]), np.array([0.0]), np.array([stats.maximum])


def _asymmetric_axes(hist: Histogram, stats: TensorStatistics) -> _Axes:
    return _Axes(hist, stats)


def _spread(size: int, limit: int) -> tuple[np.ndarray, int]:
    """At most ~limit evenly strided indices of range(size) (both ends kept) and the stride."""
    if size <= limit:
        return np.arange(size), 1
    stride = math.ceil((size - 1) / max(limit - 1, 1))
    return np.unique(np.append(np.arange(0, size, stride), size - 1)), stride


def _search(objective, size_a: int, size_b: int, coarse: int):
    """Minimize objective(ia, ib) over the index grid [0, size_a) x [0, size_b).

    A coarse grid first, then rounds that cut the step 4x inside +-(previous step)
    windows around the best _SEEDS points, until the step is one index.  Returns every
    evaluated (ia, ib, value); with ``coarse`` >= the axis sizes it is exhaustive.
    """
    grid_a, step_a = _spread(size_a, coarse)
    grid_b, step_b = _spread(size_b, coarse)
    mesh_a, mesh_b = np.meshgrid(grid_a, grid_b, indexing="ij")
    ia, ib = mesh_a.ravel(), mesh_b.ravel()
    values = objective(ia, ib)
    while step_a > 1 or step_b > 1:
        fine_a, fine_b = max(1, step_a // 4), max(1, step_b // 4)
        ranked = np.argsort(values, kind="stable")[:_SEEDS]
        ranked = ranked[np.isfinite(values[ranked])]
        if ranked.size == 0:
            break
        offsets_a = fine_a * np.arange(-math.ceil(step_a / fine_a), math.ceil(step_a / fine_a) + 1)
        offsets_b = fine_b * np.arange(-math.ceil(step_b / fine_b), math.ceil(step_b / fine_b) + 1)
        near_a = np.clip(ia[ranked][:, None, None] + offsets_a[None, :, None], 0, size_a - 1)
        near_b = np.clip(ib[ranked][:, None, None] + offsets_b[None, None, :], 0, size_b - 1)
        keys = np.unique((near_a * size_b + near_b).ravel())
        keys = keys[~np.isin(keys, ia * size_b + ib)]
        new_a, new_b = np.divmod(keys, size_b)
        ia, ib = np.concatenate((ia, new_a)), np.concatenate((ib, new_b))
        values = np.concatenate((values, objective(new_a, new_b)))
        step_a, step_b = fine_a, fine_b
    return ia, ib, values


def _pick(values: np.ndarray, widths: np.ndarray, abs_tol: float) -> int | None:
    """Index of the minimum; among near-ties the widest range, so nothing is clipped for free."""
    finite = np.isfinite(values)
    if not finite.any():
        return None
    best = values[finite].min()
    near = np.flatnonzero(finite & (values <= best + 1e-9 * abs(best) + abs_tol))
    return int(near[np.argmax(widths[near])])


def _best_1d(objective, bounds: np.ndarray, name: str, abs_tol: float) -> int | None:
    """Index into ``bounds`` of the best _SYM bound."""
    _, ib, values = _search(objective, 1, bounds.size, _COARSE[name])
    best = _pick(values, bounds[ib], abs_tol)
    return None if best is None else int(ib[best])


def _best_2d(objective, axes: _Axes, name: str, abs_tol: float, stats: TensorStatistics) -> Range:
    ia, ib, values = _search(objective, axes.lo_model.size, axes.hi_model.size, _COARSE[name])
    best = _pick(values, axes.hi_model[ib] - axes.lo_model[ia], abs_tol)
    if best is None:
        return _full_range(stats, False)
    return float(axes.lo_out[ia[best]]), float(axes.hi_out[ib[best]])


def _error_search(stats: TensorStatistics, symmetric: bool, family: str) -> Range:
    """MSE / SQNR: minimize the quantization error, modelled or exact, over candidates."""
    trivial = _trivial_range(stats, symmetric)
    if trivial is not None:
        return trivial
    hist = stats.histogram()
    prefix = _Prefix(hist)
    error = prefix.expected_error if family == "MSE" else prefix.exact_noise
    abs_tol = 1e-12 * float(prefix.second[-1])  # relative to the signal energy
    if symmetric:
        bounds = _magnitude_bounds(_magnitude_histogram(hist), stats)
        positive = stats.minimum >= 0

        def objective(_, ib):
            a = bounds[ib]
            return error(np.zeros_like(a) if positive else -a, a)

        best = _best_1d(objective, bounds, f"{family}_SYM", abs_tol)
        return _symmetric_result(stats, bounds[best]) if best is not None else _full_range(stats, True)

    axes = _asymmetric_axes(hist, stats)

    def objective(ia, ib):
        return error(axes.lo_model[ia], axes.hi_model[ib])

    return _best_2d(objective, axes, f"{family}_ASYM", abs_tol, stats)


__all__ = ["entropy_range", "mse_range", "percentile_range", "sqnr_range"]
