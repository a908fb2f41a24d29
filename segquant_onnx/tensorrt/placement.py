"""Placement rules of the TensorRT checker: what sits around each MatMul/Gemm/Conv/ConvTranspose.

TensorRT fuses DequantizeLinear + GEMM (+ bias + activation + residual Add) (+ output Q) into one
INT8/FP8 kernel when the Q/DQ sit on the inputs of the weighted op and nothing but data movement
stands between (TensorRT developer guide, "Q/DQ layer-placement recommendations"). Exactly what is
checked:

- `output-qdq` (the residual-Add rule): from the output of a weighted op (MatMul/Gemm/Conv/
  ConvTranspose whose weight is a constant or a dequantized constant), directly, through its bias
  Add (an Add with a constant input) or through data-movement ops, every QuantizeLinear reached and
  the DequantizeLinear after it must feed, through data-movement ops only, inputs of MatMul/Gemm/
  Conv/ConvTranspose (the next layer's quantized input) or Shape/Size (which read no values). A
  residual Add, softmax, normalization, activation or graph output reading it is flagged: that float
  op gets an INT8-rounded GEMM output (error and a requantize), and a residual Add can no longer be
  fused into the GEMM epilogue in float (the skip input's precision decides the output's). Whether
  a residual Add's skip input is quantized is not checked.
- `fusion-break`: on a GEMM op whose weight is read through a DequantizeLinear, each of inputs 0
  and 1 must reach a DequantizeLinear through data-movement ops only; an op in between (Cast, Mul,
  Div, Add, normalization, ...; not another GEMM) whose own input is a DequantizeLinear is flagged. An activation
  with no Q/DQ at all (weight-only quantization) is not.
- `per-channel-axis`: a per-channel DequantizeLinear of a constant, followed (through Identity and
  Transposes, whose perm moves the axis) to a weight input: MatMul B [.., K, N] -> the last axis;
  Gemm B -> 0 with transB=1, 1 with transB=0; Conv and ConvTranspose W -> 0 (TensorRT scales
  ConvTranspose weights on axis 0 only). Other consumers are not checked.
- `block` (weight-only, or W4A8's one form): a GEMM whose weight is block-quantized may read a
  dequantized input 0 only as a MatMul of a 2-D INT8 activation with a weight blocked along K (axis 0
  of [K, N]). TensorRT-RTX 1.7 builds that form, and parses but fails to build the others it was tried
  on (a 3-D activation, a Gemm, FP8 activations: README "Precisions").
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx

from segquant_onnx.tensorrt.graph import COMMUTING, GEMM_OPS, QDQ_OPS, GraphIndex, attrs

SHAPE_OPS = ("Shape", "Size")  # read no values


def _consumer_axis(node: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The output-channel axis a weight fed to `node` at `index` must be scaled on (None: not a weight)."""
    if index != 1:
        return None
    if node.op_type == "MatMul":
        return rank - 1
    if node.op_type == "Gemm":
        return 0 if attrs(node).get("transB", 0) else 1
    return 0 if node.op_type in ("Conv", "ConvTranspose") else None


def check_weight_axis(g: GraphIndex, node, rank: int, axis: int) -> Iterator[tuple[str, str]]:
    axis %= rank
    for tensor, consumer, index in g.sinks(node.output[0]):
        if consumer is None:
            continue
        here, t = axis, tensor  # follow the axis back through Transposes between the DQ and the consumer
        while t != node.output[0] and (p := g.producer.get(t)) is not None:
            if p.op_type == "Transpose" and "perm" in attrs(p):
                here = list(attrs(p)["perm"]).index(here)
            elif p.op_type not in ("Identity",):
                here = None
                break
            t = p.input[0]
        want = _consumer_axis(consumer, index, rank)
        if here is not None and want is not None and here != want:
            yield "per-channel-axis", (f"per-channel scales on axis {here} of the weight of {consumer.op_type} "
                                       f"'{g.name(consumer)}', whose output channels are on axis {want}")


