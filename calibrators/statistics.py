"""Streaming per-tensor statistics: updated once per sample, then the sample is dropped.

Memory is constant in the number of samples; merging two summaries gives exactly the
summary of the union of their samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TensorStatistics:
    minimum: float = np.inf
    maximum: float = -np.inf
    count: int = 0  # finite values seen
    nonfinite: int = 0  # NaN/Inf values seen (excluded from everything else)

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.size == 0:
            return
        low, high = values.min(), values.max()
        if np.isfinite(low) and np.isfinite(high):
            finite_count = values.size
        else:  # slow path only when something is NaN/Inf
            finite = values[np.isfinite(values)]
            finite_count = finite.size
            self.nonfinite += values.size - finite_count
            if finite_count == 0:
                return
            low, high = finite.min(), finite.max()
        self.minimum = min(self.minimum, float(low))
        self.maximum = max(self.maximum, float(high))
        self.count += int(finite_count)

    def merge(self, other: "TensorStatistics") -> "TensorStatistics":
        return TensorStatistics(
            minimum=min(self.minimum, other.minimum),
            maximum=max(self.maximum, other.maximum),
            count=self.count + other.count,
            nonfinite=self.nonfinite + other.nonfinite,
        )
