"""The TensorRT rule checker: one tiny graph that breaks each rule and one that keeps it, and NVIDIA's
parser (TensorRT-RTX, CPU-only) agreeing where a rule is a parser rule. Graphs: tests/trt_graphs.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from segquant_onnx.tensorrt.check import RULES, check_tensorrt
from trt_graphs import (VIOLATING, G, _act_scale, _block, _computed_scale, _conv, _fp8, _fp16, _gemm, _weighted,
                        base, linear)


def rules(model) -> set[str]:
    return {v.rule for v in check_tensorrt(model)}


# -- graphs that keep the rules ------------------------------------------------------------------------
def p_constant_node_scale():
    g = G()
    g.nodes.append(helper.make_node("Constant", [], ["cs"], name="cs", value=numpy_helper.from_array(np.array(0.05, np.float32))))
    q = g.node("QuantizeLinear", ["X", "cs", g.const("zp", np.int8(0))], "xq", axis=1)
    dq = g.node("DequantizeLinear", [q, "cs", "zp"], "xdq", axis=1)
    return g.model(g.node("MatMul", [dq, g.weight()], "Y", name="mm"))


def p_per_tensor_without_axis():
    g = G()
    a = g.act("X")
    for n in g.nodes:
        del n.attribute[:]
    return g.model(g.node("MatMul", [a, g.weight()], "Y", name="mm"))


def p_dq_without_zero_point():
    g = G()
    return g.model(g.node("MatMul", [g.act("X"), g.weight(zp=False)], "Y", name="mm"))


def p_transposed_weight():
    g = G()
    wt = g.node("Transpose", [g.weight(shape=(6, 8), axis=0)], "w_t", perm=[1, 0])
    return g.model(g.node("MatMul", [g.act("X"), wt], "Y", name="mm"))


def p_two_dqs_one_initializer():
    g = G()
    w1 = g.weight()
    g.node("DequantizeLinear", list(g.nodes[-1].input), "w2_dq", axis=1)
    y1 = g.node("MatMul", [g.act("X"), w1], "Y1", name="mm1")
    y2 = g.node("MatMul", [g.act("X", name="x2"), "w2_dq"], "Y2", name="mm2")
    return g.model(g.node("Add", [y1, y2], "Y", name="sum"))


def p_movement_between():
    g = G()
    r = g.node("Reshape", [g.act("X"), g.const("shape", np.array([1, 4, 8]))], "x_r")
    return g.model(g.node("MatMul", [r, g.weight()], "Y", name="mm"))


def p_concat_of_dequantized_inputs():
    g = G()
    c = g.node("Concat", [g.act("X"), g.act("X", name="x2")], "x_cat", axis=-1)
    return g.model(g.node("MatMul", [c, g.weight(shape=(16, 6))], "Y", name="mm"))


def p_smoothing_mul_before_q():
    g = G()
    m = g.node("Mul", ["X", g.const("smooth", np.full(8, 0.5, np.float32))], "x_smooth")
    return g.model(g.node("MatMul", [g.act(m), g.weight()], "Y", name="mm"))


def p_output_feeds_next_gemm():
    g, y = linear()
    r = g.node("Reshape", [g.act(y, name="y"), g.const("shape", np.array([1, 4, 6]))], "y_r")
    return g.model(g.node("MatMul", [r, g.weight(name="w2", shape=(6, 6))], "Z", name="mm2"))


def p_float_bias():
    g, y = linear()
    return g.model(g.node("Add", [y, g.const("bias", np.zeros(6, np.float32))], "Yb", name="bias"))


PASSING = {
    "base": base,
    "scale-0d": lambda: _act_scale(np.float32(0.05)),
    "scale-[1]": lambda: _act_scale(np.array([0.05], np.float32)),
    "scale-fp16-opset19": lambda: _fp16(19),
    "scale-from-constants": lambda: _computed_scale(False),
    "scale-constant-node": p_constant_node_scale,
    "per-tensor-without-axis": p_per_tensor_without_axis,
    "dq-without-zero-point": p_dq_without_zero_point,
    "fp8-opset19": lambda: _fp8(19),
    "int4-opset21": lambda: _weighted(21, dtype=TensorProto.INT4)[0].model("Y"),
    "int4-block": lambda: _block((8, 6), (2, 6), 0, 4),
    "int4-one-short-block": lambda: _block((8, 6), (1, 6), 0, 16),  # block_size above K: one block, as TensorRT reads
    "int4-block-2d-int8-input": lambda: _block((8, 6), (2, 6), 0, 4, quantized_input=True, x_shape=(4, 8)),
    "matmul-axis-minus-1": lambda: _weighted(17, axis=-1)[0].model("Y"),
    "gemm-transB1-axis0": lambda: _gemm(1, 0),
    "gemm-transB0-axis1": lambda: _gemm(0, 1),
    "conv-axis0": lambda: _conv(0),
    "transposed-weight": p_transposed_weight,
    "two-dqs-one-initializer": p_two_dqs_one_initializer,
    "reshape-between-dq-and-gemm": p_movement_between,
    "concat-between-dq-and-gemm": p_concat_of_dequantized_inputs,
    "smoothing-mul-before-q": p_smoothing_mul_before_q,
    "output-qdq-feeds-next-gemm": p_output_feeds_next_gemm,
    "float-bias": p_float_bias,
}


@pytest.mark.parametrize("case", VIOLATING)
def test_violating_graph_is_flagged(case):
    build, expected = VIOLATING[case]
    found = check_tensorrt(build())
    assert {v.rule for v in found} == expected, [str(v) for v in found]
    assert all(v.node and v.message for v in found)


@pytest.mark.parametrize("case", PASSING)
def test_passing_graph_is_clean(case):
    assert check_tensorrt(PASSING[case]()) == []


def test_every_rule_has_a_violating_graph_and_a_source():
    assert set().union(*(rules for _, rules in VIOLATING.values())) == set(RULES)
    assert all(summary and source for summary, source in RULES.values())


def test_violation_names_node_and_rule():
    found = check_tensorrt(_act_scale(np.float32(0)))
    assert [(v.rule, v.node) for v in found] == [("scale-value", "x_q"), ("scale-value", "x_dq")]
    assert str(found[0]).startswith("scale-value  x_q: ")
    with pytest.raises(Exception):
        found[0].rule = "x"  # type: ignore[misc]


def test_external_data_is_read_from_base_dir(tmp_path):
    onnx.save(_act_scale(np.float32(0)), str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.data", size_threshold=0)
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert {v.rule for v in check_tensorrt(lazy, str(tmp_path))} == {"scale-value"}
    with pytest.raises(Exception):  # without base_dir the scale cannot be read
        check_tensorrt(lazy, str(tmp_path / "elsewhere"))



# -- NVIDIA's parser agrees (TensorRT-RTX, CPU-only) --------------------------------------------------
# rules whose violating graph TensorRT-RTX 1.7 itself refuses; it accepts the others (placement rules,
# and rules stricter than its parser: see the trt_check docstring)
PARSER_REJECTS = ("scale-zero", "scale-negative", "scale-nan", "zp-nonzero", "zp-volume", "int32-bias",
                  "matmul-integer", "dynamic-quantize", "block-axis-last-of-3", "block-two-axes", "block-partial",
                  "block-quantized-input", "block-gemm-quantized-input", "block-fp8-input")


@pytest.fixture(scope="module")
def rtx():
    pytest.importorskip("tensorrt_rtx_bindings")
    from segquant_onnx.tensorrt.build import build_engine
    return build_engine


@pytest.mark.parametrize("case", PASSING)
def test_passing_graph_builds_with_tensorrt_rtx(rtx, tmp_path, case):
    onnx.save(PASSING[case](), str(tmp_path / "m.onnx"))
    result = rtx(tmp_path / "m.onnx")
    assert result.built, result.errors


@pytest.mark.parametrize("case", PARSER_REJECTS)
def test_tensorrt_rtx_rejects_what_the_checker_flags(rtx, tmp_path, case):
    model = VIOLATING[case][0]()
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = rtx(tmp_path / "m.onnx")
    assert not result.built
    if not result.parsed:  # the parser names the node; the checker names it too
        text = "\n".join(result.errors)
        assert any(f"name: {v.node} " in text for v in check_tensorrt(model)), text
