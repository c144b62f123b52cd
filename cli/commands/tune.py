"""`quantize tune MODEL --data DIR --eval script.py`: accuracy-driven search."""

from __future__ import annotations

import click

from quantizer.autotune import ALGORITHMS, DEFAULT_METHODS, autotune, script_evaluator
from quantizer.config import Outputs, QuantizationConfig
from quantizer.errors import UsageError

from .. import options
from ..app import cli, default_output, run_guarded
from ..text import algorithm_flag, format_skipped, format_summary, format_trial, trial_setting, warnings


@cli.command("tune")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--eval", "eval_script", type=click.Path(),
              help="Python file defining evaluate(model_path: str) -> float (higher is better).")
@click.option("--tolerable-loss", default=0.01, show_default=True, type=click.FloatRange(min=0),
              help="Accepted relative loss of the metric vs the float model (0.01 = 1 %).")
@click.option("--max-trials", default=10, show_default=True, type=click.IntRange(min=1),
              help="Most quantized models to evaluate.")
@click.option("--calib", "methods", multiple=True, metavar="METHOD", shell_complete=options.complete_method,
              help="Calibration methods to try, in order (repeatable) [default: "
                   + ", ".join(m.lower() for m in DEFAULT_METHODS) + "].")
@click.option("--tune-algorithms", "tune_algorithms", metavar="NAME,...|none",
              help="Accuracy algorithms to try as trials after the methods, before keeping nodes float: "
                   "each alone on the best method, then together; those already on are in every trial "
                   "[default: " + ",".join(map(algorithm_flag, ALGORITHMS)) + "].")
@options.QUANTIZATION
@click.option("--report-samples", default=4, show_default=True, type=click.IntRange(min=1),
              help="Calibration samples for the per-tensor SQNR that ranks the fallback nodes.")
@options.min_sqnr
def tune(model, eval_script, tolerable_loss, max_trials, methods, tune_algorithms, data, output, target, percentage, activation_dtype,
         weight_range, exclude, no_protect, no_protect_normalization, bias_correction, equalize, accuracy_samples,
         smooth_quant, smooth_alpha, smooth_insert, adaround, adaround_iterations, preset, report, quiet,
         input_shapes, strict, fidelity_samples, workers, scheduler, debug, report_samples,
         min_sqnr, **data_forms):
    """Quantize MODEL trying methods, then accuracy algorithms, then 16-bit and float
    fallbacks, until the metric of --eval is within --tolerable-loss of the float model's."""

    def action():
        if not data:
            raise UsageError("--data is required: a folder of .npy/.npz calibration samples")
        if not eval_script:
            raise UsageError("--eval is required: a Python file defining evaluate(model_path: str) -> float")
        algorithms = options.parse_algorithms(tune_algorithms, ALGORITHMS)
        eval_fn = script_evaluator(eval_script)
        out = output or default_output(model, "int8")
        data_arg = options.data_argument(data, data_forms)
        steps = options.accuracy_steps(no_protect_normalization, bias_correction, accuracy_samples, equalize=equalize,
                                       smooth_quant=smooth_quant, smooth_alpha=smooth_alpha, smooth_insert=smooth_insert,
                                       adaround=adaround, adaround_iterations=adaround_iterations, preset=preset)
        with options.cluster(workers, scheduler) as client:
            result = autotune(
                model, data_arg, eval_fn, tolerable_loss, max_trials, list(methods) or list(DEFAULT_METHODS),
                config=QuantizationConfig(**steps) if steps else None,
                input_shapes=options.parse_shapes(input_shapes), target=target, activation_dtype=activation_dtype,
                weight_range=weight_range, exclude=exclude, protect=not no_protect,
                percentage=percentage, report_samples=report_samples,
                show_progress=False if quiet else None,
                outputs=Outputs(model=out, report=report, min_sqnr_db=min_sqnr, fidelity_samples=fidelity_samples),
                strict=strict, client=client, algorithms=algorithms,
                on_trial=None if quiet else lambda trial: click.echo(format_trial(trial, max_trials)),
                on_skip=None if quiet else lambda skipped: click.echo(format_skipped(skipped)))
        best = result.best
        if not quiet:
            click.echo(format_summary(result.summary, out))
            click.echo(f"autotune: float metric {result.baseline:.6g}; chose trial {best.number} "
                       f"({trial_setting(best)}, {len(best.excluded)} fallback nodes float): metric {best.metric:.6g}")
        if not result.passed:
            click.echo(f"warning: no trial within {tolerable_loss:.2%} of the float metric {result.baseline:.6g} "
                       f"after {len(result.trials)} trials; wrote the best one (trial {best.number})", err=True)
        for warning in warnings(result.summary):
            click.echo(warning, err=True)

    run_guarded(debug, action)
