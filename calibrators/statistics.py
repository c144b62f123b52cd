"""Streaming per-tensor statistics: updated once per sample, then the sample is dropped.

The histogram lives on a fixed global grid: bin g at level k covers [g * 2**k, (g+1) * 2**k).
Coarsening to level k+1 maps bin g to g // 2 exactly, so the final histogram depends only
on the data, never on sample order or on how the samples were split: merging two states
equals one run over both.  The level is the finest at which the data fit in BINS bins
(and not finer than 2**-50 of the largest magnitude, to keep indices exact in int64).
Memory is O(BINS) per tensor, whatever the number or shape of the samples.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

BINS = 2048
# A tensor larger than this adds an evenly strided subsample of about this many values to
# its histogram (min/max/count stay exact): 64 samples still give millions of points per
# tensor, and the histogram cost stops growing with the activation size.
HISTOGRAM_SAMPLE_CAP = 1 << 17
_MANTISSA_GUARD = 50
# BatchedUpdates holds at most this many values per tensor (16 KiB of float32).
BATCHED_VALUES = 1 << 12


@dataclass(frozen=True)
class Histogram:
    """Counts over equal-width bins starting at ``lo``; the input of every range method."""

    counts: np.ndarray  # float64 or int64 counts
    lo: float
    width: float

    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(len(self.counts) + 1)

    @property
    def centers(self) -> np.ndarray:
        return self.lo + self.width * (np.arange(len(self.counts)) + 0.5)

    def folded(self) -> "Histogram":
        """Histogram of |x|: negative bin g lands on bin -g-1 (bins never grow past len)."""
        start = int(round(self.lo / self.width))
        size = len(self.counts)
        if start >= 0:  # all values >= 0
            return self
        if start + size <= 0:  # all values < 0: mirror
            return Histogram(self.counts[::-1].copy(), -(start + size) * self.width, self.width)
        indices = start + np.arange(size)
        target = np.where(indices >= 0, indices, -indices - 1)
        folded = np.bincount(target, weights=self.counts, minlength=int(target.max()) + 1)
        return Histogram(folded, 0.0, self.width)


def _fit_level(low: float, high: float, floor_level: int, bins: int) -> int:
    """The finest level >= floor_level at which [low, high] spans at most ``bins`` bins."""
    span = high - low
    level = floor_level
    if span > 0:
        level = max(level, math.floor(math.log2(span / bins)) - 1)
    while math.floor(high / 2.0**level) - math.floor(low / 2.0**level) + 1 > bins:
        level += 1
    return level


_FINEST_LEVEL = -1000  # 2**1000 still fits a float64, so index arithmetic stays finite


def _magnitude_floor(amax: float) -> int:
    if amax <= 0:
        return _FINEST_LEVEL
    return max(math.frexp(amax)[1] - _MANTISSA_GUARD, _FINEST_LEVEL)


def _shift_floor(indices: np.ndarray, shift: int) -> np.ndarray:
    """floor(indices / 2**shift) for int64 indices, for any shift >= 0."""
    if shift >= 62:
        return np.where(indices >= 0, 0, -1).astype(np.int64)
    return indices >> shift


@dataclass
class TensorStatistics:
    minimum: float = np.inf
    maximum: float = -np.inf
    count: int = 0  # finite values seen
    nonfinite: int = 0  # NaN/Inf values seen (excluded from everything else)
    bins: int = BINS
    with_histogram: bool = True
    level: int = 0  # bin width is 2**level
    offset: int = 0  # global index of counts[0]
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.size == 0:
            return
        low, high = values.min(), values.max()
        if not (np.isfinite(low) and np.isfinite(high)):  # slow path only for NaN/Inf
            finite_mask = np.isfinite(values)
            values = values[finite_mask]
            self.nonfinite += int(finite_mask.size - values.size)
            if values.size == 0:
                return
            low, high = values.min(), values.max()
        self.minimum = min(self.minimum, float(low))
        self.maximum = max(self.maximum, float(high))
        self.count += int(values.size)
        if self.with_histogram:
            self._add_to_histogram(values, float(low), float(high))

    # -- histogram -------------------------------------------------------------------
    def _target_level(self) -> int:
        amax = max(abs(self.minimum), abs(self.maximum))
        return _fit_level(self.minimum, self.maximum, _magnitude_floor(amax), self.bins)

    def _coarsen_to(self, level: int) -> None:
        """Move to a coarser level (never finer): bin g becomes g // 2**shift."""
        if self.counts.size == 0:
            self.level = level
            return
        if level <= self.level:
            return
        shift = level - self.level
        coarse = _shift_floor(self.offset + np.arange(self.counts.size, dtype=np.int64), shift)
        new_offset = int(coarse[0])
        self.counts = np.bincount(coarse - new_offset, weights=self.counts,
                                  minlength=int(coarse[-1] - new_offset) + 1).astype(np.int64)
        self.offset, self.level = new_offset, level

    def _place(self, low_index: int, high_index: int) -> None:
        """Re-window the counts so that global indices [low_index, high_index] fit."""
        if self.counts.size == 0:
            self.offset = low_index
            self.counts = np.zeros(high_index - low_index + 1, np.int64)
            return
        start = min(self.offset, low_index)
        stop = max(self.offset + self.counts.size - 1, high_index)
        if start == self.offset and stop == self.offset + self.counts.size - 1:
            return
        grown = np.zeros(stop - start + 1, np.int64)
        grown[self.offset - start: self.offset - start + self.counts.size] = self.counts
        self.counts, self.offset = grown, start

    def _add_to_histogram(self, values: np.ndarray, low: float, high: float) -> None:
        self._coarsen_to(self._target_level())
        level_scale = 2.0 ** -self.level
        low_index, high_index = math.floor(low * level_scale), math.floor(high * level_scale)
        self._place(low_index, high_index)
        flat = values.ravel()
        if flat.size > HISTOGRAM_SAMPLE_CAP:
            flat = flat[:: -(-flat.size // HISTOGRAM_SAMPLE_CAP)]
        # x * 2**-level and its floor are exact: in float32 when the scale is >= 1 and
        # representable (no underflow can flip a tiny negative to -0), else in float64.
        dtype = np.float32 if flat.dtype == np.float32 and -120 <= self.level <= 0 else np.float64
        scaled = flat.astype(dtype, copy=False) * dtype(level_scale)
        np.floor(scaled, out=scaled)
        indices = scaled.astype(np.int64)
        indices -= self.offset
        self.counts += np.bincount(indices, minlength=self.counts.size)

    def histogram(self) -> Histogram:
        """The signed histogram over the observed extent."""
        width = 2.0**self.level
        return Histogram(self.counts.astype(np.float64), self.offset * width, width)

    def merge(self, other: "TensorStatistics") -> "TensorStatistics":
        """Exactly the statistics of both sample sets together."""
        if other.count == 0 and other.nonfinite == 0:
            return copy.deepcopy(self)
        if self.count == 0 and self.nonfinite == 0:
            return copy.deepcopy(other)
        merged = TensorStatistics(
            minimum=min(self.minimum, other.minimum),
            maximum=max(self.maximum, other.maximum),
            count=self.count + other.count,
            nonfinite=self.nonfinite + other.nonfinite,
            bins=self.bins,
            with_histogram=self.with_histogram and other.with_histogram,
        )
        if not merged.with_histogram or merged.count == 0:
            return merged
        level = merged._target_level()
        merged.level = level
        for part in (self, other):
            if part.counts.size == 0:
                continue
            piece = TensorStatistics(level=part.level, offset=part.offset, counts=part.counts.copy())
            piece._coarsen_to(level)
            merged._place(piece.offset, piece.offset + piece.counts.size - 1)
            start = piece.offset - merged.offset
            merged.counts[start:start + piece.counts.size] += piece.counts
        return merged

    def __eq__(self, other) -> bool:
        if not isinstance(other, TensorStatistics):
            return NotImplemented
        scalars = ("minimum", "maximum", "count", "nonfinite", "bins", "with_histogram")
        if any(getattr(self, s) != getattr(other, s) for s in scalars):
            return False
        if self.count == 0 or not self.with_histogram:
            return True
        return self.level == other.level and _trimmed(self) == _trimmed(other)


def _trimmed(stats: TensorStatistics) -> tuple[int, tuple]:
    nonzero = np.flatnonzero(stats.counts)
    if nonzero.size == 0:
        return (0, ())
    return (stats.offset + int(nonzero[0]), tuple(stats.counts[nonzero[0]: nonzero[-1] + 1].tolist()))


class BatchedUpdates:
    """Updates of one TensorStatistics gathered into fewer, larger ones.

    Arrays of at most ``limit`` (<= HISTOGRAM_SAMPLE_CAP) values are held until together
    they would pass it, then added in one ``update`` of their concatenation (larger arrays
    go straight through).  No update ever sees more than the cap from small arrays, so none of them is
    subsampled, and the histogram grid depends only on the data: the statistics are
    exactly those of one update per array, at a fraction of the per-call cost for the many
    small tensors of small models (silero-vad: 27 tensors of a few hundred values per
    sample, thousands of samples).  ``flush()`` before reading the statistics."""

    def __init__(self, stats: TensorStatistics, limit: int = BATCHED_VALUES):
        if not 0 < limit <= HISTOGRAM_SAMPLE_CAP:
            raise ValueError(f"a batch of at most HISTOGRAM_SAMPLE_CAP values, got {limit}")
        self.stats, self.cap = stats, limit
        self._pending: list[np.ndarray] = []
        self._size = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.size > self.cap:
            self.stats.update(values)
            return
        if self._size + values.size > self.cap:
            self.flush()
        self._pending.append(values.ravel())
        self._size += values.size

    def flush(self) -> None:
        if not self._pending:
            return
        pending = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending, self._size = [], 0
        self.stats.update(pending)
