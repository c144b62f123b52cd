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
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from quantizer.calibrators import TensorStatistics

from . import model_io
from .dataset import NotPlainArrays, NpzReader
from .errors import CalibrationDataError, UsageError, first_line
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


# What a state file may hold.  A saved state has BINS bins per tensor; a little room is
# left for other bin counts, but none for a file that would inflate to gigabytes.
MAX_STATE_BINS = 1 << 16
MAX_META_BYTES = 1 << 28
_INT64_MAX = 2**63 - 1
# 2.0**level must be a finite, non-zero float64 (the histogram's bin width).
LEVELS = (-1074, 1023)


_KINDS = {"u": "bytes", "iu": "integers", "f": "floats"}


class _NotAState(ValueError):
    """Why a file is not a (valid) calibration state: said in parentheses."""


def _array(archive: NpzReader, key: str, kinds: str, shape: tuple | None, limit: int) -> np.ndarray:
    """Entry ``key``: its header checked (kind, shape, size) before its data is read."""
    if key not in archive:
        raise _NotAState(f"no '{key}' entry")
    header = archive.header(key)
    if header.dtype.kind not in kinds or (shape is not None and header.shape != shape) \
            or (shape is None and len(header.shape) != 1):
        want = f"shape {shape}" if shape is not None else "one dimension"
        raise _NotAState(f"entry '{key}' is {header.dtype.name}{list(header.shape)}, expected {_KINDS[kinds]} of {want}")
    if header.nbytes > limit:
        raise _NotAState(f"entry '{key}' declares {header.nbytes} bytes, over the {limit} allowed")
    return archive.read(key)


def _meta(archive: NpzReader) -> dict:
    raw = _array(archive, "meta", "u", None, MAX_META_BYTES)
    if raw.dtype.itemsize != 1:
        raise _NotAState("entry 'meta' is not bytes")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _NotAState("its 'meta' entry is not JSON") from exc
    if not isinstance(meta, dict):
        raise _NotAState("its 'meta' entry is not a JSON object")
    if "format" not in meta:
        raise _NotAState("its 'meta' entry has no 'format'")
    if meta["format"] != FORMAT_VERSION or isinstance(meta["format"], bool):
        shown = repr(meta["format"])
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise CalibrationDataError(f"unsupported calibration state format {shown}")
    for key in ("fingerprint", "samples", "tensors"):
        if key not in meta:
            raise _NotAState(f"its 'meta' entry has no '{key}'")
    if not (isinstance(meta["fingerprint"], str) and re.fullmatch("[0-9a-f]{64}", meta["fingerprint"])):
        raise _NotAState("its model fingerprint is not a sha256 hex digest")
    samples = meta["samples"]
    if type(samples) is not int or not 0 <= samples <= _INT64_MAX:
        raise _NotAState("its sample count is not a non-negative integer")
    tensors = meta["tensors"]
    if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise _NotAState("its tensor list is not a list of names")
    if len(set(tensors)) != len(tensors):
        raise _NotAState("its tensor list names a tensor twice")
    return meta


