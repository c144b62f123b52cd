"""Loss-aware range selection: the ``auto`` calibration method.

Each range method minimizes the error of the tensor it ranges, which is not the
network's error: clipping the outliers of an attention or HardSwish block costs little
on the tensor and everything downstream, while keeping every outlier of a detector's
feature map costs resolution the next Conv needed.  Which method wins changes from model
to model and from tensor to tensor.  So for each calibrated tensor this step

1. takes the candidate ranges the methods propose (min_max, percentile, mse, sqnr,
   entropy, in the target's symmetric or asymmetric form) plus a grid that shrinks the
   min-max range toward zero, and drops those whose error on the tensor itself, over
   all calibration data (its histogram), exceeds ``GUARD`` times the best candidate's;
2. builds the tensor's *block*: the nodes that read it, through shape-only ops, and the
   activation that follows a consumer (the error after a Relu is what the next layer
   sees);
3. runs that block in onnxruntime on recorded float inputs of ``BLOCK_SAMPLES`` samples,
   once with the float tensor and once per candidate with the tensor quantized and
   dequantized on the target's exact grid (every candidate on the first sample, the
   ``FINALISTS`` best and min-max on all of them; an NCHW feature map over
   ``CROP_ELEMENTS`` values is measured on a centre window of itself);
4. keeps the candidate with the smallest relative squared error of the block's outputs
   (summed over outputs and samples); a candidate must beat the widest one by
   ``MIN_GAIN`` to replace it, so a block that does not care keeps min-max;
5. then checks the whole network: the model quantized with these per-tensor choices and
   the models quantized with the ``CHECKED_METHODS`` methods whose ranges alone had the
   lowest summed block error (``Selection.method_totals``) run on the same samples, and
   the set with the highest output SQNR against float wins (``pick_by_output``; the
   per-tensor choice unless another is ``clearly_better``, by more than the spread
   of its gain over the samples): block
   errors that compound, or cancel, are seen there.

What it minimizes: for each tensor t, sum over block outputs y of
||y(deq(q(t))) - y(t)||^2 / ||y(t)||^2 on the recorded samples.  Tensors are chosen
independently (the others stay float while one is measured), in the spirit of AIMET's
sequential MSE, applied to activation ranges.  Recording is done in chunks so that at
most ``memory_budget`` bytes of activations are held at once.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from .. import runtime
from ..qdq.params import spec_params

FAMILIES = ("MIN_MAX", "PERCENTILE", "MSE", "SQNR", "ENTROPY")
SHRINK = (0.75, 0.5, 0.3)  # the min-max range scaled toward zero: the grid of candidates
FOLLOW = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "PRelu"})
MAX_BLOCK_NODES = 8
CROP_ELEMENTS = 1 << 18  # feature maps larger than this are measured on a centre window
FINALISTS = 3  # candidates measured on every sample (the others on the first only)
MIN_GAIN = 0.02
GUARD = 4.0  # a candidate's full-data tensor error may be at most this many times the best one's  # relative loss improvement a narrower candidate needs over min-max
MEMORY_BUDGET = 1 << 30
PER_TENSOR = "per-tensor choice"
BLOCK_SAMPLES = 2  # samples the blocks are measured on (the whole-model check uses all)
CHECKED_METHODS = 2  # single methods checked against the per-tensor choice (best block totals)
UNKNOWN_BYTES = 4 << 20  # a tensor of unknown size (no static shape, not calibrated): assumed this large


@dataclass(frozen=True)
class Choice:
    """The range picked for one tensor and why."""

    method: str  # the candidate's name ("mse_asym", "min_max x0.6", ...)
    range: tuple[float, float]
    loss: float  # relative squared error of the block's outputs with this range
    min_max_loss: float  # ... with the min-max range
    method_losses: dict = field(default_factory=dict)  # each method's range on the first sample (inf: guarded out)


@dataclass
class Selection:
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    choices: dict[str, Choice] = field(default_factory=dict)
    unmeasured: list[str] = field(default_factory=list)  # blocks that cannot run alone
    network_db: dict[str, float] = field(default_factory=dict)  # output SQNR of each whole-model candidate
    picked: str = PER_TENSOR  # which candidate set the auto method uses

    def method_totals(self) -> dict[str, float]:
        """Each method's block losses on the first sample, summed over the tensors: which
        method's ranges alone would do best (inf when the guard removed one somewhere)."""
        totals: dict[str, float] = collections.defaultdict(float)
        for choice in self.choices.values():
            for name, value in choice.method_losses.items():
                totals[name] += value
        return dict(totals)

    def summary(self) -> dict:
        counts = collections.Counter("min_max grid" if " x" in c.method else c.method for c in self.choices.values())
        gains = [c.min_max_loss / c.loss for c in self.choices.values() if c.loss > 0 and c.min_max_loss > c.loss]
        return {"tensors": len(self.choices), "chosen": dict(sorted(counts.items())),
                "unmeasured": len(self.unmeasured),
                "median_block_error_reduction": round(float(np.median(gains)), 2) if gains else 1.0,
                "picked": self.picked, "output_sqnr_db": {k: round(v, 2) for k, v in self.network_db.items()}}


