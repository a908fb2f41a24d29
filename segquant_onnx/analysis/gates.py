"""Analysis gates: each quantized input of a site blended with its float value by the site's gate.

    consumer(DQ(Q(x)))       -> consumer(x + g * (DQ(Q(x)) - x))           g: graph input `gate/<site>`
    consumer(DQ(Wq, s_w))    -> consumer(W + g * (DQ(Wq, s_w) - W))        W: a float copy of the weight

At g = 0 a site computes in float, at g = 1 exactly as in the production graph, so one session
evaluates any subset of sites quantized by feeding the gates (sensitivity ranking, fallback search).
Applied after the production rewrite, to the inputs it reports (rewrite.apply_quantization): the
passes and ir/qdq.py know nothing of gates. Inputs of one site that replaced the same float weight
read one blend: DualScale's two branches share it, so at g = 0 relu(A) @ W + min(A, 0) @ W = A @ W.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.ir.graph_io import constant_values
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.qdq import QuantizedInput, float_dtype
from segquant_onnx.params import Quantization
from segquant_onnx.plan import QuantPlan
from segquant_onnx.rewrite import apply_quantization


def gate_name(site: str) -> str:
    return f"gate/{site}"


def gated_graph(graph: gs.Graph, plan: QuantPlan, q: Quantization) -> gs.Graph:
    """A copy of `graph` (canonical and SegLinear-split, not quantized) quantized as `q` says, with one
    gate per site of `plan`."""
    analysis = graph.copy()
    add_gates(analysis, apply_quantization(analysis, plan, q), [s.name for s in plan.sites])
    return analysis


def add_gates(graph: gs.Graph, quantized: Mapping[str, Sequence[QuantizedInput]],
              sites: Sequence[str]) -> dict[str, gs.Variable]:
    """Add the graph inputs `gate/<site>` (scalar float32, in the order of `sites`) and blend every
    quantized input of those sites by its gate. Each blend goes right after its DequantizeLinear in
    the node list; `graph` is left cleaned up. Returns the gates by site."""
    gates = {name: gs.Variable(gate_name(name), np.float32, shape=[]) for name in sites}
    graph.inputs.extend(gates.values())
    namer = Namer(graph)
    after: dict[int, list[gs.Node]] = {}  # id(DequantizeLinear node) -> the blend nodes that follow it
    for name, gate in gates.items():
        blends: dict[int, gs.Variable] = {}  # id(float tensor replaced) -> its blend, shared within a site
        for qi in quantized.get(name, ()):
            if id(qi.original) not in blends:
                exact = qi.original
                if isinstance(exact, gs.Constant):  # a weight: blend with a float copy of it
                    values = constant_values(exact).astype(float_dtype(qi.dequantized.dtype) or np.float32)
                    exact = gs.Constant(namer(qi.layer, f"{qi.part}_float"), np.require(values, requirements="C"))
                out, nodes = _blend(namer, qi.layer, qi.part, exact, qi.dequantized, gate)
                after.setdefault(id(qi.dequantized.inputs[0]), []).extend(nodes)
                blends[id(qi.original)] = out
            qi.consumer.inputs[qi.index] = blends[id(qi.original)]
    graph.nodes = [m for n in graph.nodes for m in (n, *after.get(id(n), ()))]
    graph.cleanup()
    return gates


def typed_gate(namer: Namer, prefix: str, gate: gs.Variable, dtype) -> tuple[gs.Tensor, list[gs.Node]]:
    """The float32 gate as `dtype` (a Cast where that is float16: Mul needs one type), and the nodes."""
    dtype = float_dtype(dtype) or np.dtype(np.float32)
    if dtype == np.float32:
        return gate, []
    typed = gs.Variable(namer(prefix, "gate_typed"), dtype=dtype, shape=[])
    to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    return typed, [gs.Node("Cast", namer(prefix, "gate_cast"), {"to": to}, inputs=[gate], outputs=[typed])]


def _blend(namer: Namer, layer: str, part: str, exact: gs.Tensor, quantized: gs.Variable,
           gate: gs.Variable) -> tuple[gs.Variable, list[gs.Node]]:
    """exact + gate * (quantized - exact), and the nodes that compute it (the float32 gate cast to the
    site's type first where that is float16)."""
    dtype = float_dtype(quantized.dtype) or np.dtype(np.float32)
    diff = gs.Variable(namer(layer, f"{part}_quant_error"), dtype=dtype)
    scaled = gs.Variable(namer(layer, f"{part}_gated_error"), dtype=dtype)
    out = gs.Variable(namer(layer, f"{part}_gated"), dtype=dtype, shape=quantized.shape)
    gate, cast = typed_gate(namer, f"{layer}/{part}", gate, dtype)
    return out, [*cast, gs.Node("Sub", namer(layer, f"{part}_gate_sub"), inputs=[quantized, exact], outputs=[diff]),
                 gs.Node("Mul", namer(layer, f"{part}_gate_mul"), inputs=[diff, gate], outputs=[scaled]),
                 gs.Node("Add", namer(layer, f"{part}_gate_add"), inputs=[exact, scaled], outputs=[out])]