def _tensor_statistics(archive: NpzReader, i: int, name: str) -> TensorStatistics:
    """Tensor ``i``'s statistics, refused unless they satisfy TensorStatistics' invariants
    (so that merging, histograms and every range method work on them as on collected ones)."""
    where = f"tensor {name!r}"
    low, high = (float(v) for v in _array(archive, f"t{i}_range", "f", (2,), 64))
    ints = [int(v) for v in _array(archive, f"t{i}_ints", "iu", (6,), 64)]
    count, nonfinite, level, offset, bins, with_histogram = ints
    if not all(-_INT64_MAX - 1 <= v <= _INT64_MAX for v in ints):
        raise _NotAState(f"{where} has an integer field outside int64")
    if count < 0 or nonfinite < 0:
        raise _NotAState(f"{where} has a negative value count ({count} finite, {nonfinite} NaN/Inf)")
    if not 1 <= bins <= MAX_STATE_BINS:
        raise _NotAState(f"{where} has {bins} histogram bins, expected 1..{MAX_STATE_BINS}")
    if with_histogram not in (0, 1):
        raise _NotAState(f"{where} has a histogram flag of {with_histogram}, expected 0 or 1")
    if not LEVELS[0] <= level <= LEVELS[1]:
        raise _NotAState(f"{where} has histogram level {level}, expected {LEVELS[0]}..{LEVELS[1]}")
    counts = _array(archive, f"t{i}_counts", "iu", None, 8 * MAX_STATE_BINS)
    if counts.size > bins:
        raise _NotAState(f"{where} has {counts.size} histogram counts for {bins} bins")
    if counts.size and not (int(counts.min()) >= 0 and int(counts.max()) <= _INT64_MAX):
        raise _NotAState(f"{where} has histogram counts outside 0..2**63-1")
    counts = counts.astype(np.int64)
    if math.isnan(low) or math.isnan(high):
        raise _NotAState(f"{where} has a NaN min/max")
    if count == 0:  # nothing finite seen: the initial, empty statistics
        if counts.size or low != math.inf or high != -math.inf:
            raise _NotAState(f"{where} has no values but a range [{low}, {high}] or histogram counts")
    else:
        if not (math.isfinite(low) and math.isfinite(high) and low <= high and math.isfinite(high - low)):
            raise _NotAState(f"{where} has an invalid range [{low}, {high}]")
        if with_histogram != bool(counts.size):
            raise _NotAState(f"{where} has {counts.size} histogram counts with the histogram flag {with_histogram}")
    stats = TensorStatistics(minimum=low, maximum=high, count=count, nonfinite=nonfinite, bins=bins,
                             with_histogram=bool(with_histogram), level=level, offset=offset, counts=counts)
    if counts.size:
        total = sum(counts.tolist())
        if not 0 < total <= count:
            raise _NotAState(f"{where} has {total} values in its histogram for {count} values seen")
        try:  # the level is the one its range implies, and the bins lie within the range
            expected = stats._target_level()
            first = math.floor(math.ldexp(low, -level))
            last = math.floor(math.ldexp(high, -level))
        except (OverflowError, ValueError):
            expected = first = last = None
        if expected != level:
            raise _NotAState(f"{where} has histogram level {level}, its range [{low!r}, {high!r}] implies {expected}")
        if not first <= offset <= offset + counts.size - 1 <= last:
            raise _NotAState(f"{where} has histogram bins outside its range [{low!r}, {high!r}]")
    return stats


def load_state(path: str | os.PathLike) -> CalibrationState:
    """Read a state written by save_state.  Anything else (a pickle, another .npz, a file
    whose fields were edited into values no calibration produces) is refused with one
    line, before any large entry is read."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"calibration state file not found: {path}")
    try:
        with NpzReader(path) as archive:
            meta = _meta(archive)
            statistics = {name: _tensor_statistics(archive, i, name) for i, name in enumerate(meta["tensors"])}
        if meta["samples"] == 0 and any(s.count or s.nonfinite for s in statistics.values()):
            raise _NotAState("it holds values but a sample count of 0")
    except CalibrationDataError as exc:
        raise CalibrationDataError(f"{path.name}: {exc}") from exc
    except NotPlainArrays as exc:
        what = f"entry {exc.entry!r} is not a plain array" if exc.entry else \
            "not an .npz of plain arrays written by `save_calibration`"
        raise CalibrationDataError(f"{path.name} is not a calibration state file ({what})") from exc
    except Exception as exc:
        text = first_line(exc)
        if "pickle" in text:  # numpy's advice to unpickle is unsafe
            text = "not an .npz of plain arrays"
        raise CalibrationDataError(f"{path.name} is not a calibration state file ({text})") from exc
    return CalibrationState(meta["fingerprint"], meta["samples"], statistics)


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
        raise UsageError(f"{path.name} is not valid JSON: {first_line(exc)}") from exc
    except RecursionError as exc:
        raise UsageError(f"{path.name} is not valid JSON: nested too deeply") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path.name} must map tensor names to [min, max]")
    ranges = {}
    for name, pair in data.items():
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)):
            raise UsageError(f"{path.name}: range of {name!r} must be [min, max], got {_shown(pair)}")
        try:
            low, high = float(pair[0]), float(pair[1])
        except OverflowError:  # an integer too large for a float
            low = high = math.inf
        if not (math.isfinite(low) and math.isfinite(high)):  # json reads Infinity and NaN
            raise UsageError(f"{path.name}: range of {name!r} must be finite numbers, got {_shown(pair)}")
        if not low <= high:
            raise UsageError(f"{path.name}: range of {name!r} has min > max: {_shown(pair)}")
        ranges[name] = (low, high)
    return ranges


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
