"""Tiny Q/DQ graphs for the TensorRT checker's tests, built with onnx.helper: one per way to break a rule.

The base graph is X[1,4,8] -> Q/DQ (per tensor) -> MatMul(DQ(W_q[8,6], per channel, axis 1)) -> Y;
each builder varies one thing. `VIOLATING` maps a case to (builder, the rules it must break).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F8 = TensorProto.FLOAT8E4M3FN
RNG = np.random.default_rng(0)


class G:
    """A graph under construction: constants, nodes, and helpers for Q/DQ."""

    def __init__(self, opset: int = 17):
        self.opset, self.nodes, self.inits = opset, [], []

    def const(self, name, value, dtype=None):
        if dtype is not None:  # INT4 / FLOAT8 / INT32 given as python values
            arr = np.asarray(value)
            self.inits.append(helper.make_tensor(name, dtype, arr.shape, arr.ravel().tolist()))
        else:
            self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, output, name=None, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], name=name or output, **attrs))
        return output

    def act(self, x, name="x", scale=np.float32(0.05), zp=np.int8(0), zp_dtype=None, **attrs):
        """x -> Q -> DQ, per tensor; returns the DQ output."""
        attrs.setdefault("axis", 1)
        ins = [x, self.const(f"{name}_s", scale)]
        if zp is not None:
            ins.append(self.const(f"{name}_zp", zp, zp_dtype))
        q = self.node("QuantizeLinear", ins, f"{name}_q", **attrs)
        return self.node("DequantizeLinear", [q] + ins[1:], f"{name}_dq", **attrs)

    def weight(self, name="w", shape=(8, 6), axis=1, dtype=None, scale=None, zp=True, **attrs):
        """Stored quantized weight -> DQ, per channel on `axis`; returns the DQ output."""
        n = shape[axis if axis is not None else 1]
        scale = np.full(n, 0.01, np.float32) if scale is None else scale
        wq = RNG.integers(-7, 8, size=shape)
        ins = [self.const(f"{name}_q", wq, dtype) if dtype else self.const(f"{name}_q", wq.astype(np.int8)),
               self.const(f"{name}_s", scale)]
        if zp:
            ins.append(self.const(f"{name}_zp", np.zeros(np.shape(scale), int), dtype or TensorProto.INT8))
        if axis is not None:
            attrs["axis"] = axis
        return self.node("DequantizeLinear", ins, f"{name}_dq", **attrs)

    def model(self, out, x_shape=(1, 4, 8), x_type=TensorProto.FLOAT):
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("X", x_type, x_shape)],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])


def linear(opset=17, act=None, weight=None, op="MatMul", **op_attrs) -> tuple[G, str]:
    """X -> [Q/DQ] -> op(., W DQ): returns the graph and the op's output."""
    g = G(opset)
    a = (act or g.act)("X")
    w = (weight or g.weight)()
    return g, g.node(op, [a, w], "Y", name="mm", **op_attrs)


def base():
    g, y = linear()
    return g.model(y)


# -- one graph per rule that breaks it ---------------------------------------------------------------
def _weighted(opset, **kw):
    g = G(opset)
    return g, g.node("MatMul", [g.act("X"), g.weight(**kw)], "Y", name="mm")


def v_opset_axis():
    g, y = _weighted(10, axis=None)  # a per-channel scale, and no axis attribute before opset 13
    return g.model(y)


def _fp8(opset):
    g = G(opset)
    return g.model(g.node("MatMul", [g.act("X", zp=0, zp_dtype=F8), g.weight(dtype=F8)], "Y", name="mm"))


def v_opset_int4():
    g, y = _weighted(19, dtype=TensorProto.INT4)
    return g.model(y)


def _fp16(opset):
    """An fp16 graph: both scales fp16 (a DequantizeLinear outputs its scale's dtype)."""
    g = G(opset)
    w = g.weight(scale=np.full(6, 0.01, np.float16))
    return g.model(g.node("MatMul", [g.act("X", scale=np.float16(0.05)), w], "Y", name="mm"), x_type=TensorProto.FLOAT16)


