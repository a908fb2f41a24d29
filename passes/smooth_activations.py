"""SmoothQuant: move activation outlier channels into the weight, per site (per segment after SegLinear).

    MatMul(X, W)  ->  MatMul(Mul(X, 1/s), s * W)          s: one value per input channel k
    Gemm(A, B, C) ->  Gemm(Mul(A, 1/s), B * s, C)         (s over B's K axis, whichever transB)

Exact in float. The smoothing vector and whether to smooth at all (alpha searched per site) come
from solve; this pass only rewrites. Sites that read the same tensor (q/k/v projections, SegLinear
output segments) each get their own Mul, hence their own smoothed input and activation scale.
Folding 1/s into a preceding LayerNorm/affine is not done: the Mul stays (it sits before the
QuantizeLinear, so it does not break TensorRT's DQ -> GEMM fusion).

Rewrite only (its detect is the identity). Runs after the outlier split and before DualScale and
Q/DQ insertion; returns the sites as they read now (activation = the Mul output, weight = the
smoothed weight).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from segquant_onnx.ir.graph_io import constant_values
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.qdq import float_dtype, site_node
from segquant_onnx.ir.linear import scale_input_channels
from segquant_onnx.params import Quantization
from segquant_onnx.passes.base import OUTLIERS_SPLIT, QUANTIZE, SITES_FOUND, SMOOTHED
from segquant_onnx.plan import LinearSite, QuantPlan


class SmoothActivations:
    name = "smooth_activations"
    stage = QUANTIZE
    requires = (SITES_FOUND, OUTLIERS_SPLIT)
    ensures = (SMOOTHED,)

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan:
        return plan

    def rewrite(self, graph: gs.Graph, sites: list[LinearSite], params: Quantization) -> list[LinearSite]:
        """Smooth every site whose SiteParams carry a smoothing vector."""
        params = params.params
        nodes = {n.name: n for n in graph.nodes}
        namer = Namer(graph)
        updated = []
        for site in sites:
            smooth = params[site.name].smooth if site.name in params else None
            if smooth is None or not site.channels_last:  # K must be the activation's last axis
                updated.append(site)
                continue
            node, x, w = site_node(nodes, site, self.name)
            inv = gs.Constant(namer(site.name, "smooth_inv_scale"), (1.0 / smooth).astype(float_dtype(x.dtype)))
            x_s = gs.Variable(namer(site.name, "smoothed_input"), dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Mul", namer(site.name, "smooth"), inputs=[x, inv], outputs=[x_s]))
            w_s = gs.Constant(namer(site.name, "smoothed_weight"),
                              np.ascontiguousarray(scale_input_channels(constant_values(w), site, smooth),
                                                   float_dtype(w.dtype)))
            node.inputs[site.activation_input_index] = x_s
            node.inputs[site.weight_input_index] = w_s
            updated.append(replace(site, activation=x_s.name, weight=w_s.name))
        return updated
