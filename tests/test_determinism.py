"""Same input, same bytes, across processes: two interpreters with different hash seeds (PYTHONHASHSEED: the
iteration order of sets and dicts of strings) quantize the same models, stored with external data, and every
file they write is byte-identical.

Cases: the bundled random-weight example DiT with the default config (SegLinear and DualScale candidates on a
real export), and a two-layer model with outlier input channels and a SiLU with the default config and with
every search on (SmoothQuant, outlier channels and the calibration method auto, fallback to a 40 dB target):
the example with every search on takes about a minute per process, almost all of it calibration `auto`.
The two interpreters run at once, each quantizing every case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from conftest import fvi, make_model
from segquant_onnx.examples import example_path

ALL_SEARCHES = {"smoothquant": {"mode": "auto"}, "outliers": {"mode": "auto"}, "calibration": {"method": "auto"},
                "fallback": {"target_sqnr": 40.0}}
CASES = {"example-default": ("example_dit", {}), "searched-default": ("searched", {}),
         "searched-all-searches": ("searched", ALL_SEARCHES)}
HASH_SEEDS = ("0", "4242")

_QUANTIZE = textwrap.dedent("""
    import json, sys
    from segquant_onnx import QuantConfig, quantize
    folder, out_dir, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for name, (model, groups) in cases.items():
        result = quantize(f"{folder}/{model}.onnx", f"{folder}/{model}.npz", QuantConfig(**groups),
                          output=f"{out_dir}/{name}/q.onnx", evaluate=False, progress=False)
        print(json.dumps({name: result.report["heldback_trials"]}))
""")

K, N, R = 64, 48, 16


def searched_model() -> onnx.ModelProto:
    """X * c (6 of 64 channels x40) -> fc1 -> SiLU -> fc2: outlier channels and SmoothQuant for fc1, DualScale
    for fc2, and a calibration method and a fallback decision for both."""
    rng = np.random.default_rng(0)
    c = np.ones(K, np.float32)
    c[rng.choice(K, 6, replace=False)] = 40.0
    nodes = [helper.make_node("Mul", ["X", "c"], ["xc"], name="scale"),
             helper.make_node("MatMul", ["xc", "W1"], ["h"], name="fc1"),
             helper.make_node("Sigmoid", ["h"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["h", "s"], ["a"], name="silu"),
             helper.make_node("MatMul", ["a", "W2"], ["Y"], name="fc2")]
    return make_model(nodes, [fvi("X", [R, K])], [fvi("Y", [R, N])],
                      {"c": c, "W1": (rng.standard_normal((K, K)) / 8).astype(np.float32),
                       "W2": (rng.standard_normal((K, N)) / 8).astype(np.float32)})


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=0)


def test_two_hash_seeds_write_byte_identical_models_with_external_data(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _save_external(onnx.load(str(example_path("example_dit.onnx"))), inputs / "example_dit.onnx")
    (inputs / "example_dit.npz").write_bytes(example_path("example_dit_calib.npz").read_bytes())
    _save_external(searched_model(), inputs / "searched.onnx")
    np.savez(inputs / "searched.npz", X=np.random.default_rng(1).standard_normal((12, R, K)).astype(np.float32))

    runs = {}
    for seed in HASH_SEEDS:
        out = tmp_path / f"seed{seed}"
        for name in CASES:
            (out / name).mkdir(parents=True)
        runs[seed] = (out, subprocess.Popen(
            [sys.executable, "-c", _QUANTIZE, str(inputs), str(out), json.dumps(CASES)],
            env={**os.environ, "PYTHONHASHSEED": seed}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    stdout = {}
    for seed, (_, proc) in runs.items():
        stdout[seed], stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"PYTHONHASHSEED={seed}: {stderr[-3000:]}"

    # the searches ran: every cap x variant was scored on held-back feeds, and a per-site outlier search
    trials = {k: v for line in stdout[HASH_SEEDS[0]].splitlines() for k, v in json.loads(line).items()}
    assert {t["smoothquant"] for t in trials["searched-all-searches"]} == {"auto", "off"}
    assert {t["outlier_cap"] for t in trials["searched-all-searches"]} >= {0, "per-site"}
    assert stdout[HASH_SEEDS[0]] == stdout[HASH_SEEDS[1]]

    (a, _), (b, _) = runs.values()
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    # the sources' external data stays external: each case writes the graph and its data file
    assert files == sorted(Path(c) / f for c in CASES for f in ("q.onnx", "q.onnx.data"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs between hash seeds {HASH_SEEDS}"
