"""QuantizeLinearInputs: the Q/DQ structure it writes, and the numbers (what it quantizes, FindLinearSites
finds: tests/passes/test_find_linear_sites.py).

The numeric check recomputes each quantized layer in numpy from the scales and INT8 weights stored in
the output graph; the tolerance is the float32 accumulation bound (K + 2) * 2^-23 * (|A| |B| + |b|)
of that layer, so any wrong scale, axis or rounding shows (one INT8 step is far above it).
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from conftest import (fvi, make_model, GELU_ALPHA, WEIGHT_AXES, attention_model, build_linear_model, calib_inputs, linear_weights,
                      run_model, save)
from segquant_onnx.config import QuantConfig
from segquant_onnx.pipeline import quantize
from segquant_onnx.solve.quant_math import quantize_int8, weight_scales

EPS32 = 2.0**-23


# max calibration, no DualScale, a float32 rest: what the numpy fake-quant references compute
PLAIN_MAX = QuantConfig(calibration={"method": "max"}, dualscale={"mode": "off"}, precision={"high_precision": "fp32"})


def rng_w(*shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.2).astype(np.float32)


class Q:
    """Index of a quantized ModelProto: initializers, producers and consumers by tensor name."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.nodes = {n.name: n for n in model.graph.node}

    def ops(self, op):
        return [n for n in self.model.graph.node if n.op_type == op]

    @staticmethod
    def attr(node, name):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def site_params(q: Q, site) -> dict:
    """Check the Q/DQ structure around one site; return its stored numbers."""
    node = q.nodes[site.name]
    # activation: x -> QuantizeLinear -> DequantizeLinear -> node, per tensor, zero point 0
    dq = q.producer[node.input[0]]
    assert dq.op_type == "DequantizeLinear"
    qn = q.producer[dq.input[0]]
    assert qn.op_type == "QuantizeLinear" and qn.input[0] == site.activation
    s_x = q.inits[qn.input[1]]
    np.testing.assert_array_equal(q.inits[dq.input[1]], s_x)
    assert s_x.size == 1 and s_x.dtype == np.float32  # per tensor ([] or [1], both per tensor for ORT and TensorRT)
    for zp_name in (qn.input[2], dq.input[2]):
        zp = q.inits[zp_name]
        assert zp.dtype == np.int8 and zp.shape == s_x.shape and not zp.any()
    assert Q.attr(qn, "axis") is not None and Q.attr(dq, "axis") is not None  # written explicitly
    # weight: INT8 initializer -> DequantizeLinear(axis) -> node
    wdq = q.producer[node.input[1]]
    assert wdq.op_type == "DequantizeLinear"
    w_q = q.inits[wdq.input[0]]
    assert w_q.dtype == np.int8 and w_q.shape == tuple(site.weight_shape)
    axis = Q.attr(wdq, "axis")
    assert axis == site.weight_axis
    s_w = q.inits[wdq.input[1]]
    assert s_w.dtype == np.float32 and s_w.shape == (w_q.shape[axis],)
    zp_w = q.inits[wdq.input[2]]
    assert zp_w.dtype == np.int8 and zp_w.shape == s_w.shape and not zp_w.any()
    shape = [1] * w_q.ndim
    shape[axis] = -1
    return {"s_x": np.float32(s_x.reshape(())), "w_q": w_q, "s_w": s_w, "axis": axis,
            "w_dq": w_q.astype(np.float32) * s_w.reshape(shape)}


def fake_quant(x: np.ndarray, s: np.float32) -> np.ndarray:
    """DQ(Q(x)) exactly as ONNX Runtime computes it in float32."""
    return np.clip(np.rint(x.astype(np.float32) / s), -128, 127).astype(np.float32) * s


def gelu(h):
    return h / (1 + np.exp(-GELU_ALPHA * h.astype(np.float64)))