def candidate_ranges(per_method: Mapping[str, tuple[float, float]]) -> list[tuple[str, tuple[float, float]]]:
    """Named candidates for one tensor: the methods' ranges, then min-max shrunk by
    ``SHRINK``, without near-duplicates (within 0.5 % of the min-max width)."""
    names = list(per_method)
    low, high = per_method[names[0]]  # min_max first
    proposed = [(name, per_method[name]) for name in names]
    proposed += [(f"{names[0]} x{f:g}", (low * f, high * f)) for f in SHRINK]
    width = max(high - low, 1e-12)
    kept: list[tuple[str, tuple[float, float]]] = []
    for name, (lo, hi) in proposed:
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            continue
        if all(abs(lo - a) + abs(hi - b) > 0.005 * width for _, (a, b) in kept):
            kept.append((name, (float(lo), float(hi))))
    return kept


class _Graph:
    """Index of a ModelProto's top-level graph: producers, consumers, initializers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = list(model.graph.node)
        self.consumers: dict[str, list[int]] = collections.defaultdict(list)
        self.producer: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.consumers[name].append(index)
            for name in node.output:
                self.producer[name] = index
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.types = {v.name: v.type for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}

    def block(self, tensor: str) -> list[int] | None:
        """Indices (topological order) of the nodes that read ``tensor``, through
        shape-only ops and activations (to the layer after them), plus the activation
        that follows a consumer; None when the block cannot run alone (a subgraph
        attribute)."""
        chosen: list[int] = []
        frontier = list(self.consumers.get(tensor, ()))
        while frontier and len(chosen) < MAX_BLOCK_NODES:
            index = frontier.pop(0)
            if index in chosen:
                continue
            node = self.nodes[index]
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                return None
            chosen.append(index)
            for out in node.output:
                for reader in self.consumers.get(out, ()):
                    op = self.nodes[reader].op_type
                    if node.op_type in FOLLOW or node.op_type in ACTIVATIONS or op in ACTIVATIONS:
                        frontier.append(reader)
        constants = [self.producer[name] for i in chosen for name in self.nodes[i].input
                     if name in self.producer and self.nodes[self.producer[name]].op_type == "Constant"]
        return sorted(set(chosen) | set(constants))

    def external_inputs(self, block: Sequence[int]) -> list[str]:
        made = {name for i in block for name in self.nodes[i].output}
        names = [name for i in block for name in self.nodes[i].input
                 if name and name not in made and name not in self.initializers]
        return list(dict.fromkeys(names))

    def block_outputs(self, block: Sequence[int]) -> list[str]:
        read = {name for i in block for name in self.nodes[i].input}
        return [name for i in block if self.nodes[i].op_type != "Constant"
                for name in self.nodes[i].output if name and name not in read]

    def sub_model(self, block: Sequence[int], feeds: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        nodes = [self.nodes[i] for i in block]
        used = {name for node in nodes for name in node.input}
        inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype),
                                                [None] * feeds[name].ndim)  # samples may differ in shape
                  for name in self.external_inputs(block)]
        outputs = []
        for name in self.block_outputs(block):
            info = onnx.ValueInfoProto(name=name)
            if name in self.types:
                info.type.CopyFrom(self.types[name])
            else:
                info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            outputs.append(info)
        graph = helper.make_graph(nodes, "block", inputs, outputs,
                                  [t for name, t in self.initializers.items() if name in used])
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        model.functions.extend(self.model.functions)
        return model


def _chunks(tensors: Sequence[str], needs: Mapping[str, list[str]], size_of: Callable[[str], int],
            budget: int) -> list[list[str]]:
    """Groups of tensors whose recorded inputs, together, stay within ``budget`` bytes."""
    groups, current, held = [], [], {}
    for tensor in tensors:
        extra = {name: size_of(name) for name in needs[tensor] if name not in held}
        if current and sum(held.values()) + sum(extra.values()) > budget:
            groups.append(current)
            current, held = [], {}
            extra = {name: size_of(name) for name in needs[tensor]}
        current.append(tensor)
        held.update(extra)
    if current:
        groups.append(current)
    return groups


def recorded_chunks(model: onnx.ModelProto, items: Sequence[str], needs: Mapping[str, list[str]], samples,
                    size_of: Callable[[str], int], budget: int):
    """Yield (items, recorded): groups of ``items`` with, per sample, the float values of
    every tensor they ``need`` (graph inputs from the sample, the rest from one run of
    ``model``), holding at most ``budget`` bytes at once."""
    graph_inputs = {i.name for i in model.graph.input}
    for group in _chunks(items, needs, size_of, budget):
        wanted = sorted({n for item in group for n in needs[item]} - graph_inputs)
        session = runtime.session(model, extra_outputs=wanted) if wanted else None
        recorded = []
        for sample in samples:
            values = dict(zip(wanted, session.run(wanted, dict(sample)))) if session is not None else {}
            values.update({k: v for k, v in sample.items() if k in graph_inputs})
            recorded.append(values)
        del session
        yield group, recorded
        del recorded


def _fake_quantize(values: np.ndarray, low: float, high: float, spec) -> np.ndarray:
    """quantize -> dequantize on the target's grid (as QuantizeLinear/DequantizeLinear)."""
    params = spec_params(low, high, spec)
    info = np.iinfo(params.zero_point.dtype)
    zero = float(int(params.zero_point))
    q = np.divide(values, params.scale, dtype=np.float32)
    np.rint(q, out=q)
    q += zero
    np.clip(q, info.min, info.max, out=q)
    q -= zero
    q *= params.scale
    return q


