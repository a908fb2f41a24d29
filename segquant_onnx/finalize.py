"""Finalize: cleanup, topological order, opset, and proof that ONNX accepts the result."""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.graph_io import EXTERNAL_DATA_THRESHOLD, export_model, external_tensors, model_size

log = logging.getLogger(__name__)

PRODUCER = "segquant-onnx"


def assert_dedicated_dq(graph: gs.Graph) -> None:
    """Every DequantizeLinear output feeds exactly one node (TensorRT cannot share a DQ)."""
    for node in graph.nodes:
        if node.op == "DequantizeLinear" and len(node.outputs[0].outputs) > 1:
            raise RuntimeError(f"finalize: {node.name} feeds {len(node.outputs[0].outputs)} consumers")


def finalize(graph: gs.Graph, min_opset: int = 13) -> onnx.ModelProto:
    graph.cleanup().toposort()
    assert_dedicated_dq(graph)
    if graph.opset < min_opset:
        raise RuntimeError(f"finalize: opset {graph.opset} < {min_opset}; canonicalize should have raised it")
    graph.producer_name = PRODUCER
    model = export_model(graph)
    # a model still referring to the input's external data is checked by path when it is saved
    if not external_tensors(model) and model_size(model) <= EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model)
    return model
