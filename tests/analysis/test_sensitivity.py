"""Sensitivity ranking and the --target-sqnr fallback, decided at the model output on held-back feeds.

- the gated analysis graph: all gates 0 is the float model, all gates 1 the quantized model, for plain,
  DualScale and smoothed sites (the session `sensitivity.analyse` builds, captured from a quantize run);
- a three-layer model whose first layer reads an input with a x200 outlier channel: sensitivity ranks
  it first, the target mode keeps it (only it) in float and reaches the target, `--max-fallback 0`
  does not;
- calibration holdout: which feeds feed the statistics and which are held back.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import segquant_onnx.analysis.held_back as held_back
import segquant_onnx.analysis.sensitivity as sensitivity
from conftest import INPUT_SHAPES, build_linear_model, calib_inputs, run_model
from segquant_onnx.calib.data import model_inputs, open_calibration
from segquant_onnx.calib.calibrate import calibrate
from segquant_onnx.cli import main
from segquant_onnx.config import QuantConfig, SmoothQuantConfig
from segquant_onnx.errors import UserError
from segquant_onnx.pipeline import quantize
from segquant_onnx.plan import LinearSite
from segquant_onnx.analysis.evaluate import OutputError
from segquant_onnx.analysis.sensitivity import GatedModel, SiteSensitivity, gate_name, greedy_fallback

# float rounding (ORT reassociates, x + g (q - x) at g = 1 is q up to an ulp) is ~1e-7 relative; one INT8
# step of these models' scales (>= 0.01) moves the output by ~1e-2: 1e-5 separates the two
REL_TOL = 1e-5


def sqnr(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / ((ref - test) ** 2).sum()))


@pytest.fixture
def analysis_models(monkeypatch):
    """Every GatedModel the pipeline builds (its session is the gated analysis graph)."""
    captured: list[GatedModel] = []

    class Recording(GatedModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured.append(self)

    monkeypatch.setattr(sensitivity, "GatedModel", Recording)
    return captured


def run_gated(model: GatedModel, feed: dict, gates: dict[str, float]) -> np.ndarray:
    values = {gate_name(s.name): np.array(gates.get(s.name, 0.0), np.float32) for s in model.sites}
    return model.session.run(None, {**feed, **values})[0]


# -- gating --------------------------------------------------------------------------------------------
MODES = {  # name: (smoothquant, dualscale); fc2 reads a quick-GELU output (a DualScale candidate)
    "plain": ("off", "off"),
    "dual": ("off", "all"),
    "smoothed": ("0.5", "off"),
    "smoothed+dual": ("0.5", "all"),
}


def _calib_without_new_held_back_data(write_npz, kind: str):
    """8 feeds whose held-back ones (3 and 7) repeat feeds 0 and 4: the scales fitted on the other feeds
    (which the analysis graph uses) then equal the final scales (fitted on every feed)."""
    x = calib_inputs(kind, 8)
    b = INPUT_SHAPES[kind][0]
    x[3 * b:4 * b], x[7 * b:8 * b] = x[0:b], x[4 * b:5 * b]
    return write_npz("calib.npz", X=x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv"])
def test_gates_at_zero_give_the_float_model_and_at_one_the_quantized_model(kind, mode, write_npz,
                                                                            analysis_models):
    smoothquant, dualscale = MODES[mode]
    model = build_linear_model(kind)
    result = quantize(model, _calib_without_new_held_back_data(write_npz, kind), progress=False,
                      config=QuantConfig(calibration={"method": "max"}, precision={"high_precision": "fp32"},
                                         smoothquant=SmoothQuantConfig.from_flag(smoothquant),
                                         dualscale={"mode": dualscale}, fallback={"sensitivity": True}))
    (gated,) = analysis_models
    # the composition this case is about really happened
    assert result.report["summary"]["dualscale_applied"] == (1 if "dual" in mode else 0)
    smoothed = "smoothed" in mode and kind != "conv"
    assert [r["smooth_alpha"] for r in result.report["sites"]] == [0.5 if smoothed else None] * 2

    feed = {"X": calib_inputs(kind, 1, seed=5)}
    fp, quantized = run_model(model, feed)[0], run_model(result.model, feed)[0]
    at_zero = run_gated(gated, feed, {})
    at_one = run_gated(gated, feed, {s.name: 1.0 for s in gated.sites})
    tol = REL_TOL * float(np.abs(fp).max())
    if mode == "plain" and kind != "conv":
        np.testing.assert_array_equal(at_zero, fp)  # x + 0 * (q - x) is x: bit-exact
    else:  # relu(A) W + min(A, 0) W and (X / s)(s W) equal X W up to rounding
        np.testing.assert_allclose(at_zero, fp, rtol=0, atol=tol)
    np.testing.assert_allclose(at_one, quantized, rtol=0, atol=tol)
    assert np.abs(quantized - fp).max() > 100 * tol  # the quantization error itself is far above tol


def test_one_gate_open_equals_quantizing_that_site_alone(write_npz, analysis_models):
    calib = _calib_without_new_held_back_data(write_npz, "matmul")
    config = QuantConfig(calibration={"method": "max"}, dualscale={"mode": "off"}, fallback={"sensitivity": True},
                         precision={"high_precision": "fp32"})
    quantize(build_linear_model("matmul"), calib, config, progress=False)
    # sensitivity=True here too, so the scales come from the same (non-held-back) feeds
    only_fc1 = quantize(build_linear_model("matmul"), calib,
                        config.updated(fallback={"exclude": ("fc2",)}), progress=False)
    feed = {"X": calib_inputs("matmul", 1, seed=5)}
    expected = run_model(only_fc1.model, feed)[0]
    got = run_gated(analysis_models[0], feed, {"fc1": 1.0})
    np.testing.assert_allclose(got, expected, rtol=0, atol=REL_TOL * float(np.abs(expected).max()))


# -- a model with one very sensitive layer -------------------------------------------------------------
OUTLIER = 200.0  # input channel 0 of fc1 is x200 (its weight row /200, so every channel matters equally)
TARGET = 25.0  # dB; measured: all quantized 1.34, fc1 in float 34.85


def sensitive_model() -> onnx.ModelProto:
    """X[16, 8] -> fc1 (8x64) -> Relu -> fc2 (64x64) -> Relu -> fc3 (64x16) -> Y. fc1: 1/11 of the FLOPs."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 64)) / np.sqrt(8)).astype(np.float32)
    w1[0] /= OUTLIER
    w2 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    w3 = (rng.standard_normal((64, 16)) / 8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "W3"], ["Y"], name="fc3")]
    graph = helper.make_graph(nodes, "sensitive", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [16, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [16, 16])],
                              [numpy_helper.from_array(w, n) for n, w in (("W1", w1), ("W2", w2), ("W3", w3))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def sensitive_inputs(feeds: int, seed: int = 1) -> np.ndarray:
    """[feeds, 16, 8]: one feed per entry of axis 0."""
    x = np.random.default_rng(seed).standard_normal((feeds, 16, 8)).astype(np.float32)
    x[..., 0] *= OUTLIER
    return x


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    d = tmp_path_factory.mktemp("sensitive")
    onnx.save(sensitive_model(), str(d / "model.onnx"))
    np.savez(d / "calib.npz", X=sensitive_inputs(8))
    np.savez(d / "three.npz", X=sensitive_inputs(3))
    return d


def held_back_sqnr(model: onnx.ModelProto) -> float:
    """Output SQNR on the held-back feeds (3 and 7 of the 8) against the float model, recomputed here."""
    x = sensitive_inputs(8)
    ref = np.concatenate([run_model(sensitive_model(), {"X": x[i]})[0] for i in (3, 7)])
    got = np.concatenate([run_model(model, {"X": x[i]})[0] for i in (3, 7)])
    return sqnr(ref, got)


def table_rows(text: str) -> list[list[str]]:
    lines = text.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    return [line.split() for line in lines[start + 1:]]


def test_cli_sensitivity_ranks_the_layer_with_the_outlier_input_first(sensitive, tmp_path, capsys):
    report = tmp_path / "report.json"
    rc = main(["sensitivity", str(sensitive / "model.onnx"), "--calib", str(sensitive / "calib.npz"), "-q", "--calib-method", "max",
               "--dualscale", "off", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("3 sites, most sensitive first")
    assert [r[0] for r in table_rows(out)][0] == "fc1"
    ranking = json.loads(report.read_text())["sensitivity"]
    assert [r["site"] for r in ranking][0] == "fc1"
    by_site = {r["site"]: r["output_sqnr_db"] for r in ranking}
    assert by_site["fc1"] < 5.0  # measured 1.30
    assert min(by_site["fc2"], by_site["fc3"]) > 30.0  # measured 38.42, 38.07
    assert [r["output_sqnr_db"] for r in ranking] == sorted(by_site.values())
    assert not list(tmp_path.glob("*.onnx"))  # sensitivity writes no model


def test_target_sqnr_keeps_the_sensitive_layer_in_float_and_reaches_the_target(sensitive, monkeypatch):
    folded = []  # the gated session dequantizes each weight once (runtime.SessionSource.fold_dequantize)
    real_open = held_back.Sessions.open
    monkeypatch.setattr(held_back.Sessions, "open",
                        lambda self, model, fold_dequantize=False: folded.append(fold_dequantize) or
                        real_open(self, model, fold_dequantize))
    naive = quantize(sensitive / "model.onnx", sensitive / "calib.npz", QuantConfig(calibration={"method": "max"},
                                                                                    dualscale={"mode": "off"}),
                     progress=False)
    assert held_back_sqnr(naive.model) < TARGET  # measured 1.34

    result = quantize(sensitive / "model.onnx", sensitive / "calib.npz",
                      QuantConfig(calibration={"method": "max"}, dualscale={"mode": "off"},
                                  fallback={"target_sqnr": TARGET}, precision={"high_precision": "fp32"}),
                      progress=False)
    fb = result.report["fallback"]
    assert folded == [True]
    assert fb["sites"] == ("fc1",)
    assert fb["reached"] is True
    assert fb["start_sqnr_db"] < TARGET <= fb["output_sqnr_db"]  # measured 1.34 -> 34.85
    # the model written reaches it too, on those feeds
    assert held_back_sqnr(result.model) == pytest.approx(fb["output_sqnr_db"], abs=0.05)
    assert fb["int8_flop_fraction"] == pytest.approx(10 / 11)  # fc1: 2*16*8*64 of 2*16*(8*64+64*64+64*16)
    assert result.report["summary"]["int8_flop_fraction"] == fb["int8_flop_fraction"]
    assert result.report["summary"]["sites_quantized"] == 2
    # fc1 reads the float input and weight; fc2 and fc3 read DequantizeLinear outputs
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    nodes = {n.name: n for n in result.model.graph.node}
    assert list(nodes["fc1"].input) == ["X", "W1"]
    for name in ("fc2", "fc3"):
        assert [producers.get(i) for i in nodes[name].input] == ["DequantizeLinear"] * 2


def test_max_fallback_zero_keeps_everything_quantized_and_says_the_target_was_missed(sensitive):
    result = quantize(sensitive / "model.onnx", sensitive / "calib.npz",
                      QuantConfig(calibration={"method": "max"}, dualscale={"mode": "off"},
                                  fallback={"target_sqnr": TARGET, "max_fallback_pct": 0.0}), progress=False)
    fb = result.report["fallback"]
    assert fb["sites"] == () and fb["reached"] is False
    assert fb["output_sqnr_db"] == fb["start_sqnr_db"] < TARGET
    assert result.report["summary"]["int8_flop_fraction"] == 1.0
    assert result.report["summary"]["sites_quantized"] == 3


def test_a_target_already_met_keeps_nothing_in_float(sensitive):
    result = quantize(sensitive / "model.onnx", sensitive / "calib.npz",
                      QuantConfig(calibration={"method": "max"}, dualscale={"mode": "off"},
                                  fallback={"target_sqnr": 1.0}), progress=False)
    assert result.report["fallback"]["sites"] == () and result.report["fallback"]["reached"] is True
    # the ranking only serves the fallback there: no site is ranked, unless --sensitivity asks for the ranking
    assert result.report["sensitivity"] == []
    ranked = quantize(sensitive / "model.onnx", sensitive / "calib.npz",
                      QuantConfig(calibration={"method": "max"}, dualscale={"mode": "off"},
                                  fallback={"target_sqnr": 1.0, "sensitivity": True}), progress=False)
    assert sorted(r["site"] for r in ranked.report["sensitivity"]) == ["fc1", "fc2", "fc3"]
    assert ranked.report["fallback"] == result.report["fallback"]


def test_a_site_over_the_fallback_budget_is_not_ranked_and_the_fallback_is_the_same(sensitive):
    """fc1, fc2, fc3 hold 9.1%, 72.7% and 18.2% of the FLOPs: with a 20% budget fc2 can never go to float, so
    only fc1 and fc3 are ranked; the fallback is the one the whole ranking gives."""
    config = QuantConfig(calibration={"method": "max"}, dualscale={"mode": "off"},
                         fallback={"target_sqnr": TARGET, "max_fallback_pct": 20.0})
    result = quantize(sensitive / "model.onnx", sensitive / "calib.npz", config, progress=False, evaluate=False)
    assert [r["site"] for r in result.report["sensitivity"]] == ["fc1", "fc3"]
    whole = quantize(sensitive / "model.onnx", sensitive / "calib.npz",
                     config.updated(fallback={"sensitivity": True}), progress=False, evaluate=False)
    assert sorted(r["site"] for r in whole.report["sensitivity"]) == ["fc1", "fc2", "fc3"]
    assert result.report["fallback"] == whole.report["fallback"] and result.report["fallback"]["sites"] == ("fc1",)


@pytest.mark.parametrize("max_fallback, expected", [
    (None, ["fallback: 1 sites kept in float", "  float: fc1"]),
    ("0", ["(target not reached within --max-fallback)"]),
])
def test_cli_quantize_target_sqnr_summary(sensitive, tmp_path, capsys, max_fallback, expected):
    argv = ["quantize", str(sensitive / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
            str(sensitive / "calib.npz"), "-q", "--dualscale", "off", "--target-sqnr", str(TARGET)]
    if max_fallback is not None:
        argv += ["--max-fallback", max_fallback]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for line in expected:
        assert line in out
    assert (tmp_path / "q.onnx").is_file()


def test_fewer_feeds_than_holdout_every_is_a_user_error(sensitive):
    with pytest.raises(UserError, match=r"hold back every 4th calibration feed; give at least 4 feeds"):
        quantize(sensitive / "model.onnx", sensitive / "three.npz", QuantConfig(fallback={"target_sqnr": TARGET}),
                 progress=False)


def test_cli_sensitivity_with_too_few_feeds_exits_2_with_one_line(sensitive, capsys):
    rc = main(["sensitivity", str(sensitive / "model.onnx"), "--calib", str(sensitive / "three.npz"), "-q"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segquant-onnx: error: ")
    assert "at least 4 feeds" in lines[0] and "Traceback" not in captured.err


class _Scripted:
    """A GatedModel stand-in: output SQNR from a table of which sites are in float."""

    def __init__(self, flops: dict[str, int], sqnr_by_float: dict[frozenset, float]):
        self.sites = [LinearSite(n, "MatMul", f"{n}_x", f"{n}_w", (1, 1), 1, f) for n, f in flops.items()]
        self.table, self.calls = sqnr_by_float, []

    def sqnr(self, quantized: set[str]) -> float:
        floating = frozenset(s.name for s in self.sites) - quantized
        self.calls.append(floating)
        return self.table[floating]


def test_greedy_fallback_skips_a_site_over_the_flop_budget_and_takes_the_next():
    model = _Scripted({"big": 60, "small": 5, "rest": 35},
                      {frozenset(): 10.0, frozenset({"small"}): 30.0})
    ranking = [SiteSensitivity("big", 60, 1.0), SiteSensitivity("small", 5, 2.0), SiteSensitivity("rest", 35, 40.0)]
    fb = greedy_fallback(model, ranking, target_db=25.0, max_fallback_pct=10.0)
    assert fb.sites == ("small",) and fb.reached and fb.output_sqnr_db == 30.0 and fb.start_sqnr_db == 10.0
    assert fb.int8_flop_fraction == pytest.approx(0.95)
    assert model.calls == [frozenset(), frozenset({"small"})]  # stops once the target is met


class _ScriptedHalf(_Scripted):
    """A stand-in for one half of the held-back feeds: output error from a table of which sites are in float
    (signal 1 per feed over `feeds` feeds, so SQNR = -10 log10(noise per feed))."""

    def __init__(self, flops, sqnr_by_float, feeds: int = 2):
        super().__init__(flops, sqnr_by_float)
        self.feeds = [{}] * feeds

    def error(self, quantized: set[str]) -> OutputError:
        db = self.sqnr(quantized)
        return OutputError(signal=len(self.feeds), noise=len(self.feeds) * 10 ** (-db / 10))


def test_the_whole_fallback_stays_when_it_pays_on_the_feeds_it_did_not_choose_on():
    """Chosen on one half: a, b, c in float. On the other half the whole set beats everything quantized (15 vs
    12 dB): all three stay (a alone would score more there, but only a failed check trims), and the SQNR is
    reported over both halves."""
    flops = {"a": 10, "b": 10, "c": 10, "d": 70}
    chose = _ScriptedHalf(flops, {frozenset(): 10.0, frozenset("abc"): 30.0})
    check = _ScriptedHalf(flops, {frozenset(): 12.0, frozenset("abc"): 15.0, frozenset("a"): 16.0})
    fb = sensitivity.validated(sensitivity.Fallback(("a", "b", "c"), 30.0, 10.0, 0.7, False), chose, check, 40.0)
    assert fb.sites == ("a", "b", "c") and fb.proposed == 3 and not fb.reached
    assert fb.int8_flop_fraction == pytest.approx(0.7)
    assert fb.output_sqnr_db == pytest.approx(-10 * np.log10((10 ** -3.0 + 10 ** -1.5) / 2), abs=1e-3)
    assert fb.start_sqnr_db == pytest.approx(-10 * np.log10((10 ** -1.0 + 10 ** -1.2) / 2), abs=1e-3)
    assert frozenset("a") not in check.calls  # no prefix is scored when the whole passes


def test_a_fallback_that_fails_the_check_is_trimmed_to_its_best_prefix_there():
    """The whole set scores below everything quantized on the other half (11 vs 12 dB); a alone scores 16: a
    is kept."""
    flops = {"a": 10, "b": 10, "c": 10, "d": 70}
    chose = _ScriptedHalf(flops, {frozenset(): 10.0, frozenset("a"): 20.0, frozenset("ab"): 25.0,
                                  frozenset("abc"): 30.0})
    check = _ScriptedHalf(flops, {frozenset(): 12.0, frozenset("a"): 16.0, frozenset("ab"): 14.0,
                                  frozenset("abc"): 11.0})
    fb = sensitivity.validated(sensitivity.Fallback(("a", "b", "c"), 30.0, 10.0, 0.7, False), chose, check, 40.0)
    assert fb.sites == ("a",) and fb.proposed == 3
    assert fb.int8_flop_fraction == pytest.approx(0.9)
    assert fb.output_sqnr_db == pytest.approx(-10 * np.log10((10 ** -2.0 + 10 ** -1.6) / 2), abs=1e-3)  # 17.6 dB


def test_the_fallback_keeps_nothing_when_no_prefix_beats_all_quantized_on_the_other_half():
    flops = {"a": 10, "b": 90}
    chose = _ScriptedHalf(flops, {frozenset(): 10.0, frozenset("a"): 20.0, frozenset("ab"): 30.0})
    check = _ScriptedHalf(flops, {frozenset(): 12.0, frozenset("a"): 12.0, frozenset("ab"): 11.0})
    fb = sensitivity.validated(sensitivity.Fallback(("a", "b"), 30.0, 10.0, 0.0, True), chose, check, 40.0)
    assert fb.sites == () and fb.int8_flop_fraction == 1.0 and not fb.reached  # a tie: the shorter prefix


def test_a_prefix_whose_last_site_bought_nothing_where_it_was_chosen_is_not_a_candidate():
    """b lowered the SQNR on the half it was chosen on (20 -> 19 dB): the prefix ending at b is not scored on the
    other half, though it would score best there; of a and the whole, a."""
    flops = {"a": 10, "b": 10, "c": 10, "d": 70}
    chose = _ScriptedHalf(flops, {frozenset(): 10.0, frozenset("a"): 20.0, frozenset("ab"): 19.0,
                                  frozenset("abc"): 25.0})
    check = _ScriptedHalf(flops, {frozenset(): 12.0, frozenset("a"): 14.0, frozenset("ab"): 18.0,
                                  frozenset("abc"): 11.0})
    fb = sensitivity.validated(sensitivity.Fallback(("a", "b", "c"), 25.0, 10.0, 0.7, False), chose, check, 40.0)
    assert fb.sites == ("a",) and fb.proposed == 3
    assert frozenset("ab") not in check.calls


# -- calibration holdout -------------------------------------------------------------------------------
def indexed_feeds(n: int) -> list[dict[str, np.ndarray]]:
    """Feed i holds the value i + 1 everywhere, so any statistic says which feeds it saw."""
    return [{"X": np.full((2, 3), i + 1, np.float32)} for i in range(n)]


def identity_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "I"], ["Y"], name="lin")], "identity",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.eye(3, dtype=np.float32), "I")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def feed_values(stats) -> set[int]:
    """The feed values present in a histogram (one bin per value at this range)."""
    centers = (stats.bin_edges[:-1] + stats.bin_edges[1:]) / 2
    return {int(round(c)) for c in centers[stats.hist > 0]}


@pytest.mark.parametrize("keep", [8, 1])
def test_holdout_every_4_of_8_feeds_fits_on_6_and_holds_back_feeds_3_and_7(keep):
    graph = gs.import_onnx(identity_model())
    data = open_calibration(indexed_feeds(8), model_inputs(graph))
    cal = calibrate(graph, ("X", "Y"), data, source_dir=None, providers=("CPUExecutionProvider",),
                    progress=False, sampled=("X",), holdout_every=4, keep_held_back=keep)
    for name in ("X", "Y"):  # a graph input and a computed tensor
        st = cal.fit_stats[name]  # what searches fit their candidate scales to
        assert st.count == 6 * 6
        assert st.amax == 7.0
        assert feed_values(st) == {1, 2, 3, 5, 6, 7}
        np.testing.assert_array_equal(st.channel_amax, [7.0, 7.0, 7.0])
        full = cal.stats[name]  # the final scales use every feed
        assert full.count == 8 * 6 and full.amax == 8.0 and feed_values(full) == set(range(1, 9))
    assert set(np.unique(cal.samples["X"])) == {4.0, 8.0}  # the row sample: held-back feeds only
    assert len(cal.samples["X"]) == 2 * 2
    held = [int(f["X"][0, 0]) - 1 for f in cal.held_back]
    assert held == [3, 7][:keep]
    # the model's output on each feed kept, from this pass (Y = X here): the searches' float reference
    assert [int(out[0][0, 0]) - 1 for out in cal.held_back_outputs] == held


@pytest.mark.parametrize("workers", [1, 2])
def test_the_held_back_reference_is_the_model_output_on_each_feed_kept_as_the_reservoir_replaces_them(workers):
    """40 feeds, every 4th held back (10), 3 kept: later feeds take earlier ones' places, and each kept feed's
    output stays beside it, over 2 workers as in one process."""
    graph = gs.import_onnx(identity_model())
    data = open_calibration(indexed_feeds(40), model_inputs(graph))
    cal = calibrate(graph, ("X", "Y"), data, source_dir=None, providers=("CPUExecutionProvider",), progress=False,
                    holdout_every=4, keep_held_back=3, workers=workers)
    held = [int(f["X"][0, 0]) - 1 for f in cal.held_back]
    assert len(held) == 3 and all(i % 4 == 3 for i in held) and held != [3, 7, 11]  # some were replaced
    assert len(cal.held_back_outputs) == 3
    for feed, outputs in zip(cal.held_back, cal.held_back_outputs):
        assert len(outputs) == 1
        np.testing.assert_array_equal(outputs[0], feed["X"])


def test_a_run_without_held_back_feeds_keeps_no_outputs():
    graph = gs.import_onnx(identity_model())
    data = open_calibration(indexed_feeds(8), model_inputs(graph))
    cal = calibrate(graph, ("X",), data, source_dir=None, providers=("CPUExecutionProvider",), progress=False)
    assert cal.held_back == [] and cal.held_back_outputs is None


def test_without_holdout_every_feed_is_fitted_and_sampled():
    graph = gs.import_onnx(identity_model())
    data = open_calibration(indexed_feeds(8), model_inputs(graph))
    cal = calibrate(graph, ("X",), data, source_dir=None, providers=("CPUExecutionProvider",), progress=False,
                    sampled=("X",), holdout_every=0, keep_held_back=8)
    assert cal.stats["X"].count == 8 * 6 and cal.stats["X"].amax == 8.0
    assert set(np.unique(cal.samples["X"])) == set(range(1, 9)) and cal.held_back == []


@pytest.mark.parametrize("max_holdout_feeds, held", [(8, [3, 7]), (1, [3])])
def test_the_final_scales_use_every_feed_and_the_analysis_runs_on_the_held_back_ones(
        analysis_models, max_holdout_feeds, held):
    result = quantize(identity_model(), indexed_feeds(8),
                      QuantConfig(calibration={"max_holdout_feeds": max_holdout_feeds},
                                  fallback={"sensitivity": True}), progress=False)
    # the final scales use every feed; the analysis (decided on feeds 3 and 7) used scales fitted without them
    assert result.params["lin"].act_amax == 8.0
    (gated,) = analysis_models
    assert [int(f["X"][0, 0]) - 1 for f in gated.feeds] == held


def test_the_report_counts_only_dual_scale_sites_that_are_in_the_graph(write_calib):
    result = quantize(build_linear_model("matmul"), write_calib("matmul", n=8), progress=False,
                      config=QuantConfig(dualscale={"mode": "all"}, fallback={"target_sqnr": 200.0,
                                                                              "max_fallback_pct": 100.0}))
    assert result.report["fallback"]["sites"] and result.report["fallback"]["reached"]
    in_graph = sum(1 for n in result.model.graph.node if n.name.endswith("/dual_add"))
    assert result.report["summary"]["dualscale_applied"] == in_graph


@pytest.mark.parametrize("min_gain_db, scored", [(1000.0, 1), (0.0, 2)])
def test_dualscale_auto_is_checked_at_the_output_only_when_it_applied_a_site(write_calib, min_gain_db, scored):
    """With DualScale auto choosing no site per layer, the `off` variant is the same quantization: one
    held-back trial, not two. When it chooses sites, both are scored and compared."""
    config = QuantConfig(dualscale={"mode": "auto", "min_gain_db": min_gain_db})
    result = quantize(build_linear_model("matmul"), write_calib("matmul", n=8), config, progress=False)
    trials = result.report["heldback_trials"]
    assert len(trials) == scored
    assert trials[0]["dualscale"] == "auto" and trials[0]["dual_sites"] == (0 if scored == 1 else 1)


@pytest.mark.parametrize("target, floating, reached", [
    (30.0, ("a",), True),  # reached exactly after the first site: stop there
    (30.125, ("a", "b"), True),  # just over it: the next site in the ranking too
    (45.125, ("a", "b", "c"), False),  # never reached: every site within the budget, then stop
])
def test_greedy_fallback_follows_the_ranking_until_the_target_is_reached(target, floating, reached):
    # the ranking's order, not the FLOPs' or the names': c is the cheapest and comes last
    model = _Scripted({"c": 10, "b": 30, "a": 30},
                      {frozenset(): 10.0, frozenset("a"): 30.0, frozenset("ab"): 40.0, frozenset("abc"): 45.0})
    ranking = [SiteSensitivity("a", 30, 1.0), SiteSensitivity("b", 30, 2.0), SiteSensitivity("c", 10, 3.0)]
    fb = greedy_fallback(model, ranking, target_db=target, max_fallback_pct=100.0)
    assert fb.sites == floating and fb.reached is reached
    assert fb.output_sqnr_db == model.table[frozenset(floating)] and fb.start_sqnr_db == 10.0
    assert fb.int8_flop_fraction == pytest.approx(1 - sum({"a": 30, "b": 30, "c": 10}[s] for s in floating) / 70)
    assert model.calls == [frozenset()] + [frozenset(floating[:i + 1]) for i in range(len(floating))]


@pytest.mark.parametrize("budget, floating", [(25.0, ("b",)), (24.875, ())])
def test_greedy_fallback_spends_up_to_the_budget_exactly(budget, floating):
    model = _Scripted({"a": 300, "b": 100}, {frozenset(): 10.0, frozenset("b"): 20.0})
    fb = greedy_fallback(model, [SiteSensitivity("a", 300, 1.0), SiteSensitivity("b", 100, 2.0)],
                         target_db=15.0, max_fallback_pct=budget)  # b: 25% of the FLOPs
    assert fb.sites == floating and fb.reached is bool(floating)


@pytest.mark.parametrize("late_high", [False, True])
def test_greedy_fallback_stops_after_patience_sites_without_a_new_high(late_high):
    """Short of the target, FALLBACK_PATIENCE float sites in a row that reach no new high stop the search; a new high
    before that resets the count."""
    patience = sensitivity.FALLBACK_PATIENCE
    names = [f"s{i}" for i in range(2 * patience + 6)]
    table = {frozenset(): 10.0}
    for i in range(len(names)):  # a high at the second site, then up and down below it (a new high at patience)
        table[frozenset(names[:i + 1])] = (20.0 + i if i < 2 else 21.5 if late_high and i == patience
                                           else 20.5 + (i % 2) * 0.4)
    model = _Scripted(dict.fromkeys(names, 1), table)
    ranking = [SiteSensitivity(n, 1, float(i)) for i, n in enumerate(names)]
    fb = greedy_fallback(model, ranking, target_db=40.0, max_fallback_pct=100.0)
    last_high = patience + 1 if late_high else 2
    assert len(model.calls) == 1 + last_high + patience  # all quantized, up to the last high, then `patience` more
    assert fb.sites == tuple(names[:last_high + patience]) and not fb.reached


@pytest.mark.parametrize("raises_at", [None, 2])
def test_greedy_fallback_stops_after_check_patience_new_highs_that_raise_nothing_on_the_other_half(raises_at):
    """With the other half of a split, each new high on the chosen half is scored there; CHECK_PATIENCE new highs in a
    row that raise nothing there stop the search (the greedy search is fitting its own feeds); one that raises the
    other half resets the count."""
    patience = sensitivity.CHECK_PATIENCE
    names = [f"s{i}" for i in range(3 * patience + 2)]
    chose_table = {frozenset(names[:i]): 10.0 + i for i in range(len(names) + 1)}  # every site a new high
    check_table = {frozenset(names[:i]): 12.0 + (3.0 if raises_at is not None and i >= raises_at else 0.0)
                   for i in range(len(names) + 1)}
    chose = _Scripted(dict.fromkeys(names, 1), chose_table)
    check = _Scripted(dict.fromkeys(names, 1), check_table)
    ranking = [SiteSensitivity(n, 1, float(i)) for i, n in enumerate(names)]
    fb = greedy_fallback(chose, ranking, target_db=100.0, max_fallback_pct=100.0, check=check)
    stop = patience if raises_at is None else raises_at + patience
    assert fb.sites == tuple(names[:stop]) and not fb.reached
    assert check.calls == [frozenset(names[:i]) for i in range(stop + 1)]  # all quantized, then each new high
    assert len(greedy_fallback(_Scripted(dict.fromkeys(names, 1), chose_table), ranking, 100.0, 100.0).sites) == len(
        names)  # without a check half: every site


def test_sensitivity_ranks_the_lowest_output_sqnr_first():
    model = _Scripted({"a": 1, "b": 1, "c": 1}, {})
    quantized_alone = {"a": 30.0, "b": 12.5, "c": 20.0}
    model.sqnr = lambda quantized: quantized_alone[next(iter(quantized))]
    ranked = sensitivity.rank_sensitivity(model, progress=False)
    assert [(r.site, r.output_sqnr_db) for r in ranked] == [("b", 12.5), ("c", 20.0), ("a", 30.0)]


@pytest.mark.parametrize("margin, floating", [(-0.05, 1), (0.05, 2)])
def test_the_fallback_stops_at_a_target_just_under_what_one_site_in_float_reaches(sensitive, margin, floating):
    """The sensitive model (fc1 in float reaches 34.85 dB, measured): a target 0.05 dB under it keeps fc1
    only; 0.05 dB over it, the next site of the ranking as well."""
    config = QuantConfig(calibration={"method": "max"}, dualscale={"mode": "off"},
                         fallback={"target_sqnr": TARGET, "max_fallback_pct": 100.0},
                         precision={"high_precision": "fp32"})  # the model written is the one the fallback scored
    first = quantize(sensitive / "model.onnx", sensitive / "calib.npz", config, progress=False, evaluate=False)
    one = first.report["fallback"]["output_sqnr_db"]
    assert first.report["fallback"]["sites"] == ("fc1",) and 33.0 < one < 37.0  # measured 34.85
    target = one + margin
    r = quantize(sensitive / "model.onnx", sensitive / "calib.npz",
                 config.updated(fallback={"target_sqnr": target}), progress=False, evaluate=False)
    fb, ranking = r.report["fallback"], [row["site"] for row in r.report["sensitivity"]]
    assert fb["sites"] == tuple(ranking[:floating]) and fb["sites"][0] == "fc1"
    assert fb["reached"] and fb["output_sqnr_db"] >= target
    assert held_back_sqnr(r.model) == pytest.approx(fb["output_sqnr_db"], abs=0.05)
    producers = {o: n.op_type for n in r.model.graph.node for o in n.output}
    reads_dq = {n.name: producers.get(n.input[0]) == "DequantizeLinear" for n in r.model.graph.node
                if n.op_type == "MatMul"}
    assert reads_dq == {name: name not in fb["sites"] for name in ("fc1", "fc2", "fc3")}


class _Additive:
    """A GatedModel stand-in whose output noise power is the sum of its quantized sites' (signal 1)."""

    def __init__(self, noise: dict[str, float], flops: dict[str, int] | None = None):
        flops = flops or {n: 1 for n in noise}
        self.sites = [LinearSite(n, "MatMul", f"{n}_x", f"{n}_w", (1, 1), 1, flops[n]) for n in noise]
        self.noise, self.runs = noise, []

    def error(self, quantized: set[str]) -> OutputError:
        self.runs.append(frozenset(quantized))
        return OutputError(signal=1.0, noise=sum(self.noise[n] for n in quantized))

    def sqnr(self, quantized: set[str]) -> float:
        return self.error(quantized).sqnr


def test_the_grouped_ranking_finds_the_most_sensitive_sites_in_fewer_runs():
    """128 sites, three of them far noisier: grouped, the head is exact (those three first, each with its own SQNR)
    in fewer runs than one per site; the tail carries its groups' SQNR; every site is ranked once."""
    rng = np.random.default_rng(0)
    noise = {f"s{i}": float(x) for i, x in enumerate(rng.uniform(1e-6, 1e-5, 128))}
    noise |= {"s7": 1e-2, "s40": 3e-3, "s41": 1e-3}
    model = _Additive(noise)
    grouped = sensitivity.rank_sensitivity(model, progress=False, refine_flops=3)
    exact = sensitivity.rank_sensitivity(_Additive(noise), progress=False)
    assert [r.site for r in grouped[:3]] == [r.site for r in exact[:3]] == ["s7", "s40", "s41"]
    assert [r.output_sqnr_db for r in grouped[:3]] == [r.output_sqnr_db for r in exact[:3]]
    # the tail: sites split off alone on the way (their own SQNR) and whole groups (the group's)
    assert all(r.group == 1 for r in grouped[:3]) and sum(r.group > 1 for r in grouped[3:]) > 96
    assert sorted(r.site for r in grouped) == sorted(noise) and len(model.runs) < 128 / 2
    sqnrs = [r.output_sqnr_db for r in grouped]
    assert sqnrs == sorted(sqnrs)  # a group's noise bounds each of its sites': the order holds across head and tail
    # few sites: one run per site, as without refine_flops
    few = {f"t{i}": float(i + 1) * 1e-4 for i in range(sensitivity.GROUPED_MIN_SITES)}
    assert sensitivity.rank_sensitivity(_Additive(few), progress=False, refine_flops=1) == \
        sensitivity.rank_sensitivity(_Additive(few), progress=False)
