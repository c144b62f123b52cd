"""Calibration samples: read lazily from a folder or any Python iterable, and checked
against the model's inputs (name, dtype, rank, fixed dims) one sample at a time."""

from __future__ import annotations

import itertools

import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper

from .errors import CalibrationDataError, UsageError, first_line

try:  # .npy version 3.0 (utf-8 header): numpy has no public reader for its header alone
    from numpy.lib._format_impl import _read_array_header as _read_header_any_version
except ImportError:  # numpy < 2
    _read_header_any_version = getattr(np.lib.format, "_read_array_header", None)

Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple  # int for fixed dims, str/None for dynamic ones

    def describe(self) -> str:
        dims = ",".join(str(d) if isinstance(d, int) else "?" for d in self.dims)
        return f"{self.dtype.name}[{dims}]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def check_sample(sample: Mapping[str, np.ndarray], specs: list[InputSpec], where: str) -> Sample:
    """Validate one sample; the error names the input, expected vs given."""
    expected = {s.name for s in specs}
    missing = expected - set(sample)
    extra = set(sample) - expected
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(sorted(missing))}")
        if extra:
            parts.append(f"unknown input(s) {', '.join(sorted(extra))}")
        raise CalibrationDataError(
            f"{where}: {'; '.join(parts)} (model inputs: {', '.join(s.name for s in specs)})"
        )
    checked: Sample = {}
    for spec in specs:
        array = np.asarray(sample[spec.name])
        array = _as_loaded(array, spec, where)  # native byte order; numpy strings for string inputs
        given = f"{array.dtype.name}[{','.join(map(str, array.shape))}]"
        if array.dtype != spec.dtype:
            raise CalibrationDataError(
                f"{where}: input '{spec.name}' expects {spec.describe()}, given {given} (wrong dtype)"
            )
        if spec.dims and array.ndim != len(spec.dims):
            raise CalibrationDataError(
                f"{where}: input '{spec.name}' expects {spec.describe()}, given {given} (wrong rank)"
            )
        for want, got in zip(spec.dims, array.shape):
            if isinstance(want, int) and want > 0 and want != got:
                raise CalibrationDataError(
                    f"{where}: input '{spec.name}' expects {spec.describe()}, given {given} (wrong shape)"
                )
        if array.size == 0:
            raise CalibrationDataError(f"{where}: input '{spec.name}' is empty ({given}); drop that sample")
        checked[spec.name] = array
    return checked


def _as_mapping(item, specs: list[InputSpec], where: str) -> Mapping[str, np.ndarray]:
    if isinstance(item, Mapping):
        return item
    if isinstance(item, np.ndarray):
        if len(specs) != 1:
            raise CalibrationDataError(
                f"{where}: a bare array fits only single-input models; this model has inputs "
                f"{', '.join(s.name for s in specs)} (give a dict)"
            )
        return {specs[0].name: item}
    if isinstance(item, (list, tuple)):
        if len(item) != len(specs):
            raise CalibrationDataError(
                f"{where}: got {len(item)} arrays, the model has {len(specs)} inputs "
                f"({', '.join(s.name for s in specs)})"
            )
        return {spec.name: array for spec, array in zip(specs, item)}
    raise CalibrationDataError(f"{where}: unsupported sample type {type(item).__name__}")


def iter_samples(dataset: Iterable, specs: list[InputSpec]) -> Iterator[Sample]:
    """Yield checked samples from a folder path or an iterable of dicts/sequences/arrays."""
    if isinstance(dataset, (str, Path)):
        yield from iter_folder(Path(dataset), specs)
        return
    if not isinstance(dataset, Iterable):
        raise UsageError(f"calibration data must be a folder path or an iterable of samples, got {type(dataset).__name__}")
    for index, item in enumerate(dataset):
        where = f"sample {index}"
        yield check_sample(_as_mapping(item, specs, where), specs, where)


