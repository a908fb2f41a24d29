"""The one home of linear geometry: which node is a linear, and how its weight is laid out.

Graph side (onnx-graphsurgeon nodes): a linear is a MatMul/Gemm with a constant 2-D weight and a
variable input; Gemm with transB=1 (what PyTorch's Linear exports) stores W as [N, K], everything
else as [K, N]. Site side (a plan's LinearSite and numpy weights): the same layout answered from
`op` and `weight_axis` (the weight's per-channel scale axis: MatMul 1, Gemm transB=1 0 / transB=0 1, Conv 0,
ConvTranspose 0, which is its input channels: TensorRT scales a deconvolution's weight on axis 0 only).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from segquant_onnx.plan import LinearSite


# -- graph nodes ----------------------------------------------------------------------------------
def is_linear(node: gs.Node) -> bool:
    """MatMul/Gemm of a variable input with a constant 2-D weight."""
    return (node.op in ("MatMul", "Gemm") and len(node.inputs) >= 2 and isinstance(node.inputs[1], gs.Constant)
            and not isinstance(node.inputs[0], gs.Constant) and len(node.inputs[1].shape) == 2)


def trans_b(node: gs.Node) -> bool:
    """Whether the node's weight is stored [N, K] (Gemm transB=1)."""
    return node.op == "Gemm" and bool(node.attrs.get("transB", 0))


def n_out(node: gs.Node) -> int:
    w = node.inputs[1].shape
    return w[0] if trans_b(node) else w[1]


def k_in(node: gs.Node) -> int:
    w = node.inputs[1].shape
    return w[1] if trans_b(node) else w[0]


# -- sites and their weights ---------------------------------------------------------------------
CONV_OPS = ("Conv", "ConvTranspose")


def is_conv(site: LinearSite) -> bool:
    """A convolution site: input channels on axis 1 of its N, C, spatial... activation."""
    return site.op in CONV_OPS


def weight_is_nk(site: LinearSite) -> bool:
    """The site's weight is stored [N, K] (Gemm transB=1), not [K, N]."""
    return site.op == "Gemm" and site.weight_axis == 0


def as_kn(w: np.ndarray, site: LinearSite) -> np.ndarray:
    """The weight as a [K, N] matrix; a Conv's [N, C, kh, kw] as [C x kh x kw, N], the order of its input patches'
    rows (calib.observers.RowSample.update_patches)."""
    if site.op == "Conv":
        return w.reshape(w.shape[0], -1).T
    return w.T if weight_is_nk(site) else w


def from_kn(m: np.ndarray, site: LinearSite) -> np.ndarray:
    """A [K, N] matrix back in the site's weight layout (as_kn's inverse)."""
    if site.op == "Conv":
        return m.T.reshape(site.weight_shape)
    return m.T if weight_is_nk(site) else m


def input_channel_axis(site: LinearSite) -> int:
    """The weight axis over input channels: MatMul [K, N] 0, Gemm transB=1 [N, K] 1, Conv [Cout, Cin, ...] 1,
    ConvTranspose [Cin, Cout, ...] 0."""
    return 1 if site.op == "Conv" or weight_is_nk(site) else 0


def input_channels(site: LinearSite) -> int:
    """K: MatMul [K, N] rows, Gemm transB=1 [N, K] columns, Conv [Cout, Cin, ...] and ConvTranspose [Cin, Cout, ...]
    (group 1 only)."""
    return site.weight_shape[input_channel_axis(site)]


def input_channel_amax(w: np.ndarray, site: LinearSite) -> np.ndarray:
    """max |W| per input channel (MatMul/Gemm)."""
    return np.abs(w).max(axis=0 if weight_is_nk(site) else 1)


def scale_input_channels(w: np.ndarray, site: LinearSite, s: np.ndarray | None) -> np.ndarray:
    """s * W along the input-channel axis (SmoothQuant folds its vector into the weight this way)."""
    if s is None:
        return w
    return w * (s[None, :] if weight_is_nk(site) else s[:, None])


def zero_input_channels(w: np.ndarray, site: LinearSite, idx: np.ndarray | None) -> np.ndarray:
    """W with the input channels `idx` zeroed (an outlier split's INT8 bulk)."""
    if idx is None:
        return w
    w = w.copy()
    if input_channel_axis(site) == 1:
        w[:, idx] = 0
    else:
        w[idx] = 0
    return w
