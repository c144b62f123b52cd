"""Calibration state and ranges on disk.

A state (.npz) holds every tensor's streaming statistics plus the fingerprint of the
stage-1 model they came from, so a later run can compute another method's ranges without
running the model again, and shards collected on different machines can be merged.
Ranges (.json) are the Furiosa-style ``{tensor: [min, max]}`` mapping, for people to read
and edit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from quantizer.calibrators import TensorStatistics

from . import model_io
from .errors import CalibrationDataError, UsageError
from .model_io import write_atomic

FORMAT_VERSION = 1


def model_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the stage-1 graph (structure and weights), independent of metadata."""
    if model.graph.ByteSize() < model_io.EXTERNAL_DATA_THRESHOLD:
        return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()
    digest = hashlib.sha256()  # too large for one protobuf: the structure, then each tensor
    with model_io.detached_tensor_data(model.graph) as moved:
        digest.update(model.graph.SerializeToString(deterministic=True))
        for _, raw in moved:
            digest.update(raw)
    return digest.hexdigest()


@dataclass
class CalibrationState:
    fingerprint: str
    samples: int = 0
    statistics: dict[str, TensorStatistics] = field(default_factory=dict)

    def merge(self, other: "CalibrationState") -> "CalibrationState":
        if other.fingerprint != self.fingerprint:
            raise CalibrationDataError("cannot merge calibration states of different models")
        names = list(self.statistics) + [n for n in other.statistics if n not in self.statistics]
        empty = TensorStatistics()
        merged = {
            n: self.statistics.get(n, empty).merge(other.statistics.get(n, empty)) for n in names
        }
        return CalibrationState(self.fingerprint, self.samples + other.samples, merged)


def save_state(state: CalibrationState, path: str | os.PathLike, transaction=None) -> None:
    names = list(state.statistics)
    meta = {"format": FORMAT_VERSION, "fingerprint": state.fingerprint, "samples": state.samples, "tensors": names}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for i, name in enumerate(names):
        s = state.statistics[name]
        arrays[f"t{i}_range"] = np.array([s.minimum, s.maximum], np.float64)
        arrays[f"t{i}_ints"] = np.array([s.count, s.nonfinite, s.level, s.offset, s.bins, int(s.with_histogram)], np.int64)
        arrays[f"t{i}_counts"] = s.counts
    write_atomic(Path(path), lambda handle: np.savez_compressed(handle, **arrays), transaction=transaction)


def load_state(path: str | os.PathLike) -> CalibrationState:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"calibration state file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(archive["meta"].tobytes().decode())
            if meta.get("format") != FORMAT_VERSION:
                raise CalibrationDataError(f"{path.name}: unsupported calibration state format {meta.get('format')}")
            statistics = {}
            for i, name in enumerate(meta["tensors"]):
                low, high = archive[f"t{i}_range"]
                count, nonfinite, level, offset, bins, with_histogram = (int(v) for v in archive[f"t{i}_ints"])
                statistics[name] = TensorStatistics(
                    minimum=float(low), maximum=float(high), count=count, nonfinite=nonfinite, bins=bins,
                    with_histogram=bool(with_histogram), level=level, offset=offset,
                    counts=archive[f"t{i}_counts"].astype(np.int64),
                )
    except CalibrationDataError:
        raise
    except Exception as exc:
        raise CalibrationDataError(f"{path.name} is not a calibration state file: {exc}") from exc
    return CalibrationState(meta["fingerprint"], int(meta["samples"]), statistics)


def save_ranges(ranges: dict[str, tuple[float, float]], path: str | os.PathLike, transaction=None) -> None:
    lines = [f"  {json.dumps(name)}: [{float(lo)!r}, {float(hi)!r}]" for name, (lo, hi) in ranges.items()]
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    write_atomic(Path(path), lambda handle: handle.write(text.encode()), transaction=transaction)


def load_ranges(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"ranges file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path.name} must map tensor names to [min, max]")
    ranges = {}
    for name, pair in data.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
            raise UsageError(f"{path.name}: range of '{name}' must be [min, max], got {pair!r}")
        if not pair[0] <= pair[1]:
            raise UsageError(f"{path.name}: range of '{name}' has min > max: {pair}")
        ranges[name] = (float(pair[0]), float(pair[1]))
    return ranges
