"""FindLinearSites: every linear it finds (weight axis, shapes, FLOPs) and every node it declines, with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from conftest import fvi, make_model, WEIGHT_AXES, attention_model, build_linear_model, linear_weights
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.passes import FindLinearSites
from segquant_onnx.plan import DeclinedSite, QuantPlan




def detect(model: onnx.ModelProto, exclude=(), block_size=None):
    plan = FindLinearSites(exclude, block_size).detect(canonicalize(gs.import_onnx(model)), QuantPlan(sites=()))
    return list(plan.sites), list(plan.declined)


def rng_w(*shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.2).astype(np.float32)


def test_detect_adds_to_the_plan_it_is_given():
    earlier = DeclinedSite("seg", "MatMul", "SegLinear: Concat is not on the last axis")
    given = QuantPlan(sites=(), declined=(earlier,))
    plan = FindLinearSites((r"^fc2$",)).detect(canonicalize(gs.import_onnx(build_linear_model("matmul"))), given)
    assert [s.name for s in plan.sites] == ["fc1"]
    assert plan.declined == (earlier, DeclinedSite("fc2", "MatMul", "excluded by --exclude '^fc2$'"))
    assert given.sites == () and given.declined == (earlier,)  # pure: the plan given is unchanged


# -- detection ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, flops", [
    ("matmul", {"fc1": 2 * 8 * 16 * 32, "fc2": 2 * 8 * 32 * 16}),
    ("gemm", {"fc1": 2 * 8 * 16 * 32, "fc2": 2 * 8 * 32 * 16}),
    ("conv", {"fc1": 2 * (8 * 8 * 8) * 27, "fc2": 2 * (4 * 8 * 8) * 8}),
])
def test_detects_every_linear_with_its_weight_axis(kind, flops):
    sites, declined = detect(build_linear_model(kind))
    assert not declined
    assert [s.name for s in sites] == ["fc1", "fc2"]
    assert {s.name: s.weight_axis for s in sites} == WEIGHT_AXES[kind]
    assert [s.activation for s in sites] == ["X", "g"]
    op = {"matmul": "MatMul", "gemm": "Gemm", "conv": "Conv"}[kind]
    assert [s.op for s in sites] == [op, op]
    w = linear_weights(kind)
    assert [s.weight_shape for s in sites] == [w["W1"].shape, w["W2"].shape]
    assert {s.name: s.flops for s in sites} == flops


def test_activation_by_activation_matmuls_are_declined_with_a_reason():
    sites, declined = detect(attention_model())
    assert [s.name for s in sites] == ["to_q", "to_k", "to_v", "to_out"]
    assert [(d.name, d.op) for d in declined] == [("qk", "MatMul"), ("pv", "MatMul")]
    assert all("activation x activation" in d.reason for d in declined)


def test_constant_on_the_left_is_declined():
    nodes = [helper.make_node("MatMul", ["W", "X"], ["Y"], name="w_at_x")]
    model = make_model(nodes, [fvi("X", [1, 16, 8])], [fvi("Y", [1, 4, 8])], {"W": rng_w(4, 16)})
    sites, declined = detect(model)
    assert not sites
    assert [(d.name, d.reason) for d in declined] == [("w_at_x", "constant on the left (W @ X) is not quantized")]


def test_exclude_regex_declines_matching_sites():
    sites, declined = detect(build_linear_model("matmul"), exclude=(r"^fc2$",))
    assert [s.name for s in sites] == ["fc1"]
    assert [(d.name, d.reason) for d in declined] == [("fc2", "excluded by --exclude '^fc2$'")]
    sites, declined = detect(build_linear_model("matmul"), exclude=(r"fc",))
    assert not sites and len(declined) == 2


@pytest.mark.parametrize("case, reason", [
    ("depthwise", "depthwise Conv"),
    ("conv_transpose", "grouped ConvTranspose"),
    ("batched_weight", "rank 3"),
])
def test_other_declines(case, reason):
    if case == "depthwise":
        nodes = [helper.make_node("Conv", ["X", "W"], ["Y"], name="n", group=4, kernel_shape=[3, 3], pads=[1] * 4)]
        model = make_model(nodes, [fvi("X", [1, 4, 8, 8])], [fvi("Y", [1, 4, 8, 8])], {"W": rng_w(4, 1, 3, 3)})
    elif case == "conv_transpose":
        nodes = [helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="n", kernel_shape=[2, 2], strides=[2, 2],
                                  group=2)]
        model = make_model(nodes, [fvi("X", [1, 4, 8, 8])], [fvi("Y", [1, 4, 16, 16])], {"W": rng_w(4, 2, 2, 2)})
    else:
        nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="n")]
        model = make_model(nodes, [fvi("X", [2, 8, 16])], [fvi("Y", [2, 8, 32])], {"W": rng_w(2, 16, 32)})
    sites, declined = detect(model)
    assert not sites
    assert len(declined) == 1 and declined[0].name == "n" and reason in declined[0].reason


def test_conv_transpose_is_a_site_scaled_on_axis_0():
    """TensorRT takes a deconvolution's weight scales on axis 0, [Cin, Cout, kh, kw]'s input channels; each of
    the 4 x 64 input elements meets 2 x 2 x 2 weights."""
    nodes = [helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="up", kernel_shape=[2, 2], strides=[2, 2])]
    model = make_model(nodes, [fvi("X", [1, 4, 8, 8])], [fvi("Y", [1, 2, 16, 16])], {"W": rng_w(4, 2, 2, 2)})
    (site,), declined = detect(model)
    assert not declined
    assert (site.op, site.weight_axis, site.weight_shape, site.channels_last) == ("ConvTranspose", 0, (4, 2, 2, 2),
                                                                                  False)
    assert site.flops == 2 * 4 * 64 * 8
    _, declined = detect(model, block_size=16)
    assert "ConvTranspose is not quantized to INT4" in declined[0].reason
