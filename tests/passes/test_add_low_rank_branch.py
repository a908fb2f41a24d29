"""AddLowRankBranch and the low-rank split: W = L1 @ L2 + R exactly, the rewrite exact in float (property test
over shapes and ranks), and what a quantized model with low-rank branches holds and reports."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import helper

from conftest import build_linear_model, calib_inputs, fvi, make_model, run_model, save
from segquant_onnx.config import QuantConfig
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.ir.graph_io import export_model, import_graph
from segquant_onnx.ir.linear import as_kn
from segquant_onnx.params import Quantization, SiteParams
from segquant_onnx.passes import AddLowRankBranch, detect_all
from segquant_onnx.pipeline import quantize
from segquant_onnx.solve.low_rank import low_rank_flops, low_rank_split


def test_split_is_exact_and_the_best_rank_r_approximation():
    w = np.random.default_rng(0).standard_normal((48, 20))
    l1, l2, r = low_rank_split(w, 6)
    assert l1.shape == (48, 6) and l2.shape == (6, 20)
    np.testing.assert_allclose(l1 @ l2 + r, w, rtol=0, atol=1e-12)
    s = np.linalg.svd(w, compute_uv=False)
    assert np.isclose(np.linalg.norm(r), np.sqrt((s[6:] ** 2).sum()))  # Eckart-Young: nothing better at rank 6


def _rewritten(model: onnx.ModelProto, rank: int):
    """The model with a rank-`rank` branch on every site (no Q/DQ: every site left out of quantization)."""
    graph = canonicalize(import_graph(model), "test", 13)
    plan = detect_all(graph, dualscale=False)
    weights = {t.name: t.values for t in graph.tensors().values() if hasattr(t, "values") and t.name}
    params = {}
    for site in plan.sites:
        l1, l2, _ = low_rank_split(as_kn(weights[site.weight], site), rank)
        params[site.name] = SiteParams(1.0, 1.0, np.ones(1, np.float32), "max",
                                       low_rank=(l1.astype(np.float32), l2.astype(np.float32)))
    AddLowRankBranch().rewrite(graph, list(plan.sites), Quantization(params, {}, {}))
    return export_model(graph), plan


@settings(max_examples=15, deadline=None)
@given(k=st.integers(2, 40), n=st.integers(2, 40), rank=st.integers(1, 12), trans_b=st.booleans(),
       gemm=st.booleans())
def test_the_rewrite_is_exact_in_float(k, n, rank, trans_b, gemm):
    rng = np.random.default_rng(k * 100 + n)
    w = rng.standard_normal((n, k) if gemm and trans_b else (k, n)).astype(np.float32)
    node = (helper.make_node("Gemm", ["X", "W", "C"], ["Y"], name="g", transB=int(trans_b)) if gemm
            else helper.make_node("MatMul", ["X", "W"], ["Y"], name="g"))
    inits = {"W": w, **({"C": rng.standard_normal(n).astype(np.float32)} if gemm else {})}
    model = make_model([node], [fvi("X", [3, k])], [fvi("Y", [3, n])], inits)
    out, _ = _rewritten(model, rank)
    ops = sorted(n.op_type for n in out.graph.node)
    assert ops == sorted(["Add", "MatMul", "MatMul", "Gemm" if gemm else "MatMul"])
    x = rng.standard_normal((3, k)).astype(np.float32)
    want = run_model(model, {"X": x})[0]
    np.testing.assert_allclose(run_model(out, {"X": x})[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("precision", ["int8", "w4a16"])
def test_a_quantized_model_keeps_its_branches_in_float_and_reports_them(tmp_path, precision):
    src = save(build_linear_model("matmul", hidden=64), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", n=8))
    config = QuantConfig(precision={"format": precision, "low_rank": 8, "high_precision": "fp32"},
                         dualscale={"mode": "off"})
    result = quantize(str(src), str(tmp_path / "c.npz"), config, output=tmp_path / "q.onnx", progress=False)
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name for t in model.graph.initializer}
    for site in result.plan.sites:
        assert f"{site.name}/low_rank_l1_weight" in inits and f"{site.name}/low_rank_l2_weight" in inits
        add = next(n for n in model.graph.node if n.name == f"{site.name}/low_rank_add")
        assert add.op_type == "Add"
    rows = {r["name"]: r for r in result.report["sites"]}
    assert rows["fc1"]["low_rank"] == 8 and rows["fc1"]["low_rank_flops"] == low_rank_flops(8, 16, 64, 2 * 8 * 16 * 64)
    s = result.report["summary"]
    assert s["low_rank_sites"] == 2 and s["low_rank_extra_flop_pct"] == pytest.approx(
        100 * sum(r["low_rank_flops"] for r in rows.values()) / result.plan.total_flops, abs=1e-3)
    # the low-rank branch soaks up the weight's largest directions: the output is closer than without it
    without = quantize(str(src), str(tmp_path / "c.npz"), config.updated(precision={"low_rank": 0}),
                       progress=False)
    assert result.report["output_error"]["Y"]["sqnr_db"] > without.report["output_error"]["Y"]["sqnr_db"]


def test_auto_rank_takes_a_branch_where_the_weight_is_low_rank_and_cheap_enough():
    from segquant_onnx.formats import INT8, int4_scheme
    from segquant_onnx.plan import LinearSite
    from segquant_onnx.solve.fit import auto_rank

    rng = np.random.default_rng(0)
    wide = LinearSite("wide", "MatMul", "x", "w", (512, 512), 1, 2 * 512 * 512)
    rows = rng.standard_normal((64, 512)).astype(np.float32)
    structured = (rng.standard_normal((512, 8)) @ rng.standard_normal((8, 512)) * 3
                  + 0.05 * rng.standard_normal((512, 512))).astype(np.float32)  # a few large directions
    assert auto_rank(wide, structured, None, rows, int4_scheme(None)) == 16  # 32 costs 12.5% of the site: too much
    noise = rng.standard_normal((512, 512)).astype(np.float32)  # no direction stands out: a branch buys little
    assert auto_rank(wide, noise, None, rows, int4_scheme(None)) == 0
    narrow = LinearSite("narrow", "MatMul", "x", "w", (64, 64), 1, 2 * 64 * 64)  # rank 16 would add 50%
    assert auto_rank(narrow, structured[:64, :64], None, rows[:, :64], INT8) == 0
