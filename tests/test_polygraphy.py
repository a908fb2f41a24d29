"""The Polygraphy commands the README shows work on our output (subprocess; skipped without the CLI).

They run in tmp_path, as a user would in the folder holding the quantized model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from segquant_onnx.cli import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL, example_path

LOADER = Path(__file__).resolve().parents[1] / "scripts" / "polygraphy_data_loader.py"
pytestmark = pytest.mark.skipif(shutil.which("polygraphy") is None, reason="polygraphy CLI not installed")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with the float example, its eval data and the quantized example (OUT.onnx)."""
    from segquant_onnx.pipeline import quantize

    d = tmp_path_factory.mktemp("polygraphy")
    quantize(example_path(EXAMPLE_MODEL), example_path(EXAMPLE_CALIB), output=d / "example_dit_int8.onnx",
             progress=False)
    shutil.copy(example_path(EXAMPLE_MODEL), d / "example_dit.onnx")
    shutil.copy(example_path(EXAMPLE_EVAL), d / "eval.npz")
    return d


def polygraphy(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["polygraphy", *args], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)


def test_inspect_model(workdir):
    r = polygraphy(workdir, "inspect", "model", "example_dit_int8.onnx")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 Graph Input(s)" in r.stdout and "DequantizeLinear" not in r.stdout  # a summary, not every layer
    r = polygraphy(workdir, "inspect", "model", "example_dit_int8.onnx", "--show", "layers")
    assert r.returncode == 0 and "DequantizeLinear" in r.stdout


def test_run_with_the_data_loader_script(workdir):
    r = polygraphy(workdir, "run", "example_dit_int8.onnx", "--onnxrt", "--data-loader-script", str(LOADER),
                   SEGQUANT_DATA="eval.npz", SEGQUANT_MODEL="example_dit_int8.onnx")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    n = _num_feeds(workdir / "eval.npz")
    assert f"Iteration: {n - 1}" in out and f"Iteration: {n}" not in out  # the eval set's feeds, no random data
    assert "PASSED" in out


def test_compare_against_the_float_model(workdir):
    r = polygraphy(workdir, "run", "example_dit.onnx", "--onnxrt", "--data-loader-script", str(LOADER),
                   "--save-inputs", "inputs.json", "--save-outputs", "fp_outputs.json",
                   SEGQUANT_DATA="eval.npz", SEGQUANT_MODEL="example_dit.onnx")
    assert r.returncode == 0, r.stdout + r.stderr
    r = polygraphy(workdir, "run", "example_dit_int8.onnx", "--onnxrt", "--load-inputs", "inputs.json")
    assert r.returncode == 0 and f"Iteration: {_num_feeds(workdir / 'eval.npz') - 1}" in r.stdout + r.stderr, \
        r.stdout + r.stderr
    compare = ["run", "example_dit_int8.onnx", "--onnxrt", "--load-inputs", "inputs.json",
               "--load-outputs", "fp_outputs.json", "--rtol", "0"]
    r = polygraphy(workdir, *compare, "--atol", "1")  # the demo DiT's INT8 outputs differ by up to ~0.4
    assert r.returncode == 0, r.stdout + r.stderr
    n = _num_feeds(workdir / "eval.npz")
    assert f"Passed: {n}/{n} iterations" in r.stdout + r.stderr
    r = polygraphy(workdir, *compare, "--atol", "1e-4")  # INT8 error is above that: the comparison is real
    assert r.returncode != 0


def _num_feeds(npz) -> int:
    with np.load(npz) as data:
        return len(next(iter(data.values())))
