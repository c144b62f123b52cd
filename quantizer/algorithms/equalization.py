"""Cross-layer equalization with high-bias absorption (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", 2019).

For two layers joined by a positively homogeneous activation f (f(x / s) = f(x) / s for
s > 0: Relu, LeakyRelu, PRelu, Clip with min 0 and no max, or no activation),

    y = W2 f(W1 x + b1) + b2 = (W2 S) f(S^-1 W1 x + S^-1 b1) + b2

for any positive diagonal S, so output channel i of the first layer (weights and bias)
can be divided by s_i and input channel i of the second multiplied by s_i without
changing the function.  Layers are Conv (any group count, depthwise included),
ConvTranspose, Gemm and MatMul with constant weights; the pair must be of one family
(channels on axis 1 for convolutions, on the last axis for Gemm/MatMul).

What it minimizes: the disparity of per-channel weight ranges.  With r1_i = max |W1| over
output channel i and r2_i = max |W2| over input channel i, s_i = sqrt(r1_i / r2_i) makes
both ranges sqrt(r1_i r2_i), which maximizes sum_i (r1_i / R1)(r2_i / R2), the share of
each layer's per-tensor weight grid that its channels use (the paper's precision
criterion).  Chains (L1 -> L2 -> L3) are swept until the scales converge
(``ROUNDS``, ``TOLERANCE``).  Our targets quantize weights per channel, so the first
layer's grid is unaffected; the activation between the layers is divided by s_i per
channel, which changes how its channels share one per-tensor activation scale.

High-bias absorption (``absorb_high_bias``): where f is Relu-like (f(y) = y for y >= 0)
and the pre-activation y_i of channel i stays at or above c_i >= 0 on the data,
f(y_i) = f(y_i - c_i) + c_i, so b1_i -= c_i and the second layer's bias gains W2 c (exact
only when the second layer sees c at every tap: a Conv without padding, or a Gemm).  c_i
= max(0, min(mean_i - 3 std_i, min_i)) over recorded float values of a few samples, so
the function is unchanged on those samples (and on any data where y_i >= c_i); it narrows
the activation range after the Relu by the channel's floor, which CLE can raise.

Everything not provably exact is skipped and said why: an activation that is not
positively homogeneous (HardSwish, Sigmoid, Relu6 = Clip with a finite max), a tensor
between the layers with another consumer or that is a graph output, a weight that is
shared, not constant or not float32, channel counts that do not match.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from .loss_aware import MEMORY_BUDGET, UNKNOWN_BYTES, recorded_chunks

CONVOLUTIONS = frozenset({"Conv", "ConvTranspose"})
DENSE = frozenset({"Gemm", "MatMul"})
HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip"})  # Clip only as min 0, no max
ROUNDS = 20  # sweeps over all pairs at most
TOLERANCE = 1e-4  # a sweep whose scales are all within this of 1 (|log s|) ends the iteration
ABSORB_STDS = 3.0  # absorb c = mean - 3 std where the data stays above it
DEAD = 1e-9  # a channel whose weight range is below this share of its layer's largest is dead: scale 1


@dataclass
class Layer:
    """A Conv/ConvTranspose/Gemm/MatMul node with a constant float32 weight, seen in one
    canonical form: ``canonical(w)`` has shape [groups, out/groups, in/groups, taps], so
    output channel g*(out/groups)+o and input channel g*(in/groups)+i meet at [g, o, i, :]."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    groups: int
    out_channels: int
    in_channels: int

    @property
    def family(self) -> str:
        return "conv" if self.node.op_type in CONVOLUTIONS else "dense"

    def canonical(self, w: np.ndarray) -> np.ndarray:
        g = self.groups
        op = self.node.op_type
        if op == "Conv":  # [O, I/g, k...]
            return w.reshape(g, self.out_channels // g, w.shape[1], -1)
        if op == "ConvTranspose":  # [I, O/g, k...]
            return w.reshape(g, self.in_channels // g, w.shape[1], -1).transpose(0, 2, 1, 3)
        if _attr(self.node, "transB", 0):  # Gemm B as [N, K]
            return w.reshape(1, w.shape[0], w.shape[1], 1)
        return w.T.reshape(1, w.shape[1], w.shape[0], 1)  # MatMul / Gemm B as [K, N]

    def restore(self, c: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        op = self.node.op_type
        if op == "Conv":
            return c.reshape(shape)
        if op == "ConvTranspose":
            return c.transpose(0, 2, 1, 3).reshape(shape)
        if _attr(self.node, "transB", 0):
            return c.reshape(shape)
        return c.reshape(shape[1], shape[0]).T

    def array(self) -> np.ndarray:
        return self.weight.const_value.numpy()

    def out_ranges(self) -> np.ndarray:
        return np.abs(self.canonical(self.array())).max(axis=(2, 3)).reshape(-1)

    def in_ranges(self) -> np.ndarray:
        return np.abs(self.canonical(self.array())).max(axis=(1, 3)).reshape(-1)

    def scale_outputs(self, divisor: np.ndarray) -> None:
        """Output channel i (weights and bias) divided by divisor[i]."""
        w = self.array()
        c = self.canonical(w) / divisor.reshape(self.groups, -1, 1, 1)
        _set(self.weight, self.restore(c, w.shape))
        if self.bias is not None:
            _set(self.bias, self.bias.const_value.numpy() / divisor)

    def scale_inputs(self, factor: np.ndarray) -> None:
        """Input channel i multiplied by factor[i]."""
        w = self.array()
        c = self.canonical(w) * factor.reshape(self.groups, 1, -1, 1)
        _set(self.weight, self.restore(c, w.shape))

    def constant_input_response(self, c: np.ndarray) -> np.ndarray:
        """The output (per channel) for the input c broadcast over every position: W2 c."""
        response = np.einsum("goik,gi->go", self.canonical(self.array()).astype(np.float64),
                             c.reshape(self.groups, -1).astype(np.float64)).reshape(-1)
        if self.node.op_type == "Gemm":
            response *= _attr(self.node, "alpha", 1.0) / _attr(self.node, "beta", 1.0)
        return response


@dataclass
class Pair:
    first: Layer
    second: Layer
    activation: ir.Node | None

    @property
    def names(self) -> tuple[str, str]:
        return self.first.node.name, self.second.node.name

    @property
    def pre_activation(self) -> str:
        return self.first.node.outputs[0].name


@dataclass
class Equalization:
    """What equalization did: the pairs, why other chains were skipped, the rounds, and
    the high-bias absorption (absorbed biases, by first layer)."""

    pairs: list[Pair] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # first layer -> why no pair
    rounds: int = 0
    absorbed: dict[str, int] = field(default_factory=dict)  # first layer -> channels absorbed
    absorb_skipped: dict[str, str] = field(default_factory=dict)  # first layer -> why not absorbed
    original: list = field(default_factory=list)  # (value, tensor) before any change: what ``revert`` restores
    unequalized: onnx.ModelProto | None = None  # the stage-1 model before (the pipeline's check may return to it)
    kept: bool | None = None  # whether the pipeline's check kept it (None: not checked)
    output_sqnr_db: dict = field(default_factory=dict)  # the check's output SQNR with and without

    def revert(self) -> None:
        """Put every changed initializer back (the IR nodes stay those the plan reads)."""
        for value, tensor in self.original:
            value.const_value = tensor

    def summary(self) -> dict:
        reasons = collections.Counter(self.skipped.values())
        absorb_reasons = collections.Counter(self.absorb_skipped.values())
        return {"pairs": len(self.pairs), "equalized": [list(p.names) for p in self.pairs],
                "rounds": self.rounds, "skipped": dict(reasons.most_common()),
                "absorbed_biases": len(self.absorbed), "absorbed_channels": int(sum(self.absorbed.values())),
                "absorb_skipped": dict(absorb_reasons.most_common()), "kept": self.kept,
                "output_sqnr_db": {k: round(v, 2) for k, v in self.output_sqnr_db.items()}}


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=value.name)


def _constant(value: ir.Value | None, uses: int = 1) -> bool:
    """A float32 initializer read by ``uses`` node inputs only."""
    return (value is not None and value.const_value is not None and value.is_initializer()
            and not value.is_graph_input() and value.dtype == ir.DataType.FLOAT and len(value.uses()) == uses)


def as_layer(node: ir.Node) -> tuple[Layer | None, str | None]:
    """The node as a Layer, or why it cannot be one."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in CONVOLUTIONS | DENSE:
        return None, f"{op} is not a Conv/ConvTranspose/Gemm/MatMul"
    inputs = list(node.inputs)
    weight = inputs[1] if len(inputs) > 1 else None
    bias = inputs[2] if len(inputs) > 2 else None
    if not _constant(weight):
        return None, f"{op} weight is not a float32 constant of its own"
    if bias is not None and not _constant(bias):
        return None, f"{op} bias is not a float32 constant of its own"
    shape = weight.const_value.shape
    groups = int(_attr(node, "group", 1))
    if op == "Conv":
        out_channels, in_channels = shape[0], shape[1] * groups
    elif op == "ConvTranspose":
        out_channels, in_channels = shape[1] * groups, shape[0]
    else:
        if len(shape) != 2:
            return None, f"{op} weight is not 2-D"
        if op == "Gemm" and _attr(node, "transA", 0):
            return None, "Gemm with transA"
        k, n = (shape[1], shape[0]) if op == "Gemm" and _attr(node, "transB", 0) else (shape[0], shape[1])
        out_channels, in_channels = n, k
        if bias is not None and op == "Gemm" and bias.const_value.numpy().size != n:
            return None, "Gemm bias is not one value per output channel"
    if bias is not None and bias.const_value.numpy().size != out_channels:
        return None, f"{op} bias is not one value per output channel"
    return Layer(node, weight, bias, groups, int(out_channels), int(in_channels)), None


def _homogeneous(node: ir.Node) -> bool:
    """f(x / s) = f(x) / s for every s > 0: Relu, LeakyRelu, PRelu (any slope), and Clip
    as Relu (min 0, no max)."""
    if node.op_type in ("Relu", "LeakyRelu", "PRelu"):
        return True
    if node.op_type != "Clip":
        return False
    inputs = list(node.inputs) + [None, None]
    low, high = inputs[1], inputs[2]
    if high is not None and (high.const_value is None or np.isfinite(high.const_value.numpy()).any()):
        return False
    if _attr(node, "max", None) is not None and np.isfinite(_attr(node, "max", None)):
        return False
    if low is None:
        low_value = _attr(node, "min", None)
    else:
        low_value = None if low.const_value is None else float(low.const_value.numpy())
    return low_value == 0.0


def _single_consumer(value: ir.Value) -> tuple[ir.Node | None, str | None]:
    if value.is_graph_output():
        return None, "the tensor between the layers is a graph output"
    uses = value.uses()
    if len(uses) != 1:
        return None, f"the tensor between the layers has {len(uses)} consumers"
    return uses[0].node, None


def find_pairs(graph: ir.Graph) -> tuple[list[Pair], dict[str, str]]:
    """Layer -> [homogeneous activation] -> layer chains that equalize exactly, and for
    every other layer why its output does not start one."""
    pairs, skipped = [], {}
    for node in graph:
        first, why = as_layer(node)
        if first is None:
            if node.op_type in CONVOLUTIONS | DENSE:
                skipped[node.name] = why
            continue
        pair, why = _pair_from(first)
        if pair is None:
            skipped[node.name] = why
        else:
            pairs.append(pair)
    return pairs, skipped


def _pair_from(first: Layer) -> tuple[Pair | None, str | None]:
    consumer, why = _single_consumer(first.node.outputs[0])
    if consumer is None:
        return None, why
    activation = None
    if consumer.op_type not in CONVOLUTIONS | DENSE:
        if consumer.op_type not in HOMOGENEOUS or not _homogeneous(consumer):
            what = "Clip with an upper bound" if consumer.op_type == "Clip" else consumer.op_type
            is_activation = consumer.op_type in {"HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Clip", "Gelu",
                                                 "Swish", "Elu", "Selu", "Softplus", "Mish"}
            return None, (f"activation {what} is not positively homogeneous" if is_activation
                          else f"followed by {consumer.op_type}, not a layer")
        activation = consumer
        consumer, why = _single_consumer(activation.outputs[0])
        if consumer is None:
            return None, why
    second, why = as_layer(consumer)
    if second is None:
        return None, (f"followed by {consumer.op_type}, not a layer" if consumer.op_type not in CONVOLUTIONS | DENSE
                      else why)
    between = (activation if activation is not None else first.node).outputs[0]
    if consumer.inputs[0] is not between:
        return None, "the tensor is not the next layer's data input"
    if second.family != first.family:
        return None, "the layers put channels on different axes (convolution and Gemm/MatMul)"
    if second.in_channels != first.out_channels:
        return None, "channel counts differ"
    return Pair(first, second, activation), None


def live_channels(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """The channels both layers use (weight range above ``DEAD`` of the layer's largest)."""
    return (r1 > DEAD * r1.max(initial=0.0)) & (r2 > DEAD * r2.max(initial=0.0))


def equalize(model: ir.Model, rounds: int = ROUNDS, tolerance: float = TOLERANCE) -> Equalization:
    """Equalize every exact pair of ``model`` in place (its initializers are replaced)."""
    pairs, skipped = find_pairs(model.graph)
    result = Equalization(pairs=pairs, skipped=skipped)
    changed = {id(v): v for pair in pairs for layer in (pair.first, pair.second) for v in (layer.weight, layer.bias)
               if v is not None}  # biases too: absorption changes them
    result.original = [(v, v.const_value) for v in changed.values()]
    while pairs and result.rounds < rounds:
        result.rounds += 1
        largest = 0.0
        for pair in pairs:
            r1, r2 = pair.first.out_ranges().astype(np.float64), pair.second.in_ranges().astype(np.float64)
            live = live_channels(r1, r2)
            scale = np.ones_like(r1)
            scale[live] = np.sqrt(r1[live] / r2[live])
            pair.first.scale_outputs(scale)
            pair.second.scale_inputs(scale)
            largest = max(largest, float(np.abs(np.log(scale)).max(initial=0.0)))
        if largest < tolerance:
            break
    return result


def _channel_statistics(values: list[np.ndarray], axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(min, mean, std) per channel over every other axis of the recorded values."""
    low, total, squares, count = None, 0.0, 0.0, 0
    for v in values:
        flat = np.moveaxis(v, axis, 0).reshape(v.shape[axis], -1)
        low = flat.min(axis=1) if low is None else np.minimum(low, flat.min(axis=1))
        total = total + flat.sum(axis=1, dtype=np.float64)
        squares = squares + np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
        count += flat.shape[1]
    mean = total / count
    return low.astype(np.float64), mean, np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))


def _absorbs_exactly(pair: Pair) -> str | None:
    """Why the second layer would not add W2 c exactly for a constant input c (None: it does)."""
    if pair.activation is None or pair.activation.op_type not in HOMOGENEOUS:
        return "no Relu-like activation between the layers"
    if pair.first.bias is None:
        return "the first layer has no bias"
    second = pair.second
    if second.bias is None:
        return "the second layer has no bias"
    if second.node.op_type == "ConvTranspose":
        return "the second layer is a ConvTranspose (overlapping taps)"
    if second.node.op_type == "Conv":
        pads = _attr(second.node, "pads", None)
        auto_pad = _attr(second.node, "auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad not in ("NOTSET", "VALID") or (pads is not None and any(pads)):
            return "the second layer pads its input (the border would not see c)"
    if second.node.op_type == "Gemm" and _attr(second.node, "beta", 1.0) == 0:
        return "the second layer's bias has beta 0"
    return None


def absorb_high_bias(model: ir.Model, proto: onnx.ModelProto, result: Equalization,
                     samples: Sequence[Mapping[str, np.ndarray]], *, sizes: Mapping[str, int] | None = None,
                     memory_budget: int = MEMORY_BUDGET) -> Equalization:
    """Absorb each Relu-like pair's floor c (see the module docstring) into the next
    layer's bias, measured on ``samples`` run through ``proto`` (``model`` as a
    ModelProto, equalized); ``model`` is changed in place."""
    candidates = {}
    for pair in result.pairs:
        why = _absorbs_exactly(pair)
        if why is None:
            candidates[pair.first.node.name] = pair
        else:
            result.absorb_skipped[pair.first.node.name] = why
    if not candidates or not samples:
        return result
    needs = {name: [pair.pre_activation] for name, pair in candidates.items()}
    sizes = sizes or {}
    size_of: Callable[[str], int] = lambda name: sizes.get(name, UNKNOWN_BYTES) * len(samples)  # noqa: E731
    for group, recorded in recorded_chunks(proto, list(candidates), needs, samples, size_of, memory_budget):
        for name in group:
            pair = candidates[name]
            values = [r[pair.pre_activation] for r in recorded]
            axis = 1 if pair.first.family == "conv" else values[0].ndim - 1
            low, mean, std = _channel_statistics(values, axis)
            floor = np.maximum(np.minimum(mean - ABSORB_STDS * std, low), 0.0)
            if not np.any(floor > 0):
                result.absorb_skipped[name] = "no channel stays above a positive floor on the data"
                continue
            shift = pair.second.constant_input_response(floor)
            _set(pair.first.bias, pair.first.bias.const_value.numpy() - floor)
            _set(pair.second.bias, pair.second.bias.const_value.numpy() + shift)
            result.absorbed[name] = int(np.count_nonzero(floor > 0))
    return result
