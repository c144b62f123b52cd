"""Calibration samples, read lazily and checked against the model's inputs (name, dtype,
rank, fixed dims) one sample at a time.

The forms of ``data``:

* a folder of .npy files (single-input models) or .npz files keyed by input name, one
  sample per file;
* one stacked .npy (single-input) or .npz (keyed by input name) file whose arrays hold the
  samples along axis 0: a sample is B consecutive rows when the model's batch dimension is
  a fixed B, else one row with the batch axis kept ([1, ...]); read as memory maps, one
  sample at a time;
* a folder of images (.png, .jpg, ...), turned into float arrays by an
  ``ImagePreprocessing`` (its defaults come from the model's input shape; Pillow needed);
* any Python iterable of samples (dicts, sequences or bare arrays).

``DataSource`` is the one place the data is read: it also applies ``max_samples`` and
``shuffle_seed`` (``DataOptions``); ``DataSpec`` carries a path with its options where
one value is expected (the pipeline's ``data``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import math
import numbers
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from .errors import CalibrationDataError, QuantizerError, UsageError, first_line

try:  # .npy version 3.0 (utf-8 header): numpy has no public reader for its header alone
    from numpy.lib._format_impl import _read_array_header as _read_header_any_version
except ImportError:  # numpy < 2
    _read_header_any_version = getattr(np.lib.format, "_read_array_header", None)

Sample = dict[str, np.ndarray]

ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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
            cast = (f"; save it as {spec.dtype.name}: array.astype(np.{spec.dtype.name})"
                    if array.dtype.kind == spec.dtype.kind and spec.dtype.kind in "fiu" else "")
            raise CalibrationDataError(
                f"{where}: input '{spec.name}' expects {spec.describe()}, given {given} (wrong dtype){cast}"
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


# -- options of the data ---------------------------------------------------------------

LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")
PREPROCESS_KEYS = ("size", "layout", "channel_order", "scale", "mean", "std")


def _number(value, label: str) -> float:
    """A finite number; text may be a fraction ("1/255", handy in files and flags)."""
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        top, sep, bottom = value.strip().partition("/")
        try:
            number = float(top) / float(bottom) if sep else float(top)
        except (ValueError, ZeroDivisionError):
            number = None
    if number is None or not math.isfinite(number):
        raise UsageError(f"{label} must be a finite number (or a fraction like 1/255), got {value!r}")
    return number


def _per_channel(value, label: str, nonzero: bool = False) -> tuple[float, ...]:
    """One number for every channel, or one per channel (1 to 4 values)."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, (numbers.Real, str)):
        items = [items]
    try:
        values = tuple(_number(v, label) for v in items)
    except TypeError:
        values = ()
    if not 1 <= len(values) <= 4:
        raise UsageError(f"{label} must be one number or one per channel (e.g. 0.485,0.456,0.406), got {value!r}")
    if nonzero and 0.0 in values:
        raise UsageError(f"{label} must not be 0, got {value!r}")
    return values


def _size(value, label: str) -> tuple[int, int] | None:
    """(H, W) from two positive whole numbers (a sequence, or text "H,W" / "HxW"), or one (square)."""
    if value is None:
        return None
    items = value.lower().replace("x", ",").split(",") if isinstance(value, str) else value
    if isinstance(items, numbers.Integral):
        items = [items]
    try:
        dims = [int(d) if isinstance(d, str) else d for d in items]
    except (TypeError, ValueError):
        dims = []
    if len(dims) == 1:  # one number: a square
        dims = dims * 2
    if len(dims) != 2 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise UsageError(f"{label} must be two positive whole numbers H, W (e.g. 224,224), got {value!r}")
    return int(dims[0]), int(dims[1])


def _choice(value, choices: tuple[str, ...], label: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.upper() not in choices:
        raise UsageError(f"{label} must be one of {', '.join(choices)}, got {value!r}")
    return value.upper()


def _preprocessing_values(values: Mapping, label) -> dict:
    """The fields of an ImagePreprocessing, checked and normalized; ``label(key)`` names a
    field in messages."""
    out = dict(values)
    if "size" in out:
        out["size"] = _size(out["size"], label("size"))
    if "layout" in out:
        out["layout"] = _choice(out["layout"], LAYOUTS, label("layout"))
    if "channel_order" in out:
        out["channel_order"] = _choice(out["channel_order"], CHANNEL_ORDERS, label("channel_order"))
    if "scale" in out:
        out["scale"] = _number(out["scale"], label("scale"))
        if out["scale"] == 0:
            raise UsageError(f"{label('scale')} must not be 0")
    if "mean" in out:
        out["mean"] = _per_channel(out["mean"], label("mean"))
    if "std" in out:
        out["std"] = _per_channel(out["std"], label("std"), nonzero=True)
    return out


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a folder of images becomes model inputs, image by image: converted to RGB
    (grayscale when the input has 1 channel), resized to ``size`` (H, W) by Pillow's
    bilinear filter, in ``channel_order``, then ``(pixel * scale - mean) / std`` per
    channel, laid out as ``layout`` with a batch axis of 1, as float32 (the input's float
    type).

    ``size`` None: the input's fixed height and width (required when they are dynamic).
    ``layout`` None: NCHW when the input's dim 1 is 1 or 3, NHWC when its dim 3 is.
    ``mean`` and ``std``: one value for every channel, or one per channel."""

    size: tuple[int, int] | None = None
    layout: str | None = None
    channel_order: str = "RGB"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        defaults = {"channel_order": "RGB", "scale": 1 / 255, "mean": (0.0,), "std": (1.0,)}
        values = {key: getattr(self, key) for key in PREPROCESS_KEYS}
        values.update({key: value for key, value in defaults.items() if values[key] is None})
        for key, value in _preprocessing_values(values, lambda key: f"`images.{key}`").items():
            object.__setattr__(self, key, value)

    def updated(self, **changes) -> ImagePreprocessing:
        """A copy with the fields given (not None) changed."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    @classmethod
    def from_mapping(cls, values: Mapping, where: str = "`images`") -> ImagePreprocessing:
        """From {size, layout, channel_order, scale, mean, std} (any subset); ``where``
        names the source in messages."""
        if not isinstance(values, Mapping):
            raise UsageError(f"{where} must hold a table of {', '.join(PREPROCESS_KEYS)}, got {type(values).__name__}")
        unknown = [key for key in values if key not in PREPROCESS_KEYS]
        if unknown:
            raise UsageError(f"{where}: unknown key '{unknown[0]}' (the keys are {', '.join(PREPROCESS_KEYS)})")
        return cls(**_preprocessing_values(values, lambda key: f"'{key}' in {where}"))

    @classmethod
    def from_file(cls, path) -> ImagePreprocessing:
        """From a small .toml or .json file with the keys of ``from_mapping``."""
        path = Path(path)
        if path.suffix.lower() not in (".toml", ".json"):
            raise UsageError(f"the `preprocess` file must be .toml or .json, got {path.name}")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"`preprocess` file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the `preprocess` file {path.name}: {first_line(exc)}") from exc
        try:
            if path.suffix.lower() == ".json":
                values = json.loads(text)
            else:
                try:
                    import tomllib
                except ImportError:  # Python < 3.11
                    import tomli as tomllib
                values = tomllib.loads(text)
        except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError
            raise UsageError(f"cannot read the `preprocess` file {path.name}: {first_line(exc)}") from exc
        return cls.from_mapping(values, where=path.name)


