"""The model editor as pipeline steps: integer inputs/outputs made during a quantize run.

``check_io_names_step`` refuses unknown input/output names right after the model is
read (before a long calibration); ``edit_io_step`` converts them after Q/DQ insertion.
The quantizer never imports this module: its callers add the steps to the pipeline.
"""

from __future__ import annotations

from typing import Iterable

import onnx

from quantizer.errors import InternalError, UsageError, first_line
from quantizer.pipeline import Step

from .editor import ModelEditor, get_output_names, get_pure_input_names


def check_io_names(model: onnx.ModelProto, inputs: dict[str, Iterable[str]], outputs: Iterable[str]) -> None:
    """``inputs`` maps a parameter name to the input names it gives; ``outputs`` are output names."""
    valid_inputs, valid_outputs = get_pure_input_names(model), get_output_names(model)
    for parameter, names in inputs.items():
        for name in names:
            if name not in valid_inputs:
                raise UsageError(f"`{parameter}`: unknown input '{name}'; the model's inputs are: "
                                 f"{', '.join(valid_inputs)}")
    for name in outputs:
        if name not in valid_outputs:
            raise UsageError(f"`output_types`: unknown output '{name}'; the model's outputs are: "
                             f"{', '.join(valid_outputs)}")


def edit_io(model: onnx.ModelProto, input_types: dict, output_types: dict) -> list[dict]:
    """Convert the requested inputs/outputs of a quantized model to integers (in place);
    returns their parameters."""
    editor = ModelEditor(model)
    for name, dtype in input_types.items():
        editor.convert_input_type(name, dtype)
    for name, (dtype, tensor_range) in output_types.items():
        editor.convert_output_type(name, dtype, tensor_range)
    try:
        onnx.checker.check_model(editor.model, full_check=True)
    except Exception as exc:
        raise InternalError(f"the edited model fails onnx.checker: {first_line(exc)}") from exc
    return [io.as_dict() for io in editor.edited]


def check_io_names_step(input_types: dict, input_ranges: dict, output_types: dict) -> Step:
    def run(ctx):
        check_io_names(ctx.original, {"input_types": input_types, "range_overrides": input_ranges}, output_types)

    return Step("check_io_names", "optimize", run, lambda ctx: bool(input_types or input_ranges or output_types))


def edit_io_step(input_types: dict, output_types: dict) -> Step:
    def run(ctx):
        ctx.io = edit_io(ctx.outcome.model, input_types, output_types)
        return f"{len(ctx.io)} integer inputs/outputs"

    return Step("edit_io", "quantize", run)
