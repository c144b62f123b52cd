"""The pipeline: one declared list of steps over one context.

    load -> refuse_quantized -> check_outputs -> check_names -> optimize -> equalize -> absorb_high_bias
    -> resolve_scope -> keep_normalization_float -> check_stage1 -> check_equalization
    -> prepare_calibration -> verify_stage1 -> smooth_quant -> collect -> save_calibration
    -> adaround -> check_adaround -> correct_bias
    -> check_bias_correction -> choose_ranges -> compute_ranges -> protect -> insert_qdq
    -> refuse_float_copy -> tensor_report -> save_ranges -> write_model -> fusion_report -> summarize
    -> write_report -> commit

``quantize_model`` runs them all; ``autotune`` runs the same list, repeating the
quantization part once per trial.  A step has one job, skips itself when the run does
not ask for it (``applies``), and says what it changed; the context records the step,
its time and its stage.  Callers add steps of their own (the model editor's integer
inputs/outputs) with ``with_steps``.

That list is the static mode's.  The other kinds of quantization (``config.mode``) are
declared lists of their own, built from the same steps (``steps_for``):

    dynamic:     ... check_stage1 (its plan) -> verify_stage1 -> quantize_dynamic -> ... (no calibration)
    weight-only: ... check_stage1 (its plan) -> verify_stage1 -> collect_hessians (GPTQ only)
                 -> quantize_weights -> ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from . import runtime
from .algorithms.normalization import REASON as NORMALIZATION_REASON
from .algorithms.normalization import normalization_nodes
from .calibrate import Calibrator, sample_values
from .calibration_state import CalibrationState
from .calibration_state import save_ranges as write_ranges_file
from .checks import (
    check_stage1,
    nothing_to_quantize,
    ort_message,
    refuse_ambiguous_names,
    refuse_quantized,
)
from .algorithms import adaround, bias_correction, equalization, loss_aware, smooth_quant
from quantizer.calibrators import CalibrationMethod, range_errors
from .config import AUTO, CalibrationInputs, Outputs, QuantizationConfig, method_name
from .context import Context, Written
from .dataset import DataSource, input_specs
from .dynamic import insert_dynamic, plan_dynamic
from .errors import ModelError, StrictError, UsageError
from .fusion import DYNAMIC_KERNELS, WEIGHT_ONLY_KERNELS, fusion_report, kernel_report
from .model_io import (
    check_distinct_outputs,
    file_sha256,
    load_model,
    save_model_atomic,
    write_atomic,
)
from .optimize import optimize_model
from .protect import PROTECTED_REASON, find_protected
from .qdq.plan import build_plan, resolve_exclude
from .quantize import QuantizeOutcome, at_opset, finish_model, insert, validate_ranges
from .report import report_summary
from .subgraphs import count_subgraph_nodes
from .summary import build_summary
from .targets import record_target
from .verify import Reference, WrittenModelCheck, compare_outputs, measure_fidelity
from .weight_only import OPSET as WEIGHT_ONLY_OPSET
from .weight_only import collect_hessians, insert_weight_only, plan_weight_only

# Stage 1 must compute the input model's function: an output whose SQNR against the input
# model falls below this is a rewrite gone wrong (folding noise is far above: > 100 dB).
STAGE1_MIN_SQNR_DB = 40.0


@dataclass(frozen=True)
class Step:
    """One job of the pipeline.  ``run(ctx)`` returns what it changed (a short text) or
    None; ``applies(ctx)`` False skips it.  ``stage`` groups the time in the summary."""

    name: str
    stage: str
    run: Callable[[Context], str | None]
    applies: Callable[[Context], bool] = lambda ctx: True


def run_steps(steps: Iterable[Step], ctx: Context) -> Context:
    for step in steps:
        if not step.applies(ctx):
            continue
        start = time.perf_counter()
        changed = step.run(ctx)
        elapsed = time.perf_counter() - start
        ctx.timings[step.stage] = ctx.timings.get(step.stage, 0.0) + elapsed
        ctx.steps.append({"step": step.name, "seconds": round(elapsed, 3), "changed": changed})
    return ctx


# -- stage 1 ---------------------------------------------------------------------------

def _warn(ctx: Context, text: str) -> None:
    """A note that `strict` turns into an error."""
    ctx.notes.append(text)
    ctx.strict_violations.append(text)


def _load(ctx: Context) -> str:
    ctx.original = load_model(ctx.source)
    if ctx.source_path is not None:
        ctx.input_sha256 = file_sha256(ctx.source_path)
    return f"{len(ctx.original.graph.node)} nodes"


def _refuse_quantized(ctx: Context) -> None:
    refuse_quantized(ctx.original)


def _check_names(ctx: Context) -> None:
    refuse_ambiguous_names(ctx.original)


def _check_outputs(ctx: Context) -> None:
    check_distinct_outputs(ctx.outputs.files(), ctx.source_path)


def _optimize(ctx: Context) -> str:
    ctx.stage1 = optimize_model(ctx.original, ctx.config.input_shapes, conservative=ctx.conservative,
                                rewrites=ctx.config.resolved_target.rewrites)
    ctx.model = ir.from_proto(ctx.stage1)
    return f"{len(ctx.stage1.graph.node)} nodes" + (" (conservative: no optimizer)" if ctx.conservative else "")


def _equalize(ctx: Context) -> str | None:
    """Cross-layer equalization of the stage-1 model (exact in float), before calibration."""
    unequalized = ctx.stage1
    ctx.equalization = equalization.equalize(ctx.model)
    if not ctx.equalization.pairs:
        return None
    ctx.equalization.unequalized = unequalized
    ctx.stage1 = ir.to_proto(ctx.model)
    return f"equalized {len(ctx.equalization.pairs)} layer pairs ({ctx.equalization.rounds} rounds)"


def _absorbs(ctx: Context) -> bool:
    """High-bias absorption measures on the run's own samples, so only where this run
    calibrates from them: saved states and given ranges are of the model without it."""
    return (ctx.config.equalize and ctx.equalization is not None and bool(ctx.equalization.pairs)
            and ctx.inputs.ranges is None and not ctx.inputs.states and ctx.data.source is not None)


def _absorb_high_bias(ctx: Context) -> str | None:
    samples = _accuracy_samples(ctx)
    if not samples:
        return None
    equalization.absorb_high_bias(ctx.model, ctx.stage1, ctx.equalization, samples, sizes=_tensor_bytes(ctx))
    if not ctx.equalization.absorbed:
        return None
    ctx.stage1 = ir.to_proto(ctx.model)
    return (f"absorbed high biases of {len(ctx.equalization.absorbed)} layers "
            f"({sum(ctx.equalization.absorbed.values())} channels)")


def _check_equalization(ctx: Context) -> str:
    """Keep the equalized model only if, quantized, its outputs are at least as close to
    float as the model's without equalization: both calibrated on the accuracy samples
    and ranged by the method (mse for ``auto``), run on them.  Balancing weight ranges
    can leave the activations between the layers with more disparate channels."""
    found = ctx.equalization
    samples = _accuracy_samples(ctx)
    for name, model in (("equalized", ctx.stage1), ("not", found.unequalized)):
        found.output_sqnr_db[name] = _probe_sqnr(ctx, model, samples)
    db = found.output_sqnr_db
    found.kept = db["equalized"] >= db["not"]
    if not found.kept:
        found.revert()
        ctx.stage1 = found.unequalized
    return (f"{'kept' if found.kept else 'dropped'}: output SQNR {db['equalized']:.1f} dB equalized, "
            f"{db['not']:.1f} dB not")


def _resolve_scope(ctx: Context) -> str | None:
    ctx.excluded, unmatched = resolve_exclude(ctx.model.graph, ctx.config.exclude.patterns)
    for p in unmatched:
        _warn(ctx, f"`exclude` pattern '{p}' matches no node name or op type (after optimization)")
    return f"{len(ctx.excluded)} nodes excluded" if ctx.excluded else None


def _keep_normalization_float(ctx: Context) -> str | None:
    """Normalization arithmetic (mean, variance, 1/sqrt) stays float on every target."""
    for name in [n for n, why in ctx.keep_float.items() if why == NORMALIZATION_REASON]:
        del ctx.keep_float[name]  # a rerun of stage 1 (conservative) names other nodes
    found = {n: why for n, why in normalization_nodes(ctx.model.graph).items() if n not in ctx.excluded}
    ctx.keep_float.update(found)
    return f"{len(found)} nodes kept float" if found else None


def _check_stage1(ctx: Context) -> str:
    ctx.plan = build_plan(ctx.model, ctx.excluded | set(ctx.keep_float), ctx.config.resolved_target)
    ctx.notes.extend(check_stage1(ctx.original, ctx.stage1, ctx.plan))
    return f"{len(ctx.plan.quantized_nodes)} nodes to quantize, {len(ctx.plan.calibrated_tensors)} tensors to calibrate"


STAGE1 = (
    Step("optimize", "optimize", _optimize),
    Step("equalize", "optimize", _equalize, lambda ctx: ctx.config.equalize),
    Step("absorb_high_bias", "optimize", _absorb_high_bias, _absorbs),
    Step("resolve_scope", "optimize", _resolve_scope),
    Step("keep_normalization_float", "optimize", _keep_normalization_float,
         lambda ctx: ctx.config.protect_normalization),
    Step("check_stage1", "optimize", _check_stage1),
    Step("check_equalization", "optimize", _check_equalization,
         lambda ctx: _absorbs(ctx) and bool(_accuracy_samples(ctx))),
)
# What the stage-1 check re-runs when it falls back to stage 1 without the optimizer
# (the steps of the running pipeline by these names: each mode plans its own way).
WIDE_OPSET = 21  # QuantizeLinear/DequantizeLinear with int16/uint16
_STAGE1_RERUN = ("optimize", "equalize", "absorb_high_bias", "resolve_scope", "check_stage1", "check_equalization",
                 "prepare_calibration")


# -- stage 2 ---------------------------------------------------------------------------

def _calibrates(ctx: Context) -> bool:
    return ctx.inputs.ranges is None


def _prepare_calibration(ctx: Context) -> str | None:
    auto = ctx.config.method == AUTO
    keep = ctx.keep_histograms or auto or bool(ctx.outputs.save_calibration or ctx.inputs.states or ctx.config.protect)
    ctx.calibrator = Calibrator(ctx.stage1, CalibrationMethod.MSE_ASYM if auto else ctx.config.method,
                                ctx.config.percentile,
                                show_progress=ctx.config.show_progress, keep_histograms=True if keep else None,
                                tensors=ctx.plan.calibrated_tensors)
    for state in ctx.inputs.states:
        ctx.calibrator.load_state(state)
    return f"merged {len(ctx.inputs.states)} saved state(s)" if ctx.inputs.states else None


def _stage1_outputs(ctx: Context, sample) -> dict:
    if ctx.calibrator is not None:  # its session also returns the graph outputs
        session = ctx.calibrator.session(sample_values(sample))
    else:
        session = runtime.session(ctx.stage1)
    names = [o.name for o in ctx.stage1.graph.output]
    return dict(zip(names, session.run(names, sample)))


def _verify_stage1(ctx: Context) -> str | None:
    """Stage 1 must compute the input model's outputs: on the first sample, compare them
    (shapes and values).  On a mismatch, redo stage 1 without the optimizer; if that
    differs too, refuse the model (nothing is quantized from a wrong graph)."""
    first = ctx.data.first(input_specs(ctx.original))
    if first is None:
        return None
    sample, name = first
    try:
        ctx.reference = Reference.of(ctx.original, sample, name)
        ctx.reference_model = ctx.original
    except Exception as exc:  # e.g. an old opset onnxruntime no longer runs: stage 1 is the reference
        ctx.notes.append(f"stage-1 check skipped: onnxruntime cannot run the input model as written "
                         f"({ort_message(exc)})")
        try:
            ctx.reference = Reference.of(ctx.stage1, sample, name)
            ctx.reference_model = ctx.stage1
        except Exception:
            ctx.reference = None  # calibration reports why the model does not run
        return None
    problem = _stage1_difference(ctx, sample)
    if problem is None:
        return "outputs match the input model"
    ctx.conservative = True
    run_steps([s for s in ctx.pipeline or PIPELINE if s.name in _STAGE1_RERUN], ctx)
    problem_again = _stage1_difference(ctx, sample)
    if problem_again is not None:
        raise ModelError(f"stage 1 changes the model's output {problem_again} on calibration sample {name}, "
                         "even without optimizations; the model cannot be quantized safely (please report it)")
    ctx.notes.append(f"stage 1 optimizations changed output {problem} on calibration sample {name}; "
                     "quantized the model without them (slower, but the same function)")
    return "mismatch: fell back to stage 1 without optimizations"


def _stage1_difference(ctx: Context, sample) -> str | None:
    try:
        outputs = _stage1_outputs(ctx, sample)
    except ModelError:
        raise
    except Exception as exc:
        return f"(onnxruntime fails: {ort_message(exc)})"
    sqnr, broken = compare_outputs(ctx.reference, outputs)
    if broken:
        return f"'{broken[0].output}' ({broken[0].why})"
    for output, db in sqnr.items():
        ref = ctx.reference.outputs[output]
        if db < STAGE1_MIN_SQNR_DB and float(abs(ref - outputs[output]).max(initial=0.0)) > 1e-5:
            return f"'{output}' (SQNR {db:.1f} dB against the input model)"
    return None


def _collect(ctx: Context) -> str:
    ctx.calibrator.collect_data(ctx.data.stream(), client=ctx.client)
    return f"{ctx.calibrator.samples_seen} samples, {len(ctx.calibrator.tensors)} tensors"


def _tensor_bytes(ctx: Context) -> dict[str, int]:
    """{tensor: bytes per sample}, the accuracy steps' memory estimate: from the static
    shape where stage 1 inferred one, else from what calibration counted (values per
    sample), so a model with dynamic spatial sizes is budgeted at its real size."""
    sizes = {}
    for node in ctx.model.graph:
        for value in node.outputs:
            dims = None if value.shape is None else list(value.shape)
            if dims is not None and all(isinstance(d, int) for d in dims):
                sizes[value.name] = 4 * int(np.prod(dims, dtype=np.int64))
    calibrator = ctx.calibrator
    if calibrator is not None and calibrator.samples_seen:
        for name, stats in calibrator.statistics.items():
            if name not in sizes:
                sizes[name] = 4 * int((stats.count + stats.nonfinite) / calibrator.samples_seen) + 1
    return sizes


def _accuracy_samples(ctx: Context) -> list[dict]:
    """The samples the accuracy steps measure on, spread over the calibration data and
    read once per run."""
    if ctx.accuracy_samples is None:
        early = _calibrates(ctx) and not (ctx.calibrator is not None and ctx.calibrator.samples_seen)
        if early and ctx.data.one_shot and not ctx.inputs.states:
            ctx.notes.append(f"the accuracy steps measure on the first {ctx.config.accuracy_samples} samples: a step "
                             "before calibration needs them and a one-shot iterator cannot be spread over "
                             "(a list or a folder can)")
        ctx.accuracy_samples = [sample for _, sample in ctx.data.spread_samples(
            input_specs(ctx.original), ctx.config.accuracy_samples, before_streaming=early and not ctx.inputs.states)]
    return ctx.accuracy_samples


def _correct_bias(ctx: Context) -> str | None:
    """Bias correction: each Conv/Gemm bias absorbs the mean shift its weight rounding causes."""
    samples = _accuracy_samples(ctx)
    if not samples:  # statistics from saved states or given ranges only
        ctx.notes.append("bias correction skipped: it measures on calibration samples, and none were given")
        return None
    corrections = bias_correction.correct_biases(ctx.stage1, ctx.plan, ctx.config.resolved_target.weights, samples,
                                                 show_progress=ctx.config.show_progress)
    corrections.uncorrected = ctx.stage1
    if ctx.accuracy_references is None and corrections.float_outputs and _float_stage1(ctx) is ctx.stage1:
        ctx.accuracy_references = corrections.float_outputs  # that pass ran the float model on these samples
    ctx.stage1 = bias_correction.apply(ctx.stage1, corrections)
    ctx.bias_corrections = corrections
    summary = corrections.summary()
    return f"{summary['corrected']} biases corrected (median shift {summary['median_relative_shift']:.2%} of the output RMS)"


def _smooths(ctx: Context) -> bool:
    return ctx.config.smooth_quant and _calibrates(ctx) and ctx.data.source is not None


def _smooth_quant(ctx: Context) -> str | None:
    """SmoothQuant, before calibration: the ranges are then calibrated on the smoothed model.
    A state saved or merged in this run must be of the stage-1 model, so it is skipped then."""
    keep = ctx.excluded | set(ctx.keep_float)
    if not smooth_quant.candidates(ctx.stage1, ctx.plan, keep, ctx.config.smooth_insert):
        return None  # nothing to measure: the samples are not read here
    if ctx.inputs.states or ctx.outputs.save_calibration is not None:
        ctx.notes.append("SmoothQuant skipped: a calibration state saved or loaded in a run is of the "
                         "unsmoothed model")
        return None
    samples = _accuracy_samples(ctx)
    target = ctx.config.resolved_target
    smoothed, ctx.smoothing = smooth_quant.smooth(
        ctx.stage1, ctx.plan, target.activations, target.weights, samples, alpha=ctx.config.smooth_alpha,
        keep=keep, insert=ctx.config.smooth_insert, sizes=_tensor_bytes(ctx),
        show_progress=ctx.config.show_progress)
    summary = ctx.smoothing.summary()
    if not summary["smoothed"]:
        return None
    _float_references(ctx, samples)  # of the unsmoothed model: the reference of every check
    unsmoothed = ctx.stage1, ctx.model, ctx.plan, ctx.calibrator, dict(ctx.keep_float)
    ctx.keep_float.update({name: smooth_quant.REASON for name in ctx.smoothing.inserted})
    ctx.stage1 = smoothed
    ctx.model = ir.from_proto(smoothed)
    ctx.plan = build_plan(ctx.model, keep | set(ctx.smoothing.inserted), target)
    _prepare_calibration(ctx)  # the calibrator observes the smoothed model
    problem = _stage1_difference(ctx, ctx.reference.sample) if ctx.reference is not None else None
    if problem is not None:  # the folds must keep the float function: never quantize a changed one
        ctx.stage1, ctx.model, ctx.plan, ctx.calibrator, ctx.keep_float = unsmoothed
        ctx.smoothing = None
        ctx.notes.append(f"SmoothQuant dropped: the smoothed model changed output {problem} (please report it)")
        return "dropped: the float outputs changed"
    scores = {name: _probe_sqnr(ctx, model, samples) for name, model in (("smoothed", smoothed),
                                                                         ("unsmoothed", unsmoothed[0]))}
    ctx.smoothing.output_sqnr_db = scores
    if not scores["smoothed"] >= scores["unsmoothed"]:
        ctx.stage1, ctx.model, ctx.plan, ctx.calibrator, ctx.keep_float = unsmoothed
        ctx.smoothing.kept = False
        return (f"dropped: output SQNR {scores['smoothed']:.1f} dB smoothed, {scores['unsmoothed']:.1f} dB not "
                f"({summary['smoothed']} MatMul inputs)")
    ctx.smoothing.kept = True
    return (f"smoothed {summary['smoothed']} MatMul inputs (alpha median {summary['alpha_median']:g}); "
            f"output SQNR {scores['smoothed']:.1f} dB smoothed, {scores['unsmoothed']:.1f} dB not")


def _probe_sqnr(ctx: Context, model: onnx.ModelProto, samples: list[dict]) -> float:
    """The check of a step that runs before calibration (equalization, SmoothQuant): the
    output SQNR of ``model`` quantized with ranges from the accuracy samples alone (the
    method's, the target's mse form for auto), on those samples, against the float outputs."""
    keep = ctx.excluded | set(ctx.keep_float)
    plan = build_plan(ir.from_proto(model), keep, ctx.config.resolved_target)
    method = _auto_fallback(ctx) if ctx.config.method == AUTO else ctx.config.method
    probe = Calibrator(model, method, ctx.config.percentile, show_progress=False, keep_histograms=True,
                       tensors=plan.calibrated_tensors)
    probe.collect_data(samples)
    ranges = {**probe.compute_range(), **ctx.config.range_overrides}
    outcome = _quantized(ctx, model, ranges, keep)
    return loss_aware.output_sqnr_db(runtime.session(outcome.model), samples, _float_references(ctx, samples))
def _adaround(ctx: Context) -> str | None:
    """AdaRound: each Conv/Gemm/MatMul weight rounded up or down by its layer's output error."""
    samples = _accuracy_samples(ctx)
    if not samples:
        ctx.notes.append("adaround skipped: it measures on calibration samples, and none were given")
        return None
    probe = {**_probe_ranges(ctx), **ctx.config.range_overrides}  # the ranges its check quantizes with
    target = ctx.config.resolved_target
    rounding = adaround.adaround(ctx.stage1, ctx.plan, target.weights, samples,
                                 iterations=ctx.config.adaround_iterations,
                                 input_ranges={k: v for k, v in probe.items() if k not in ctx.config.wide_tensors},
                                 activation_spec=target.activations, sizes=_tensor_bytes(ctx),
                                 show_progress=ctx.config.show_progress)
    rounding.unrounded = ctx.stage1
    ctx.stage1 = adaround.apply(ctx.stage1, rounding)
    ctx.rounding = rounding
    summary = rounding.summary()
    return (f"{summary['rounded']} weights rounded (layer error x{summary['median_error_ratio']:.2f} of nearest's, "
            f"median), {summary['seconds']:.1f} s")


