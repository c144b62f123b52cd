"""`quantize calibrate MODEL --data DIR --save-calibration state.npz [--shard I/N]`: stage 2
alone, for one shard of the data, so that any scheduler can run the shards; `quantize
--load-calibration` (repeatable) merges their states."""

from __future__ import annotations

import click

from quantizer import pipeline
from quantizer.config import CalibrationInputs, Outputs, QuantizationConfig
from quantizer.errors import UsageError

from .. import options
from ..app import cli, run_guarded
from ..text import format_calibration


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """I/N (I in 0..N-1) -> (I, N)."""
    if text is None:
        return None
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        index, count = int(index), int(count)
    except ValueError:
        raise UsageError(f"--shard expects I/N with I in 0..N-1 (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: I must be in 0..N-1 (shards are numbered from 0), N >= 1")
    return index, count


@cli.command("calibrate")
@click.argument("model", type=click.Path(dir_okay=True))
@options.data
@options.DATA_OPTIONS
@click.option("--save-calibration", type=click.Path(), help="Where to write the calibration state (.npz); required.")
@click.option("--shard", metavar="I/N",
              help="Calibrate only shard I of N (I in 0..N-1): the I-th of N contiguous blocks of the samples, "
                   "in sorted file order (after --shuffle-seed and --max-samples).")
@options.target
@options.exclude
@options.input_shape
@options.equalize
@options.quiet
@options.CLUSTER
@options.debug
def calibrate(model, data, save_calibration, shard, target, exclude, input_shapes, equalize, quiet, workers, scheduler,
              debug, **data_forms):
    """Run stage 2 only (one shard of the data) and save the calibration state; merge the
    shards' states with `quantize MODEL --load-calibration S0 --load-calibration S1 ...`.
    --target, --exclude, --input-shape and --equalize must be those of the later run."""

    def action():
        if not data:
            raise UsageError("--data is required: the calibration samples (a folder, a stacked file or images)")
        if not save_calibration:
            raise UsageError("--save-calibration is required: the state file to write")
        config = QuantizationConfig(input_shapes=options.parse_shapes(input_shapes), target=target, exclude=exclude,
                                    show_progress=False if quiet else None,
                                    **({} if equalize is None else {"equalize": equalize}))
        data_arg = options.data_argument(data, {**data_forms, "shard": parse_shard(shard)})
        with options.cluster(workers, scheduler) as client:
            ctx = pipeline.run(pipeline.new_context(model, config, CalibrationInputs(data_arg),
                                                    Outputs(save_calibration=save_calibration), keep_histograms=True,
                                                    client=client), pipeline.CALIBRATE)
        if not quiet:
            click.echo(format_calibration(ctx, save_calibration, shard))

    run_guarded(debug, action)
