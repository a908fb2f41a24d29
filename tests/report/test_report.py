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