def _check_adaround(ctx: Context) -> str:
    """Keep the AdaRounded weights only if the quantized model's outputs are not further
    from float with them, on the accuracy samples (before bias correction measures on them)."""
    rounding = ctx.rounding
    scores = _output_scores(ctx, {"rounded": ctx.stage1, "nearest": rounding.unrounded})
    rounding.kept = scores["rounded"] >= scores["nearest"]
    rounding.output_sqnr_db = scores
    if not rounding.kept:
        ctx.stage1 = rounding.unrounded
    return (f"{'kept' if rounding.kept else 'dropped'}: output SQNR {scores['rounded']:.1f} dB rounded, "
            f"{scores['nearest']:.1f} dB nearest")


def _save_calibration(ctx: Context) -> str:
    ctx.calibrator.save_state(ctx.outputs.save_calibration, transaction=ctx.transaction)
    return str(ctx.outputs.save_calibration)


PREPARE_CALIBRATION = Step("prepare_calibration", "calibrate", _prepare_calibration, _calibrates)


# -- stage 3 ---------------------------------------------------------------------------

def _auto_methods(ctx: Context) -> list[CalibrationMethod]:
    """The methods whose ranges ``auto`` chooses among, in the target's form, min_max first."""
    form = "SYM" if ctx.config.resolved_target.activations.symmetric else "ASYM"
    return [CalibrationMethod(f"{family}_{form}") for family in loss_aware.FAMILIES]


