"""Calibration throughput: a whole quantize run vs plain float inference over the same samples,
for every method, and calibration on a local Dask cluster with 1 and 2 workers.

    flock /work/bench.lock python benchmarks/bench_throughput.py [--models det,rec,vad] [--write]

Each method runs as ``--calib METHOD`` runs it (bias correction and its check included: they
are on by default), and ``auto`` is the default command; the "acc" column is the time of those
accuracy steps within the run.  Per model, for each method: plain float inference over the calibration samples (onnxruntime,
default options, the input model, each sample read from its file with np.load as a plain
inference script would), then right after it ``quantize_model(model, folder, method)``; the
ratio is the quantize wall time over that float time, so both share the machine's load of the
moment.  The stage times come from the run's summary.  The breakdown (one extra min_max_asym
run) separates the calibration session's inference (the stage-1 model with every observed tensor
as an output) from the statistics.  The Dask part times ``calibrate_model(..., client=...)`` on a
LocalCluster of 1 and 2 single-threaded worker processes (cluster start-up excluded, reported
apart), checks that the state is bit-identical to the single-process one, and measures the state
size per tensor and the cost of merging two states.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import cpu_model, git_head, publish  # noqa: E402
from tasks import TASKS  # noqa: E402

from quantizer import Calibrator, quantize_model  # noqa: E402
from quantizer.calibration_state import save_state  # noqa: E402
from quantizer.calibrators import CalibrationMethod  # noqa: E402
from quantizer.pipeline import calibrate_model  # noqa: E402

SECTION = "## Calibration throughput and Dask workers (issue: calibration at scale)"
SAMPLES = {"det": 32, "rec": 64, "vad": 64}  # vad: clips, cut into 512-sample chunks
METHODS = ["auto"] + [m.value.lower() for m in CalibrationMethod]  # auto: the default
# The accuracy steps that a default run adds to a method's (bias correction and its check on
# every method; auto's per-tensor choice): in the table's cal/q columns, and apart as "acc".
ACCURACY_STEPS = ("correct_bias", "check_bias_correction", "choose_ranges")


def load(path: Path) -> dict:
    if path.suffix == ".npy":
        return {"x": np.load(path)}
    with np.load(path) as archive:
        return {k: archive[k] for k in archive.files}


def float_seconds(session, files) -> float:
    start = time.perf_counter()
    for f in files:
        session.run(None, load(f))
    return time.perf_counter() - start


def prepare(name: str, root: Path) -> tuple[Path, Path, str]:
    task, work = TASKS[name], root / name
    if not (work / "calib").is_dir():
        work.mkdir(parents=True, exist_ok=True)
        info = task.build(work, SAMPLES[name], 2)
        (work / "info.txt").write_text(info["calib"])
    return task.model_path(), work / "calib", (work / "info.txt").read_text()


def breakdown(model: Path, calib: Path) -> dict:
    """One min_max_asym run's stages, and its calibration split into inference and statistics."""
    result = quantize_model(str(model), str(calib), "min_max_asym", show_progress=False)
    steps = {s["step"]: s["seconds"] for s in result.summary["steps"]}
    from quantizer.optimize import optimize_model
    from quantizer.qdq.plan import build_plan
    from quantizer.targets import load_target
    import onnx_ir as ir

    target = load_target("ort-cpu").choose(None, None)
    stage1 = optimize_model(str(model), rewrites=target.rewrites)
    calibrator = Calibrator(stage1, keep_histograms=True, tensors=build_plan(ir.from_proto(stage1), set(), target).calibrated_tensors)
    session = calibrator.session()
    files = sorted(calib.iterdir())
    start = time.perf_counter()
    for f in files:
        outputs = session.run(calibrator._outputs, load(f))
        del outputs
    observed = time.perf_counter() - start
    return {"steps": steps, "observed_inference": observed, "tensors": len(calibrator.tensors)}


def identical(a, b) -> bool:
    """Every field and every histogram count the same, bit for bit."""
    if list(a.statistics) != list(b.statistics) or a.samples != b.samples:
        return False
    fields = ("minimum", "maximum", "count", "nonfinite", "level", "offset", "with_histogram")
    return all(all(getattr(x, f) == getattr(y, f) for f in fields) and np.array_equal(x.counts, y.counts)
               for x, y in zip(a.statistics.values(), b.statistics.values()))


