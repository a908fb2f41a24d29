"""The pipeline as a unit: its stages in order, the Result, no analysis session where no held-back feed is
needed, and the report builder's documented keys."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import numpy as np
import onnx
import pytest

from conftest import build_linear_model
from segquant_onnx import pipeline
from segquant_onnx.analysis import held_back
from segquant_onnx.analysis.decide import Decision
from segquant_onnx.analysis.sensitivity import Fallback
from segquant_onnx.calib.observers import TensorStats
from segquant_onnx.config import QuantConfig
from segquant_onnx.params import DualDecision, Quantization
from segquant_onnx.plan import LinearSite, QuantPlan
from segquant_onnx.report.build import REPORT_KEYS, SUMMARY_KEYS, Outcome, build_report
from segquant_onnx.solve.recipe import Recipe, SiteChoice, Variant


def _present(*names: str) -> str:
    """The pipeline's name for a stage (the pass runner may be called by either name)."""
    return next(n for n in names if hasattr(pipeline, n))


STAGES = ["open_source", "canonicalize", _present("build_plan", "detect_all"), "calibrate", "decide", "fit",
          _present("apply_quantization", "rewrite_all"), "finalize", "check_tensorrt", "model_error", "build_report",
          "save_model", "write_json", "write_markdown"]
QUANTIZING = {"calibrate", "decide", "fit", STAGES[6]}


@pytest.fixture
def calls(monkeypatch):
    """Every stage call of the pipeline, in order: (stage name, keyword arguments)."""
    seen: list[tuple[str, dict]] = []
    for name in STAGES:
        real = getattr(pipeline, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipeline, name, spy)
    return seen


@pytest.fixture
def sessions(monkeypatch):
    """The number of analysis sessions opened (every one goes through held_back.Sessions.open)."""
    opened = []
    real = held_back.Sessions.open

    def counting(self, model, fold_dequantize=False):
        opened.append(model)
        return real(self, model, fold_dequantize)

    monkeypatch.setattr(held_back.Sessions, "open", counting)
    return opened


