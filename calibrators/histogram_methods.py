"""Histogram range searches: the PERCENTILE, ENTROPY, MSE and SQNR calibration families.

Each public function is ``f(stats, symmetric, **options) -> (lo, hi)`` and works on the
tensor's histogram alone (the raw values are gone by the time ranges are computed).
_ASYM searches lo and hi of the signed values.  _SYM searches a over |x| and returns
[-a, a], or [0, a] when every observed value is >= 0.  Candidate bounds are histogram
edges (the outermost ones replaced by the observed min / max; for ENTROPY only edges next
to occupied bins), so a result is exact to one bin width and never leaves [min, max]
widened to include 0.

ENTROPY, MSE and SQNR score every candidate on the int8 grid the quantizer will really
build from it (quantizer.qdq.params.activation_params): the range is widened to include
0, scale s = (hi - lo) / 255, zero_point = round(-128 - lo / s) clamped to [-128, 127],
so the representable values are s * k for k in [-128 - zp, 127 - zp].  That matters at
the ends: [-a, a] represents -128 s .. 127 s, not -a .. a, and the rounded zero point
moves an asymmetric grid by up to s / 2.

Search (all vectorized): every candidate costs O(1) (MSE, via prefix sums of count, x,
x^2), O(levels) (ENTROPY, via prefix sums of count, nonzero bins and P log P) or O(bins)
(SQNR, exact rounding of every bin center) numpy work.  MSE_SYM tries every edge; the
other searches use a coarse grid refined around the best few points (``_search``, tuned
per family and dimension in ``_PLANS``).  _ASYM is 2-D over (lo, hi) pairs unless the
data never cross 0 on one side, which fixes that bound (the quantizer includes 0 anyway).
Ties go to the widest range: nothing is clipped without a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import CalibratorError
from .statistics import Histogram, TensorStatistics

Range = tuple[float, float]

QMIN, QMAX = -128, 127
STEPS = QMAX - QMIN  # 255 steps between the lowest and highest int8 level


@dataclass(frozen=True)
class _Plan:
    """How to search a 1-D or 2-D candidate grid (see ``_search``)."""

    coarse: int  # candidates per axis on the first grid (>= axis size: exhaustive)
    seeds: int  # best points whose neighbourhoods each round refines
    shrink: int  # factor by which each round cuts the step
    final_reach: int = 0  # last, exhaustive +- window (in candidates) ...
    final_seeds: int = 0  # ... around this many best points


_EXHAUSTIVE = _Plan(coarse=1 << 30, seeds=1, shrink=2)
# Tuned against exhaustive searches of synthetic 1M-value, 1000-2048-bin tensors (Gaussian,
# Laplace with and without outliers, Student-t, uniform, bimodal, mixtures, ReLU, leaky
# ReLU, GELU, sigmoid, ...).  ENTROPY is jagged at the scale of single bins, so it gets
# more seeds and a final exhaustive window: the 1-D plan found the exhaustive optimum on
# 24/24 tensors (evaluating ~30 % of the candidates), the 2-D plan came within 2 % of the
# optimum's KL on 24/24 (0.1 % on average) with ~1200 of ~300k candidate pairs.  MSE and
# SQNR are smooth at that scale; their plans found the exhaustive optimum on every tensor
# tried (6 or 7 each; SQNR_SYM once 0.07 % above it).
_PLANS = {
    ("ENTROPY", 1): _Plan(coarse=128, seeds=8, shrink=4, final_reach=8, final_seeds=3),
    ("ENTROPY", 2): _Plan(coarse=16, seeds=8, shrink=3, final_reach=8, final_seeds=2),
    ("MSE", 1): _EXHAUSTIVE,  # O(1) per candidate
    ("MSE", 2): _Plan(coarse=128, seeds=4, shrink=4, final_reach=4, final_seeds=2),
    ("SQNR", 1): _Plan(coarse=128, seeds=4, shrink=4, final_reach=4, final_seeds=2),
    ("SQNR", 2): _Plan(coarse=16, seeds=4, shrink=4, final_reach=4, final_seeds=2),
}

# Matrix elements (candidates x bins or levels) evaluated at once: temporaries this small
# stay in cache and are reused by the allocator instead of being faulted in afresh, which
# on a VM costs more than the arithmetic.
_CHUNK = 1 << 15


# -- public range functions ---------------------------------------------------------------


def percentile_range(stats: TensorStatistics, symmetric: bool, *, percentage: float = 99.99, **_) -> Range:
    """_SYM: the p-th percentile of |x|; _ASYM: (100 - p) / 2 % cut from each tail.

    Inside the bin where the cumulative count crosses the target the value is linearly
    interpolated, i.e. values are assumed spread evenly over their bin.
    """
    percentage = float(percentage)
    if not 0.0 < percentage <= 100.0:
        raise CalibratorError(f"percentile percentage must be in (0, 100], got {percentage}")
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

    P: the histogram inside the range, the clipped tail mass added to the edge bins.
    Q: the same bins without the tails, merged into the int8 levels the range maps the
    bin centers to, each level's mass spread evenly over its bins where P > 0.  As in
    TensorRT, Q leaves the tails out: merging them into Q too would make KL blind to
    clipping whenever a level holds about one bin, and the narrowest range would win.
    Clipping into a level with no mass of its own makes KL infinite, so candidate bounds
    are only edges next to occupied bins (the neighbouring occupied edge clips the same
    values); a step below one bin width is skipped (TensorRT's "at least as many bins as
    levels").  _SYM works on |x| with levels 0..127 (step 2a/255), or 0..255 (step a/255)
    when every value is >= 0.
    """
    trivial = _trivial_range(stats, symmetric)
    if trivial is not None:
        return trivial
    hist = stats.histogram()
    if symmetric:
        magnitudes = without_zero_bin(_magnitude_histogram(hist))
        if magnitudes.counts.sum() == 0:
            return _full_range(stats, True)
        bounds = _magnitude_bounds(magnitudes, stats)
        edge_index = np.arange(1, bounds.size + 1)
        occupied = (magnitudes.counts > 0) | (edge_index == bounds.size)
        bounds, edge_index = bounds[occupied], edge_index[occupied]
        positive = stats.minimum >= 0
        steps = bounds / STEPS if positive else 2.0 * bounds / STEPS
        top_level = STEPS if positive else QMAX
        prefix = _Prefix(magnitudes)

        def objective(_, ib):
            return prefix.kl(np.zeros_like(ib), edge_index[ib], steps[ib], np.zeros(ib.size), 0, top_level)

        best = _best_1d(objective, bounds, "ENTROPY", abs_tol=1e-9)
        return _symmetric_result(stats, bounds[best]) if best is not None else _full_range(stats, True)

    hist = without_zero_bin(hist)
    if hist.counts.sum() == 0:
        return _full_range(stats, False)
    prefix = _Prefix(hist)
    axes = _Axes(hist, stats, occupied=True)

    def objective(ia, ib):
        lo, hi = axes.lo_model[ia], axes.hi_model[ib]
        step, kmin, _ = _grid(lo, hi)
        return prefix.kl(axes.lo_edge[ia], axes.hi_edge[ib], step, QMIN - kmin, QMIN, QMAX)

    return _best_2d(objective, axes, "ENTROPY", abs_tol=1e-9, stats=stats)