def _method_ranges(ctx: Context, method: CalibrationMethod) -> dict:
    if method not in ctx.ranges_by_method:  # shared by autotune's forks
        ctx.ranges_by_method[method] = ctx.calibrator.compute_range(method)
    return ctx.ranges_by_method[method]


def _choose_ranges(ctx: Context) -> str:
    """The ``auto`` method: each tensor's range chosen by the error of its block."""
    methods = _auto_methods(ctx)
    samples = _accuracy_samples(ctx)
    if not samples:  # statistics from saved states only: no block can be measured
        fallback = _auto_fallback(ctx)
        ctx.ranges_by_method[AUTO] = _method_ranges(ctx, fallback)
        ctx.notes.append(f"auto: no calibration samples to measure blocks on; used {method_name(fallback)}")
        return f"no samples: {method_name(fallback)}"
    per_method = {method_name(m): _method_ranges(ctx, m) for m in methods}
    statistics = ctx.calibrator.statistics
    selection = loss_aware.choose_ranges(ctx.stage1, per_method, samples, ctx.config.resolved_target.activations,
                                         sizes=_tensor_bytes(ctx), show_progress=ctx.config.show_progress,
                                         full_data_errors=lambda name, ranges: range_errors(statistics[name], ranges))

    keep = ctx.excluded | set(ctx.keep_float)

    def score(ranges):
        return _output_errors(ctx, ctx.stage1, {**ranges, **ctx.config.range_overrides}, keep)

    totals = selection.method_totals()
    checked = sorted(per_method, key=lambda name: (totals.get(name, float("inf")), list(per_method).index(name)))
    candidates = {loss_aware.PER_TENSOR: selection.ranges,
                  **{name: dict(per_method[name]) for name in checked[:loss_aware.CHECKED_METHODS]}}
    widest = per_method[method_name(methods[0])]  # min_max
    for ranges in candidates.values():  # blocks are measured on the 8-bit grid; at 16 bits clipping never pays
        ranges.update({name: widest[name] for name in ctx.config.wide_tensors if name in widest})
    fallback = method_name(_auto_fallback(ctx))  # the checks' probe: scored already when a check ran on this model
    if fallback not in candidates and _scored(ctx, ctx.stage1, {**per_method[fallback], **ctx.config.range_overrides}, keep):
        candidates[fallback] = dict(per_method[fallback])
    selection.picked, selection.network_db = loss_aware.pick_by_output(candidates, score)
    ctx.range_selection = selection
    ctx.ranges_by_method[AUTO] = candidates[selection.picked]
    chosen = selection.summary()["chosen"]
    by_tensor = ", ".join(f"{name} {count}" for name, count in sorted(chosen.items(), key=lambda kv: -kv[1]))
    return (f"{selection.picked} ({selection.network_db[selection.picked]:.1f} dB on {len(samples)} samples); "
            f"per tensor: {by_tensor}")