def _energy(arrays: list[np.ndarray]) -> list[float]:
    return [float(np.vdot(a.ravel(), a.ravel())) if a.dtype.kind == "f" else float(a.size) for a in arrays]


def _relative_error(reference: list[np.ndarray], energies: list[float], got: list[np.ndarray]) -> float:
    """Sum over outputs of ||got - reference||^2 / ||reference||^2."""
    total = 0.0
    for ref, energy, out in zip(reference, energies, got):
        diff = np.subtract(out, ref, dtype=np.float32).ravel()
        noise = float(np.vdot(diff, diff))
        total += noise / energy if energy > 0 else (0.0 if noise == 0 else 1.0)
    return total


def choose_ranges(model: onnx.ModelProto, per_method: Mapping[str, Mapping[str, tuple[float, float]]],
                  samples: Sequence[Mapping[str, np.ndarray]], spec, *, sizes: Mapping[str, int] | None = None,
                  full_data_errors: Callable[[str, list], np.ndarray] | None = None,
                  memory_budget: int = MEMORY_BUDGET, show_progress: bool | None = None) -> Selection:
    """Pick each tensor's range among ``candidate_ranges`` by the error of its block.

    ``model``: the stage-1 float model.  ``per_method``: {method name: {tensor: range}},
    min_max first.  ``samples``: a few calibration samples (feeds of the model).
    ``spec``: the target's activation spec (the grid the candidates are measured on).
    ``sizes``: {tensor: bytes per sample} for the memory estimate (``UNKNOWN_BYTES`` when missing).
    ``full_data_errors(tensor, ranges)``: each range's squared error of the tensor itself
    over all calibration data (from its histogram); candidates above ``GUARD`` times the
    smallest are not measured: a few samples cannot show the rare outliers a narrow range
    clips, so without the guard the measurement favours ranges too narrow for the data.
    """
    graph = _Graph(model)
    first = next(iter(per_method.values()))
    tensors = list(first)
    selection = Selection()
    blocks = {t: graph.block(t) for t in tensors}
    needs = {t: ([t] + graph.external_inputs(b)) if b else [t] for t, b in blocks.items()}
    sizes = sizes or {}
    size_of = lambda name: sizes.get(name, UNKNOWN_BYTES) * min(len(samples), BLOCK_SAMPLES)  # noqa: E731
    progress = show_progress if show_progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(tensors), desc="choosing ranges", unit="tensor", disable=not progress, leave=False)
    for group, recorded in recorded_chunks(model, tensors, needs, samples[:BLOCK_SAMPLES], size_of, memory_budget):
        for tensor in group:
            bar.update(1)
            own = {m: r[tensor] for m, r in per_method.items() if tensor in r}
            options = candidate_ranges(own)
            if full_data_errors is not None and len(options) > 1:
                errors = np.asarray(full_data_errors(tensor, [r for _, r in options]), np.float64)
                if np.isfinite(errors).any():
                    limit = GUARD * np.nanmin(errors)
                    options = [o for i, o in enumerate(options) if i == 0 or errors[i] <= limit]
            choice = _measure(graph, tensor, blocks[tensor], options, recorded, spec, own)
            if choice is None:
                selection.unmeasured.append(tensor)
                selection.ranges[tensor] = options[0][1]
                continue
            selection.choices[tensor] = choice
            selection.ranges[tensor] = choice.range
    bar.close()
    return selection


