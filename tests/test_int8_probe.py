"""scripts/int8_probe.py: each mode fake-quantizes what it says, measured on models whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import int8_probe

    return int8_probe


def _matmul(tmp_path, w: np.ndarray, calib: np.ndarray, evals: np.ndarray) -> tuple[Path, Path, Path]:
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8, w.shape[0]])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8, w.shape[1]])],
                              [numpy_helper.from_array(w.astype(np.float32), "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib.astype(np.float32))
    np.savez(tmp_path / "e.npz", X=evals.astype(np.float32))
    return tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "e.npz"


def _on_grid(rng, k=16, n=4) -> np.ndarray:
    """A weight already on its per-column INT8 grid: integers / 127 with each column's abs-max 1."""
    w = rng.integers(-127, 128, (k, n)).astype(np.float32) / 127
    w[0] = 1.0
    return w


def test_weights_on_their_grid_cost_nothing_and_feed_ranges_separate_static_from_dynamic(tmp_path, probe):
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((6, 8, 16))
    calib[::2] *= 100  # half the calibration feeds 100x the eval feeds: one static scale leaves these ~1 level
    evals = rng.standard_normal((4, 8, 16))
    result = probe.probe(*_matmul(tmp_path, _on_grid(rng), calib, evals))
    assert result["weights"] > 120  # float32 arithmetic only (measured 155.6 dB)
    # measured: static 3.13, dynamic 43.30, dynamic-channel 48.57 dB
    assert result["dynamic"] > result["static"] + 20
    assert result["dynamic-channel"] >= result["dynamic"] - 0.5


def test_one_large_channel_separates_per_tensor_from_per_channel(tmp_path, probe):
    rng = np.random.default_rng(1)
    w = _on_grid(rng)
    w[3] = np.sign(w[3]) / 127  # the smallest grid step: the large channel carries no more than the others
    x = rng.standard_normal((4, 8, 16))
    x[..., 3] *= 300  # one input channel 300x the rest in every feed: the per-tensor step drowns the others
    result = probe.probe(*_matmul(tmp_path, w, x, x), modes=("static", "dynamic", "dynamic-channel"))
    # measured: static 2.55, dynamic 3.56, dynamic-channel 48.15 dB
    assert abs(result["static"] - result["dynamic"]) < 2
    assert result["dynamic-channel"] > result["dynamic"] + 20


def test_a_missing_file_or_unknown_mode_is_one_sentence_and_exit_2(tmp_path, probe, capsys):
    m, c, e = _matmul(tmp_path, np.eye(16, 4), np.ones((1, 8, 16)), np.ones((1, 8, 16)))
    with pytest.raises(SystemExit) as exc:
        probe.main([str(m), str(tmp_path / "nope.npz"), str(e)])
    assert exc.value.code == 2 and "nope.npz does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        probe.main([str(m), str(c), str(e), "--modes", "static,fp8"])
    assert exc.value.code == 2 and "--modes fp8 unknown" in capsys.readouterr().err