def _float_references(ctx: Context, samples: list[dict]) -> list:
    """The float model's outputs on the accuracy samples (before any bias correction:
    the function the checks compare against), computed once per run."""
    if ctx.accuracy_references is None:
        session = runtime.session(_float_stage1(ctx))
        ctx.accuracy_references = [session.run(None, dict(sample)) for sample in samples]
    return ctx.accuracy_references


def _float_stage1(ctx: Context) -> onnx.ModelProto:
    """The stage-1 model before the accuracy steps changed its weights or biases."""
    if ctx.rounding is not None:
        return ctx.rounding.unrounded
    if ctx.bias_corrections is not None:
        return ctx.bias_corrections.uncorrected
    return ctx.stage1


def _output_scores(ctx: Context, models: Mapping[str, onnx.ModelProto]) -> dict[str, float]:
    """Each stage-1 variant's output SQNR against float, quantized with the probe ranges,
    on the accuracy samples: how the checks of the accuracy steps decide."""
    keep = ctx.excluded | set(ctx.keep_float)
    probe = {**_probe_ranges(ctx), **ctx.config.range_overrides}
    return {name: _output_score(ctx, model, probe, keep) for name, model in models.items()}


def _score_key(ctx: Context, model: onnx.ModelProto, ranges: Mapping, keep: set[str]) -> tuple:
    return (id(model), tuple(sorted((name, tuple(map(float, r))) for name, r in ranges.items())), frozenset(keep),
            repr(ctx.config.resolved_target), tuple(ctx.config.wide_tensors))


def _scored(ctx: Context, model: onnx.ModelProto, ranges: Mapping, keep: set[str]) -> bool:
    return _score_key(ctx, model, ranges, keep) in ctx.output_scores