def _computed_scale(from_input: bool):
    """The activation scale computed in the graph: from X (dynamic) or from constants (folded)."""
    g = G()
    if from_input:
        amax = g.node("ReduceMax", [g.node("Abs", ["X"], "x_abs")], "x_amax", keepdims=0)
    else:
        amax = g.const("amax", np.float32(6.35))
    s = g.node("Div", [amax, g.const("qmax", np.float32(127))], "x_scale_computed")
    q = g.node("QuantizeLinear", ["X", s, g.const("zp", np.int8(0))], "xq", axis=1)
    dq = g.node("DequantizeLinear", [q, s, "zp"], "xdq", axis=1)
    return g.model(g.node("MatMul", [dq, g.weight()], "Y", name="mm"))


def _act_scale(value):
    g = G()
    return g.model(g.node("MatMul", [g.act("X", scale=value), g.weight()], "Y", name="mm"))


def v_zp_nonzero():
    g = G()
    return g.model(g.node("MatMul", [g.act("X", zp=np.int8(3)), g.weight()], "Y", name="mm"))


def v_zp_uint8():
    g = G()
    return g.model(g.node("MatMul", [g.act("X", zp=np.uint8(0)), g.weight()], "Y", name="mm"))


def v_zp_missing_on_q():
    g = G()
    return g.model(g.node("MatMul", [g.act("X", zp=None), g.weight()], "Y", name="mm"))


def v_zp_volume():
    g = G()
    w = g.weight(zp=False)
    g.nodes[-1].input.append(g.const("w_zp3", np.zeros(3, np.int8)))
    return g.model(g.node("MatMul", [g.act("X"), w], "Y", name="mm"))


def v_axis_missing():
    g = G()
    w = g.weight()
    del g.nodes[-1].attribute[:]
    return g.model(g.node("MatMul", [g.act("X"), w], "Y", name="mm"))


def v_per_channel_activation():
    g = G()
    a = g.act("X", scale=np.full(8, 0.05, np.float32), zp=np.zeros(8, np.int8), axis=2)
    return g.model(g.node("MatMul", [a, g.weight()], "Y", name="mm"))


def v_axis_matmul():
    g, y = _weighted(17, axis=0)  # per input channel K
    return g.model(y)


def _gemm(trans_b, axis):
    g = G()
    w = g.weight(shape=(6, 8) if trans_b else (8, 6), axis=axis)
    return g.model(g.node("Gemm", [g.act("X"), w], "Y", name="gemm", transB=trans_b), x_shape=(4, 8))


def _conv(axis):
    g = G()
    w = g.weight(shape=(6, 3, 1, 1), axis=axis)
    return g.model(g.node("Conv", [g.act("X"), w], "Y", name="conv"), x_shape=(1, 3, 4, 4))


def v_int32_bias():
    g, y = linear()
    b = g.node("DequantizeLinear", [g.const("b_q", np.arange(6, dtype=np.int32)), g.const("b_s", np.full(6, 5e-4, np.float32)),
                                    g.const("b_zp", np.zeros(6, np.int32))], "b_dq", axis=0)
    return g.model(g.node("Add", [y, b], "Yb", name="bias"))


def v_matmul_integer():
    g = G()
    xq = g.node("QuantizeLinear", ["X", g.const("s", np.float32(0.05)), g.const("zp", np.int8(0))], "xq", axis=1)
    return g.model(g.node("MatMulInteger", [xq, g.const("wq", np.ones((8, 6), np.int8))], "Y", name="mmi"))


def v_dynamic_quantize():
    g = G()
    g.nodes.append(helper.make_node("DynamicQuantizeLinear", ["X"], ["xq", "xs", "xzp"], name="dql"))
    return g.model("xq")


def v_shared_dq():
    g = G()
    w = g.weight()
    y1 = g.node("MatMul", [g.act("X"), w], "Y1", name="mm1")
    y2 = g.node("MatMul", [g.act("X", name="x2"), w], "Y2", name="mm2")
    return g.model(g.node("Add", [y1, y2], "Y", name="sum"))


def v_int4_odd():
    g, y = _weighted(21, shape=(8, 5), dtype=TensorProto.INT4)
    return g.model(y)


def v_int4_activation():
    g = G(21)
    a = g.act("X", zp=0, zp_dtype=TensorProto.INT4)
    return g.model(g.node("MatMul", [a, g.weight()], "Y", name="mm"))


