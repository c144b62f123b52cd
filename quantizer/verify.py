"""Checks of models against the model they came from.

- ``check_emitted``: every written model passes onnx.checker's full check and loads in
  onnxruntime (a failure is our bug: InternalError, nothing written).
- ``compare_outputs``: the outputs of two models on one sample.  Used twice: the stage-1
  model against the input model before calibration (they must compute the same
  function), and the int8 model against the float model before the file is renamed into
  place (fidelity).  An output whose shape changed, or that turned non-finite where the
  reference is finite, is a broken model, never a warning.  An output whose SQNR falls
  below the floor the user sets is a warning: a poor but valid model is the user's call.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from . import runtime
from .checks import ort_message
from .config import DEFAULT_MIN_SQNR_DB
from .errors import InternalError, first_line
from .io_metadata import read_io

__all__ = ["DEFAULT_MIN_SQNR_DB", "Fidelity", "Reference", "WrittenModelCheck", "check_emitted",
           "compare_outputs", "sqnr_db"]


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(signal / noise) over the finite reference values; inf when exact."""
    reference = np.asarray(reference, np.float64)
    approx = np.asarray(approx, np.float64)
    if reference.shape != approx.shape:
        return -math.inf
    mask = np.isfinite(reference)
    noise = float(np.sum((reference[mask] - approx[mask]) ** 2))
    signal = float(np.sum(reference[mask] ** 2))
    return sqnr_from_sums(signal, noise)


def sqnr_from_sums(signal: float, noise: float) -> float:
    """10 log10(signal / noise) of accumulated sums: inf when exact, -inf without signal
    or with non-finite noise."""
    if not math.isfinite(noise):
        return -math.inf
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class Reference:
    """One sample and the reference model's outputs on it (computed once, reused)."""

    name: str
    sample: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    @classmethod
    def of(cls, model, sample: dict[str, np.ndarray], name: str) -> "Reference":
        """Run ``model`` as written (onnxruntime's own graph rewrites off: they would trust
        declared shapes the way stage 1 must not)."""
        float_session = runtime.session(model, optimize=False)
        names = [o.name for o in float_session.get_outputs()]
        return cls(name, sample, dict(zip(names, float_session.run(None, sample))))


@dataclass
class Mismatch:
    """Outputs that are not comparable at all: a changed shape, or non-finite values."""

    output: str
    why: str


def compare_outputs(reference: Reference, outputs: Mapping[str, np.ndarray]) -> tuple[dict[str, float], list[Mismatch]]:
    """({output: SQNR dB}, [broken outputs]) of ``outputs`` against the reference's float
    outputs (integer outputs, indices or shapes, are not a fidelity measure)."""
    sqnr, broken = {}, []
    for name, ref in reference.outputs.items():
        ref = np.asarray(ref)
        if name not in outputs or ref.dtype.kind != "f":
            continue
        got = np.asarray(outputs[name])
        if got.shape != ref.shape:
            broken.append(Mismatch(name, f"shape {tuple(got.shape)} where the reference gives {tuple(ref.shape)}"))
            continue
        bad = np.isfinite(ref) & ~np.isfinite(got)
        if bad.any():
            broken.append(Mismatch(name, f"{int(bad.sum())} non-finite values where the reference is finite"))
            continue
        sqnr[name] = sqnr_db(ref, got)
    return sqnr, broken


@dataclass
class Fidelity:
    """SQNR (dB) of each float output of the int8 model against the float model: the worst
    over the checked samples, and on which sample it was."""

    sample: str  # the sample of the worst output (the first sample when all are fine)
    sqnr_db: dict[str, float] = field(default_factory=dict)
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB
    samples: list[str] = field(default_factory=list)
    worst_sample: dict[str, str] = field(default_factory=dict)  # output -> sample of its worst SQNR

    @property
    def low(self) -> dict[str, float]:
        return {name: v for name, v in self.sqnr_db.items() if not v >= self.min_sqnr_db}

    def warning(self) -> str | None:
        """One line naming the worst output, or None when every output is above the floor."""
        if not self.low:
            return None
        name, value = min(self.low.items(), key=lambda kv: kv[1])
        more = f" (and {len(self.low) - 1} more output(s))" if len(self.low) > 1 else ""
        where = self.worst_sample.get(name, self.sample)
        of = f" (the worst of {len(self.samples)} samples)" if len(self.samples) > 1 else ""
        return (
            f"output '{name}' of the int8 model has SQNR {value:.1f} dB on calibration sample {where}{of}, "
            f"below `min_sqnr_db` {self.min_sqnr_db:g} dB{more}; it may be inaccurate: try another "
            "`method` or `exclude` the sensitive nodes"
        )

    def as_dict(self) -> dict:
        return {"sample": self.sample, "samples": list(self.samples) or [self.sample],
                "min_sqnr_db": self.min_sqnr_db, "worst_sample": dict(self.worst_sample),
                "sqnr_db": {k: _json_float(v) for k, v in self.sqnr_db.items()}}


