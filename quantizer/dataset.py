"""Calibration samples: read lazily from a folder or any Python iterable, and checked
against the model's inputs (name, dtype, rank, fixed dims) one sample at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper

from .errors import CalibrationDataError, UsageError

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
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "pickle" in text:  # numpy's advice to unpickle is wrong for garbage and unsafe
                text = f"not a {path.suffix} file of plain arrays (save them with np.save / np.savez)"
            raise CalibrationDataError(f"cannot read calibration file {path.name}: {text}") from None
        yield check_sample(sample, specs, path.name)
