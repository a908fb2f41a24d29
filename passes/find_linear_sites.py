"""Find the linear sites: every MatMul/Gemm/Conv/ConvTranspose with a constant weight and a float activation.

    MatMul(X, W[K, N])                 -> LinearSite(weight_axis=1)
    Gemm(A, B, C, transB)              -> LinearSite(weight_axis=0 if transB else 1)
    Conv(X, W[N, C, ...], b)           -> LinearSite(weight_axis=0)
    ConvTranspose(X, W[C, N, ...], b)  -> LinearSite(weight_axis=0): TensorRT takes a deconvolution's weight
                                          scales on axis 0 only, its input channels (TENSORRT.md)
    anything else linear-looking       -> DeclinedSite(reason)

Detect only (its rewrite is the identity): the sites are what the later passes act on and what
QuantizeLinearInputs gives Q/DQ. Declined, each with its reason: activation x activation products
(attention), a constant on the left, --exclude matches, non-float dtypes, depthwise Conv, grouped
ConvTranspose, and under INT4 weight blocks (`block_size`) Conv/ConvTranspose and K without a whole block.
Preconditions: the graph is canonicalized (constants folded, so a Transpose of a
weight is already a constant; shapes inferred) and SegLinear has split it (its segments are sites
of their own). Runs right after SplitLinearBySegment and FlattenLinearsTo2D.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.formats import MIN_BLOCK, site_block
from segquant_onnx.ir.linear import trans_b
from segquant_onnx.ir.qdq import float_dtype
from segquant_onnx.passes.base import CANONICAL, QUANTIZE, SEGMENTS_SPLIT, SITES_FOUND
from segquant_onnx.plan import DeclinedSite, LinearSite, QuantPlan


def _name(dtype) -> str:
    """numpy's name of a dtype; onnx-graphsurgeon keeps types numpy lacks (bfloat16) as ONNX type numbers."""
    if isinstance(dtype, (type, np.dtype)):
        return np.dtype(dtype).name
    return onnx.helper.tensor_dtype_to_string(dtype).removeprefix("TensorProto.").lower() if dtype else "unknown"


def _volume(shape) -> int:
    """Product of the known dims (unknown/dynamic dims count as 1)."""
    return int(np.prod([d for d in (shape or ()) if isinstance(d, int) and d > 0], dtype=np.int64))


def _gemm_flops(x: gs.Tensor, k: int, n: int) -> int:
    rows = _volume(x.shape[:-1]) if x.shape else 1
    return 2 * rows * k * n


def _window(node: gs.Node, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A group-1 2-D Conv's window for LinearSite.patches, or () (other ranks, groups, or an auto_pad: their
    weights are rounded to nearest under --weight-rounding gptq)."""
    if len(shape) != 4 or int(node.attrs.get("group", 1)) != 1 or node.attrs.get("auto_pad", "NOTSET") not in (
            "NOTSET", b"NOTSET", "VALID", b"VALID"):
        return ()
    strides = tuple(node.attrs.get("strides", (1, 1)))
    pads = tuple(node.attrs.get("pads", (0, 0, 0, 0)))
    dilations = tuple(node.attrs.get("dilations", (1, 1)))
    return tuple(int(v) for v in (*shape[2:], *strides, *pads, *dilations))


class FindLinearSites:
    name = "find_linear_sites"
    stage = QUANTIZE
    requires = (CANONICAL, SEGMENTS_SPLIT)
    ensures = (SITES_FOUND,)

    def __init__(self, exclude: tuple[str, ...] = (), block_size: int | None = None):
        self.exclude = tuple(re.compile(p) for p in exclude)
        self.block_size = block_size  # INT4 block scales: 2-D weights only, K in whole blocks

    # -- match + check -------------------------------------------------------------------------
    def check(self, node: gs.Node) -> LinearSite | str | None:
        """A LinearSite, a reason string when the node looks linear but is declined, or None."""
        if node.op not in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            return None
        if len(node.inputs) < 2:
            return None
        x, w = node.inputs[0], node.inputs[1]
        if not isinstance(w, gs.Constant):
            if node.op == "MatMul" and isinstance(x, gs.Constant):
                return "constant on the left (W @ X) is not quantized"
            return "activation x activation product (e.g. attention) is not quantized"
        if isinstance(x, gs.Constant):
            return "both inputs are constant"
        for pattern in self.exclude:
            if pattern.search(node.name):
                return f"excluded by --exclude '{pattern.pattern}'"
        if float_dtype(x.dtype) is None or float_dtype(w.dtype) != float_dtype(x.dtype):
            return (f"dtype {_name(x.dtype)}/{_name(w.dtype)}: only float32, float16 and bfloat16 linears "
                    "(activation and weight alike) are quantized")
        shape = tuple(int(d) for d in w.shape)
        if self.block_size is not None and node.op in ("MatMul", "Gemm") and len(shape) == 2:
            k = shape[1] if trans_b(node) else shape[0]
            if site_block(k, self.block_size) is None:
                return (f"K = {k} input channels is not a multiple of {MIN_BLOCK}: no whole INT4 block fits it "
                        "(TensorRT infers the block as K / blocks)")
        if node.op == "MatMul":
            if len(shape) != 2:
                return f"weight has rank {len(shape)}, expected a 2-D [K, N] matrix"
            return LinearSite(node.name, "MatMul", x.name, w.name, shape, 1, _gemm_flops(x, *shape))
        if node.op == "Gemm":
            nk = trans_b(node)
            k, n = (shape[1], shape[0]) if nk else shape
            trans_a = bool(node.attrs.get("transA", 0))
            rows = 2 * _volume(x.shape) * n // max(k, 1) if trans_a and x.shape else _gemm_flops(x, k, n)
            return LinearSite(node.name, "Gemm", x.name, w.name, shape, 0 if nk else 1, rows,
                              channels_last=not trans_a)
        if self.block_size is not None:
            return (f"{node.op} is not quantized to INT4: block scales (w4a16, w4a8) are for the 2-D weights of "
                    "MatMul/Gemm, as TensorRT's INT4 kernels take them")
        if node.op == "ConvTranspose":
            if int(node.attrs.get("group", 1)) != 1:
                return "grouped ConvTranspose is not quantized (not tried with TensorRT's INT8 deconvolution)"
            # each input element meets Cout x kernel weights
            flops = 2 * _volume(x.shape) * _volume(shape[1:]) if x.shape else 2 * _volume(shape)
            return LinearSite(node.name, "ConvTranspose", x.name, w.name, shape, 0, flops, channels_last=False)
        if int(node.attrs.get("group", 1)) == shape[0] and shape[1] == 1 and shape[0] > 1:
            return "depthwise Conv is not quantized (no INT8 speed-up)"
        out = node.outputs[0]
        flops = 2 * _volume(out.shape) * _volume(shape[1:]) if out.shape else 2 * _volume(shape)
        return LinearSite(node.name, "Conv", x.name, w.name, shape, 0, flops, channels_last=False,
                          patches=_window(node, shape))

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan:
        sites, declined = [], []
        for node in graph.nodes:
            result = self.check(node)
            if isinstance(result, LinearSite):
                sites.append(result)
            elif isinstance(result, str):
                declined.append(DeclinedSite(node.name, node.op, result))
        return replace(plan, sites=plan.sites + tuple(sites), declined=plan.declined + tuple(declined))

    def rewrite(self, graph: gs.Graph, sites: list, params) -> list:
        return sites