def _whole(value, name: str, low: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise UsageError(f"`{name}` must be a whole number >= {low}, got {value!r}")
    return int(value)


def _shard(value) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        index, count = value
    except (TypeError, ValueError):
        raise UsageError(f"`shard` must be (index, count), got {value!r}") from None
    count = _whole(count, "shard count", 1)
    index = _whole(index, "shard index", 0)
    if index >= count:
        raise UsageError(f"`shard` index must be in 0..{count - 1} for {count} shards, got {index}")
    return index, count


def shard_positions(total: int, index: int, count: int) -> range:
    """The positions of shard ``index`` of ``count`` among ``total`` samples: the contiguous
    block [index * total // count, (index + 1) * total // count)."""
    return range(index * total // count, (index + 1) * total // count)


@dataclass(frozen=True)
class DataOptions:
    """How much of the data, in what order, and how images become arrays.

    ``max_samples``: use at most this many samples (None: all).  ``shuffle_seed``: shuffle
    the order of the files, the samples of a stacked file, or the items of a sequence with
    this seed before taking ``max_samples`` (None: sorted file order, row order).  Only
    names and indices are shuffled: no sample is read to shuffle.  ``images``: the
    preprocessing of a folder of images (an ImagePreprocessing, a mapping of its fields, or
    the path of a .toml/.json preprocessing file; None: the defaults).  ``shard``:
    ``(index, count)``, 0 <= index < count: only the index-th of ``count`` contiguous,
    equal (within one) blocks of those samples, so that shards run anywhere and their
    merged states are one run over all (see ``shard_positions``)."""

    max_samples: int | None = None
    shuffle_seed: int | None = None
    images: ImagePreprocessing | None = None
    shard: tuple[int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "max_samples", _whole(self.max_samples, "max_samples", 1))
        object.__setattr__(self, "shuffle_seed", _whole(self.shuffle_seed, "shuffle_seed", 0))
        object.__setattr__(self, "shard", _shard(self.shard))
        images = self.images
        if isinstance(images, (str, os.PathLike)):
            images = ImagePreprocessing.from_file(images)
        elif isinstance(images, Mapping):
            images = ImagePreprocessing.from_mapping(images)
        elif images is not None and not isinstance(images, ImagePreprocessing):
            raise UsageError("`images` must be an ImagePreprocessing, a mapping of its fields or a preprocessing "
                             f"file, got {type(images).__name__}")
        object.__setattr__(self, "images", images)

    def updated(self, **changes) -> DataOptions:
        """A copy with the options given (not None) changed."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    @property
    def reorders(self) -> bool:
        """Whether these options change which samples are read, or in what order."""
        return self.max_samples is not None or self.shuffle_seed is not None or self.shard is not None

    @property
    def is_default(self) -> bool:
        return not self.reorders and self.images is None


@dataclass(frozen=True)
class DataSpec:
    """Calibration data as one value: a path (a folder, a stacked .npy/.npz file or a
    folder of images) and the DataOptions to read it with.  Wherever ``data`` is taken (a
    DataSource, ``quantize_model``'s ``dataset``, ``CalibrationInputs.data``)."""

    path: str | os.PathLike
    options: DataOptions = field(default_factory=DataOptions)

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)):
            raise UsageError(f"a DataSpec's path must be a path, got {type(self.path).__name__}")
        options = DataOptions() if self.options is None else self.options
        if not isinstance(options, DataOptions):
            raise UsageError(f"a DataSpec's options must be DataOptions, got {type(options).__name__}")
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "options", options)


# -- what any consumer of samples calls --------------------------------------------------

def iter_samples(dataset: Iterable, specs: list[InputSpec]) -> Iterator[Sample]:
    """Yield checked samples from a path (a folder of .npy/.npz files or images, a stacked
    .npy/.npz file), a DataSpec, a DataSource stream, or an iterable of
    dicts/sequences/arrays."""
    for _, sample in iter_named_samples(dataset, specs):
        yield sample


def iter_named_samples(dataset: Iterable, specs: list[InputSpec]) -> Iterator[tuple[str, Sample]]:
    """(name, checked sample) of what ``iter_samples`` takes: the file name (``stack.npy[i]``
    for a stacked file) for a path, else the item's index."""
    if isinstance(dataset, _Stream):
        yield from dataset.named(specs)
        return
    if isinstance(dataset, (DataSpec, str, Path)):
        yield from DataSource(dataset).stream_named(specs)
        return
    if not isinstance(dataset, Iterable):
        raise UsageError(f"calibration data must be a folder path or an iterable of samples, got {type(dataset).__name__}")
    for index, item in enumerate(dataset):
        where = f"sample {index}"
        yield str(index), check_sample(_as_mapping(item, specs, where), specs, where)


def _is_stacked_file(path: Path) -> bool:
    return path.suffix in ARRAY_SUFFIXES and not path.is_dir()


