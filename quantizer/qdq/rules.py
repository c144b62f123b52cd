"""The vocabulary of Q/DQ placement: how one op type is quantized (``OpRule``) and the
named shapes a target's op table is written in (``KINDS``).

Which ops a backend runs in integer arithmetic is the target's data
(``quantizer/targets/presets/*.toml``); the plan reads ``target.ops`` and nothing else.
The shapes follow the integer kernels the backends have: onnxruntime's QLinearConv,
QGemm, QLinearMatMul, QLinearAdd/Mul, QLinearConcat, QLinearAveragePool, ...;
TensorRT's Q/DQ-fused layers; the TFLite int8 kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

# How an op's output parameters are chosen.
CALIBRATED = "calibrated"  # from the output's own calibrated range
SHARED = "shared"  # the same parameters as the quantized inputs (pass-through, Concat)
UNIT_INTERVAL = "unit_interval"  # fixed parameters covering [0, 1]
SIGNED_UNIT = "signed_unit"  # fixed parameters covering [-1, 1] (Tanh)
OUTPUTS = (CALIBRATED, SHARED, UNIT_INTERVAL, SIGNED_UNIT)
FIXED_RANGES = {UNIT_INTERVAL: (0.0, 1.0), SIGNED_UNIT: (-1.0, 1.0)}


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized.

    activations: input indices quantized per-tensor (None = every input).
    weight: input index quantized per-channel symmetric int8 when it is a constant.
    bias: input index quantized to int32 with scale = input scale x weight scale.
    output: CALIBRATED, SHARED, UNIT_INTERVAL or SIGNED_UNIT.
    """

    activations: tuple[int, ...] | None
    weight: int | None = None
    bias: int | None = None
    output: str = CALIBRATED

    def as_dict(self) -> dict:
        return {"inputs": "all" if self.activations is None else list(self.activations),
                **({"weight": self.weight} if self.weight is not None else {}),
                **({"bias": self.bias} if self.bias is not None else {}),
                "output": self.output}


# Named rule shapes, so a target file says `Conv = "weighted"` instead of spelling indices.
KINDS: dict[str, OpRule] = {
    "weighted": OpRule(activations=(0,), weight=1, bias=2),  # Conv, ConvTranspose, Gemm
    "matmul": OpRule(activations=(0, 1), weight=1),  # either operand may be a constant weight
    "elementwise": OpRule(activations=None),  # Add, Mul: every input, calibrated output
    "concat": OpRule(activations=None, output=SHARED),  # one parameter set for all members
    "unary": OpRule(activations=(0,)),  # AveragePool, LeakyRelu, ...: own output range
    "pass_through": OpRule(activations=(0,), output=SHARED),  # Reshape, MaxPool, Gather, ...
    "unit_interval": OpRule(activations=(0,), output=UNIT_INTERVAL),  # Sigmoid, Softmax
    "signed_unit": OpRule(activations=(0,), output=SIGNED_UNIT),  # Tanh
    "select": OpRule(activations=(1, 2), output=SHARED),  # Where: both branches, condition stays bool
}


def weight_axis(op_type: str, attributes: dict, weight_rank: int) -> int | None:
    """The output-channel axis of a weight, or None for per-tensor quantization."""
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        # IOHW; with groups, axis 1 holds only C_out/group channels, so go per-tensor.
        return 1 if attributes.get("group", 1) == 1 else None
    if op_type == "Gemm":
        return 0 if attributes.get("transB", 0) else 1
    if op_type == "MatMul":
        return 1 if weight_rank == 2 else None
    return None
