"""`quantize edit QUANTIZED_MODEL`: integer inputs/outputs of a quantized model."""

from __future__ import annotations

import click
from quantizer.model_editor.steps import edit_io

from quantizer.errors import UsageError
from quantizer.model_io import check_output_path, load_model, save_model_atomic
from quantizer.verify import check_emitted

from .. import options
from ..app import cli, default_output, run_guarded
from ..text import format_io


@cli.command("edit")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output model [default: MODEL_edited.onnx].")
@options.input_type
@options.output_type
@options.quiet
@options.debug
def edit(model, output, input_types, output_types, quiet, debug):
    """Make inputs/outputs of an already quantized MODEL uint8/int8 (for NPUs)."""

    def action():
        proto = load_model(model)
        out = check_output_path(output or default_output(model, "edited"), model)
        in_types, out_types = options.parse_input_types(input_types), options.parse_output_types(output_types)
        if not (in_types or out_types):
            raise UsageError("nothing to edit: give --input-type NAME=uint8|int8 and/or --output-type NAME=uint8|int8")
        edited = edit_io(proto, in_types, out_types)
        save_model_atomic(proto, out, verify=check_emitted)
        if not quiet:
            click.echo("\n".join([f"wrote {out}", *format_io(edited)]))

    run_guarded(debug, action)
