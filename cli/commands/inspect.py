"""`quantize inspect MODEL`: what would be quantized, before any data."""

from __future__ import annotations

import collections
import json

import click

from quantizer.inspect import inspect_model

from .. import options
from ..app import cli, run_guarded
from ..text import for_cli


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=True))
@options.target
@options.exclude
@options.input_shape
@options.MODE
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
@options.debug
def inspect(model, target, exclude, input_shapes, as_json, debug, mode, weight_bits, block_size, weight_symmetric,
            weight_unsigned, weight_algorithm, no_embeddings):
    """Show MODEL's inputs/outputs and, for every node of the optimized model (under the
    names --exclude matches), whether it would be quantized or kept float and why.
    No calibration data needed."""

    def action():
        result = inspect_model(model, target=target, exclude=exclude, input_shapes=options.parse_shapes(input_shapes),
                               **options.mode_config(mode, weight_bits, block_size, weight_symmetric,
                                                     weight_unsigned, weight_algorithm, no_embeddings))
        if as_json:
            click.echo(json.dumps(result.as_dict(), indent=2))
            return
        click.echo(format_inspection(result))

    run_guarded(debug, action)


def _shape(shape) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def format_inspection(result) -> str:
    t = result.target
    lines = [f"target: {t['name']}" + (f" (for {t['requested']})" if t["requested"] != t["name"] else "")
             + (f"; activations {t['activations']['dtype']}, weights int8 {t['weights']['range']}"
                if result.mode == "static" else f"; mode {result.mode}")]
    lines += [f"input  {i.name}: {i.dtype}{_shape(i.shape)}" for i in result.inputs]
    lines += [f"output {o.name}: {o.dtype}{_shape(o.shape)}" for o in result.outputs]
    lines.append(f"nodes: {result.original_nodes} original, {len(result.nodes)} after optimization: "
                 f"{result.count('quantized')} quantized, {result.count('folded')} folded into a quantize, "
                 f"{result.count('float')} float; {result.calibrated_tensors} tensors to calibrate")
    header = "name (--exclude matches it)"
    width = max([len(header)] + [len(n.name) for n in result.nodes])
    ops = max((len(n.op_type) for n in result.nodes), default=4)
    lines.append(f"  {header:<{width}}  {'op':<{ops}}  decision")
    for n in result.nodes:
        what = n.decision if n.decision != "float" else f"float: {for_cli(n.reason)}"
        if n.form and result.mode != "static":
            what = n.form
        lines.append(f"  {n.name:<{width}}  {n.op_type:<{ops}}  {what}")
    reasons = collections.Counter(n.reason for n in result.nodes if n.decision == "float")
    if reasons:
        lines.append("float by reason: " + "; ".join(f"{c} x {for_cli(r)}" for r, c in reasons.most_common()))
    lines.extend(f"note: {for_cli(n)}" for n in result.notes)
    return "\n".join(lines)
