"""The one place that builds onnxruntime sessions.

Every session is CPU-only and silent (errors reach the user as one line of ours, not as
onnxruntime's log), takes a path or a ModelProto (models over 2 GB through a temporary
copy with external data), and can expose intermediate tensors as extra outputs.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .model_io import ort_model_source

PROVIDERS = ["CPUExecutionProvider"]


def with_extra_outputs(model: onnx.ModelProto, tensors) -> onnx.ModelProto:
    """A copy of the model whose outputs also expose the given intermediate tensors."""
    observed = onnx.ModelProto()
    observed.CopyFrom(model)
    existing = {o.name for o in observed.graph.output}
    known = {v.name: v.type.tensor_type.elem_type for v in observed.graph.value_info
             if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    for name in tensors:
        if name not in existing:
            elem_type = known.get(name, onnx.TensorProto.FLOAT)  # calibrated tensors are float
            observed.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return observed


def session(model, *, extra_outputs=(), optimize: bool = True, threads: int | None = None,
            spinning: bool = True) -> ort.InferenceSession:
    """A session for ``model`` (path or ModelProto).  ``optimize=False`` runs the graph
    as written (every Q/DQ tensor exists; no constant folding by onnxruntime).
    ``threads``: onnxruntime's intra-op threads (None: its default, one per core).
    ``spinning=False``: its idle threads sleep instead of spinning for work, for a session
    that shares the cores with work of ours (the calibration statistics)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif _has_float8(model):
        # onnxruntime 1.32's extended level fuses Relu -> QuantizeLinear for float8 too and
        # drops the Relu (negative values then pass): float8 Q/DQ models run at the basic level.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if isinstance(model, (str, os.PathLike)) and not extra_outputs:
        return ort.InferenceSession(str(model), options, providers=PROVIDERS)
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model))
    if extra_outputs:
        model = with_extra_outputs(model, list(extra_outputs))
    with ort_model_source(model) as source:
        return ort.InferenceSession(source, options, providers=PROVIDERS)


def _has_float8(model) -> bool:
    if isinstance(model, (str, os.PathLike)):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception:
            return False
    return any(i.data_type == TensorProto.FLOAT8E4M3FN for i in model.graph.initializer)


@functools.lru_cache(maxsize=None)
def highest_qdq_opset(upto: int) -> int:
    """The newest opset <= ``upto`` at which the installed onnxruntime runs
    QuantizeLinear/DequantizeLinear (onnx can know newer versions of them than
    onnxruntime implements).  Found by loading a two-node model; 13 at the least."""
    for version in range(upto, 13, -1):
        graph = helper.make_graph(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
            [helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]), helper.make_tensor("z", TensorProto.INT8, [], [0])])
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
        probe.ir_version = 10 if version < 23 else 11
        try:
            session(probe).run(None, {"x": np.zeros(2, np.float32)})
            return version
        except Exception:
            continue
    return 13
