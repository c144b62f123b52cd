"""Error classes, one per exit code, so the CLI can turn any failure into one line.

Exit codes (documented in the README):
  0 success, 1 internal error, 2 usage, 3 input model, 4 calibration data,
  5 a quality check failed under `strict`, 130 interrupted.

Messages speak of the library's parameters, written in backquotes (`exclude`,
`input_shapes`, `min_sqnr_db`, ...), never of command-line flags: the CLI maps each
backquoted parameter to its flag.  Raise with ``from exc`` so a debug run shows the cause.
"""

from __future__ import annotations

import contextlib

from quantizer.calibrators import CalibratorError


class QuantizerError(Exception):
    """Base class: a problem we can explain to the user in one line."""

    exit_code = 1
    kind = "error"


class InternalError(QuantizerError):
    """A bug of ours (e.g. we built a model that fails onnx.checker): report it."""

    exit_code = 1
    kind = "internal error"


class UsageError(QuantizerError):
    """Bad options or paths on the command line / API call."""

    exit_code = 2
    kind = "usage error"


class ModelError(QuantizerError):
    """The input model cannot be read, converted or quantized."""

    exit_code = 3
    kind = "model error"


class CalibrationDataError(QuantizerError):
    """The calibration data does not fit the model or cannot be read."""

    exit_code = 4
    kind = "calibration data error"


class StrictError(QuantizerError):
    """Under `strict`, a result that would only be a warning otherwise (low fidelity, an
    `exclude` pattern that matched nothing, a crushed tensor protection could not save)."""

    exit_code = 5
    kind = "strict check failed"


@contextlib.contextmanager
def calibrator_errors(as_type: type[QuantizerError] = UsageError):
    """Turn the calibrators' plain CalibratorError into one of ours (default: usage)."""
    try:
        yield
    except CalibratorError as exc:
        raise as_type(str(exc)) from exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