def mse_range(stats: TensorStatistics, symmetric: bool, **_) -> Range:
    """The range minimizing the expected squared quantize -> dequantize error.

    Per bin (values at the bin center): values beyond the grid's ends cost
    (x - nearest end)^2, values inside cost s^2 / 12, the mean rounding error of values
    spread over a step -- except the bin holding 0, which is always exactly on the grid:
    it is charged its center's actual error, else a ReLU spike of exact zeros would cost
    s^2 / 12 each and push the range too narrow.  Prefix sums of count, count*x and
    count*x^2 make each candidate O(1).  _SYM too is scored on the signed histogram, so
    that the two ends of its grid (-128 s and 127 s) are charged correctly.
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


def without_zero_bin(hist: Histogram) -> Histogram:
    """The histogram without its bin [0, width).

    0 is always exactly on the grid, so the values there (ReLU's zeros, padding) are
    quantized almost exactly whatever the range.  Left in, their spike dominates the KL of
    the level it falls in and pushes ENTROPY to clip far too hard (digits: 11 dB instead
    of 28 dB); TensorRT's calibrator shares that artefact.
    """
    zero = int(round(-hist.lo / hist.width))
    if not 0 <= zero < len(hist.counts) or hist.counts[zero] == 0:
        return hist
    counts = np.array(hist.counts, dtype=np.float64)
    counts[zero] = 0.0
    return Histogram(counts, hist.lo, hist.width)


def _trivial_range(stats: TensorStatistics, symmetric: bool) -> Range | None:
    """The answer when there is nothing to search: no values, or a single distinct value."""
    if stats.count == 0:
        return (0.0, 0.0)
    if not stats.with_histogram:
        raise CalibratorError("histogram calibration methods need statistics collected with a histogram")
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

    def __init__(self, hist: Histogram, low: float = -np.inf, high: float = np.inf):
        counts = np.asarray(hist.counts, dtype=np.float64)
        self.counts, self.lo, self.width = counts, float(hist.lo), float(hist.width)
        self.bins = counts.size
        # A bin's values sit at its center, but never beyond the observed extremes: the
        # last bin's center lies up to half a bin past the maximum, which would otherwise
        # read as clipping the maximum whenever the range ends exactly on it.
        self.centers = np.clip(hist.centers, low, high)
        self.total = float(counts.sum())

        def prefix(values):
            return np.concatenate(([0.0], np.cumsum(values)))

        self.mass = prefix(counts)
        self.nonzero = prefix(counts > 0)
        self.mass_and_nonzero = self.mass + 1j * self.nonzero
        self.log_integers = np.log(np.maximum(np.arange(self.bins + 1), 1))
        self.plogp = prefix(_xlogx(counts))
        self.first = prefix(counts * self.centers)
        self.second = prefix(counts * self.centers**2)
        zero = round(-self.lo / self.width)  # the bin [0, width), if the histogram has it
        self.zero_bin = zero if 0 <= zero < self.bins and counts[zero] > 0 else None

    def bins_below(self, value):
        """How many bin centers are < value."""
        return np.searchsorted(self.centers, value, side="left")

    def bins_at_most(self, value):
        """How many bin centers are <= value."""
        return np.searchsorted(self.centers, value, side="right")

    # ENTROPY ----------------------------------------------------------------------------
    def kl(self, start, stop, step, zero_point, qlow: int, qhigh: int) -> np.ndarray:
        """KL(P || Q) for candidates keeping bins [start, stop); inf where invalid.

        Bin j is in level round(center_j / step) + zero_point, clipped to [qlow, qhigh].
        P' = the counts inside plus the tails added to the edge bins (total N);
        Q = the counts inside only (total N_in), each level's mass M_k spread evenly over
        the n_k bins of the level where P' > 0.  With T_k the P' mass of level k:
            KL = (sum_j P'_j log P'_j - sum_k T_k log(M_k / n_k)) / N + log(N_in / N),
        infinite when some level has P' mass but no mass of its own (clipping into a gap).
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
        # First bin whose center rounds to level >= q: center >= step * (q - zp - 0.5),
        # i.e. bin index >= (step * (q - zp - 0.5) - lo) / width - 0.5.
        slope = step / self.width
        intercept = ((-0.5 - zero_point) * step - self.lo) / self.width - 0.5
        inner = np.multiply.outer(slope, levels)
        inner += intercept[:, None]
        np.ceil(inner, out=inner)
        np.maximum(inner, first, out=inner)
        np.minimum(inner, last, out=inner)
        bounds = np.empty((start.size, levels.size + 2), np.int64)
        bounds[:, 0], bounds[:, -1] = start, stop
        bounds[:, 1:-1] = inner
        # One gather gives both prefix sums: mass (real) and nonzero-bin count (imag).
        both = self.mass_and_nonzero[bounds]
        both = both[:, 1:] - both[:, :-1]
        mass, nonzero = both.real, both.imag  # Q's level masses (inside only), P' supports
        rows = np.arange(start.size)
        low_tail = self.mass[start]
        high_tail = self.total - self.mass[stop]
        low_level = (bounds[:, 1:] <= first).sum(axis=1)
        high_level = (bounds[:, 1:] <= last - 1).sum(axis=1)
        # An empty edge bin that receives a tail becomes a nonzero bin of P'.
        nonzero[rows, low_level] += (low_tail > 0) & (self.counts[start] == 0)
        nonzero[rows, high_level] += (high_tail > 0) & (self.counts[stop - 1] == 0)
        # sum_k M_k log(M_k / n_k); the +tiny makes empty levels contribute 0 * finite.
        log_mean = np.log(mass + 1e-300)
        log_mean -= self.log_integers[nonzero.astype(np.int64)]
        merged = np.einsum("ij,ij->i", mass, log_mean)
        # The tails are P' mass too, in the edge bins' levels; a level that gets tail mass
        # but has no mass of its own makes Q zero where P' is not: KL is infinite.
        starved = np.zeros(start.size, bool)
        for tail, level in ((low_tail, low_level), (high_tail, high_level)):
            gets_tail = tail > 0
            starved |= gets_tail & (mass[rows, level] <= 0)
            merged += np.where(gets_tail, tail * log_mean[rows, level], 0.0)
        plogp = (self.plogp[stop - 1] - self.plogp[start + 1]
                 + _xlogx(self.counts[start] + low_tail) + _xlogx(self.counts[stop - 1] + high_tail))
        inside = self.mass[stop] - self.mass[start]
        with np.errstate(divide="ignore"):
            kl = (plogp - merged) / self.total + np.log(inside / self.total)
        return np.where(starved, np.inf, np.maximum(kl, 0.0))

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
        if self.zero_bin is not None:
            # 0 is always on the grid, so the bin holding it (ReLU outputs, padding pile up
            # there) has its center's error to the grid, not s^2 / 12.
            j = self.zero_bin
            center, count = self.centers[j], self.counts[j]
            inside = (below <= j) & (j < inside_end)
            with np.errstate(divide="ignore", invalid="ignore"):
                exact = (center - step * np.rint(center / step)) ** 2
            rounding = rounding + np.where(inside, count * (exact - step**2 / 12.0), 0.0)
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
            error = np.multiply.outer(1.0 / step[pick], centers)
            np.rint(error, out=error)
            np.minimum(error, kmax[pick, None], out=error)
            np.maximum(error, kmin[pick, None], out=error)
            error *= step[pick, None]
            error -= centers
            out[pick] = np.einsum("ij,ij,j->i", error, error, counts)
        return out


# -- candidate sets and searches -------------------------------------------------------------


class _Axes:
    """Candidate lo and hi bounds for _ASYM: signed-histogram edges <= 0 and >= 0.

    ``*_model`` is the bound the grid is built from (0 when the data never cross 0 on that
    side: the quantizer widens the range to include 0 anyway), ``*_out`` the bound returned
    (the data min / max in that case), ``*_edge`` the edge index.  With ``occupied`` only
    edges whose inner neighbour bin holds values are kept (plus the outermost edges).
    """

    def __init__(self, hist: Histogram, stats: TensorStatistics, occupied: bool = False):
        n = len(hist.counts)
        values = hist.lo + hist.width * np.arange(n + 1)
        values[0], values[n] = stats.minimum, stats.maximum
        zero = int(np.clip(round(-hist.lo / hist.width), 0, n))
        if stats.minimum < 0:
            edges = np.arange(0, zero + 1)
            if occupied:
                edges = edges[(edges == 0) | (hist.counts[np.minimum(edges, n - 1)] > 0)]
            self.lo_edge = edges
            self.lo_model = self.lo_out = values[edges]
        else:
            self.lo_edge, self.lo_model, self.lo_out = np.array([0]), np.array([0.0]), np.array([stats.minimum])
        if stats.maximum > 0:
            edges = np.arange(zero, n + 1)
            if occupied:
                edges = edges[(edges == n) | (hist.counts[np.maximum(edges - 1, 0)] > 0)]
            self.hi_edge = edges
            self.hi_model = self.hi_out = values[edges]
        else:
            self.hi_edge, self.hi_model, self.hi_out = np.array([n]), np.array([0.0]), np.array([stats.maximum])


def _spread(size: int, limit: int) -> tuple[np.ndarray, int]:
    """At most ~limit evenly strided indices of range(size) (both ends kept) and the stride."""
    if size <= limit:
        return np.arange(size), 1
    stride = math.ceil((size - 1) / max(limit - 1, 1))
    return np.unique(np.append(np.arange(0, size, stride), size - 1)), stride


def _search(objective, size_a: int, size_b: int, family: str):
    """Minimize objective(ia, ib) over the index grid [0, size_a) x [0, size_b).

    A coarse grid first; then rounds that cut the step by ``shrink`` inside +-(previous
    step) windows around the best ``seeds`` points, until the step is one index; then an
    exhaustive +-``final_reach`` window around the best ``final_seeds``.  The plan comes
    from the family and the dimension (an axis of size 1 makes it a 1-D search).
    Returns every evaluated (ia, ib, value).
    """
    plan = _PLANS[(family, 1 if min(size_a, size_b) == 1 else 2)]
    grid_a, step_a = _spread(size_a, plan.coarse)
    grid_b, step_b = _spread(size_b, plan.coarse)
    mesh_a, mesh_b = np.meshgrid(grid_a, grid_b, indexing="ij")
    ia, ib = mesh_a.ravel(), mesh_b.ravel()
    values = _finite_or_inf(objective(ia, ib))

    def refine(count, reach_a, reach_b, fine_a, fine_b):
        nonlocal ia, ib, values
        count = min(count, values.size)
        ranked = np.argpartition(values, count - 1)[:count]
        ranked = ranked[np.isfinite(values[ranked])]
        if ranked.size == 0:
            return
        offsets_a = fine_a * np.arange(-reach_a, reach_a + 1)
        offsets_b = fine_b * np.arange(-reach_b, reach_b + 1)
        near_a = np.clip(ia[ranked][:, None, None] + offsets_a[None, :, None], 0, size_a - 1)
        near_b = np.clip(ib[ranked][:, None, None] + offsets_b[None, None, :], 0, size_b - 1)
        # Windows overlap each other and earlier rounds; re-scoring a few points is cheaper
        # than checking them against everything evaluated so far.
        new_a, new_b = np.divmod(np.unique((near_a * size_b + near_b).ravel()), size_b)
        ia, ib = np.concatenate((ia, new_a)), np.concatenate((ib, new_b))
        values = np.concatenate((values, _finite_or_inf(objective(new_a, new_b))))

    while step_a > 1 or step_b > 1:
        fine_a, fine_b = max(1, step_a // plan.shrink), max(1, step_b // plan.shrink)
        refine(plan.seeds, math.ceil(step_a / fine_a), math.ceil(step_b / fine_b), fine_a, fine_b)
        step_a, step_b = fine_a, fine_b
    if plan.final_reach and max(size_a, size_b) > plan.coarse:
        reach = plan.final_reach
        refine(plan.final_seeds, reach if size_a > 1 else 0, reach if size_b > 1 else 0, 1, 1)
    return ia, ib, values


def _finite_or_inf(values: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), np.inf, values)


def _pick(values: np.ndarray, widths: np.ndarray, abs_tol: float) -> int | None:
    """Index of the minimum; among near-ties the widest range, so nothing is clipped for free."""
    finite = np.isfinite(values)
    if not finite.any():
        return None
    best = values[finite].min()
    near = np.flatnonzero(finite & (values <= best + 1e-9 * abs(best) + abs_tol))
    return int(near[np.argmax(widths[near])])


def _best_1d(objective, bounds: np.ndarray, family: str, abs_tol: float) -> int | None:
    """Index into ``bounds`` of the best _SYM bound."""
    _, ib, values = _search(objective, 1, bounds.size, family)
    best = _pick(values, bounds[ib], abs_tol)
    return None if best is None else int(ib[best])


def _best_2d(objective, axes: "_Axes", family: str, abs_tol: float, stats: TensorStatistics) -> Range:
    ia, ib, values = _search(objective, axes.lo_model.size, axes.hi_model.size, family)
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
    prefix = _Prefix(hist, stats.minimum, stats.maximum)
    error = prefix.expected_error if family == "MSE" else prefix.exact_noise
    abs_tol = 1e-12 * float(prefix.second[-1])  # relative to the signal energy
    if symmetric:
        bounds = _magnitude_bounds(_magnitude_histogram(hist), stats)
        positive = stats.minimum >= 0

        def objective(_, ib):
            a = bounds[ib]
            return error(np.zeros_like(a) if positive else -a, a)

        best = _best_1d(objective, bounds, family, abs_tol)
        return _symmetric_result(stats, bounds[best]) if best is not None else _full_range(stats, True)

    axes = _Axes(hist, stats)

    def objective(ia, ib):
        return error(axes.lo_model[ia], axes.hi_model[ib])

    return _best_2d(objective, axes, family, abs_tol, stats)


__all__ = ["entropy_range", "mse_range", "percentile_range", "sqnr_range"]


def range_errors(stats: TensorStatistics, ranges) -> np.ndarray:
    """Expected squared quantization error of each (lo, hi) in ``ranges`` over every value
    the statistics saw: clipping beyond the int8 grid's ends plus rounding inside (the MSE
    method's objective, evaluated for given ranges).  inf without a histogram."""
    ranges = np.asarray(ranges, np.float64).reshape(-1, 2)
    if not stats.with_histogram or stats.count == 0:
        return np.full(len(ranges), np.inf)
    prefix = _Prefix(stats.histogram())
    lo, hi = np.minimum(ranges[:, 0], 0.0), np.maximum(ranges[:, 1], 0.0)
    return prefix.expected_error(lo, hi)
