"""Per-site outlier-channel counts chosen at the model output (segquant_onnx.analysis.outlier_search).

The model has two linears reading inputs with 16 of 64 channels x60. `fc_b` comes first in the graph
but its output is damped x0.001 before the sum, so its quantization error hardly reaches the output;
`fc_a` carries the output. With a float budget of 13% of the linear FLOPs (16 channels of one site
cost 12.5%), one global cap cannot serve both: cap 16 spends the budget on fc_b (plan order), cap 8
leaves half of fc_a's outliers in its INT8 scale. The per-site search gives fc_a all 16 and fc_b none.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from segquant_onnx import QuantConfig
from segquant_onnx.analysis.outlier_search import SiteLevels, copies_bytes, level_gate, search_levels, site_levels
from segquant_onnx.pipeline import quantize
from segquant_onnx.plan import LinearSite, QuantPlan

K, N, ROWS = 64, 48, 16
BASE = dict(smoothquant={"mode": "off"}, dualscale={"mode": "off"})


@pytest.fixture(autouse=True)
def _unbounded_sweep(monkeypatch):
    """The two-site model's level graph is 5x the model (both sites, 4 extra levels each) and 4 of its 16 feeds are
    held back: SWEEP_BUDGET's 4 calibration passes allow 3 runs, not one site's 4 levels. These tests check what
    the sweep chooses; test_the_sweep_stops_before_a_site_whose_levels_pass_its_run_budget checks the budget."""
    from segquant_onnx.analysis import outlier_search

    monkeypatch.setattr(outlier_search, "SWEEP_BUDGET", 1e6)


def _two_site_model(tmp_path, silu: bool = False):
    """(path, calib, eval, fc_a's outlier channels). With `silu`, both linears read SiLU(X * c) (DualScale
    candidates) instead of X * c."""
    rng = np.random.default_rng(0)
    ca, cb = np.ones(K, np.float32), np.ones(K, np.float32)
    ca[rng.choice(K, 16, replace=False)] = 60.0
    cb[rng.choice(K, 16, replace=False)] = 60.0
    nodes, inits = [], {"ca": ca, "cb": cb, "Wa": rng.standard_normal((K, N)).astype(np.float32) * 0.1,
                        "Wb": rng.standard_normal((K, N)).astype(np.float32) * 0.1, "damp": np.array(1e-3, np.float32)}
    for s in ("b", "a"):  # fc_b first: plan order serves it first under one global cap
        nodes.append(helper.make_node("Mul", ["X", f"c{s}"], [f"X{s}"], name=f"scale_{s}"))
        x = f"X{s}"
        if silu:
            nodes += [helper.make_node("Sigmoid", [x], [f"sig_{s}"], name=f"sigmoid_{s}"),
                      helper.make_node("Mul", [x, f"sig_{s}"], [f"act_{s}"], name=f"silu_{s}")]
            x = f"act_{s}"
        nodes.append(helper.make_node("MatMul", [x, f"W{s}"], [f"Y{s}"], name=f"fc_{s}"))
    nodes += [helper.make_node("Mul", ["Yb", "damp"], ["Yb_damped"], name="damp_b"),
              helper.make_node("Add", ["Ya", "Yb_damped"], ["Y"], name="sum")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [ROWS, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [ROWS, N])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    calib, held = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, X=rng.standard_normal((16, ROWS, K)).astype(np.float32))
    np.savez(held, X=rng.standard_normal((8, ROWS, K)).astype(np.float32))
    return path, calib, held, np.flatnonzero(ca != 1).tolist()


def test_each_site_gets_the_count_that_pays_at_the_output(tmp_path):
    path, calib, held, a_channels = _two_site_model(tmp_path)
    auto = quantize(path, calib, QuantConfig(outliers={"mode": "auto", "max_flop_pct": 13.0}, **BASE), eval_data=held,
                    progress=False).report
    assert auto["outliers"]["sites"] == {"fc_a": a_channels}  # fc_b's outliers do not reach the output
    trials = auto["heldback_trials"]
    (per_site,) = [t for t in trials if t["outlier_cap"] == "per-site"]
    best_global = max(t["heldback_sqnr_db"] for t in trials if t["outlier_cap"] != "per-site")
    # measured: 66.8 dB per site against 36.7 dB for the best global cap (8)
    assert per_site["heldback_sqnr_db"] > best_global + 20 and per_site["heldback_sqnr_db"] > 64.5
    # the analysis session (level copies blended by gates) scores exactly what the real graph scores
    assert per_site["analysis_sqnr_db"] == pytest.approx(per_site["heldback_sqnr_db"], abs=0.01)
    search = {t["site"]: t for t in auto["outliers"]["per_site_search"]}
    assert search["fc_b"]["chosen_channels"] == 0 and search["fc_a"]["chosen_channels"] == 16
    b_levels = [lv["heldback_sqnr_db"] for lv in search["fc_b"]["levels"]]
    assert max(b_levels) - min(b_levels) < 0.05  # fc_b's channels change nothing at the output
    # on unseen data too: against the best single cap for both sites (8, within the budget)
    fixed = quantize(path, calib, QuantConfig(outliers={"mode": "fixed", "count": 8, "max_flop_pct": 13.0}, **BASE),
                     eval_data=held,
                     progress=False).report
    assert auto["output_error"]["Y"]["sqnr_db"] > fixed["output_error"]["Y"]["sqnr_db"] + 20  # measured 68.97, 37.06
    assert auto["output_error"]["Y"]["sqnr_db"] > 66.5
    assert auto["outliers"]["float_flop_pct"] <= 13.0
    assert auto["tensorrt_check"] == []


def test_cli_report_lists_the_per_site_search(tmp_path, capsys):
    from segquant_onnx.cli import main

    path, calib, held, _ = _two_site_model(tmp_path)
    report = tmp_path / "r.json"
    rc = main(["quantize", str(path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"), "-q",
               "--outlier-channels", "auto", "--outlier-flops", "13", "--outlier-min-gain", "0.1",
               "--dualscale", "off", "--report", str(report)])
    assert rc == 0
    text = report.with_suffix(".md").read_text()
    section = text.split("## Outlier channels per site", 1)[1].split("\n## ", 1)[0]
    (row_a,) = [line for line in section.splitlines() if line.startswith("| fc_a |")]
    assert row_a.split("|")[2].strip() == "16" and "16: " in row_a
    assert json.loads(report.read_text())["config"]["outliers"]["min_gain_db"] == 0.1


def test_level_copies_compose_with_dualscale_and_smoothing(tmp_path):
    path, calib, held, a_channels = _two_site_model(tmp_path, silu=True)
    result = quantize(path, calib, QuantConfig(dualscale={"mode": "all"}, smoothquant={"mode": "fixed", "alpha": 0.5},
                                               outliers={"mode": "auto",
                                                         "max_flop_pct": 13.0}), eval_data=held, progress=False)
    report = result.report
    (per_site,) = [t for t in report["heldback_trials"] if t["outlier_cap"] == "per-site"]
    assert per_site["dual_sites"] == 2  # both copies and sites were built with DualScale
    assert per_site["analysis_sqnr_db"] == pytest.approx(per_site["heldback_sqnr_db"], abs=0.01)
    assert report["outliers"]["sites"] == {"fc_a": a_channels}
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Gather") == 1 and ops.count("Min") == 2  # one float branch, two DualScale sites


class _Scripted:
    """A GatedSession stand-in: output SQNR from the set of level gates switched on."""

    def __init__(self, table: dict[frozenset, float]):
        self.table, self.calls = table, []

    def sqnr_on(self, on: set[str]) -> float:
        self.calls.append(frozenset(on))
        return self.table[frozenset(on)]


def _levels(name: str, counts: tuple[int, ...], flops_per_channel: float = 1.0) -> SiteLevels:
    sets = tuple(np.arange(c, dtype=np.int64) for c in counts)
    return SiteLevels(name, counts, sets, tuple(flops_per_channel * c for c in counts))


def test_search_takes_the_fewest_channels_within_the_min_gain():
    levels = {"s": _levels("s", (0, 2, 4)), "t": _levels("t", (0, 8))}
    g = level_gate
    table = {frozenset(): 10.0, frozenset({g("t", 1)}): 10.04,  # t: within 0.05 dB, stays at 0 channels
             frozenset({g("s", 1)}): 20.0, frozenset({g("s", 2)}): 20.04}  # s: 2 channels are within 0.05 dB of 4
    result = search_levels(_Scripted(table), levels, start={}, budget_flops=99.0, min_gain_db=0.05, progress=False)
    assert {k: len(v) for k, v in result.outliers.items()} == {"s": 2}
    assert result.heldback_sqnr_db == 20.0 and result.start_sqnr_db == 10.0
    assert [(t["site"], t["chosen_channels"]) for t in result.trials] == [("t", 0), ("s", 2)]  # most channels first
    # a min gain of 0 takes each site's very best level
    table |= {frozenset({g("t", 1), g("s", 1)}): 20.0, frozenset({g("t", 1), g("s", 2)}): 20.1}
    result = search_levels(_Scripted(table), levels, start={}, budget_flops=99.0, min_gain_db=0.0, progress=False)
    assert {k: len(v) for k, v in result.outliers.items()} == {"s": 4, "t": 8} and result.heldback_sqnr_db == 20.1


def test_search_never_evaluates_a_level_over_the_flop_budget():
    levels = {"s": _levels("s", (0, 2, 4))}
    table = {frozenset(): 10.0, frozenset({level_gate("s", 1)}): 20.0}  # level 2 (4 channels) is not in the table
    scripted = _Scripted(table)
    result = search_levels(scripted, levels, start={}, budget_flops=3.0, min_gain_db=0.05, progress=False)
    assert len(result.outliers["s"]) == 2 and frozenset({level_gate("s", 2)}) not in scripted.calls


def test_search_starts_from_the_global_choice():
    levels = {"s": _levels("s", (0, 2))}
    table = {frozenset(): 10.0, frozenset({level_gate("s", 1)}): 12.0}
    scripted = _Scripted(table)
    result = search_levels(scripted, levels, start={"s": np.arange(2)}, budget_flops=99.0, min_gain_db=0.05,
                           progress=False)
    assert result.start_sqnr_db == 12.0 and scripted.calls[0] == {level_gate("s", 1)}
    assert len(result.outliers["s"]) == 2


def test_site_levels_are_distinct_sets_and_skip_sites_without_outliers():
    sites = tuple(LinearSite(n, "MatMul", f"{n}_x", f"{n}_w", (K, N), 1, 1000) for n in ("p", "q"))
    plan = QuantPlan(sites=sites)
    by_cap = {0: {}, 2: {"p": np.array([3, 5])}, 4: {"p": np.array([3, 5])}, 8: {"p": np.array([1, 3, 5])}}
    levels = site_levels(plan, by_cap)
    assert list(levels) == ["p"]
    assert levels["p"].caps == (0, 2, 8) and [c.tolist() for c in levels["p"].channels] == [[], [3, 5], [1, 3, 5]]
    assert levels["p"].float_flops == pytest.approx((0.0, 1000 * 2 / K, 1000 * 3 / K))


def test_search_is_skipped_when_the_copies_would_outgrow_the_model(tmp_path, caplog, monkeypatch):
    """Both sites have 4 distinct outlier sets (2, 4, 8, 16 channels): 8 weight copies against 2 weights
    (over the model's linear weights once the fixed allowance is 0)."""
    from segquant_onnx.analysis import outlier_search

    monkeypatch.setattr(outlier_search, "COPY_BUDGET_BYTES", 0)
    path, calib, held, _ = _two_site_model(tmp_path)
    with caplog.at_level("WARNING", logger="segquant_onnx.analysis.outlier_search"):
        report = quantize(path, calib, QuantConfig(outliers={"mode": "auto", "max_flop_pct": 13.0}, **BASE),
                          eval_data=held,
                          progress=False).report
    assert "per-site outlier search skipped" in caplog.text
    assert report["outliers"]["per_site_search"] == []
    assert [t for t in report["heldback_trials"] if t["outlier_cap"] == "per-site"] == []
    assert report["outliers"]["sites"]  # the global cap still applies


def test_copies_bytes_counts_one_weight_per_extra_level():
    sites = (LinearSite("p", "MatMul", "p_x", "p_w", (K, N), 1, 1000), LinearSite("q", "MatMul", "q_x", "q_w", (K, 8), 1, 10))
    levels = {"p": _levels("p", (0, 2, 4)), "q": _levels("q", (0, 2))}
    assert copies_bytes(QuantPlan(sites=sites), levels) == 4 * K * N * 2 + 4 * K * 8


def test_the_sweep_visits_at_most_max_sweep_sites_and_the_rest_keep_their_start(monkeypatch):
    """Three sites, room for two: the two with the most candidate channels are searched; the third keeps the
    level it started at (its channels from the global choice), without a run of its own."""
    from segquant_onnx.analysis import outlier_search

    monkeypatch.setattr(outlier_search, "MAX_SWEEP_SITES", 2)
    levels = {"a": _levels("a", (0, 8)), "b": _levels("b", (0, 4)), "c": _levels("c", (0, 2))}
    g = level_gate
    start = {g("c", 1)}
    table = {frozenset(start): 10.0, frozenset(start | {g("a", 1)}): 15.0,
             frozenset(start | {g("a", 1), g("b", 1)}): 16.0}
    scripted = _Scripted(table)
    result = search_levels(scripted, levels, start={"c": np.arange(2)}, budget_flops=99.0, min_gain_db=0.05,
                           progress=False)
    assert {k: len(v) for k, v in result.outliers.items()} == {"a": 8, "b": 4, "c": 2}
    assert [t["site"] for t in result.trials] == ["a", "b"]
    assert all(g("c", 1) in call for call in scripted.calls)  # c never tried without its channels


def test_the_sweep_stops_before_a_site_whose_levels_pass_its_run_budget():
    """A budget of 4 runs: the start (1) and a's two extra levels (3) fit, b's two more would not: b keeps its start
    without a run; without a budget b is searched too."""
    levels = {"a": _levels("a", (0, 4, 8)), "b": _levels("b", (0, 2, 3))}
    g = level_gate
    table = {frozenset(): 10.0, frozenset({g("a", 1)}): 14.0, frozenset({g("a", 2)}): 15.0,
             frozenset({g("a", 2), g("b", 1)}): 16.0, frozenset({g("a", 2), g("b", 2)}): 16.5}
    scripted = _Scripted(table)
    result = search_levels(scripted, levels, start={}, budget_flops=99.0, min_gain_db=0.05, progress=False,
                           max_runs=4)
    assert [t["site"] for t in result.trials] == ["a"] and len(scripted.calls) == 3
    assert {k: len(v) for k, v in result.outliers.items()} == {"a": 8} and result.heldback_sqnr_db == 15.0
    unbounded = search_levels(_Scripted(table), levels, start={}, budget_flops=99.0, min_gain_db=0.05,
                              progress=False, max_runs=5)
    assert {k: len(v) for k, v in unbounded.outliers.items()} == {"a": 8, "b": 3}
