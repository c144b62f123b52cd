"""`quantize optimize MODEL`: the stage-1 model only."""

from __future__ import annotations

import click

from quantizer.errors import UsageError
from quantizer.model_io import check_output_path, load_model, save_model_atomic
from quantizer.optimize import optimize_model
from quantizer.targets import TargetError, load_target
from quantizer.verify import check_emitted

from .. import options
from ..app import cli, default_output, run_guarded


def write_stage1(model, output, shapes, quiet: bool = False, target: str | None = None) -> None:
    """The stage-1 model, with the rewrites of ``target`` (as `quantize` would apply them)."""
    rewrites = ()
    if target is not None:
        try:
            rewrites = load_target(target).rewrites
        except TargetError as exc:
            raise UsageError(f"`target`: {exc}") from exc
    original = load_model(model)  # model errors first
    out = check_output_path(output, model)
    save_model_atomic(optimize_model(original, shapes, rewrites=rewrites), out, verify=check_emitted)
    if not quiet:
        click.echo(f"wrote {out}")


@cli.command("optimize")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output model [default: MODEL_opt.onnx].")
@options.input_shape
@click.option("--target", default=None, metavar="NAME|FILE",
              help="Apply the stage-1 rewrites of this target, as `quantize --target` does [default: none].")
@options.debug
def optimize(model, output, input_shapes, target, debug):
    """Write the stage-1 optimized float model only."""
    run_guarded(debug, lambda: write_stage1(model, output or default_output(model, "opt"),
                                            options.parse_shapes(input_shapes), target=target))
