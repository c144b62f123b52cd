"""Per-tensor diagnostics: how far each quantized activation, as the int8 model sees it,
is from the float model's tensor.

A QDQ model computes every quantized tensor T in float and then rounds it through
QuantizeLinear -> DequantizeLinear; the DequantizeLinear output is what the next op
reads, so comparing it with the float model's T on the same inputs measures the error
accumulated up to T (its own rounding and clipping plus everything upstream).
"""

from __future__ import annotations

import copy

import itertools
import math
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from . import runtime
from .checks import ort_message
from .dataset import input_specs, iter_samples
from .errors import CalibrationDataError, ModelError

DEFAULT_REPORT_SAMPLES = 4


def dequantized_names(int8_model: onnx.ModelProto) -> dict[str, str]:
    """{float tensor name: name of the DequantizeLinear output that replaces it}.

    insert.py feeds T to a QuantizeLinear and names the DequantizeLinear output
    ``T_dequantized``; a graph output keeps its name on the dequantized value and its
    float producer's output becomes ``T_float``.  Read the structure, not the names,
    so suffixes added for uniqueness do not matter.
    """
    graph = int8_model.graph
    outputs = {o.name for o in graph.output}
    # The DequantizeLinear with the quantize's own scale: a Mul folded into a scale
    # (fold_scalar_mul) reads the same integers with another scale, and is another tensor.
    dq_of = {(n.input[0], n.input[1]): n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    mapping = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or (node.output[0], node.input[1]) not in dq_of:
            continue
        dequantized = dq_of[(node.output[0], node.input[1])]
        mapping[dequantized if dequantized in outputs else node.input[0]] = dequantized
    return mapping


def expose_dequantized(int8_model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``int8_model`` in which every quantized tensor has a DequantizeLinear with
    its quantize's own parameters (one is added where only rescaled ones read it), and the
    ``dequantized_names`` mapping of that copy."""
    model = copy.deepcopy(int8_model)
    mapping = dequantized_names(model)
    taken = {name for n in model.graph.node for name in n.output}
    for node in list(model.graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] in mapping:
            continue
        name = f"{node.input[0]}_report_dequantized"
        while name in taken:
            name += "_"
        taken.add(name)
        model.graph.node.append(onnx.helper.make_node("DequantizeLinear", [node.output[0], *node.input[1:3]], [name],
                                                      name=f"{name}_node"))
        mapping[node.input[0]] = name
    return model, mapping


def _session(model: onnx.ModelProto, extra_outputs: Iterable[str]) -> ort.InferenceSession:
    """A session exposing ``extra_outputs``, unoptimized so that every Q/DQ tensor exists."""
    try:
        return runtime.session(model, extra_outputs=list(extra_outputs), optimize=False)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model for the tensor report: {ort_message(exc)}") from exc


def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise); None when undefined (no noise, or no signal)."""
    if noise <= 0 or signal <= 0:
        return None
    return 10.0 * math.log10(signal / noise)


def tensor_report(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, samples, params: Mapping,
                  ranges: Mapping | None = None, max_samples: int = DEFAULT_REPORT_SAMPLES) -> list[dict]:
    """One entry per quantized activation tensor, worst SQNR first (see ``measure``)."""
    return measure(float_model, int8_model, samples, params, ranges, max_samples)[0]


def report_summary(float_model: onnx.ModelProto, outcome, samples, ranges: Mapping, max_samples: int) -> dict:
    """The summary keys of the tensor report: "tensors" and "report_samples"."""
    ranges = {**outcome.plan.fixed_ranges, **ranges}  # Sigmoid/Softmax outputs: [0, 1]
    entries, used = measure(float_model, outcome.model, samples, outcome.params, ranges, max_samples)
    return {"tensors": entries, "report_samples": used}


def measure(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, samples, params: Mapping,
            ranges: Mapping | None = None, max_samples: int = DEFAULT_REPORT_SAMPLES) -> tuple[list[dict], int]:
    """(entries, samples run): one entry per quantized activation tensor, worst SQNR first.

    ``float_model`` is the model that was quantized (the stage-1 model: tensor names must
    match), ``params`` the ``{tensor: ActivationParams}`` of the quantization, ``ranges``
    the calibrated ranges (optional, reported as given), ``samples`` anything
    ``Calibrator.collect_data`` accepts (only the first ``max_samples`` are run; None or
    empty gives the entries without SQNR).  Each entry: tensor, producer (node, op type),
    range, scale, zero_point, grid (the range the parameters represent), sqnr_db (None
    when the int8 tensor is exact), max_abs_error, mse.
    """
    int8_model, mapping = expose_dequantized(int8_model)
    tensors = [name for name in params if name in mapping]
    producers = {out: node for node in float_model.graph.node for out in node.output}
    input_names = {s.name for s in input_specs(float_model)}

    sums = {name: np.zeros(4) for name in tensors}  # signal, noise, max |error|, values
    used = 0
    if samples is not None and tensors and max_samples > 0:
        float_outputs = [t for t in tensors if t not in input_names]
        float_session = _session(float_model, float_outputs)
        int8_session = _session(int8_model, [mapping[t] for t in tensors])
        specs = input_specs(float_model)
        for sample in itertools.islice(iter_samples(samples, specs), max_samples):
            try:
                reference = dict(zip(float_outputs, float_session.run(float_outputs, sample)))
                quantized = int8_session.run([mapping[t] for t in tensors], sample)
            except Exception as exc:
                raise CalibrationDataError(f"onnxruntime failed on report sample {used + 1}: {ort_message(exc)}") from exc
            for name, approx in zip(tensors, quantized):
                ref = np.asarray(reference[name] if name in reference else sample[name], np.float64)
                error = ref - approx
                acc = sums[name]
                acc += (np.vdot(ref, ref), np.vdot(error, error), 0.0, ref.size)
                acc[2] = max(acc[2], float(np.abs(error).max(initial=0.0)))
            used += 1

    entries = []
    for name in tensors:
        p = params[name]
        low, high = p.grid
        scale, zero_point = float(p.scale), int(float(p.zero_point))
        producer = producers.get(name)
        signal, noise, max_error, count = sums[name]
        entry = {
            "tensor": name,
            "node": producer.name if producer is not None else None,
            "op_type": producer.op_type if producer is not None else "input",
            "range": [float(v) for v in ranges[name]] if ranges and name in ranges else None,
            "scale": scale,
            "zero_point": zero_point,
            "dtype": str(p.zero_point.dtype), "bits": p.zero_point.dtype.itemsize * 8,
            "grid": [scale * (low - zero_point), scale * (high - zero_point)],
            "sqnr_db": None, "max_abs_error": None, "mse": None,
        }
        if used:
            entry.update(sqnr_db=sqnr_db(signal, noise), max_abs_error=float(max_error), mse=float(noise / max(count, 1)))
        entries.append(entry)
    entries.sort(key=_worst_first)
    return entries, used


def _worst_first(entry: dict) -> tuple:
    db = entry["sqnr_db"]
    if db is None:  # exact (or no signal at all: then any error is the worst)
        db = -math.inf if entry["mse"] else math.inf
    return (db, entry["tensor"])


LOSS_CAP_DB = 60.0  # above this an int8 error no longer matters: the SQNR of an exact tensor


def capped_sqnr(entry: Mapping) -> float:
    """A report entry's SQNR capped at LOSS_CAP_DB; 0 for noise on an all-zero signal."""
    if entry["sqnr_db"] is not None:
        return min(entry["sqnr_db"], LOSS_CAP_DB)
    return 0.0 if entry["mse"] else LOSS_CAP_DB  # all-zero signal with noise / exact or unmeasured


def sqnr_lost(float_model: onnx.ModelProto, plan, entries) -> dict[str, tuple[str, float]]:
    """{tensor: (quantized node that makes it, SQNR that node loses)} from report entries.

    A tensor's SQNR holds every error upstream of it, so the worst tensors are simply the
    deepest ones; a node's loss is the worst of its quantized inputs minus its output
    (capped, so exact tensors count as clean).  A Mul folded into a DequantizeLinear's
    scale has its source's SQNR; a Relu folded into a quantize is its producer's."""
    db = {e["tensor"]: capped_sqnr(e) for e in entries}
    for out, (source, _) in plan.rescaled.items():
        if source in db:
            db.setdefault(out, db[source])
    producers = {out: node for node in float_model.graph.node for out in node.output}
    quantized = {n.name for n in plan.quantized_nodes}
    absorbed = {n.name for n in plan.absorbed_nodes}
    lost = {}
    for tensor, out_db in db.items():
        node = producers.get(tensor)
        if node is not None and node.name in absorbed:
            node = producers.get(node.input[0])
        if node is None or node.name not in quantized:
            continue
        in_db = min((db[i] for i in node.input if i in db), default=LOSS_CAP_DB)
        lost[tensor] = (node.name, in_db - out_db)
    return lost
