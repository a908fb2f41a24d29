"""Quantize the attention products (`--quantize-attention`): per-tensor Q/DQ on both inputs of every
activation x activation MatMul that FindLinearSites declined as one (Q @ K^T and softmax @ V).

    MatMul(a, b) -> MatMul(DQ(Q(a, s_a), s_a), DQ(Q(b, s_b), s_b))

This is the placement TensorRT's fused multi-head-attention kernels take in explicit quantization (its
developer guide: Q/DQ before both batched GEMMs of MHA; the scales of the softmax output and of V feed the
second). Scales come from each input's calibrated abs-max (`fit`), in the run's format: FP8 is what the
fused FP8 MHA kernels run; with INT8 the same graph is valid but TensorRT's INT8 MHA fusion is narrower.
Activations of both exporters are matched the same way: by the decline FindLinearSites already wrote.
"""

from __future__ import annotations

from dataclasses import replace

import onnx_graphsurgeon as gs

from segquant_onnx.formats import scheme_of
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.qdq import quantize_activation_input
from segquant_onnx.params import Quantization
from segquant_onnx.passes.base import ATTENTION_QUANTIZED, QUANTIZE, QUANTIZED, SITES_FOUND
from segquant_onnx.plan import AttentionSite, LinearSite, QuantPlan

ATTENTION_REASON = "activation x activation product"  # FindLinearSites' decline of such a MatMul


class QuantizeAttention:
    name = "quantize_attention"
    stage = QUANTIZE
    requires = (SITES_FOUND, QUANTIZED)
    ensures = (ATTENTION_QUANTIZED,)

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan:
        if not self.enabled:
            return plan
        nodes = {n.name: n for n in graph.nodes}
        found = []
        for d in plan.declined:
            node = nodes.get(d.name)
            if node is None or node.op != "MatMul" or not d.reason.startswith(ATTENTION_REASON):
                continue
            a, b = node.inputs[:2]
            found.append(AttentionSite(node.name, (a.name, b.name)))
        return replace(plan, attention=plan.attention + tuple(found))

    def rewrite(self, graph: gs.Graph, sites: list[LinearSite], params: Quantization) -> list[LinearSite]:
        """Q/DQ on both inputs of every attention product `params.attention` has scales for."""
        if not params.attention:
            return sites
        nodes = {n.name: n for n in graph.nodes}
        namer = Namer(graph)
        for name, scales in params.attention.items():
            node = nodes[name]
            for index, (part, scale) in enumerate(zip(("a", "b"), scales)):
                quantize_activation_input(graph, namer, name, node, index, scale, part=f"input_{part}",
                                          fmt=scheme_of(params.format).activations)
        graph.cleanup().toposort()
        return sites
