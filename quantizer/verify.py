"""Checks on a written model before it is renamed into place.

Every emitted model must pass onnx.checker's full check and load in onnxruntime (a
failure is our bug: InternalError, nothing written).  Then one calibration sample runs
through the float and the int8 model; an output whose SQNR falls below a threshold the
user sets is a warning, not a failure: a poor but valid model is the user's call.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .checks import ort_message
from .errors import InternalError
from .model_io import ort_model_source

DEFAULT_MIN_SQNR_DB = 10.0


@dataclass
class Fidelity:
    """SQNR (dB) of each float output of the int8 model against the float model."""

    sample: str
    sqnr_db: dict[str, float] = field(default_factory=dict)
    min_sqnr_db: float = DEFAULT_MIN_SQNR_DB

    @property
    def low(self) -> dict[str, float]:
        return {name: v for name, v in self.sqnr_db.items() if not v >= self.min_sqnr_db}

    def warning(self) -> str | None:
        """One line naming the worst output, or None when every output is above the floor."""
        if not self.low:
            return None
        name, value = min(self.low.items(), key=lambda kv: kv[1])
        more = f" (and {len(self.low) - 1} more output(s))" if len(self.low) > 1 else ""
        return (
            f"output '{name}' of the int8 model has SQNR {value:.1f} dB on calibration sample {self.sample}, "
            f"below --min-sqnr {self.min_sqnr_db:g} dB{more}; it may be inaccurate: try another --calib "
            "method or --exclude the sensitive nodes"
        )

    def as_dict(self) -> dict:
        return {"sample": self.sample, "min_sqnr_db": self.min_sqnr_db,
                "sqnr_db": {k: _json_float(v) for k, v in self.sqnr_db.items()}}


def _json_float(value: float) -> float | str:
    return round(value, 2) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(signal / noise) over the finite reference values; inf when exact."""
    reference = np.asarray(reference, np.float64)
    approx = np.asarray(approx, np.float64)
    if reference.shape != approx.shape:
        return -math.inf
    mask = np.isfinite(reference)
    noise = float(np.sum((reference[mask] - approx[mask]) ** 2))
    signal = float(np.sum(reference[mask] ** 2))
    if not math.isfinite(noise):
        return -math.inf
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    with ort_model_source(model) as source:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_emitted(path: str | os.PathLike) -> ort.InferenceSession:
    """onnx.checker full check and an onnxruntime load of the written file; returns the session."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InternalError(f"the written model fails onnx.checker: {first}") from None
    try:
        return _session(path)
    except Exception as exc:
        raise InternalError(f"onnxruntime cannot load the written model: {ort_message(exc)}") from None


def measure_fidelity(float_model, int8_session: ort.InferenceSession, int8_model: onnx.ModelProto,
                     sample: dict[str, np.ndarray], sample_name: str,
                     min_sqnr_db: float = DEFAULT_MIN_SQNR_DB) -> Fidelity:
    """Run ``sample`` through both models.  Integer inputs/outputs made by the model
    editor are quantized/dequantized with the parameters recorded in the metadata."""
    from quantizer.model_editor.metadata import read_io

    io = read_io(int8_model)
    float_session = _session(float_model)
    reference = dict(zip([o.name for o in float_session.get_outputs()], float_session.run(None, sample)))
    feed = {}
    for spec in int8_session.get_inputs():
        value = sample[spec.name]
        feed[spec.name] = io["input"][spec.name].quantize(value) if spec.name in io["input"] else value
    names = [o.name for o in int8_session.get_outputs()]
    result = Fidelity(sample_name, min_sqnr_db=min_sqnr_db)
    for name, value in zip(names, int8_session.run(None, feed)):
        if name in io["output"]:
            value = io["output"][name].dequantize(value)
        ref = reference.get(name)
        if ref is None or np.asarray(ref).dtype.kind != "f":
            continue  # integer outputs (indices, shapes) are not a fidelity measure
        result.sqnr_db[name] = sqnr_db(ref, value)
    return result


def first_sample(data, model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], str] | None:
    """The first calibration sample of a folder (checked against the model's inputs)."""
    from .dataset import calibration_files, input_specs, iter_folder

    if data is None:
        return None
    folder = Path(data)
    sample = next(iter_folder(folder, input_specs(model)), None)
    return (sample, calibration_files(folder)[0].name) if sample is not None else None


class WrittenModelCheck:
    """The ``verify`` hook for save_model_atomic: validity always, fidelity when a sample
    is given.  Keeps the Fidelity for the summary."""

    def __init__(self, int8_model: onnx.ModelProto, float_model=None, sample=None,
                 min_sqnr_db: float = DEFAULT_MIN_SQNR_DB):
        self.int8_model = int8_model
        self.float_model = float_model
        self.sample = sample
        self.min_sqnr_db = min_sqnr_db
        self.fidelity: Fidelity | None = None
        self.error: str | None = None

    def __call__(self, path: Path) -> None:
        session = check_emitted(path)
        if self.sample is None or self.float_model is None:
            return
        sample, name = self.sample
        try:
            self.fidelity = measure_fidelity(self.float_model, session, self.int8_model, sample, name,
                                             self.min_sqnr_db)
        except Exception as exc:  # the model is valid; a failed measurement must not lose it
            self.fidelity = Fidelity(name, {}, self.min_sqnr_db)
            self.error = f"fidelity check skipped: {ort_message(exc)}"