def _block(shape, scale_shape, axis, block_size, quantized_input=False, x_shape=(1, 4, 8), op="MatMul",
           act_type=None):
    """A block-quantized INT4 weight; the activation stays float (weight-only) unless asked (INT8, or the
    zero point type `act_type`); `op` Gemm reads the weight as [N, K] (transB=1)."""
    g = G(21)
    w = g.weight(shape=shape, axis=axis, dtype=TensorProto.INT4, scale=np.full(scale_shape, 0.01, np.float32),
                 block_size=block_size)
    x = "X"
    if quantized_input:
        x = g.act("X") if act_type is None else g.act("X", zp=0, zp_dtype=act_type)
    attrs = {"transB": 1} if op == "Gemm" else {}
    return g.model(g.node(op, [x, w], "Y", name="mm", **attrs), x_shape=x_shape)


def v_fusion_cast():
    g = G()
    c = g.node("Cast", [g.act("X")], "x_cast", to=TensorProto.FLOAT)
    return g.model(g.node("MatMul", [c, g.weight()], "Y", name="mm"))


def v_fusion_mul_weight():
    g = G()
    m = g.node("Mul", [g.weight(), g.const("two", np.float32(2))], "w_mul")
    return g.model(g.node("MatMul", [g.act("X"), m], "Y", name="mm"))


def v_output_residual():
    g, y = linear()
    yq = g.act(y, name="y")
    return g.model(g.node("Add", [yq, g.const("skip", np.ones((1, 4, 6), np.float32))], "Z", name="residual"))


def v_output_bias_softmax():
    g, y = linear()
    yb = g.node("Add", [y, g.const("bias", np.zeros(6, np.float32))], "yb", name="bias")
    return g.model(g.node("Softmax", [g.act(yb, name="y")], "Z", name="softmax", axis=-1))


def v_scale_type_q():
    """An fp16 input quantized with a float32 scale (ONNX needs the input's type)."""
    g = G(19)
    w = g.weight(scale=np.full(6, 0.01, np.float16))
    return g.model(g.node("MatMul", [g.act("X", scale=np.float32(0.05)), w], "Y", name="mm"),
                   x_type=TensorProto.FLOAT16)


def v_scale_type_dq():
    """A float32 weight scale (so a float32 DQ output) into a MatMul whose activation stays float16."""
    g = G(19)
    w = g.weight(scale=np.full(6, 0.01, np.float32))
    return g.model(g.node("MatMul", ["X", w], "Y", name="mm"), x_type=TensorProto.FLOAT16)


def v_attention_one_side():
    """Q @ K^T with Q/DQ on Q only: TensorRT's fused MHA takes both or neither."""
    g = G(17)
    k = g.node("Transpose", ["X"], "kT", perm=[0, 2, 1])
    return g.model(g.node("MatMul", [g.act("X"), k], "scores", name="qk"))


VIOLATING = {
    "scale-type-q": (v_scale_type_q, {"scale-type"}),
    "scale-type-dq": (v_scale_type_dq, {"scale-type"}),
    "attention-one-side": (v_attention_one_side, {"attention-qdq"}),
    "opset-axis": (v_opset_axis, {"opset", "axis"}),
    "opset-fp8": (lambda: _fp8(17), {"opset"}),
    "opset-int4": (v_opset_int4, {"opset"}),
    "opset-fp16-scale": (lambda: _fp16(17), {"opset"}),
    "scale-from-input": (lambda: _computed_scale(True), {"scale-constant"}),
    "scale-zero": (lambda: _act_scale(np.float32(0)), {"scale-value"}),
    "scale-negative": (lambda: _act_scale(np.float32(-0.05)), {"scale-value"}),
    "scale-inf": (lambda: _act_scale(np.float32(np.inf)), {"scale-value"}),
    "scale-nan": (lambda: _act_scale(np.float32(np.nan)), {"scale-value"}),
    "scale-double": (lambda: _act_scale(np.float64(0.05)), {"scale-value"}),
    "zp-nonzero": (v_zp_nonzero, {"zero-point"}),
    "zp-uint8": (v_zp_uint8, {"zero-point"}),
    "zp-missing-on-q": (v_zp_missing_on_q, {"zero-point"}),
    "zp-volume": (v_zp_volume, {"zero-point"}),
    "axis-missing": (v_axis_missing, {"axis"}),
    "per-channel-activation": (v_per_channel_activation, {"per-channel-activation"}),
    "axis-matmul-k": (v_axis_matmul, {"per-channel-axis"}),
    "axis-gemm-transB1": (lambda: _gemm(1, 1), {"per-channel-axis"}),
    "axis-gemm-transB0": (lambda: _gemm(0, 0), {"per-channel-axis"}),
    "axis-conv": (lambda: _conv(1), {"per-channel-axis"}),
    "int32-bias": (v_int32_bias, {"int32-dequantize"}),
    "matmul-integer": (v_matmul_integer, {"unsupported-op"}),
    "dynamic-quantize": (v_dynamic_quantize, {"unsupported-op"}),
    "shared-dq": (v_shared_dq, {"shared-dq"}),
    "int4-odd": (v_int4_odd, {"int4"}),
    "int4-activation": (v_int4_activation, {"int4"}),
    "block-axis-last-of-3": (lambda: _block((2, 8, 6), (1, 8, 6), 0, 2), {"block"}),
    "block-two-axes": (lambda: _block((8, 6), (2, 3), 0, 4), {"block"}),
    "block-partial": (lambda: _block((8, 6), (3, 6), 0, 3), {"block"}),
    "block-quantized-input": (lambda: _block((8, 6), (2, 6), 0, 4, quantized_input=True), {"block"}),
    "block-gemm-quantized-input": (lambda: _block((6, 8), (6, 2), 1, 4, quantized_input=True, x_shape=(4, 8),
                                                  op="Gemm"), {"block"}),
    "block-fp8-input": (lambda: _block((8, 6), (2, 6), 0, 4, quantized_input=True, x_shape=(4, 8),
                                       act_type=TensorProto.FLOAT8E4M3FN), {"block"}),
    "fusion-cast": (v_fusion_cast, {"fusion-break"}),
    "fusion-weight-mul": (v_fusion_mul_weight, {"fusion-break"}),
    "output-residual-add": (v_output_residual, {"output-qdq"}),
    "output-bias-softmax": (v_output_bias_softmax, {"output-qdq"}),
}