def check_gemm(g: GraphIndex, node: onnx.NodeProto) -> list[tuple[str, str, str]]:
    """(rule, node name, message) for the placement rules around one MatMul/Gemm/Conv/ConvTranspose."""
    out = []
    if g.weight_source(node) is not None or _broken(g, node.input[1] if len(node.input) > 1 else "", weight=True):
        for i in (0, 1):
            hit = _broken(g, node.input[i], weight=i == 1) if i < len(node.input) else None
            if hit:
                op, dq = hit
                out.append(("fusion-break", g.name(op), (
                    f"{op.op_type} between DequantizeLinear '{g.name(dq)}' and {node.op_type} '{g.name(node)}' "
                    f"(input {i}) keeps the GEMM out of INT8; put the Q/DQ right before the {node.op_type}")))
    wdq = g.weight_source(node)
    if wdq is not None and _is_blocked(g, wdq) and (dq := g.source(node.input[0])[1]) is not None \
            and dq.op_type == "DequantizeLinear" and not _w4a8_form(g, node, dq, wdq):
        out.append(("block", g.name(node), (
            f"block-quantized weight '{g.name(wdq)}' with a quantized input '{g.name(dq)}': TensorRT builds that "
            "only as a MatMul of a 2-D INT8 input with a [K, N] weight blocked along K; keep the input in float "
            "(weight-only) or lay it out so (--precision w4a8 does)")))
    if g.is_weighted(node):
        out += _check_output(g, node)
    return out


def _w4a8_form(g: GraphIndex, node: onnx.NodeProto, dq: onnx.NodeProto, wdq: onnx.NodeProto) -> bool:
    """MatMul(DQ(INT8 x, 2-D), DQ(INT4 W[K, N], blocked along axis 0)): the W4A8 layout TensorRT builds."""
    shape = g.shape(node.input[0])
    return (node.op_type == "MatMul" and shape is not None and len(shape) == 2
            and g.quant_type(dq) == onnx.TensorProto.INT8 and attrs(wdq).get("axis", 1) == 0)


def _is_blocked(g: GraphIndex, dq: onnx.NodeProto) -> bool:
    scale = g.constant(dq.input[1]) if len(dq.input) > 1 else None
    return "block_size" in attrs(dq) or (scale is not None and len(scale.dims) > 1 and math.prod(scale.dims) > 1)


def _broken(g: GraphIndex, name: str, weight: bool) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(op, DQ) when `name` is computed by a non-commuting, non-GEMM op from a DequantizeLinear output."""
    _, p = g.source(name)
    if p is None or p.op_type in QDQ_OPS + GEMM_OPS + COMMUTING:  # COMMUTING left here: Concat
        return None
    for x in p.input:
        _, dq = g.source(x) if x else ("", None)
        if dq is not None and dq.op_type == "DequantizeLinear" and (not weight or g.is_weight(dq.input[0])):
            return p, dq
    return None


def _check_output(g: GraphIndex, node: onnx.NodeProto) -> list[tuple[str, str, str]]:
    out, start = [], [node.output[0]]
    users = g.consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add" and any(g.constant(i) is not None for i in users[0].input):
        start.append(users[0].output[0])  # the bias Add belongs to the GEMM's epilogue
    for t in start:
        for _, q, _ in list(g.sinks(t)):
            if q is None or q.op_type != "QuantizeLinear":
                continue
            for dq in g.consumers.get(q.output[0], []):
                floats = [c for _, c, _ in g.sinks(dq.output[0]) if c is None or c.op_type not in GEMM_OPS + SHAPE_OPS]
                if dq.op_type == "DequantizeLinear" and floats:
                    f = floats[0]
                    what = "the graph output" if f is None else f"{f.op_type} '{g.name(f)}'"
                    out.append(("output-qdq", g.name(q), (
                        f"Q/DQ on the output of {node.op_type} '{g.name(node)}' feeds {what}, which runs in float: "
                        "it rounds the GEMM output for a float op and keeps a residual Add out of the GEMM "
                        "epilogue; keep that output in float")))
    return out
