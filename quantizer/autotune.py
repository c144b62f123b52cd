"""Accuracy-driven tuning, after Intel Neural Compressor's autotune.

Evaluate the float model, then quantize with one calibration method after another and
then keep twice as many of the most damaging nodes float each trial, until a trial's metric is
within ``tolerable_loss`` (relative) of the float metric or ``max_trials`` have run.
The model runs over the calibration data once: every method's ranges come from the same
collected histograms, and every trial only re-plans and re-inserts Q/DQ.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import onnx

from quantizer.calibrators import CalibrationMethod, range_function

from .calibrate import Calibrator
from .errors import UsageError
from .model_io import load_model
from .optimize import optimize_model
from .pipeline import QuantizationResult, build_summary
from .protect import PROTECTED_REASON, find_protected
from .qdq.plan import resolve_exclude
from .quantize import quantize_with_plan
from .report import DEFAULT_REPORT_SAMPLES, SampleKeeper, report_summary

DEFAULT_METHODS = ("MIN_MAX_ASYM", "PERCENTILE_ASYM", "ENTROPY_ASYM", "MSE_ASYM", "SQNR_ASYM")
FALLBACK_REASON = "autotune fallback (kept float to meet the accuracy goal)"
# Above this SQNR a tensor's int8 error no longer matters; it also stands in for "exact".
_CAP_DB = 60.0


@dataclass
class Trial:
    number: int
    method: str
    excluded: list[str]  # nodes this trial kept float, beyond exclude= and protection
    metric: float
    passed: bool
    loss: float | None = None  # (float metric - metric) / |float metric|; None if that is 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TuneResult(QuantizationResult):
    """The chosen model (the first trial that passed, else the best metric) and every trial."""

    trials: list[Trial] = field(default_factory=list)
    baseline: float = math.nan  # the float model's metric
    passed: bool = False
    best: Trial | None = None


def fallback_order(float_model: onnx.ModelProto, plan, entries: Sequence[dict]) -> list[str]:
    """Quantized nodes, most damaging first, from a tensor report.

    A tensor's SQNR holds every error upstream of it, so the worst tensors are simply the
    deepest ones.  Rank a node instead by the SQNR it loses: the worst of its quantized
    inputs minus its output (capped at 60 dB, so exact tensors count as clean).
    """
    def capped(entry):
        if entry["sqnr_db"] is not None:
            return min(entry["sqnr_db"], _CAP_DB)
        return 0.0 if entry["mse"] else _CAP_DB  # all-zero signal with noise / exact or unmeasured

    db = {e["tensor"]: capped(e) for e in entries}
    producers = {out: node for node in float_model.graph.node for out in node.output}
    quantized = {n.name for n in plan.quantized_nodes}
    absorbed = {n.name for n in plan.absorbed_nodes}
    damage: dict[str, float] = {}
    for tensor, out_db in db.items():
        node = producers.get(tensor)
        if node is not None and node.name in absorbed:  # a folded Relu: its quantized op is upstream
            node = producers.get(node.input[0])
        if node is None or node.name not in quantized:
            continue
        in_db = min((db[i] for i in node.input if i in db), default=_CAP_DB)
        damage[node.name] = max(damage.get(node.name, -math.inf), in_db - out_db)
    return sorted(damage, key=lambda name: (-damage[name], name))


def _metric(value, what: str) -> float:
    try:
        metric = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"the evaluation returned {value!r} for the {what}; it must return a number") from None
    if not math.isfinite(metric):
        raise UsageError(f"the evaluation returned {metric} for the {what}; it must return a finite number")
    return metric


def autotune(model, data, eval_fn: Callable[[onnx.ModelProto], float], tolerable_loss: float = 0.01,
             max_trials: int = 10, methods: Iterable = DEFAULT_METHODS, *,
             input_shapes: Mapping[str, Sequence[int]] | None = None, activation_dtype: str = "int8",
             weight_range: str = "auto", exclude: Iterable[str] = (), protect: bool = True,
             percentage: float = 99.99, report_samples: int = DEFAULT_REPORT_SAMPLES,
             show_progress: bool | None = None,
             on_trial: Callable[[Trial], None] | None = None) -> TuneResult:
    """Find the first quantization whose ``eval_fn`` metric (higher is better) is within
    ``tolerable_loss`` (relative) of the float model's.

    Trials: each of ``methods`` in order, then, on the method with the best metric, keep
    float the first 1, 2, 4, 8, ... nodes of ``fallback_order`` (doubling, so a loss spread
    over many layers is reached within a few trials).  At most
    ``max_trials`` quantized models are evaluated (the float model is evaluated once
    more).  ``on_trial`` is called after each trial (progress output).
    """
    methods = [CalibrationMethod.parse(m) for m in methods]
    if not methods:
        raise UsageError("autotune needs at least one calibration method")
    for method in methods:
        range_function(method)  # an unimplemented method fails before the model runs
    if not isinstance(max_trials, int) or max_trials < 1:
        raise UsageError(f"max_trials must be a positive integer, got {max_trials!r}")
    if not (tolerable_loss >= 0):
        raise UsageError(f"tolerable_loss must be >= 0, got {tolerable_loss!r}")

    timings = {}
    start = time.perf_counter()
    original = load_model(model)
    optimized = optimize_model(original, input_shapes)
    timings["optimize"] = time.perf_counter() - start
    baseline = _metric(eval_fn(original), "float model")
    floor = baseline - tolerable_loss * abs(baseline)
    excluded, unmatched = resolve_exclude(optimized.graph.node, exclude)

    start = time.perf_counter()
    keeper = SampleKeeper(data, report_samples if report_samples > 0 else DEFAULT_REPORT_SAMPLES)
    calibrator = Calibrator(optimized, methods[0], percentage, exclude=excluded,
                            show_progress=show_progress, keep_histograms=True)
    calibrator.collect_data(keeper.dataset)
    ranges_of = {}
    timings["calibrate"] = time.perf_counter() - start

    trials: list[Trial] = []
    best = None  # (trial, outcome, ranges, protected)

    def attempt(method: CalibrationMethod, fallback: list[str]) -> Trial:
        nonlocal best
        if method not in ranges_of:
            ranges_of[method] = calibrator.compute_range(method)
        ranges = ranges_of[method]
        protected, _ = (find_protected(optimized, ranges, excluded, activation_dtype,
                                       statistics=calibrator.statistics) if protect else ([], []))
        keep = excluded | {p["node"] for p in protected} | set(fallback)
        outcome = quantize_with_plan(optimized, ranges, activation_dtype, keep, weight_range)
        outcome.plan.float_reasons.update({p["node"]: PROTECTED_REASON for p in protected})
        outcome.plan.float_reasons.update({name: FALLBACK_REASON for name in fallback})
        metric = _metric(eval_fn(outcome.model), f"trial {len(trials) + 1}")
        loss = (baseline - metric) / abs(baseline) if baseline else None
        trial = Trial(len(trials) + 1, method.value, list(fallback), metric, metric >= floor, loss)
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        if best is None or trial.passed or metric > best[0].metric:
            best = (trial, outcome, ranges, protected)
        return trial

    start = time.perf_counter()
    passed = False
    for method in methods[:max_trials]:
        if attempt(method, []).passed:
            passed = True
            break
    if not passed and len(trials) < max_trials:
        base_trial, base_outcome, base_ranges, _ = best
        method = CalibrationMethod(base_trial.method)
        entries = report_summary(optimized, base_outcome, keeper.samples(), base_ranges,
                                 keeper.n)["tensors"]
        order = fallback_order(optimized, base_outcome.plan, entries)
        size = 1
        while size <= len(order) and len(trials) < max_trials:
            if attempt(method, order[:size]).passed:
                passed = True
                break
            if size == len(order):
                break
            size = min(2 * size, len(order))
    timings["tune"] = time.perf_counter() - start

    trial, outcome, ranges, protected = best
    summary = build_summary(original, optimized, outcome, timings)
    summary["calibration"] = {
        "method": trial.method, "samples": calibrator.samples_seen, "tensors": len(ranges),
        "nonfinite_values": {n: s.nonfinite for n, s in calibrator.statistics.items() if s.nonfinite},
    }
    summary["protected"] = protected
    summary["notes"].extend(f"--exclude '{p}' matches no node name or op type (after optimization)" for p in unmatched)
    summary["autotune"] = {
        "baseline": baseline, "tolerable_loss": tolerable_loss, "max_trials": max_trials,
        "passed": passed, "chosen_trial": trial.number, "trials": [t.as_dict() for t in trials],
    }
    if report_samples > 0:
        summary.update(report_summary(optimized, outcome, keeper.samples(), ranges, report_samples))
    return TuneResult(outcome.model, ranges, summary, trials=trials, baseline=baseline, passed=passed, best=trial)


def script_evaluator(script: str | Path) -> Callable[[onnx.ModelProto], float]:
    """eval_fn for the CLI: ``script`` defines ``evaluate(model_path: str) -> float``;
    each model is written to a temporary file for it."""
    path = Path(script)
    if not path.is_file():
        raise UsageError(f"evaluation script not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_quantize_eval_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"cannot load evaluation script {path.name}: {type(exc).__name__}: {exc}") from None
    evaluate = getattr(module, "evaluate", None)
    if not callable(evaluate):
        raise UsageError(f"{path.name} must define evaluate(model_path: str) -> float")

    def eval_fn(model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="quantize-tune-") as tmp:
            model_path = Path(tmp) / "model.onnx"
            onnx.save(model, str(model_path))
            try:
                return evaluate(str(model_path))
            except Exception as exc:
                raise UsageError(f"{path.name}: evaluate() failed: {type(exc).__name__}: {exc}") from None

    return eval_fn
