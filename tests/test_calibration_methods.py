"""Each fixed calibration method through the whole pipeline: the activation scale written into the output
model (its QuantizeLinear's scale initializer) is the method's threshold on the calibration data / 127,
the threshold computed here from the histogram definition (tests/references.py), not by the library.

The data are heavy-tailed (Laplace) with a few far values in different feeds, so every method gives its
own threshold and the histogram is widened while calibrating (widening merges whole bins: the reference
bins all values at the final range at once).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import references
from conftest import fvi, make_model
from segquant_onnx import QuantConfig
from segquant_onnx.cli import main
from segquant_onnx.pipeline import quantize

K, N, ROWS, FEEDS = 32, 16, 64, 8


def linear_model() -> onnx.ModelProto:
    w = (np.random.default_rng(0).standard_normal((K, N)) / 6).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="lin")], [fvi("X", [ROWS, K])],
                      [fvi("Y", [ROWS, N])], {"W": w})


def calibration() -> np.ndarray:
    x = np.random.default_rng(1).laplace(size=(FEEDS, ROWS, K)).astype(np.float32)
    x[2, 5, 3], x[5, 9, 7], x[7, 1, 1] = 40.0, -75.0, 90.0  # later feeds widen the histogram
    return x


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("methods") / "calib.npz"
    np.savez(path, X=calibration())
    return path


def written_input_scale(model: onnx.ModelProto, node: str = "lin") -> np.float32:
    """The scale initializer of the QuantizeLinear whose DequantizeLinear feeds `node`'s activation."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    (linear,) = [n for n in model.graph.node if n.name == node]
    dq = producers[linear.input[0]]
    q = producers[dq.input[0]]
    assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
    scale = inits[q.input[1]]
    assert scale.dtype == np.float32 and scale.shape == ()
    assert inits[dq.input[1]] == scale  # the pair shares its scale
    return scale[()]


CASES = [("max", 99.99), ("percentile", 99.99), ("percentile", 99.9), ("percentile", 99.0), ("mse", 99.99),
         ("entropy", 99.99)]


@pytest.fixture(scope="module")
def written(calib_file):
    """(method, percentile) -> the activation scale `quantize` wrote."""
    out = {}
    for method, pct in CASES:
        config = QuantConfig(calibration={"method": method, "percentile": pct}, dualscale={"mode": "off"},
                             precision={"high_precision": "fp32"})  # the formula in float32, unrounded
        out[method, pct] = written_input_scale(quantize(linear_model(), calib_file, config, progress=False,
                                                        evaluate=False).model)
    return out


@pytest.mark.parametrize("method, percentile", CASES)
def test_the_written_activation_scale_is_the_methods_threshold_over_127(written, method, percentile):
    threshold = references.threshold(calibration(), method, percentile)
    assert written[method, percentile] == references.int8_scale(threshold), (method, threshold)


def test_the_methods_give_distinct_scales_and_only_max_keeps_the_range(written):
    """A method that fell back to another (or a percentile that is not read) would repeat its scale."""
    scales = list(written.values())
    assert len(set(scales)) == len(scales), written
    amax = float(np.abs(calibration()).max())
    assert written["max", 99.99] == references.int8_scale(amax)
    assert all(s < written["max", 99.99] for k, s in written.items() if k[0] != "max")  # all clip


def test_the_cli_flags_reach_the_written_scale(calib_file, tmp_path):
    out = tmp_path / "q.onnx"
    assert main(["quantize", "--calib", str(calib_file), "-o", str(out), "-q", "--calib-method", "percentile",
                 "--percentile", "99.5", "--dualscale", "off", "--high-precision", "fp32", "--no-eval",
                 str(_saved(tmp_path))]) == 0
    want = references.int8_scale(references.threshold(calibration(), "percentile", 99.5))
    assert written_input_scale(onnx.load(str(out))) == want


def _saved(tmp_path):
    path = tmp_path / "lin.onnx"
    onnx.save(linear_model(), str(path))
    return path


def test_the_held_back_trials_score_the_configured_threshold(calib_file):
    """The search scores candidates fitted on the statistics of the other feeds: the `off` trial's held-back
    SQNR is that of percentile-99 scales from feeds 0-2 and 4-6, on feeds 3 and 7, recomputed here."""
    config = QuantConfig(calibration={"method": "percentile", "percentile": 99.0}, smoothquant={"mode": "auto"},
                         dualscale={"mode": "off"})
    r = quantize(linear_model(), calib_file, config, progress=False, evaluate=False)
    (off,) = [t for t in r.report["heldback_trials"] if t["smoothquant"] == "off"]
    x = calibration()
    fit_feeds, held = x[[0, 1, 2, 4, 5, 6]], x[[3, 7]]
    w = numpy_helper.to_array(linear_model().graph.initializer[0]).astype(np.float64)
    s = references.int8_scale(references.threshold(fit_feeds, "percentile", 99.0))
    wq = references.fq(w, (np.abs(w).max(axis=0) / 127).astype(np.float32), axis=1)
    want = references.sqnr_db([h @ w for h in held], [references.fq(h, s) @ wq for h in held])
    assert off["heldback_sqnr_db"] == pytest.approx(want, abs=0.01)
