"""Accuracy-driven tuning, after Intel Neural Compressor's autotune.

Evaluate the float model, then quantize with one calibration method after another, then
with the accuracy algorithms the configuration leaves off (``ALGORITHMS``: equalization,
SmoothQuant, AdaRound, each alone on the best method so far, then together), and then,
for twice as many of the most damaging nodes each round, first raise their output tensors
to the target's 16 bits (where it declares them) and then keep them float, until a trial's
metric is within ``tolerable_loss`` (relative) of the float metric or ``max_trials`` have
run.  The method trials share one calibration pass: every method's ranges come from the
same collected histograms, and each trial only re-plans and re-inserts Q/DQ.  Equalization
and SmoothQuant change the model calibration observes, so their trials calibrate again
(once each); AdaRound changes weights after calibration and shares the calibration of the
trial it is added to.  An algorithm with nothing to change on the model is skipped
without a trial, and so is one whose own check drops it.
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
from .algorithms import adaround, equalization, smooth_quant
from .config import CalibrationInputs, Outputs, QuantizationConfig
from .context import Context
from .errors import UsageError, first_line
from .pipeline import QuantizationResult
from .report import DEFAULT_REPORT_SAMPLES, report_summary, sqnr_lost

DEFAULT_METHODS = ("auto", "MIN_MAX_ASYM", "PERCENTILE_ASYM", "ENTROPY_ASYM", "MSE_ASYM", "SQNR_ASYM")
FALLBACK_REASON = "autotune fallback (kept float to meet the accuracy goal)"
# The accuracy algorithms autotune tries (QuantizationConfig switches), in this order: the
# cheapest first, AdaRound (seconds to minutes of optimization) last.
ALGORITHMS = ("equalize", "smooth_quant", "adaround")
RECALIBRATING = frozenset({"equalize", "smooth_quant"})  # they change the model calibration observes
REPLAY_BUDGET = 1 << 30  # bytes of a one-shot data iterator held so the algorithm trials can calibrate again
# The steps whose records say what an algorithm did in a trial (the first that ran).
_VERDICT_STEPS = {"equalize": ("check_equalization", "equalize"), "smooth_quant": ("smooth_quant",),
                  "adaround": ("check_adaround", "adaround")}
_NOTHING_DONE = {"equalize": "equalized no pair", "smooth_quant": "smoothed no input (no alpha lowers a layer's error)",
                 "adaround": "rounded no weight"}


@dataclass
class Trial:
    number: int
    method: str
    excluded: list[str]  # nodes this trial kept float, beyond exclude= and protection
    metric: float
    passed: bool
    loss: float | None = None  # (float metric - metric) / |float metric|; None if that is 0
    wide: list[str] = field(default_factory=list)  # tensors this trial raised to the target's 16 bits
    algorithms: list[str] = field(default_factory=list)  # accuracy algorithms this trial added (and kept)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Skipped:
    """An algorithm trial that was not evaluated (no trial spent on it), and why."""

    algorithms: list[str]
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TuneResult(QuantizationResult):
    """The chosen model (the first trial that passed, else the best metric), every trial,
    and the algorithm trials skipped."""

    trials: list[Trial] = field(default_factory=list)
    baseline: float = math.nan  # the float model's metric
    passed: bool = False
    best: Trial | None = None
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class _Prepared:
    """A calibrated context, not yet quantized, that trials fork (the run's own or an
    algorithm trial's), its configuration, and the algorithms it added that changed the model."""

    ctx: Context
    config: QuantizationConfig
    algorithms: tuple[str, ...] = ()


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


def _algorithm_names(algorithms) -> tuple[str, ...]:
    """The requested algorithms (None: all of ``ALGORITHMS``), in the order they are tried."""
    if algorithms is None:
        return ALGORITHMS
    names = [algorithms] if isinstance(algorithms, str) else list(algorithms)
    for name in names:
        if name not in ALGORITHMS:
            raise UsageError(f"`algorithms`: unknown accuracy algorithm {name!r}; choose among "
                             f"{', '.join(ALGORITHMS)} (or none)")
    return tuple(a for a in ALGORITHMS if a in names)


def _nothing_to_do(ctx: Context, name: str) -> str | None:
    """Why the algorithm ``name`` cannot change the model of this run (None: it may), from
    the run's stage-1 model and plan before calibration."""
    config = ctx.config
    if getattr(config, name):
        return f"already on in every trial (`{name}`)"
    if name in RECALIBRATING and ctx.outputs.save_calibration is not None:
        return "the calibration state the run saves (`save_calibration`) is of the model without it"
    keep = ctx.excluded | set(ctx.keep_float)
    if name == "equalize" and not equalization.find_pairs(ctx.model.graph)[0]:
        return "no pair of Conv/Gemm/MatMul layers joined by a Relu-like activation (or directly) to equalize"
    if name == "smooth_quant" and not smooth_quant.candidates(ctx.stage1, ctx.plan, keep, config.smooth_insert):
        return "no quantized MatMul/Gemm activation input it can smooth"
    if name == "adaround" and not adaround.roundable(ctx.stage1, ctx.plan, config.resolved_target.weights):
        return "no quantized Conv/Gemm/MatMul int8 weight to round"
    return None


def _changed(ctx: Context, names: Sequence[str]) -> tuple[str, ...]:
    """The algorithms of ``names`` that changed ``ctx``'s model (their checks kept them)."""
    done = {
        "equalize": ctx.equalization is not None and bool(ctx.equalization.pairs) and ctx.equalization.kept is not False,
        "smooth_quant": ctx.smoothing is not None and ctx.smoothing.kept is True,
        "adaround": ctx.rounding is not None and bool(ctx.rounding.weights) and ctx.rounding.kept is not False,
    }
    return tuple(name for name in names if done[name])


def _verdicts(ctx: Context, names: Sequence[str]) -> str:
    """What each of ``names`` did in ``ctx``, as the step that decided it said."""
    said = {record["step"]: record["changed"] for record in ctx.steps}
    parts = []
    for name in names:
        text = next((said[step] for step in _VERDICT_STEPS[name] if said.get(step)), None)
        parts.append(f"{name}: {text or _NOTHING_DONE[name]}")
    return "; ".join(parts)


class _Search:
    """One autotune run's trials: each evaluated, the best so far, the algorithm trials skipped."""

    def __init__(self, eval_fn, baseline: float, tolerable_loss: float, max_trials: int,
                 on_trial: Callable[[Trial], None] | None, on_skip: Callable[[Skipped], None] | None):
        self.eval_fn, self.baseline, self.max_trials = eval_fn, baseline, max_trials
        self.floor = baseline - tolerable_loss * abs(baseline)
        self.on_trial, self.on_skip = on_trial, on_skip
        self.trials: list[Trial] = []
        self.skipped: list[Skipped] = []
        self.best: tuple[Trial, Context, _Prepared] | None = None  # the trial, its context, what it forked
        self.models: dict[frozenset, int] = {}  # the algorithms of an algorithm trial -> its number

    @property
    def full(self) -> bool:
        return len(self.trials) >= self.max_trials

    def attempt(self, prepared: _Prepared, config: QuantizationConfig | None = None,
                fallback: Sequence[str] = ()) -> Trial:
        config = prepared.config if config is None else config
        trial_ctx = prepared.ctx.fork(config=config,
                                      keep_float={**prepared.ctx.keep_float, **dict.fromkeys(fallback, FALLBACK_REASON)})
        pipeline.run_steps(pipeline.QUANTIZE, trial_ctx)
        metric = _metric(self.eval_fn(trial_ctx.outcome.model), f"trial {len(self.trials) + 1}")
        loss = (self.baseline - metric) / abs(self.baseline) if self.baseline else None
        trial = Trial(len(self.trials) + 1, config.method_name, list(fallback), metric, metric >= self.floor, loss,
                      list(config.wide_tensors), list(prepared.algorithms))
        self.trials.append(trial)
        if self.on_trial is not None:
            self.on_trial(trial)
        if self.best is None or trial.passed or metric > self.best[0].metric:
            self.best = (trial, trial_ctx, prepared)
        return trial

    def skip(self, algorithms: Sequence[str], reason: str) -> None:
        skipped = Skipped(list(algorithms), reason)
        self.skipped.append(skipped)
        if self.on_skip is not None:
            self.on_skip(skipped)

    def new_model(self, added: Sequence[str], found: Sequence[str], trial_ctx: Context) -> bool:
        """Whether the algorithms ``found`` effective (of ``added``) make a model no trial has
        evaluated; if not, the skip is recorded with what the checks said."""
        said = _verdicts(trial_ctx, [a for a in added if a not in found])
        if not found:
            self.skip(added, said)
            return False
        number = self.models.get(frozenset(found))
        if number is not None:
            self.skip(added, f"{said}; the rest is trial {number}'s model")
            return False
        return True


def _try_algorithms(search: _Search, ctx: Context, start: Context, dimensions: Sequence[tuple[str, str | None]],
                    method_config: QuantizationConfig) -> bool:
    """The algorithm trials, after the method trials: each algorithm of ``dimensions`` that
    can change the model, alone on ``method_config``, then those that did together; True
    when one passed.  ``start``: ``ctx`` right after stage 1's optimizer, where a trial that
    calibrates again begins."""
    calibrated = {frozenset(): _Prepared(ctx, method_config)}  # by the recalibrating algorithms they hold

    def prepare(added: tuple[str, ...]) -> _Prepared | None:
        config = method_config.with_(**dict.fromkeys(added, True))
        again = tuple(a for a in added if a in RECALIBRATING)
        rest = tuple(a for a in added if a not in RECALIBRATING)
        source = calibrated.get(frozenset(again))
        if source is not None:  # only AdaRound is new: it shares that calibration
            trial_ctx = pipeline.rounded(source.ctx, config)
            found = (*source.algorithms, *_changed(trial_ctx, rest))
        else:
            trial_ctx = pipeline.recalibration(start, config, ctx)
            before, after = pipeline.recalibration_steps(optimize=ctx.conservative and not start.conservative)
            pipeline.run_steps(before, trial_ctx)  # the checks of equalization and SmoothQuant come before calibration
            kept = _changed(trial_ctx, again)
            if not search.new_model(added, kept + rest, trial_ctx):
                return None
            if kept != again and frozenset(kept) in calibrated:  # a check dropped one: the rest is calibrated
                return prepare(kept + rest)
            pipeline.run_steps(after, trial_ctx)
            found = _changed(trial_ctx, added)
        if not search.new_model(added, found, trial_ctx):
            return None
        prepared = _Prepared(trial_ctx, config, found)
        if not set(found) - RECALIBRATING:
            calibrated[frozenset(found)] = prepared
        return prepared

    def evaluate(prepared: _Prepared) -> bool:
        trial = search.attempt(prepared)
        search.models[frozenset(prepared.algorithms)] = trial.number
        return trial.passed

    alone = []
    for name, reason in dimensions:
        if search.full:
            return False
        if reason is None and name in RECALIBRATING and not ctx.data.replayable:
            reason = (f"the data is a one-shot iterator of more than {REPLAY_BUDGET >> 20} MiB, which cannot be read "
                      "again for the trial's calibration (a list or a folder can)")
        if reason is not None:
            search.skip([name], reason)
            continue
        prepared = prepare((name,))
        if prepared is None:
            continue
        alone.append(name)
        if evaluate(prepared):
            return True
    if len(alone) > 1 and not search.full:
        prepared = prepare(tuple(alone))
        if prepared is not None and evaluate(prepared):
            return True
    return False


def _fall_back(search: _Search, data, sensitivity_samples: int) -> bool:
    """From the best trial so far: 16 bits for, then float, the most damaging 1, 2, 4, ...
    fallback units (never all of the quantized nodes: that is the float model); True when
    a trial passed."""
    _, base_ctx, source = search.best
    entries = report_summary(base_ctx.stage1, base_ctx.outcome, data.samples(sensitivity_samples),
                             base_ctx.ranges, sensitivity_samples)["tensors"]
    order = fallback_order(base_ctx.stage1, base_ctx.outcome.plan, entries)
    wide_dtype = base_ctx.config.resolved_target.activations.wide
    _, damaged_tensor = _damage(base_ctx.stage1, base_ctx.outcome.plan, entries)  # what 16 bits would widen
    quantized = {node.name for node in base_ctx.outcome.plan.quantized_nodes}
    size = 1
    tried: list[str] | None = None
    while size <= len(order) and not search.full:
        units = order[:size]
        nodes = list(dict.fromkeys(n for unit in units for n in unit))
        if nodes == tried:  # the new units were inside the earlier ones: nothing to evaluate
            size = min(2 * size, len(order)) if size < len(order) else size + 1
            continue
        tried = nodes
        wide = list(dict.fromkeys(damaged_tensor[unit[0]] for unit in units))
        if wide_dtype and wide and search.attempt(source, base_ctx.config.with_(wide_tensors=tuple(wide))).passed:
            return True  # 16 bits on the sensitive tensors was enough: no node kept float
        if search.full or quantized <= set(nodes):
            break  # every quantized node float would be the float model: not a quantization
        if search.attempt(source, base_ctx.config, nodes).passed:
            return True
        if size == len(order):
            break
        size = min(2 * size, len(order))
    return False


def autotune(model, data, eval_fn: Callable[[onnx.ModelProto], float], tolerable_loss: float = 0.01,
             max_trials: int = 10, methods: Iterable = DEFAULT_METHODS, *,
             config: QuantizationConfig | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None, target=None, activation_dtype: str | None = None,
             weight_range: str | None = None, exclude: Iterable[str] | None = None, protect: bool | None = None,
             percentage: float | None = None, report_samples: int = DEFAULT_REPORT_SAMPLES,
             show_progress: bool | None = None, outputs: Outputs | None = None, strict: bool | None = None,
             on_trial: Callable[[Trial], None] | None = None, client=None, algorithms: Iterable[str] | None = None,
             on_skip: Callable[[Skipped], None] | None = None) -> TuneResult:
    """Find the first quantization whose ``eval_fn`` metric (higher is better) is within
    ``tolerable_loss`` (relative) of the float model's.

    Trials: each of ``methods`` in order; then, on the method with the best metric, each of
    ``algorithms`` (None: ``ALGORITHMS``; a subset of them, any order: they are tried in
    that order) that the configuration leaves off and that can change this model, alone,
    then those that changed it together; then, on the best trial so far, raise to 16 bits
    and keep float the first 1, 2, 4, 8, ... units of ``fallback_order`` (doubling, so a
    loss spread over many layers is reached within a few trials).  An algorithm with
    nothing to change (no pair to equalize, no input to smooth, its own check dropped it)
    is skipped without a trial: ``TuneResult.skipped`` and ``on_skip`` say why.  At most
    ``max_trials`` quantized models are evaluated (the float model is evaluated once
    more).  ``on_trial`` is called after each trial (progress output).  The run is the
    pipeline's: the same checks and refusals as ``quantize_model``, the calibration once
    for the method trials (and once more for each equalization or SmoothQuant trial), the
    quantization steps once per trial, and the result steps (``outputs``: files to write,
    with the fidelity check) once for the chosen trial.  ``client``: a
    ``dask.distributed.Client`` whose workers run the calibration.
    """
    methods = list(methods)
    if not methods:
        raise UsageError("autotune needs at least one calibration `methods` entry")
    if not isinstance(max_trials, int) or max_trials < 1:
        raise UsageError(f"`max_trials` must be a positive integer, got {max_trials!r}")
    if not (tolerable_loss >= 0):
        raise UsageError(f"`tolerable_loss` must be >= 0, got {tolerable_loss!r}")
    names = _algorithm_names(algorithms)
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
        steps = [s.name for s in pipeline.PREPARE]
        optimized, calibration = steps.index("optimize") + 1, steps.index("collect")
        pipeline.run_steps(pipeline.PREPARE[:optimized], ctx)
        start = ctx.fork()  # stage 1 as optimized: where an algorithm trial that calibrates again begins
        pipeline.run_steps(pipeline.PREPARE[optimized:calibration], ctx)
        dimensions = [(name, _nothing_to_do(ctx, name)) for name in names]
        if any(reason is None and name in RECALIBRATING for name, reason in dimensions):
            ctx.data.hold(REPLAY_BUDGET)  # a one-shot iterator's samples, for those trials' calibration
        pipeline.run_steps(pipeline.PREPARE[calibration:], ctx)
        began = time.perf_counter()
        baseline = _metric(eval_fn(ctx.original), "float model")
        search = _Search(eval_fn, baseline, tolerable_loss, max_trials, on_trial, on_skip)
        calibrated = _Prepared(ctx, configs[0])
        passed = False
        for trial_config in configs[:max_trials]:
            if search.attempt(calibrated, trial_config).passed:
                passed = True
                break
        if not passed and dimensions and not search.full:
            passed = _try_algorithms(search, ctx, start, dimensions, search.best[1].config)
        ctx.data.release()
        if not passed and not search.full:
            passed = _fall_back(search, ctx.data, sensitivity_samples)
        trial, chosen, _ = search.best
        chosen.timings["tune"] = time.perf_counter() - began
        chosen.autotune = {
            "baseline": baseline, "tolerable_loss": tolerable_loss, "max_trials": max_trials,
            "passed": passed, "chosen_trial": trial.number, "trials": [t.as_dict() for t in search.trials],
            "algorithms": list(names), "skipped": [s.as_dict() for s in search.skipped],
        }
        if not passed:
            chosen.strict_violations.append(
                f"no trial within `tolerable_loss` {tolerable_loss:g} of the float metric {baseline:.6g} after "
                f"{len(search.trials)} trials (best: trial {trial.number}, metric {trial.metric:.6g})")
        pipeline.run_steps(pipeline.FINISH, chosen)
    except BaseException:
        ctx.transaction.abort()
        raise
    return TuneResult(chosen.outcome.model, chosen.ranges, chosen.summary, trials=search.trials, baseline=baseline,
                      passed=passed, best=trial, skipped=search.skipped)


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
