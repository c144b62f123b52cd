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

from .errors import ModelError, UsageError, first_line

ModelLike = "onnx.ModelProto | str | os.PathLike"


# What a file that is not ONNX usually is, by its magic bytes or suffix, and what to do.
_NOT_ONNX = (
    (b"PK\x03\x04", None, "a zip archive (a PyTorch checkpoint .pt/.pth, or a .zip)",
     "export the model with torch.onnx.export(model, example_inputs, 'model.onnx')"),
    (b"\x80\x02", None, "a pickled PyTorch checkpoint",
     "export the model with torch.onnx.export(model, example_inputs, 'model.onnx')"),
    (b"\x89HDF", None, "an HDF5 file (a Keras .h5 model)", "convert it with tf2onnx"),
    (None, ".tflite", "a TFLite model", "convert it with tf2onnx"),
    (None, ".safetensors", "safetensors weights (no graph)", "export the model to ONNX (e.g. torch.onnx.export)"),
    (None, ".pb", "a TensorFlow graph", "convert it with tf2onnx"),
)


def _what_it_is(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    for magic, suffix, what, todo in _NOT_ONNX:
        if (magic is not None and head.startswith(magic)) or (suffix is not None and path.suffix.lower() == suffix):
            return f"{path.name} is not an ONNX model: it looks like {what}; {todo}"
    return None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(model) -> onnx.ModelProto:
    """Return a ModelProto from a path or a proto; raise ModelError with the reason."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        try:
            proto = onnx.load_model_from_string(bytes(model))
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"not an ONNX model (cannot parse the given bytes: {first_line(exc)})") from exc
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
            known = _what_it_is(path)
            if known is not None:
                raise ModelError(known) from exc
            raise ModelError(
                f"not an ONNX model (cannot parse {path.name}: {first_line(exc)}); "
                "give a complete .onnx file (truncated download or wrong file?)"
            ) from exc
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc.strerror or exc}") from exc
        try:  # tensors stored beside the model (models over 2 GB)
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise ModelError(
                f"cannot read the external data of {path.name}: {first_line(exc)}; "
                "keep the model's .data file(s) next to it"
            ) from exc
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelError("not a usable ONNX model: its graph has no nodes")
    return proto


def _same_file(a: Path, b: Path) -> bool:
    """The same file by device and inode (bind mounts, hard links, symlinks), or the same
    resolved path when either does not exist yet."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()  # a symlink loop raises RuntimeError (caught by the caller)


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None = None,
                      what: str = "output path") -> Path:
    """Refuse an output that is the input, is not a plain file (a device, FIFO, socket or
    directory: writing would replace it), or lies in a missing/unwritable directory."""
    out = Path(output)
    try:
        if input_path is not None and _same_file(out, Path(input_path)):
            raise UsageError(f"{what} is the input model ({_quoted(out)}); choose another file")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise UsageError(f"output directory does not exist: {_quoted(parent)}")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"output directory is not writable: {_quoted(parent)}")
        if out.is_dir():
            raise UsageError(f"{what} is a directory: {_quoted(out)}")
        if out.exists() and not out.is_file():
            raise UsageError(f"{what} {_quoted(out)} exists and is not a regular file (a device, FIFO or "
                             "socket); refusing to replace it: choose a file path")
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long for the file system, ...
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise UsageError(f"{what} {_quoted(out)} cannot be used: {reason}") from exc
    return out


def check_distinct_outputs(outputs: dict[str, Path], input_path: str | os.PathLike | None) -> None:
    """Every file a run writes is checked, and no two of them may be the same file."""
    checked = {what: check_output_path(path, input_path, "output path" if what == "model" else f"`{what}` path")
               for what, path in outputs.items()}
    names = list(checked)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if _same_file(checked[first], checked[second]):
                raise UsageError(f"`{first}` and `{second}` name the same file {_quoted(checked[first])}; "
                                 "give each output its own path")


def _quoted(path: Path) -> str:
    """A path as one printable token: control characters (a newline in a name) escaped."""
    text = str(path)
    return repr(text) if any(ord(c) < 32 or c == "\x7f" for c in text) else text


