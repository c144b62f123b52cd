"""The `quantize` command line.

    quantize MODEL --calib min_max_asym --data ./calib -o model_int8.onnx
    quantize optimize MODEL -o model_opt.onnx
    quantize edit model_int8.onnx --input-type x=uint8 --output-type y=int8 -o model_npu.onnx

Every failure we can explain is one line on stderr and a documented exit code; a
traceback only with --debug.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import warnings
from pathlib import Path

import click

from quantizer.calibrators import CalibrationMethod
from quantizer.errors import ModelError, QuantizerError, UsageError
from quantizer.model_io import check_output_path, load_model, save_model_atomic
from quantizer.report import DEFAULT_REPORT_SAMPLES, report_lines
from quantizer.verify import DEFAULT_MIN_SQNR_DB, WrittenModelCheck, check_emitted, first_sample

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


def _split_assignment(text: str, option: str, form: str) -> tuple[str, str]:
    name, sep, value = text.rpartition("=")
    if not sep or not name or not value:
        raise UsageError(f"{option} expects {form}, got '{text}'")
    return name, value


def _parse_range(text: str, option: str, form: str, whole: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{option} expects {form}, got '{whole}'") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise UsageError(f"{option}: range must be finite with MIN <= MAX, got '{whole}'")
    return low, high


def _tensor_type(text: str, option: str, whole: str) -> str:
    if text.lower() not in ("uint8", "int8"):
        raise UsageError(f"{option} {whole}: unsupported type '{text}'; use uint8 or int8")
    return text.lower()


def _parse_input_types(values: tuple[str, ...]) -> dict[str, str]:
    types = {}
    for text in values:
        name, value = _split_assignment(text, "--input-type", "NAME=uint8|int8 (e.g. x=uint8)")
        types[name] = _tensor_type(value, "--input-type", text)
    return types


def _parse_output_types(values: tuple[str, ...]) -> dict[str, tuple[str, tuple[float, float] | None]]:
    form = "NAME=uint8|int8[:MIN,MAX] (e.g. logits=int8 or logits=int8:-10,10)"
    types = {}
    for text in values:
        name, value = _split_assignment(text, "--output-type", form)
        dtype, sep, range_text = value.partition(":")
        tensor_range = _parse_range(range_text, "--output-type", form, text) if sep else None
        types[name] = (_tensor_type(dtype, "--output-type", text), tensor_range)
    return types


def _parse_input_ranges(values: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    form = "NAME=MIN,MAX (e.g. x=0,1)"
    ranges = {}
    for text in values:
        name, value = _split_assignment(text, "--input-range", form)
        ranges[name] = _parse_range(value, "--input-range", form, text)
    return ranges


def _check_io_names(model, inputs, outputs) -> None:
    """Refuse unknown input/output names before a long calibration run."""
    from quantizer.model_editor import get_output_names, get_pure_input_names

    valid_inputs, valid_outputs = get_pure_input_names(model), get_output_names(model)
    for option, names in inputs.items():
        for name in names:
            if name not in valid_inputs:
                raise UsageError(f"{option}: unknown input '{name}'; the model's inputs are: {', '.join(valid_inputs)}")
    for name in outputs:
        if name not in valid_outputs:
            raise UsageError(f"--output-type: unknown output '{name}'; the model's outputs are: {', '.join(valid_outputs)}")


def _edit_io(model, input_types: dict, output_types: dict) -> list:
    """Convert the requested inputs/outputs to integers; returns their parameters."""
    import onnx

    from quantizer.model_editor import ModelEditor

    editor = ModelEditor(model)
    for name, dtype in input_types.items():
        editor.convert_input_type(name, dtype)
    for name, (dtype, tensor_range) in output_types.items():
        editor.convert_output_type(name, dtype, tensor_range)
    try:
        onnx.checker.check_model(editor.model, full_check=True)
    except Exception as exc:
        raise ModelError(f"internal: the edited model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return [io.as_dict() for io in editor.edited]


def _format_io(edited: list[dict]) -> list[str]:
    from quantizer.model_editor import QuantizedIO

    if not edited:
        return []
    lines = ["integer inputs/outputs (real = scale * (q - zero_point); also in the model metadata):"]
    lines.extend(f"  {QuantizedIO(**io).describe()}" for io in edited)
    return lines


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    if not quiet:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _run_guarded(debug: bool, action) -> None:
    """Run ``action``; map failures to one line and an exit code.  Without --debug, library
    log records and Python warnings (onnx-ir, numpy) are silenced: stderr is ours."""
    try:
        with _quiet_libraries(not debug):
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
        for name, (low, high) in calib.get("overridden", {}).items():
            lines.append(f"  range of '{name}' set to [{low:g}, {high:g}] (--input-range)")
        for name, count in calib["nonfinite_values"].items():
            lines.append(f"  warning: {count} NaN/Inf values in '{name}' were ignored")
    lines.append(f"weights: int8 {summary['weight_range']} range; activations: {summary['activation_dtype']}")
    lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in summary["seconds"].items()))
    lines.extend(f"note: {note}" for note in summary.get("notes", []))
    lines.extend(_format_io(summary.get("io", [])))
    lines.extend(report_lines(summary))
    return "\n".join(lines)


def _note_fidelity(summary: dict, check) -> str | None:
    """Record the post-write fidelity check in the summary; return the warning, if any."""
    fidelity = check.fidelity
    if check.error:
        summary["notes"].append(check.error)
    if fidelity is None:
        if check.sample is None:
            summary["notes"].append("fidelity check skipped: no calibration samples (--data) to run")
        return None
    summary["fidelity"] = fidelity.as_dict()
    if fidelity.sqnr_db:
        values = ", ".join(f"{name} {value:.1f} dB" for name, value in fidelity.sqnr_db.items())
        summary["notes"].append(f"fidelity on calibration sample {fidelity.sample}: output SQNR {values}")
    warning = fidelity.warning()
    if warning:
        summary["notes"].append(f"warning: {warning}")
    return warning


def _write_report(path: str | None, summary: dict) -> None:
    if path:
        check_output_path(path, None)
        Path(path).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


_COMMON = [
    click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
                 help="Fix a dynamic input shape, e.g. x:1,3,224,224 (repeatable)."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
]


def _io_type_options(func):
    """--input-type / --output-type, shared by `run` and `edit`."""
    func = click.option("--output-type", "output_types", multiple=True, metavar="NAME=TYPE[:MIN,MAX]",
                        help="Make output NAME uint8/int8 (its DequantizeLinear removed); with MIN,MAX "
                             "requantize it to that range first (repeatable).")(func)
    return click.option("--input-type", "input_types", multiple=True, metavar="NAME=TYPE",
                        help="Make input NAME uint8/int8: the caller feeds the quantized tensor "
                             "(its QuantizeLinear removed) (repeatable).")(func)


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
@click.option("--exclude", multiple=True, metavar="NAME|OPTYPE|GLOB",
              help="Keep float the nodes whose name or op type matches (fnmatch glob; repeatable).")
@click.option("--no-protect", is_flag=True,
              help="Do not keep float the Concat/Split/... nodes whose shared scale would crush a tensor.")
@click.option("--save-calibration", type=click.Path(), help="Save the calibration state (.npz) for reuse.")
@click.option("--load-calibration", multiple=True, type=click.Path(),
              help="Reuse saved calibration state(s) instead of (or on top of) --data; several are merged.")
@click.option("--save-ranges", type=click.Path(), help="Write the activation ranges as JSON {tensor: [min, max]}.")
@click.option("--ranges", "ranges_file", type=click.Path(), help="Use these JSON ranges; no calibration run.")
@_io_type_options
@click.option("--input-range", "input_ranges", multiple=True, metavar="NAME=MIN,MAX",
              help="Quantize input NAME with this range instead of the calibrated one, e.g. x=0,1 "
                   "for images scaled by 1/255 (raw uint8 pixels then feed --input-type x=uint8).")
@click.option("--optimize-only", is_flag=True, help="Write the stage-1 (optimized float) model only.")
@click.option("--report", type=click.Path(), help="Write the summary as JSON, with per-tensor SQNR.")
@click.option("--report-samples", default=DEFAULT_REPORT_SAMPLES, show_default=True, type=click.IntRange(min=0),
              help="Calibration samples for the per-tensor SQNR of --report (0: skip it).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@click.option("--min-sqnr", default=DEFAULT_MIN_SQNR_DB, show_default=True, type=float, metavar="DB",
              help="Warn (not fail) when an output of the written model has a lower SQNR (dB) vs the "
                   "float model on the first calibration sample.")
@_common
def run(model, method, data, output, percentage, activation_dtype, weight_range, exclude,
        save_calibration, load_calibration, save_ranges, ranges_file, input_types, output_types,
        input_ranges, optimize_only, report, quiet, input_shapes, debug, no_protect=False,
        report_samples=DEFAULT_REPORT_SAMPLES, min_sqnr=DEFAULT_MIN_SQNR_DB):
    """Optimize, calibrate and quantize MODEL to int8 QDQ ONNX."""

    def action():
        from quantizer.optimize import optimize_model
        from quantizer.pipeline import quantize_model

        original = load_model(model)  # model errors first, before anything else is checked
        out = check_output_path(output or _default_output(model, "opt" if optimize_only else "int8"), model)
        shapes = _parse_shapes(input_shapes)
        in_types, out_types = _parse_input_types(input_types), _parse_output_types(output_types)
        overrides = _parse_input_ranges(input_ranges)
        if optimize_only and (in_types or out_types or overrides):
            raise UsageError("--input-type, --output-type and --input-range need quantization, not --optimize-only")
        _check_io_names(original, {"--input-type": in_types, "--input-range": overrides}, out_types)
        if optimize_only:
            save_model_atomic(optimize_model(model, shapes), out, verify=check_emitted)
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
            range_overrides=overrides, protect=not no_protect,
            report_samples=report_samples if report else 0,
        )
        if in_types or out_types:
            result.summary["io"] = _edit_io(result.model, in_types, out_types)
        if save_ranges:
            write_ranges(result.ranges, save_ranges)
        check = WrittenModelCheck(result.model, model, first_sample(data, original), min_sqnr)
        size = save_model_atomic(result.model, out, verify=check)
        result.summary["size_bytes"]["after"] = size
        result.summary["output"] = str(out)
        warning = _note_fidelity(result.summary, check)
        _write_report(report, result.summary)
        if not quiet:
            click.echo(_format_summary(result.summary, out))
        if warning:
            click.echo(f"warning: {warning}", err=True)

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
        save_model_atomic(optimize_model(model, _parse_shapes(input_shapes)), out, verify=check_emitted)
        click.echo(f"wrote {out}")

    _run_guarded(debug, action)


@cli.command("edit")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), help="Output model [default: MODEL_edited.onnx].")
@_io_type_options
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def edit(model, output, input_types, output_types, quiet, debug):
    """Make inputs/outputs of an already quantized MODEL uint8/int8 (for NPUs)."""

    def action():
        proto = load_model(model)
        out = check_output_path(output or _default_output(model, "edited"), model)
        in_types, out_types = _parse_input_types(input_types), _parse_output_types(output_types)
        if not (in_types or out_types):
            raise UsageError("nothing to edit: give --input-type NAME=uint8|int8 and/or --output-type NAME=uint8|int8")
        edited = _edit_io(proto, in_types, out_types)
        save_model_atomic(proto, out, verify=check_emitted)
        if not quiet:
            click.echo("\n".join([f"wrote {out}", *_format_io(edited)]))

    _run_guarded(debug, action)


@cli.command("tune")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--data", "data", type=click.Path(), help="Folder of .npy/.npz calibration samples.")
@click.option("--eval", "eval_script", type=click.Path(),
              help="Python file defining evaluate(model_path: str) -> float (higher is better).")
@click.option("--tolerable-loss", default=0.01, show_default=True, type=click.FloatRange(min=0),
              help="Accepted relative loss of the metric vs the float model (0.01 = 1 %).")
@click.option("--max-trials", default=10, show_default=True, type=click.IntRange(min=1),
              help="Most quantized models to evaluate.")
@click.option("--calib", "methods", multiple=True, metavar="METHOD",
              help="Calibration methods to try, in order (repeatable) [default: min_max_asym, "
                   "percentile_asym, entropy_asym, mse_asym, sqnr_asym].")
@click.option("-o", "--output", type=click.Path(), help="Output model [default: MODEL_int8.onnx].")
@click.option("--percentile", "percentage", default=99.99, show_default=True, type=float,
              help="Percentile for the PERCENTILE methods.")
@click.option("--activation-dtype", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True)
@click.option("--weight-range", type=click.Choice(["auto", "full", "reduced"]), default="auto", show_default=True)
@click.option("--exclude", multiple=True, metavar="NAME|OPTYPE|GLOB", help="Keep matching nodes float in every trial.")
@click.option("--no-protect", is_flag=True, help="No automatic protection of crushed shared-scale tensors.")
@click.option("--report", type=click.Path(), help="Write the summary and every trial as JSON.")
@click.option("--report-samples", default=DEFAULT_REPORT_SAMPLES, show_default=True, type=click.IntRange(min=1),
              help="Calibration samples for the per-tensor SQNR that ranks the fallback nodes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, no summary.")
@_common
def tune(model, data, eval_script, tolerable_loss, max_trials, methods, output, percentage, activation_dtype,
         weight_range, exclude, no_protect, report, report_samples, quiet, input_shapes, debug):
    """Quantize MODEL trying methods, then float fallbacks, until the metric of --eval is
    within --tolerable-loss of the float model's."""

    def action():
        from quantizer.autotune import DEFAULT_METHODS, autotune, script_evaluator

        load_model(model)
        out = check_output_path(output or _default_output(model, "int8"), model)
        if not data:
            raise UsageError("--data is required: a folder of .npy/.npz calibration samples")
        if not eval_script:
            raise UsageError("--eval is required: a Python file defining evaluate(model_path: str) -> float")
        if not 0 < percentage <= 100:
            raise UsageError(f"--percentile must be in (0, 100], got {percentage}")
        if report:
            check_output_path(report, model)
        tried = [CalibrationMethod.parse(m) for m in methods] or list(DEFAULT_METHODS)
        eval_fn = script_evaluator(eval_script)

        def show(trial):
            if not quiet:
                loss = f", loss {trial.loss:.2%}" if trial.loss is not None else ""
                kept = f", float: {', '.join(trial.excluded)}" if trial.excluded else ""
                click.echo(f"trial {trial.number}/{max_trials}: {trial.method.lower()}{kept}: metric "
                           f"{trial.metric:.6g}{loss} -> {'pass' if trial.passed else 'fail'}")

        result = autotune(model, data, eval_fn, tolerable_loss, max_trials, tried,
                          input_shapes=_parse_shapes(input_shapes), activation_dtype=activation_dtype,
                          weight_range=weight_range, exclude=exclude, protect=not no_protect,
                          percentage=percentage, report_samples=report_samples,
                          show_progress=False if quiet else None, on_trial=show)
        result.summary["size_bytes"]["after"] = save_model_atomic(result.model, out, verify=check_emitted)
        result.summary["output"] = str(out)
        _write_report(report, result.summary)
        best = result.best
        if not quiet:
            click.echo(_format_summary(result.summary, out))
            click.echo(f"autotune: float metric {result.baseline:.6g}; chose trial {best.number} "
                       f"({best.method.lower()}, {len(best.excluded)} fallback nodes float): metric {best.metric:.6g}")
        if not result.passed:
            click.echo(f"warning: no trial within {tolerable_loss:.2%} of the float metric {result.baseline:.6g} "
                       f"after {len(result.trials)} trials; wrote the best one (trial {best.number})", err=True)

    _run_guarded(debug, action)


def main() -> None:
    cli(prog_name="quantize")


if __name__ == "__main__":
    main()
