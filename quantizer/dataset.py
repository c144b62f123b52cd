"""Calibration samples: read lazily from a folder or any Python iterable, and checked
against the model's inputs (name, dtype, rank, fixed dims) one sample at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper

from .errors import CalibrationDataError, UsageError, first_line

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


def iter_folder(folder: Path, specs: list[InputSpec]) -> Iterator[Sample]:
    """.npy files for single-input models, .npz files keyed by input name otherwise."""
    for path in calibration_files(folder):
        try:
            if path.suffix == ".npy":
                if len(specs) != 1:
                    raise CalibrationDataError(
                        f"{path.name}: .npy files fit single-input models only; use .npz keyed by "
                        f"input name ({', '.join(s.name for s in specs)})"
                    )
                sample = {specs[0].name: np.load(path, allow_pickle=False)}
            else:
                with np.load(path, allow_pickle=False) as archive:
                    sample = {key: archive[key] for key in archive.files}
        except CalibrationDataError:
            raise
        except Exception as exc:
            text = first_line(exc)
            if "pickle" in text:  # numpy's advice to unpickle is wrong for garbage and unsafe
                text = f"not a {path.suffix} file of plain arrays (save them with np.save / np.savez)"
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