def _json_float(value: float) -> float | str:
    return round(value, 2) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def check_emitted(path: str | os.PathLike) -> ort.InferenceSession:
    """onnx.checker full check and an onnxruntime load of the written file; returns the session."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise InternalError(f"the written model fails onnx.checker: {first_line(exc)}") from exc
    try:
        return runtime.session(path)
    except Exception as exc:
        raise InternalError(f"onnxruntime cannot load the written model: {ort_message(exc)}") from exc


def measure_fidelity(references, int8_session: ort.InferenceSession, int8_model: onnx.ModelProto,
                     min_sqnr_db: float = DEFAULT_MIN_SQNR_DB) -> Fidelity:
    """Run the reference samples (a Reference or a list) through the int8 model and keep
    each output's worst SQNR.  Integer inputs/outputs made by the model editor are
    quantized/dequantized with the parameters recorded in the metadata.  A broken output
    (shape changed, non-finite values) raises InternalError."""
    references = [references] if isinstance(references, Reference) else list(references)
    io = read_io(int8_model)
    names = [o.name for o in int8_session.get_outputs()]
    worst: dict[str, float] = {}
    where: dict[str, str] = {}
    for reference in references:
        feed = {}
        for spec in int8_session.get_inputs():
            value = reference.sample[spec.name]
            feed[spec.name] = io["input"][spec.name].quantize(value) if spec.name in io["input"] else value
        outputs = {}
        for name, value in zip(names, int8_session.run(None, feed)):
            outputs[name] = io["output"][name].dequantize(value) if name in io["output"] else value
        sqnr, broken = compare_outputs(reference, outputs)
        if broken:
            raise InternalError(
                f"the int8 model is broken: output '{broken[0].output}' has {broken[0].why} on calibration "
                f"sample {reference.name}; nothing was written (a bug: rerun with debug output and report it)"
            )
        for name, value in sqnr.items():
            if name not in worst or value < worst[name]:
                worst[name], where[name] = value, reference.name
    first = references[0].name if references else "-"
    sample = where[min(worst, key=worst.get)] if worst else first
    return Fidelity(sample, worst, min_sqnr_db, [r.name for r in references], where)


class WrittenModelCheck:
    """The ``verify`` hook for save_model_atomic: validity always, fidelity when a
    reference (a sample and the float model's outputs on it) is given."""

    def __init__(self, int8_model: onnx.ModelProto, reference=None,
                 min_sqnr_db: float = DEFAULT_MIN_SQNR_DB):
        """``reference``: a Reference, a list of them (the fidelity samples), or None."""
        self.int8_model = int8_model
        if isinstance(reference, Reference):
            reference = [reference]
        self.reference = list(reference) if reference else None
        self.min_sqnr_db = min_sqnr_db
        self.fidelity: Fidelity | None = None
        self.error: str | None = None

    def __call__(self, path: Path) -> None:
        session = check_emitted(path)
        if self.reference is None:
            return
        try:
            self.fidelity = measure_fidelity(self.reference, session, self.int8_model, self.min_sqnr_db)
        except InternalError:
            raise
        except Exception as exc:  # the model is valid; a failed measurement must not lose it
            self.fidelity = Fidelity(self.reference[0].name, {}, self.min_sqnr_db, [r.name for r in self.reference])
            self.error = f"fidelity check skipped: {ort_message(exc)}"
