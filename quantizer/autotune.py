"""Accuracy-driven tuning, after Intel Neural Compressor's autotune.

Evaluate the float model, then quantize with one calibration method after another and
then, for twice as many of the most damaging nodes each round, first raise their output
tensors to the target's 16 bits (where it declares them) and then keep them float, until a trial's metric is
within ``tolerable_loss`` (relative) of the float metric or ``max_trials`` have run.
The model runs over the calibration data once: every method's ranges come from the same
collected histograms, and every trial only re-plans and re-inserts Q/DQ.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from . import pipeline
from .config import CalibrationInputs, Outputs, QuantizationConfig
from .errors import UsageError, first_line
from .pipeline import QuantizationResult
from .report import DEFAULT_REPORT_SAMPLES, report_summary, sqnr_lost

DEFAULT_METHODS = ("auto", "MIN_MAX_ASYM", "PERCENTILE_ASYM", "ENTROPY_ASYM", "MSE_ASYM", "SQNR_ASYM")
FALLBACK_REASON = "autotune fallback (kept float to meet the accuracy goal)"


@dataclass
class Trial:
    number: int
    method: str
    excluded: list[str]  # nodes this trial kept float, beyond exclude= and protection
    metric: float
    passed: bool
    loss: float | None = None  # (float metric - metric) / |float metric|; None if that is 0
    wide: list[str] = field(default_factory=list)  # tensors this trial raised to the target's 16 bits

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TuneResult(QuantizationResult):
    """The chosen model (the first trial that passed, else the best metric) and every trial."""

    trials: list[Trial] = field(default_factory=list)
    baseline: float = math.nan  # the float model's metric
    passed: bool = False
    best: Trial | None = None


def _requantizers(float_model: onnx.ModelProto, plan, tensor: str) -> list[str]:
    """The quantized nodes that would quantize ``tensor`` even with its producer float:
    its consumers in the stage-1 model that read it as a quantized input (directly, or
    through a Mul folded into a DequantizeLinear scale).  (The plan's own nodes are
    rewired by the Q/DQ insertion, so the stage-1 graph is read instead.)"""
    names = {tensor} | {out for out, (source, _) in plan.rescaled.items() if source == tensor}
    quantized = {n.name for n in plan.quantized_nodes}
    found = []
    for node in float_model.graph.node:
        if node.name not in quantized or node.op_type not in plan.rules or set(node.output) & set(plan.rescaled):
            continue
        rule = plan.rules[node.op_type]
        indices = range(len(node.input)) if rule.activations is None else rule.activations
        if any(i < len(node.input) and i != rule.weight and node.input[i] in names for i in indices):
            found.append(node.name)
    return found


def _damage(float_model: onnx.ModelProto, plan, entries: Sequence[dict]) -> tuple[dict[str, float], dict[str, str]]:
    """{node: the SQNR it loses} and {node: the tensor where it loses it}."""
    damage: dict[str, float] = {}
    damaged_tensor: dict[str, str] = {}
    for tensor, (node, lost) in sqnr_lost(float_model, plan, entries).items():
        if lost > damage.get(node, -math.inf):
            damage[node], damaged_tensor[node] = lost, tensor
    return damage, damaged_tensor


def fallback_order(float_model: onnx.ModelProto, plan, entries: Sequence[dict]) -> list[list[str]]:
    """Fallback units, most damaging first, from a tensor report: each unit is a quantized
    node and the quantized consumers that would otherwise quantize its output anyway (with
    Q/DQ placed after every quantized tensor, keeping one node float changes little while
    its neighbours still quantize its tensors).

    A tensor's SQNR holds every error upstream of it, so the worst tensors are simply the
    deepest ones.  Rank a node instead by the SQNR it loses: the worst of its quantized
    inputs minus its output (capped at 60 dB, so exact tensors count as clean).
    """
    damage, damaged_tensor = _damage(float_model, plan, entries)
    order = sorted(damage, key=lambda name: (-damage[name], name))
    return [[name, *(c for c in _requantizers(float_model, plan, damaged_tensor[name]) if c != name)] for name in order]


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
             config: QuantizationConfig | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None, target=None, activation_dtype: str | None = None,
             weight_range: str | None = None, exclude: Iterable[str] | None = None, protect: bool | None = None,
             percentage: float | None = None, report_samples: int = DEFAULT_REPORT_SAMPLES,
             show_progress: bool | None = None, outputs: Outputs | None = None, strict: bool | None = None,
             on_trial: Callable[[Trial], None] | None = None, client=None) -> TuneResult:
    """Find the first quantization whose ``eval_fn`` metric (higher is better) is within
    ``tolerable_loss`` (relative) of the float model's.

    Trials: each of ``methods`` in order, then, on the method with the best metric, keep
    float the first 1, 2, 4, 8, ... units of ``fallback_order`` (doubling, so a loss spread
    over many layers is reached within a few trials).  At most
    ``max_trials`` quantized models are evaluated (the float model is evaluated once
    more).  ``on_trial`` is called after each trial (progress output).  The run is the
    pipeline's: the same checks and refusals as ``quantize_model``, the calibration once,
    the quantization steps once per trial, and the result steps (``outputs``: files to
    write, with the fidelity check) once for the chosen trial.  ``client``: a
    ``dask.distributed.Client`` whose workers run the calibration.
    """
    methods = list(methods)
    if not methods:
        raise UsageError("autotune needs at least one calibration `methods` entry")
    if not isinstance(max_trials, int) or max_trials < 1:
        raise UsageError(f"`max_trials` must be a positive integer, got {max_trials!r}")
    if not (tolerable_loss >= 0):
        raise UsageError(f"`tolerable_loss` must be >= 0, got {tolerable_loss!r}")
    base = QuantizationConfig.build(config, percentile=percentage, input_shapes=input_shapes,
                                    target=target, activation_dtype=activation_dtype, weight_range=weight_range,
                                    exclude=exclude, protect=protect, show_progress=show_progress, strict=strict)
    if base.mode != "static":
        raise UsageError(f"autotune searches calibration methods and float fallbacks of `mode` static; "
                         f"`mode` {base.mode} has no activation ranges to tune")
    configs = [base.with_(method=m, report_samples=report_samples) for m in methods]  # validates every method
    sensitivity_samples = report_samples if report_samples > 0 else DEFAULT_REPORT_SAMPLES

    ctx = pipeline.new_context(model, configs[0].with_(report_samples=sensitivity_samples),
                               CalibrationInputs(data), outputs, keep_histograms=True, client=client)
    try:
        pipeline.run_steps(pipeline.PREPARE, ctx)
        start = time.perf_counter()
        baseline = _metric(eval_fn(ctx.original), "float model")
        floor = baseline - tolerable_loss * abs(baseline)
        trials: list[Trial] = []
        best: tuple[Trial, object] | None = None

        def attempt(trial_config: QuantizationConfig, fallback: list[str]) -> Trial:
            nonlocal best
            trial_ctx = ctx.fork(config=trial_config,
                               keep_float={**ctx.keep_float, **{name: FALLBACK_REASON for name in fallback}})
            pipeline.run_steps(pipeline.QUANTIZE, trial_ctx)
            metric = _metric(eval_fn(trial_ctx.outcome.model), f"trial {len(trials) + 1}")
            loss = (baseline - metric) / abs(baseline) if baseline else None
            trial = Trial(len(trials) + 1, trial_config.method_name, list(fallback), metric, metric >= floor, loss,
                          list(trial_config.wide_tensors))
            trials.append(trial)
            if on_trial is not None:
                on_trial(trial)
            if best is None or trial.passed or metric > best[0].metric:
                best = (trial, trial_ctx)
            return trial

        passed = False
        for trial_config in configs[:max_trials]:
            if attempt(trial_config, []).passed:
                passed = True
                break
        if not passed and len(trials) < max_trials:
            base_trial, base_ctx = best
            entries = report_summary(ctx.stage1, base_ctx.outcome, ctx.data.samples(sensitivity_samples),
                                     base_ctx.ranges, sensitivity_samples)["tensors"]
            order = fallback_order(ctx.stage1, base_ctx.outcome.plan, entries)
            wide_dtype = base_ctx.config.resolved_target.activations.wide
            _, damaged_tensor = _damage(ctx.stage1, base_ctx.outcome.plan, entries)  # what 16 bits would widen
            size = 1
            tried: list[str] | None = None
            while size <= len(order) and len(trials) < max_trials:
                units = order[:size]
                nodes = list(dict.fromkeys(n for unit in units for n in unit))
                if nodes == tried:  # the new units were inside the earlier ones: nothing to evaluate
                    size = min(2 * size, len(order)) if size < len(order) else size + 1
                    continue
                tried = nodes
                wide = list(dict.fromkeys(damaged_tensor[unit[0]] for unit in units))
                if wide_dtype and wide and attempt(base_ctx.config.with_(wide_tensors=tuple(wide)), []).passed:
                    passed = True  # 16 bits on the sensitive tensors was enough: no node kept float
                    break
                if len(trials) >= max_trials:
                    break
                if attempt(base_ctx.config, nodes).passed:
                    passed = True
                    break
                if size == len(order):
                    break
                size = min(2 * size, len(order))
        trial, chosen = best
        chosen.timings["tune"] = time.perf_counter() - start
        chosen.autotune = {
            "baseline": baseline, "tolerable_loss": tolerable_loss, "max_trials": max_trials,
            "passed": passed, "chosen_trial": trial.number, "trials": [t.as_dict() for t in trials],
        }
        if not passed:
            chosen.strict_violations.append(
                f"no trial within `tolerable_loss` {tolerable_loss:g} of the float metric {baseline:.6g} after "
                f"{len(trials)} trials (best: trial {trial.number}, metric {trial.metric:.6g})")
        pipeline.run_steps(pipeline.FINISH, chosen)
    except BaseException:
        ctx.transaction.abort()
        raise
    return TuneResult(chosen.outcome.model, chosen.ranges, chosen.summary, trials=trials, baseline=baseline,
                      passed=passed, best=trial)


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
    except (Exception, SystemExit) as exc:
        raise UsageError(f"cannot load evaluation script {path.name}: {type(exc).__name__}: {exc}") from exc
    evaluate = getattr(module, "evaluate", None)
    if not callable(evaluate):
        raise UsageError(f"{path.name} must define evaluate(model_path: str) -> float")

    def eval_fn(model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="quantize-tune-") as tmp:
            model_path = Path(tmp) / "model.onnx"
            onnx.save(model, str(model_path))
            try:
                return evaluate(str(model_path))
            except SystemExit as exc:  # a script's sys.exit() must not end the run silently
                raise UsageError(f"{path.name}: evaluate() called sys.exit({exc.code!r}); it must return "
                                 "a number") from exc
            except Exception as exc:
                raise UsageError(f"{path.name}: evaluate() failed: {type(exc).__name__}: {first_line(exc)}") from exc

    return eval_fn