def _output_errors(ctx: Context, model: onnx.ModelProto, ranges: Mapping, keep: set[str]) -> np.ndarray:
    """The per-sample (signal, noise) of the outputs against float, on the accuracy
    samples, of ``model`` quantized with ``ranges`` (keeping ``keep`` float); each distinct
    one is quantized and run once per run."""
    key = _score_key(ctx, model, ranges, keep)
    if key not in ctx.output_scores:
        samples = _accuracy_samples(ctx)
        session = runtime.session(_quantized(ctx, model, ranges, keep).model)
        ctx.output_scores[key] = (model, loss_aware.output_errors(session, samples, _float_references(ctx, samples)))
    return ctx.output_scores[key][1]


def _output_score(ctx: Context, model: onnx.ModelProto, ranges: Mapping, keep: set[str]) -> float:
    """The output SQNR in dB of ``_output_errors``."""
    return loss_aware.sqnr_db(_output_errors(ctx, model, ranges, keep))


def _auto_fallback(ctx: Context) -> CalibrationMethod:
    """The method ``auto`` stands on where it cannot measure: the target's mse form."""
    return _auto_methods(ctx)[loss_aware.FAMILIES.index("MSE")]


def _probe_ranges(ctx: Context) -> dict:
    """The ranges the bias-correction check quantizes with, before ``auto`` has chosen
    its own (which it then chooses on the model the check kept): the method's, or for
    ``auto`` the target's mse form."""
    if ctx.inputs.ranges is not None:
        return validate_ranges(ctx.inputs.ranges)
    if ctx.config.method == AUTO:
        return _method_ranges(ctx, _auto_fallback(ctx))
    return _method_ranges(ctx, ctx.config.method)


def _check_bias_correction(ctx: Context) -> str:
    """Keep the corrected biases only if the quantized model's outputs are closer to
    float with them, on the accuracy samples (once per run; autotune's trials follow)."""
    corrections = ctx.bias_corrections
    if corrections.kept is None:
        scores = _output_scores(ctx, {"corrected": ctx.stage1, "uncorrected": corrections.uncorrected})
        corrections.kept = scores["corrected"] >= scores["uncorrected"]
        corrections.output_sqnr_db = scores
    if not corrections.kept:
        ctx.stage1 = corrections.uncorrected
    db = corrections.output_sqnr_db
    return (f"{'kept' if corrections.kept else 'dropped'}: output SQNR {db['corrected']:.1f} dB corrected, "
            f"{db['uncorrected']:.1f} dB not")


def _compute_ranges(ctx: Context) -> str:
    method = ctx.config.method
    if ctx.inputs.ranges is not None:
        ranges = validate_ranges(ctx.inputs.ranges)
    else:
        ranges = ctx.ranges_by_method[AUTO] if method == AUTO else _method_ranges(ctx, method)
    ctx.ranges = {**ranges, **ctx.config.range_overrides}
    if ctx.inputs.ranges is None and method != AUTO and method.family == "PERCENTILE" and ctx.config.percentile < 1:
        _warn(ctx, f"`percentile` {ctx.config.percentile:g} is below 1: it is a percentage "
                   f"(99.99 keeps 99.99 % of the values), not a fraction; did you mean {ctx.config.percentile * 100:g}?")
    return f"{len(ctx.ranges)} ranges ({'given' if ctx.inputs.ranges is not None else method_name(method)})"


def _protect(ctx: Context) -> str | None:
    statistics = ctx.calibrator.statistics if ctx.calibrator is not None and ctx.calibrator.samples_seen else None
    protected, notes = find_protected(ctx.model, ctx.ranges, ctx.excluded | set(ctx.keep_float),
                                      statistics=statistics, target=ctx.config.resolved_target)
    ctx.protected = protected
    for note in notes:
        _warn(ctx, note)
    return f"{len(protected)} nodes kept float" if protected else None


def _quantized(ctx: Context, stage1: onnx.ModelProto, ranges: Mapping, keep: set[str]):
    """Q/DQ insertion into ``stage1`` at the opset the target (and 16-bit tensors) need."""
    target, wide = ctx.config.resolved_target, ctx.config.wide_tensors
    opset = max(target.min_opset, WIDE_OPSET if wide else 0)
    model = ir.from_proto(at_opset(stage1, opset, f"target {target.name}" + (" with 16-bit tensors" if wide else "")))
    return insert(model, ranges, exclude=keep, target=target, wide=wide)


def _insert_qdq(ctx: Context) -> str:
    keep = ctx.excluded | set(ctx.keep_float) | {p["node"] for p in ctx.protected}
    wide = ctx.config.wide_tensors
    ctx.outcome = _quantized(ctx, ctx.stage1, ctx.ranges, keep)
    for name in sorted(set(wide) - ctx.outcome.plan.wide):
        _warn(ctx, f"`wide_tensors`: '{name}' is not a quantized tensor of this run")
    record_target(ctx.outcome.model, ctx.config.resolved_target)
    reasons = ctx.outcome.plan.float_reasons
    reasons.update({p["node"]: PROTECTED_REASON for p in ctx.protected})
    reasons.update(ctx.keep_float)
    return f"{len(ctx.outcome.plan.quantized_nodes)} nodes quantized"


QUANTIZE = (
    Step("check_bias_correction", "quantize", _check_bias_correction,
         lambda ctx: ctx.bias_corrections is not None and bool(ctx.bias_corrections.biases)),
    Step("choose_ranges", "calibrate", _choose_ranges,
         lambda ctx: ctx.config.method == AUTO and ctx.inputs.ranges is None and AUTO not in ctx.ranges_by_method),
    Step("compute_ranges", "quantize", _compute_ranges),
    Step("protect", "quantize", _protect, lambda ctx: ctx.config.protect),
    Step("insert_qdq", "quantize", _insert_qdq),
)


# -- results ---------------------------------------------------------------------------

def _refuse_float_copy(ctx: Context) -> None:
    """Whatever left every node float (ranges for unknown tensors only, protection, a
    fallback), the result would be a float copy that passes CI silently: refuse it."""
    if not ctx.outcome.plan.quantized_nodes:
        raise nothing_to_quantize(ctx.outcome.plan, count_subgraph_nodes(ctx.stage1))


def _tensor_report(ctx: Context) -> str:
    ctx.tensor_report = report_summary(ctx.stage1, ctx.outcome, ctx.data.samples(ctx.config.report_samples),
                                       ctx.ranges, ctx.config.report_samples)
    return f"{len(ctx.tensor_report['tensors'])} tensors on {ctx.tensor_report['report_samples']} samples"


def _save_ranges(ctx: Context) -> str:
    write_ranges_file(ctx.ranges, ctx.outputs.save_ranges, transaction=ctx.transaction)
    return str(ctx.outputs.save_ranges)