def _folder_listing(folder: Path) -> tuple[str, list[Path]]:
    """("arrays" | "images", the sorted files): a folder holds one kind or the other."""
    if not folder.exists():
        raise CalibrationDataError(f"calibration folder not found: {folder}")
    if not folder.is_dir():
        raise CalibrationDataError(f"calibration path is not a folder (nor a stacked .npy/.npz file): {folder}")
    arrays, images = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix in ARRAY_SUFFIXES and path.is_file():
            arrays.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            images.append(path)
    if arrays and images:
        raise CalibrationDataError(
            f"{folder} holds {len(images)} image(s) and {len(arrays)} .npy/.npz file(s): calibration data is "
            "one or the other (move one kind to another folder)"
        )
    if not arrays and not images:
        raise CalibrationDataError(f"no .npy or .npz calibration files (nor images) in {folder}")
    return ("arrays", arrays) if arrays else ("images", images)


class _SampleNames:
    """The names of a stacked file's samples: ``stack.npy[12]`` is sample 12 (its rows
    12*B to 12*B+B-1 for a fixed batch B).  Unbounded (the count follows the model's
    batch size): index it, or zip it with the samples."""

    def __init__(self, path: Path):
        self.file = path.name

    def __getitem__(self, index: int) -> PurePosixPath:
        return PurePosixPath(f"{self.file}[{index}]")

    def __iter__(self) -> Iterator[PurePosixPath]:
        return (self[index] for index in itertools.count())


def calibration_files(path: Path):
    """The files of a calibration folder (.npy/.npz, or images), sorted, or for a stacked
    file the names of its samples; ``[index].name`` names a sample either way."""
    path = Path(path)
    if _is_stacked_file(path):
        if not path.exists():
            raise CalibrationDataError(f"calibration file not found: {path}")
        return _SampleNames(path)
    return _folder_listing(path)[1]


def count_samples(dataset) -> int | None:
    """How many samples ``dataset`` gives, when known without reading them."""
    if isinstance(dataset, DataSpec):
        dataset = DataSource(dataset).stream()
    if isinstance(dataset, (str, Path)):
        if _is_stacked_file(Path(dataset)):
            return None  # rows per sample follow the model's batch size
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


_HEADER_LENGTH = {(1, 0): struct.Struct("<H"), (2, 0): struct.Struct("<I"), (3, 0): struct.Struct("<I")}
_MAX_HEADER = 1 << 16  # numpy refuses headers over 10000 bytes anyway


@functools.lru_cache(maxsize=256)
def _parse_header(version: tuple, raw: bytes) -> tuple:
    """numpy's parse of a header (its length field and text): the same few headers repeat
    across a folder of samples, and numpy parses each with ast.literal_eval."""
    handle = io.BytesIO(raw)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    return _read_header_any_version(handle, version)


def read_npy_header(handle) -> ArrayHeader:
    """Read a .npy header from ``handle`` (at its start) and nothing more.

    Raises NotPlainArrays for anything but a well-formed header of a plain (pickle-free)
    array; numpy's own texts are not passed on (some of them advise allow_pickle)."""
    start = handle.tell()
    try:
        version = np.lib.format.read_magic(handle)
        if version not in _HEADER_LENGTH or (version == (3, 0) and _read_header_any_version is None):
            raise ValueError(f"unsupported .npy version {version}")
        length_field = handle.read(_HEADER_LENGTH[version].size)
        (length,) = _HEADER_LENGTH[version].unpack(length_field)
        if length > _MAX_HEADER:
            raise ValueError("header too long")
        shape, fortran_order, dtype = _parse_header(version, length_field + handle.read(length))
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

    def info(self, key: str) -> zipfile.ZipInfo:
        return self._members[key]

    def open(self, key: str):
        """The member as a file (decompressed as it is read)."""
        return self._zip.open(self._members[key])

    def check_size(self, key: str) -> None:
        """The zip entry must hold exactly the header plus the data it declares."""
        info, header = self._members[key], self.header(key)
        if info.file_size != header.data_offset + header.nbytes:
            raise CorruptArchive(
                f"corrupt .npz file (entry {info.filename!r} declares {header.nbytes} bytes of data, "
                f"its zip entry holds {info.file_size - header.data_offset})"
            )

    def read(self, key: str) -> np.ndarray:
        self.check_size(key)
        with self.open(key) as member:
            return _read_data(member, self.header(key))


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


@contextlib.contextmanager
def _read_errors(path: Path, what: str = "calibration file"):
    """Anything but our own errors while reading ``path`` becomes one CalibrationDataError
    line naming the file (numpy's advice to unpickle is wrong for garbage and unsafe)."""
    try:
        yield
    except QuantizerError:
        raise
    except Exception as exc:
        text = first_line(exc).replace(f" '{path}'", "")  # Pillow names the file again, by its whole path
        if "pickle" in text:
            text = _PLAIN_ARRAYS.format(kind=path.suffix)
        raise CalibrationDataError(f"cannot read {what} {path.name}: {text}") from exc


def _read_file(path: Path, specs: list[InputSpec]) -> Sample:
    """One sample file of a folder: .npy for single-input models, .npz otherwise."""
    with _read_errors(path):
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise CalibrationDataError(
                    f"{path.name}: .npy files fit single-input models only; use .npz keyed by "
                    f"input name ({', '.join(s.name for s in specs)})"
                )
            return _read_npy(path, specs[0])
        return _read_npz(path, specs)


def iter_folder(folder: Path, specs: list[InputSpec], images: ImagePreprocessing | None = None) -> Iterator[Sample]:
    """A path's samples, in order: a folder's files sorted (.npy files for single-input
    models, .npz files keyed by input name otherwise, or images: ``images`` is their
    preprocessing), or a stacked .npy/.npz file's rows.

    Each file's headers are checked against ``specs`` and MAX_SAMPLE_BYTES before its data
    is read; numpy strings for string inputs and non-native byte orders are converted."""
    plan = _collection(Path(folder)).bind(specs, images)
    for _, sample in plan.iterate(range(plan.count)):
        yield sample


