"""Calibration: streamed per-tensor statistics and the range methods over them."""

from .errors import CalibratorError
from .methods import CalibrationMethod
from .histogram_methods import range_errors
from .ranges import RANGE_FUNCTIONS, range_function, symmetric_range
from .statistics import TensorStatistics

__all__ = ["CalibrationMethod", "CalibratorError", "RANGE_FUNCTIONS", "TensorStatistics", "range_errors", "range_function", "symmetric_range"]
