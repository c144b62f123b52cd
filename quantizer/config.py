"""What the user asks for, as typed configuration.

``QuantizationConfig`` is built once (by ``quantize_model``, ``autotune`` or the CLI) and
handed to the pipeline; every step reads its choices from it.  Construction validates
every field, so a bad value fails before any model is read, with a message that names the
parameter (the CLI maps parameter names to its flags).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantizer.calibrators import CalibrationMethod, range_function

from .errors import UsageError, calibrator_errors
from .targets import (
    ACTIVATION_DTYPES,
    DEFAULT_TARGET,
    MODES,
    WEIGHT_QMAX,
    Target,
    TargetError,
    load_target,
)

AUTO = "auto"  # loss-aware choice among the methods' ranges (algorithms/loss_aware.py)
DEFAULT_PERCENTILE = 99.99
DEFAULT_MIN_SQNR_DB = 10.0
DEFAULT_FIDELITY_SAMPLES = 4
# Weight-only quantization: bits, block sizes along the reduction axis (onnxruntime fuses
# DequantizeLinear with a power-of-two block_size >= 16 into MatMulNBits), algorithms.
WEIGHT_BITS = (8, 4)
DEFAULT_WEIGHT_ONLY_BITS = 4
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
WEIGHT_ALGORITHMS = ("rtn", "gptq")  # round to nearest; GPTQ (uses calibration activations)
DEFAULT_ADAROUND_ITERATIONS = 500
DEFAULT_ACCURACY_SAMPLES = 8  # what the accuracy steps measure on; 4 let PP-OCRv5 det swing 9.2 -> 8.5 dB (hmean 89 -> 52 %) with the picks
# Bundles of parameters a run can ask for by name (`preset`): data, not branches.  A preset
# sets the parameters that are not given (None); given ones keep their values.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "accurate": {"adaround": True},  # AdaRound on (slower: see the README's accuracy steps)
}
PRESET_FALLBACKS = {"adaround": False}  # what a parameter a preset may set is when nothing sets it


@dataclass(frozen=True)
class Scope:
    """Nodes to keep float: names, op types or fnmatch globs (``conv1``, ``Softmax``,
    ``head/*``), matched against the stage-1 model's node names."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def of(cls, value: Scope | str | Iterable[str] | None) -> Scope:
        if isinstance(value, Scope):
            return value
        if value is None:
            return cls()
        items = [value] if isinstance(value, str) else list(value)
        if not all(isinstance(p, str) for p in items):
            raise UsageError(f"`exclude` takes node names, op types or globs (strings), got {items!r}")
        return cls(tuple(dict.fromkeys(items)))


def parse_method(value) -> CalibrationMethod | str:
    """AUTO or one of the ten methods (case-insensitive); one line naming them all when
    the name is unknown."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        with calibrator_errors():
            method = CalibrationMethod.parse(value)
            range_function(method)  # an unimplemented method fails before any work
    except UsageError as exc:
        raise UsageError(str(exc).replace("choose one of: ", f"choose {AUTO} or one of: ")) from exc
    return method


def method_name(method: CalibrationMethod | str) -> str:
    return method if method == AUTO else method.value.lower()


def _range_pair(name: str, pair, what: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in pair)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} for '{name}' must be two numbers (min, max), got {pair!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise UsageError(f"{what} for '{name}' must be finite with min <= max, got ({low}, {high})")
    return low, high


def _shapes(value: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, dims in (value or {}).items():
        try:
            shape = tuple(int(d) for d in dims)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"`input_shapes` for '{name}' must be integers, got {dims!r}") from exc
        if any(d <= 0 for d in shape):
            raise UsageError(f"`input_shapes` for '{name}' must be positive integers: {list(shape)}")
        shapes[name] = shape
    return shapes


@dataclass(frozen=True)
class QuantizationConfig:
    """Every choice of a quantization run.

    method: calibration method: "auto" (each tensor's range chosen among the methods'
    ranges by the error of the block that reads it, on `accuracy_samples` samples) or one of
    the ten names (any case), which keeps its exact meaning.
    accuracy_samples: calibration samples the accuracy steps measure on (the ``auto``
    method's blocks, bias correction's output shifts), spread evenly over the data
    (DataSource.spread_samples).
    bias_correction: subtract from each Conv/Gemm bias the mean output shift its weight
    rounding causes (algorithms/bias_correction.py), kept only if the quantized model's
    outputs are closer to float with it.
    equalize: cross-layer equalization of Conv/Gemm/MatMul pairs joined by Relu-like
    activations (exact in float) before calibration, with high-bias absorption measured on
    `accuracy_samples` samples (algorithms/equalization.py); kept only if the quantized
    model's outputs are at least as close to float with it.
    smooth_quant: SmoothQuant (algorithms/smooth_quant.py): divide each MatMul/Gemm input
    by per-channel factors folded into the op that produces it, multiply the weight rows
    by them, where that lowers the layer's quantized error on `accuracy_samples` samples;
    before calibration, so the ranges are those of the smoothed model.
    smooth_alpha: SmoothQuant's migration strength in [0, 1] for every layer (None:
    searched per layer, and a layer is smoothed only where it measurably helps).
    smooth_insert: SmoothQuant also where no fold exists (a Gelu, Softmax or graph input
    produces the tensor, or it has other readers): a float Mul by 1 / s runs before the
    MatMul/Gemm readers.
    adaround: choose each Conv/Gemm/MatMul weight's rounding (down or up) by the layer's
    output error on the accuracy samples (algorithms/adaround.py), kept only if the
    quantized model's outputs are not further from float with it.
    adaround_iterations: Adam steps per layer of AdaRound (the time it takes grows with them).
    preset: a named bundle of parameters (``PRESETS``: "default", "accurate"), setting the
    parameters not given (``adaround``); given ones keep their values.
    percentile: for the PERCENTILE methods, in (0, 100].
    input_shapes: fixed shapes for dynamic inputs, ``{"x": (1, 3, 224, 224)}``.
    target: the backend to quantize for: a preset name ("ort-cpu", the default, resolved
    for this machine; "tensorrt", "tflite", ...), a TOML/JSON target file or a Target.
    activation_dtype: "int8" or "uint8" (None: the target's choice; else checked against it).
    weight_range: "full", "reduced" or "auto" (None/"auto": the target's choice).
    exclude: nodes kept float (a Scope, or names/op types/globs).
    protect: keep float the nodes whose int8 scale would crush a tensor.
    protect_normalization: keep normalization arithmetic (mean, variance, 1/sqrt written
    out as ops) float on every target (algorithms/normalization.py).
    report_samples: samples for the per-tensor SQNR report (0: no report).
    range_overrides: ``{tensor: (min, max)}`` replacing calibrated ranges.
    show_progress: progress bar on stderr (None: when stderr is a terminal).
    strict: results that are otherwise warnings fail the run (StrictError, exit code 5):
    an output below `min_sqnr_db`, no fidelity check possible, an `exclude` pattern that
    matches nothing, a crushed tensor that protection cannot save, a percentile below 1.
    mode: "static" (Q/DQ with calibrated activation ranges), "dynamic" (per-channel int8
    MatMul/Gemm weights, activations quantized at run time: no calibration) or
    "weight-only" (block-quantized int8/int4 MatMul/Gemm weights, float activations);
    the target must list the mode.
    weight_bits: 8 or 4, weight-only mode (default 4).
    block_size: weights per scale along the reduction axis, weight-only mode (default 32).
    weight_symmetric: weight-only zero points: symmetric (zero point at the middle of
    the grid) or asymmetric (default: a zero point per block, min..max; onnxruntime's
    MatMulNBits default too, and 1.3 dB more output SQNR on the MiniLM encoder).
    weight_signed: weight-only integer type int4/int8 (True) or uint4/uint8 (False).
    weight_algorithm: weight-only rounding: "rtn" (round to nearest) or "gptq" (error
    feedback over the calibration activations: needs data).
    wide_tensors: static mode: activation tensors quantized at the target's 16-bit type
    (`activations.wide_dtype`: int16 for tflite) instead of 8 bits.
    integer_outputs: graph outputs the deployment reads as integers (the model editor
    makes them uint8/int8): they keep their Q/DQ where the target leaves a result that
    only float ops read in float (`placement.float_when_unread`).
    embeddings: dynamic and weight-only: also the constant tables Gather reads rows of
    (embeddings), as onnxruntime's GatherBlockQuantized, at 8 bits whatever `weight_bits`
    says (their rows feed a LayerNorm directly: 4-bit tables cost 2.2 dB of output SQNR on
    MiniLM).
    """

    method: CalibrationMethod | str = AUTO
    accuracy_samples: int = DEFAULT_ACCURACY_SAMPLES
    percentile: float = DEFAULT_PERCENTILE
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    target: Any = DEFAULT_TARGET
    activation_dtype: str | None = None
    weight_range: str | None = None
    exclude: Scope = Scope()
    protect: bool = True
    protect_normalization: bool = True
    bias_correction: bool = True
    equalize: bool = False
    smooth_quant: bool = False
    smooth_alpha: float | None = None
    smooth_insert: bool = False
    adaround: bool | None = None  # None: the preset's value, else False
    adaround_iterations: int = DEFAULT_ADAROUND_ITERATIONS
    preset: str | None = None
    report_samples: int = 0
    range_overrides: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    show_progress: bool | None = None
    strict: bool = False
    mode: str = "static"
    weight_bits: int | None = None
    block_size: int | None = None
    weight_symmetric: bool = False
    weight_signed: bool = True
    weight_algorithm: str = "rtn"
    embeddings: bool = True
    wide_tensors: tuple[str, ...] = ()
    integer_outputs: tuple[str, ...] = ()
    # The target with the overrides applied: what the steps read (set in __post_init__).
    resolved_target: Target = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalize once, here
        self._apply_preset()
        set_(self, "method", parse_method(self.method))
        if isinstance(self.accuracy_samples, bool) or not isinstance(self.accuracy_samples, int) or self.accuracy_samples < 1:
            raise UsageError(f"`accuracy_samples` must be an integer >= 1, got {self.accuracy_samples!r}")
        if self.smooth_alpha is not None:
            if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) \
                    or not 0.0 <= self.smooth_alpha <= 1.0:
                raise UsageError(f"`smooth_alpha` must be a number in [0, 1] or None, got {self.smooth_alpha!r}")
            set_(self, "smooth_alpha", float(self.smooth_alpha))
        try:
            percentile = float(self.percentile)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"`percentile` must be a number in (0, 100], got {self.percentile!r}") from exc
        if not 0 < percentile <= 100:
            raise UsageError(f"`percentile` must be in (0, 100], got {self.percentile}")
        set_(self, "percentile", percentile)
        set_(self, "input_shapes", _shapes(self.input_shapes))
        if self.activation_dtype is not None and self.activation_dtype not in ACTIVATION_DTYPES:
            raise UsageError(f"`activation_dtype` must be one of {', '.join(ACTIVATION_DTYPES)}, "
                             f"got {self.activation_dtype!r}")
        if self.weight_range is not None and self.weight_range not in (*WEIGHT_QMAX, "auto"):
            raise UsageError(f"`weight_range` must be full, reduced or auto, got {self.weight_range!r}")
        try:
            target = load_target(self.target)
            set_(self, "target", target)
            integer_outputs = (self.integer_outputs,) if isinstance(self.integer_outputs, str) else tuple(self.integer_outputs or ())
            set_(self, "integer_outputs", integer_outputs)
            set_(self, "resolved_target", replace(target.choose(self.activation_dtype, self.weight_range),
                                                  integer_outputs=frozenset(integer_outputs)))
        except TargetError as exc:
            raise UsageError(f"`target`: {exc}") from exc
        set_(self, "exclude", Scope.of(self.exclude))
        self._check_mode()
        wide = (self.wide_tensors,) if isinstance(self.wide_tensors, str) else tuple(self.wide_tensors or ())
        set_(self, "wide_tensors", tuple(dict.fromkeys(wide)))
        if wide and self.resolved_target.activations.wide is None:
            raise UsageError(f"target {self.resolved_target.name} declares no 16-bit activations "
                             "(`wide_tensors` needs `activations.wide_dtype` in the target)")
        if wide and self.mode != "static":
            raise UsageError("`wide_tensors` is for `mode` static")
        if not isinstance(self.report_samples, int) or self.report_samples < 0:
            raise UsageError(f"`report_samples` must be an integer >= 0, got {self.report_samples!r}")
        set_(self, "range_overrides", {n: _range_pair(n, r, "`range_overrides`")
                                       for n, r in (self.range_overrides or {}).items()})

    def _apply_preset(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise UsageError(f"`preset` must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        bundle = PRESETS[self.preset] if self.preset is not None else {}
        for name, fallback in PRESET_FALLBACKS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, bundle.get(name, fallback))
        if isinstance(self.adaround_iterations, bool) or not isinstance(self.adaround_iterations, int) \
                or self.adaround_iterations < 1:
            raise UsageError(f"`adaround_iterations` must be an integer >= 1, got {self.adaround_iterations!r}")

    @property
    def method_name(self) -> str:
        """The method as users write it: "auto", "mse_asym", ..."""
        return method_name(self.method)

    def _check_mode(self) -> None:
        mode = str(self.mode).lower().replace("_", "-")
        if mode not in MODES:
            raise UsageError(f"`mode` must be one of {', '.join(MODES)}, got {self.mode!r}")
        object.__setattr__(self, "mode", mode)
        if mode not in self.resolved_target.modes:
            raise UsageError(f"target {self.resolved_target.name} does not run `mode` {mode}: it runs "
                             f"{', '.join(self.resolved_target.modes)}")
        weight_only = {"weight_bits": self.weight_bits, "block_size": self.block_size}
        weight_only.update({k: getattr(self, k) for k, default in
                            (("weight_symmetric", False), ("weight_signed", True), ("weight_algorithm", "rtn"))
                            if getattr(self, k) != default})
        if mode != "weight-only":
            given = [k for k, v in weight_only.items() if v is not None]
            if given:
                raise UsageError(f"`{given[0]}` is for `mode` weight-only (this run's mode is {mode})")
            return
        bits = DEFAULT_WEIGHT_ONLY_BITS if self.weight_bits is None else self.weight_bits
        if bits not in WEIGHT_BITS or isinstance(bits, bool):
            raise UsageError(f"`weight_bits` must be 8 or 4, got {self.weight_bits!r}")
        block = DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size
        if block not in BLOCK_SIZES or isinstance(block, bool):
            raise UsageError(f"`block_size` must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size!r}")
        if self.weight_algorithm not in WEIGHT_ALGORITHMS:
            raise UsageError(f"`weight_algorithm` must be one of {', '.join(WEIGHT_ALGORITHMS)}, "
                             f"got {self.weight_algorithm!r}")
        object.__setattr__(self, "weight_bits", bits)
        object.__setattr__(self, "block_size", block)

    def with_(self, **changes: Any) -> QuantizationConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def build(cls, config: QuantizationConfig | None = None, **changes: Any) -> QuantizationConfig:
        """``config`` (or the defaults) with the fields of ``changes`` that are not None."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return config.with_(**changes) if config is not None else cls(**changes)


@dataclass(frozen=True)
class CalibrationInputs:
    """Where the statistics come from: samples (a folder or an iterable), saved states
    to merge, or ranges given directly (no calibration run)."""

    data: Any = None
    states: tuple = ()
    ranges: Mapping[str, Sequence[float]] | None = None

    def __post_init__(self):
        states = self.states
        if isinstance(states, (str, os.PathLike)):
            states = (states,)
        object.__setattr__(self, "states", tuple(states or ()))


_FILES = ("model", "report", "save_ranges", "save_calibration")


@dataclass(frozen=True)
class Outputs:
    """Files a run writes; every one is written atomically, and none may be another's
    file or the input model's (checked before any work)."""

    model: Path | None = None
    report: Path | None = None
    save_ranges: Path | None = None
    save_calibration: Path | None = None
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB
    fidelity_samples: int = DEFAULT_FIDELITY_SAMPLES  # calibration samples the written model is checked on

    def __post_init__(self):
        for f in _FILES:
            value = getattr(self, f)
            if value is not None:
                object.__setattr__(self, f, Path(value))
        try:
            floor = float(self.min_sqnr_db)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"`min_sqnr_db` must be a number, got {self.min_sqnr_db!r}") from exc
        if math.isnan(floor):
            raise UsageError("`min_sqnr_db` must be a number, got nan")
        object.__setattr__(self, "min_sqnr_db", floor)
        if isinstance(self.fidelity_samples, bool) or not isinstance(self.fidelity_samples, int) \
                or self.fidelity_samples < 1:
            raise UsageError(f"`fidelity_samples` must be an integer >= 1, got {self.fidelity_samples!r}")

    def files(self) -> dict[str, Path]:
        """{parameter name: path} of the files this run writes."""
        return {f: getattr(self, f) for f in _FILES
                if getattr(self, f) is not None}