class _FolderPlan:
    """A folder of .npy/.npz files bound to the model's inputs: one sample per file."""

    def __init__(self, files: list[Path], specs: list[InputSpec]):
        self.files, self.specs, self.count = files, specs, len(files)

    def iterate(self, indices: Sequence[int], ordered: bool = True) -> Iterator[tuple[str, Sample]]:
        for index in indices:
            path = self.files[index]
            yield path.name, check_sample(_read_file(path, self.specs), self.specs, path.name)


# -- stacked files -----------------------------------------------------------------------

def _batch(spec: InputSpec) -> int | None:
    """The input's fixed batch size, None when its first dim is dynamic (or unknown)."""
    first = spec.dims[0] if spec.dims else None
    return first if isinstance(first, int) and first > 0 else None


class _StackedFile:
    """A stacked .npy/.npz file: the samples along axis 0 of its arrays.  Headers are read
    first (and checked per sample), then the data is mapped, never read whole: a sample
    is a copy of its rows.  A compressed .npz member (np.savez_compressed) is decompressed
    as a stream while the samples are read in order; for another order (shuffle_seed) it
    is unpacked once to an anonymous temporary file, itself mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._headers: dict[str, ArrayHeader] | None = None  # npz key (or "" for .npy) -> header
        self._archive: NpzReader | None = None
        self._maps: dict[str, np.ndarray] = {}
        self._spills: dict = {}  # key -> the temporary file a compressed member was unpacked to

    @property
    def is_npz(self) -> bool:
        return self.path.suffix == ".npz"

    def headers(self) -> dict[str, ArrayHeader]:
        if self._headers is None:
            if not self.path.exists():
                raise CalibrationDataError(f"calibration file not found: {self.path}")
            with _read_errors(self.path):
                if self.is_npz:
                    self._archive = NpzReader(self.path)
                    self._headers = {key: self._archive.header(key) for key in self._archive.keys()}  # noqa: SIM118
                else:
                    with open(self.path, "rb") as handle:
                        header = read_npy_header(handle)
                        held = os.fstat(handle.fileno()).st_size - header.data_offset
                    if held < header.nbytes:
                        raise CalibrationDataError(
                            f"cannot read calibration file {self.path.name}: truncated (its header declares "
                            f"{header.nbytes} bytes of data, the file holds {held})"
                        )
                    self._headers = {"": header}
        return self._headers

    def bind(self, specs: list[InputSpec], images: ImagePreprocessing | None) -> _StackedPlan:
        name = self.path.name
        if images is not None:
            raise UsageError(f"image preprocessing (`images`) applies to a folder of images; {name} is a stacked "
                             f"{self.path.suffix} file")
        if not self.is_npz and len(specs) != 1:
            raise CalibrationDataError(
                f"{name}: a stacked .npy file fits single-input models only; use a stacked .npz keyed by input "
                f"name ({', '.join(s.name for s in specs)})"
            )
        headers = self.headers()
        if self.is_npz:
            if set(headers) != {s.name for s in specs}:  # missing/unknown inputs, as for one .npz sample
                check_sample(dict.fromkeys(headers), specs, name)
            keyed = {s.name: (s, s.name) for s in specs}
        else:
            keyed = {specs[0].name: (specs[0], "")}
        rows = {}
        for input_name, (spec, key) in keyed.items():
            header = headers[key]
            if not header.shape:
                raise CalibrationDataError(f"{name}: input '{input_name}' is a single value; a stacked file holds "
                                           "its samples along axis 0")
            if spec.dims and len(header.shape) != len(spec.dims):
                raise CalibrationDataError(
                    f"{name}: input '{input_name}' expects {spec.describe()}, the stacked array is "
                    f"{header.dtype.name}[{','.join(map(str, header.shape))}] (wrong rank: a stacked file holds the "
                    "samples along axis 0 in the input's rank, e.g. np.concatenate of [1, ...] samples)"
                )
            rows[input_name] = header.shape[0]
        if len(set(rows.values())) > 1:
            counts = ", ".join(f"'{k}' {r}" for k, r in rows.items())
            raise CalibrationDataError(f"{name}: the inputs have different row counts ({counts}); a stacked .npz "
                                       "holds one row per sample in every input")
        per, counts = {}, set()
        for input_name, (spec, key) in keyed.items():
            batch = _batch(spec)
            per[input_name] = batch or 1
            if rows[input_name] % per[input_name]:
                raise CalibrationDataError(
                    f"{name}: {rows[input_name]} rows of input '{input_name}' are not a multiple of the model's "
                    f"batch size {batch} (each sample is {batch} consecutive rows)"
                )
            counts.add(rows[input_name] // per[input_name])
        if len(counts) > 1:
            raise CalibrationDataError(f"{name}: the inputs' fixed batch sizes ({', '.join(map(str, per.values()))}) "
                                       "give different sample counts for the same rows")
        count = counts.pop()
        if count == 0:
            raise CalibrationDataError(f"no samples in {name} (0 rows)")
        per_sample = {input_name: replace(headers[key], shape=(per[input_name], *headers[key].shape[1:]))
                      for input_name, (_, key) in keyed.items()}
        _check_declared(per_sample, specs, name)  # dtype, rank, fixed dims and size of one sample
        return _StackedPlan(self, specs, {n: key for n, (_, key) in keyed.items()}, per, count)

    def _map(self, key: str) -> np.ndarray:
        """The whole array as a read-only memory map (the file, or a stored .npz member)."""
        if key not in self._maps:
            header = self._headers[key]
            source, offset = self.path, header.data_offset
            if self.is_npz:
                info = self._archive.info(key)
                self._archive.check_size(key)
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
                    offset += _member_data_start(self.path, info)
                    if os.path.getsize(self.path) < offset + header.nbytes:
                        raise CorruptArchive(f"truncated .npz file (entry {info.filename!r} runs past its end)")
                else:
                    source = self._spill(key)
            order = "F" if header.fortran_order else "C"
            self._maps[key] = np.memmap(source, dtype=header.dtype, mode="r", offset=offset, shape=header.shape,
                                        order=order)
        return self._maps[key]

    def _spill(self, key: str):
        """Unpack a compressed member to an anonymous temporary file (deleted when closed)."""
        info = self._archive.info(key)
        folder = tempfile.gettempdir()
        free = shutil.disk_usage(folder).free
        if info.file_size + 2**26 > free:
            raise CalibrationDataError(
                f"{self.path.name}: entry {info.filename!r} is compressed ({info.file_size} bytes unpacked); read "
                f"in another order than its rows it is unpacked to a temporary file, and {folder} has {free} bytes "
                "free: save the stack with np.savez (not compressed), or read it without `shuffle_seed`"
            )
        spill = tempfile.TemporaryFile()  # noqa: SIM115 (kept open: the memory map reads it)
        with self._archive.open(key) as member:
            shutil.copyfileobj(member, spill, 2**16)
        spill.flush()
        self._spills[key] = spill
        return spill

    def _compressed(self, key: str) -> bool:
        info = self._archive.info(key) if self.is_npz else None
        return info is not None and (info.compress_type != zipfile.ZIP_STORED or bool(info.flag_bits & 1))

    def rows(self, key: str, per: int, indices: Sequence[int], ordered: bool) -> Iterator[np.ndarray]:
        """Sample ``i`` of ``indices`` is rows [i*per, (i+1)*per) of array ``key``, copied."""
        header = self._headers[key]
        sample_shape = (per, *header.shape[1:])
        if header.size == 0:  # nothing to map: empty samples (check_sample says so)
            for _ in indices:
                yield np.empty(sample_shape, header.dtype)
            return
        streamed = ordered and key not in self._maps and self._compressed(key) and not (
            header.fortran_order and len(header.shape) > 1)
        if not streamed:
            array = self._map(key)
            for index in indices:
                yield np.array(array[index * per:(index + 1) * per])
            return
        self._archive.check_size(key)
        nbytes = math.prod(sample_shape) * header.dtype.itemsize
        with self._archive.open(key) as member:
            for index in indices:  # increasing: each seek decompresses forward only
                member.seek(header.data_offset + index * nbytes)
                data = bytearray(nbytes)
                if member.readinto(data) != nbytes:
                    raise CorruptArchive(f"truncated data (its header declares {header.nbytes} bytes)")
                yield np.frombuffer(data, dtype=header.dtype).reshape(sample_shape)


def _member_data_start(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes start: after its local header, whose name and
    extra field lengths may differ from the central directory's."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CorruptArchive(f"corrupt .npz file (entry {info.filename!r} has no local header)")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length


class _StackedPlan:
    """A stacked file bound to the model's inputs: ``count`` samples of ``per`` rows."""

    def __init__(self, stacked: _StackedFile, specs: list[InputSpec], keys: dict[str, str], per: dict[str, int],
                 count: int):
        self.stacked, self.specs, self.keys, self.per, self.count = stacked, specs, keys, per, count

    def iterate(self, indices: Sequence[int], ordered: bool = True) -> Iterator[tuple[str, Sample]]:
        path = self.stacked.path
        sources = {name: self.stacked.rows(key, self.per[name], indices, ordered) for name, key in self.keys.items()}
        for index in indices:
            with _read_errors(path):
                sample = {name: next(source) for name, source in sources.items()}
            where = f"{path.name}[{index}]"
            yield where, check_sample(sample, self.specs, where)


