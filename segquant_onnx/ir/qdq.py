"""Building blocks for Q/DQ insertion in an onnx-graphsurgeon graph (used by the passes' rewrites).

Every Q/DQ written here is symmetric (zero point 0 of the quantized dtype), carries an explicit
`axis`, and feeds exactly one consumer input (TensorRT cannot share a DQ between consumers).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from segquant_onnx.ir.naming import Namer


def site_node(nodes: dict[str, gs.Node], site, pass_name: str) -> tuple[gs.Node, gs.Tensor, gs.Tensor]:
    """(node, activation input, weight input) of a LinearSite; raises if a rewrite changed them."""
    node = nodes[site.name]
    x, w = node.inputs[site.activation_input_index], node.inputs[site.weight_input_index]
    if x.name != site.activation or w.name != site.weight:
        raise RuntimeError(f"{pass_name}: site {site.name} no longer matches the plan")
    return node, x, w


def _const(namer: Namer, layer: str, part: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(namer(layer, part), np.require(values, requirements='C'))  # keeps 0-d scalars 0-d


def gated(graph: gs.Graph, namer: Namer, layer: str, part: str, exact: gs.Tensor, quantized: gs.Variable,
          gate: gs.Tensor) -> gs.Variable:
    """exact + gate * (quantized - exact): the float value at gate 0, the quantized one at gate 1.

    Only in analysis graphs (sensitivity, fallback search), where one session evaluates any subset
    of sites quantized by feeding the gates.
    """
    diff = gs.Variable(namer(layer, f"{part}_quant_error"), dtype=np.float32)
    scaled = gs.Variable(namer(layer, f"{part}_gated_error"), dtype=np.float32)
    out = gs.Variable(namer(layer, f"{part}_gated"), dtype=np.float32, shape=quantized.shape)
    graph.nodes.append(gs.Node("Sub", namer(layer, f"{part}_gate_sub"), inputs=[quantized, exact], outputs=[diff]))
    graph.nodes.append(gs.Node("Mul", namer(layer, f"{part}_gate_mul"), inputs=[diff, gate], outputs=[scaled]))
    graph.nodes.append(gs.Node("Add", namer(layer, f"{part}_gate_add"), inputs=[exact, scaled], outputs=[out]))
    return out


def quantize_activation_input(graph: gs.Graph, namer: Namer, layer: str, consumer: gs.Node,
                              index: int, scale: float, part: str = "input",
                              gate: gs.Tensor | None = None) -> gs.Variable:
    """consumer.inputs[index] = DQ(Q(x, scale), scale), per tensor; returns the DQ output.
    With `gate`, the consumer reads gated(x, DQ(Q(x))) instead (analysis graphs only)."""
    x = consumer.inputs[index]
    s = _const(namer, layer, f"{part}_scale", np.array(scale, np.float32))
    zp = _const(namer, layer, f"{part}_zero_point", np.array(0, np.int8))
    q_out = gs.Variable(namer(layer, f"{part}_quantized"), dtype=np.int8, shape=x.shape)
    dq_out = gs.Variable(namer(layer, f"{part}_dequantized"), dtype=np.float32, shape=x.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", namer(layer, f"{part}_q"), {"axis": 1},
                               inputs=[x, s, zp], outputs=[q_out]))
    graph.nodes.append(gs.Node("DequantizeLinear", namer(layer, f"{part}_dq"), {"axis": 1},
                               inputs=[q_out, s, zp], outputs=[dq_out]))
    consumer.inputs[index] = dq_out if gate is None else gated(graph, namer, layer, part, x, dq_out, gate)
    return dq_out


def dequantized_weight_input(graph: gs.Graph, namer: Namer, layer: str, consumer: gs.Node, index: int,
                             weight_q: np.ndarray, scale: np.ndarray, axis: int,
                             part: str = "weight", gate: gs.Tensor | None = None,
                             weight_float: np.ndarray | None = None) -> gs.Variable:
    """consumer.inputs[index] = DQ(weight_q, scale, axis): INT8 stored, per output channel.
    With `gate`, the consumer reads gated(weight_float, DQ(weight_q)) instead (analysis graphs only)."""
    wq = _const(namer, layer, f"{part}_quantized", weight_q.astype(np.int8))
    s = _const(namer, layer, f"{part}_scale", scale.astype(np.float32))
    zp = _const(namer, layer, f"{part}_zero_point", np.zeros(scale.shape, np.int8))
    out = gs.Variable(namer(layer, f"{part}_dequantized"), dtype=np.float32, shape=list(weight_q.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", namer(layer, f"{part}_dq"), {"axis": axis},
                               inputs=[wq, s, zp], outputs=[out]))
    if gate is None:
        consumer.inputs[index] = out
    else:
        exact = _const(namer, layer, f"{part}_float", weight_float.astype(np.float32))
        consumer.inputs[index] = gated(graph, namer, layer, part, exact, out, gate)
    return out
