"""The pass contract: preconditions checked by the runner, one run order for detection and rewriting,
every detect pure (a new frozen plan) and declining with reasons."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import attention_model, build_linear_model
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.params import Quantization
from segquant_onnx.passes import (AddLowRankBranch, DualScaleActivations, FindLinearSites, FlattenLinearsTo2D, Pass,
                                  PreconditionError,
                                  QuantizeAttention, QuantizeLinearInputs, SmoothActivations, SplitLinearBySegment,
                                  SplitOutlierChannels, detect_all, passes, rewrite_all)
from segquant_onnx.passes.base import PLAN, QUANTIZE, run_order
from segquant_onnx.plan import DeclinedSite, QuantPlan

ORDER = ["split_linear_by_segment", "flatten_linears_to_2d", "find_linear_sites", "split_outlier_channels",
         "smooth_activations", "add_low_rank_branch",
         "dual_scale_activations", "quantize_linear_inputs", "quantize_attention"]


def canonical(model: onnx.ModelProto) -> gs.Graph:
    return canonicalize(gs.import_onnx(model))


# -- the runner ------------------------------------------------------------------------------------
def test_every_pass_follows_the_contract():
    for p in passes():
        assert isinstance(p, Pass)
        assert p.stage in (PLAN, QUANTIZE) and p.requires and p.ensures


@pytest.mark.parametrize("order, refused, missing", [
    ([FindLinearSites(), SplitLinearBySegment()], "find_linear_sites", "'segments split'"),
    ([SplitLinearBySegment(), FindLinearSites(), SmoothActivations(), SplitOutlierChannels()],
     "smooth_activations", "'outliers split'"),
    ([SplitLinearBySegment(), FindLinearSites(), SplitOutlierChannels(), SmoothActivations(), QuantizeLinearInputs(),
      DualScaleActivations()], "quantize_linear_inputs", "'dual sites quantized'"),
])
def test_the_runner_refuses_a_pass_whose_precondition_is_unmet_and_names_it(order, refused, missing):
    with pytest.raises(PreconditionError, match=f"pass {refused} requires {missing}"):
        run_order(order)


def test_the_runner_checks_the_conditions_given_on_entry():
    with pytest.raises(PreconditionError, match="pass split_linear_by_segment requires 'canonical'"):
        run_order([SplitLinearBySegment()], holds=())
    assert [p.name for p in run_order(passes())] == ORDER  # the real order needs nothing else


def test_run_order_is_the_list_for_detection_and_for_rewriting(monkeypatch):
    calls = []

    def spy(method: str, original):
        def recorded(self, *args):
            calls.append((self.name, method))
            return original(self, *args)
        return recorded

    for cls in (SplitLinearBySegment, FlattenLinearsTo2D, FindLinearSites, SplitOutlierChannels, SmoothActivations,
                AddLowRankBranch, DualScaleActivations, QuantizeLinearInputs, QuantizeAttention):
        for method in ("detect", "rewrite"):
            monkeypatch.setattr(cls, method, spy(method, getattr(cls, method)))
    graph = canonical(build_linear_model("matmul"))
    plan = detect_all(graph)
    plan_stage = [(name, m) for name in ORDER[:2] for m in ("detect", "rewrite")]  # SegLinear, the 2-D layout
    assert calls == plan_stage + [(name, "detect") for name in ORDER[2:]]
    calls.clear()
    rewrite_all(graph, plan, Quantization({}, {}, {}, floating=frozenset(s.name for s in plan.sites)))
    assert calls == [(name, "rewrite") for name in ORDER[2:]]  # the plan stage's rewrites are done


# -- detect: pure, adds findings, declines with reasons ----------------------------------------------
def _seg_declined_model() -> onnx.ModelProto:
    """X -> MatMul(W) -> Split(3 x 8), whose output also feeds a Relu: the cut is declined."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["y"], name="fc"),
             helper.make_node("Split", ["y", "sizes"], ["a", "b", "c"], name="cut", axis=-1),
             helper.make_node("Relu", ["y"], ["r"], name="relu")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, w]) for n, w in
            (("a", 8), ("b", 8), ("c", 8), ("r", 24))]
    inits = [numpy_helper.from_array(np.ones((16, 24), np.float32), "W"),
             numpy_helper.from_array(np.array([8, 8, 8], np.int64), "sizes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 16])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _fp64_gelu_model() -> onnx.ModelProto:
    """X (fp64) -> Gelu -> Cast(float) -> MatMul(W): a GELU site that computes in float64."""
    nodes = [helper.make_node("Gelu", ["X"], ["a16"], name="gelu"),
             helper.make_node("Cast", ["a16"], ["a"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["a", "W"], ["Y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.DOUBLE, [1, 4, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 8])],
                              [numpy_helper.from_array(np.ones((16, 8), np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)


@pytest.mark.parametrize("make_pass, model, declined", [
    (SplitLinearBySegment, _seg_declined_model, DeclinedSite("fc", "MatMul", "SegLinear: output also feeds Relu")),
    (FindLinearSites, attention_model,
     DeclinedSite("qk", "MatMul", "activation x activation product (e.g. attention) is not quantized")),
    (DualScaleActivations, _fp64_gelu_model,
     DeclinedSite("fc", "MatMul", "gelu_op computes in float64, only float32, float16 and bfloat16 activations "
                                  "are dual-scaled")),
])
def test_each_detecting_pass_adds_to_a_new_frozen_plan_and_declines_with_a_reason(make_pass, model, declined):
    graph = canonical(model())
    given = QuantPlan(sites=())
    if make_pass is DualScaleActivations:  # it looks at the sites found
        given = FindLinearSites().detect(graph, given)
    before = dataclasses.replace(given)
    plan = make_pass().detect(graph, given)
    assert isinstance(plan, QuantPlan) and plan is not given and given == before
    assert declined in plan.declined and declined not in given.declined
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.sites = ()


@pytest.mark.parametrize("make_pass", [SplitOutlierChannels, SmoothActivations, QuantizeLinearInputs])
def test_rewrite_only_passes_detect_nothing(make_pass):
    graph = canonical(build_linear_model("matmul"))
    given = FindLinearSites().detect(graph, QuantPlan(sites=()))
    assert make_pass().detect(graph, given) is given


def test_detect_only_passes_rewrite_nothing():
    graph = canonical(build_linear_model("matmul"))
    plan = FindLinearSites().detect(graph, QuantPlan(sites=()))
    nodes = [n.name for n in graph.nodes]
    assert FindLinearSites().rewrite(graph, list(plan.sites), None) == list(plan.sites)
    assert [n.name for n in graph.nodes] == nodes


def test_detect_all_collects_every_pass_in_order_and_the_settings_reach_the_constructors():
    graph = canonical(build_linear_model("matmul"))
    plan = detect_all(graph, exclude=(r"^fc1$",))
    assert [s.name for s in plan.sites] == ["fc2"]
    assert [(d.site, d.kind) for d in plan.dual] == [("fc2", "quick_gelu")]
    assert plan.declined == (DeclinedSite("fc1", "MatMul", "excluded by --exclude '^fc1$'"),)
    assert detect_all(canonical(build_linear_model("matmul")), dualscale=False).dual == ()


def test_the_segment_split_runs_during_detection():
    graph = canonical(_seg_declined_model())  # declined: nothing split
    assert detect_all(graph).segments == () and [n.op for n in graph.nodes].count("MatMul") == 1
    model = _seg_declined_model()
    del model.graph.node[2]  # without the Relu the cut is a segment match
    del model.graph.output[3]
    graph = canonical(model)
    plan = detect_all(graph)
    assert [(m.linear, m.sizes) for m in plan.segments] == [("fc", (8, 8, 8))]
    assert [s.name for s in plan.sites] == [n.name for n in graph.nodes if n.op == "MatMul"]
    assert len(plan.sites) == 3