# -- images ----------------------------------------------------------------------------

def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("a folder of images needs Pillow: pip install onnx-int8-quantizer[images]") from None
    return Image


@dataclass(frozen=True)
class _ImageRecipe:
    """An ImagePreprocessing resolved against one model input."""

    height: int
    width: int
    channels: int
    channels_first: bool
    bgr: bool
    scale: float
    mean: np.ndarray  # float32 [channels] (or [1])
    std: np.ndarray
    dtype: np.dtype


def _image_recipe(spec: InputSpec, pre: ImagePreprocessing, folder: str) -> _ImageRecipe:
    where = f"{folder}: input '{spec.name}' {spec.describe()}"
    if spec.dtype.kind != "f":
        raise CalibrationDataError(f"{where} is not float: images become float arrays (give this input arrays "
                                   "in .npy files)")
    if spec.dims and len(spec.dims) != 4:
        raise CalibrationDataError(f"{where}: images fit 4-D inputs (NCHW or NHWC)")
    fixed = [d if isinstance(d, int) and d > 0 else None for d in spec.dims] or [None] * 4
    if fixed[0] not in (None, 1):
        raise CalibrationDataError(f"{where} has a fixed batch of {fixed[0]}; a folder of images gives samples of "
                                   "one image (stack them into a .npy file instead)")
    layout = pre.layout
    if layout is None:
        if fixed[1] in (1, 3):
            layout = "NCHW"
        elif fixed[3] in (1, 3):
            layout = "NHWC"
        else:
            raise UsageError(f"{where}: cannot tell its channel axis; give `images.layout` (NCHW or NHWC)")
    channel_axis, height_axis, width_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    channels = fixed[channel_axis] or 3
    if channels not in (1, 3):
        raise CalibrationDataError(f"{where} has {channels} channels ({layout}); images give 1 (grayscale) or 3")
    height, width = fixed[height_axis], fixed[width_axis]
    if pre.size is None:
        if height is None or width is None:
            raise UsageError(f"{where}: its height and width are not fixed; give `images.size` (H, W) to resize "
                             "the images to")
    elif (height or pre.size[0], width or pre.size[1]) != pre.size:
        raise UsageError(f"`images.size` {pre.size[0]},{pre.size[1]} does not fit input '{spec.name}' "
                         f"{spec.describe()} ({layout})")
    height, width = pre.size or (height, width)
    for key in ("mean", "std"):
        values = getattr(pre, key)
        if len(values) not in (1, channels):
            raise UsageError(f"`images.{key}` has {len(values)} values; input '{spec.name}' has {channels} "
                             "channel(s)")
    if height * width * channels * spec.dtype.itemsize > MAX_SAMPLE_BYTES:
        raise CalibrationDataError(f"{where}: images of {height}x{width} are over the "
                                   f"{_describe_bytes(MAX_SAMPLE_BYTES)} limit for one calibration array")
    return _ImageRecipe(height, width, channels, layout == "NCHW", pre.channel_order == "BGR", pre.scale,
                        np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32), spec.dtype)


