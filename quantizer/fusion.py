"""What onnxruntime's CPU provider actually runs in integer kernels.

A Q/DQ model is only fast when onnxruntime fuses each DQ -> op -> Q into an integer
kernel.  This reads onnxruntime's own optimized graph (the QDQ fusions run at the
"extended" level) and says, for the nodes we quantized, which became integer kernels
and which stayed float between a DequantizeLinear and a QuantizeLinear ("float
islands": they pay for the conversions and gain nothing).
"""

from __future__ import annotations

import collections
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .qdq.plan import QuantPlan

LARGE_ISLAND_SHARE = 0.2  # a note when more than this share of quantized nodes run float
_TOKEN = re.compile(r"_token_\d+$")  # onnxruntime's layout transformer renames nodes
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32,
                  onnx.TensorProto.INT16, onnx.TensorProto.UINT16}


@dataclass
class FusionReport:
    quantized: int  # nodes we quantized (Relu/Clip folded into a Q not counted)
    integer: int  # ... that onnxruntime runs in integer kernels
    islands: dict[str, int] = field(default_factory=dict)  # op type -> float ops between DQ and Q
    island_nodes: list[str] = field(default_factory=list)  # our quantized nodes that run float
    onnxruntime_ops: dict[str, int] = field(default_factory=dict)  # op counts of its optimized graph

    @property
    def float_share(self) -> float:
        return 1.0 - self.integer / self.quantized if self.quantized else 0.0

    def note(self) -> str | None:
        islands = ", ".join(f"{n} {op}" for op, n in sorted(self.islands.items(), key=lambda kv: (-kv[1], kv[0])))
        if not self.island_nodes:
            text = f"onnxruntime runs all {self.quantized} quantized nodes in integer kernels"
            return text + (f"; float ops left between DequantizeLinear and QuantizeLinear: {islands}" if islands else "")
        text = (f"onnxruntime runs {self.integer} of {self.quantized} quantized nodes in integer kernels; "
                f"float ops between DequantizeLinear and QuantizeLinear: {islands}")
        if self.float_share > LARGE_ISLAND_SHARE:
            text += (f" ({self.float_share:.0%} of the quantized nodes run float: they pay for the conversions; "
                     "`exclude` them or pick a target with kernels for them)")
        return text

    def as_dict(self) -> dict:
        return {"quantized_nodes": self.quantized, "integer_nodes": self.integer, "float_islands": dict(self.islands),
                "float_island_nodes": list(self.island_nodes), "onnxruntime_ops": dict(self.onnxruntime_ops)}


def _optimized_graph(model: onnx.ModelProto) -> onnx.ModelProto | None:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="quantize-fusion-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return onnx.load(str(path), load_external_data=False)
        except Exception:
            return None  # too large for one protobuf, or onnxruntime refuses: no report


def _integer_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of the tensors holding integer data, propagated through the graph."""
    integer = {i.name for i in graph.initializer if i.data_type in _INTEGER_TYPES}
    integer |= {v.name for v in graph.input if v.type.tensor_type.elem_type in _INTEGER_TYPES}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" or node.op_type.startswith("QLinear") or node.op_type == "QGemm":
            integer.update(node.output[:1])
        elif node.op_type != "DequantizeLinear" and node.input and node.input[0] in integer:
            integer.update(node.output)  # pass-through ops on integer data
    return integer


def fusion_report(model: onnx.ModelProto, plan: QuantPlan) -> FusionReport | None:
    """The report for ``model`` (the Q/DQ model as written), or None if onnxruntime
    cannot give its optimized graph."""
    optimized = _optimized_graph(model)
    if optimized is None:
        return None
    graph = optimized.graph
    producer = {out: node for node in graph.node for out in node.output}
    integer = _integer_tensors(graph)
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
    # The float region after a DequantizeLinear: float ops reading it, transitively.
    region = []
    in_region: set[int] = set()
    for node in graph.node:
        if node.op_type in _QDQ or any(i in integer for i in node.input):
            continue
        sources = [producer.get(i) for i in node.input]
        if any(p is not None and (p.op_type == "DequantizeLinear" or id(p) in in_region) for p in sources):
            region.append(node)
            in_region.add(id(node))
    # ... and of it, the ops whose values flow on into a QuantizeLinear: float islands.
    reaches_q: set[int] = set()
    for node in reversed(region):
        users = [u for out in node.output for u in consumers[out]]
        if any(u.op_type == "QuantizeLinear" or id(u) in reaches_q for u in users):
            reaches_q.add(id(node))
    islands = collections.Counter(n.op_type for n in region if id(n) in reaches_q)
    float_names = {_TOKEN.sub("", n.name) for n in region if id(n) in reaches_q}
    ours = [n.name for n in plan.quantized_nodes]
    island_nodes = [name for name in ours if name in float_names]
    counts = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                                 for n in graph.node)
    return FusionReport(quantized=len(ours), integer=len(ours) - len(island_nodes), islands=dict(islands),
                        island_nodes=island_nodes, onnxruntime_ops=dict(sorted(counts.items())))


# -- the weights-first modes: fused kernels instead of Q/DQ islands ----------------------

# What onnxruntime's CPU provider turns the dynamic and weight-only forms into.
DYNAMIC_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "GatherBlockQuantized")
WEIGHT_ONLY_KERNELS = ("MatMulNBits", "GatherBlockQuantized")
_UNFUSED = ("MatMulInteger", "DequantizeLinear")  # what is left of a form onnxruntime did not fuse


@dataclass
class KernelReport:
    quantized: int  # nodes we quantized
    kernels: tuple[str, ...]  # the fused kernels they should become
    integer: int  # fused kernels in onnxruntime's optimized graph
    unfused: dict[str, int] = field(default_factory=dict)  # MatMulInteger / DequantizeLinear left
    onnxruntime_ops: dict[str, int] = field(default_factory=dict)

    def note(self) -> str:
        names = "/".join(self.kernels)
        if self.integer >= self.quantized and not self.unfused:
            return f"onnxruntime runs all {self.quantized} quantized nodes in {names}"
        left = ", ".join(f"{n} {op}" for op, n in sorted(self.unfused.items()))
        return (f"onnxruntime runs {self.integer} of {self.quantized} quantized nodes in {names}"
                + (f"; left unfused: {left}" if left else ""))

    def as_dict(self) -> dict:
        return {"quantized_nodes": self.quantized, "integer_nodes": self.integer, "kernels": list(self.kernels),
                "unfused": dict(self.unfused), "float_island_nodes": [],
                "onnxruntime_ops": dict(self.onnxruntime_ops)}


def kernel_report(model: onnx.ModelProto, plan: QuantPlan, kernels: tuple[str, ...]) -> KernelReport | None:
    """How many of ``plan``'s nodes onnxruntime runs in ``kernels`` (com.microsoft ops of
    its optimized graph), or None if onnxruntime cannot give that graph."""
    optimized = _optimized_graph(model)
    if optimized is None:
        return None
    counts = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                                 for n in optimized.graph.node)
    fused = sum(counts.get(f"com.microsoft:{k}", 0) for k in kernels)
    unfused = {op: counts[op] for op in _UNFUSED if counts.get(op)}
    return KernelReport(len(plan.quantized_nodes), kernels, fused, unfused, dict(sorted(counts.items())))
