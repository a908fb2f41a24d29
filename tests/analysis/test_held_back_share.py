"""Analysis sessions share a weight's repeated DequantizeLinear (held_back.share_dequantize)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from segquant_onnx.analysis.held_back import share_dequantize
from segquant_onnx.ir.graph_io import export_model


def _graph():
    """Two MatMuls each dequantizing the same INT8 weight (DualScale's form), a third with another axis."""
    w = gs.Constant("w_q", np.arange(-6, 6, dtype=np.int8).reshape(3, 4))
    scale, zero = gs.Constant("w_s", np.array([0.5, 0.25, 1.0, 2.0], np.float32)), gs.Constant("w_z", np.zeros(4, np.int8))
    x = gs.Variable("x", np.float32, (2, 3))
    outs, nodes = [], []
    for i, axis in enumerate((1, 1, 1)):
        dq = gs.Variable(f"dq{i}", np.float32, (3, 4))
        y = gs.Variable(f"y{i}", np.float32, (2, 4))
        nodes += [gs.Node("DequantizeLinear", f"dq_node{i}", {"axis": axis}, [w, scale, zero], [dq]),
                  gs.Node("MatMul", f"mm{i}", inputs=[x, dq], outputs=[y])]
        outs.append(y)
    other_scale = gs.Constant("w_s2", np.array([1.0, 1.0, 1.0], np.float32))
    dq3 = gs.Variable("dq3", np.float32, (3, 4))
    y3 = gs.Variable("y3", np.float32, (2, 4))
    nodes += [gs.Node("DequantizeLinear", "dq_node3", {"axis": 0}, [w, other_scale, gs.Constant("z3", np.zeros(3, np.int8))], [dq3]),
              gs.Node("MatMul", "mm3", inputs=[x, dq3], outputs=[y3])]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[*outs, y3], opset=17)


def test_repeated_dequantize_is_shared_and_the_outputs_are_the_same():
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    run = lambda g: ort.InferenceSession(export_model(g).SerializeToString(),  # noqa: E731
                                         providers=["CPUExecutionProvider"]).run(None, {"x": x})
    before = run(_graph())
    graph = _graph()
    assert share_dequantize(graph) == 2  # dq_node1 and dq_node2 repeat dq_node0; dq_node3 has other inputs
    graph.cleanup()
    dqs = [n for n in graph.nodes if n.op == "DequantizeLinear"]
    assert [n.name for n in dqs] == ["dq_node0", "dq_node3"]
    assert {n.name: n.inputs[1].name for n in graph.nodes if n.op == "MatMul"} == {
        "mm0": "dq0", "mm1": "dq0", "mm2": "dq0", "mm3": "dq3"}
    for a, b in zip(before, run(graph)):
        np.testing.assert_array_equal(a, b)