def linear(kind: str, site: str, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The linear op of a variant in float64 (exact products of float32 inputs)."""
    a, w = a.astype(np.float64), w.astype(np.float64)
    if kind == "matmul" or (kind == "gemm" and site == "fc2"):
        return a @ w
    if kind == "gemm":
        return a @ w.T
    kh, kw = w.shape[2:]
    pad = (kh - 1) // 2
    xp = np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))  # [b, c, H, W, kh, kw]
    return np.einsum("bchwij,ocij->bohw", windows, w)


def bias(kind: str, b: np.ndarray) -> np.ndarray:
    return b.reshape(1, -1, 1, 1) if kind == "conv" else b


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return m


# -- the rewrite, end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """kind -> (Result, quantized ModelProto as saved, calibration X); quantized once per module."""
    d = tmp_path_factory.mktemp("qli")
    out = {}
    for kind in ("matmul", "gemm", "conv"):
        src = save(build_linear_model(kind), d / f"{kind}.onnx")
        calib = d / f"{kind}.npz"
        x = calib_inputs(kind, n=6)
        np.savez(calib, X=x)
        result = quantize(src, calib, PLAIN_MAX,
                          output=d / f"{kind}_q.onnx", progress=False)
        out[kind] = (result, onnx.load(str(d / f"{kind}_q.onnx")), x)
    return out


KINDS = ["matmul", "gemm", "conv"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_site_gets_qdq_inputs_and_an_int8_weight(quantized, kind):
    result, model, _ = quantized[kind]
    onnx.checker.check_model(model, full_check=True)
    q = Q(model)
    sites = result.plan.sites
    assert len(sites) == 2 == result.report["summary"]["sites_quantized"]
    assert len(q.ops("QuantizeLinear")) == len(sites)
    assert len(q.ops("DequantizeLinear")) == 2 * len(sites)
    w = linear_weights(kind)
    for site, orig in zip(sites, (w["W1"], w["W2"])):
        p = site_params(q, site)
        assert p["axis"] == WEIGHT_AXES[kind][site.name]
        assert len(p["s_w"]) == orig.shape[p["axis"]]  # one scale per output channel
        np.testing.assert_array_equal(p["s_w"], weight_scales(orig, p["axis"]))
        np.testing.assert_array_equal(p["w_q"], quantize_int8(orig, p["s_w"], p["axis"]))
    # the float weights are gone from the file: only INT8 copies remain
    assert not {"W1", "W2"} & set(q.inits)


@pytest.mark.parametrize("kind", KINDS)
def test_bias_stays_float_and_untouched(quantized, kind):
    _, model, _ = quantized[kind]
    q = Q(model)
    w = linear_weights(kind)
    biases = {"b1": w["b1"]} | ({"b2": w["b2"]} if "b2" in w else {})
    for name, want in biases.items():
        assert q.inits[name].dtype == np.float32
        np.testing.assert_array_equal(q.inits[name], want)
        assert name not in q.producer  # an initializer, not a DequantizeLinear output
        assert all(c.op_type in ("Add", "Gemm", "Conv") for c in q.consumers[name])
    assert not any(t.data_type == TensorProto.INT32 for t in model.graph.initializer)


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_on_outputs_and_one_consumer_per_dq_and_valid_scales(quantized, kind):
    result, model, _ = quantized[kind]
    q = Q(model)
    for site in result.plan.sites:
        for out in q.nodes[site.name].output:
            assert all(c.op_type not in ("QuantizeLinear", "DequantizeLinear") for c in q.consumers.get(out, []))
    for out in model.graph.output:
        assert q.producer[out.name].op_type not in ("QuantizeLinear", "DequantizeLinear")
    for dq in q.ops("DequantizeLinear"):
        assert len(q.consumers[dq.output[0]]) == 1
    for node in q.ops("QuantizeLinear") + q.ops("DequantizeLinear"):
        scale = q.inits[node.input[1]]
        assert scale.dtype == np.float32 and np.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_activation_scales_come_from_the_calibration_amax(quantized, kind):
    result, model, x = quantized[kind]
    q = Q(model)
    s1, s2 = (site_params(q, s)["s_x"] for s in result.plan.sites)
    assert s1 == np.float32(np.abs(x).max() / 127)
    batch = build_linear_model(kind).graph.input[0].type.tensor_type.shape.dim[0].dim_value
    fp = with_outputs(build_linear_model(kind), ["g"])
    g_amax = max(np.abs(run_model(fp, {"X": x[i:i + batch]})[1]).max() for i in range(0, len(x), batch))
    assert s2 == pytest.approx(g_amax / 127, rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_runtime_output_matches_a_numpy_fake_quant_reference(quantized, kind):
    result, model, x = quantized[kind]
    q = Q(model)
    w = linear_weights(kind)
    p1, p2 = (site_params(q, s) for s in result.plan.sites)
    feeds = {"X": calib_inputs(kind, n=1, seed=11)}  # not calibration data: some values may saturate
    y, h, g = run_model(with_outputs(model, ["h", "g"]), feeds)

    # layer 1 from the graph input: exact fake-quant, float64 products, float32 bound
    a1 = fake_quant(feeds["X"], p1["s_x"])
    h_ref = linear(kind, "fc1", a1, p1["w_dq"]) + bias(kind, w["b1"])
    k1 = int(np.prod(p1["w_dq"].shape)) // p1["w_dq"].shape[p1["axis"]]
    bound1 = (k1 + 2) * EPS32 * (linear(kind, "fc1", np.abs(a1), np.abs(p1["w_dq"])) + np.abs(bias(kind, w["b1"])))
    assert (np.abs(h - h_ref) <= bound1).all()
    np.testing.assert_allclose(g, gelu(h), rtol=1e-5, atol=1e-6)

    # layer 2 from ORT's own g (so a last-ulp difference cannot flip a rounding)
    a2 = fake_quant(g, p2["s_x"])
    b2 = bias(kind, w["b2"]) if "b2" in w else 0.0
    y_ref = linear(kind, "fc2", a2, p2["w_dq"]) + b2
    k2 = int(np.prod(p2["w_dq"].shape)) // p2["w_dq"].shape[p2["axis"]]
    bound2 = (k2 + 2) * EPS32 * (linear(kind, "fc2", np.abs(a2), np.abs(p2["w_dq"])) + np.abs(b2))
    assert (np.abs(y - y_ref) <= bound2).all()

    # the check can tell quantized from float: one activation step is far above the bound
    y_fp = run_model(build_linear_model(kind), feeds)[0]
    assert np.abs(y_fp - y_ref).max() > 100 * bound2.max()
    # and the quantized model is still close to the float one (INT8 noise, not a broken graph)
    assert np.sum((y - y_fp) ** 2) < 1e-2 * np.sum(y_fp**2)


def test_quantize_is_deterministic(tmp_path):
    src = save(build_linear_model("matmul"), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, X=calib_inputs("matmul"))
    for name in ("a.onnx", "b.onnx"):
        quantize(src, calib, PLAIN_MAX,
                 output=tmp_path / name, progress=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_excluded_site_stays_float(tmp_path):
    src = save(build_linear_model("gemm"), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, X=calib_inputs("gemm"))
    config = PLAIN_MAX.updated(fallback={"exclude": ("fc2",)})
    result = quantize(src, calib, config, output=tmp_path / "q.onnx", progress=False)
    q = Q(onnx.load(str(tmp_path / "q.onnx")))
    assert [s.name for s in result.plan.sites] == ["fc1"]
    fc2 = q.nodes["fc2"]
    assert fc2.input[0] == "g" and fc2.input[1] == "W2"
    np.testing.assert_array_equal(q.inits["W2"], linear_weights("gemm")["W2"])
    assert len(q.ops("QuantizeLinear")) == 1


def test_shared_activation_and_attention_get_a_dq_per_consumer(tmp_path):
    src = save(attention_model(), tmp_path / "attn.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, X=calib_inputs("matmul", n=3))
    result = quantize(src, calib, PLAIN_MAX,
                      output=tmp_path / "q.onnx", progress=False)
    model = onnx.load(str(tmp_path / "q.onnx"))
    q = Q(model)
    assert len(result.plan.sites) == 4 and len(q.ops("QuantizeLinear")) == 4
    for dq in q.ops("DequantizeLinear"):
        assert len(q.consumers[dq.output[0]]) == 1
    for name in ("qk", "pv"):  # declined: their inputs are untouched activations
        assert all(q.producer[i].op_type not in ("DequantizeLinear",) for i in q.nodes[name].input)
    run_model(model, {"X": calib_inputs("matmul", 1, seed=5)})


def test_tied_weight_used_by_two_sites(tmp_path):
    w = rng_w(16, 16)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="a"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["Y"], name="b")]
    src = save(make_model(nodes, [fvi("X", [1, 8, 16])], [fvi("Y", [1, 8, 16])], {"W": w}), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, X=calib_inputs("matmul", n=2))
    quantize(src, calib, PLAIN_MAX,
             output=tmp_path / "q.onnx", progress=False)
    q = Q(onnx.load(str(tmp_path / "q.onnx")))
    weight_dqs = [q.producer[q.nodes[n].input[1]] for n in ("a", "b")]
    assert weight_dqs[0].name != weight_dqs[1].name and "W" not in q.inits
    for dq in weight_dqs:
        np.testing.assert_array_equal(q.inits[dq.input[0]], quantize_int8(w, weight_scales(w, 1), 1))
