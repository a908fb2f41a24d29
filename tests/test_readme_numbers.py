"""The README's demo table holds the numbers `segquant-onnx demo` measures with the README's settings.

scripts/readme_demo.py writes the table; this test re-runs the demo (~10 s) and reads the table back,
so a table edited by hand, or code that changes the numbers without re-running the script, fails here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| method | PSNR dB | SSIM | output SQNR dB (eval feeds) | mean per-step SQNR dB |"
# CPU float results differ slightly between machines (BLAS kernels, thread counts, instruction sets), so
# a rounded number may move by a unit or two in its last place: 0.02 dB on PSNR/SQNR, 0.0002 on SSIM.
TOLERANCES = (0.02, 0.0002, 0.02, 0.02)


def read_table(text: str) -> dict[str, list[float]]:
    """method -> [PSNR dB, SSIM, output SQNR dB, mean per-step SQNR dB], as the README shows them."""
    lines = text.splitlines()
    assert lines.count(HEADER) == 1, "the README's demo table header changed; update this test and the script"
    rows = {}
    for line in lines[lines.index(HEADER) + 2:]:
        if not line.startswith("|"):
            break
        name, *cells = (c.strip() for c in line.strip().strip("|").split("|"))
        rows[name] = [float(c) for c in cells]
    return rows


def measured_row(m: dict) -> list[float]:
    """The demo's metrics rounded as `segquant-onnx demo` prints them."""
    return [round(m["psnr_db"], 2), round(m["ssim"], 4), round(m["eval_output_sqnr_db"], 2),
            round(float(np.mean(m["step_sqnr_db_same_input"])), 2)]


@pytest.fixture(scope="module")
def metrics(demo_metrics):
    return demo_metrics  # conftest: the demo with the README's settings, shared with tests/diffusion


def test_readme_demo_table_matches_a_fresh_demo_run(metrics):
    table = read_table((ROOT / "README.md").read_text())
    assert list(table) == list(metrics["methods"]), "the README's rows are not the demo's methods"
    for name, m in metrics["methods"].items():
        for column, shown, got, tol in zip(HEADER.strip("| ").split(" | ")[1:], table[name], measured_row(m),
                                           TOLERANCES):
            assert shown == pytest.approx(got, abs=tol + 1e-9), (
                f"README {name!r} {column}: {shown}, the demo measures {got}; run python scripts/readme_demo.py")


def test_the_script_writes_what_the_check_reads(metrics):
    spec = importlib.util.spec_from_file_location("readme_demo", ROOT / "scripts" / "readme_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.HEADER == HEADER
    text = "intro. Measured (99 s):\n\n" + HEADER + "\n|---|---:|---:|---:|---:|\n| old | 1 | 2 | 3 | 4 |\n\nafter\n"
    rewritten = script.rewrite_readme(text, metrics, seconds=12.3)
    assert read_table(rewritten) == {name: measured_row(m) for name, m in metrics["methods"].items()}
    assert rewritten.startswith("intro. Measured (12 s):") and rewritten.endswith("\n\nafter\n")