def _cannot_write(path: Path, exc: OSError) -> UsageError:
    return UsageError(
        f"cannot write {_quoted(path)}: {exc.strerror or exc}; check the output directory's permissions and free space"
    )


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask  # mkstemp's 0600 would surprise users


class Transaction:
    """Files written completely to temporary names, renamed into place together by
    ``commit``; ``abort`` (or any failure before commit) removes them, so a failed run
    leaves every target as it was."""

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []
        self._folders: list[Path] = []

    def stage(self, temporary: Path, final: Path) -> None:
        self._pending.append((Path(temporary), Path(final)))

    def folder(self, folder: Path) -> None:
        self._folders.append(Path(folder))

    def commit(self) -> None:
        try:
            for temporary, final in self._pending:
                os.replace(temporary, final)
        except OSError as exc:
            self.abort()
            raise _cannot_write(final, exc) from exc
        self._pending.clear()
        self.abort()  # only the emptied temporary folders are left

    def abort(self) -> None:
        for temporary, _ in self._pending:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        self._pending.clear()
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()


def _temporary(path: Path, folder: bool = False):
    """A temporary name beside ``path`` whose length does not depend on the target's, so
    a legal long file name stays legal."""
    maker = tempfile.mkdtemp if folder else tempfile.mkstemp
    try:
        return maker(prefix=".quantize-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from exc


def write_atomic(path: str | os.PathLike, write, verify=None, transaction: Transaction | None = None) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then ``verify(temp_path)``
    if given, then rename it into place (or, with a ``transaction``, when it commits): a
    failure, a failed check or Ctrl-C never leaves a half-written (or unverified) file,
    and an existing file stays as it was."""
    path = Path(path)
    fd, tmp = _temporary(path)
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.chmod(tmp, _umask_mode())
        except OSError as exc:
            raise _cannot_write(path, exc) from exc
        if verify is not None:
            verify(Path(tmp))
        if transaction is not None:
            transaction.stage(Path(tmp), path)
        else:
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
    from .subgraphs import iter_graphs

    for sub in iter_graphs(graph):
        yield from sub.initializer
        for node in sub.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


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


def _save_external_atomic(proto: onnx.ModelProto, output: Path, verify=None,
                          transaction: Transaction | None = None) -> int:
    """Write model + data into a temporary folder beside the output, verify, then rename
    the data file and the model into place (the data first, so the model never points at
    a missing file).  Returns the bytes written."""
    data_path = external_data_path(output)
    folder = Path(_temporary(output, folder=True))
    own = transaction is None
    transaction = transaction or Transaction()
    transaction.folder(folder)
    try:
        try:
            _write_with_external_data(proto, folder, output.name, data_path.name)
            for part in (output.name, data_path.name):
                os.chmod(folder / part, _umask_mode())
        except OSError as exc:
            raise _cannot_write(output, exc) from exc
        if verify is not None:
            verify(folder / output.name)
        size = (folder / output.name).stat().st_size + (folder / data_path.name).stat().st_size
        transaction.stage(folder / data_path.name, data_path)
        transaction.stage(folder / output.name, output)
        if own:
            transaction.commit()
        return size
    except BaseException:
        if own:
            transaction.abort()
        raise


def save_model_atomic(proto: onnx.ModelProto, output: str | os.PathLike, verify=None,
                      transaction: Transaction | None = None) -> int:
    """Write the model atomically; returns the size in bytes of the written model file(s).

    ``verify(path)`` runs on the complete temporary file before it is renamed into place,
    so a model that fails it is never left at ``output``.  Models too large for one
    protobuf get their tensors in ``OUTPUT.data`` next to the output.  With a
    ``transaction``, the rename waits for its commit.
    """
    output = Path(output)
    if fits_in_protobuf(proto):
        data = proto.SerializeToString(deterministic=True)
        write_atomic(output, lambda handle: handle.write(data), verify, transaction)
        return len(data)
    return _save_external_atomic(proto, output, verify, transaction)
