"""`quantize [run] MODEL --calib METHOD --data DIR`: all three stages."""

from __future__ import annotations

import click
from quantizer.model_editor.steps import check_io_names_step, edit_io_step

from quantizer import pipeline
from quantizer.calibration_state import load_ranges
from quantizer.config import CalibrationInputs, Outputs, QuantizationConfig
from quantizer.errors import UsageError

from .. import options
from ..app import cli, default_output, run_guarded
from ..text import format_summary, warnings


@cli.command("run", hidden=True)
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--calib", "method", default="auto", show_default=True, shell_complete=options.complete_method,
              help="Calibration method: " + options.METHODS)
@options.QUANTIZATION
@options.MODE
@click.option("--save-calibration", type=click.Path(), help="Save the calibration state (.npz) for reuse.")
@click.option("--load-calibration", multiple=True, type=click.Path(),
              help="Reuse saved calibration state(s) instead of (or on top of) --data; several are merged.")
@click.option("--save-ranges", type=click.Path(), help="Write the activation ranges as JSON {tensor: [min, max]}.")
@click.option("--ranges", "ranges_file", type=click.Path(), help="Use these JSON ranges; no calibration run.")
@options.input_type
@options.output_type
@click.option("--input-range", "input_ranges", multiple=True, metavar="NAME=MIN,MAX",
              help="Quantize input NAME with this range instead of the calibrated one, e.g. x=0,1 "
                   "for images scaled by 1/255 (raw uint8 pixels then feed --input-type x=uint8).")
@click.option("--wide-tensor", "wide_tensors", multiple=True, metavar="TENSOR",
              help="Quantize this activation tensor at the target's 16 bits (int16 for tflite, or a target "
                   "file's activations.wide_dtype; opset 21) instead of 8 (repeatable; names as the "
                   "per-tensor report shows them).")
@click.option("--optimize-only", is_flag=True, help="Write the stage-1 (optimized float) model only.")
@options.report_samples
@options.min_sqnr
def run(model, method, data, output, target, percentage, activation_dtype, weight_range, exclude, no_protect,
        no_protect_normalization, bias_correction, equalize, accuracy_samples, smooth_quant, smooth_alpha, smooth_insert,
        adaround, adaround_iterations, preset, report, quiet, input_shapes, strict,
        fidelity_samples, workers, scheduler, debug, save_calibration, load_calibration, save_ranges, ranges_file, input_types,
        output_types, input_ranges, optimize_only, report_samples, min_sqnr, mode, weight_bits, block_size,
        weight_symmetric, weight_unsigned, weight_algorithm, no_embeddings, wide_tensors, **data_forms):
    """Optimize, calibrate and quantize MODEL to int8 QDQ ONNX."""

    def action():
        shapes = options.parse_shapes(input_shapes)
        in_types, out_types = options.parse_input_types(input_types), options.parse_output_types(output_types)
        overrides = options.parse_input_ranges(input_ranges)
        if optimize_only:
            if in_types or out_types or overrides:
                raise UsageError("--input-type, --output-type and --input-range need quantization, not --optimize-only")
            from .optimize import write_stage1

            write_stage1(model, output or default_output(model, "opt"), shapes, quiet, target=target)
            return
        modes = options.mode_config(mode, weight_bits, block_size, weight_symmetric, weight_unsigned,
                                    weight_algorithm, no_embeddings)
        config = QuantizationConfig(**modes,
            method=method, percentile=percentage, input_shapes=shapes, target=target,
            activation_dtype=activation_dtype,
            weight_range=weight_range, exclude=exclude, protect=not no_protect,
            report_samples=report_samples if report else 0, range_overrides=overrides,
            show_progress=False if quiet else None, strict=strict, wide_tensors=wide_tensors,
            integer_outputs=tuple(out_types),
            **options.accuracy_steps(no_protect_normalization, bias_correction, accuracy_samples, equalize=equalize,
                                     smooth_quant=smooth_quant, smooth_alpha=smooth_alpha, smooth_insert=smooth_insert,
                                     adaround=adaround, adaround_iterations=adaround_iterations, preset=preset),
        )
        if mode == "static" and not (data or load_calibration or ranges_file):
            raise UsageError("--data is required: a folder of .npy/.npz calibration samples "
                             "(or --load-calibration STATE / --ranges JSON; --mode dynamic and weight-only "
                             "need none)")
        if mode != "static" and (load_calibration or ranges_file or save_calibration or save_ranges or overrides
                                 or in_types or out_types):
            raise UsageError(f"--mode {mode} uses no activation ranges: --load-calibration, --save-calibration, "
                             "--ranges, --save-ranges, --input-range, --input-type and --output-type are for "
                             "--mode static")
        out = output or default_output(model, {"static": "int8", "dynamic": "dynamic"}.get(
            mode, f"w{config.weight_bits}"))
        outputs = Outputs(model=out, report=report, save_ranges=save_ranges, save_calibration=save_calibration,
                          min_sqnr_db=min_sqnr, fidelity_samples=fidelity_samples)
        steps = pipeline.with_steps(pipeline.steps_for(config), "load", [check_io_names_step(in_types, overrides, out_types)])
        if in_types or out_types:
            steps = pipeline.with_steps(steps, "insert_qdq", [edit_io_step(in_types, out_types)])
        inputs = CalibrationInputs(options.data_argument(data, data_forms), tuple(load_calibration),
                                   load_ranges(ranges_file) if ranges_file else None)
        with options.cluster(workers, scheduler) as client:
            ctx = pipeline.run(pipeline.new_context(model, config, inputs, outputs, client=client), steps)
        if not quiet:
            click.echo(format_summary(ctx.summary, out))
        for warning in warnings(ctx.summary):
            click.echo(warning, err=True)

    run_guarded(debug, action)
