"""The `quantize` command line.

    quantize MODEL --calib min_max_asym --data ./calib -o model_int8.onnx
    quantize optimize MODEL -o model_opt.onnx

Every failure we can explain is one line on stderr and a documented exit code; a
traceback only with --debug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from quantizer.calibrators import CalibrationMethod
from quantizer.errors import QuantizerError, UsageError
from quantizer.model_io import check_output_path, load_model, save_model_atomic

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


class _DefaultToRun(click.Group):
    """`quantize MODEL ...` means `quantize run MODEL ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    shapes = {}
    for text in values:
        name, sep, dims = text.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise UsageError(f"--input-shape expects NAME:D1,D2,... (e.g. x:1,3,224,224), got '{text}'") from None
    return shapes


def _run_guarded(debug: bool, action) -> None:
    """Run ``action``; map failures to one line and an exit code."""
    try:
        action()
    except QuantizerError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: no output written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug of ours: still one line unless --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"internal error: {type(exc).__name__}: {first} (rerun with --debug for details)", err=True)
        sys.exit(EXIT_INTERNAL)


def _default_output(model: str, suffix: str) -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}_{suffix}.onnx")


def _format_summary(summary: dict, output: Path) -> str:
    nodes = summary["nodes"]
    by_op = ", ".join(f"{op} {n}" for op, n in nodes["quantized_by_op"].items())
    lines = [
        f"wrote {output}",
        f"nodes: {nodes['original']} original, {nodes['optimized']} after optimization, "
        f"{nodes['quantized']} quantized ({by_op})",
    ]
    if nodes["activations_folded_into_q"]:
        lines.append(f"  {nodes['activations_folded_into_q']} Relu/Clip folded into the following quantize")
    reasons: dict[str, list[str]] = {}
    for entry in nodes["float"]:
        reasons.setdefault(entry["reason"], []).append(entry["node"])
    if reasons:
        lines.append(f"left float: {len(nodes['float'])} nodes")
        for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
            lines.append(f"  {len(names):4d} x {reason}: {shown}")
    size = summary["size_bytes"]
    lines.append(f"size: {size['before'] / 1e6:.2f} MB -> {size['after'] / 1e6:.2f} MB")
    calib = summary.get("calibration")
    if calib:
        lines.append(
            f"calibration: {calib['method'].lower()} over {calib['samples']} samples, {calib['tensors']} tensors"
        )
        for name, count in calib["nonfinite_values"].items():
            lines.append(f"  warning: {count} NaN/Inf values in '{name}' were ignored")
    lines.append(f"weights: int8 {summary['weight_range']} range; activations: {summary['activation_dtype']}")
    lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in summary["seconds"].items()))
    lines.extend(f"note: {note}" for note in summary.get("notes", []))
    return "\n".join(lines)


def _write_report(path: str | None, summary: dict) -> None:
    if path:
        check_output_path(path, None)
        Path(path).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


_COMMON = [
    click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
                 help="Fix a dynamic input shape, e.g. x:1,3,224,224 (repeatable)."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
]


def _common(func):
    for option in reversed(_COMMON):
        func = option(func)
    return func


@click.group(cls=_DefaultToRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-int8-quantizer")
def cli():
    """ONNX int8 quantizer.  `quantize MODEL --calib METHOD --data DIR` runs all stages."""


@cli.command("run")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--calib", "method", default="min_max_asym", show_default=True,
              help="Calibration method: " + ", ".join(m.value.lower() for m in CalibrationMethod))
@click.option("--data", "data", type=click.Path(), help="Folder of .npy (single input) or .npz (keyed by input name) samples.")
@click.option("-o", "--output", type=click.Path(), help="Output model [default: MODEL_int8.onnx].")
@click.option("--percentile", "percentage", default=99.99, show_default=True, type=float,
              help="Percentile for the PERCENTILE methods.")
@click.option("--activation-dtype", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True)
@click.option("--weight-range", type=click.Choice(["auto", "full", "reduced"]), default="auto", show_default=True,
              help="full: [-127,127]; reduced: [-63,63], exact on x86 without VNNI; auto picks for this CPU.")
@click.option("--exclude", multiple=True, metavar="NODE", help="Keep this node float (repeatable).")
@click.option("--save-calibration", type=click.Path(), help="Save the calibration state (.npz) for reuse.")
@click.option("--load-calibration", multiple=True, type=click.Path(),
              help="Reuse saved calibration state(s) instead of (or on top of) --data; several are merged.")
@click.option("--save-ranges", type=click.Path(), help="Write the activation ranges as JSON {tensor: [min, max]}.")
@click.option("--ranges", "ranges_file", type=click.Path(), help="Use these JSON ranges; no calibration run.")
@click.option("--optimize-only", is_flag=True, help="Write the stage-1 (optimized float) model only.")
@click.option("--report", type=click.Path(), help="Write the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@_common
def run(model, method, data, output, percentage, activation_dtype, weight_range, exclude,
        save_calibration, load_calibration, save_ranges, ranges_file,
        optimize_only, report, quiet, input_shapes, debug):
    """Optimize, calibrate and quantize MODEL to int8 QDQ ONNX."""

    def action():
        from quantizer.optimize import optimize_model
        from quantizer.pipeline import quantize_model

        load_model(model)  # model errors first, before anything else is checked
        out = check_output_path(output or _default_output(model, "opt" if optimize_only else "int8"), model)
        shapes = _parse_shapes(input_shapes)
        if optimize_only:
            save_model_atomic(optimize_model(model, shapes), out)
            if not quiet:
                click.echo(f"wrote {out}")
            return
        from quantizer.calibration_state import load_ranges, save_ranges as write_ranges

        calib = CalibrationMethod.parse(method)
        if not (data or load_calibration or ranges_file):
            raise UsageError("--data is required: a folder of .npy/.npz calibration samples "
                             "(or --load-calibration STATE / --ranges JSON)")
        if not 0 < percentage <= 100:
            raise UsageError(f"--percentile must be in (0, 100], got {percentage}")
        for path in (save_calibration, save_ranges, report):
            if path:
                check_output_path(path, model)
        result = quantize_model(
            model, data, calib, percentage=percentage, input_shapes=shapes,
            activation_dtype=activation_dtype, weight_range=weight_range, exclude=exclude,
            show_progress=False if quiet else None, load_calibration=load_calibration,
            save_calibration=save_calibration, ranges=load_ranges(ranges_file) if ranges_file else None,
        )
        if save_ranges:
            write_ranges(result.ranges, save_ranges)
        size = save_model_atomic(result.model, out)
        result.summary["size_bytes"]["after"] = size
        result.summary["output"] = str(out)
        _write_report(report, result.summary)
        if not quiet:
            click.echo(_format_summary(result.summary, out))

    _run_guarded(debug, action)


@cli.command("optimize")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output model [default: MODEL_opt.onnx].")
@_common
def optimize(model, output, input_shapes, debug):
    """Write the stage-1 optimized float model only."""

    def action():
        from quantizer.optimize import optimize_model

        load_model(model)
        out = check_output_path(output or _default_output(model, "opt"), model)
        save_model_atomic(optimize_model(model, _parse_shapes(input_shapes)), out)
        click.echo(f"wrote {out}")

    _run_guarded(debug, action)


def main() -> None:
    cli(prog_name="quantize")


if __name__ == "__main__":
    main()
