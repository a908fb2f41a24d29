"""Static check of TensorRT's explicit-quantization rules on a Q/DQ ONNX graph.

    check_tensorrt(model) -> [Violation(rule, node, message), ...]      [] when nothing is wrong

Every rule in `RULES` names where it comes from: the TensorRT developer guide ("Explicit
quantization", "Q/DQ layer-placement recommendations"), the ONNX parser's importer
(onnx-tensorrt `onnxOpImporters.cpp`, `QuantDequantLinearHelper`; read at commit 96e7811 of June
2024), `NvInfer.h`, and the ONNX operator versions. A clean result is not an engine: `build-trt`
parses and builds with NVIDIA's parser. Only the main graph is checked (not If/Loop bodies).

Decisions:
- UINT8 is a violation, not a warning: the 2024 parser refuses a UINT8 DequantizeLinear input and
  a UINT8 QuantizeLinear zero point (`notInvalidType(..., {"UINT8"})`); TensorRT-RTX 1.7 imports
  it as INT8 with a warning. Either way the engine does not compute what ONNX Runtime computes
  ([0, 255] vs [-128, 127]). A QuantizeLinear with neither zero point nor output_dtype quantizes
  to UINT8 in ONNX: flagged for the same reason.
- `axis` must be written on per-channel and block Q/DQ: there ONNX defaults a missing axis to 1 and
  the 2024 parser to 0 (TensorRT-RTX 1.7 reads 1). A per-tensor scale (0-d or [1]: both count)
  makes TensorRT ignore the axis ("Per-Tensor Quantization ... axis is ignored"), so a per-tensor
  Q/DQ without one is not flagged (ModelOpt writes them that way and its graphs build).
- Some rules are stricter than TensorRT-RTX 1.7, which parses and builds these on the CPU: per-
  channel activations, INT4 on activations or with an odd last dimension, an infinite or float64
  scale, a scale computed from graph inputs, a missing per-channel axis, UINT8, opsets below what
  a feature needs. They follow TensorRT's documentation, the ONNX spec, or older parsers, and
  each one makes ONNX Runtime and the engine disagree or ties the graph to one parser version.
- The placement rules (`fusion-break`, `output-qdq`, block weight-only, `per-channel-axis`) live in
  `trt_placement`, which says exactly what each checks. They cost speed or accuracy, not parsing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from segquant_onnx.tensorrt.graph import GEMM_OPS, QDQ_OPS, GraphIndex, attrs
from segquant_onnx.tensorrt.placement import check_gemm, check_weight_axis

_GUIDE = "TensorRT developer guide, 'Explicit quantization'"
_PLACEMENT = "TensorRT developer guide, 'Q/DQ layer-placement recommendations'"
_PARSER = "onnx-tensorrt onnxOpImporters.cpp QuantDequantLinearHelper"

# rule id -> (what is required, where it comes from)
RULES: dict[str, tuple[str, str]] = {
    "opset": ("a per-channel scale needs opset 13; FLOAT8E4M3FN and fp16/bf16 scales 19; INT4, block_size "
              "and output_dtype 21", "ONNX QuantizeLinear/DequantizeLinear versions 13, 19, 21; onnx-tensorrt "
              "docs/operators.md"),
    "scale-constant": ("the scale is a build-time constant: an initializer, a Constant node, or computed "
                       "from constants only", f"{_GUIDE} (Q/DQ scales fold into the fused INT8 kernel); "
                       "TensorRT-RTX 1.7 also accepts a scale computed from inputs, unfused"),
    "scale-value": ("the scale is float32/float16/bfloat16, not empty, finite and > 0",
                    f"{_PARSER}: 'Cannot have scale with no coefficients', 'Scale coefficients must all be "
                    "positive'; NvInfer.h IQuantizeLayer: strictly positive; ONNX x_scale types; TensorRT-RTX 1.7 "
                    "refuses 0, negative and NaN scales (it accepts inf and float64)"),
    "zero-point": ("a zero point is a constant of zeros of INT8, FLOAT8E4M3FN or INT4 with the scale's "
                   "volume; a QuantizeLinear states one (ONNX's default is UINT8)",
                   f"{_PARSER}: 'TensorRT only supports symmetric quantization', 'The scale and zero point "
                   "must have the same volume', UINT8 refused (notInvalidType); TensorRT-RTX 1.7 refuses the "
                   "first two and imports UINT8 as INT8 with a warning"),
    "axis": ("a per-channel or block Q/DQ writes axis",
             f"{_PARSER}: a missing axis becomes the input rank, then 0 (ONNX: 1); per-tensor ignores it"),
    "per-channel-activation": ("per-channel and block scales only on a DequantizeLinear of a constant",
                               f"{_PARSER}: 'Activations-quantization does not support per-axis "
                               f"quantization'; {_GUIDE}"),
    "per-channel-axis": ("per-channel weight scales on the consumer's output-channel axis: MatMul [K, N] "
                         "-> 1, Gemm transB=1 -> 0 / transB=0 -> 1, Conv and ConvTranspose -> 0",
                         f"{_GUIDE} (weights per output channel); {_PARSER}: 'We assume this is "
                         "weight-quantization with dimensions KCRS (K is # output channels)'"),
    "int32-dequantize": ("no INT32 input to DequantizeLinear (ONNX Runtime's quantized bias)",
                         f"{_PARSER}: 'TensorRT only allows FP8, INT8, and INT4 quantization'; TensorRT-RTX 1.7: "
                         "'input has type Int32 but must have type FP8, FP4, Int4, Int8, or UInt8'"),
    "unsupported-op": ("no QLinear*, ConvInteger, MatMulInteger, DynamicQuantizeLinear",
                       f"{_GUIDE} (QuantizeLinear/DequantizeLinear only); TensorRT-RTX 1.7 refuses MatMulInteger "
                       "and DynamicQuantizeLinear (UNSUPPORTED_NODE)"),
    "shared-dq": ("a DequantizeLinear output feeds one node", f"{_PLACEMENT}; ONNX Runtime's "
                  "DedicatedQDQPair option exists for this"),
    "int4": ("INT4 only on constants (weight-only), with an even last dimension and element count",
             f"{_PARSER}: 'Quantization to INT4 is not supported for tensors with an odd last dimension'; "
             f"{_GUIDE} (INT4 is weight-only)"),
    "block": ("block scales: the data's rank, one blocked axis (last or second to last), whole blocks; "
              "weight-only", f"{_PARSER}: 'Only a single blocking dimension is allowed', 'Inferred block "
              "size is not an integer'; NvInfer.h IDequantizeLayer (last or second to last); TensorRT-RTX 1.7 "
              "refuses each tested case (a block weight with a quantized input parses, then fails to build)"),
    "fusion-break": ("nothing but data movement between a DequantizeLinear and the GEMM it feeds",
                     f"{_PLACEMENT} (Q/DQ commute only through data-movement ops)"),
    "output-qdq": ("no Q/DQ on the output of a weighted op whose consumer runs in float (residual Add)",
                   f"{_PLACEMENT} (quantize the inputs of weighted ops; residual Add fuses into the epilogue)"),
    "scale-type": ("a QuantizeLinear's input has its scale's float type; a DequantizeLinear (which outputs its "
                   "scale's type) feeds a GEMM whose other float inputs have that type",
                   "ONNX QuantizeLinear-19/21 (x and y_scale share T1), DequantizeLinear-19/21 (y has x_scale's "
                   "type); a strongly typed TensorRT builds the types as written"),
    "attention-qdq": ("an activation x activation MatMul (attention) has Q/DQ on both inputs or on neither",
                      f"{_GUIDE} (fused multi-head attention in explicit quantization takes Q/DQ before both "
                      "batched GEMMs); one quantized input leaves the product unfused and in float"),
}

UNSUPPORTED_OPS = ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")
QUANT_TYPES = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4)
SCALE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_TYPE = TensorProto.DataType.Name


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}  {self.node}: {self.message}"


def check_tensorrt(model: onnx.ModelProto, base_dir: str | None = None) -> list[Violation]:
    """Violations of TensorRT's explicit-quantization rules in `model`, in graph order.

    `base_dir`: where the model's external data lives, when it was loaded without it (only scales
    and zero points are read).
    """
    g = GraphIndex(model, base_dir)
    out: list[Violation] = []
    for node in g.nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        name, op = g.name(node), node.op_type
        if op.startswith("QLinear") or op in UNSUPPORTED_OPS:
            out.append(Violation("unsupported-op", name, f"{op} is not imported by TensorRT's ONNX parser; "
                                 "write QuantizeLinear/DequantizeLinear around float ops instead"))
        if op in QDQ_OPS:
            out += [Violation(rule, name, msg) for rule, msg in _check_qdq(g, node)]
        if op == "DequantizeLinear" and len(g.consumers.get(node.output[0], [])) > 1:
            users = [g.name(c) for c in g.consumers[node.output[0]]]
            out.append(Violation("shared-dq", name, f"its output feeds {len(users)} nodes ({', '.join(users[:3])}"
                                 f"{', ...' if len(users) > 3 else ''}); give each consumer its own DequantizeLinear"))
        if op in GEMM_OPS:
            out += [Violation(*v) for v in check_gemm(g, node)]
            out += [Violation(rule, name, msg) for rule, msg in _check_types_and_attention(g, node)]
    return out


def _dq_of(g: GraphIndex, name: str) -> onnx.NodeProto | None:
    _, p = g.source(name)
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def _check_types_and_attention(g: GraphIndex, node: onnx.NodeProto) -> Iterator[tuple[str, str]]:
    """scale-type for the DequantizeLinear inputs of a GEMM; attention-qdq for an activation product."""
    inputs = [i for i in node.input[:2] if i]
    dqs = {i: _dq_of(g, i) for i in inputs}
    float_types = {i: g.dtypes.get(i) for i in inputs if dqs[i] is None and g.dtypes.get(i) in SCALE_TYPES}
    for i, dq in dqs.items():
        scale = g.constant(dq.input[1]) if dq is not None and len(dq.input) > 1 else None
        others = {t for j, t in float_types.items() if j != i}
        if scale is not None and others and scale.data_type not in others:
            yield "scale-type", (f"DequantizeLinear '{g.name(dq)}' outputs {_TYPE(scale.data_type)} (its scale's type) "
                                 f"into {node.op_type} '{g.name(node)}', whose other input is "
                                 f"{', '.join(sorted(_TYPE(t) for t in others))}; write the scale in that type")
    if node.op_type == "MatMul" and len(inputs) == 2 and not any(g.is_static(i) for i in inputs):
        quantized = [i for i in inputs if dqs[i] is not None]
        if len(quantized) == 1:
            yield "attention-qdq", (f"only input '{quantized[0]}' of the activation product {g.name(node)} is "
                                    "quantized; give both inputs Q/DQ (--quantize-attention) or neither")


def _check_qdq(g: GraphIndex, node: onnx.NodeProto) -> Iterator[tuple[str, str]]:
    a, is_q, data = attrs(node), node.op_type == "QuantizeLinear", node.input[0]
    qtype = g.quant_type(node)
    scale = g.constant(node.input[1]) if len(node.input) > 1 else None
    dims = tuple(scale.dims) if scale is not None else None
    per_channel = dims is not None and math.prod(dims) > 1
    blocked = "block_size" in a or (per_channel and len(dims) > 1)

    in_type = g.dtypes.get(data)
    if is_q and scale is not None and in_type in SCALE_TYPES and scale.data_type in SCALE_TYPES \
            and in_type != scale.data_type:
        yield "scale-type", (f"input '{data}' is {_TYPE(in_type)}, the scale {_TYPE(scale.data_type)}; ONNX needs "
                             "them equal: write the scale in the input's type")
    if scale is None and not (len(node.input) > 1 and g.is_static(node.input[1])):
        yield "scale-constant", (f"scale '{node.input[1] if len(node.input) > 1 else ''}' is computed from graph "
                                 "inputs; TensorRT needs a build-time constant")
    elif scale is None:
        pass  # computed from constants: TensorRT folds it; its values are checked when it parses
    elif scale.data_type not in SCALE_TYPES:
        yield "scale-value", f"scale is {_TYPE(scale.data_type)}; TensorRT reads float32, float16 or bfloat16"
    else:
        values = g.array(scale).astype(np.float64).ravel()
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if values.size == 0:
            yield "scale-value", "scale is empty"
        elif bad.size:
            yield "scale-value", (f"{bad.size} of {values.size} scale values are not finite and > 0 "
                                  f"(index {bad[0]}: {values[bad[0]]:.6g}); clamp amax to a small floor")

    needs = [(13, "a per-channel scale")] if per_channel else []
    half = scale is not None and scale.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    needs += [(19, f"a {_TYPE(scale.data_type)} scale")] if half else []
    needs += [(19, "FLOAT8E4M3FN")] if qtype == TensorProto.FLOAT8E4M3FN else []
    needs += [(21, _TYPE(qtype))] if qtype in (TensorProto.INT4, TensorProto.UINT4) else []
    needs += [(21, f"the {k} attribute") for k in ("block_size", "output_dtype") if k in a]
    for version, what in needs:
        if g.opset < version:
            yield "opset", f"{what} needs opset {version}; the model imports opset {g.opset}"

    yield from _check_zero_point(g, node, qtype, scale)
    if not is_q and qtype == TensorProto.INT32:
        yield "int32-dequantize", ("INT32 input (a quantized bias, as ONNX Runtime writes it) is rejected by "
                                   "TensorRT's parser; keep the bias in float")
    if (per_channel or blocked) and "axis" not in a:
        yield "axis", (f"{'block' if blocked else 'per-channel'} scale without an axis attribute: ONNX reads "
                       "axis 1, TensorRT's parser 0; write it")
    if (per_channel or blocked) and not g.is_weight(data):
        yield "per-channel-activation", (f"{'block' if blocked else 'per-channel'} scale on '{data}', which is not "
                                         "a constant; quantize activations per tensor")
    shape = g.shape(data)
    if qtype == TensorProto.INT4:
        if not g.is_weight(data):
            yield "int4", f"INT4 on '{data}', which is not a constant: TensorRT quantizes only weights to INT4"
        elif shape and all(isinstance(d, int) for d in shape) and (shape[-1] % 2 or math.prod(shape) % 2):
            yield "int4", f"INT4 weight of shape {list(shape)}: the last dimension and the element count must be even"
    if blocked and shape:
        yield from _check_block(shape, dims, a)
    if per_channel and not blocked and not is_q and shape:
        yield from check_weight_axis(g, node, len(shape), a.get("axis", 1))


def _check_zero_point(g: GraphIndex, node, qtype, scale) -> Iterator[tuple[str, str]]:
    zp_name = node.input[2] if len(node.input) > 2 else ""
    if not zp_name:
        if node.op_type == "QuantizeLinear" and "output_dtype" not in attrs(node):
            yield "zero-point", ("no zero point: ONNX quantizes to UINT8 [0, 255], TensorRT to INT8; "
                                 "write an INT8 zero point of 0")
        elif qtype is not None and qtype not in QUANT_TYPES and qtype != TensorProto.INT32:
            yield "zero-point", f"quantized type {_TYPE(qtype)}; TensorRT supports INT8, FLOAT8E4M3FN and INT4"
        return
    zp = g.constant(zp_name)
    if zp is None:
        yield "zero-point", f"zero point '{zp_name}' is not a constant"
        return
    if zp.data_type not in QUANT_TYPES and zp.data_type != TensorProto.INT32:
        yield "zero-point", (f"zero point is {_TYPE(zp.data_type)}; TensorRT supports INT8, FLOAT8E4M3FN and "
                             "INT4 (it refuses or reinterprets UINT8, so ONNX Runtime and the engine disagree)")
    values = g.array(zp).astype(np.float32)
    if np.any(values != 0):
        yield "zero-point", "zero point is not all zeros: TensorRT supports symmetric quantization only"
    if scale is not None and math.prod(zp.dims) != math.prod(scale.dims):
        yield "zero-point", f"zero point has {math.prod(zp.dims)} values, the scale {math.prod(scale.dims)}"


def _check_block(shape: tuple, dims: tuple, a: dict) -> Iterator[tuple[str, str]]:
    rank = len(shape)
    if len(dims) != rank or not rank:
        yield "block", f"block scale of rank {len(dims)} for data of rank {rank}; they must match"
        return
    axis = a.get("axis", 1) % rank if rank else 0
    blocked_axes = [i for i, (d, s) in enumerate(zip(shape, dims)) if d != s]
    if len(blocked_axes) > 1:
        yield "block", f"scale {list(dims)} blocks axes {blocked_axes} of data {list(shape)}; only one may be blocked"
    if rank and axis not in (rank - 1, rank - 2):
        yield "block", f"blocked axis {axis} of a rank-{rank} tensor; TensorRT blocks the last or second to last"
    size, n = shape[axis], dims[axis]
    bs = a.get("block_size")
    # TensorRT infers the block as size / n; ONNX reads blocks of block_size, the last one maybe short. They
    # agree when the blocks are whole, or when one scale covers the whole axis (a block_size above it included)
    if isinstance(size, int) and (size % max(n, 1) or (bs and n != 1 and size // n != bs)):
        yield "block", f"axis {axis} of size {size} is not cut into whole blocks by {n} scales (block_size {bs})"
