"""Range functions: each maps a tensor's statistics to a (min, max) range.

Methods are data: RANGE_FUNCTIONS maps a method family to a pure function
``f(stats, symmetric, **options) -> (lo, hi)``.  Histogram families live in
histogram_methods.py.
"""

from __future__ import annotations

from typing import Callable

from .errors import CalibratorError
from .histogram_methods import entropy_range, mse_range, percentile_range, sqnr_range
from .methods import CalibrationMethod
from .statistics import TensorStatistics

Range = tuple[float, float]


def symmetric_range(low: float, high: float) -> Range:
    """[-a, a] with a = max|x|, or [0, a] when every value is >= 0."""
    bound = max(abs(low), abs(high))
    return (0.0, bound) if low >= 0 else (-bound, bound)


def min_max_range(stats: TensorStatistics, symmetric: bool, **_options) -> Range:
    if symmetric:
        return symmetric_range(stats.minimum, stats.maximum)
    return (stats.minimum, stats.maximum)


RANGE_FUNCTIONS: dict[str, Callable[..., Range]] = {
    "MIN_MAX": min_max_range,
    "PERCENTILE": percentile_range,
    "ENTROPY": entropy_range,
    "MSE": mse_range,
    "SQNR": sqnr_range,
}


def range_function(method: CalibrationMethod) -> Callable[..., Range]:
    try:
        return RANGE_FUNCTIONS[method.family]
    except KeyError as exc:
        raise CalibratorError(
            f"calibration method {method.value.lower()} is not implemented yet; "
            f"available: {', '.join(m.value.lower() for m in CalibrationMethod if m.family in RANGE_FUNCTIONS)}"
        ) from exc
