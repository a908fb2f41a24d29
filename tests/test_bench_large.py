"""The large suite's pieces that need no large model: the larger calibration set and the stage table's ratio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


@pytest.fixture()
def large(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from benchkit import large

    return large


def test_the_larger_calibration_set_extends_the_16_feed_one_and_is_made_once(large, tmp_path):
    from benchkit.cases import ModelCase, load_script

    script = load_script(large.LARGE_SCRIPT)
    calib = tmp_path / "m_calib.npz"
    np.savez(calib, **script.trajectory_data(4, 4, 1))  # what large_model.py writes: 4 prompts x 4 noise levels
    case = ModelCase("m", tmp_path / "m.onnx", calib, tmp_path / "m_eval.npz", "test")
    path = large.larger_calibration(case, 24)
    assert path == tmp_path / "m_calib24.npz"
    got, small = dict(np.load(path)), dict(np.load(calib))
    assert sorted(got) == sorted(small)
    for name in small:
        assert got[name].shape[0] == 24 and got[name].dtype == np.float16
        np.testing.assert_array_equal(got[name][:16], small[name])  # its first prompts are the 16 feeds
    stamp = path.stat().st_mtime_ns
    assert large.larger_calibration(case, 24) == path and path.stat().st_mtime_ns == stamp  # reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_calib.npz", "m_calib24.npz"]  # no partial file left


def test_the_stage_table_divides_the_stages_sum_by_calibration(large):
    from benchkit.results import ResultRow

    rows = [ResultRow("m", "ours a", "ours", report={"stage_seconds": {"load and plan": 1.0, "calibrate": 10.0,
                                                                        "decide": 4.0}}),
            ResultRow("m", "ours b", "ours", report={"stage_seconds": {"calibrate": 2.0, "decide": 6.0}}),
            ResultRow("m", "ORT", "ort")]
    table = large.stage_table(rows, {})
    assert table.splitlines()[0] == "| stage | ours a | ours b |"
    assert table.splitlines()[-1] == "| **stages / calibrate** | 1.50 | 4.00 |"
