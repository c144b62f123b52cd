"""`compare`: how far an int8 model's outputs are from the float model's, over a data set.

Both models run in onnxruntime with its default options (the way they are deployed) on
every sample of ``data``; per float output the measures are accumulated as the samples
stream by (sums of signal, noise, absolute error, products and norms, agreement counts,
the ``worst`` samples), so memory does not grow with the number of samples.

- SQNR (dB) over all samples: 10 log10(sum f^2 / sum (f - q)^2), inf when exact; over the
  finite values of the float output (like the fidelity check).  Also per sample, of which
  the ``worst`` (lowest) are kept with their names.
- max / mean absolute error, and the cosine similarity of the flattened outputs.
- top-1 agreement (%) for class-like outputs: rank 2, ``[batch, classes]`` with more than
  one class, argmax over the last axis, counted per row.  Higher ranks are not taken as
  classes (an NCHW map's last axis is its width, not classes).
- latency: the median seconds per sample of each model's run (the output sessions, as
  deployed), the first sample left out as warm-up when there are more, and float / int8 as
  the speedup.  One number per sample is kept (a few bytes each).  The two runs alternate
  sample by sample, so load on the machine affects both alike; it is a measurement on this
  machine, not a benchmark.
- with ``tensors``: the same sums for the intermediate float tensors both models name
  alike, worst SQNR first.  Where the int8 model rounds such a tensor T through
  QuantizeLinear -> DequantizeLinear, its DequantizeLinear output (what the next op reads)
  is compared, so the tensor's own rounding counts.  Tensors are read from separate,
  unoptimized sessions (every tensor exists as written; the output sessions stay as
  deployed).

Inputs/outputs an int8 model got from the model editor (integer types, parameters in its
metadata) are quantized / dequantized with the recorded parameters.
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import runtime
from .checks import ort_message
from .dataset import (
    InputSpec,
    calibration_files,
    input_specs,
    iter_folder,
    iter_samples,
)
from .errors import CalibrationDataError, ModelError, StrictError, UsageError
from .io_metadata import read_io
from .report import dequantized_names
from .verify import sqnr_from_sums

__all__ = ["Comparison", "Latency", "OutputComparison", "SampleSQNR", "TensorComparison", "compare_models"]

DEFAULT_WORST = 3
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _json(value):
    if value is None or isinstance(value, (int, str)):
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


@dataclass(frozen=True)
class SampleSQNR:
    sample: str  # the file name for a folder, the index for an iterable
    sqnr_db: float

    def as_dict(self) -> dict:
        return {"sample": self.sample, "sqnr_db": _json(self.sqnr_db)}


@dataclass(frozen=True)
class OutputComparison:
    """One float output of the float model against the int8 model's, over all samples."""

    name: str
    shape: tuple[int, ...]  # on the first sample
    values: int  # finite float values compared
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float
    cosine: float
    top1_agreement: float | None = None  # percent of rows; None when not class-like
    top1_rows: int = 0
    nonfinite: int = 0  # values where the float output is finite and the int8 output is not
    worst_samples: list[SampleSQNR] = field(default_factory=list)  # lowest SQNR first

    @property
    def class_like(self) -> bool:
        return self.top1_agreement is not None

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "values": self.values,
                "sqnr_db": _json(self.sqnr_db), "max_abs_error": _json(self.max_abs_error),
                "mean_abs_error": _json(self.mean_abs_error), "cosine": _json(self.cosine),
                "top1_agreement": _json(self.top1_agreement), "top1_rows": self.top1_rows,
                "nonfinite": self.nonfinite, "worst_samples": [s.as_dict() for s in self.worst_samples]}


@dataclass(frozen=True)
class TensorComparison:
    """An intermediate tensor both models name alike."""

    name: str  # in the float model
    int8_tensor: str  # what was read from the int8 model (T, or T's DequantizeLinear output)
    values: int
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float

    def as_dict(self) -> dict:
        return {"name": self.name, "int8_tensor": self.int8_tensor, "values": self.values,
                "sqnr_db": _json(self.sqnr_db), "max_abs_error": _json(self.max_abs_error),
                "mean_abs_error": _json(self.mean_abs_error)}


