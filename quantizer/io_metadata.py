"""The quantization parameters of edited inputs/outputs, stored in the model's metadata.

A caller that feeds an integer input or reads an integer output needs its scale and zero
point; they travel with the model so no side file can get out of sync:

    quantizer.input.<name>.dtype        "uint8" or "int8"
    quantizer.input.<name>.scale        float, e.g. "0.003921568859368563"
    quantizer.input.<name>.zero_point   integer, e.g. "0"
    quantizer.output.<name>.dtype / .scale / .zero_point   the same for an output

with real = scale * (q - zero_point).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

PREFIX = "quantizer"
FIELDS = ("dtype", "scale", "zero_point")
KINDS = ("input", "output")


@dataclass(frozen=True)
class QuantizedIO:
    """One integer model input or output: real = scale * (q - zero_point)."""

    kind: str  # "input" or "output"
    name: str
    dtype: str  # "uint8" or "int8"
    scale: float
    zero_point: int

    def quantize(self, real) -> np.ndarray:
        """What to feed an integer input for the float values ``real``."""
        info = np.iinfo(self.dtype)
        q = np.round(np.asarray(real, np.float32) / np.float32(self.scale)) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, q) -> np.ndarray:
        """The float values an integer output stands for."""
        return (np.asarray(q).astype(np.int32) - self.zero_point).astype(np.float32) * np.float32(self.scale)

    def describe(self) -> str:
        return f"{self.kind} '{self.name}': {self.dtype}, scale {self.scale:.9g}, zero point {self.zero_point}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "dtype": self.dtype,
                "scale": self.scale, "zero_point": self.zero_point}


def key(kind: str, name: str, field: str) -> str:
    return f"{PREFIX}.{kind}.{name}.{field}"


def write_io(model: onnx.ModelProto, io: QuantizedIO) -> None:
    """Set (or replace) the three metadata entries of ``io``."""
    values = {"dtype": io.dtype, "scale": repr(float(np.float32(io.scale))), "zero_point": str(int(io.zero_point))}
    wanted = {key(io.kind, io.name, f): v for f, v in values.items()}
    for prop in model.metadata_props:
        if prop.key in wanted:
            prop.value = wanted.pop(prop.key)
    for k, v in wanted.items():
        model.metadata_props.add(key=k, value=v)


def read_io(model: onnx.ModelProto) -> dict[str, dict[str, QuantizedIO]]:
    """``{"input": {name: QuantizedIO}, "output": {...}}`` from the model's metadata."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for prop in model.metadata_props:
        for kind in KINDS:
            start = f"{PREFIX}.{kind}."
            if prop.key.startswith(start):
                name, _, field = prop.key[len(start):].rpartition(".")
                if name and field in FIELDS:
                    found.setdefault((kind, name), {})[field] = prop.value
    result: dict[str, dict[str, QuantizedIO]] = {kind: {} for kind in KINDS}
    for (kind, name), fields in found.items():
        if set(fields) == set(FIELDS):
            result[kind][name] = QuantizedIO(kind, name, fields["dtype"], float(fields["scale"]),
                                             int(fields["zero_point"]))
    return result