def make_qdq_matmul(
    batch: int | str = 1,
    x_scale: float = 0.05,
    w_scale: np.ndarray | None = None,
    int32_bias: bool = False,
    float_tail: bool = False,
    fp16: bool = False,
) -> onnx.ModelProto:
    """X[b,16,64] -> Q/DQ (per-tensor) -> MatMul with INT8 weight [64,32] DQ (per-channel, axis 1).

    int32_bias: add a bias through an INT32 DequantizeLinear, as onnxruntime's quantize_static
    writes Gemm biases. float_tail: unquantized Relu + Softmax after the MatMul. fp16: fp16 graph
    (opset 19, which QuantizeLinear needs for fp16 input), else fp32 at opset 17.
    """
    ftype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    fnp = np.float16 if fp16 else np.float32
    w_scale = np.full(32, 0.01, np.float32) if w_scale is None else np.asarray(w_scale, np.float32)
    w_q = np.random.default_rng(0).integers(-127, 128, size=(64, 32), dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.array(x_scale, fnp), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(w_q, "W_q"),
        numpy_helper.from_array(w_scale.astype(fnp), "w_scale"),
        numpy_helper.from_array(np.zeros(32, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "x_scale", "x_zp"], ["X_q"], name="q_x", axis=1),
        helper.make_node("DequantizeLinear", ["X_q", "x_scale", "x_zp"], ["X_dq"], name="dq_x", axis=1),
        helper.make_node("DequantizeLinear", ["W_q", "w_scale", "w_zp"], ["W_dq"], name="dq_w", axis=1),
        helper.make_node("MatMul", ["X_dq", "W_dq"], ["mm"], name="matmul"),
    ]
    out = "mm"
    if int32_bias:
        inits += [
            numpy_helper.from_array(np.arange(32, dtype=np.int32), "b_q"),
            numpy_helper.from_array((w_scale * x_scale).astype(fnp), "b_scale"),
            numpy_helper.from_array(np.zeros(32, np.int32), "b_zp"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], name="dq_bias", axis=0),
            helper.make_node("Add", [out, "b"], ["mm_b"], name="add_bias"),
        ]
        out = "mm_b"
    if float_tail:
        nodes += [
            helper.make_node("Relu", [out], ["r"], name="relu"),
            helper.make_node("Softmax", ["r"], ["s"], name="softmax", axis=-1),
        ]
        out = "s"
    nodes.append(helper.make_node("Identity", [out], ["Y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "qdq_matmul",
        [helper.make_tensor_value_info("X", ftype, [batch, 16, 64])],
        [helper.make_tensor_value_info("Y", ftype, [batch, 16, 32])],
        inits,
    )
    opset = 19 if fp16 else 17
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    model.ir_version = 9 if fp16 else 8
    onnx.checker.check_model(model, full_check=True)
    return model
