"""Building blocks for Q/DQ insertion in an onnx-graphsurgeon graph (used by the passes' rewrites).

    consumer(x, ...)  -> consumer(DQ(Q(x, s), s), ...)          activation: per tensor
    consumer(W, ...)  -> consumer(DQ(Wq, s_w, axis), ...)       weight: stored quantized, per output channel
    consumer(W, ...)  -> consumer(DQ(Wq, s_w[nb, N], axis=0, block_size=B), ...)   INT4 (MatMul W[K, N]):
                                                                per output channel and per block of B along K

The stored type is the format's (formats.py: INT8, FP8 E4M3FN or INT4, whose zero point's type makes the Q/DQ
that type; INT4 initializers are stored packed, two values a byte). Every Q/DQ written here is symmetric
(zero point 0 of the quantized dtype), carries an explicit
`axis`, and feeds exactly one consumer input (TensorRT cannot share a DQ between consumers). Each
insertion returns a QuantizedInput: what the consumer read before and the DQ output it reads now
(analysis/gates.py builds its blends from these, after the production rewrite).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.formats import INT8, QuantFormat
from segquant_onnx.ir.graph_io import constant_values, packed_constant
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.weights import StoredWeights


@dataclass(frozen=True, eq=False)
class QuantizedInput:
    """One consumer input given Q/DQ: `consumer.inputs[index]` read `original` (a float activation,
    or the float weight constant) and now reads `dequantized`. `layer`/`part` are the name prefix
    the Q/DQ names were built from (`<layer>/<part>_dq`), for names of anything built on it later."""

    layer: str
    part: str
    consumer: gs.Node
    index: int
    original: gs.Tensor
    dequantized: gs.Variable


BYTE_FORMATS = (np.dtype(np.int8), np.dtype(ml_dtypes.float8_e4m3fn))  # stored a value a byte (INT4: packed)


def site_node(nodes: dict[str, gs.Node], site, pass_name: str) -> tuple[gs.Node, gs.Tensor, gs.Tensor]:
    """(node, activation input, weight input) of a LinearSite; raises if a rewrite changed them."""
    node = nodes[site.name]
    x, w = node.inputs[site.activation_input_index], node.inputs[site.weight_input_index]
    if x.name != site.activation or w.name != site.weight:
        raise RuntimeError(f"{pass_name}: site {site.name} no longer matches the plan")
    return node, x, w


BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)  # the float types a site computes in


def float_dtype(dtype) -> np.dtype | None:
    """A tensor's float type as numpy's (bfloat16 as ml_dtypes'; onnx-graphsurgeon keeps it as the ONNX type
    number 16), or None when it is not one of FLOAT_DTYPES."""
    if dtype is None:
        return None
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        dtype = BFLOAT16 if dtype == onnx.TensorProto.BFLOAT16 else onnx.helper.tensor_dtype_to_np_dtype(dtype)
    dtype = np.dtype(dtype)
    return dtype if dtype in FLOAT_DTYPES else None


def scale_values(scale, dtype) -> np.ndarray:
    """`scale` in the site's float type (a DequantizeLinear outputs its scale's type): float32, or float16 /
    bfloat16 rounded to nearest and kept at least that type's smallest normal (a scale must stay > 0 and
    finite). What is stored is what the weights are quantized with."""
    scale = np.asarray(scale, np.float32)
    dtype = float_dtype(dtype) or np.dtype(np.float32)
    if dtype != np.float32:
        info = ml_dtypes.finfo(dtype)
        return np.clip(scale, float(info.tiny), float(info.max)).astype(dtype)
    return scale


def _const(namer: Namer, layer: str, part: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(namer(layer, part), np.require(values, requirements='C'))  # keeps 0-d scalars 0-d


def quantize_activation_input(graph: gs.Graph, namer: Namer, layer: str, consumer: gs.Node,
                              index: int, scale: float, part: str = "input", fmt: QuantFormat = INT8) -> QuantizedInput:
    """consumer.inputs[index] = DQ(Q(x, scale), scale), per tensor."""
    x = consumer.inputs[index]
    dtype = float_dtype(x.dtype) or np.dtype(np.float32)
    s = _const(namer, layer, f"{part}_scale", scale_values(np.array(scale, np.float32), dtype))
    zp = _const(namer, layer, f"{part}_zero_point", fmt.zero())
    q_out = gs.Variable(namer(layer, f"{part}_quantized"), dtype=fmt.dtype, shape=x.shape)
    dq_out = gs.Variable(namer(layer, f"{part}_dequantized"), dtype=dtype, shape=x.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", namer(layer, f"{part}_q"), {"axis": 1},
                               inputs=[x, s, zp], outputs=[q_out]))
    graph.nodes.append(gs.Node("DequantizeLinear", namer(layer, f"{part}_dq"), {"axis": 1},
                               inputs=[q_out, s, zp], outputs=[dq_out]))
    consumer.inputs[index] = dq_out
    return QuantizedInput(layer, part, consumer, index, x, dq_out)


def quantized_weight(w: gs.Constant, scale: np.ndarray, axis: int, fmt: QuantFormat,
                     rounded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(stored weight, scale in the weight's float type): `w` quantized with the scale as it is stored, or
    `rounded` (the weight already on its grid, e.g. by GPTQ) stored with it."""
    s = scale_values(scale, w.dtype)
    values = constant_values(w) if rounded is None else rounded
    if tuple(np.shape(values)) != tuple(w.shape):
        raise RuntimeError(f"rounded weight of {w.name} has shape {np.shape(values)}, the graph's {tuple(w.shape)}")
    return fmt.quantize(np.asarray(values, np.float32), s.astype(np.float32), axis), s


