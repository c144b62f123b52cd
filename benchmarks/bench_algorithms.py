"""Accuracy algorithms, one at a time (issue: accuracy algorithms): task metric, output SQNR
and quantize time of each configuration on the models of the accuracy suite.

Every configuration is a set of QuantizationConfig parameters (CONFIGS); the table has one
row per model and configuration, so each algorithm's contribution reads off as the
difference between two rows (the ablation).  Data comes from benchmarks/tasks.py, as in
bench_accuracy.py; ``--work DIR`` keeps it between runs.

    pip install -e ".[bench]"; apt install espeak-ng
    python benchmarks/bench_algorithms.py [--models det,rec] [--configs default,auto]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_accuracy import SIZES, read_samples, session, sqnr_db
from common import cpu_model, git_head, write_results_section
from tasks import TASKS

HERE = Path(__file__).resolve().parent
SECTION = "## Accuracy algorithms: ablation on the accuracy suite (issue: accuracy algorithms)"
# name -> QuantizationConfig parameters (the rest are the defaults).
CONFIGS = {
    "min_max_asym": {"method": "min_max_asym", "bias_correction": False},  # the default before this change
    "entropy_asym": {"method": "entropy_asym", "bias_correction": False},
    "mse_asym": {"method": "mse_asym", "bias_correction": False},
    "percentile_asym": {"method": "percentile_asym", "bias_correction": False},
    "auto without bias correction": {"method": "auto", "bias_correction": False},
    "mse_asym + bias correction": {"method": "mse_asym"},
    "default": {},  # auto + bias correction (checked)
    "no normalization protection": {"protect_normalization": False},
    "accuracy samples 4": {"accuracy_samples": 4},  # the default on half its samples (the default before 8)
    "equalize": {"equalize": True},  # default + cross-layer equalization with high-bias absorption
    "no smooth quant": {"smooth_quant": False},  # without SmoothQuant (the default since it measured as no gain)
    "smooth quant": {"smooth_quant": True},  # default + SmoothQuant (checked)
    "smooth quant alpha 0.5": {"smooth_quant": True, "smooth_alpha": 0.5},  # the paper's default, no search
    "smooth quant with inserted Mul": {"smooth_quant": True, "smooth_insert": True},  # also where no fold exists
    "adaround": {"adaround": True},  # auto + AdaRound (checked) + bias correction: --preset accurate
    # the default on a copy of the default target that quantizes every tensor of a quantized op
    # (the placement before "only what an integer op reads")
    "every tensor quantized": {"target": str(HERE / "targets" / "ort-cpu-every-tensor.toml")},
}
DEFAULT_CONFIGS = "min_max_asym,entropy_asym,mse_asym,percentile_asym,auto without bias correction,default"


def cosine(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Mean cosine similarity to float of each output's rows (axis 0), all outputs pooled;
    a 1-D output is one row (the cosine of a single value is only its sign)."""
    values = []
    for f, q in zip(reference, outputs):
        if f.ndim < 2:  # one sequence (a VAD's frame probabilities): one row, not one per value
            f, q = f[None], q[None]
        f, q = f.reshape(len(f), -1).astype(np.float64), q.reshape(len(q), -1).astype(np.float64)
        norms = np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1)
        values.extend(np.sum(f * q, axis=1) / np.where(norms > 0, norms, 1.0))
    return float(np.mean(values))


