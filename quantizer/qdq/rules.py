"""The QDQ placement table: for each op type, which inputs are quantized and how.

Every placement decision reads this table; there are no per-op special cases elsewhere.
The shapes follow what onnxruntime fuses into integer kernels (QLinearConv, QGemm,
QLinearMatMul, QLinearAdd/Mul, QLinearConcat, QLinearAveragePool, QLinearSigmoid, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

# How an op's output parameters are chosen.
CALIBRATED = "calibrated"  # from the output's own calibrated range
SHARED = "shared"  # the same parameters as the quantized inputs (pass-through, Concat)
UNIT_INTERVAL = "unit_interval"  # fixed parameters covering [0, 1]


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized.

    activations: input indices quantized per-tensor (None = every input).
    weight: input index quantized per-channel symmetric int8 when it is a constant.
    bias: input index quantized to int32 with scale = input scale x weight scale.
    output: CALIBRATED, SHARED or UNIT_INTERVAL.
    """

    activations: tuple[int, ...] | None
    weight: int | None = None
    bias: int | None = None
    output: str = CALIBRATED


_PASS_THROUGH = OpRule(activations=(0,), output=SHARED)

RULES: dict[str, OpRule] = {
    "Conv": OpRule(activations=(0,), weight=1, bias=2),
    "ConvTranspose": OpRule(activations=(0,), weight=1, bias=2),
    "Gemm": OpRule(activations=(0,), weight=1, bias=2),
    "MatMul": OpRule(activations=(0, 1), weight=1),
    "Add": OpRule(activations=None),
    "Mul": OpRule(activations=None),
    "Concat": OpRule(activations=None, output=SHARED),
    "AveragePool": OpRule(activations=(0,)),
    "GlobalAveragePool": OpRule(activations=(0,)),
    "LeakyRelu": OpRule(activations=(0,)),
    "Resize": OpRule(activations=(0,), output=SHARED),
    "Sigmoid": OpRule(activations=(0,), output=UNIT_INTERVAL),
    "HardSigmoid": OpRule(activations=(0,), output=UNIT_INTERVAL),
    "Softmax": OpRule(activations=(0,), output=UNIT_INTERVAL),
    **{
        op: _PASS_THROUGH
        for op in (
            "Reshape",
            "Transpose",
            "Flatten",
            "Squeeze",
            "Unsqueeze",
            "MaxPool",
            "Slice",
            "Split",
            "Pad",
        )
    },
}

# Activations that onnxruntime folds into the Q that follows them (ReluQuantFusion,
# ClipQuantFusion): a quantized op followed only by one of these gets no Q/DQ in between.
ABSORBED_ACTIVATIONS = frozenset({"Relu", "Clip"})


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
