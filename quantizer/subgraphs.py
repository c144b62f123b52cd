"""Models with control flow (If/Loop/Scan): the main graph is quantized, subgraphs stay float.

Calibration only observes main-graph tensors, so a node that owns a subgraph is left
float ("has subgraphs") and everything inside it is reported, never touched.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

HAS_SUBGRAPHS = "has subgraphs"


def has_subgraphs(node: ir.Node) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()
    )


def iter_graphs(graph: onnx.GraphProto):
    """``graph`` and every If/Loop/Scan body inside it, at any depth (the one walker of
    protobuf graphs; onnx-ir models use ``graph.subgraphs()``)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def count_subgraph_nodes(model: onnx.ModelProto) -> int:
    """Nodes inside If/Loop/Scan bodies at any depth (they all stay float)."""
    return sum(len(graph.node) for graph in iter_graphs(model.graph)) - len(model.graph.node)


def repair_subgraph_outputs(model: ir.Model) -> int:
    """Give every subgraph output that is defined in an outer scope its own Identity.

    Identity elimination can leave a branch returning an outer-scope value directly,
    which ONNX shape inference and onnxruntime reject ("Subgraph output ... is an outer
    scope value being returned directly").  Returns the number of Identity nodes added.
    """
    added = 0
    for graph in model.graph.subgraphs():
        for index, value in enumerate(list(graph.outputs)):
            producer = value.producer()
            if producer is not None:
                local = producer.graph is graph
            else:  # a graph input or initializer: local only if it is this graph's own
                local = value in graph.inputs or graph.initializers.get(value.name) is value
            if local:
                continue
            copy = ir.Value(name=None, type=value.type, shape=value.shape)
            graph.append(ir.Node("", "Identity", [value], outputs=[copy]))
            graph.outputs[index] = copy
            added += 1
    return added
