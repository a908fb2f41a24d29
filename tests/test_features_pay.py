"""SegLinear and DualScale must win where their premise holds, by a margin, on constructed graphs; the output
SQNR is recomputed in numpy on held-out feeds, and the scales they write are valued.

- SegLinear (input segments): MatMul(Concat([A, B]), W) with B 50x wider than A (and B's weight rows 50x
  smaller, so both parts carry the output). One scale for the Concat spends A's values on a step 50x too
  coarse; a scale per part does not.
- DualScale: MatMul(SiLU(X), W) with X mostly around -2 (SiLU in [-0.28, 0)) and a few values at +12 (SiLU
  ~12): one scale of 12 / 127 rounds most of the negative part away; two scales do not.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import references
from conftest import fvi, make_model, run_model
from segquant_onnx import QuantConfig
from segquant_onnx.pipeline import quantize

R, KA, KB, N = 16, 32, 32, 24


def concat_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.standard_normal((KA, N)), rng.standard_normal((KB, N)) / 50]).astype(np.float32)
    nodes = [helper.make_node("Concat", ["A", "B"], ["C"], axis=-1, name="cat"),
             helper.make_node("MatMul", ["C", "W"], ["Y"], name="lin")]
    return make_model(nodes, [fvi("A", [R, KA]), fvi("B", [R, KB])], [fvi("Y", [R, N])], {"W": w})


def concat_feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"A": rng.standard_normal((R, KA)).astype(np.float32),
             "B": (50 * rng.standard_normal((R, KB))).astype(np.float32)} for _ in range(n)]


def held_out_sqnr(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list[dict]) -> float:
    return references.sqnr_db([run_model(model, f)[0] for f in feeds], [run_model(quantized, f)[0] for f in feeds])


def q_scales(model: onnx.ModelProto) -> dict[str, np.float32]:
    """QuantizeLinear input tensor -> its scale (per-tensor activations)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: inits[n.input[1]][()] for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.fixture(scope="module")
def seglinear_runs():
    calib = concat_feeds(8, 1)
    return {name: quantize(concat_model(), calib, config, progress=False, evaluate=False)
            for name, config in {"on": QuantConfig(), "off": QuantConfig(seglinear={"input": False})}.items()}


def test_seglinear_gives_each_concat_part_the_scale_of_its_own_range(seglinear_runs):
    on, off = seglinear_runs["on"], seglinear_runs["off"]
    assert on.report["summary"]["segment_rewrites"] == 1 and off.report["summary"]["segment_rewrites"] == 0
    calib = concat_feeds(8, 1)
    amax = {p: max(float(np.abs(f[p]).max()) for f in calib) for p in "AB"}
    assert q_scales(on.model) == {"A": references.int8_scale(amax["A"]), "B": references.int8_scale(amax["B"])}
    (c,) = q_scales(off.model).values()  # one scale for the Concat: B's
    assert c == references.int8_scale(max(amax.values()))


def test_seglinear_wins_by_a_margin_on_a_concat_with_a_50x_range_gap(seglinear_runs):
    feeds = concat_feeds(4, 2)
    on = held_out_sqnr(concat_model(), seglinear_runs["on"].model, feeds)
    off = held_out_sqnr(concat_model(), seglinear_runs["off"].model, feeds)
    assert on > 37.5  # measured 39.55
    assert on - off > 25.0  # measured 39.55 against 8.46


K = 64


def silu_model(extra_output: bool = False) -> onnx.ModelProto:
    w = (np.random.default_rng(0).standard_normal((K, N)) / 8).astype(np.float32)
    nodes = [helper.make_node("Sigmoid", ["X"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["X", "s"], ["a"], name="silu"),
             helper.make_node("MatMul", ["a", "W"], ["Y"], name="lin")]
    outputs = [fvi("Y", [R, N])] + ([fvi("a", [R, K])] if extra_output else [])
    return make_model(nodes, [fvi("X", [R, K])], outputs, {"W": w})


def silu_feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        x = (rng.standard_normal((R, K)) - 2.0).astype(np.float32)
        x[rng.random((R, K)) < 0.01] = 12.0
        feeds.append({"X": x})
    return feeds


@pytest.fixture(scope="module")
def dualscale_runs():
    calib = silu_feeds(8, 1)  # 2 of them held back: DualScale auto is checked at the output
    return {mode: quantize(silu_model(), calib, QuantConfig(dualscale={"mode": mode}), progress=False,
                           evaluate=False) for mode in ("auto", "off")}


def test_dualscale_auto_applies_on_a_silu_with_a_small_negative_part_and_writes_its_two_scales(dualscale_runs):
    auto = dualscale_runs["auto"]
    (decision,) = auto.report["dualscale"]
    assert decision["apply"] and decision["measured"] and decision["gain_db"] > 5.0
    trials = {t["dualscale"]: t["heldback_sqnr_db"] for t in auto.report["heldback_trials"]}
    assert trials["auto"] - trials["off"] > 5.0  # measured 43.03 against 34.20 on the held-back feeds
    a = np.concatenate([run_model(silu_model(extra_output=True), f)[1] for f in silu_feeds(8, 1)])
    scales = q_scales(auto.model)
    # the default float16 rest: each scale is its float32 value rounded to float16
    assert {s.dtype for s in scales.values()} == {np.dtype(np.float16)}
    assert scales == {"lin/pos/relu_output": references.int8_scale(float(a.max())).astype(np.float16),
                      "lin/neg/min_output": np.float16(np.float32(float(-a.min()) / 128))}


def test_dualscale_wins_by_a_margin_on_a_silu_feeding_a_linear(dualscale_runs):
    feeds = silu_feeds(4, 2)
    auto = held_out_sqnr(silu_model(), dualscale_runs["auto"].model, feeds)
    off = held_out_sqnr(silu_model(), dualscale_runs["off"].model, feeds)
    assert auto > 41.5  # measured 43.77
    assert auto - off > 6.0  # measured 43.77 against 34.44
