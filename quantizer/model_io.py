"""Reading and writing model files with one-line errors and atomic output."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError, UsageError

ModelLike = "onnx.ModelProto | str | os.PathLike"


def load_model(model) -> onnx.ModelProto:
    """Return a ModelProto from a path or a proto; raise ModelError with the reason."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelError(f"model path is a directory, not an ONNX file: {path}")
        if path.stat().st_size == 0:
            raise ModelError(f"model file is empty: {path}")
        try:
            proto = onnx.load(str(path))
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"not an ONNX model (cannot parse {path.name}): {exc}") from None
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc.strerror or exc}") from None
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


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it into
    place: a failure or Ctrl-C never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model_atomic(proto: onnx.ModelProto, output: str | os.PathLike) -> int:
    """Write the model atomically; returns the size in bytes of the written file."""
    write_atomic(output, lambda handle: handle.write(proto.SerializeToString(deterministic=True)))
    return Path(output).stat().st_size
