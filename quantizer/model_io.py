"""Reading and writing model files with one-line errors and atomic output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.external_data_helper
from google.protobuf.message import DecodeError

from .errors import ModelError, UsageError

ModelLike = "onnx.ModelProto | str | os.PathLike"


def load_model(model) -> onnx.ModelProto:
    """Return a ModelProto from a path or a proto; raise ModelError with the reason."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        try:
            proto = onnx.load_model_from_string(bytes(model))
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"not an ONNX model (cannot parse the given bytes: {str(exc).splitlines()[0]})") from None
    elif not isinstance(model, (str, os.PathLike)):
        raise UsageError(f"model must be a path, bytes or onnx.ModelProto, got {type(model).__name__}")
    else:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelError(f"model path is a directory, not an ONNX file: {path}")
        if path.stat().st_size == 0:
            raise ModelError(f"model file is empty: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise ModelError(
                f"not an ONNX model (cannot parse {path.name}: {str(exc).splitlines()[0]}); "
                "give a complete .onnx file (truncated download or wrong file?)"
            ) from None
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc.strerror or exc}") from None
        try:  # tensors stored beside the model (models over 2 GB)
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise ModelError(
                f"cannot read the external data of {path.name}: {str(exc).splitlines()[0]}; "
                "keep the model's .data file(s) next to it"
            ) from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelError("not a usable ONNX model: its graph has no nodes")
    return proto


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None) -> Path:
    """Refuse to overwrite the input and to write into a missing/unwritable directory."""
    out = Path(output)
    if input_path is not None and out.resolve() == Path(input_path).resolve():
        raise UsageError(f"output path is the input model; choose another -o than {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output directory is not writable: {parent}")
    if out.is_dir():
        raise UsageError(f"output path is a directory: {out}")
    return out


def _cannot_write(path: Path, exc: OSError) -> UsageError:
    return UsageError(
        f"cannot write {path}: {exc.strerror or exc}; check the output directory's permissions and free space"
    )


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask  # mkstemp's 0600 would surprise users


def write_atomic(path: str | os.PathLike, write, verify=None) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then ``verify(temp_path)``
    if given, then rename it into place: a failure, a failed check or Ctrl-C never leaves
    a half-written (or unverified) file, and an existing file stays as it was."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.chmod(tmp, _umask_mode())
        except OSError as exc:
            raise _cannot_write(path, exc) from None
        if verify is not None:
            verify(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# Protobuf cannot serialize a message of 2 GiB or more; above this size (with a margin
# for the graph itself) tensors are written as external data next to the output.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors stay inline, as onnx.save does


def fits_in_protobuf(proto: onnx.ModelProto) -> bool:
    return proto.ByteSize() < EXTERNAL_DATA_THRESHOLD


def external_data_path(output: str | os.PathLike) -> Path:
    """Where a large model's tensors go: beside the output, never beside the input."""
    output = Path(output)
    return output.with_name(output.name + ".data")


def _all_tensors(graph: onnx.GraphProto):
    """Initializers and Constant values of a graph and of all its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_tensors(sub)


@contextlib.contextmanager
def detached_tensor_data(graph: onnx.GraphProto, min_bytes: int = EXTERNAL_TENSOR_MIN_BYTES):
    """Take the raw bytes of the tensors of at least ``min_bytes`` out of ``graph`` for the
    duration of the block, yielding ``[(tensor, raw), ...]``; restored on exit, so the
    caller's model keeps its weights (and needs no 2 GB copy)."""
    moved, had_location = [], []
    try:
        for tensor in _all_tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < min_bytes:
                continue
            moved.append((tensor, tensor.raw_data))
            had_location.append(tensor.HasField("data_location"))
            tensor.ClearField("raw_data")
        yield moved
    finally:
        for (tensor, raw), had in zip(moved, had_location):
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            if had:
                tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


def _write_with_external_data(proto: onnx.ModelProto, folder: Path, name: str, data_name: str) -> None:
    """Write ``folder/name`` with its large tensors in ``folder/data_name``."""
    with detached_tensor_data(proto.graph) as moved, open(folder / data_name, "wb") as data:
        for tensor, raw in moved:
            data.write(b"\0" * (-data.tell() % 4096))  # page-aligned for mmap
            offset = data.tell()
            data.write(raw)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        (folder / name).write_bytes(proto.SerializeToString(deterministic=True))


@contextlib.contextmanager
def ort_model_source(proto: onnx.ModelProto):
    """What onnxruntime.InferenceSession takes: the bytes, or for a model too large for one
    protobuf, the path of a copy with external data in a temporary folder (never beside
    the input model; removed on exit)."""
    if fits_in_protobuf(proto):
        yield proto.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="quantizer-", ignore_cleanup_errors=True) as folder:
        _write_with_external_data(proto, Path(folder), "model.onnx", "model.onnx.data")
        yield str(Path(folder) / "model.onnx")


def _save_external_atomic(proto: onnx.ModelProto, output: Path, verify=None) -> None:
    """Write model + data into a temporary folder beside the output, verify, then rename
    the data file and the model into place (the data first, so the model never points at
    a missing file)."""
    data_path = external_data_path(output)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    except OSError as exc:
        raise _cannot_write(output, exc) from None
    try:
        try:
            _write_with_external_data(proto, folder, output.name, data_path.name)
            for part in (output.name, data_path.name):
                os.chmod(folder / part, _umask_mode())
        except OSError as exc:
            raise _cannot_write(output, exc) from None
        if verify is not None:
            verify(folder / output.name)
        os.replace(folder / data_path.name, data_path)
        os.replace(folder / output.name, output)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_model_atomic(proto: onnx.ModelProto, output: str | os.PathLike, verify=None) -> int:
    """Write the model atomically; returns the size in bytes of the written model file.

    ``verify(path)`` runs on the complete temporary file before it is renamed into place,
    so a model that fails it is never left at ``output``.  Models too large for one
    protobuf get their tensors in ``OUTPUT.data`` next to the output.
    """
    output = Path(output)
    if fits_in_protobuf(proto):
        write_atomic(output, lambda handle: handle.write(proto.SerializeToString(deterministic=True)), verify)
        return output.stat().st_size
    _save_external_atomic(proto, output, verify)
    return output.stat().st_size + external_data_path(output).stat().st_size
