"""Finalize: cleanup, topological order, opset, and proof that ONNX accepts the result."""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.ir.graph_io import EXTERNAL_DATA_THRESHOLD, export_model, external_tensors, model_size

log = logging.getLogger(__name__)

PRODUCER = "segquant-onnx"
CALIBRATION_SHAPES_KEY = "segquant_onnx.calibration_shapes"  # metadata_props: `build-trt`'s default profile


def assert_dedicated_dq(graph: gs.Graph) -> None:
    """Every DequantizeLinear output feeds exactly one node (TensorRT cannot share a DQ)."""
    for node in graph.nodes:
        if node.op == "DequantizeLinear" and len(node.outputs[0].outputs) > 1:
            raise RuntimeError(f"finalize: {node.name} feeds {len(node.outputs[0].outputs)} consumers")


def shapes_text(shapes: dict[str, tuple[int, ...]]) -> str:
    """{"hidden_states": (2, 4, 16, 16), "timestep": (2,)} -> `hidden_states:2x4x16x16,timestep:2`, the
    `build-trt --shapes` syntax. Rank-0 inputs are left out: they are static, and the syntax has no
    empty shape."""
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes.items() if shape)


def finalize(graph: gs.Graph, min_opset: int = 13,
             calibration_shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """The model to write. `calibration_shapes` (the first calibration feed's input shapes) go into its
    metadata, so `build-trt` can make the optimization profile of a dynamic model without --shapes."""
    graph.cleanup().toposort()
    assert_dedicated_dq(graph)
    if graph.opset < min_opset:
        raise RuntimeError(f"finalize: opset {graph.opset} < {min_opset}; canonicalize should have raised it")
    graph.producer_name = PRODUCER
    model = export_model(graph)
    recorded = shapes_text(calibration_shapes or {})
    if recorded:
        model.metadata_props.add(key=CALIBRATION_SHAPES_KEY, value=recorded)
    # a model still referring to the input's external data is checked by path when it is saved
    if not external_tensors(model) and model_size(model) <= EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model)
    return model
