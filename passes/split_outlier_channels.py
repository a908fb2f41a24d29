"""Outlier-channel segments: a few input channels with huge ranges run in float beside the INT8 GEMM.

    MatMul(X, W) -> Add(MatMul(Mul(X, m), W_bulk),  MatMul(Gather(X, idx, axis=-1), W[idx]))
                          ^ INT8 site (Q/DQ later)    ^ float, k = len(idx) channels
    Gemm(A, B, C) -> Add(Gemm(Mul(A, m), B_bulk, C), MatMul(Gather(A, idx), B[idx] as [k, N]))
    Conv(X, W, b) -> Add(Conv(Mul(X, m[1, C, 1, 1]), W_bulk, b), Conv(Gather(X, idx, axis=1), W[:, idx]))
                     (group 1; the channel statistics of a tensor only Convs read run over axis 1)

`idx` are the outlier channels chosen from calibration statistics (solve.choose_outliers), `m` is
1 on the bulk and 0 on `idx`, and W_bulk is W with the rows `idx` zeroed. Exact in float.

Why this form for TensorRT: the INT8 GEMM keeps its full, aligned K (a second Gather for the bulk
would make K ragged, e.g. 1532, and copy the activation); the mask is an elementwise Mul *before*
the QuantizeLinear, which TensorRT fuses into the producer, and it removes the outliers from the
tensor whose per-tensor scale is computed; zeroed weight rows keep the per-channel weight scales
free of them. The float branch is a skinny GEMM (K = a handful of channels) whose output is added
to the INT8 GEMM's output, which TensorRT can fuse as a residual into its epilogue. Its cost is
reported (float FLOPs) and capped by a budget.

Rewrite only (its detect is the identity). Runs after SegLinear and before SmoothQuant, DualScale
and Q/DQ insertion (they all act on the bulk); returns the sites as they read now (activation = the
masked input, weight = the bulk weight).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from segquant_onnx.ir.graph_io import constant_values
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.qdq import float_dtype, site_node
from segquant_onnx.ir.linear import input_channel_axis, input_channels, is_conv, weight_is_nk, zero_input_channels
from segquant_onnx.params import Quantization
from segquant_onnx.passes.base import OUTLIERS_SPLIT, QUANTIZE, SITES_FOUND
from segquant_onnx.plan import LinearSite, QuantPlan


class SplitOutlierChannels:
    name = "split_outlier_channels"
    stage = QUANTIZE
    requires = (SITES_FOUND,)
    ensures = (OUTLIERS_SPLIT,)

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan:
        return plan

    def rewrite(self, graph: gs.Graph, sites: list[LinearSite], params: Quantization) -> list[LinearSite]:
        """Split the channels `params.outliers` names off every site that has some."""
        outliers = params.outliers
        nodes = {n.name: n for n in graph.nodes}
        namer = Namer(graph)
        updated = []
        for site in sites:
            idx = outliers.get(site.name)
            if idx is None or not len(idx):
                updated.append(site)
                continue
            node, x, w = site_node(nodes, site, self.name)
            w_full = constant_values(w)
            k = input_channels(site)
            mask = np.ones(k, float_dtype(x.dtype))
            mask[idx] = 0
            if is_conv(site):  # channels on axis 1 of N, C, spatial...
                mask = mask.reshape([1, k] + [1] * (w_full.ndim - 2))
            layer = f"{site.name}/outliers"
            x_m = gs.Variable(namer(site.name, "bulk_input"), dtype=x.dtype, shape=x.shape)
            graph.nodes.append(gs.Node("Mul", namer(site.name, "bulk_mask"),
                                       inputs=[x, gs.Constant(namer(site.name, "bulk_mask_values"), mask)],
                                       outputs=[x_m]))
            w_b = gs.Constant(namer(site.name, "bulk_weight"),
                              np.ascontiguousarray(zero_input_channels(w_full, site, idx), float_dtype(w.dtype)))
            x_o = gs.Variable(namer(layer, "input"), dtype=x.dtype)
            y_o = gs.Variable(namer(layer, "output"), dtype=x.dtype)
            graph.nodes.append(gs.Node("Gather", namer(layer, "gather"), {"axis": 1 if is_conv(site) else -1},
                                       inputs=[x, gs.Constant(namer(layer, "channels"), idx.astype(np.int64))],
                                       outputs=[x_o]))
            if is_conv(site):  # the same (transposed) convolution over the outlier input channels, no bias
                w_o = np.ascontiguousarray(np.take(w_full, idx, axis=input_channel_axis(site)), float_dtype(w.dtype))
                graph.nodes.append(gs.Node(site.op, namer(layer, site.op), dict(node.attrs),
                                           inputs=[x_o, gs.Constant(namer(layer, "weight"), w_o)], outputs=[y_o]))
            else:  # the outlier channels' rows of W as a [k, N] matrix
                w_o = w_full[:, idx].T if weight_is_nk(site) else w_full[idx]
                if site.op == "Gemm":
                    w_o = w_o * float(node.attrs.get("alpha", 1.0))  # Gemm scales A @ B by alpha
                graph.nodes.append(gs.Node("MatMul", namer(layer, "MatMul"),
                                           inputs=[x_o, gs.Constant(namer(layer, "weight"),
                                                                    np.ascontiguousarray(w_o, float_dtype(w.dtype)))],
                                           outputs=[y_o]))
            y = node.outputs[0]
            y_bulk = gs.Variable(namer(site.name, "bulk_output"), dtype=y.dtype, shape=y.shape)
            node.outputs[0] = y_bulk
            graph.nodes.append(gs.Node("Add", namer(site.name, "outlier_add"), inputs=[y_bulk, y_o], outputs=[y]))
            node.inputs[site.activation_input_index] = x_m
            node.inputs[site.weight_input_index] = w_b
            updated.append(replace(site, activation=x_m.name, weight=w_b.name))
        return updated