def dask_part(model: Path, calib: Path) -> dict:
    from quantizer.distributed import cluster_client

    out = {}
    reference = calibrate_model(str(model), str(calib))
    for workers in (1, 2):
        start = time.perf_counter()
        with cluster_client(workers=workers) as client:
            out[f"startup_{workers}"] = time.perf_counter() - start
            start = time.perf_counter()
            state = calibrate_model(str(model), str(calib), client=client)
            out[f"wall_{workers}"] = time.perf_counter() - start
            out[f"identical_{workers}"] = identical(state, reference)
    start = time.perf_counter()
    single = calibrate_model(str(model), str(calib))
    out["wall_0"] = time.perf_counter() - start
    path = Path("/tmp") / f"bench_state_{model.stem}.npz"
    save_state(single, path)
    out["state_bytes"] = path.stat().st_size
    out["tensors"] = len(single.statistics)
    out["memory_bytes"] = sum(s.counts.nbytes for s in single.statistics.values())
    start = time.perf_counter()
    for _ in range(5):
        single.merge(reference)
    out["merge_ms"] = (time.perf_counter() - start) / 5 * 1000
    path.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="det,rec,vad")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dask-model", default="rec")
    parser.add_argument("--work", default="/tmp/bench_throughput")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    root = Path(args.work)
    lines = [SECTION, "", f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             "- Command: `flock /work/bench.lock python benchmarks/bench_throughput.py --write`",
             f"- CPU: {cpu_model()} ({len(__import__('os').sched_getaffinity(0))} logical cores, shared with other "
             f"jobs: the load changes during the run); onnxruntime {ort.__version__}, Python {platform.python_version()}",
             f"- Quantizer code: git {git_head()}",
             "- float s = plain inference of the input model over the calibration files (np.load + run, default "
             "session options), measured right before each quantize run; ratio = quantize wall s / that float s "
             "(the issue's target: <= 2x); opt/cal/q/rest = the run's stage seconds (rest: report, fidelity check, "
             "writing)", ""]
    for name in args.models.split(","):
        model, calib, info = prepare(name, root)
        files = sorted(calib.iterdir())
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        float_seconds(session, files[:2])  # warm up
        lines += [f"### {name}", "", f"- Model: `{model.name}`; calibration: {info} ({len(files)} samples)"]
        parts = breakdown(model, calib)
        flt = float_seconds(session, files)
        steps = parts["steps"]
        lines.append(f"- Where a min_max_asym run's time goes ({parts['tensors']} observed tensors; float "
                     f"inference {flt:.2f} s just before): optimize {steps.get('optimize', 0):.2f} s, stage-1 check "
                     f"{steps.get('verify_stage1', 0):.2f} s, calibration {steps.get('collect', 0):.2f} s of which "
                     f"the calibration session's inference alone (every observed tensor an output) takes "
                     f"{parts['observed_inference']:.2f} s, QDQ insertion {steps.get('insert_qdq', 0):.2f} s, fusion "
                     f"report {steps.get('fusion_report', 0):.2f} s (the Python call writes no file: no "
                     "written-model check)")
        lines += ["", "| method | float s | quantize s | ratio | opt / cal / q / rest s | of which acc s |",
                  "|---|---|---|---|---|---|"]
        for method in args.methods.split(","):
            flt = float_seconds(session, files)
            start = time.perf_counter()
            result = quantize_model(str(model), str(calib), method, show_progress=False)
            wall = time.perf_counter() - start
            sec = result.summary["seconds"]
            rest = wall - sec.get("optimize", 0) - sec.get("calibrate", 0) - sec.get("quantize", 0)
            accuracy = sum(s["seconds"] for s in result.summary["steps"] if s["step"] in ACCURACY_STEPS)
            lines.append(f"| {method} | {flt:.2f} | {wall:.2f} | {wall / flt:.2f}x | {sec.get('optimize', 0):.2f} / "
                         f"{sec.get('calibrate', 0):.2f} / {sec.get('quantize', 0):.2f} / {rest:.2f} | {accuracy:.2f} |")
            print(lines[-1], flush=True)
        lines.append("")
    if args.dask_model:
        model, calib, info = prepare(args.dask_model, root)
        d = dask_part(model, calib)
        lines += [f"### Dask: `quantize calibrate` on {args.dask_model} ({len(list(calib.iterdir()))} samples)", "",
                  "| run | `calibrate_model` wall s (stage 1 + calibration) | cluster start s | state bit-identical to one process |",
                  "|---|---|---|---|",
                  f"| one process, no Dask | {d['wall_0']:.2f} | - | (reference) |",
                  f"| LocalCluster, 1 worker | {d['wall_1']:.2f} | {d['startup_1']:.2f} | {d['identical_1']} |",
                  f"| LocalCluster, 2 workers | {d['wall_2']:.2f} | {d['startup_2']:.2f} | {d['identical_2']} |", "",
                  f"- State: {d['tensors']} tensors, {d['state_bytes'] / 1e3:.0f} kB as a compressed .npz "
                  f"({d['state_bytes'] / d['tensors'] / 1e3:.1f} kB per tensor), {d['memory_bytes'] / d['tensors'] / 1e3:.1f} kB "
                  f"of int64 counts per tensor in memory; merging two states: {d['merge_ms']:.1f} ms", ""]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
