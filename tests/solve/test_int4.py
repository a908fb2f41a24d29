"""INT4 weights: the grid (round half to even, saturation at -8 / 7), block scales and their per-site block,
packing two values a byte, all against numpy references and ONNX Runtime's own QuantizeLinear."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from segquant_onnx.formats import INT4, INT8, int4_scheme, scheme_of, site_block
from segquant_onnx.ir.graph_io import export_model
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.qdq import dequantized_weight_input, quantized_weight
from segquant_onnx.solve.fit import site_weight_scales
from segquant_onnx.solve.quant_math import weight_scales


def ref_block_scales(w: np.ndarray, axis: int, block: int) -> np.ndarray:
    """Loop reference: abs-max of each block of `block` input channels per output channel, / 7."""
    kn = w if axis == 1 else w.T  # [K, N]
    k, n = kn.shape
    out = np.zeros((-(-k // block), n), np.float64)
    for b in range(out.shape[0]):
        out[b] = np.abs(kn[b * block:(b + 1) * block]).max(axis=0)
    out = np.maximum(out, 1e-8) / 7
    return (out if axis == 1 else out.T).astype(np.float32)


@pytest.mark.parametrize("shape,axis,block", [((256, 24), 1, 128), ((24, 256), 0, 128), ((96, 5), 1, 32),
                                              ((5, 96), 0, 16), ((300, 3), 1, 128)])
def test_block_scales_match_a_loop_reference(shape, axis, block):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    w[3] *= 40  # one row far larger: its blocks get their own scale
    np.testing.assert_array_equal(weight_scales(w, axis, 7, block), ref_block_scales(w, axis, block))


def test_int4_grid_rounds_half_to_even_and_saturates():
    x = np.array([-9.0, -8.6, -8.0, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 6.5, 7.0, 7.4, 100.0], np.float32)
    q = INT4.quantize(x, np.float32(1.0))
    assert q.dtype == ml_dtypes.int4
    assert q.astype(int).tolist() == [-8, -8, -8, -2, -2, 0, 0, 2, 2, 6, 7, 7, 7]


def test_block_quantize_matches_onnxruntime():
    """Our INT4 quantize with block scales against ONNX Runtime's QuantizeLinear(axis, block_size) at opset 21."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 6)) * 3).astype(np.float32)
    s = weight_scales(w, 1, 7, 16) * np.float32(0.6)  # scales too small for the largest values: saturation shows
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["q4"], axis=0, block_size=16),
             helper.make_node("Cast", ["q4"], ["q"], to=TensorProto.INT8)]  # ORT hands no INT4 array to numpy
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape)],
                              [helper.make_tensor_value_info("q", TensorProto.INT8, w.shape)],
                              [numpy_helper.from_array(s, "s"),
                               numpy_helper.from_array(np.zeros(s.shape, ml_dtypes.int4), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    ort_q = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"w": w})[0]
    ours = INT4.quantize(w, s, 1)
    assert (ours.astype(int) == 7).any() and (ours.astype(int) == -8).any()
    np.testing.assert_array_equal(ours.astype(int), ort_q.astype(int))
    # and fake_quant is that grid times the block's scale
    np.testing.assert_allclose(INT4.fake_quant(w, s, 1), ours.astype(np.float64) * np.repeat(s, 16, axis=0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("k,block,want", [(1024, 128, 128), (192, 128, 64), (64, 128, 64), (48, 128, 16),
                                          (300, 128, None), (8, 128, None), (256, 32, 32)])
def test_site_block_is_the_largest_whole_power_of_two(k, block, want):
    assert site_block(k, block) == want


def test_site_weight_scales_pick_the_sites_block():
    w = np.random.default_rng(2).standard_normal((192, 8)).astype(np.float32)
    scheme = int4_scheme(INT8, 128)
    assert site_weight_scales(w, 1, scheme).shape == (3, 8)  # 192 = 3 x 64: blocks of 64, not a short 128
    assert site_weight_scales(w.T, 0, scheme).shape == (8, 3)
    assert site_weight_scales(w, 1, scheme_of(INT8)).shape == (8,)  # INT8: per channel


@pytest.mark.parametrize("shape", [(64, 6), (32, 5), (16, 3)])
def test_int4_weights_are_stored_packed_and_read_back(shape):
    """Two values a byte (an odd count rounds up), through the DequantizeLinear that reads them."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    x = gs.Variable("x", np.float32, (2, shape[0]))
    y = gs.Variable("y", np.float32, (2, shape[1]))
    node = gs.Node("MatMul", "mm", inputs=[x, gs.Constant("w", w)], outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=21)
    fmt = int4_scheme(None, 128).weights
    scale = site_weight_scales(w, 1, int4_scheme(None, 128))
    wq, ws = quantized_weight(node.inputs[1], scale, 1, fmt)
    dequantized_weight_input(graph, Namer(graph), "mm", node, 1, wq, ws, 1, fmt=fmt)
    graph.cleanup().toposort()
    model = export_model(graph)
    inits = {t.name: t for t in model.graph.initializer}
    stored = inits["mm/weight_quantized"]
    assert stored.data_type == TensorProto.INT4 and len(stored.raw_data) == -(-np.prod(shape) // 2)
    np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(int), wq.astype(int))
    assert inits["mm/weight_zero_point"].data_type == TensorProto.INT4
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": shape[0]}  # K <= 128: one whole block of K
    onnx.checker.check_model(model, full_check=True)
    from segquant_onnx.ir.runtime import make_session
    xv = rng.standard_normal((2, shape[0])).astype(np.float32)
    out = make_session(model, None).run(None, {"x": xv})[0]
    np.testing.assert_allclose(out, xv @ (wq.astype(np.float32) * ws), rtol=1e-5, atol=1e-5)