def test_the_stages_run_once_each_in_the_data_flow_order(calls, write_calib, tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    pipeline.quantize(build_linear_model("matmul"), write_calib("matmul", n=8), QuantConfig(), output=out,
                      report_path=report, progress=False)
    assert [name for name, _ in calls] == STAGES


def test_dry_rewrite_skips_the_quantizing_stages(calls, write_calib):
    pipeline.quantize(build_linear_model("matmul"), write_calib("matmul"), QuantConfig(seglinear={"dry_rewrite": True}),
                      progress=False)
    assert [name for name, _ in calls] == [s for s in STAGES if s not in QUANTIZING | {
        "save_model", "write_json", "write_markdown"}]


def test_the_result_holds_the_model_plan_params_report_and_path(write_calib, tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    r = pipeline.quantize(build_linear_model("matmul"), write_calib("matmul", n=8), QuantConfig(), output=out,
                          report_path=report, progress=False)
    assert isinstance(r.model, onnx.ModelProto) and r.output_path == out
    assert out.read_bytes() == r.model.SerializeToString()
    assert [s.name for s in r.plan.sites] == ["fc1", "fc2"] == list(r.params)
    scales = {row["name"]: row["act_scale"] for row in r.report["sites"]}
    assert scales == {name: p.act_scale for name, p in r.params.items()}
    assert json.loads(report.read_text()) == json.loads(json.dumps(r.report))
    assert r.report["summary"]["sites_quantized"] == 2
    assert r.report["output_error"]["Y"]["sqnr_db"] > 34.5  # measured 36.68
    dq = [n for n in r.model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq, "the rewrite stage ran"


def test_a_run_that_needs_no_held_back_feeds_opens_no_analysis_session(calls, sessions, write_calib):
    r = pipeline.quantize(build_linear_model("matmul"), write_calib("matmul", n=8),
                          QuantConfig(dualscale={"mode": "off"}),
                          progress=False, evaluate=False)
    assert sessions == []
    (calibrate,) = [kw for name, kw in calls if name == "calibrate"]
    assert calibrate["holdout_every"] == 0 and calibrate["keep_held_back"] == 0 and calibrate["sampled"] == ()
    assert r.report["heldback_trials"] == []


def test_the_auto_choices_are_scored_in_analysis_sessions(calls, sessions, write_calib):
    r = pipeline.quantize(build_linear_model("matmul"), write_calib("matmul", n=8),
                          QuantConfig(smoothquant={"mode": "auto"}),
                          progress=False, evaluate=False)
    (calibrate,) = [kw for name, kw in calls if name == "calibrate"]
    assert calibrate["holdout_every"] == 4 and calibrate["keep_held_back"] == 8
    trials = r.report["heldback_trials"]
    assert {(t["smoothquant"], t["dualscale"]) for t in trials} <= {("auto", "auto"), ("off", "auto"),
                                                                    ("auto", "off"), ("off", "off")}
    assert len(sessions) == len(trials)  # one per scored trial: the float reference is calibration's own runs


def test_a_run_that_only_ranks_sites_scores_no_global_trial(sessions, write_calib):
    """Sensitivity with no auto mode: one analysis session (the gated graph), no held-back trial."""
    r = pipeline.quantize(build_linear_model("matmul"), write_calib("matmul", n=8),
                          QuantConfig(dualscale={"mode": "off"}, fallback={"sensitivity": True}),
                          progress=False, evaluate=False)
    assert len(sessions) == 1 and r.report["heldback_trials"] == [] and len(r.report["sensitivity"]) == 2


def test_without_held_back_feeds_smoothquant_auto_is_left_off_and_reported_so(sessions, write_calib, caplog):
    with caplog.at_level(logging.WARNING, logger="segquant_onnx"):
        r = pipeline.quantize(build_linear_model("matmul"), write_calib("matmul", n=3),
                              QuantConfig(smoothquant={"mode": "auto"}), progress=False, evaluate=False)
    assert any("no held-back feeds" in rec.getMessage() for rec in caplog.records)
    assert sessions == [] and r.report["heldback_trials"] == []
    assert r.report["config"]["smoothquant"]["mode"] == "off"
    assert all(row["smooth_alpha"] is None for row in r.report["sites"])


# -- the report builder -------------------------------------------------------------------------------------
SITE = LinearSite("lin", "MatMul", "X", "W", (8, 4), 1, 64)
SITE2 = LinearSite("lin2", "MatMul", "X", "W2", (8, 4), 1, 192)


def _stats() -> TensorStats:
    st = TensorStats.empty()
    x = np.ones((2, 8), np.float32)
    x[0, 3] = 50.0
    x[1, 6] = -9.0
    st.update(x)
    return st


def test_the_report_has_the_documented_keys(write_calib):
    r = pipeline.quantize(build_linear_model("matmul"), write_calib("matmul", n=8), QuantConfig(), progress=False)
    assert tuple(r.report) == REPORT_KEYS and tuple(r.report["summary"]) == SUMMARY_KEYS
    assert r.report["config"] == QuantConfig().as_dict()
    dry = build_report(Outcome(QuantConfig(seglinear={"dry_rewrite": True}), QuantPlan(sites=(SITE,)),
                               Quantization({}, {}, {}), "calib.npz", 100, 90, 0.5))
    assert tuple(dry) == REPORT_KEYS and tuple(dry["summary"]) == SUMMARY_KEYS
    assert (dry["summary"]["sites_quantized"], dry["summary"]["int8_flop_fraction"]) == (0, 0.0)
    assert (dry["heldback_trials"], dry["sensitivity"], dry["fallback"]) == ([], [], None)


def test_the_report_is_built_from_the_outcome():
    plan = QuantPlan(sites=(SITE, SITE2))
    decision_dual = DualDecision("lin2", "gelu_erf", True, 1.5, True, SITE2.flops)
    recipe = Recipe({"lin": SiteChoice("max"), "lin2": SiteChoice("max")}, (decision_dual,),
                    {"lin": np.array([3], np.int64)})
    fallback = Fallback(("lin2",), 41.0, 30.0, 0.25, True)
    decision = Decision(recipe.in_float(["lin2"]), Variant("off", "auto"), trials=[{"outlier_cap": 0}],
                        fallback=fallback)
    q = Quantization({}, {}, {"lin": np.array([3], np.int64)}, [decision_dual], frozenset({"lin2"}))
    report = build_report(Outcome(QuantConfig(smoothquant={"mode": "auto"}), plan, q, "calib.npz", 100, 60, 1.25,
                                  decision=decision, stats={"X": _stats()}))
    assert report["config"]["smoothquant"]["mode"] == "off"  # the settings as run, not as asked
    assert report["outliers"]["sites"] == {"lin": [3]}
    assert report["outliers"]["ranges"] == {"lin": {"channel_amax": [50.0], "bulk_amax": 9.0}}
    assert report["outliers"]["float_flop_pct"] == round(100 * (64 / 8) / 256, 3)
    assert report["dualscale"] == [{**asdict(decision_dual), "apply": False}]  # kept in float: not applied
    assert report["sites"][1] == {"name": "lin2", "op": "MatMul", "weight_shape": [8, 4], "weight_axis": 1,
                                  "flops": 192, "flop_share": 0.75, "float": True}
    summary = report["summary"]
    assert (summary["sites_quantized"], summary["int8_flop_fraction"]) == (1, 0.25)
    assert (summary["outlier_sites"], summary["outlier_channels"], summary["dualscale_applied"]) == (1, 1, 0)
    assert (summary["size_before"], summary["size_after"], report["seconds"]) == (100, 60, 1.25)
    assert report["fallback"] == asdict(fallback) and report["heldback_trials"] == [{"outlier_cap": 0}]


@pytest.mark.parametrize("config, evaluate, stages", [
    (QuantConfig(), True, ["load and plan", "calibrate", "decide", "fit and rewrite", "high precision",
                           "finalize and check", "evaluate"]),
    (QuantConfig(precision={"high_precision": "fp32"}), False,
     ["load and plan", "calibrate", "decide", "fit and rewrite", "finalize and check"]),
    (QuantConfig(seglinear={"dry_rewrite": True}), True, ["load and plan", "finalize and check", "evaluate"]),
])
def test_the_report_splits_the_wall_time_by_stage(write_calib, caplog, config, evaluate, stages):
    with caplog.at_level("INFO", logger="segquant_onnx.pipeline"):
        r = pipeline.quantize(build_linear_model("matmul"), write_calib("matmul", n=8), config, progress=False,
                              evaluate=evaluate)
    split = r.report["stage_seconds"]
    assert list(split) == stages and all(s >= 0.0 for s in split.values())
    assert sum(split.values()) <= r.report["seconds"] + 0.01  # the stages tile the run, saving excluded
    assert [m.split(":")[0] for m in caplog.messages if m.split(":")[0] in stages] == stages  # one -v line each
