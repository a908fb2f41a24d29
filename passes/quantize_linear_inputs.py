"""Quantize the inputs of every linear site (W8A8, TensorRT explicit-quantization placement).

    MatMul(X, W)      -> MatMul(DQ(Q(X, s_x)), DQ(Wq, s_w, axis=1))
    Gemm(A, B, C)     -> Gemm(DQ(Q(A, s_a)), DQ(Bq, s_b, axis=0 if transB else 1), C)
    Conv(X, W, b)     -> Conv(DQ(Q(X, s_x)), DQ(Wq, s_w, axis=0), b)
    W4A16:  MatMul(X, W) -> MatMul(X, DQ(Wq_int4, s_w[nb, N], axis=0, block_size=B))   (weight only)

Rewrite only (its detect is the identity: FindLinearSites found the sites). Activations per tensor,
weights per output channel, stored as INT8 initializers; bias stays float; nothing is placed on
outputs. Preconditions: the sites are found and the DualScale sites already carry their Q/DQ (this
pass skips them). Runs last: it quantizes whatever linears the other passes left or created, and
reports every input it quantized (QuantizedSite.quantized), which the analysis gates blend.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from segquant_onnx.formats import scheme_of
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.qdq import quantize_activation_input, site_node, stored_weight_input
from segquant_onnx.ir.weights import StoredWeights
from segquant_onnx.params import Quantization
from segquant_onnx.passes.base import DUAL_QUANTIZED, QUANTIZE, QUANTIZED, SITES_FOUND, QuantizedSite
from segquant_onnx.plan import LinearSite, QuantPlan


class QuantizeLinearInputs:
    name = "quantize_linear_inputs"
    stage = QUANTIZE
    requires = (SITES_FOUND, DUAL_QUANTIZED)
    ensures = (QUANTIZED,)

    def __init__(self, stored: StoredWeights | None = None):
        self.stored = stored  # the run's quantized weights to reuse (ir/weights.py StoredWeights)

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan:
        return plan

    def rewrite(self, graph: gs.Graph, sites: list[LinearSite], params: Quantization) -> list[LinearSite]:
        """Q/DQ on the activation and weight of every site that is not a DualScale site."""
        nodes = {n.name: n for n in graph.nodes}
        namer = Namer(graph)
        updated = []
        for site in sites:
            if site.name in params.dual:
                updated.append(site)
                continue
            node, _, _ = site_node(nodes, site, self.name)
            p = params.params[site.name]
            scheme = scheme_of(params.format)
            act = () if scheme.activations is None else (quantize_activation_input(
                graph, namer, site.name, node, site.activation_input_index, p.act_scale, fmt=scheme.activations),)
            weight = stored_weight_input(graph, namer, site.name, node, site.weight_input_index, p.weight_scale,
                                         site.weight_axis, scheme.weights, p.rounded, stored=self.stored)
            updated.append(QuantizedSite.of(site, (*act, weight)))
        graph.cleanup()
        return updated
