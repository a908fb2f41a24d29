"""FP8 activation Q/DQ pairs computed in float32 for ONNX Runtime's CPU sessions: the same bits as ONNX Runtime's
own float8 kernels, only where the pair is what `--precision fp8` writes, never in the caller's model."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_linear_model, calib_inputs
from segquant_onnx import QuantConfig, quantize
from segquant_onnx.ir.fp8_emulation import emulate_fp8_activations
from segquant_onnx.ir.runtime import make_session


def scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def e4m3_zero(name: str, shape=()) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(shape), [0.0] * int(np.prod(shape)))


def qdq_model(q_attrs=None, scale=None, zero=None, q_is_output=False, opset=19, typed_input=True,
              extra_consumer=False) -> onnx.ModelProto:
    """x -> QuantizeLinear(s = 0.37) -> two DequantizeLinear (scales 0.37 and 0.5) -> y1, y2."""
    scale = scale if scale is not None else scalar("s", 0.37)
    zero = zero if zero is not None else e4m3_zero("zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q", **(q_attrs or {})),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y1"], name="dq1"),
             helper.make_node("DequantizeLinear", ["q", "s2", "zp"], ["y2"], name="dq2")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in ("y1", "y2")]
    if q_is_output:
        outputs.append(helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, ["n"]))
    if extra_consumer:
        nodes.append(helper.make_node("Cast", ["q"], ["q_float"], to=TensorProto.FLOAT, name="cast"))
        outputs.append(helper.make_tensor_value_info("q_float", TensorProto.FLOAT, ["n"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT if typed_input else TensorProto.UNDEFINED, ["n"])
    graph = helper.make_graph(nodes, "qdq", [x], outputs, [scale, zero, scalar("s2", 0.5)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def hard_values() -> np.ndarray:
    """Every tie between neighbouring E4M3 values and its float32 neighbours, scaled by 0.37 as the Q divides; the
    subnormal range, zero, saturation, infinities; and random values over 20 octaves."""
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])
    ties = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)
    near = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)), grid])
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(200_000) * np.exp(rng.uniform(-14, 8, 200_000))
    special = [0.0, -0.0, 2.0 ** -10, -(2.0 ** -7), 447.9, 448.0, 464.0, 1e6, -1e30, np.inf, -np.inf]
    return np.concatenate([(near * np.float32(0.37)).astype(np.float32), near, spread.astype(np.float32),
                           np.array(special, np.float32)])


def plain_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """ONNX Runtime's own float8 kernels, as runtime.SessionSource runs an FP8 graph (basic level, unfused)."""
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_the_emulated_pair_gives_onnxruntimes_fp8_bits_and_leaves_the_input_model_alone():
    model = qdq_model()
    before = model.SerializeToString()
    emulated, count = emulate_fp8_activations(model)
    assert count == 1 and model.SerializeToString() == before
    ops = [n.op_type for n in emulated.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and ops.count("Where") == 1
    assert "zp" not in {t.name for t in emulated.graph.initializer}  # unread now: ONNX Runtime would warn
    onnx.checker.check_model(emulated, full_check=True)
    x = hard_values()
    want = plain_session(model).run(None, {"x": x})
    got = plain_session(emulated).run(None, {"x": x})
    for w, g in zip(want, got):
        assert w.dtype == g.dtype == np.float32
        np.testing.assert_array_equal(g, w)  # every value, ties and saturation included
    assert np.unique(want[0] / np.float32(0.37)).size > 200  # the E4M3 grid is exercised, not a few values


@pytest.mark.parametrize("case, model", [
    ("saturate=0 (out of range is NaN there)", qdq_model(q_attrs={"saturate": 0})),
    ("a scale per channel", qdq_model(scale=numpy_helper.from_array(np.array([0.37, 0.4], np.float32), "s"))),
    ("an INT8 zero point", qdq_model(zero=numpy_helper.from_array(np.array(0, np.int8), "zp"))),
    ("a nonzero FP8 zero point", qdq_model(zero=helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [1.0]))),
    ("the quantized tensor is a graph output", qdq_model(q_is_output=True)),
    ("the quantized tensor is read by more than DequantizeLinear", qdq_model(extra_consumer=True)),
    ("opset 23, the input's type unknown (it may differ from the scale's)", qdq_model(opset=23, typed_input=False)),
])
def test_what_is_not_an_fp8_activation_pair_is_left_as_it_is(case, model):
    emulated, count = emulate_fp8_activations(model)
    assert (emulated, count) == (model, 0), case


def test_opset_23_with_a_float32_input_is_rewritten():
    assert emulate_fp8_activations(qdq_model(opset=23))[1] == 1


def test_fp8_sessions_run_emulated_and_give_the_quantized_graphs_own_numbers(tmp_path, caplog):
    """An FP8 graph quantized by the pipeline (float32 rest, as the searches' analysis graphs are: a float16 rest's
    pairs are left to ONNX Runtime): make_session (emulated) and ONNX Runtime's own kernels agree to the bit on its
    feeds, and the session did emulate."""
    model = build_linear_model("matmul")
    data = calib_inputs("matmul", 8)
    np.savez(tmp_path / "calib.npz", X=data)
    config = QuantConfig.preset("fast", precision={"format": "fp8", "high_precision": "fp32"})
    result = quantize(model, tmp_path / "calib.npz", config, progress=False, evaluate=False)
    quantized = result.model
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) >= 2
    with caplog.at_level(logging.DEBUG, logger="segquant_onnx.ir.runtime"):
        emulated = make_session(quantized, None)
    assert any("FP8 activation Q/DQ computed in float32" in r.getMessage() for r in caplog.records)
    plain = plain_session(quantized)
    for x in data:
        want = plain.run(None, {"X": x[None]})
        got = emulated.run(None, {"X": x[None]})
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w)
