"""The rewrite stage (passes.rewrite_all, rewrite.apply_quantization) and the analysis gates on top of it.

On the tiny MatMul model of conftest (fc1: X -> MatMul, fc2: quick-GELU -> MatMul), quantized with
every pass acting: fc1 with two outlier channels and smoothing, fc2 with DualScale.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from conftest import build_linear_model, calib_inputs, run_model
from segquant_onnx.analysis.gates import gate_name, gated_graph
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.ir.finalize import assert_dedicated_dq
from segquant_onnx.ir.graph_io import constant_values, export_model
from segquant_onnx.ir.linear import scale_input_channels, zero_input_channels
from segquant_onnx.params import DualParams, Quantization, SiteParams
from segquant_onnx.passes import QuantizedSite, detect_all, passes, rewrite_all
from segquant_onnx.passes.base import QUANTIZE
from segquant_onnx.rewrite import apply_quantization
from segquant_onnx.solve.quant_math import scale_from_amax, weight_scales

OUTLIERS = np.array([0, 3], np.int64)
SMOOTH = np.linspace(0.5, 2.0, 16).astype(np.float32)
FEEDS = [{"X": x[None]} for x in calib_inputs("matmul", n=4, seed=7)]


def planned():
    model = build_linear_model("matmul")
    graph = canonicalize(gs.import_onnx(model))
    return model, graph, detect_all(graph)


def outputs(model: onnx.ModelProto, feeds=FEEDS, **extra) -> np.ndarray:
    return np.stack([run_model(model, {**f, **extra})[0] for f in feeds])


def activations(graph: gs.Graph, names: list[str]) -> dict[str, np.ndarray]:
    model = export_model(graph.copy())
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    runs = [run_model(model, f)[1:] for f in FEEDS]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def quantization(graph: gs.Graph, plan) -> Quantization:
    """Valid scales from the float activations: fc1 outliers + smoothing, fc2 DualScale."""
    fc1, fc2 = plan.sites
    acts = activations(graph, [fc1.activation, fc2.activation])
    weights = {t.name: constant_values(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    bulk = acts[fc1.activation].copy()
    bulk[..., OUTLIERS] = 0
    amax = float(np.abs(bulk / SMOOTH).max())
    w1 = scale_input_channels(zero_input_channels(weights[fc1.weight], fc1, OUTLIERS), fc1, SMOOTH)
    p1 = SiteParams(amax, float(scale_from_amax(amax)), weight_scales(w1, 1), "max", smooth=SMOOTH, alpha=0.5)
    a2 = acts[fc2.activation]
    p2 = DualParams(float(a2.max()) / 127, float(-a2.min()) / 128, weight_scales(weights[fc2.weight], 1))
    return Quantization({fc1.name: p1}, {fc2.name: p2}, {fc1.name: OUTLIERS})


def ops(graph: gs.Graph) -> dict[str, int]:
    found = [n.op for n in graph.cleanup().toposort().nodes]
    return {op: found.count(op) for op in sorted(set(found))}


# -- rewrite_all ---------------------------------------------------------------------------------
def test_with_every_site_left_in_float_nothing_changes():
    model, graph, plan = planned()
    before = outputs(export_model(graph.copy()))
    q = Quantization({}, {}, {}, floating=frozenset(s.name for s in plan.sites))
    assert rewrite_all(graph, plan, q) == []
    assert "QuantizeLinear" not in ops(graph) and "DequantizeLinear" not in ops(graph)
    np.testing.assert_array_equal(outputs(export_model(graph)), before)
    np.testing.assert_allclose(before, outputs(model), rtol=1e-5, atol=1e-6)


def test_the_structural_rewrites_without_qdq_are_exact_in_float():
    model, graph, plan = planned()
    q = quantization(graph, plan)
    sites = list(plan.sites)
    for p in passes():
        if p.stage == QUANTIZE and p.name not in ("dual_scale_activations", "quantize_linear_inputs"):
            sites = p.rewrite(graph, sites, q)
    assert ops(graph)["Gather"] == 1 and ops(graph)["MatMul"] == 3  # fc1 bulk + outliers, fc2
    assert "QuantizeLinear" not in ops(graph)
    ref = outputs(model)
    np.testing.assert_allclose(outputs(export_model(graph)), ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_with_every_pass_the_structure_is_outliers_smoothing_dualscale_and_qdq():
    model, graph, plan = planned()
    q = quantization(graph, plan)
    sites = rewrite_all(graph, plan, q)
    assert all(isinstance(s, QuantizedSite) for s in sites)
    assert {s.name: [(i.layer, i.part) for i in s.quantized] for s in sites} == {
        "fc1": [("fc1", "input"), ("fc1", "weight")],
        "fc2": [("fc2/pos", "input"), ("fc2/neg", "input"), ("fc2/pos", "weight"), ("fc2/neg", "weight")]}
    assert ops(graph) == {
        "Add": 3,  # fc1's bias, the outlier branch, the two DualScale branches
        "DequantizeLinear": 6,  # fc1 input + weight, fc2 pos/neg inputs + weights
        "Gather": 1, "MatMul": 4,  # fc1 bulk + outlier branch, fc2 pos + neg
        "Min": 1, "Mul": 4,  # the GELU's two, the bulk mask, the smoothing
        "QuantizeLinear": 3, "Relu": 1, "Sigmoid": 1}
    assert_dedicated_dq(graph)
    for s in sites:
        for qi in s.quantized:
            assert qi.consumer.inputs[qi.index] is qi.dequantized and qi.dequantized.inputs[0].op == "DequantizeLinear"
    ref, got = outputs(model), outputs(export_model(graph))
    sqnr = 10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum())
    assert 33.5 < sqnr < 80  # quantized (not float), and quantized sensibly: measured 35.61


def test_the_stage_function_reports_the_quantized_inputs_by_site():
    _, graph, plan = planned()
    q = quantization(graph, plan)
    q.floating = frozenset({"fc1"})
    quantized = apply_quantization(graph, plan, q)
    assert list(quantized) == ["fc2"] and len(quantized["fc2"]) == 4
    assert ops(graph)["QuantizeLinear"] == 2 and "Gather" not in ops(graph)


# -- the analysis gates on top -------------------------------------------------------------------
@pytest.fixture(scope="module")
def gated():
    model, graph, plan = planned()
    q = quantization(graph, plan)
    analysis = export_model(gated_graph(graph, plan, q).cleanup().toposort())
    production = graph.copy()
    rewrite_all(production, plan, q)
    return model, graph, plan, q, analysis, outputs(export_model(production))


def gates(fc1: float, fc2: float) -> dict[str, np.ndarray]:
    return {gate_name("fc1"): np.array(fc1, np.float32), gate_name("fc2"): np.array(fc2, np.float32)}


def test_gated_graph_leaves_its_input_graph_unquantized(gated):
    _, graph, *_ = gated
    assert "QuantizeLinear" not in ops(graph)


def test_gates_are_scalar_graph_inputs_named_by_site_and_dualscale_blends_its_weight_once(gated):
    _, _, _, _, analysis, _ = gated
    assert [(i.name, i.type.tensor_type.shape.dim) for i in analysis.graph.input[1:]] == [
        ("gate/fc1", []), ("gate/fc2", [])]
    blends = sorted(n.name for n in analysis.graph.node if n.name.endswith("_gate_add"))
    assert blends == ["fc1/input_gate_add", "fc1/weight_gate_add", "fc2/neg/input_gate_add",
                      "fc2/pos/input_gate_add", "fc2/pos/weight_gate_add"]
    weight_of = {n.name: n.input[1] for n in analysis.graph.node if n.op_type == "MatMul"}
    assert weight_of["fc2"] == weight_of["fc2/neg/MatMul"] == "fc2/pos/weight_gated"
    assert {i.name for i in analysis.graph.initializer} >= {"fc1/weight_float", "fc2/pos/weight_float"}


def test_all_gates_0_is_the_float_model(gated):
    model, _, _, _, analysis, production = gated
    ref = outputs(model)
    got = outputs(analysis, **gates(0, 0))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    assert np.abs(production - ref).max() > 100 * np.abs(got - ref).max()  # far from quantized


def test_all_gates_1_is_the_production_quantized_graph(gated):
    model, _, _, _, analysis, production = gated
    got = outputs(analysis, **gates(1, 1))
    err = np.abs(got - production).max()
    assert err <= 1e-5 * float(np.abs(production).max())  # x + (DQ(Q(x)) - x) rounds within an ulp of DQ(Q(x))
    assert np.abs(outputs(model) - production).max() > 100 * err


def test_one_gate_open_is_that_site_alone_quantized(gated):
    _, graph, plan, q, analysis, _ = gated
    only_fc2 = graph.copy()
    rewrite_all(only_fc2, plan, Quantization(q.params, q.dual, q.outliers, floating=frozenset({"fc1"})))
    expected = outputs(export_model(only_fc2))
    got = outputs(analysis, **gates(0, 1))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))
    assert np.abs(outputs(analysis, **gates(1, 0)) - expected).max() > 100 * np.abs(got - expected).max()


def test_a_gated_session_with_its_weights_dequantized_once_computes_the_same(gated):
    """Sensitivity's sessions fold each weight's DequantizeLinear (runtime.SessionSource.fold_dequantize): the same
    outputs at every gate setting as the session that dequantizes on every run."""
    from segquant_onnx.ir.runtime import make_session

    *_, analysis, _ = gated
    plain, folded = make_session(analysis, None), make_session(analysis, None, fold_dequantize=True)
    assert folded.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        plain.get_session_options().get_session_config_entry("session.disable_quant_qdq")
    for setting in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        for feed in FEEDS:
            want = plain.run(None, {**feed, **gates(*setting)})
            got = folded.run(None, {**feed, **gates(*setting)})
            for w, g in zip(want, got):
                np.testing.assert_array_equal(g, w)


def test_folding_a_session_that_already_runs_without_qdq_fusions_sets_the_option_once(gated, capfd):
    """FP8 sessions (and large 16-bit ones) set session.disable_quant_qdq themselves: a gated one sets it once
    (ONNX Runtime warns when a key is set twice)."""
    import logging

    import onnxruntime as ort

    from segquant_onnx.ir.runtime import SessionSource

    *_, analysis, _ = gated
    logger = logging.getLogger("segquant_onnx")
    level = logger.level
    logger.setLevel(logging.INFO)  # -v: ONNX Runtime's warnings shown
    try:
        capfd.readouterr()
        source = SessionSource(analysis.SerializeToString(), None, None, False, True, fold_dequantize=True)
        session = source.open()
        err = capfd.readouterr().err
    finally:
        logger.setLevel(level)
        ort.set_default_logger_severity(3)
    assert session.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    assert "already exists" not in err