@dataclass
class Latency:
    """Median seconds per sample of each model's output session (see the module docstring)."""

    float_seconds: float
    int8_seconds: float
    samples: int  # samples timed
    warmup_excluded: bool  # the first sample left out

    @property
    def speedup(self) -> float:
        return self.float_seconds / self.int8_seconds if self.int8_seconds > 0 else math.inf

    def as_dict(self) -> dict:
        return {"float_ms": self.float_seconds * 1e3, "int8_ms": self.int8_seconds * 1e3,
                "speedup": _json(self.speedup), "samples": self.samples, "warmup_excluded": self.warmup_excluded}


@dataclass
class Comparison:
    samples: int
    outputs: list[OutputComparison]
    tensors: list[TensorComparison] | None = None  # None when not asked for
    notes: list[str] = field(default_factory=list)
    float_model: str | None = None  # the paths, when given as paths
    int8_model: str | None = None
    latency: Latency | None = None

    def output(self, name: str) -> OutputComparison:
        return next(o for o in self.outputs if o.name == name)

    def below(self, min_sqnr_db: float) -> list[OutputComparison]:
        """The outputs whose SQNR over all samples is under ``min_sqnr_db``, worst first."""
        return sorted((o for o in self.outputs if not o.sqnr_db >= min_sqnr_db), key=lambda o: o.sqnr_db)

    def check(self, min_sqnr_db: float) -> None:
        """Raise StrictError naming the worst output when any output is under the floor."""
        low = self.below(min_sqnr_db)
        if not low:
            return
        worst = low[0]
        more = f" (and {len(low) - 1} more output(s))" if len(low) > 1 else ""
        raise StrictError(f"output '{worst.name}' of the int8 model has SQNR {worst.sqnr_db:.2f} dB over "
                          f"{self.samples} sample(s), below `min_sqnr_db` {min_sqnr_db:g} dB{more}")

    def as_dict(self) -> dict:
        return {"float_model": self.float_model, "int8_model": self.int8_model, "samples": self.samples,
                "outputs": [o.as_dict() for o in self.outputs],
                "tensors": None if self.tensors is None else [t.as_dict() for t in self.tensors],
                "latency": None if self.latency is None else self.latency.as_dict(),
                "notes": list(self.notes)}


class _Sums:
    """Running sums of one compared tensor (float64), updated sample by sample."""

    def __init__(self, worst: int = 0):
        self.signal = self.noise = self.abs_sum = self.dot = self.ref_norm = self.int8_norm = 0.0
        self.max_abs = 0.0
        self.values = self.nonfinite = 0
        self.rows = self.agree = 0
        self.class_like = True
        self.shape: tuple[int, ...] | None = None
        self.worst = worst
        self._heap: list[tuple[float, int, str]] = []  # (-sqnr, -index, name): the top is the best kept

    def add(self, ref: np.ndarray, got: np.ndarray, index: int = 0, name: str = "") -> None:
        if self.shape is None:
            self.shape = tuple(ref.shape)
        f = np.asarray(ref, np.float64).ravel()
        q = np.asarray(got, np.float64).ravel()
        mask = np.isfinite(f)
        if not mask.all():
            f, q = f[mask], q[mask]
        error = f - q
        self.nonfinite += int(np.count_nonzero(~np.isfinite(q)))
        signal, noise = float(np.dot(f, f)), float(np.dot(error, error))
        self.signal += signal
        self.noise += noise
        abs_error = np.abs(error)
        self.abs_sum += float(abs_error.sum())
        largest = float(abs_error.max(initial=0.0))
        self.max_abs = math.inf if not math.isfinite(largest) else max(self.max_abs, largest)
        self.dot += float(np.dot(f, q))
        self.ref_norm += signal
        self.int8_norm += float(np.dot(q, q))
        self.values += f.size
        if self.worst:
            key = (-sqnr_from_sums(signal, noise), -index, name)
            if len(self._heap) < self.worst:
                heapq.heappush(self._heap, key)
            elif key > self._heap[0]:
                heapq.heapreplace(self._heap, key)

    def add_classes(self, ref: np.ndarray, got: np.ndarray) -> None:
        if not self.class_like:
            return
        if ref.ndim != 2 or ref.shape[-1] < 2:
            self.class_like = False
            return
        self.rows += ref.shape[0]
        self.agree += int(np.count_nonzero(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)))

    @property
    def sqnr_db(self) -> float:
        return sqnr_from_sums(self.signal, self.noise)

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / self.values if self.values else 0.0

    @property
    def cosine(self) -> float:
        if self.noise == 0.0:
            return 1.0  # identical (also when both are all zeros)
        if not (math.isfinite(self.dot) and math.isfinite(self.int8_norm)):
            return math.nan
        if self.ref_norm == 0.0 or self.int8_norm == 0.0:
            return 0.0
        return float(np.clip(self.dot / (math.sqrt(self.ref_norm) * math.sqrt(self.int8_norm)), -1.0, 1.0))

    def worst_samples(self) -> list[SampleSQNR]:
        kept = sorted(self._heap, key=lambda k: (-k[0], -k[1]))
        return [SampleSQNR(name, -neg) for neg, _, name in kept]

    def output(self, name: str) -> OutputComparison:
        agreement = 100.0 * self.agree / self.rows if self.class_like and self.rows else None
        return OutputComparison(name, self.shape or (), self.values, self.sqnr_db, self.max_abs, self.mean_abs,
                                self.cosine, agreement, self.rows if agreement is not None else 0,
                                self.nonfinite, self.worst_samples())


