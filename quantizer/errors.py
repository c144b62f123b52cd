"""Error classes, one per exit code, so the CLI can turn any failure into one line.

Exit codes (documented in the README):
  0 success, 1 internal error, 2 usage, 3 input model, 4 calibration data, 130 interrupted.
"""


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
