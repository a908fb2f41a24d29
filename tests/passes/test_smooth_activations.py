"""SmoothActivations: the structure it writes, exactness in float (ONNX Runtime vs the original graph),
and that a smoothed site then quantizes to fq(X / s) @ fq(s * W).

Tiny graphs `X -> MatMul | Gemm(transB=0/1) -> Y` built with onnx.helper; the smoothing vector comes
in a SiteParams, as solve hands it over. Float tolerance: the float32 accumulation bound
(K + 4) * 2^-23 * |X| |W| (two extra roundings: X * (1/s) and s * W).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.printer
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import run_model
from segquant_onnx.ir.graph_io import export_model
from segquant_onnx.passes import FindLinearSites, QuantizeLinearInputs, SmoothActivations
from segquant_onnx.plan import QuantPlan
from segquant_onnx.solve.quant_math import scale_from_amax, smoothing_vector, weight_scales
from segquant_onnx.params import Quantization, SiteParams

EPS32 = 2.0**-23
VARIANTS = ("MatMul", "MatMul3d", "Gemm_transB0", "Gemm_transB1")


def linear_model(variant: str, m: int, k: int, n: int, seed: int = 0, transA: int = 0) -> onnx.ModelProto:
    """One linear `lin` reading graph input X; a second node `other` also reads X (it must keep X)."""
    rng = np.random.default_rng(seed)
    trans_b = variant == "Gemm_transB1"
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    if variant.startswith("MatMul"):
        x_shape = [2, m, k] if variant == "MatMul3d" else [m, k]
        node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")
    else:
        x_shape = [k, m] if transA else [m, k]
        node = helper.make_node("Gemm", ["X", "W"], ["Y"], name="lin", transB=int(trans_b), transA=transA)
    y_shape = x_shape[:-1] + [n] if not transA else [m, n]
    other = helper.make_node("Neg", ["X"], ["Z"], name="other")
    graph = helper.make_graph(
        [node, other], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, x_shape)],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def params_with(smooth: np.ndarray | None, n: int, act_scale: float = 1 / 127,
                weight_scale: np.ndarray | None = None) -> SiteParams:
    ws = np.ones(n, np.float32) if weight_scale is None else weight_scale
    return SiteParams(act_amax=act_scale * 127, act_scale=act_scale, weight_scale=ws, method="max",
                      smooth=smooth, alpha=None if smooth is None else 0.5)


def find_sites(graph: gs.Graph) -> list:
    return list(FindLinearSites().detect(graph, QuantPlan(sites=())).sites)


def smooth(graph: gs.Graph, sites: list, params: dict[str, SiteParams]) -> list:
    return SmoothActivations().rewrite(graph, sites, Quantization(params, {}, {}))


def smooth_graph(model: onnx.ModelProto, params: dict[str, SiteParams]):
    graph = gs.import_onnx(model)
    sites = find_sites(graph)
    updated = smooth(graph, sites, params)
    return graph, sites, updated


def as_kn(w: np.ndarray, variant: str) -> np.ndarray:
    return w.T if variant == "Gemm_transB1" else w


def float_bound(x: np.ndarray, w_kn: np.ndarray) -> np.ndarray:
    k = w_kn.shape[0]
    return (k + 4) * EPS32 * (np.abs(x.astype(np.float64)) @ np.abs(w_kn.astype(np.float64))) + 1e-30


def random_smooth(k: int, seed: int) -> np.ndarray:
    """Positive, over four decades (what SmoothQuant produces on outlier channels)."""
    return (10.0 ** np.random.default_rng(seed).uniform(-2, 2, k)).astype(np.float32)


# -- structure ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_rewrite_inserts_one_mul_by_inverse_s_and_folds_s_into_the_weight(variant):
    m, k, n = 4, 6, 5
    model = linear_model(variant, m, k, n)
    w = numpy_helper.to_array(model.graph.initializer[0])
    s = random_smooth(k, 1)
    graph, sites, updated = smooth_graph(model, {"lin": params_with(s, n)})

    muls = [nd for nd in graph.nodes if nd.op == "Mul"]
    assert [nd.name for nd in muls] == ["lin/smooth"]
    mul = muls[0]
    assert mul.inputs[0].name == "X"
    np.testing.assert_array_equal(mul.inputs[1].values, (1.0 / s).astype(np.float32))
    lin = next(nd for nd in graph.nodes if nd.name == "lin")
    assert lin.inputs[0] is mul.outputs[0]
    expected_w = w * (s[None, :] if variant == "Gemm_transB1" else s[:, None])
    np.testing.assert_array_equal(lin.inputs[1].values, expected_w)
    assert lin.inputs[1].values.dtype == np.float32
    # the other reader of X still reads X; the site now reads the Mul output and the smoothed weight
    other = next(nd for nd in graph.nodes if nd.name == "other")
    assert other.inputs[0].name == "X"
    assert updated[0].activation == mul.outputs[0].name == "lin/smoothed_input"
    assert updated[0].weight == lin.inputs[1].name == "lin/smoothed_weight"
    assert (updated[0].op, updated[0].weight_axis, updated[0].flops) == (sites[0].op, sites[0].weight_axis,
                                                                         sites[0].flops)


@pytest.mark.parametrize("params", [{}, {"lin": params_with(None, 5)}], ids=["no-params", "smooth-None"])
def test_sites_without_a_smoothing_vector_are_left_alone(params):
    model = linear_model("MatMul", 4, 6, 5)
    graph, sites, updated = smooth_graph(model, params)
    assert updated == sites
    assert [nd.op for nd in graph.nodes] == ["MatMul", "Neg"]
    assert onnx.printer.to_text(export_model(graph).graph) == onnx.printer.to_text(model.graph)


def test_sites_sharing_an_input_each_get_their_own_mul():
    """q/k/v projections read one tensor: each gets its own smoothed copy (its own activation scale)."""
    rng = np.random.default_rng(0)
    w = {f"W{i}": rng.standard_normal((6, 4)).astype(np.float32) for i in range(3)}
    nodes = [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"], name=f"proj{i}") for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 6])],
                              [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [3, 4]) for i in range(3)],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    params = {f"proj{i}": params_with(random_smooth(6, i), 4) for i in (0, 2)}  # proj1 not smoothed
    g, _, updated = smooth_graph(model, params)
    muls = sorted(nd.name for nd in g.nodes if nd.op == "Mul")
    assert muls == ["proj0/smooth", "proj2/smooth"]
    assert [u.activation for u in updated] == ["proj0/smoothed_input", "X", "proj2/smoothed_input"]
    x = np.random.default_rng(9).standard_normal((3, 6)).astype(np.float32)
    ref, got = run_model(model, {"X": x}), run_model(export_model(g), {"X": x})
    for i, (r, o) in enumerate(zip(ref, got)):
        np.testing.assert_allclose(o, r, rtol=0, atol=float(float_bound(x, w[f"W{i}"]).max()))


def test_a_site_that_no_longer_matches_the_plan_is_an_invariant_error():
    model = linear_model("MatMul", 4, 6, 5)
    graph = gs.import_onnx(model)
    sites = find_sites(graph)
    smooth(graph, sites, {"lin": params_with(random_smooth(6, 0), 5)})
    with pytest.raises(RuntimeError, match="smooth_activations: site lin no longer matches"):
        smooth(graph, sites, {"lin": params_with(random_smooth(6, 0), 5)})


# -- exact in float ------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(variant=st.sampled_from(VARIANTS), m=st.integers(1, 8), k=st.integers(1, 48), n=st.integers(1, 24),
       seed=st.integers(0, 2**16))
def test_smoothing_without_quantization_is_exact_within_float_rounding(variant, m, k, n, seed):
    model = linear_model(variant, m, k, n, seed)
    w = numpy_helper.to_array(model.graph.initializer[0])
    graph, _, _ = smooth_graph(model, {"lin": params_with(random_smooth(k, seed + 1), n)})
    smoothed = export_model(graph.cleanup().toposort())
    onnx.checker.check_model(smoothed)
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed + 2).standard_normal(x_shape).astype(np.float32)
    (ref_y, ref_z), (got_y, got_z) = run_model(model, {"X": x}), run_model(smoothed, {"X": x})
    np.testing.assert_array_equal(got_z, ref_z)
    bound = float_bound(x, as_kn(w, variant))
    assert (np.abs(got_y.astype(np.float64) - ref_y) <= bound).all(), \
        f"max excess {np.max(np.abs(got_y - ref_y) - bound)}"


def test_smoothing_gemm_with_transposed_activation_is_exact():
    k = 6
    model = linear_model("Gemm_transB0", m=k, k=k, n=5, transA=1)
    w = numpy_helper.to_array(model.graph.initializer[0])
    graph = gs.import_onnx(model)
    sites = find_sites(graph)
    assert len(sites) == 1  # the pass accepts the site (nothing declines transA)
    smooth(graph, sites, {"lin": params_with(random_smooth(k, 3), 5)})
    x = np.random.default_rng(4).standard_normal((k, k)).astype(np.float32)  # A stored [K, M]
    ref, got = run_model(model, {"X": x})[0], run_model(export_model(graph), {"X": x})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=float(float_bound(x.T, w).max()))


# -- then quantized: fq(X / s) @ fq(s W) --------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_smoothed_site_quantizes_to_the_smoothed_fake_quant_formula(variant):
    m, k, n = 8, 16, 12
    model = linear_model(variant, m, k, n, seed=5)
    w = numpy_helper.to_array(model.graph.initializer[0])
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(6).standard_normal(x_shape).astype(np.float32)
    x[..., :2] *= 40  # outlier channels
    axis = 0 if variant == "Gemm_transB1" else 1
    s = smoothing_vector(np.abs(x).reshape(-1, k).max(axis=0), np.abs(w).max(axis=axis), 0.5)
    w_s = w * (s[None, :] if axis == 0 else s[:, None])
    act_scale = float(scale_from_amax(np.abs(x / s).max()))
    p = params_with(s, n, act_scale, weight_scales(w_s, axis))
    graph, _, updated = smooth_graph(model, {"lin": p})
    QuantizeLinearInputs().rewrite(graph, updated, Quantization({"lin": p}, {}, {}))
    got = run_model(export_model(graph.cleanup().toposort()), {"X": x})[0]

    xq = np.clip(np.rint((x / s).astype(np.float32) / np.float32(act_scale)), -128, 127) * np.float64(act_scale)
    ws = p.weight_scale.astype(np.float64)
    wq = np.clip(np.rint(w_s / (ws[:, None] if axis == 0 else ws[None, :]).astype(np.float32)), -128, 127)
    wq = wq * (ws[:, None] if axis == 0 else ws[None, :])
    ref = xq @ as_kn(wq, variant)
    np.testing.assert_allclose(got, ref, rtol=0, atol=float(float_bound(xq, as_kn(wq, variant)).max()))
    # and a good quantization of the original product (SmoothQuant's s at alpha 0.5: measured 44.5-49.2 dB)
    y = x.astype(np.float64) @ as_kn(w, variant)
    assert 10 * np.log10((y**2).sum() / ((y - got) ** 2).sum()) > 38