# -- the models' interfaces ------------------------------------------------------------

def _compatible_dims(a: tuple, b: tuple) -> tuple | None:
    """The dims both models accept (a fixed dim from either side), None when they differ."""
    if len(a) != len(b):
        return None
    merged = []
    for x, y in zip(a, b):
        fixed_x, fixed_y = isinstance(x, int) and x > 0, isinstance(y, int) and y > 0
        if fixed_x and fixed_y and x != y:
            return None
        merged.append(x if fixed_x else y)
    return tuple(merged)


def _check_inputs(float_specs: list[InputSpec], int8_specs: list[InputSpec], io_inputs) -> list[InputSpec]:
    """The specs the samples are checked against (fixed dims of either model); UsageError
    when the models do not take the same inputs."""
    float_names = [s.name for s in float_specs]
    int8_names = [s.name for s in int8_specs]
    if set(float_names) != set(int8_names):
        only_float = [n for n in float_names if n not in int8_names]
        only_int8 = [n for n in int8_names if n not in float_names]
        parts = ([f"only the float model has {', '.join(repr(n) for n in only_float)}"] if only_float else []) + \
                ([f"only the int8 model has {', '.join(repr(n) for n in only_int8)}"] if only_int8 else [])
        raise UsageError(f"the models take different inputs ({'; '.join(parts)}): compare an int8 model "
                         "with the float model it was quantized from")
    by_name = {s.name: s for s in int8_specs}
    merged = []
    for spec in float_specs:
        other = by_name[spec.name]
        dims = _compatible_dims(spec.dims, other.dims) if spec.dims and other.dims else (spec.dims or other.dims)
        edited = spec.name in io_inputs and spec.dtype.kind == "f"
        if dims is None or (spec.dtype != other.dtype and not edited):
            raise UsageError(f"input '{spec.name}' is {spec.describe()} in the float model and "
                             f"{other.describe()} in the int8 model: compare an int8 model with the float "
                             "model it was quantized from")
        merged.append(InputSpec(spec.name, spec.dtype, dims))
    return merged


def _elem_types(values) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}


