"""Lay the W4A8 linears out as TensorRT builds them: a 2-D activation times a [K, N] weight.

    MatMul(X[..., K], W[K, N])          -> Reshape(MatMul(Reshape(X, [-1, K]), W), [..., N])
    Gemm(A[M, K], B, C, transB)         -> Add(MatMul(A, B^T if transB else B), C)      (alpha = beta = 1)

Why: TensorRT-RTX 1.7 builds an INT4 block weight (DequantizeLinear with block_size) next to an INT8
activation Q/DQ only as a MatMul of a 2-D activation with a [K, N] weight. With a 3-D activation, or as a
Gemm, its builder fails with "MyelinCheckException: operand.h:524: CHECK(is_constant()) failed". We measured
this on small fp16 and fp32 graphs (README "Precisions"); the `block` rule of `check-trt` flags those forms.
The rewrite is exact in float: reshapes, and Gemm's bias as an Add, which TensorRT fuses into the GEMM's
epilogue. The node keeps its name, so --exclude patterns and reports still refer to it.

Preconditions: the graph is canonicalized, so shapes are inferred and the opset is at least 21 (INT4 raised it;
Shape's `end` needs 15). SegLinear has split the graph. Declined, each with a reason: Gemm with transA,
or with alpha or beta other than 1. Runs at the plan stage, between SplitLinearBySegment and FindLinearSites,
and only for `--precision w4a8` (`enabled`). The sites are then found on the new MatMuls, and calibration
observes their 2-D inputs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from segquant_onnx.ir.graph_io import constant_values
from segquant_onnx.ir.linear import is_linear, n_out, trans_b
from segquant_onnx.ir.naming import Namer
from segquant_onnx.passes.base import CANONICAL, LAID_OUT, PLAN, SEGMENTS_SPLIT
from segquant_onnx.plan import DeclinedSite, QuantPlan


class FlattenLinearsTo2D:
    name = "flatten_linears_to_2d"
    stage = PLAN
    plan_field = "flattened"  # what detect found and the plan-stage rewrite acts on
    requires = (CANONICAL, SEGMENTS_SPLIT)
    ensures = (LAID_OUT,)

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    def check(self, node: gs.Node) -> bool | str:
        """True when the node must be rewritten, a reason when it cannot be, False when it is fine as is."""
        if not is_linear(node):
            return False
        if node.op == "Gemm":
            a = node.attrs
            if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                return "Gemm with transA, alpha or beta is kept as it is; TensorRT may not build its INT4 weight"
            return True
        x = node.inputs[0]
        return x.shape is not None and len(x.shape) > 2

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan:
        if not self.enabled:
            return plan
        found, declined = [], []
        for node in graph.nodes:
            result = self.check(node)
            if result is True:
                found.append(node.name)
            elif isinstance(result, str):
                declined.append(DeclinedSite(node.name, node.op, result))
        return replace(plan, flattened=plan.flattened + tuple(found), declined=plan.declined + tuple(declined))

    def rewrite(self, graph: gs.Graph, sites: list[str], params=None) -> list[str]:
        if not sites:
            return sites  # the graph as it is (a toposort would reorder it: other bytes out)
        nodes = {n.name: n for n in graph.nodes}
        namer = Namer(graph)
        for name in sites:
            node = nodes[name]
            if self.check(node) is not True:
                raise RuntimeError(f"{self.name}: {name} no longer matches the plan")
            if node.op == "Gemm":
                self._gemm(graph, namer, node)
            else:
                self._matmul(graph, namer, node)
        graph.cleanup().toposort()
        return sites

    @staticmethod
    def _gemm(graph: gs.Graph, namer: Namer, node: gs.Node) -> None:
        w = node.inputs[1]
        if trans_b(node):
            w = gs.Constant(namer(node.name, "weight_kn"), np.ascontiguousarray(constant_values(w).T))
        y = node.outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if bias is not None and getattr(bias, "name", ""):
            product = gs.Variable(namer(node.name, "product"), y.dtype, y.shape)
            graph.nodes.append(gs.Node("Add", namer(node.name, "bias_add"), inputs=[product, bias], outputs=[y]))
            y = product
        node.op, node.attrs, node.inputs, node.outputs = "MatMul", {}, [node.inputs[0], w], [y]

    @staticmethod
    def _matmul(graph: gs.Graph, namer: Namer, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        k, n = int(node.inputs[1].shape[0]), n_out(node)
        lead = list(x.shape[:-1])
        rows = int(np.prod(lead)) if all(isinstance(d, int) for d in lead) else None
        x2 = gs.Variable(namer(node.name, "input_2d"), x.dtype, [rows if rows is not None else "rows", k])
        graph.nodes.append(gs.Node("Reshape", namer(node.name, "flatten"),
                                   inputs=[x, gs.Constant(namer(node.name, "flat_shape"), np.array([-1, k], np.int64))],
                                   outputs=[x2]))
        if rows is not None:
            shape = gs.Constant(namer(node.name, "output_shape"), np.array([*lead, n], np.int64))
        else:  # dynamic leading dims: read them from X at run time
            prefix = gs.Variable(namer(node.name, "lead_shape"), np.int64, [len(lead)])
            graph.nodes.append(gs.Node("Shape", namer(node.name, "lead"), {"end": -1}, inputs=[x], outputs=[prefix]))
            shape = gs.Variable(namer(node.name, "output_shape"), np.int64, [len(lead) + 1])
            graph.nodes.append(gs.Node("Concat", namer(node.name, "output_shape_concat"), {"axis": 0},
                                       inputs=[prefix, gs.Constant(namer(node.name, "n"), np.array([n], np.int64))],
                                       outputs=[shape]))
        y2 = gs.Variable(namer(node.name, "output_2d"), y.dtype, [rows if rows is not None else "rows", n])
        node.inputs[0], node.outputs[0] = x2, y2
        graph.nodes.append(gs.Node("Reshape", namer(node.name, "unflatten"), inputs=[y2, shape], outputs=[y]))
