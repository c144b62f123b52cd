"""uint8/int8 model inputs and outputs for NPU deployment (see editor.py)."""

from .editor import (
    ModelEditor,
    TensorType,
    get_output_names,
    get_pure_input_names,
    parse_tensor_type,
)
from .metadata import QuantizedIO, read_io

__all__ = [
    "ModelEditor",
    "QuantizedIO",
    "TensorType",
    "get_output_names",
    "get_pure_input_names",
    "parse_tensor_type",
    "read_io",
]