def calibration_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise CalibrationDataError(f"calibration folder not found: {folder}")
    if not folder.is_dir():
        raise CalibrationDataError(f"calibration path is not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
    if not files:
        raise CalibrationDataError(f"no .npy or .npz calibration files in {folder}")
    return files


def count_samples(dataset) -> int | None:
    if isinstance(dataset, (str, Path)):
        return len(calibration_files(Path(dataset)))
    try:
        return len(dataset)
    except TypeError:
        return None


# One calibration array (one input of one sample) may declare at most this many bytes.
# Each file's .npy headers are read and checked against the model's inputs and this
# limit before any data is read, so a small .npz that inflates to gigabytes, or a header
# that lies about its size, is refused without allocating the array.
MAX_SAMPLE_BYTES = 2**31

_PLAIN_ARRAYS = "not a {kind} file of plain arrays (save them with np.save / np.savez)"


class NotPlainArrays(ValueError):
    """Not .npy data numpy can read without unpickling (never suggest allow_pickle);
    ``entry`` names the .npz entry at fault (None: the file itself)."""

    def __init__(self, message: str, entry: str | None = None):
        super().__init__(message)
        self.entry = entry


class CorruptArchive(ValueError):
    """An .npz whose zip entries contradict themselves or their .npy headers."""


@dataclass(frozen=True)
class ArrayHeader:
    """What a .npy header declares: the data that follows is ``nbytes`` long."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # header length: the data starts here

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


def read_npy_header(handle) -> ArrayHeader:
    """Read a .npy header from ``handle`` (at its start) and nothing more.

    Raises NotPlainArrays for anything but a well-formed header of a plain (pickle-free)
    array; numpy's own texts are not passed on (some of them advise allow_pickle)."""
    start = handle.tell()
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
        elif version == (3, 0) and _read_header_any_version is not None:
            shape, fortran_order, dtype = _read_header_any_version(handle, version)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (OSError, zipfile.BadZipFile, zlib.error):  # the file or archive, not the header: said as such
        raise
    except Exception as exc:
        raise NotPlainArrays(_PLAIN_ARRAYS.format(kind=".npy")) from exc
    if dtype.hasobject or not all(type(d) is int and d >= 0 for d in shape):  # pickled, or no shape
        raise NotPlainArrays(_PLAIN_ARRAYS.format(kind=".npy"))
    return ArrayHeader(tuple(shape), dtype, bool(fortran_order), handle.tell() - start)


class NpzReader:
    """An .npz archive read member by member: ``header(key)`` reads only that member's
    .npy header; ``read(key)`` first checks that the zip entry's uncompressed size is
    exactly the header plus the data it declares (else the file is corrupt), so the data
    read is never more than what the header (already checked by the caller) declares."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as exc:
            raise NotPlainArrays(_PLAIN_ARRAYS.format(kind=".npz")) from exc
        self._members: dict[str, zipfile.ZipInfo] = {}
        self._headers: dict[str, ArrayHeader] = {}
        for info in self._zip.infolist():
            key = info.filename.removesuffix(".npy")
            if key in self._members:
                self._zip.close()
                raise CorruptArchive(f"corrupt .npz file (entry {info.filename!r} appears twice)")
            self._members[key] = info

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self._zip.close()

    def keys(self) -> list[str]:
        return list(self._members)

    def __contains__(self, key: str) -> bool:
        return key in self._members

    def header(self, key: str) -> ArrayHeader:
        if key not in self._headers:
            info = self._members[key]
            with self._zip.open(info) as member:
                try:
                    self._headers[key] = read_npy_header(member)
                except NotPlainArrays as exc:
                    raise NotPlainArrays(f"entry {info.filename!r} is {exc}", entry=info.filename) from exc
        return self._headers[key]

    def read(self, key: str) -> np.ndarray:
        info, header = self._members[key], self.header(key)
        if info.file_size != header.data_offset + header.nbytes:
            raise CorruptArchive(
                f"corrupt .npz file (entry {info.filename!r} declares {header.nbytes} bytes of data, "
                f"its zip entry holds {info.file_size - header.data_offset})"
            )
        with self._zip.open(info) as member:
            return _read_data(member, header)


def _read_data(handle, header: ArrayHeader) -> np.ndarray:
    """The array whose (already checked) header starts ``handle``: its data read straight
    into place, without numpy parsing the header a second time."""
    handle.read(header.data_offset)
    data = bytearray(header.nbytes)
    if handle.readinto(data) != header.nbytes:
        raise CorruptArchive(f"truncated data (its header declares {header.nbytes} bytes)")
    array = np.frombuffer(data, dtype=header.dtype)
    return array.reshape(header.shape, order="F" if header.fortran_order else "C")


def _describe_bytes(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 2**30 and n % 2**30 == 0 else f"{n} bytes"


def _loaded_dtype(dtype: np.dtype, spec: InputSpec | None) -> np.dtype:
    """The dtype an array with this header is given to the model as: numpy strings for
    string inputs (dtype object) become object arrays, any byte order becomes native."""
    if spec is not None and spec.dtype == object and dtype.kind in "US":
        return np.dtype(object)
    return dtype.newbyteorder("=")


def _as_loaded(array: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    target = _loaded_dtype(array.dtype, spec)
    if array.dtype == target:
        return array
    if target == object and array.dtype.kind == "S":  # onnxruntime would read bytes objects as their repr
        try:
            array = np.char.decode(array, "utf-8")
        except UnicodeDecodeError as exc:
            raise CalibrationDataError(
                f"{where}: input '{spec.name}' holds bytes that are not UTF-8 (string inputs take text)"
            ) from exc
    return array.astype(target)


def _check_declared(headers: dict[str, ArrayHeader], specs: list[InputSpec], where: str) -> None:
    """check_sample on what the headers declare, through stand-in arrays of the declared
    dtype and shape (broadcast from one element: they allocate nothing), then the size
    limit; all before any data is read."""
    by_name = {s.name: s for s in specs}
    loaded = {key: _loaded_dtype(h.dtype, by_name.get(key)) for key, h in headers.items()}
    # In memory an element takes at least its loaded size (8 bytes for a Python string).
    costs = {key: h.size * max(h.dtype.itemsize, loaded[key].itemsize, 1) for key, h in headers.items()}
    if all(cost < 2**62 for cost in costs.values()):  # else no stand-in: the limit below says it
        stand_ins = {key: np.broadcast_to(np.empty((), loaded[key]), h.shape) for key, h in headers.items()}
        check_sample(stand_ins, specs, where)
    for key, header in headers.items():
        if costs[key] > MAX_SAMPLE_BYTES:
            raise CalibrationDataError(
                f"{where}: input '{key}' declares shape {header.shape} of {header.dtype.name} = {costs[key]} "
                f"bytes, over the {_describe_bytes(MAX_SAMPLE_BYTES)} limit for one calibration array"
            )


def _read_npy(path: Path, spec: InputSpec) -> Sample:
    with open(path, "rb") as handle:
        header = read_npy_header(handle)
        _check_declared({spec.name: header}, [spec], path.name)
        held = os.fstat(handle.fileno()).st_size - header.data_offset
        if held < header.nbytes:  # np.fromfile would allocate the whole array first
            raise CalibrationDataError(
                f"cannot read calibration file {path.name}: truncated (its header declares {header.nbytes} "
                f"bytes of data, the file holds {held})"
            )
        handle.seek(0)
        array = _read_data(handle, header)
    return {spec.name: _as_loaded(array, spec, path.name)}


def _read_npz(path: Path, specs: list[InputSpec]) -> Sample:
    by_name = {s.name: s for s in specs}
    with NpzReader(path) as archive:
        keys = archive.keys()
        if set(keys) != set(by_name):  # missing/unknown inputs: said before any header is read
            check_sample(dict.fromkeys(keys), specs, path.name)
        _check_declared({key: archive.header(key) for key in keys}, specs, path.name)
        return {key: _as_loaded(archive.read(key), by_name[key], path.name) for key in keys}


def iter_folder(folder: Path, specs: list[InputSpec]) -> Iterator[Sample]:
    """.npy files for single-input models, .npz files keyed by input name otherwise.

    Each file's headers are checked against ``specs`` and MAX_SAMPLE_BYTES before its data
    is read; numpy strings for string inputs and non-native byte orders are converted."""
    for path in calibration_files(folder):
        try:
            if path.suffix == ".npy":
                if len(specs) != 1:
                    raise CalibrationDataError(
                        f"{path.name}: .npy files fit single-input models only; use .npz keyed by "
                        f"input name ({', '.join(s.name for s in specs)})"
                    )
                sample = _read_npy(path, specs[0])
            else:
                sample = _read_npz(path, specs)
        except CalibrationDataError:
            raise
        except Exception as exc:
            text = first_line(exc)
            if "pickle" in text:  # numpy's advice to unpickle is wrong for garbage and unsafe
                text = _PLAIN_ARRAYS.format(kind=path.suffix)
            raise CalibrationDataError(f"cannot read calibration file {path.name}: {text}") from exc
        yield check_sample(sample, specs, path.name)


class DataSource:
    """Calibration samples that several steps read: the first sample (stage-1 and
    fidelity checks), the whole stream (calibration) and the first few again (the
    per-tensor report).  A folder or a sequence is simply read again; a one-shot iterator
    is read once, and its first ``keep`` items are remembered as they pass."""

    def __init__(self, dataset, keep: int = 1):
        if dataset is not None and not isinstance(dataset, (str, Path, Iterable)):
            raise UsageError(
                f"calibration data must be a folder path or an iterable of samples, got {type(dataset).__name__}"
            )
        self.source = dataset
        self.keep = max(int(keep), 1)
        self.one_shot = dataset is not None and not isinstance(dataset, (str, Path)) and not hasattr(dataset, "__getitem__")
        self._iterator = iter(dataset) if self.one_shot else None
        self._head: list = []  # the first items of a one-shot iterator
        self._streamed = False

    def _fill(self, n: int) -> None:
        while len(self._head) < n and not self._streamed:
            try:
                self._head.append(next(self._iterator))
            except StopIteration:
                self._streamed = True

    def first(self, specs: list[InputSpec]) -> tuple[Sample, str] | None:
        """The first sample, checked, and its name (file name, else index 0); None if empty."""
        if isinstance(self.source, (str, Path)):
            folder = Path(self.source)
            sample = next(iter_folder(folder, specs), None)
            return (sample, calibration_files(folder)[0].name) if sample is not None else None
        if self.one_shot:
            self._fill(1)
            items = self._head[:1]
        else:
            items = [self.source[0]] if len(self.source) else []
        if not items:
            return None
        return next(iter_samples(items, specs)), "0"

    def stream(self):
        """What Calibrator.collect_data takes: the folder, the sequence, or for a one-shot
        iterator the items already read followed by the rest (remembering the first)."""
        if not self.one_shot:
            return self.source
        return self._replay()

    def _replay(self):
        yield from list(self._head)
        while not self._streamed:
            try:
                item = next(self._iterator)
            except StopIteration:
                self._streamed = True
                break
            if len(self._head) < self.keep:
                self._head.append(item)
            yield item

    def named_samples(self, specs: list[InputSpec], n: int) -> Iterator[tuple[str, Sample]]:
        """The first ``n`` samples, checked, each with its name (the file name for a folder,
        the index for an iterable): the fidelity check's samples."""
        if self.source is None or n <= 0:
            return
        if isinstance(self.source, (str, Path)):
            folder = Path(self.source)
            names = (p.name for p in calibration_files(folder))
            yield from itertools.islice(zip(names, iter_folder(folder, specs)), n)
            return
        items = self.samples(n) if not self.one_shot else self._head[:n]
        for index, sample in enumerate(iter_samples(items, specs)):
            yield str(index), sample

    def samples(self, n: int):
        """The first ``n`` samples again (for the report), in a form iter_samples takes."""
        if self.source is None or n <= 0:
            return None
        if isinstance(self.source, (str, Path)):
            return self.source
        if self.one_shot:
            return self._head[:n]
        if isinstance(self.source, (list, tuple)):
            return self.source[:n]
        return [self.source[i] for i in range(min(n, len(self.source)))]
