"""The recorded parameters of integer inputs/outputs (kept in ``quantizer.io_metadata``,
which the quantizer's own checks read too)."""

from quantizer.io_metadata import (
    FIELDS,
    KINDS,
    PREFIX,
    QuantizedIO,
    key,
    read_io,
    write_io,
)

__all__ = ["FIELDS", "KINDS", "PREFIX", "QuantizedIO", "key", "read_io", "write_io"]
