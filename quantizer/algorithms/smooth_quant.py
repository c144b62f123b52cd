"""SmoothQuant: move per-channel activation outliers of MatMul/Gemm inputs into the weights.

A MatMul y = X W whose input X has a few channels (columns, the reduction axis) with a
magnitude far above the rest loses the quiet channels under one per-tensor activation
scale; the weights, quantized per output channel, have room to spare.  SmoothQuant
(Xiao et al., 2023) rewrites y = (X / s) (s W) with one factor per input channel,

    s_j = max|X_j|^a / max|W_j|^(1 - a),

so the activation's channels become alike and the weight's rows absorb the difference.
Nothing new runs at inference: X / s is folded into the op that produces X (a
LayerNormalization's scale and bias, a Mul by a constant, the columns and bias of a
MatMul/Gemm with constant weights, also through the Add of its bias) and s W into the
consumer's constant weight rows.  A tensor with several readers is smoothed only when
every reader is such a MatMul/Gemm (each one's rows are scaled by the same s; the
weight maximum is taken over all of them); a tensor with any other reader, produced by
an op with no fold (Softmax, Gelu, a graph input) or that is a graph output is left
alone.  In float the function is unchanged (up to rounding).

What it minimizes: for each smoothed tensor X and its readers W_i, the migration
strength a on ``GRID`` (and "no smoothing") minimizing
sum_i ||fq(X / s) deq(q(s W_i)) - X W_i||^2 / ||X W_i||^2 on the recorded float X of the
accuracy samples, where fq is per-tensor quantize -> dequantize on the target's activation
grid over the min-max range of X / s, and q is the per-channel weight quantization Q/DQ
insertion emits.  A tensor is smoothed only when the best a lowers that error by
``MIN_GAIN`` relative to leaving it alone.  The channel maxima are measured on the
recorded accuracy samples, not on the calibration statistics: the pipeline smooths the
model *before* calibration, so every range is calibrated on the smoothed model over all
the data; the samples only steer s, which any rough estimate of the channel peaks does.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from .bias_correction import _quantized_weight
from .loss_aware import MEMORY_BUDGET, UNKNOWN_BYTES, _fake_quantize, _Graph, recorded_chunks

GRID = tuple(round(a, 2) for a in np.arange(0.0, 1.0001, 0.1))  # migration strengths searched
MIN_GAIN = 0.05  # relative layer-error reduction a smoothing must bring
MAX_ROWS = 8192  # rows of X (tokens) the error is measured on, evenly spaced
S_LIMIT = 1e4  # smoothing factors are kept in [1 / S_LIMIT, S_LIMIT]
READERS = frozenset({"MatMul", "Gemm"})
REASON = "SmoothQuant's Mul by 1 / s (no fold): kept float"
SKIP_NO_FOLD = "its producer has no fold"
SKIP_READERS = "a reader is not a quantized MatMul/Gemm with a constant weight"
SKIP_NO_GAIN = "no alpha lowers the layer error"


@dataclass
class Smoothing:
    alphas: dict[str, float] = field(default_factory=dict)  # tensor -> chosen migration strength
    error_ratio: dict[str, float] = field(default_factory=dict)  # tensor -> layer error smoothed / not
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why it was left alone
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> s (per input channel)
    inserted: list[str] = field(default_factory=list)  # Mul nodes added where no fold exists
    kept: bool | None = None  # whether the pipeline's whole-model check kept the smoothing
    output_sqnr_db: dict = field(default_factory=dict)  # the check's output SQNR smoothed and not

    def summary(self) -> dict:
        alphas = sorted(self.alphas.values())
        reasons: dict[str, int] = {}
        for why in self.skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        ratios = [self.error_ratio[t] for t in self.alphas]
        return {"smoothed": len(alphas), "kept": self.kept,
                "output_sqnr_db": {k: round(v, 2) for k, v in self.output_sqnr_db.items()},
                "alpha_median": round(float(np.median(alphas)), 3) if alphas else None,
                "median_error_ratio": round(float(np.median(ratios)), 4) if ratios else None,
                "skipped": dict(sorted(reasons.items()))}


@dataclass(frozen=True)
class _Reader:
    node: onnx.NodeProto
    weight: str  # initializer name
    axis: int | None  # the weight's per-channel axis as Q/DQ insertion quantizes it
    rows_first: bool  # weight laid out [K, N] (MatMul, Gemm transB=0) or [N, K]


@dataclass(frozen=True)
class _Fold:
    """Where X / s goes: initializers whose last axis (``columns``) or first axis (a
    Gemm transB=1 weight's rows) is X's channel axis."""

    producer: onnx.NodeProto
    divide_last: tuple[str, ...]  # initializers divided by s along their last axis (broadcast)
    divide_rows: tuple[str, ...] = ()  # initializers [N, K]-laid (Gemm transB=1): rows divided


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _reader(graph: _Graph, node: onnx.NodeProto, tensor: str,
            slots: Mapping[tuple[str, int], int | None]) -> _Reader | None:
    """``node`` as a reader of ``tensor`` that can take s into its weight rows, or None."""
    if node.op_type not in READERS or node.input[0] != tensor or tensor in node.input[1:]:
        return None
    if (node.name, 1) not in slots or node.input[1] not in graph.initializers:
        return None
    attrs = _attrs(node)
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        return None
    if len(graph.initializers[node.input[1]].dims) != 2:
        return None
    rows_first = not (node.op_type == "Gemm" and attrs.get("transB", 0))
    return _Reader(node, node.input[1], slots[(node.name, 1)], rows_first)


def _readers(graph: _Graph, tensor: str, slots) -> tuple[list[_Reader], bool]:
    """The readers of ``tensor`` that can take s, and whether every reader can."""
    found = [_reader(graph, graph.nodes[i], tensor, slots) for i in graph.consumers.get(tensor, ())]
    return [r for r in found if r is not None], bool(found) and all(r is not None for r in found)


def _per_channel(graph: _Graph, name: str, k: int) -> bool:
    """Whether initializer ``name`` broadcasts along X's channel axis only: a scalar,
    [K], [1, ..., 1, K] or all ones (dividing it by s then gives [..., K])."""
    dims = list(graph.initializers[name].dims)
    return int(np.prod(dims[:-1], dtype=np.int64)) == 1 and (not dims or dims[-1] in (1, k))


def _rank(graph: _Graph, name: str) -> int | None:
    kind = graph.types.get(name)
    if kind is None or not kind.tensor_type.HasField("shape"):
        return None
    return len(kind.tensor_type.shape.dim)


def _fold(graph: _Graph, tensor: str, k: int) -> _Fold | None:
    """The fold of X / s into the producer of ``tensor`` (K = ``k`` channels), or None."""
    if tensor not in graph.producer or tensor in {o.name for o in graph.model.graph.output}:
        return None
    producer = graph.nodes[graph.producer[tensor]]
    inits = graph.initializers
    if producer.op_type == "LayerNormalization":
        axis = _attrs(producer).get("axis", -1)
        names = [n for n in producer.input[1:3] if n]
        if axis != -1 and axis != _rank(graph, tensor) - 1 or len(producer.output) > 1 and any(producer.output[1:]):
            return None
        if all(n in inits and len(inits[n].dims) == 1 and inits[n].dims[0] == k for n in names):
            return _Fold(producer, tuple(names))
        return None
    if producer.op_type == "Mul":
        constants = [n for n in producer.input if n in inits]
        if len(constants) != 1 or producer.input[0] == producer.input[1]:
            return None
        return _Fold(producer, (constants[0],)) if _per_channel(graph, constants[0], k) else None
    if producer.op_type == "Add":  # MatMul/Gemm (constant weight) + constant bias
        constants = [n for n in producer.input if n in inits]
        if len(constants) != 1:
            return None
        inner = [n for n in producer.input if n not in inits][0]
        if len(_readers_of_values(graph, inner)) != 1 or inner not in graph.producer \
                or inner in {o.name for o in graph.model.graph.output}:
            return None
        if not _per_channel(graph, constants[0], k):
            return None
        fold = _fold_linear(graph, graph.nodes[graph.producer[inner]], k)
        return None if fold is None else _Fold(fold.producer, fold.divide_last + (constants[0],), fold.divide_rows)
    if producer.op_type == "Reshape":
        return _fold_heads(graph, tensor, k)
    return _fold_linear(graph, producer, k)


def _dims(graph: _Graph, name: str) -> list | None:
    kind = graph.types.get(name)
    if kind is None or not kind.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in kind.tensor_type.shape.dim]


def _readers_of_values(graph: _Graph, name: str) -> list[int]:
    """The readers of ``name`` that read its values (a Shape reads only its shape, which
    smoothing does not change)."""
    return [i for i in graph.consumers.get(name, ()) if graph.nodes[i].op_type != "Shape"]


def _only_reader(graph: _Graph, name: str, op_type: str) -> onnx.NodeProto | None:
    """The producer of ``name`` when it is an ``op_type`` and ``name`` has one reader and
    is no graph output."""
    if name not in graph.producer or len(_readers_of_values(graph, name)) != 1 \
            or name in {o.name for o in graph.model.graph.output}:
        return None
    node = graph.nodes[graph.producer[name]]
    return node if node.op_type == op_type else None


def _fold_heads(graph: _Graph, tensor: str, k: int) -> _Fold | None:
    """Multi-head attention's output, X = merge_heads(P @ split_heads(V)), V = Y Wv + bv:
    channel j of X is channel j of V (per head, P mixes tokens, not channels), so X / s
    folds into Wv's columns and bv.  Matched on the inferred shapes: the last Reshape
    merges [H, D] -> K, the Transposes keep D last and bring the head axis back before it,
    the first Reshape splits K -> [H, D]."""
    merge = graph.nodes[graph.producer[tensor]]
    heads = _dims(graph, merge.input[0])
    out = _dims(graph, tensor)
    if heads is None or out is None or len(heads) < 3 or len(out) != len(heads) - 1 or out[-1] != k \
            or None in heads[-2:] or heads[-2] * heads[-1] != k:
        return None
    n = len(heads)
    back = _only_reader(graph, merge.input[0], "Transpose")
    perm = _attrs(back).get("perm") if back is not None else None
    if perm is None or list(perm)[-1] != n - 1:
        return None
    head_axis = list(perm)[n - 2]
    mixed = _only_reader(graph, back.input[0], "MatMul")
    if mixed is None or mixed.input[1] in graph.initializers or mixed.input[0] in graph.initializers:
        return None
    split = _only_reader(graph, mixed.input[1], "Transpose")
    order = _attrs(split).get("perm") if split is not None else None
    if order is None or len(order) != n or list(order)[n - 1] != n - 1 or list(order)[head_axis] != n - 2 \
            or _dims(graph, mixed.input[1]) is None or len(_dims(graph, mixed.input[1])) != n:
        return None
    reshape = _only_reader(graph, split.input[0], "Reshape")
    if reshape is None:
        return None
    split_dims, values = _dims(graph, split.input[0]), _dims(graph, reshape.input[0])
    if split_dims is None or values is None or split_dims[-2:] != heads[-2:] or len(values) != n - 1 \
            or values[-1] != k or len(_readers_of_values(graph, reshape.input[0])) != 1:
        return None
    return _fold(graph, reshape.input[0], k)


def _fold_linear(graph: _Graph, node: onnx.NodeProto, k: int) -> _Fold | None:
    """The output columns of a MatMul/Gemm with a constant 2-D weight (and Gemm's C)."""
    inits = graph.initializers
    if node.op_type not in READERS or len(node.input) < 2 or node.input[1] not in inits \
            or node.input[0] in inits or len(inits[node.input[1]].dims) != 2:
        return None
    if node.op_type == "MatMul":
        return _Fold(node, (node.input[1],)) if inits[node.input[1]].dims[1] == k else None
    attrs = _attrs(node)
    rows = bool(attrs.get("transB", 0))
    if inits[node.input[1]].dims[0 if rows else 1] != k:
        return None
    bias = tuple(n for n in node.input[2:3] if n)
    if bias and (bias[0] not in inits or not _per_channel(graph, bias[0], k)):
        return None
    return _Fold(node, bias + (() if rows else (node.input[1],)), (node.input[1],) if rows else ())


def _weight_rows(graph: _Graph, reader: _Reader) -> np.ndarray:
    """The reader's weight as [K, N]."""
    weight = numpy_helper.to_array(graph.initializers[reader.weight]).astype(np.float32)
    return weight if reader.rows_first else weight.T


def _layer_error(x: np.ndarray, low: np.ndarray, high: np.ndarray, weights: list[np.ndarray],
                 readers: list[_Reader], references: list[np.ndarray], energies: list[float],
                 s: np.ndarray, spec, weight_spec) -> float:
    """sum_i ||fq(X/s) deq(q(s W_i)) - X W_i||^2 / ||X W_i||^2 (``low``/``high``: the
    per-channel min/max of all recorded X, so X/s is ranged over every recorded row)."""
    xq = _fake_quantize(x / s, float(np.min(low / s)), float(np.max(high / s)), spec)
    total = 0.0
    for weight, reader, reference, energy in zip(weights, readers, references, energies):
        scaled = weight * s[:, None]
        layout = scaled if reader.rows_first else scaled.T
        quantized = _quantized_weight(np.ascontiguousarray(layout), reader.axis, weight_spec)
        y = xq @ (quantized if reader.rows_first else quantized.T)
        diff = y - reference
        total += float(np.vdot(diff, diff)) / energy if energy > 0 else 0.0
    return total


def smoothing_factors(amax_x: np.ndarray, amax_w: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^a / max|W_j|^(1-a); 1 where a channel is all zero, within S_LIMIT."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.power(amax_x.astype(np.float64), alpha) / np.power(amax_w.astype(np.float64), 1.0 - alpha)
    s = np.where((amax_x > 0) & (amax_w > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, 1.0 / S_LIMIT, S_LIMIT).astype(np.float32)


def choose_alpha(x_rows: np.ndarray, low: np.ndarray, high: np.ndarray, weights: list[np.ndarray],
                 readers: list[_Reader], spec, weight_spec, grid: Sequence[float] = GRID) -> tuple[float, float, float]:
    """(the alpha of ``grid`` with the smallest layer error, that error, the unsmoothed error)."""
    references = [x_rows @ w for w in weights]
    energies = [float(np.vdot(r, r)) for r in references]
    amax_x = np.maximum(np.abs(low), np.abs(high))
    amax_w = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    args = (x_rows, low, high, weights, readers, references, energies)
    plain = _layer_error(*args, np.ones_like(amax_x, dtype=np.float32), spec, weight_spec)
    errors = [_layer_error(*args, smoothing_factors(amax_x, amax_w, a), spec, weight_spec) for a in grid]
    best = int(np.argmin(errors))
    return float(grid[best]), float(errors[best]), plain


def _evenly(rows: np.ndarray, limit: int) -> np.ndarray:
    if rows.shape[0] <= limit:
        return rows
    return rows[np.linspace(0, rows.shape[0] - 1, limit).astype(np.int64)]


def _candidates(graph: _Graph, plan, keep: set[str], insert: bool,
                skipped: dict[str, str]) -> dict[str, tuple[list[_Reader], _Fold]]:
    """{tensor: (readers, fold)} of the MatMul/Gemm inputs that can be smoothed; the
    others go to ``skipped`` with the reason."""
    slots = {(slot.node.name, slot.index): slot.axis for slot in plan.weights if slot.node.name not in keep}
    work: dict[str, tuple[list[_Reader], _Fold]] = {}
    inputs = dict.fromkeys(node.input[0] for node in graph.nodes if node.op_type in READERS and node.input)
    for tensor in [t for t in inputs if t and t not in graph.initializers]:
        readers, every = _readers(graph, tensor, slots)
        k = _weight_rows(graph, readers[0]).shape[0] if readers else None
        if readers and any(_weight_rows(graph, r).shape[0] != k for r in readers):
            readers, every = [], False
        fold = _fold(graph, tensor, k) if readers and every else None
        if fold is None and readers and insert:
            fold = _Fold(None, ())  # a Mul by 1 / s before the readers
        if fold is None:
            skipped[tensor] = SKIP_NO_FOLD if every else SKIP_READERS
            continue
        work[tensor] = (readers, fold)
    return work


def candidates(model: onnx.ModelProto, plan, keep: set[str] = frozenset(), insert: bool = False) -> list[str]:
    """The MatMul/Gemm inputs of ``model`` that ``smooth`` would measure."""
    return list(_candidates(_Graph(model), plan, keep, insert, {}))


def smooth(model: onnx.ModelProto, plan, spec, weight_spec, samples: Sequence[Mapping[str, np.ndarray]], *,
           alpha: float | None = None, keep: set[str] = frozenset(), insert: bool = False, sizes: Mapping[str, int] | None = None,
           memory_budget: int = MEMORY_BUDGET, show_progress: bool | None = None) -> tuple[onnx.ModelProto, Smoothing]:
    """``model`` with the MatMul/Gemm inputs that gain smoothed (a copy), and what was done.

    ``plan``: the Q/DQ plan (which weights are quantized, on which axis); ``spec`` /
    ``weight_spec``: the target's activation and weight specs; ``samples``: the accuracy
    samples the channel maxima and errors are measured on; ``alpha``: a fixed migration
    strength (None: searched on ``GRID``, and only smoothed where it lowers the error by
    ``MIN_GAIN``); ``keep``: nodes kept float (their inputs are not smoothed); ``insert``:
    where no fold exists, smooth anyway with a new Mul by 1 / s before the MatMul/Gemm
    readers (named in ``Smoothing.inserted``: the caller keeps them float).
    """
    graph = _Graph(model)
    result = Smoothing()
    work = _candidates(graph, plan, keep, insert, result.skipped)
    sizes = sizes or {}
    size_of = lambda name: sizes.get(name, UNKNOWN_BYTES) * max(len(samples), 1)  # noqa: E731
    progress = show_progress if show_progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(work), desc="smoothing", unit="tensor", disable=not progress, leave=False)
    grid = GRID if alpha is None else (alpha,)
    for group, recorded in recorded_chunks(model, list(work), {t: [t] for t in work}, samples, size_of,
                                           memory_budget):
        for tensor in group:
            bar.update(1)
            readers, _ = work[tensor]
            weights = [_weight_rows(graph, r) for r in readers]
            k = weights[0].shape[0]
            values = [np.asarray(v[tensor], np.float32) for v in recorded if tensor in v]
            if not values or any(v.shape[-1] != k for v in values):
                result.skipped[tensor] = SKIP_NO_FOLD
                continue
            rows = np.concatenate([v.reshape(-1, k) for v in values])
            low, high = rows.min(axis=0), rows.max(axis=0)
            best, error, plain = choose_alpha(_evenly(rows, MAX_ROWS), low, high, weights, readers, spec,
                                              weight_spec, grid)
            if alpha is None and not error < plain * (1 - MIN_GAIN):
                result.skipped[tensor] = SKIP_NO_GAIN
                continue
            amax_w = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
            result.alphas[tensor] = best
            result.error_ratio[tensor] = error / plain if plain > 0 else 1.0
            result.scales[tensor] = smoothing_factors(np.maximum(np.abs(low), np.abs(high)), amax_w, best)
    bar.close()
    return apply(model, {t: work[t] for t in result.scales}, result.scales, result.inserted), result


def apply(model: onnx.ModelProto, work: Mapping[str, tuple[list[_Reader], _Fold]],
          scales: Mapping[str, np.ndarray], inserted: list[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with X / s folded into each producer and s W into each reader.
    An initializer other nodes also read is copied under a new name first."""
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    uses: dict[str, int] = {}
    for node in smoothed.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    tensors = {t.name: t for t in smoothed.graph.initializer}
    nodes = {n.name: n for n in smoothed.graph.node}
    taken = set(tensors) | {o for n in smoothed.graph.node for o in n.output}

    renamed: dict[tuple[str, str], str] = {}  # (node, initializer) -> the node's own copy
    added: dict[str, onnx.NodeProto] = {}  # tensor -> its new Mul (no fold)

    def rewrite(node_name: str, name: str, change) -> None:
        """Change initializer ``name`` as ``node_name`` reads it.  Changes compose: a
        MatMul's rows scaled for its input and its columns divided for its output commute."""
        name = renamed.get((node_name, name), name)
        array = change(numpy_helper.to_array(tensors[name]))
        node = nodes[node_name]
        if uses[name] > 1:  # shared: this node gets its own copy
            new = name + "_smoothed"
            while new in taken:
                new += "_"
            taken.add(new)
            smoothed.graph.initializer.append(numpy_helper.from_array(array, new))
            tensors[new] = smoothed.graph.initializer[-1]
            for i, used in enumerate(node.input):
                if used == name:
                    node.input[i] = new
                    uses[name] -= 1
                    uses[new] = uses.get(new, 0) + 1
            renamed[(node_name, name)] = new
            return
        tensors[name].CopyFrom(numpy_helper.from_array(array, name))

    for tensor, (readers, fold) in work.items():
        s = scales[tensor]
        if fold.producer is None:
            added[tensor] = _insert_mul(smoothed, tensor, readers, s, taken, inserted)
            for reader in readers:
                nodes[reader.node.name].input[0] = added[tensor].output[0]
        for name in fold.divide_last:
            rewrite(fold.producer.name if name in fold.producer.input else _owner(smoothed, name, fold),
                    name, lambda a: (a / s).astype(a.dtype))
        for name in fold.divide_rows:
            rewrite(fold.producer.name, name, lambda a: (a / s[:, None]).astype(a.dtype))
        for reader in readers:
            shape = (-1, 1) if reader.rows_first else (1, -1)
            rewrite(reader.node.name, reader.weight, lambda a: (a * s.reshape(shape)).astype(a.dtype))
    if added:
        _place(smoothed, added)
    return smoothed


def _owner(model: onnx.ModelProto, name: str, fold: _Fold) -> str:
    """The node (the bias Add after the producer) reading ``name`` next to the producer's output."""
    outputs = set(fold.producer.output)
    for node in model.graph.node:
        if name in node.input and outputs & set(node.input):
            return node.name
    raise ValueError(name)


_SMOOTHED = "{}/smooth_quant"


def _insert_mul(model: onnx.ModelProto, tensor: str, readers: list[_Reader], s: np.ndarray, taken: set[str],
                inserted: list[str] | None) -> onnx.NodeProto:
    """The node X * (1 / s) (its factor added as an initializer); the caller places it."""
    name = _SMOOTHED.format(tensor)
    factor = numpy_helper.from_array((1.0 / s).astype(np.float32), name + "/factor")
    model.graph.initializer.append(factor)
    taken.update({name, factor.name})
    if inserted is not None:
        inserted.append(name)
    return helper.make_node("Mul", [tensor, factor.name], [name], name=name)


def _place(model: onnx.ModelProto, new: Mapping[str, onnx.NodeProto]) -> None:
    """Put each new node ({tensor: node}) right after the producer of its tensor (first
    when it is a graph input), keeping the topological order."""
    ordered = [node for tensor, node in new.items() if not any(tensor in n.output for n in model.graph.node)]
    for node in model.graph.node:
        ordered.append(onnx.NodeProto.FromString(node.SerializeToString()))
        ordered.extend(new[o] for o in node.output if o in new)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