def _fidelity_references(ctx: Context) -> list[Reference] | None:
    """The stage-1 check's reference plus the next calibration samples, up to
    `fidelity_samples`, with the float model's outputs on each."""
    if ctx.reference is None:
        return None
    references = [ctx.reference]
    wanted = ctx.outputs.fidelity_samples
    if wanted > 1 and ctx.reference_model is not None:
        for name, sample in ctx.data.named_samples(input_specs(ctx.original), wanted):
            if len(references) >= wanted:
                break
            if name != ctx.reference.name:
                references.append(Reference.of(ctx.reference_model, sample, name))
    return references


def _write_model(ctx: Context) -> str:
    check = WrittenModelCheck(ctx.outcome.model, _fidelity_references(ctx), ctx.outputs.min_sqnr_db)
    size = save_model_atomic(ctx.outcome.model, ctx.outputs.model, verify=check, transaction=ctx.transaction)
    ctx.written = Written(ctx.outputs.model, size, check.fidelity)
    if check.error:
        _warn(ctx, check.error)
    fidelity = check.fidelity
    if fidelity is None:
        if ctx.reference is None:
            _warn(ctx, "fidelity check skipped: no calibration samples to run")
    else:
        if fidelity.sqnr_db:
            values = ", ".join(f"{name} {value:.1f} dB" for name, value in fidelity.sqnr_db.items())
            over = (f"the worst of {len(fidelity.samples)} calibration samples" if len(fidelity.samples) > 1
                    else f"calibration sample {fidelity.sample}")
            ctx.notes.append(f"fidelity on {over}: output SQNR {values}")
        warning = fidelity.warning()
        if warning:
            hint = _clipping_hint(ctx)
            ctx.notes.append(f"warning: {warning}" + (f"; {hint}" if hint else ""))
            ctx.strict_violations.append(warning)
    return f"{size} bytes"


CLIPPED_SHARE = 0.25  # a range whose bound is under this share of the observed max |x| clips hard


def _clipping_hint(ctx: Context) -> str | None:
    """When ENTROPY ranged the model and the output is poor, name its clipping as the
    likely cause: it cuts heavy tails whose outliers carry signal (attention, HardSwish)."""
    method = ctx.config.method
    if method == AUTO or method.family != "ENTROPY" or ctx.calibrator is None:
        return None
    clipped = []
    for name, (low, high) in ctx.ranges.items():
        stats = ctx.calibrator.statistics.get(name)
        if stats is None or stats.count == 0:
            continue
        observed = max(abs(stats.minimum), abs(stats.maximum))
        if observed > 0 and max(abs(low), abs(high)) < CLIPPED_SHARE * observed:
            clipped.append((max(abs(low), abs(high)) / observed, name))
    if not clipped:
        return None
    share, name = min(clipped)
    return (f"likely cause: {method_name(method)} clipped {len(clipped)} tensors to under "
            f"{CLIPPED_SHARE:.0%} of their observed max |x| (e.g. '{name}' to {share:.0%}); heavy-tailed "
            "activations whose outliers carry signal lose them: try `method` auto or mse_asym")


def _enforce_strict(ctx: Context) -> None:
    """Under `strict`, any warning of the run fails it; nothing staged is written.  A run
    that writes no model file (the Python API) gets its fidelity check here."""
    if ctx.written is None:
        references = _fidelity_references(ctx)
        if references is None:
            ctx.strict_violations.append("fidelity check skipped: no calibration samples to run")
        else:
            fidelity = measure_fidelity(references, runtime.session(ctx.outcome.model), ctx.outcome.model,
                                        ctx.outputs.min_sqnr_db)
            if fidelity.warning():
                ctx.strict_violations.append(fidelity.warning())
    if ctx.strict_violations:
        more = f" (and {len(ctx.strict_violations) - 1} more)" if len(ctx.strict_violations) > 1 else ""
        raise StrictError(f"{ctx.strict_violations[0]}{more}; nothing was written (`strict`)")


def _fusion_step(report: Callable, kernels: str) -> Step:
    """Which quantized nodes onnxruntime runs in ``kernels``, from its optimized graph
    (``report(model, plan)``: fusion.fusion_report, or kernel_report for the fused forms)."""
    def run(ctx: Context) -> str | None:
        ctx.fusion = report(ctx.outcome.model, ctx.outcome.plan)
        if ctx.fusion is None:
            return None
        note = ctx.fusion.note()
        if note:
            ctx.notes.append(note)
        return f"{ctx.fusion.integer} of {ctx.fusion.quantized} quantized nodes in {kernels}"

    return Step("fusion_report", "report", run, lambda ctx: ctx.config.resolved_target.report_fusion)


def _summarize(ctx: Context) -> None:
    ctx.summary = build_summary(ctx)


def _write_report(ctx: Context) -> str:
    """The summary as JSON; a report file named .html/.htm gets the visual report instead
    (html_report.py: the same data embedded, plus charts)."""
    if ctx.outputs.report.suffix.lower() in (".html", ".htm"):
        from .html_report import quantization_page

        data = quantization_page(ctx).encode("utf-8")
    else:
        import json

        data = (json.dumps(ctx.summary.as_dict(), indent=2, sort_keys=True) + "\n").encode()
    write_atomic(ctx.outputs.report, lambda handle: handle.write(data), transaction=ctx.transaction)
    return str(ctx.outputs.report)


def _commit(ctx: Context) -> None:
    ctx.transaction.commit()


PREPARE = (
    Step("load", "optimize", _load),
    Step("refuse_quantized", "optimize", _refuse_quantized),
    Step("check_outputs", "optimize", _check_outputs, lambda ctx: bool(ctx.outputs.files())),
    Step("check_names", "optimize", _check_names),
    *STAGE1,
    PREPARE_CALIBRATION,
    Step("verify_stage1", "calibrate", _verify_stage1, lambda ctx: ctx.data.source is not None),
    Step("smooth_quant", "calibrate", _smooth_quant, _smooths),
    Step("collect", "calibrate", _collect, lambda ctx: _calibrates(ctx) and ctx.data.source is not None),
    Step("save_calibration", "calibrate", _save_calibration,
         lambda ctx: _calibrates(ctx) and ctx.outputs.save_calibration is not None),
    Step("adaround", "calibrate", _adaround, lambda ctx: ctx.config.adaround),
    Step("check_adaround", "quantize", _check_adaround, lambda ctx: ctx.rounding is not None and bool(ctx.rounding.weights)),
    Step("correct_bias", "calibrate", _correct_bias, lambda ctx: ctx.config.bias_correction),
)
FINISH = (
    Step("refuse_float_copy", "quantize", _refuse_float_copy),
    Step("tensor_report", "report", _tensor_report, lambda ctx: ctx.config.report_samples > 0),
    Step("save_ranges", "write", _save_ranges, lambda ctx: ctx.outputs.save_ranges is not None),
    Step("write_model", "write", _write_model, lambda ctx: ctx.outputs.model is not None),
    _fusion_step(fusion_report, "integer kernels"),
    Step("enforce_strict", "write", _enforce_strict, lambda ctx: ctx.config.strict),
    Step("summarize", "write", _summarize),
    Step("write_report", "write", _write_report, lambda ctx: ctx.outputs.report is not None),
    Step("commit", "write", _commit),
)
PIPELINE = PREPARE + QUANTIZE + FINISH
# Stage 2 alone (one shard of the data, say): the calibration state, saved and committed.
# Stage 2 alone (`quantize calibrate`): the state is of the stage-1 model, so nothing corrects it.
# High-bias absorption and SmoothQuant measure on the run's accuracy samples, which differ from shard to shard.
CALIBRATE = tuple(s for s in PREPARE if s.name not in ("correct_bias", "absorb_high_bias", "check_equalization",
                                                        "smooth_quant", "adaround", "check_adaround")) + (
    Step("commit", "write", _commit),)