def _output_plan(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, io_outputs, notes: list[str]) -> list[str]:
    """The outputs to compare (float in the float model; float, or integer with recorded
    parameters, in the int8 model), in the float model's order; the rest noted."""
    float_types = _elem_types(float_model.graph.output)
    int8_types = _elem_types(int8_model.graph.output)
    names = []
    for output in float_model.graph.output:
        name = output.name
        if name not in int8_types:
            notes.append(f"output '{name}' is only in the float model: skipped")
        elif float_types.get(name) not in _FLOAT_TYPES:
            notes.append(f"output '{name}' is not a float output "
                         f"({onnx.TensorProto.DataType.Name(float_types.get(name, 0)).lower()}): skipped")
        elif int8_types[name] not in _FLOAT_TYPES and name not in io_outputs:
            notes.append(f"output '{name}' is {onnx.TensorProto.DataType.Name(int8_types[name]).lower()} in the "
                         "int8 model without recorded quantization parameters: skipped")
        else:
            names.append(name)
    notes.extend(f"output '{o.name}' is only in the int8 model: skipped"
                 for o in int8_model.graph.output if o.name not in float_types)
    if not names:
        raise UsageError("the models have no float output in common: nothing to compare"
                         + (f" ({'; '.join(notes)})" if notes else ""))
    return names


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the model's values, after onnx shape inference where it works."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # too large for one protobuf, unknown ops, ...: what the file declares
        inferred = model
    graph = inferred.graph
    return _elem_types([*graph.input, *graph.value_info, *graph.output])


def _tensor_plan(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, outputs: set[str]) -> dict[str, str]:
    """{float model tensor: int8 model tensor} for the intermediate float tensors both
    models name alike (the int8 side: T's DequantizeLinear output when T is quantized)."""
    float_types, int8_types = _value_types(float_model), _value_types(int8_model)
    dequantized = dequantized_names(int8_model)
    graph_outputs = outputs | {o.name for o in float_model.graph.output} | {o.name for o in int8_model.graph.output}
    produced_int8 = {name for node in int8_model.graph.node for name in node.output}
    int8_inputs = {i.name for i in int8_model.graph.input}
    plan = {}
    candidates = [name for node in float_model.graph.node for name in node.output]
    candidates = [i.name for i in float_model.graph.input if i.name in dequantized] + candidates
    for name in candidates:
        if not name or name in graph_outputs or name in plan:
            continue
        if name not in produced_int8 and name not in int8_inputs:
            continue
        target = dequantized.get(name, name)
        if float_types.get(name) == onnx.TensorProto.FLOAT and int8_types.get(target) == onnx.TensorProto.FLOAT:
            plan[name] = target
    return plan


# -- running ---------------------------------------------------------------------------

def _named_samples(data, specs: list[InputSpec]) -> Iterator[tuple[str, dict]]:
    """(name, checked sample), one at a time: file names for a folder, indices otherwise."""
    if isinstance(data, (str, Path)):
        folder = Path(data)
        names = (p.name for p in calibration_files(folder))
        yield from zip(names, iter_folder(folder, specs))
        return
    if not isinstance(data, Iterable):
        raise UsageError(f"`data` must be a folder path or an iterable of samples, got {type(data).__name__}")
    for index, sample in enumerate(iter_samples(data, specs)):
        yield str(index), sample


def _session(model: onnx.ModelProto, which: str, **kwargs):
    try:
        return runtime.session(model, **kwargs)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the {which} model: {ort_message(exc)}") from exc


def _run(session, names: list[str], feed: dict, which: str, sample: str) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as exc:
        raise CalibrationDataError(f"onnxruntime failed on sample {sample} ({which} model): {ort_message(exc)}") from exc


def _load(model) -> tuple[onnx.ModelProto, str | None]:
    from .model_io import load_model

    return load_model(model), (str(model) if isinstance(model, (str, Path)) else None)