def _read_image(image_module, path: Path, recipe: _ImageRecipe) -> np.ndarray:
    """One image as [1, C, H, W] or [1, H, W, C]: Pillow reads and resizes it, numpy
    does the rest on the whole array."""
    with image_module.open(path) as image:  # the header only, until the pixels are needed
        width, height = image.size
        if width * height * 4 > MAX_SAMPLE_BYTES:
            raise CalibrationDataError(f"{path.name}: declares {width}x{height} pixels, over the "
                                       f"{_describe_bytes(MAX_SAMPLE_BYTES)} limit for one calibration array")
        image = image.convert("L" if recipe.channels == 1 else "RGB")
        if image.size != (recipe.width, recipe.height):
            image = image.resize((recipe.width, recipe.height), image_module.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if recipe.bgr:
        pixels = pixels[:, :, ::-1]
    pixels = (pixels * recipe.scale - recipe.mean) / recipe.std
    if recipe.channels_first:
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[None], dtype=recipe.dtype)


class _ImagePlan:
    """A folder of images bound to a single-input model: one sample per image."""

    def __init__(self, folder: Path, files: list[Path], specs: list[InputSpec], pre: ImagePreprocessing):
        self.image = _pillow()
        if len(specs) != 1:
            raise CalibrationDataError(f"{folder.name}: a folder of images fits single-input models only (model "
                                       f"inputs: {', '.join(s.name for s in specs)})")
        self.files, self.specs, self.count = files, specs, len(files)
        self.recipe = _image_recipe(specs[0], pre, folder.name)

    def iterate(self, indices: Sequence[int], ordered: bool = True) -> Iterator[tuple[str, Sample]]:
        for index in indices:
            path = self.files[index]
            with _read_errors(path, "calibration image"):
                array = _read_image(self.image, path, self.recipe)
            yield path.name, check_sample({self.specs[0].name: array}, self.specs, path.name)


