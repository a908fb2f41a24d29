"""The Markdown report beside the JSON one, and the per-layer plot."""

from __future__ import annotations

import json

import pytest

from conftest import build_linear_model, save
from segquant_onnx.cli import main


def test_report_writes_json_and_markdown_with_every_site(tmp_path, write_calib, capsys):
    src = save(build_linear_model("matmul"), tmp_path / "m.onnx")
    calib = write_calib("matmul", n=8)
    report = tmp_path / "r.json"
    rc = main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib), "--eval", str(calib),
               "--report", str(report), "--per-layer", "--sensitivity", "-q"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    md = (tmp_path / "r.md").read_text()
    for site in data["sites"]:
        assert f"| {site['name']} | {site['op']} |" in md
    assert "## Sensitivity" in md and "output SQNR at layer" in md
    assert [e["layer"] for e in data["layer_error"]] == ["fc1", "fc2"]


def test_plot_writes_a_png_of_the_per_layer_error(tmp_path, write_calib, capsys):
    pytest.importorskip("matplotlib")
    src = save(build_linear_model("matmul"), tmp_path / "m.onnx")
    calib = write_calib("matmul", n=4)
    png = tmp_path / "layers.png"
    rc = main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib), "--eval", str(calib),
               "--plot", str(png), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def _one_huge_input_channel(tmp_path):
    """The matmul model whose input channel 0 carries +-1e4 but feeds nothing (its row of W1 is zero): one INT8 scale
    for X rounds every other channel to 0, and the output is lost (measured: about 0 dB)."""
    import numpy as np
    from onnx import numpy_helper

    from conftest import calib_inputs

    model = build_linear_model("matmul")
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    values = numpy_helper.to_array(w1).copy()
    values[0] = 0.0
    w1.CopyFrom(numpy_helper.from_array(values, "W1"))
    data = calib_inputs("matmul", 8)
    data[..., 0] = 1e4 * np.sign(data[..., 0])
    np.savez(tmp_path / "huge.npz", X=data)
    return save(model, tmp_path / "huge.onnx"), tmp_path / "huge.npz"


def test_the_summary_says_what_to_try_when_the_output_sqnr_is_under_10_db(tmp_path, write_calib, capsys):
    src, calib = _one_huge_input_channel(tmp_path)
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib), "--eval", str(calib),
                 "--preset", "fast"]) == 0
    out = capsys.readouterr().out
    hint = [line for line in out.splitlines() if line.startswith("hint: ")]
    assert len(hint) == 1 and "on the eval feeds, under 10 dB" in hint[0] and "--precision fp8" in hint[0]
    # FP8 keeps the small channels (a relative grid): no hint
    assert main(["quantize", str(src), "-o", str(tmp_path / "q8.onnx"), "--calib", str(calib), "--eval", str(calib),
                 "--preset", "fast", "--precision", "fp8"]) == 0
    assert "hint: " not in capsys.readouterr().out
    # a model INT8 quantizes well: no hint
    good = save(build_linear_model("matmul"), tmp_path / "m.onnx")
    assert main(["quantize", str(good), "-o", str(tmp_path / "g.onnx"), "--calib", str(write_calib("matmul", n=8)),
                 "--preset", "fast"]) == 0
    assert "hint: " not in capsys.readouterr().out


@pytest.mark.parametrize("report, fmt, expected", [
    ({"output_error": {"y": {"sqnr_db": 9.99}, "z": {"sqnr_db": 30.0}}}, "INT8", "9.99 dB on the eval feeds"),
    ({"output_error": {}, "fallback": {"output_sqnr_db": 3.5}}, "INT8", "3.50 dB on the held-back feeds"),
    ({"output_error": {"y": {"sqnr_db": 2.0}}}, "FP8", "2.00 dB on the eval feeds"),
    ({"output_error": {"y": {"sqnr_db": 10.0}}}, "INT8", None),
    ({"fallback": {"output_sqnr_db": 25.0}}, "INT8", None),
    ({}, "INT8", None),
])
def test_the_low_sqnr_hint_reads_the_eval_feeds_first_then_the_held_back_ones(report, fmt, expected):
    from segquant_onnx.report.render import low_sqnr_hint

    hint = low_sqnr_hint(report, fmt)
    if expected is None:
        assert hint is None
    else:
        assert expected in hint and ("--precision fp8" in hint) == (fmt == "INT8")