def compare_models(float_model, int8_model, data, *, max_samples: int | None = None, tensors: bool = False,
                   worst: int = DEFAULT_WORST) -> Comparison:
    """Compare ``int8_model`` with ``float_model`` (paths or ModelProtos) on the samples
    of ``data`` (a folder of .npy/.npz, or an iterable of samples; the first
    ``max_samples`` only when given).  See the module docstring for the measures."""
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise UsageError(f"`max_samples` must be a whole number >= 1, got {max_samples!r}")
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise UsageError(f"`worst` must be a whole number >= 0, got {worst!r}")
    if data is None:
        raise UsageError("`data` is required: a folder of .npy/.npz samples or an iterable of samples")
    float_proto, float_path = _load(float_model)
    int8_proto, int8_path = _load(int8_model)
    io = read_io(int8_proto)
    specs = _check_inputs(input_specs(float_proto), input_specs(int8_proto), io["input"])
    notes: list[str] = []
    names = _output_plan(float_proto, int8_proto, io["output"], notes)

    float_session = _session(float_proto, "float")
    int8_session = _session(int8_proto, "int8")
    sums = {name: _Sums(worst) for name in names}

    plan: dict[str, str] = {}
    if tensors:
        plan = _tensor_plan(float_proto, int8_proto, set(names))
        float_inputs = {s.name for s in specs}
        float_extra = [t for t in plan if t not in float_inputs]
        float_tensors = _session(float_proto, "float", extra_outputs=float_extra, optimize=False) if float_extra else None
        int8_tensors = _session(int8_proto, "int8", extra_outputs=list(plan.values()), optimize=False) if plan else None
        tensor_sums = {t: _Sums() for t in plan}
        skipped: dict[str, str] = {}

    samples = _named_samples(data, specs)
    if max_samples is not None:
        samples = itertools.islice(samples, max_samples)
    used = 0
    float_times: list[float] = []
    int8_times: list[float] = []
    for index, (sample_name, sample) in enumerate(samples):
        feed = {name: (io["input"][name].quantize(value) if name in io["input"] else value)
                for name, value in sample.items()}
        start = time.perf_counter()
        reference = dict(zip(names, _run(float_session, names, sample, "float", sample_name)))
        middle = time.perf_counter()
        quantized = dict(zip(names, _run(int8_session, names, feed, "int8", sample_name)))
        float_times.append(middle - start)
        int8_times.append(time.perf_counter() - middle)
        for name in names:
            ref, got = np.asarray(reference[name]), np.asarray(quantized[name])
            if name in io["output"]:
                got = io["output"][name].dequantize(got)
            if ref.shape != got.shape:
                raise UsageError(f"output '{name}' has shape {list(got.shape)} in the int8 model where the float "
                                 f"model gives {list(ref.shape)} (sample {sample_name}): compare an int8 model "
                                 "with the float model it was quantized from")
            sums[name].add(ref, got, index, sample_name)
            sums[name].add_classes(ref, got)
        if plan:
            live = [t for t in plan if t not in skipped]
            from_float = [t for t in live if t not in float_inputs]
            values = dict(zip(from_float, _run(float_tensors, from_float, sample, "float", sample_name))) if from_float else {}
            values.update({t: sample[t] for t in live if t in float_inputs})
            targets = [plan[t] for t in live]
            approx = dict(zip(live, _run(int8_tensors, targets, feed, "int8", sample_name))) if targets else {}
            for t in live:
                ref, got = np.asarray(values[t]), np.asarray(approx[t])
                if ref.dtype.kind != "f" or got.dtype.kind != "f" or ref.shape != got.shape:
                    skipped[t] = (f"shape {list(ref.shape)} in the float model, {list(got.shape)} in the int8 model"
                                  if ref.shape != got.shape else "not float in both models")
                    continue
                tensor_sums[t].add(ref, got)
        used += 1
    if not used:
        raise CalibrationDataError("no samples in `data`: nothing to compare")

    compared_tensors = None
    if tensors:
        compared_tensors = [TensorComparison(t, plan[t], s.values, s.sqnr_db, s.max_abs, s.mean_abs)
                            for t, s in tensor_sums.items() if t not in skipped]
        compared_tensors.sort(key=lambda c: (c.sqnr_db, c.name))
        notes.extend(f"tensor '{t}' skipped: {why}" for t, why in skipped.items())
        if not plan:
            notes.append("no intermediate float tensor is named alike in both models: no tensor comparison")
    return Comparison(used, [sums[n].output(n) for n in names], compared_tensors, notes, float_path, int8_path,
                      latency_of(float_times, int8_times))


def latency_of(float_times: list[float], int8_times: list[float]) -> Latency:
    """The medians of the per-sample times, without the first sample when there are more."""
    skip = 1 if len(float_times) > 1 else 0
    return Latency(statistics.median(float_times[skip:]), statistics.median(int8_times[skip:]),
                   len(float_times) - skip, bool(skip))