def _cropped(feed: Mapping[str, np.ndarray], tensor: str, limit: int) -> dict[str, np.ndarray] | None:
    """The centre window of every NCHW input of ``feed`` (all of one spatial size) such
    that ``tensor`` has at most ``limit`` elements; None when there is nothing to crop."""
    x = feed[tensor]
    if x.ndim != 4 or x.size <= limit:
        return None
    h, w = x.shape[2:]
    if any(v.ndim == 4 and v.shape[2:] != (h, w) for v in feed.values()):
        return None
    factor = float(np.sqrt(limit / x.size))
    ch, cw = max(8, int(h * factor)), max(8, int(w * factor))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return {k: np.ascontiguousarray(v[:, :, y0:y0 + ch, x0:x0 + cw]) if v.ndim == 4 else v for k, v in feed.items()}


def _nearest(options, wanted: tuple[float, float], width: float) -> int | None:
    """The option holding (or within 0.5 % of the min-max width of) the range ``wanted``."""
    distances = [abs(lo - wanted[0]) + abs(hi - wanted[1]) for _, (lo, hi) in options]
    best = int(np.argmin(distances))
    return best if distances[best] <= 0.005 * width + 1e-12 else None


def _measure(graph: _Graph, tensor: str, block: list[int] | None, options, recorded, spec,
             own: Mapping[str, tuple[float, float]]) -> Choice | None:
    if block is None:
        return None
    try:
        if block:
            feeds = [{name: values[name] for name in graph.external_inputs(block)} for values in recorded]
            session = runtime.session(graph.sub_model(block, feeds[0]))
            outputs = [o.name for o in session.get_outputs()]
            run = lambda feed: session.run(outputs, feed)  # noqa: E731
        else:  # a graph output nothing reads: its own error
            feeds = [{tensor: values[tensor]} for values in recorded]
            run = lambda feed: [feed[tensor]]  # noqa: E731
        crops = [_cropped(feed, tensor, CROP_ELEMENTS) for feed in feeds]
        if all(c is not None for c in crops):
            try:  # a large feature map: its centre window tells the candidates apart as well
                references = [run(c) for c in crops]
                feeds = crops
            except Exception:  # the block depends on the full size (a fixed Reshape): measure it whole
                references = [run(feed) for feed in feeds]
        else:
            references = [run(feed) for feed in feeds]
        energies = [_energy(reference) for reference in references]

        def loss(option: int, sample: int) -> float:
            low, high = options[option][1]
            quantized = dict(feeds[sample])
            quantized[tensor] = _fake_quantize(feeds[sample][tensor], low, high, spec)
            return _relative_error(references[sample], energies[sample], run(quantized))

        # Every candidate on the first sample; the best few (and min-max) on the rest.
        losses = np.array([loss(i, 0) for i in range(len(options))])
        low, high = options[0][1]
        at = {name: _nearest(options, r, high - low) for name, r in own.items()}
        method_losses = {name: float(losses[i]) if i is not None else float("inf") for name, i in at.items()}
        finalists = sorted({0, *np.argsort(losses, kind="stable")[:FINALISTS].tolist()})
        for sample in range(1, len(feeds)):
            for i in finalists:
                losses[i] += loss(i, sample)
        losses = np.where(np.isin(np.arange(len(options)), finalists), losses, np.inf)
    except Exception:  # a block onnxruntime will not run on its own: keep min-max for it
        return None
    best = int(np.argmin(losses))
    if losses[best] > losses[0] * (1 - MIN_GAIN):
        best = 0
    name, chosen = options[best]
    return Choice(name, chosen, float(losses[best]), float(losses[0]), method_losses)


