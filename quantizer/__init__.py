"""ONNX int8 quantizer: optimize -> calibrate -> insert QDQ.

    from quantizer import optimize_model, Calibrator, quantize, quantize_model
    from quantizer import QuantizationConfig        # typed configuration of a run
    from quantizer import autotune                  # accuracy-driven method/fallback search
    from quantizer.model_editor import ModelEditor  # integer model inputs/outputs

Dependencies point one way: cli -> model_editor -> quantizer -> calibrators.  The editor
names stay importable from here for existing scripts (``from quantizer import
ModelEditor``), loaded only when asked for, so the quantizer never imports the editor.
"""

from quantizer.calibrators import CalibrationMethod

from .autotune import TuneResult, autotune
from .calibrate import Calibrator
from .config import CalibrationInputs, Outputs, QuantizationConfig, Scope
from .dataset import DataOptions, DataSpec, ImagePreprocessing
from .errors import CalibrationDataError, ModelError, QuantizerError, StrictError, UsageError
from .optimize import optimize_model
from .pipeline import QuantizationResult, quantize_model
from .quantize import quantize

_EDITOR_NAMES = ("ModelEditor", "TensorType", "get_output_names", "get_pure_input_names")


def __getattr__(name):
    if name in _EDITOR_NAMES:  # the public facade only; no quantizer module imports the editor
        import importlib

        return getattr(importlib.import_module("quantizer.model_editor"), name)
    raise AttributeError(f"module 'quantizer' has no attribute {name!r}")


__all__ = [
    "CalibrationDataError",
    "CalibrationInputs",
    "CalibrationMethod",
    "Calibrator",
    "DataOptions",
    "DataSpec",
    "ImagePreprocessing",
    "ModelError",
    "Outputs",
    "QuantizationConfig",
    "QuantizationResult",
    "QuantizerError",
    "Scope",
    "StrictError",
    "TuneResult",
    "UsageError",
    "autotune",
    "optimize_model",
    "quantize",
    "quantize_model",
    *_EDITOR_NAMES,
]
__version__ = "0.1.0"
