"""Calibration: streamed per-tensor statistics and the range methods over them."""

from .methods import CalibrationMethod
from .ranges import RANGE_FUNCTIONS, range_function, symmetric_range
from .statistics import TensorStatistics

__all__ = ["CalibrationMethod", "RANGE_FUNCTIONS", "TensorStatistics", "range_function", "symmetric_range"]
