"""ONNX int8 quantizer: optimize -> calibrate -> insert QDQ.

    from quantizer import optimize_model, Calibrator, quantize, quantize_model
"""

from quantizer.calibrators import CalibrationMethod

from .calibrate import Calibrator
from .errors import CalibrationDataError, ModelError, QuantizerError, UsageError
from .optimize import optimize_model
from .pipeline import QuantizationResult, quantize_model
from .quantize import quantize

__all__ = [
    "CalibrationDataError",
    "CalibrationMethod",
    "Calibrator",
    "ModelError",
    "QuantizationResult",
    "QuantizerError",
    "UsageError",
    "optimize_model",
    "quantize",
    "quantize_model",
]
__version__ = "0.1.0"