def weight_dq_attrs(weight_q: np.ndarray, scale: np.ndarray, axis: int, fmt: QuantFormat) -> dict:
    """The weight DequantizeLinear's attributes: the output-channel `axis`, or for block scales (the weight's
    rank) the blocked input axis of the 2-D weight and the block size (ONNX blocked quantization, opset 21)."""
    if fmt.block_size is not None and np.ndim(scale) == len(weight_q.shape) == 2:
        k_axis = 1 - axis
        return {"axis": k_axis, "block_size": weight_q.shape[k_axis] // np.shape(scale)[k_axis]}
    return {"axis": axis}


def dequantized_weight_input(graph: gs.Graph, namer: Namer, layer: str, consumer: gs.Node, index: int,
                             weight_q: np.ndarray | gs.ir.tensor.LazyValues, scale: np.ndarray, axis: int,
                             part: str = "weight", fmt: QuantFormat = INT8) -> QuantizedInput:
    """consumer.inputs[index] = DQ(weight_q, scale, axis): stored in the format's type, per output channel
    (or per block: weight_dq_attrs); the DQ outputs the scale's float type (quantized_weight gives both).
    `weight_q` may be lazy values already in the format's type (a stored weight reused: stored_weight_input)."""
    w = consumer.inputs[index]
    if isinstance(weight_q, gs.ir.tensor.LazyValues):  # already stored (StoredWeights)
        wq = gs.Constant(namer(layer, f"{part}_quantized"), weight_q)
        zp = _const(namer, layer, f"{part}_zero_point", fmt.zero(scale.shape))
    elif fmt.dtype in BYTE_FORMATS:
        wq = _const(namer, layer, f"{part}_quantized", weight_q.astype(fmt.dtype))
        zp = _const(namer, layer, f"{part}_zero_point", fmt.zero(scale.shape))
    else:  # sub-byte: packed
        wq = packed_constant(namer(layer, f"{part}_quantized"), weight_q.astype(fmt.dtype))
        zp = packed_constant(namer(layer, f"{part}_zero_point"), fmt.zero(scale.shape))
    s = _const(namer, layer, f"{part}_scale", scale_values(scale, scale.dtype))
    out = gs.Variable(namer(layer, f"{part}_dequantized"), dtype=s.values.dtype, shape=list(weight_q.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", namer(layer, f"{part}_dq"),
                               weight_dq_attrs(weight_q, scale, axis, fmt), inputs=[wq, s, zp], outputs=[out]))
    consumer.inputs[index] = out
    return QuantizedInput(layer, part, consumer, index, w, out)


def stored_weight_input(graph: gs.Graph, namer: Namer, layer: str, consumer: gs.Node, index: int, scale: np.ndarray,
                        axis: int, fmt: QuantFormat = INT8, rounded: np.ndarray | None = None, part: str = "weight",
                        stored: StoredWeights | None = None) -> QuantizedInput:
    """consumer.inputs[index] (a weight constant) = DQ(quantized weight, scale, axis): quantized_weight, then
    dequantized_weight_input. With `stored` (the run's WeightStore.stored), a weight this run already quantized
    with the same scale and spilled is read from the store instead of quantized again (INT8 and FP8: sub-byte
    weights are packed in memory, never spilled; GPTQ-`rounded` weights are never reused)."""
    w = consumer.inputs[index]
    key = None
    if stored is not None and rounded is None and fmt.dtype in BYTE_FORMATS:
        s = scale_values(scale, w.dtype)
        key = stored.key(w, s, axis, fmt)
        found = stored.find(key)
        if found is not None:
            return dequantized_weight_input(graph, namer, layer, consumer, index, found, s, axis, part, fmt)
    wq, ws = quantized_weight(w, scale, axis, fmt, rounded)
    quantized = dequantized_weight_input(graph, namer, layer, consumer, index, wq, ws, axis, part, fmt)
    if key is not None:
        stored.keep(key, quantized.dequantized.inputs[0].inputs[0])  # the DequantizeLinear's stored weight
    return quantized
