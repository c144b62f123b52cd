"""`quantize optimize MODEL`: the stage-1 model only."""

from __future__ import annotations

import click

from quantizer.model_io import check_output_path, load_model, save_model_atomic
from quantizer.optimize import optimize_model
from quantizer.verify import check_emitted

from .. import options
from ..app import cli, default_output, run_guarded


def write_stage1(model, output, shapes, quiet: bool = False) -> None:
    original = load_model(model)  # model errors first
    out = check_output_path(output, model)
    save_model_atomic(optimize_model(original, shapes), out, verify=check_emitted)
    if not quiet:
        click.echo(f"wrote {out}")


@cli.command("optimize")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output model [default: MODEL_opt.onnx].")
@options.input_shape
@options.debug
def optimize(model, output, input_shapes, debug):
    """Write the stage-1 optimized float model only."""
    run_guarded(debug, lambda: write_stage1(model, output or default_output(model, "opt"),
                                            options.parse_shapes(input_shapes)))
