"""The Polygraphy commands the README shows work on our output (subprocess; Polygraphy is a dependency, run
through this interpreter, so a `polygraphy` script missing from PATH does not skip them).

They run in tmp_path, as a user would in the folder holding the quantized model; the files Polygraphy
saves go to a scratch folder (the README's `D=$(mktemp -d)`), and nothing else is written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import dir_listing

from segquant_onnx.examples import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL, example_path

LOADER = Path(__file__).resolve().parents[1] / "scripts" / "polygraphy_data_loader.py"
# `polygraphy ARGS` as its console script runs it (entry point polygraphy.tools:main), in this interpreter
POLYGRAPHY = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())"]


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


WORKDIR_FILES = ["eval.npz", "example_dit.onnx", "example_dit_int8.onnx"]


def polygraphy(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    # no __pycache__ next to the loader script in the checkout
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env}
    return subprocess.run([*POLYGRAPHY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


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


def test_compare_against_the_float_model(workdir, tmp_path):
    scratch = tmp_path / "scratch"  # the README's D=$(mktemp -d)
    scratch.mkdir()
    inputs, fp_outputs = str(scratch / "inputs.json"), str(scratch / "fp_outputs.json")
    r = polygraphy(workdir, "run", "example_dit.onnx", "--onnxrt", "--data-loader-script", str(LOADER),
                   "--save-inputs", inputs, "--save-outputs", fp_outputs,
                   SEGQUANT_DATA="eval.npz", SEGQUANT_MODEL="example_dit.onnx")
    assert r.returncode == 0, r.stdout + r.stderr
    r = polygraphy(workdir, "run", "example_dit_int8.onnx", "--onnxrt", "--load-inputs", inputs)
    assert r.returncode == 0 and f"Iteration: {_num_feeds(workdir / 'eval.npz') - 1}" in r.stdout + r.stderr, \
        r.stdout + r.stderr
    compare = ["run", "example_dit_int8.onnx", "--onnxrt", "--load-inputs", inputs,
               "--load-outputs", fp_outputs, "--rtol", "0"]
    r = polygraphy(workdir, *compare, "--atol", "1")  # the demo DiT's INT8 outputs differ by up to ~0.4
    assert r.returncode == 0, r.stdout + r.stderr
    n = _num_feeds(workdir / "eval.npz")
    assert f"Passed: {n}/{n} iterations" in r.stdout + r.stderr
    r = polygraphy(workdir, *compare, "--atol", "1e-4")  # INT8 error is above that: the comparison is real
    assert r.returncode != 0
    assert dir_listing(scratch) == ["fp_outputs.json", "inputs.json"]
    assert dir_listing(workdir) == WORKDIR_FILES  # the saved files went to the scratch folder only


def test_the_readme_saves_polygraphy_files_in_a_scratch_folder():
    """The README's commands are the ones above: its --save/--load files live under $D, not the checkout."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Check with TensorRT and Polygraphy", 1)[1].split("\n## ", 1)[0]
    assert "D=$(mktemp -d)" in section
    for flag in ("--save-inputs", "--save-outputs", "--load-inputs", "--load-outputs"):
        targets = [line.split(flag, 1)[1].split()[0] for line in section.splitlines() if flag in line]
        assert targets and all(t.startswith("$D/") for t in targets), (flag, targets)


def _num_feeds(npz) -> int:
    with np.load(npz) as data:
        return len(next(iter(data.values())))
