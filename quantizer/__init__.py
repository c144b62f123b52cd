"""ONNX int8 quantizer: optimize -> calibrate -> insert QDQ.

    from quantizer import optimize_model, Calibrator, quantize, quantize_model
    from quantizer import ModelEditor, TensorType   # integer model inputs/outputs
    from quantizer import autotune                  # accuracy-driven method/fallback search
"""

from quantizer.calibrators import CalibrationMethod
from quantizer.model_editor import ModelEditor, TensorType, get_output_names, get_pure_input_names

from .calibrate import Calibrator
from .errors import CalibrationDataError, ModelError, QuantizerError, UsageError
from .optimize import optimize_model
from .pipeline import QuantizationResult, quantize_model
from .autotune import TuneResult, autotune
from .quantize import quantize

__all__ = [
    "CalibrationDataError",
    "CalibrationMethod",
    "Calibrator",
    "ModelEditor",
    "ModelError",
    "QuantizationResult",
    "QuantizerError",
    "TensorType",
    "TuneResult",
    "UsageError",
    "autotune",
    "get_output_names",
    "get_pure_input_names",
    "optimize_model",
    "quantize",
    "quantize_model",
]
__version__ = "0.1.0"
