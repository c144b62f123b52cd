"""`quantize compare FLOAT INT8 --data DIR`: the int8 model's outputs against the float
model's over a data set (SQNR, errors, cosine, top-1 agreement, worst samples)."""

from __future__ import annotations

import json
import math

import click

from quantizer.compare import DEFAULT_WORST, compare_models
from quantizer.errors import UsageError

from .. import options
from ..app import cli, run_guarded
from ..text import for_cli, one_line


@cli.command("compare")
@click.argument("float_model", metavar="FLOAT", type=click.Path(dir_okay=True))
@click.argument("int8_model", metavar="INT8", type=click.Path(dir_okay=True))
@options.data
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write the comparison as one self-contained HTML page (tables and SVG charts).")
@click.option("--min-sqnr", "min_sqnr", type=float, default=None, metavar="DB",
              help="Fail (exit 5) when an output's SQNR over all samples is below DB dB. For CI.")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="Compare on the first N samples only [default: all].")
@click.option("--tensors", is_flag=True,
              help="Also compare the intermediate float tensors both models name alike, worst SQNR first.")
@click.option("--worst", type=click.IntRange(min=0), default=DEFAULT_WORST, show_default=True, metavar="K",
              help="Name the K samples with the lowest SQNR of each output.")
@options.debug
def compare(float_model, int8_model, data, as_json, html_file, min_sqnr, max_samples, tensors, worst, debug):
    """Compare INT8 with the FLOAT model it was quantized from on every sample of --data:
    per output SQNR, max/mean abs error, cosine similarity, top-1 agreement ([batch,
    classes] outputs), the worst samples and each model's latency per sample.  Both run in
    onnxruntime as deployed."""

    def action():
        if not data:
            raise UsageError("--data is required: a folder of .npy/.npz samples to compare the models on")
        if min_sqnr is not None and math.isnan(min_sqnr):
            raise UsageError("--min-sqnr must be a number of dB, got nan")
        result = compare_models(float_model, int8_model, data, max_samples=max_samples, tensors=tensors,
                                worst=worst)
        if html_file:
            from quantizer.html_report import comparison_page, write_html

            write_html(html_file, comparison_page(result))
        if as_json:
            click.echo(json.dumps(result.as_dict(), indent=2))
        else:
            click.echo(format_comparison(result))
        if min_sqnr is not None:
            result.check(min_sqnr)

    run_guarded(debug, action)


def _db(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _num(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def format_comparison(result) -> str:
    lines = [f"compared {result.samples} sample(s)"]
    header = ("output", "SQNR dB", "max abs err", "mean abs err", "cosine", "top-1 agreement")
    rows = []
    for o in result.outputs:
        agreement = (f"{o.top1_agreement:.2f}% ({round(o.top1_agreement * o.top1_rows / 100)}/{o.top1_rows})"
                     if o.class_like else "-")
        cosine = f"{o.cosine:.6f}" if math.isfinite(o.cosine) else str(o.cosine)
        rows.append((o.name, _db(o.sqnr_db), _num(o.max_abs_error), _num(o.mean_abs_error), cosine, agreement))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])] + [row[-1]]
        lines.append(one_line("  ".join(cells).rstrip()))
    for o in result.outputs:
        if o.nonfinite:
            lines.append(one_line(f"warning: output '{o.name}': {o.nonfinite} non-finite int8 values where the "
                                  "float model's are finite"))
        if o.worst_samples:
            listed = ", ".join(f"{s.sample} {_db(s.sqnr_db)} dB" for s in o.worst_samples)
            lines.append(one_line(f"worst samples of '{o.name}': {listed}"))
    if result.latency is not None:
        lat = result.latency
        timed = (f"median of {lat.samples} sample(s), the first left out as warm-up" if lat.warmup_excluded
                 else "one sample, warm-up included")
        lines.append(one_line(f"latency per sample ({timed}; both as deployed, on this machine): float "
                              f"{lat.float_seconds * 1e3:.3g} ms, int8 {lat.int8_seconds * 1e3:.3g} ms: "
                              f"{lat.speedup:.2f}x float speed"))
        if lat.speedup < 1:
            lines.append(one_line("note: the int8 model ran slower than float here: onnxruntime's int8 kernels are "
                                  "not faster than its float ones on every CPU (x86 without VNNI, small models); "
                                  "time it where it will be deployed"))
    if result.tensors is not None and result.tensors:
        lines.append("tensors (worst SQNR first; int8 value read where it differs):")
        width = max(len(t.name) for t in result.tensors)
        for t in result.tensors:
            read = f"  (int8: {t.int8_tensor})" if t.int8_tensor != t.name else ""
            lines.append(one_line(f"  {t.name:<{width}}  {_db(t.sqnr_db):>7} dB  max abs err "
                                  f"{_num(t.max_abs_error)}{read}"))
    lines.extend(one_line(f"note: {for_cli(n)}") for n in result.notes)
    return "\n".join(lines)