def evaluate(name: str, task, work: Path, configs: list[str]) -> list[dict]:
    from quantizer import quantize_model
    from quantizer.config import QuantizationConfig

    model = str(task.model_path())
    float_session = session(model)
    float_metric, float_outputs = task.evaluate(float_session, work)
    names = [i.name for i in float_session.get_inputs()]
    infer = time.perf_counter()
    for feed in read_samples(work / "calib", names):
        float_session.run(None, feed)
    infer = time.perf_counter() - infer
    rows = [{"model": name, "config": "float", "metric": float_metric, "sqnr_db": None, "seconds": None,
             "infer_seconds": infer}]
    for label in configs:
        params = {"show_progress": False, **CONFIGS[label]}
        start = time.perf_counter()
        try:
            result = quantize_model(model, str(work / "calib"), config=QuantizationConfig(**{
                k: v for k, v in params.items() if k != "show_progress"}), show_progress=False)
        except Exception as exc:  # a configuration that fails is a row too
            rows.append({"model": name, "config": label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"[{name}] {label}: FAILED {exc}", flush=True)
            continue
        seconds = time.perf_counter() - start
        metric, outputs = task.evaluate(session(result.model), work)
        row = {"model": name, "config": label, "metric": metric, "sqnr_db": sqnr_db(float_outputs, outputs),
               "cosine": cosine(float_outputs, outputs),
               "seconds": seconds, "changed": {s["step"]: s["changed"] for s in result.summary["steps"]
                                               if s["step"] in ("choose_ranges", "correct_bias", "equalize", "absorb_high_bias", "check_equalization",
                                                                 "smooth_quant", "adaround", "check_adaround",
                                                                "keep_normalization_float") and s["changed"]}}
        rows.append(row)
        print(f"[{name}] {label}: {task.metric} {metric:.3f}, SQNR {row['sqnr_db']:.2f} dB, "
              f"cosine {row['cosine']:.4f}, {seconds:.1f} s "
              f"{row['changed']}", flush=True)
        del result
        gc.collect()
    return rows


def table(task_by_model: dict, rows: list[dict]) -> list[str]:
    lines = ["| model | configuration | metric | vs float | output SQNR dB | cosine to float | quantize s | "
             "x plain inference |", "|---|---|---|---|---|---|---|---|"]
    floats = {r["model"]: r for r in rows if r["config"] == "float"}
    for r in rows:
        task = task_by_model[r["model"]]
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | failed: {r['error'][:80]} | | | | | |")
            continue
        if r["config"] == "float":
            lines.append(f"| {r['model']} | float | {task.metric} {r['metric']:.3f} | | | | | |")
            continue
        f = floats[r["model"]]
        delta = r["metric"] - f["metric"]
        lines.append(f"| {r['model']} | {r['config']} | {r['metric']:.3f} | {delta:+.3f} | {r['sqnr_db']:.2f} | "
                     f"{r['cosine']:.4f} | {r['seconds']:.1f} | {r['seconds'] / f['infer_seconds']:.1f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,det,rec,vad,encoder,detector")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of: {', '.join(CONFIGS)}")
    parser.add_argument("--work", help="data folder kept between runs (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    import onnxruntime as ort

    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_algorithms_"))
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)  # tools that write beside their cwd write here
    rows, tasks = [], {}
    for name in [m for m in args.models.split(",") if m]:
        task, work = TASKS[name], root / name
        tasks[name] = task
        if not (work / "calib").is_dir():
            work.mkdir(parents=True, exist_ok=True)
            task.build(work, *SIZES[name])
        rows += evaluate(name, task, work, configs)
        (root / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    cmd = "python benchmarks/bench_algorithms.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [SECTION, "",
             f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; quantizer git {git_head()}",
             f"- Command: `{cmd}` (from the repo root, after `pip install -e \".[bench]\"` and `apt install espeak-ng`)",
             f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores, shared); onnxruntime {ort.__version__}, "
             f"Python {platform.python_version()}",
             "- Each row: `quantize_model(model, calib, config=QuantizationConfig(...))` with the parameters named "
             "(`default` = no parameters: what the CLI runs), target ort-cpu for this machine; metric on the "
             "held-out eval set; SQNR over all outputs of the eval set; quantize s = the whole call; "
             "x plain inference = quantize s / float inference over the calibration samples in the same process",
             "", *table(tasks, rows), ""]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        write_results_section(SECTION, text)
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
