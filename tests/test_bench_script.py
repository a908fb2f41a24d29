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
