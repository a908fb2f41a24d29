"""W4A16 and W4A8 end to end: the Q/DQ written around each site, the numbers (ONNX Runtime against a numpy
forward pass built from the stored INT4 weights, block scales and activation scales), the 2-D layout W4A8
needs (exact in float), TensorRT's rules and TensorRT-RTX's build."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import GELU_ALPHA, build_linear_model, calib_inputs, make_model, fvi, run_model, save
from segquant_onnx.config import QuantConfig
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.ir.graph_io import export_model, import_graph
from segquant_onnx.ir.runtime import make_session
from segquant_onnx.passes import FlattenLinearsTo2D
from segquant_onnx.pipeline import quantize
from segquant_onnx.tensorrt.check import check_tensorrt


def plain(precision: str, **groups) -> QuantConfig:
    """Max calibration, no DualScale, a float32 rest: what the numpy reference computes."""
    return QuantConfig(calibration={"method": "max"}, dualscale={"mode": "off"},
                       precision={"format": precision, "high_precision": "fp32"}, **groups)


def _attr(node, name):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


class Stored:
    """What the quantized model stores around each MatMul: the dequantized [K, N] weight and the activation
    scale (None: weight-only)."""

    def __init__(self, model: onnx.ModelProto):
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.model = model

    def weight(self, node) -> np.ndarray:
        dq = self.producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        q, s = self.inits[dq.input[0]], self.inits[dq.input[1]]
        assert q.dtype.name == "int4" and s.ndim == 2
        axis, block = _attr(dq, "axis"), _attr(dq, "block_size")
        assert q.shape[axis] == block * s.shape[axis]  # whole blocks only
        assert not self.inits[dq.input[2]].astype(int).any()  # symmetric
        w = q.astype(np.float64) * np.repeat(s.astype(np.float64), block, axis=axis)
        return w if node.op_type == "MatMul" or not _attr(node, "transB") else w.T

    def act_scale(self, node) -> float | None:
        dq = self.producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producer[dq.input[0]]
        assert q.op_type == "QuantizeLinear" and self.inits[q.input[2]].dtype == np.int8
        return float(self.inits[q.input[1]])


def fq8(x, scale):
    return x if scale is None else np.clip(np.rint(x / scale), -128, 127) * scale


def reference(model: onnx.ModelProto, kind: str, x: np.ndarray) -> np.ndarray:
    """The two-layer model (conftest.build_linear_model) in float64 from what `model` stores."""
    st = Stored(model)
    site = {n.name: n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}
    b = linear_weights_of(kind)
    h = fq8(x.reshape(-1, x.shape[-1]).astype(np.float64), st.act_scale(site["fc1"])) @ st.weight(site["fc1"]) + b["b1"]
    g = h / (1 + np.exp(-GELU_ALPHA * h))
    y = fq8(g, st.act_scale(site["fc2"])) @ st.weight(site["fc2"])
    return y + b.get("b2", 0)


def linear_weights_of(kind):
    from conftest import linear_weights
    return {k: v.astype(np.float64) for k, v in linear_weights(kind, hidden=64).items()}


@pytest.mark.parametrize("kind", ["matmul", "gemm"])
@pytest.mark.parametrize("precision,weights", [("w4a16", {}), ("w4a8", {}),
                                               ("w4a16", {"weight_rounding": "gptq", "weight_clip": True}),
                                               ("w4a8", {"weight_rounding": "gptq", "weight_clip": True})])
def test_int4_sites_compute_what_they_store(tmp_path, kind, precision, weights):
    src = save(build_linear_model(kind, hidden=64), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs(kind, n=8))
    config = plain(precision).updated(precision=weights)
    result = quantize(str(src), str(tmp_path / "c.npz"), config, output=tmp_path / "q.onnx", progress=False)
    assert all(r["gptq"] == bool(weights) for r in result.report["sites"])
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}
    ops = [n.op_type for n in model.graph.node]
    if precision == "w4a16":
        assert "QuantizeLinear" not in ops  # weight-only
        assert ops.count("Gemm") == (2 if kind == "gemm" else 0)
    else:
        assert ops.count("QuantizeLinear") == 2 and "Gemm" not in ops  # Gemms laid out as 2-D MatMuls
        assert set(result.plan.flattened) == {"fc1", "fc2"}
    x = calib_inputs(kind, n=3, seed=7)
    out = make_session(model, None).run(None, {"X": x[: x.shape[0] // 3]})[0]
    ref = reference(model, kind, x[: x.shape[0] // 3])
    np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4)
    assert check_tensorrt(model) == []
    # the report counts the weights' bytes: INT4 is an eighth of float32's, plus its block scales
    wb = result.report["summary"]["weight_bytes"]
    assert wb["before"] == 4 * (16 * 64 + 64 * 16) and wb["before"] / 8 < wb["after"] < wb["before"] / 4


def test_w4a16_declines_conv_and_k_without_a_whole_block(tmp_path):
    w = np.random.default_rng(0).standard_normal((24, 8)).astype(np.float32)  # K = 24: no block of 16 divides it
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="odd")], [fvi("X", [4, 24])],
                       [fvi("Y", [4, 8])], {"W": w})
    np.savez(tmp_path / "c.npz", X=np.random.default_rng(1).standard_normal((8, 24)).astype(np.float32))
    src = save(model, tmp_path / "m.onnx")
    from segquant_onnx.errors import UserError
    with pytest.raises(UserError, match="K = 24 input channels is not a multiple of 16"):
        quantize(str(src), str(tmp_path / "c.npz"), plain("w4a16"), progress=False)
    conv = save(build_linear_model("conv"), tmp_path / "conv.onnx")
    np.savez(tmp_path / "cc.npz", X=calib_inputs("conv"))
    with pytest.raises(UserError, match="Conv is not quantized to INT4"):
        quantize(str(conv), str(tmp_path / "cc.npz"), plain("w4a8"), progress=False)


def _flatten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    graph = canonicalize(import_graph(model), "test", 21)
    p = FlattenLinearsTo2D(True)
    from segquant_onnx.plan import QuantPlan
    plan = p.detect(graph, QuantPlan(sites=()))
    p.rewrite(graph, list(plan.flattened))
    return export_model(graph), plan.flattened


@pytest.mark.parametrize("batch", [2, "B"])
def test_flatten_is_exact_on_3d_matmuls_static_and_dynamic(batch):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], [fvi("X", [batch, 5, 16])],
                       [fvi("Y", [batch, 5, 12])], {"W": w})
    flat, names = _flatten(model)
    assert names == ("mm",)
    mm = next(n for n in flat.graph.node if n.op_type == "MatMul")
    assert mm.name == "mm" and [n.op_type for n in flat.graph.node].count("Reshape") == 2
    for b in (2, 3) if batch == "B" else (2,):
        x = rng.standard_normal((b, 5, 16)).astype(np.float32)
        np.testing.assert_allclose(run_model(flat, {"X": x})[0], run_model(model, {"X": x})[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trans_b,bias", [(1, True), (0, True), (1, False)])
def test_flatten_turns_a_gemm_into_matmul_and_bias_add_exactly(trans_b, bias):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 16) if trans_b else (16, 12)).astype(np.float32)
    inits = {"W": w, **({"C": rng.standard_normal(12).astype(np.float32)} if bias else {})}
    node = helper.make_node("Gemm", ["X", "W", *(["C"] if bias else [])], ["Y"], name="g", transB=trans_b)
    model = make_model([node], [fvi("X", [4, 16])], [fvi("Y", [4, 12])], inits)
    flat, _ = _flatten(model)
    ops = [n.op_type for n in flat.graph.node]
    assert ops == (["MatMul", "Add"] if bias else ["MatMul"]) and flat.graph.node[0].name == "g"
    x = rng.standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_allclose(run_model(flat, {"X": x})[0], run_model(model, {"X": x})[0], rtol=1e-5, atol=1e-6)


def test_flatten_declines_a_scaled_gemm_with_its_reason():
    w = np.ones((16, 12), np.float32)
    model = make_model([helper.make_node("Gemm", ["X", "W"], ["Y"], name="g", alpha=0.5)], [fvi("X", [4, 16])],
                       [fvi("Y", [4, 12])], {"W": w})
    graph = canonicalize(import_graph(model), "test", 21)
    from segquant_onnx.plan import QuantPlan
    plan = FlattenLinearsTo2D(True).detect(graph, QuantPlan(sites=()))
    assert plan.flattened == () and "alpha or beta" in plan.declined[0].reason


def test_tensorrt_rtx_builds_w4a16_and_w4a8(tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    from segquant_onnx.tensorrt.build import build_engine

    src = save(build_linear_model("matmul", hidden=64), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", n=8))
    for precision in ("w4a16", "w4a8"):
        out = tmp_path / f"{precision}.onnx"
        quantize(str(src), str(tmp_path / "c.npz"), QuantConfig(precision={"format": precision}), output=out,
                 progress=False)
        result = build_engine(out)
        assert result.built, (precision, result.errors)


def test_w4a8_with_3d_activations_unflattened_is_what_tensorrt_refuses(tmp_path):
    """Why the 2-D layout exists: the same W4A8 site with its 3-D input left as is fails TensorRT-RTX's build
    (with two blocks or more; one block along K, which is per-channel, builds) and the checker's `block` rule
    (tests/tensorrt: `block-quantized-input`)."""
    pytest.importorskip("tensorrt_rtx_bindings")
    from segquant_onnx.tensorrt.build import build_engine
    from trt_graphs import _block

    model = _block((128, 32), (2, 32), 0, 64, quantized_input=True, x_shape=(1, 4, 128))
    assert {v.rule for v in check_tensorrt(model)} == {"block"}
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert not build_engine(tmp_path / "m.onnx").built


def test_the_readme_int4_table_comes_from_the_cli(tmp_path):
    """Two rows of the README's INT4 table, measured afresh with the flags the row shows."""
    from pathlib import Path
    import json
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for flags in ("--precision w4a16 --weight-rounding gptq", "--precision w4a8"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{flags}` |"))
        shown = float(row.split("|")[2])
        report = tmp_path / "r.json"
        subprocess.run([sys.executable, "-m", "segquant_onnx", "-q", "quantize", "--example", "-o",
                        str(tmp_path / "q.onnx"), "--force", "--report", str(report), *flags.split()],
                       check=True, capture_output=True)
        measured = json.loads(report.read_text())["output_error"]["out"]["sqnr_db"]
        assert round(measured, 2) == shown, (flags, measured, shown)


def test_weight_rounding_auto_keeps_gptq_where_it_pays_on_rows_it_did_not_fit(tmp_path):
    from segquant_onnx.formats import int4_scheme
    from segquant_onnx.params import SiteParams
    from segquant_onnx.plan import LinearSite
    from segquant_onnx.solve.fit import gptq_pays, site_weight_scales

    src = save(build_linear_model("matmul", hidden=64), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", n=8))
    result = quantize(str(src), str(tmp_path / "c.npz"), plain("w4a16").updated(precision={"weight_rounding": "auto"}),
                      progress=False)
    assert {r["name"] for r in result.report["sites"]} == {"fc1", "fc2"}
    rng = np.random.default_rng(0)
    site = LinearSite("mm", "MatMul", "x", "w", (64, 16), 1, 2 * 64 * 16)
    w = (rng.standard_normal((64, 16)) * 0.3).astype(np.float32)
    scheme = int4_scheme(None)
    p = SiteParams(1.0, 1.0, site_weight_scales(w, 1, scheme), "max")
    loading = rng.standard_normal((3, 64))
    correlated = (rng.standard_normal((400, 3)) @ loading + 0.05 * rng.standard_normal((400, 64))).astype(np.float32)
    assert gptq_pays(site, w, p, correlated, scheme)  # shared factors: moving errors between channels pays
    # one-hot rows: X^T X is diagonal, GPTQ is rounding to nearest, so it does not win
    one_hot = np.eye(64, dtype=np.float32)[rng.integers(0, 64, 400)]
    assert not gptq_pays(site, w, p, one_hot, scheme)
    assert not gptq_pays(site, w, p, correlated[:1], scheme)  # one row: nothing to hold out
