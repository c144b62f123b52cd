"""Where PP-OCRv5 det loses its output SQNR (issue: accuracy algorithms, the 20 dB target).

Quantizes det with the default command and, on a copy of the target that declares uint16
as its 16-bit activation type (benchmarks/targets/ort-cpu-u16.toml), with chosen tensors at
16 bits: every activation (the bound 8-bit weights leave), and the first cancellation chain
(a Conv output of range [-268, 220], the HardSwish and affine block after it, and the
input of the 1x1 Conv that cancels it down to +-0.2).  Reports the output SQNR on the
accuracy suite's det eval pages, the per-tensor SQNR along that chain against the
stage-1 float model (also with that 1x1 Conv kept float), and the latency of each model
(median of interleaved runs on one page).

    pip install -e ".[bench]"
    flock /work/bench.lock python benchmarks/bench_det_precision.py [--write]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_accuracy import SIZES, session, sqnr_db  # noqa: E402
from common import cpu_model, git_head, publish  # noqa: E402
from tasks import TASKS  # noqa: E402

SECTION = "## PP-OCRv5 det: where the output SQNR goes (issue: accuracy algorithms)"
WIDE_TARGET = HERE / "targets" / "ort-cpu-u16.toml"
# The first chain of the backbone (stage-1 names): Conv output -> HardSwish -> affine -> 1x1 Conv input.
CHAIN = ("Add.9", "p2o.pd_op.hardswish.1.0", "Add.11")
CANCELLING = "Conv.3"  # the 1x1 Conv reading Add.11; its output Add.15 spans +-0.2
WATCHED = (*CHAIN, "Add.15", "Add.19", "Add.21")


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o for n in copy.graph.node for o in n.output}
    for name in names:
        if name in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    from quantizer import quantize_model
    from quantizer.config import QuantizationConfig
    from quantizer.optimize import optimize_model
    from quantizer.targets import load_target

    task = TASKS["det"]
    work = Path(tempfile.mkdtemp(prefix="bench-det-precision-"))
    info = task.build(work, *SIZES["det"])
    pages = [np.load(f) for f in sorted(work.glob("eval_*.npy"))]
    model_path, calib = str(task.model_path()), str(work / "calib")
    float_session = session(model_path)
    reference = [float_session.run(None, {"x": x})[0] for x in pages]

    def quantized(**params):
        start = time.perf_counter()
        result = quantize_model(model_path, calib, config=QuantizationConfig(**params), show_progress=False)
        return result.model, time.perf_counter() - start

    models, seconds = {}, {}
    models["default (auto, ort-cpu)"], seconds["default (auto, ort-cpu)"] = quantized()
    base, _ = quantized(target=str(WIDE_TARGET))
    every = tuple(sorted({n.input[0] for n in base.graph.node if n.op_type == "QuantizeLinear"}))
    label = f"every activation 16-bit ({len(every)} tensors)"
    models[label], seconds[label] = quantized(target=str(WIDE_TARGET), wide_tensors=every)
    label = "the first cancellation chain 16-bit (3 tensors)"
    models[label], seconds[label] = quantized(target=str(WIDE_TARGET), wide_tensors=CHAIN)
    label = f"{CANCELLING} (the cancelling 1x1 Conv) kept float"
    models[label], seconds[label] = quantized(exclude=(CANCELLING,))

    sessions = {"float": float_session, **{k: session(m) for k, m in models.items()}}
    times = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"x": pages[0]})
            times[k].append(time.perf_counter() - start)
    rows = []
    for k, s in sessions.items():
        if k == "float":
            continue
        outputs = [s.run(None, {"x": x})[0] for x in pages]
        rows.append(f"| {k} | {sqnr_db(reference, outputs):.2f} | {np.median(times[k]) * 1e3:.1f} "
                    f"({np.median(times['float']) / np.median(times[k]):.2f}x) | {seconds[k]:.1f} |")

    # Per-tensor SQNR along the chain, against the stage-1 float model, on the first page.
    target = load_target("ort-cpu").choose(None, None)
    stage1 = optimize_model(model_path, rewrites=target.rewrites)
    feed = {"x": pages[0]}
    ref_session = session(with_outputs(stage1, WATCHED))
    ref = dict(zip([o.name for o in ref_session.get_outputs()], ref_session.run(None, feed)))
    chain_rows = []
    for k in ("default (auto, ort-cpu)", f"{CANCELLING} (the cancelling 1x1 Conv) kept float"):
        s = session(with_outputs(models[k], WATCHED))
        values = dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))
        cells = [f"{sqnr_db([ref[n]], [values[n]]):.1f}" if n in values and n in ref else "-" for n in WATCHED]
        chain_rows.append(f"| {k} | " + " | ".join(cells) + " |")
    ranges = {n: (float(ref[n].min()), float(ref[n].max())) for n in WATCHED if n in ref}

    lines = [SECTION, "",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; quantizer git "
             f"{git_head()}; {cpu_model()}, Python {platform.python_version()}, onnxruntime "
             f"{__import__('onnxruntime').__version__}",
             "- Command: `flock /work/bench.lock python benchmarks/bench_det_precision.py --write`",
             f"- Data: the accuracy suite's det data ({info['calib']}; SQNR over {info['eval']}); latency: one "
             f"page, median of {args.rounds} interleaved runs; 16-bit tensors use `{WIDE_TARGET.name}` (ort-cpu "
             "with uint16 as its 16-bit type: onnxruntime runs the ops next to a 16-bit tensor in float)", "",
             "| model | output SQNR dB | latency ms (x float speed) | quantize s |", "|---|---|---|---|",
             f"| float | | {np.median(times['float']) * 1e3:.1f} (1.00x) | |", *rows, "",
             "Per-tensor SQNR dB against the stage-1 float model on the first eval page, along the first chain "
             "(float ranges on that page: " + ", ".join(f"{n} [{lo:.3g}, {hi:.3g}]" for n, (lo, hi) in ranges.items())
             + "):", "",
             "| model | " + " | ".join(WATCHED) + " |", "|---|" + "---|" * len(WATCHED), *chain_rows, ""]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