# -- autotune's algorithm trials: another configuration from a run's calibrated context --

# What such a trial shares with the run it starts from: the model as loaded and checked, and
# stage 1's optimizer (its output does not depend on the accuracy steps that follow it).
SHARED_WITH_TRIALS = ("load", "refuse_quantized", "check_outputs", "check_names", "optimize")
# The steps after calibration that change the weights: adding AdaRound to a calibrated run
# repeats only these.
WEIGHT_STEPS = ("adaround", "check_adaround", "correct_bias")


def recalibration_steps(optimize: bool = False) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    """The stage-1 and stage-2 steps of a trial that calibrates again, split where
    calibration starts reading the data: (the accuracy steps before calibration and the
    stage-1 checks, then calibration and the steps after it).  ``optimize``: run stage 1's
    optimizer again (the run fell back to stage 1 without it after the trials' start was
    taken).  The calibration state a run saves is the run's own: a trial saves none."""
    shared = {*SHARED_WITH_TRIALS, "save_calibration"} - ({"optimize"} if optimize else set())
    steps = [s for s in PREPARE if s.name not in shared]
    split = [s.name for s in steps].index("collect")
    return tuple(steps[:split]), tuple(steps[split:])


def recalibration(start: Context, config: QuantizationConfig, calibrated: Context) -> Context:
    """A context for ``config`` to run ``recalibration_steps`` in: ``start`` is a fork of
    ``calibrated`` taken right after stage 1's optimizer (the loaded model and the optimized
    stage-1 model, the data source and the transaction are shared); the accuracy samples and
    their float outputs are ``calibrated``'s (the same samples: a one-shot iterator is not
    read for them again).  Its plan, accuracy steps and calibration are its own."""
    return start.fork(config=config, model=ir.from_proto(start.stage1), conservative=calibrated.conservative,
                      ranges_by_method={}, accuracy_samples=_accuracy_samples(calibrated),
                      accuracy_references=calibrated.accuracy_references)


def rounded(ctx: Context, config: QuantizationConfig) -> Context:
    """``ctx`` (calibrated, not yet quantized, without AdaRound) with ``config``'s AdaRound:
    its calibration, plan and accuracy samples shared, the weight steps run again from the
    weights before them.  The ``auto`` ranges are chosen again (on the rounded model)."""
    before = ctx.bias_corrections.uncorrected if ctx.bias_corrections is not None else ctx.stage1
    forked = ctx.fork(config=config, stage1=before, bias_corrections=None, rounding=None,
                      ranges_by_method={k: v for k, v in ctx.ranges_by_method.items() if k != AUTO})
    forked.steps = [s for s in forked.steps if s["step"] not in WEIGHT_STEPS]
    return run_steps([s for s in PREPARE if s.name in WEIGHT_STEPS], forked)


# -- the other modes: weights first, no activation ranges --------------------------------

def _check_weighted_plan(planner: Callable) -> Step:
    """The mode's check_stage1: its plan of the stage-1 model, and the stage-1 checks."""
    def run(ctx: Context) -> str:
        ctx.plan, _ = planner(ctx, ctx.model)
        ctx.notes.extend(check_stage1(ctx.original, ctx.stage1, ctx.plan))
        return f"{len(ctx.plan.quantized_nodes)} nodes to quantize"

    return Step("check_stage1", "optimize", run)


def _dynamic_plan(ctx: Context, model: ir.Model):
    return plan_dynamic(model, ctx.excluded, ctx.config.resolved_target, ctx.config.embeddings)


def _quantize_dynamic(ctx: Context) -> str:
    model = ir.from_proto(ctx.stage1)
    target = ctx.config.resolved_target
    plan, found = _dynamic_plan(ctx, model)
    insert_dynamic(model, found, target.weights.qmax)
    ctx.outcome = QuantizeOutcome(finish_model(model), plan, {}, target.weights.range, target)
    record_target(ctx.outcome.model, target)
    return f"{len(plan.quantized_nodes)} MatMul/Gemm nodes quantized dynamically"


def _weight_only_plan(ctx: Context, model: ir.Model):
    return plan_weight_only(model, ctx.excluded, ctx.config)


def _collect_hessians(ctx: Context) -> str:
    if ctx.data.source is None:
        raise UsageError("`weight_algorithm` gptq needs calibration data (`dataset`): the activations of "
                         "each MatMul's input; use rtn without data")
    inputs = [n.inputs[0].name for n in ctx.plan.quantized_nodes]
    ctx.hessians, count = collect_hessians(ctx.stage1, inputs, ctx.data.stream())
    return f"X^T X of {len(ctx.hessians)} activations over {count} samples"


def _quantize_weights(ctx: Context) -> str:
    model = ir.from_proto(at_opset(ctx.stage1, WEIGHT_ONLY_OPSET, "weight-only quantization (DequantizeLinear "
                                   "with block_size)"))
    target = ctx.config.resolved_target
    plan, found = _weight_only_plan(ctx, model)
    insert_weight_only(model, found, ctx.config, ctx.hessians)
    ctx.outcome = QuantizeOutcome(finish_model(model), plan, {}, target.weights.range, target)
    record_target(ctx.outcome.model, target)
    return f"{len(plan.quantized_nodes)} MatMul/Gemm weights quantized to {ctx.config.weight_bits} bits"


def _kernel_report(kernels: tuple[str, ...]) -> Step:
    return _fusion_step(lambda model, plan: kernel_report(model, plan, kernels), "/".join(kernels))


def _replaced(steps: Sequence[Step], by: Mapping[str, Step | None]) -> tuple[Step, ...]:
    """``steps`` with the steps named in ``by`` replaced (None: removed)."""
    return tuple(by[s.name] if s.name in by else s for s in steps if by.get(s.name, s) is not None)


_NO_CALIBRATION = {"prepare_calibration": None, "collect": None, "save_calibration": None, "correct_bias": None,
                   "equalize": None, "absorb_high_bias": None, "check_equalization": None, "smooth_quant": None,
                   "adaround": None, "check_adaround": None}