class _Folder:
    """A calibration folder: its kind and sorted files, listed once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.kind, self.files = _folder_listing(folder)

    def bind(self, specs: list[InputSpec], images: ImagePreprocessing | None):
        if self.kind == "images":
            return _ImagePlan(self.folder, self.files, specs, images or ImagePreprocessing())
        if images is not None:
            raise UsageError(f"image preprocessing (`images`) applies to a folder of images; {self.folder.name} "
                             "holds .npy/.npz files")
        return _FolderPlan(self.files, specs)


def _collection(path: Path):
    return _StackedFile(path) if _is_stacked_file(path) else _Folder(path)


# -- the data source -------------------------------------------------------------------

class _Stream:
    """A DataSource's samples in its order (``max_samples``, ``shuffle_seed``, ``images``
    applied), at most ``limit``: what Calibrator.collect_data (through iter_samples and
    count_samples) and the report take.  Samples are formed for the specs iter_samples
    is given."""

    def __init__(self, source: DataSource, limit: int | None = None):
        self._source, self._limit = source, limit

    def named(self, specs: list[InputSpec]) -> Iterator[tuple[str, Sample]]:
        return self._source._named(specs, self._limit)

    def source(self) -> DataSource:
        """The DataSource streamed (whole: a limited stream is the report's, never calibrated)."""
        return self._source

    def __len__(self) -> int:
        count = self._source._count()
        if count is None:
            raise TypeError("the sample count is not known before the model's inputs are")
        return count if self._limit is None else min(count, self._limit)


class _SequenceView:
    """Items of a sequence in a given order of indices (nothing is copied)."""

    def __init__(self, items, order: Sequence[int]):
        self._items, self._order = items, order

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _SequenceView(self._items, self._order[index])
        return self._items[int(self._order[index])]

    def __iter__(self):
        for index in self._order:
            yield self._items[int(index)]


def _order(count: int, options: DataOptions) -> Sequence[int]:
    """The sample indices to read, in order: all or a seeded permutation, then the first
    ``max_samples``.  Indices only (a range when not shuffled)."""
    order = range(count) if options.shuffle_seed is None else np.random.default_rng(options.shuffle_seed).permutation(count)
    order = order if options.max_samples is None else order[:options.max_samples]
    if options.shard is not None:
        block = shard_positions(len(order), *options.shard)
        order = order[block.start:block.stop]
    return order


def _spread_stride(count: int, n: int) -> int:
    """The power-of-two stride at which ``count`` samples leave at most ``2 n`` (the one a
    stream of unknown length reaches by doubling: ``_Thinned``)."""
    stride = 1
    while -(-count // stride) > 2 * n:
        stride *= 2
    return stride


def _pick_evenly(m: int, n: int) -> list[int]:
    """``min(n, m)`` distinct indices of ``range(m)`` spread evenly, first and last included."""
    if m <= n or n == 1:
        return list(range(min(n, m)))
    return sorted({(2 * k * (m - 1) + n - 1) // (2 * (n - 1)) for k in range(n)})  # k (m-1)/(n-1), halves up


def _spread(count: int, n: int) -> list[int]:
    """The positions of ``n`` samples spread over ``count``: every ``_spread_stride``-th
    sample, then ``n`` of those evenly.  A stream picks the same ones (``_Thinned``)."""
    stride = _spread_stride(count, n)
    return [j * stride for j in _pick_evenly(-(-count // stride), n)]


def _nbytes(item) -> int:
    """The bytes of the arrays in one item of a data iterable (a mapping, a sequence of
    arrays or an array)."""
    if isinstance(item, Mapping):
        return sum(_nbytes(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(_nbytes(v) for v in item)
    return int(getattr(item, "nbytes", 0) or 0)


class _Thinned:
    """The items of a stream of unknown length at the multiples of a power-of-two stride
    that doubles whenever more than ``2 n`` would be held: at the end, exactly the items
    ``_spread`` picks among (at most 2n + 1 items held at any time)."""

    def __init__(self, n: int):
        self.n, self.stride, self.count = n, 1, 0
        self.items: list = []

    def add(self, item) -> None:
        if self.count % self.stride == 0:
            self.items.append(item)
        self.count += 1
        if -(-self.count // self.stride) > 2 * self.n:
            self.stride *= 2
            self.items = self.items[::2]

    def picked(self, n: int) -> list:
        return [self.items[j] for j in _pick_evenly(len(self.items), n)]


class DataSource:
    """Calibration samples that several steps read: the first sample (stage-1 and
    fidelity checks), the whole stream (calibration) and the first few again (the
    per-tensor report).  A path (folder, stacked file, folder of images) or a sequence is
    simply read again; a one-shot iterator is read once, and its first ``keep`` items are
    remembered as they pass.

    ``dataset`` may also be a DataSpec (a path with its DataOptions); the keyword options
    (``max_samples``, ``shuffle_seed``, ``images``: see DataOptions) change the spec's
    when given.  Every method honours them."""

    def __init__(self, dataset, keep: int = 1, *, max_samples: int | None = None, shuffle_seed: int | None = None,
                 images: ImagePreprocessing | None = None, spread: int = 4):
        if dataset is not None and not isinstance(dataset, (str, Path, DataSpec, Iterable)):
            raise UsageError(
                f"calibration data must be a folder path or an iterable of samples, got {type(dataset).__name__}"
            )
        options = dataset.options if isinstance(dataset, DataSpec) else DataOptions()
        self.options = options.updated(max_samples=max_samples, shuffle_seed=shuffle_seed, images=images)
        self.source = dataset
        self.keep = max(int(keep), 1)
        self._path = dataset.path if isinstance(dataset, DataSpec) else (
            Path(dataset) if isinstance(dataset, (str, Path)) else None)
        self.one_shot = dataset is not None and self._path is None and not hasattr(dataset, "__getitem__")
        if dataset is not None and self._path is None:
            if self.options.images is not None:
                raise UsageError("image preprocessing (`images`) applies to a folder of images; this data is a "
                                 "Python iterable of arrays")
            if self.one_shot and self.options.shuffle_seed is not None:
                raise UsageError("`shuffle_seed` needs data that can be read in any order (a folder, a stacked file "
                                 "or a sequence); a one-shot iterator cannot be shuffled without holding it")
            if self.one_shot and self.options.shard is not None:
                raise UsageError("`shard` needs data that can be read in any order (a folder, a stacked file "
                                 "or a sequence), not a one-shot iterator")
        self._iterator = iter(dataset) if self.one_shot else None
        self._head: list = []  # the first items of a one-shot iterator
        self._thinned = _Thinned(max(int(spread), 1))  # a one-shot iterator's items that spread_samples picks from
        self._streamed = False
        self._pulled = 0  # items read from a one-shot iterator
        self._held: list | None = None  # every item within ``max_samples`` (``hold``): replayed by ``stream``
        self._held_bytes, self._held_budget = 0, 0
        self._replayed = False  # calibration has read the whole of a one-shot iterator once
        self._collection = None  # a path's folder listing or stacked file, opened once
        self._plans: dict[tuple, object] = {}  # per model inputs: the path bound to them
        self._last_specs: tuple | None = None
        self._orders: dict[int, Sequence[int]] = {}

    # -- a path ----------------------------------------------------------------------

    def _plan(self, specs: list[InputSpec]):
        key = tuple(specs)
        if key not in self._plans:
            if self._collection is None:
                self._collection = _collection(self._path)
            self._plans[key] = self._collection.bind(list(specs), self.options.images)
        self._last_specs = key
        return self._plans[key]

    def _named(self, specs: list[InputSpec], n: int | None = None) -> Iterator[tuple[str, Sample]]:
        """(name, checked sample) of a path, in this source's order, the first ``n``."""
        plan = self._plan(specs)
        if plan.count not in self._orders:
            self._orders[plan.count] = _order(plan.count, self.options)
        order = self._orders[plan.count]
        yield from plan.iterate(order if n is None else order[:n], ordered=self.options.shuffle_seed is None)

    def layout(self, specs: list[InputSpec]) -> tuple[DataSpec, int, Sequence[int]]:
        """How a path's samples are split among workers that each read the same path: the
        spec they open (the path with its image preprocessing only), the number of samples
        the path holds, and the positions of this source's samples in it, in order."""
        if self._path is None:
            raise UsageError("calibration on a cluster needs the data as a path every worker reads (a folder, a "
                             "stacked file or images on shared storage), not a Python iterable")
        plan = self._plan(specs)
        return DataSpec(self._path, DataOptions(images=self.options.images)), plan.count, _order(plan.count, self.options)

    def read_positions(self, specs: list[InputSpec], positions: Sequence[int], count: int) -> Iterator[tuple[str, Sample]]:
        """(name, checked sample) at ``positions`` of a path that holds ``count`` samples
        (as the client's ``layout`` saw it: a worker that lists another count reads other data)."""
        plan = self._plan(specs)
        if plan.count != count:
            raise CalibrationDataError(f"{self._path} holds {plan.count} samples on this worker but {count} where the "
                                       "run started: every worker must read the same data (shared storage)")
        ordered = all(a < b for a, b in zip(positions, positions[1:]))
        return plan.iterate(positions, ordered=ordered)

    def stream_named(self, specs: list[InputSpec]) -> Iterator[tuple[str, Sample]]:
        """(name, checked sample) of a path, in this source's order (all its options applied)."""
        return self._named(specs)

    def _count(self) -> int | None:
        if self._last_specs is not None:
            count = self._plans[self._last_specs].count
        else:
            if self._collection is None:
                self._collection = _collection(self._path)
            count = len(self._collection.files) if isinstance(self._collection, _Folder) else None
        if count is None:
            return count
        if self.options.max_samples is not None:
            count = min(count, self.options.max_samples)
        return count if self.options.shard is None else len(shard_positions(count, *self.options.shard))

    def _plain_path(self) -> bool:
        """A path read as the consumers read a path themselves (no option changes it)."""
        return self._path is not None and self.options.is_default

    # -- a sequence or an iterator ---------------------------------------------------

    def _view(self):
        """The sequence in this source's order (itself when no option changes it)."""
        if not self.options.reorders:
            return self.source
        return _SequenceView(self.source, _order(len(self.source), self.options))

    def _fill(self, n: int) -> None:
        while len(self._head) < n and not self._streamed:
            self._pull(self._head.append)

    def _pull(self, take) -> bool:
        """Read the next item of a one-shot iterator into ``take`` (and into the thinned
        items spread_samples picks from, if it is within ``max_samples``); False at its end."""
        try:
            item = next(self._iterator)
        except StopIteration:
            self._streamed = True
            return False
        self._pulled += 1
        limit = self.options.max_samples
        if limit is None or self._thinned.count < limit:
            self._thinned.add(item)
            self._hold(item)
        take(item)
        return True

    def hold(self, budget: int) -> None:
        """Keep every item a one-shot iterator yields (the ones already read included), up
        to ``budget`` bytes of arrays, so that ``stream`` gives them all again after
        calibration read them: a second calibration pass (autotune's algorithm trials).
        Past the budget nothing is kept, and ``replayable`` says so.  Only before
        calibration starts reading (every item read so far is then in the head)."""
        if not self.one_shot or self._held is not None or self._pulled != len(self._head):
            return
        self._held, self._held_bytes, self._held_budget = [], 0, int(budget)
        for item in self._head[:self._limit(None)]:
            self._hold(item)

    def _hold(self, item) -> None:
        if self._held is None:
            return
        self._held_bytes += _nbytes(item)
        if self._held_bytes > self._held_budget:
            self._held, self._held_budget = None, -1  # too large: nothing is held
        else:
            self._held.append(item)

    @property
    def replayable(self) -> bool:
        """Whether ``stream`` gives every sample again after calibration read them (a path or
        a sequence; a one-shot iterator only if ``hold`` kept them all)."""
        return not self.one_shot or self._held is not None

    def release(self) -> None:
        """Forget the items ``hold`` kept."""
        if self._held is not None:
            self._held, self._held_budget = None, -1

    def _limit(self, n: int | None) -> int | None:
        limits = [x for x in (n, self.options.max_samples) if x is not None]
        return min(limits) if limits else None

    # -- what the steps call ---------------------------------------------------------

    def first(self, specs: list[InputSpec]) -> tuple[Sample, str] | None:
        """The first sample, checked, and its name (file name, ``stack.npy[i]``, else
        index 0); None if empty."""
        if self._path is not None:
            first = next(self._named(specs, 1), None)
            return (first[1], first[0]) if first is not None else None
        if self.one_shot:
            self._fill(1)
            items = self._head[:1]
        else:
            view = self._view()
            items = [view[0]] if len(view) else []
        if not items:
            return None
        return next(iter_samples(items, specs)), "0"

    def stream(self):
        """What Calibrator.collect_data takes: the path itself (no options), the samples
        in this source's order, the sequence, or for a one-shot iterator the items already
        read followed by the rest (remembering the first)."""
        if self._path is not None:
            if not self._plain_path():
                return _Stream(self)
            return self._path if isinstance(self.source, DataSpec) else self.source
        if not self.one_shot:
            return self._view()
        if self._replayed and self._held is not None:
            return list(self._held)
        return self._replay()

    def _replay(self):
        limit = self.options.max_samples
        head = list(self._head if limit is None else self._head[:limit])
        yield from head
        count = len(head)
        while not self._streamed and (limit is None or count < limit):
            pulled = []
            if not self._pull(pulled.append):
                break
            if len(self._head) < self.keep:
                self._head.append(pulled[0])
            count += 1
            yield pulled[0]
        self._replayed = True

    def named_samples(self, specs: list[InputSpec], n: int | None) -> Iterator[tuple[str, Sample]]:
        """The first ``n`` samples (None: all), checked, each with its name (the file
        name, ``stack.npy[i]`` for a stacked file, the index for an iterable): the
        fidelity check's samples."""
        if self.source is None or (n is not None and n <= 0):
            return
        if self._path is not None:
            yield from self._named(specs, n)
            return
        if self.one_shot:
            items = self._head[:self._limit(n)]
        elif n is None:
            items = self._view()
        else:
            items = self.samples(n)
        for index, sample in enumerate(iter_samples(items, specs)):
            yield str(index), sample

    def spread_samples(self, specs: list[InputSpec], n: int,
                       before_streaming: bool = False) -> Iterator[tuple[str, Sample]]:
        """``n`` samples spread evenly over the whole source (first, last and evenly
        between, in this source's order), checked, each with its name: the accuracy
        steps' samples.  A folder sorted by class or by recording then still gives them
        every kind of input, where its first files might all be alike.  The picks are
        every ``_spread_stride``-th sample, then ``n`` of those evenly (the last one
        included when the source holds at most ``2 n``), so that a one-shot iterator, which
        cannot be read again, keeps the same ones as they pass (``_Thinned``: the source's
        ``spread`` must then be at least ``n``).  ``before_streaming``: asked before
        calibration reads the source (a step that changes the model calibration sees), when
        a one-shot iterator cannot be spread over: its first ``n``, held for calibration."""
        if self.source is None or n <= 0:
            return
        if self._path is not None:
            plan = self._plan(specs)
            if plan.count not in self._orders:
                self._orders[plan.count] = _order(plan.count, self.options)
            order = self._orders[plan.count]
            positions = [order[i] for i in _spread(len(order), n)]
            yield from plan.iterate(positions, ordered=all(a < b for a, b in zip(positions, positions[1:])))
            return
        if self.one_shot and before_streaming and not self._streamed:
            self._fill(n)
            yield from ((str(i), sample) for i, sample in enumerate(iter_samples(self._head[:self._limit(n)], specs)))
            return
        if self.one_shot:
            if not self._streamed:  # calibration has not read it (e.g. statistics from saved states)
                for _ in self._replay():
                    pass
            yield from ((str(i), sample) for i, sample in enumerate(iter_samples(self._thinned.picked(n), specs)))
            return
        view = self._view()
        indices = _spread(len(view), n)
        for index, sample in zip(indices, iter_samples([view[i] for i in indices], specs)):
            yield str(index), sample

    def samples(self, n: int):
        """The first ``n`` samples again (for the report), in a form iter_samples takes."""
        if self.source is None or n <= 0:
            return None
        if self._path is not None:
            return self.stream() if self._plain_path() else _Stream(self, n)
        if self.one_shot:
            return self._head[:self._limit(n)]
        if self.options.reorders:
            return self._view()[:n]
        if isinstance(self.source, (list, tuple)):
            return self.source[:n]
        return [self.source[i] for i in range(min(n, len(self.source)))]
