"""The ten calibration method names and the table that maps each to its range function.

A method name is a family (how the range is searched) plus a form: _ASYM searches
[lo, hi] of the signed values, _SYM searches a over |x| and returns [-a, a], or [0, a]
when every observed value is >= 0.
"""

from __future__ import annotations

import difflib
import enum

from .errors import CalibratorError


class CalibrationMethod(str, enum.Enum):
    MIN_MAX_ASYM = "MIN_MAX_ASYM"
    MIN_MAX_SYM = "MIN_MAX_SYM"
    ENTROPY_ASYM = "ENTROPY_ASYM"
    ENTROPY_SYM = "ENTROPY_SYM"
    PERCENTILE_ASYM = "PERCENTILE_ASYM"
    PERCENTILE_SYM = "PERCENTILE_SYM"
    MSE_ASYM = "MSE_ASYM"
    MSE_SYM = "MSE_SYM"
    SQNR_ASYM = "SQNR_ASYM"
    SQNR_SYM = "SQNR_SYM"

    @property
    def family(self) -> str:
        return self.value.rsplit("_", 1)[0]

    @property
    def symmetric(self) -> bool:
        return self.value.endswith("_SYM")

    @classmethod
    def parse(cls, name: "str | CalibrationMethod") -> "CalibrationMethod":
        """Case-insensitive lookup with a one-line error listing the valid names."""
        if isinstance(name, cls):
            return name
        key = str(name).strip().upper().replace("-", "_")
        try:
            return cls(key)
        except ValueError as exc:
            names = [m.value.lower() for m in cls]
            close = difflib.get_close_matches(key.lower(), names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise CalibratorError(
                f"unknown calibration method '{name}'; {hint}choose one of: {', '.join(names)}"
            ) from exc