_NO_RANGES = {"tensor_report": None, "save_ranges": None}
DYNAMIC_PIPELINE = (
    *_replaced(PREPARE, {**_NO_CALIBRATION, "check_stage1": _check_weighted_plan(_dynamic_plan)}),
    Step("quantize_dynamic", "quantize", _quantize_dynamic),
    *_replaced(FINISH, {**_NO_RANGES, "fusion_report": _kernel_report(DYNAMIC_KERNELS)}),
)
WEIGHT_ONLY_PIPELINE = (
    *_replaced(PREPARE, {**_NO_CALIBRATION, "check_stage1": _check_weighted_plan(_weight_only_plan)}),
    Step("collect_hessians", "calibrate", _collect_hessians, lambda ctx: ctx.config.weight_algorithm == "gptq"),
    Step("quantize_weights", "quantize", _quantize_weights),
    *_replaced(FINISH, {**_NO_RANGES, "fusion_report": _kernel_report(WEIGHT_ONLY_KERNELS)}),
)
MODE_PIPELINES = {"static": PIPELINE, "dynamic": DYNAMIC_PIPELINE, "weight-only": WEIGHT_ONLY_PIPELINE}


def steps_for(config: QuantizationConfig) -> tuple[Step, ...]:
    """The declared steps of ``config.mode``."""
    return MODE_PIPELINES[config.mode]


def with_steps(steps: Sequence[Step], after: str, extra: Sequence[Step]) -> tuple[Step, ...]:
    """``steps`` with ``extra`` inserted after the step named ``after``."""
    names = [s.name for s in steps]
    index = names.index(after) + 1
    return (*steps[:index], *extra, *steps[index:])


def new_context(model, config: QuantizationConfig, inputs: CalibrationInputs | None = None,
                outputs: Outputs | None = None, **extra) -> Context:
    inputs = inputs or CalibrationInputs()
    ctx = Context(config=config, source=model, inputs=inputs, outputs=outputs or Outputs(), **extra)
    ctx.data = DataSource(inputs.data, keep=max(config.report_samples, ctx.outputs.fidelity_samples),
                          spread=config.accuracy_samples)
    return ctx


def run(ctx: Context, steps: Sequence[Step] | None = None) -> Context:
    """Run ``steps`` (default: the pipeline of the configuration's mode) over ``ctx``; on
    any failure (or Ctrl-C) nothing staged is written."""
    steps = tuple(steps) if steps is not None else steps_for(ctx.config)
    ctx.pipeline = steps
    try:
        return run_steps(steps, ctx)
    except BaseException:
        ctx.transaction.abort()
        raise


@dataclass
class QuantizationResult:
    model: onnx.ModelProto
    ranges: dict[str, tuple[float, float]]
    summary: Mapping = None


def quantize_model(
    model,
    dataset=None,
    method: str | None = None,
    *,
    config: QuantizationConfig | None = None,
    percentage: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    target=None,
    activation_dtype: str | None = None,
    weight_range: str | None = None,
    exclude: Iterable[str] | None = None,
    show_progress: bool | None = None,
    load_calibration: Sequence = (),
    save_calibration=None,
    ranges: Mapping[str, Sequence[float]] | None = None,
    range_overrides: Mapping[str, Sequence[float]] | None = None,
    protect: bool | None = None,
    report_samples: int | None = None,
    strict: bool | None = None,
    client=None,
    mode: str | None = None,
    weight_bits: int | None = None,
    block_size: int | None = None,
    weight_symmetric: bool | None = None,
    weight_signed: bool | None = None,
    weight_algorithm: str | None = None,
    embeddings: bool | None = None,
    wide_tensors: Iterable[str] | None = None,
    integer_outputs: Iterable[str] | None = None,
) -> QuantizationResult:
    """optimize -> calibrate -> quantize, as the pipeline's steps.

    ``config`` is the typed configuration; the keyword arguments build one (or change the
    given one; None leaves a field as it is, so ``method`` defaults to auto).  ``dataset`` is a folder or an iterable of samples (or None when the
    statistics come from ``load_calibration`` states, or the ranges are given directly).
    ``save_calibration`` writes the state so other methods can reuse it without a model run.
    ``range_overrides`` replaces the ranges of the named tensors after calibration, e.g.
    ``{"x": (0, 1)}`` so that a uint8 input's parameters are exactly scale 1/255, zero point 0.
    ``exclude``: node names, op types or fnmatch globs to keep float.  ``protect`` keeps
    float the shared-parameter nodes whose one scale would crush a tensor (protect.py).
    ``report_samples`` > 0 adds ``summary["tensors"]``: per-tensor SQNR on that many samples.
    ``target``: the backend (default "ort-cpu", resolved for this machine; "tensorrt",
    "tflite", or a target file); ``activation_dtype``/``weight_range`` override its choice.
    ``client``: a ``dask.distributed.Client`` whose workers calibrate (``dataset`` a path
    they all read); the model is byte-identical to a run without it.
    ``mode``: "static" (default), "dynamic" (no calibration; ``dataset`` only checks the
    result) or "weight-only" (``weight_bits``, ``block_size``, ``weight_symmetric``,
    ``weight_signed``, ``weight_algorithm``, ``embeddings``: see QuantizationConfig).
    ``wide_tensors``: tensors quantized at the target's 16-bit activation type.
    ``integer_outputs``: graph outputs that will be made integer (the model editor): they
    keep their Q/DQ where the target would leave an output only float ops read in float.
    """
    config = QuantizationConfig.build(
        config, method=method, percentile=percentage, input_shapes=input_shapes, target=target,
        activation_dtype=activation_dtype, weight_range=weight_range, exclude=exclude,
        show_progress=show_progress, range_overrides=range_overrides, protect=protect,
        report_samples=report_samples, strict=strict, mode=mode, weight_bits=weight_bits, block_size=block_size,
        weight_symmetric=weight_symmetric, weight_signed=weight_signed, weight_algorithm=weight_algorithm,
        embeddings=embeddings, wide_tensors=wide_tensors,
        integer_outputs=tuple(integer_outputs) if integer_outputs is not None else None)
    inputs = CalibrationInputs(dataset, load_calibration, ranges)
    ctx = run(new_context(model, config, inputs, Outputs(save_calibration=save_calibration), client=client))
    return QuantizationResult(ctx.outcome.model, ctx.ranges, ctx.summary)


def calibrate_model(model, dataset, *, config: QuantizationConfig | None = None, save_calibration=None,
                    load_calibration: Sequence = (), client=None, **changes) -> CalibrationState:
    """Stages 1 and 2 only: the calibration state of ``model`` over ``dataset`` (e.g. one
    shard: ``DataSpec(path, DataOptions(shard=(i, n)))``), written to ``save_calibration``
    when given.  States of disjoint shards, merged (``load_calibration`` of
    ``quantize_model``), are exactly the state of one run over all of them.  ``changes``
    are QuantizationConfig fields (``target``, ``input_shapes``, ``exclude``, ...): the ones
    that decide the stage-1 model and the calibrated tensors must match the later run.
    ``client``: a ``dask.distributed.Client`` whose workers calibrate."""
    config = QuantizationConfig.build(config, **changes)
    ctx = run(new_context(model, config, CalibrationInputs(dataset, load_calibration),
                          Outputs(save_calibration=save_calibration), keep_histograms=True, client=client), CALIBRATE)
    return ctx.calibrator.state