def output_errors(session, samples: Sequence[Mapping[str, np.ndarray]],
                  references: Sequence[list[np.ndarray]]) -> np.ndarray:
    """Per sample, the (signal, noise) energies of a model's float outputs against the
    float ``references``: shape (samples, 2); the noise is inf where an output is not finite."""
    errors = np.zeros((len(samples), 2))
    for i, (sample, reference) in enumerate(zip(samples, references)):
        for ref, out in zip(reference, session.run(None, dict(sample))):
            if ref.dtype.kind != "f":
                continue
            ref64 = ref.ravel().astype(np.float64)
            errors[i, 0] += float(np.vdot(ref64, ref64))
            if not np.all(np.isfinite(out)):
                errors[i, 1] = np.inf
                continue
            diff = np.subtract(out, ref, dtype=np.float64).ravel()
            errors[i, 1] += float(np.vdot(diff, diff))
    return errors


def sqnr_db(errors: np.ndarray) -> float:
    """The SQNR in dB over all samples of ``output_errors``' (signal, noise) rows (-inf
    when an output was not finite, inf when there is no noise)."""
    signal, noise = errors.sum(axis=0) if len(errors) else (0.0, 0.0)
    if not np.isfinite(noise):
        return float("-inf")
    if noise == 0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-30) / noise))


def output_sqnr_db(session, samples: Sequence[Mapping[str, np.ndarray]], references: Sequence[list[np.ndarray]]) -> float:
    """SQNR in dB of a model's outputs over all outputs and samples against the float
    ``references`` (-inf when an output is not finite)."""
    return sqnr_db(output_errors(session, samples, references))


def clearly_better(errors: np.ndarray, than: np.ndarray) -> bool:
    """Whether the model with per-sample ``errors`` is closer to float than the one with
    ``than``, by more than the samples' spread: the mean of the per-sample SQNR gains
    (dB) must be positive and exceed its standard error (the one-standard-error rule of
    model selection; with one sample, any gain)."""
    noise, other = errors[:, 1], than[:, 1]
    if not np.all(np.isfinite(noise)):
        return False
    if not np.all(np.isfinite(other)):
        return True
    gains = 10.0 * (np.log10(np.maximum(other, 1e-30)) - np.log10(np.maximum(noise, 1e-30)))
    if len(gains) == 0:
        return False
    mean = float(gains.mean())
    if len(gains) < 2:
        return mean > 0
    return mean > 0 and mean > float(gains.std(ddof=1)) / np.sqrt(len(gains))


def pick_by_output(candidates: Mapping[str, Mapping[str, tuple[float, float]]],
                   errors_of: Callable[[Mapping], np.ndarray]) -> tuple[str, dict[str, float]]:
    """The candidate range set whose quantized model has the highest output SQNR
    (``errors_of(ranges)``: its per-sample ``output_errors`` against float on the accuracy
    samples), and every candidate's SQNR.  The first candidate (the per-tensor choice)
    stays unless the best one is ``clearly_better`` than it: on a handful of samples a
    few tenths of a dB are within the sample-to-sample spread, and a switch on such a
    near tie follows the noise of these samples, not the data."""
    errors = {name: errors_of(ranges) for name, ranges in candidates.items()}
    scores = {name: sqnr_db(e) for name, e in errors.items()}
    first = next(iter(scores))
    best = max(scores, key=scores.get)
    if best != first and not clearly_better(errors[best], errors[first]):
        best = first
    return best, scores
