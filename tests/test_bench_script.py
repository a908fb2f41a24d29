"""The benchmark script keeps working: its quick mode runs end to end (seconds) on the bundled example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_mode_writes_the_table_and_json(tmp_path):
    md = tmp_path / "BENCH.md"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--skip-modelopt",
                        "--work-dir", str(tmp_path / "work"), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = md.read_text()
    assert "| example | naive INT8 |" in text and "| example | default |" in text and "ORT MinMax" in text
    results = list((tmp_path / "work").glob("*.json"))
    assert results, "the full numbers are written as JSON beside the table"
    data = json.loads(results[0].read_text())
    assert data  # non-empty: rows measured in this run


def test_demo_dynamo_is_the_trained_checkpoint_through_the_dynamo_exporter(tmp_path):
    """The bench's `demo-dynamo` case: the saved demo checkpoint re-exported with dynamo=True computes
    what the bundled TorchScript export computes, on the demo's own eval feeds."""
    import importlib.util

    import numpy as np
    import onnx
    import pytest

    pytest.importorskip("diffusers")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # its dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench"]
    (case,) = bench.prepare_models(["demo-dynamo"], tmp_path)
    assert case.onnx_path.parent == tmp_path / "models" and case.calib_path.name == "demo_dit_calib.npz"
    model = onnx.load(case.onnx_path)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    assert any(n.op_type == "Split" for n in model.graph.node)  # dynamo writes chunk as Split
    feed = next(bench.iter_samples(case.eval_path))
    got = ort.InferenceSession(str(case.onnx_path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = ort.InferenceSession(str(bench.DATA_DIR / "demo_dit.onnx"), providers=["CPUExecutionProvider"]).run(
        None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
