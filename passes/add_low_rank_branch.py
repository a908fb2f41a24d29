"""Low-rank branch (SVDQuant, the SegQuant paper's SVD variant): keep the weight's largest singular directions
in float and quantize only the residual.

    MatMul(X, W)  ->  Add(MatMul(X, R), MatMul(MatMul(X, L1), L2))        W = L1 @ L2 + R,  L1 [K, r], L2 [r, N]
    Gemm(A, B, C) ->  Add(Gemm(A, R, C), MatMul(MatMul(A, L1), L2))       (R in B's layout, whichever transB)

W here is the weight as the site quantizes it: after the outlier split and smoothing (s * W). L1 @ L2 is its
rank-r truncated SVD (solve/low_rank.py), computed by solve and carried in `SiteParams.low_rank`; the two
low-rank GEMMs read the same float activation the quantized GEMM's QuantizeLinear reads, and run in the
graph's float type (its 16-bit rest). The rewrite is exact in float: R = W - L1 @ L2 exactly as stored.
The node keeps its name and the Add takes over its output's name, so the consumers are untouched.

Rewrite only (detect is the identity). Runs after SmoothActivations and before DualScale and the Q/DQ
insertion, which then quantize R (a DualScale site splits its GEMM into two; the branch reads the
activation before that split). Sites with `low_rank` None are left as they are.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from segquant_onnx.ir.graph_io import constant_values
from segquant_onnx.ir.linear import from_kn
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.qdq import float_dtype, site_node
from segquant_onnx.params import Quantization
from segquant_onnx.passes.base import LOW_RANK_SPLIT, QUANTIZE, SMOOTHED
from segquant_onnx.plan import LinearSite, QuantPlan


class AddLowRankBranch:
    name = "add_low_rank_branch"
    stage = QUANTIZE
    requires = (SMOOTHED,)
    ensures = (LOW_RANK_SPLIT,)

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan:
        return plan

    def rewrite(self, graph: gs.Graph, sites: list[LinearSite], params: Quantization) -> list[LinearSite]:
        if not any(p.low_rank is not None for p in params.params.values()):
            return sites  # the graph as it is (a toposort would reorder it: other bytes out)
        nodes = {n.name: n for n in graph.nodes}
        namer = Namer(graph)
        updated = []
        for site in sites:
            p = params.params.get(site.name)
            if p is None or p.low_rank is None:
                updated.append(site)
                continue
            node, x, w = site_node(nodes, site, self.name)
            l1, l2 = p.low_rank
            dtype = float_dtype(w.dtype) or np.dtype(np.float32)
            product = l1.astype(np.float64) @ l2.astype(np.float64)
            product = from_kn(product, site)
            residual = gs.Constant(namer(site.name, "residual_weight"),
                                   np.ascontiguousarray(constant_values(w).astype(np.float64) - product, dtype))
            node.inputs[site.weight_input_index] = residual
            y = node.outputs[0]
            t = gs.Variable(namer(site.name, "low_rank_down"), y.dtype, None)
            lr = gs.Variable(namer(site.name, "low_rank_output"), y.dtype, y.shape)
            graph.nodes.append(gs.Node("MatMul", namer(site.name, "low_rank_l1"),
                                       inputs=[x, gs.Constant(namer(site.name, "low_rank_l1_weight"),
                                                              np.ascontiguousarray(l1, dtype))], outputs=[t]))
            graph.nodes.append(gs.Node("MatMul", namer(site.name, "low_rank_l2"),
                                       inputs=[t, gs.Constant(namer(site.name, "low_rank_l2_weight"),
                                                              np.ascontiguousarray(l2, dtype))], outputs=[lr]))
            quantized_out = gs.Variable(namer(site.name, "residual_output"), y.dtype, y.shape)
            node.outputs[0] = quantized_out
            graph.nodes.append(gs.Node("Add", namer(site.name, "low_rank_add"), inputs=[quantized_out, lr],
                                       outputs=[y]))
            updated.append(site.__class__(**{**vars(site), "weight": residual.name}))
        graph.cleanup().toposort()
        return updated
