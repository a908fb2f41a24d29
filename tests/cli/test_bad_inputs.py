"""The permanent bad-input suite: every subcommand, one table.

Each row is a command line a user could type by mistake. Every one must exit 2 with one line on
stderr that names what is wrong (and no traceback), create no file anywhere (the working directory,
the inputs' folder, the output folders), and leave every input byte-identical (sha256).
A new flag adds its bad values here in the same commit.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_linear_model, calib_inputs, save
from segquant_onnx.examples import example_path
from segquant_onnx.cli import main


class Workspace:
    """Inputs under `in/`, the working directory `cwd/`, an existing output folder `out/`."""

    def __init__(self, root: Path):
        self.root = root
        self.inputs, self.cwd, self.out = root / "in", root / "cwd", root / "out"
        for d in (self.inputs, self.cwd, self.out):
            d.mkdir()
        self.model = save(build_linear_model(), self.inputs / "m.onnx")
        self.calib = self.npz("calib.npz", X=calib_inputs("matmul", 4))
        self.existing = self.out / "old.onnx"
        self.existing.write_bytes(b"an earlier result")
        self.hidden_modules: list[str] = []  # modules the case makes unimportable (an optional extra missing)

    def without(self, module: str) -> "Workspace":
        self.hidden_modules.append(module)
        return self

    def npz(self, name: str, **arrays) -> Path:
        np.savez(self.inputs / name, **arrays)
        return self.inputs / name

    def file(self, name: str, content: bytes = b"keep me") -> Path:
        (self.out / name).write_bytes(content)
        return self.out / name


def _qdq_model() -> onnx.ModelProto:
    nodes = [helper.make_node("QuantizeLinear", ["X", "s", "zp"], ["Xq"]),
             helper.make_node("DequantizeLinear", ["Xq", "s", "zp"], ["Xd"]),
             helper.make_node("MatMul", ["Xd", "W"], ["Y"])]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp"),
             numpy_helper.from_array(np.ones((16, 16), np.float32), "W")]
    return _model(nodes, inits)


def _no_linear_model() -> onnx.ModelProto:
    return _model([helper.make_node("Add", ["X", "b"], ["Y"], name="add")],
                  [numpy_helper.from_array(np.ones(16, np.float32), "b")])


def _model(nodes, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _gpu_provider_cannot_start(ws) -> bool:
    """Make the CUDA provider look listed but unable to start (what onnxruntime-gpu does on a machine
    without a GPU: the session falls back to the CPU), on any machine."""
    ws.fake_gpu_fallback = True
    return True


def _q(ws, *extra):
    return ["quantize", ws.model, "--calib", ws.calib, "-o", ws.out / "q.onnx", *extra]


def _bad_npz(ws, **arrays):
    return ["quantize", ws.model, "--calib", ws.npz("bad.npz", **arrays), "-o", ws.out / "q.onnx"]


def _nan(ws):
    x = calib_inputs("matmul", 4)
    x[1, 2, 3] = np.nan
    return _bad_npz(ws, X=x)


def _external_missing(ws):
    ext = save(build_linear_model(), ws.inputs / "ext.onnx", external=True)
    (ws.inputs / "ext.onnx.data").unlink()
    return ["quantize", ext, "--calib", ws.calib, "-o", ws.out / "q.onnx"]


def _not_onnx(ws):
    (ws.inputs / "bad.onnx").write_text("this is a text file, not a protobuf \xff")
    return ["quantize", ws.inputs / "bad.onnx", "--calib", ws.calib, "-o", ws.out / "q.onnx"]


def _saved(ws, model, name):
    return save(model, ws.inputs / name)


def _json_file(ws, name="plan.json"):
    return ws.file(name, b'{"old": true}')


def _quantized(ws):
    return _saved(ws, _qdq_model(), "q_in.onnx")


# (id, argv builder, strings the error line must contain)
CASES = [
    # quantize: the model
    ("quantize: missing model", lambda ws: ["quantize", ws.inputs / "nope.onnx", "--calib", ws.calib, "-o",
                                            ws.out / "q.onnx"], ["nope.onnx", "does not exist"]),
    ("quantize: not onnx", _not_onnx, ["bad.onnx", "not an ONNX model"]),
    ("quantize: missing external data", _external_missing, ["ext.onnx.data", "missing"]),
    ("quantize: already quantized", lambda ws: ["quantize", _quantized(ws), "--calib", ws.calib, "-o",
                                                ws.out / "q.onnx"], ["already quantized"]),
    ("quantize: nothing to quantize", lambda ws: ["quantize", _saved(ws, _no_linear_model(), "add.onnx"),
                                                  "--calib", ws.calib, "-o", ws.out / "q.onnx"],
     ["nothing to quantize", "--allow-unquantized"]),
    ("quantize: every site excluded", lambda ws: _q(ws, "--exclude", "."),
     ["nothing to quantize", "excluded"]),
    ("quantize: no model, no --example", lambda ws: ["quantize", "--calib", ws.calib, "-o", ws.out / "q.onnx"],
     ["MODEL"]),
    # quantize: calibration and eval data
    ("quantize: missing --calib", lambda ws: ["quantize", ws.model, "-o", ws.out / "q.onnx"], ["--calib"]),
    ("quantize: calib file missing", lambda ws: ["quantize", ws.model, "--calib", ws.inputs / "none.npz", "-o",
                                                 ws.out / "q.onnx"], ["none.npz"]),
    ("quantize: calib lacks an input", lambda ws: _bad_npz(ws, x_wrong=calib_inputs("matmul", 4)), ["'X'"]),
    ("quantize: calib dtype", lambda ws: _bad_npz(ws, X=calib_inputs("matmul", 4).astype(np.float64)),
     ["'X'", "float64"]),
    ("quantize: calib rank", lambda ws: _bad_npz(ws, X=calib_inputs("matmul", 4).reshape(4, -1)), ["'X'", "rank"]),
    ("quantize: calib NaN", _nan, ["'X'", "NaN"]),
    ("quantize: calib zero samples", lambda ws: _bad_npz(ws, X=calib_inputs("matmul", 4)[:0]), ["zero samples"]),
    ("quantize: eval lacks an input", lambda ws: _q(ws, "--eval", ws.npz("ev.npz", Z=calib_inputs("matmul", 2))),
     ["ev.npz", "'X'"]),
    ("quantize: --no-eval with --eval", lambda ws: _q(ws, "--no-eval", "--eval", ws.calib), ["--no-eval"]),
    # quantize: output paths
    ("quantize: missing -o", lambda ws: ["quantize", ws.model, "--calib", ws.calib], ["-o"]),
    ("quantize: -o is the model", lambda ws: ["quantize", ws.model, "--calib", ws.calib, "-o", ws.model],
     ["m.onnx", "input of this run"]),
    ("quantize: -o not .onnx", lambda ws: ["quantize", ws.model, "--calib", ws.calib, "-o", ws.out / "q.txt"],
     ["-o", ".onnx"]),
    ("quantize: -o exists", lambda ws: ["quantize", ws.model, "--calib", ws.calib, "-o", ws.existing],
     ["old.onnx", "--force"]),
    ("quantize: -o folder missing", lambda ws: ["quantize", ws.model, "--calib", ws.calib, "-o",
                                                ws.root / "nodir" / "q.onnx"], ["nodir", "does not exist"]),
    ("quantize: -o in /proc", lambda ws: ["quantize", ws.model, "--calib", ws.calib, "-o", "/proc/o.onnx"],
     ["/proc", "not writable"]),
    ("quantize: --report not .json", lambda ws: _q(ws, "--report", ws.out / "r.txt"), ["--report", ".json"]),
    ("quantize: --report exists", lambda ws: _q(ws, "--report", _json_file(ws, "r.json")), ["r.json", "--force"]),
    ("quantize: report .md exists", lambda ws: [*_q(ws, "--report", ws.out / "r.json"), "--per-layer"]
     if ws.file("r.md") else [], ["r.md", "--force"]),
    ("quantize: --plot not .png", lambda ws: _q(ws, "--plot", ws.out / "out.txt"), ["--plot", ".png"]),
    ("quantize: -o and --plot the same", lambda ws: ["quantize", ws.model, "--calib", ws.calib, "-o",
                                                     ws.out / "s.png", "--plot", ws.out / "s.png"], [".onnx"]),
    ("quantize: --report over the calib", lambda ws: _q(ws, "--report", ws.calib), ["--report", ".json"]),
    # quantize: flag values
    ("quantize: --outlier-flops 500", lambda ws: _q(ws, "--outlier-flops", "500"), ["--outlier-flops"]),
    ("quantize: --outlier-flops -5", lambda ws: _q(ws, "--outlier-flops", "-5"), ["--outlier-flops"]),
    ("quantize: --dualscale-min-gain -1", lambda ws: _q(ws, "--dualscale-min-gain", "-1"),
     ["--dualscale-min-gain"]),
    ("quantize: --target-sqnr -3", lambda ws: _q(ws, "--target-sqnr", "-3"), ["--target-sqnr"]),
    ("quantize: --target-sqnr nan", lambda ws: _q(ws, "--target-sqnr", "nan"), ["--target-sqnr"]),
    ("quantize: --percentile 10", lambda ws: _q(ws, "--calib-method", "percentile", "--percentile", "10"),
     ["--percentile"]),
    ("quantize: --exclude (", lambda ws: _q(ws, "--exclude", "("), ["--exclude"]),
    ("quantize: --batch-size 0", lambda ws: _q(ws, "--batch-size", "0"), ["--batch-size"]),
    ("quantize: --providers", lambda ws: _q(ws, "--providers", "NoSuchExecutionProvider"),
     ["NoSuchExecutionProvider"]),
    ("quantize: --outlier-min-gain -1", lambda ws: _q(ws, "--outlier-channels", "auto", "--outlier-min-gain", "-1"),
     ["--outlier-min-gain"]),
    ("quantize: --outlier-ratio 0.5", lambda ws: _q(ws, "--outlier-channels", "4", "--outlier-ratio", "0.5"),
     ["--outlier-ratio"]),
    ("quantize: --outlier-channels many", lambda ws: _q(ws, "--outlier-channels", "many"), ["--outlier-channels"]),
    ("quantize: --smoothquant 2", lambda ws: _q(ws, "--smoothquant", "2"), ["--smoothquant"]),
    ("quantize: --max-fallback 101", lambda ws: _q(ws, "--max-fallback", "101"), ["--max-fallback"]),
    ("quantize: --dualscale nope", lambda ws: _q(ws, "--dualscale", "nope"), ["--dualscale", "--help"]),
    ("quantize: --workers 0", lambda ws: _q(ws, "--workers", "0"), ["--workers", "at least 1"]),
    ("quantize: --workers -1", lambda ws: _q(ws, "--workers", "-1"), ["--workers", "at least 1"]),
    ("quantize: --workers x", lambda ws: _q(ws, "--workers", "x"), ["--workers", "not an integer"]),
    ("quantize: --ray-address without ray", lambda ws: _q(ws.without("ray"), "--ray-address", "local"),
     ["--ray-address", 'pip install "segquant-onnx[ray]"']),
    ("quantize: --ray-address ''", lambda ws: _q(ws, "--ray-address", " "), ["--ray-address", "empty"]),
    ("quantize: --providers CUDA that cannot start", lambda ws: _q(ws, "--providers", "CUDAExecutionProvider")
     if _gpu_provider_cannot_start(ws) else [], ["--providers CUDAExecutionProvider", "could not start"]),
    ("sensitivity: --workers 0", lambda ws: ["sensitivity", ws.model, "--calib", ws.calib, "--workers", "0"],
     ["--workers"]),
    ("quantize: --seg-patterns bogus", lambda ws: _q(ws, "--seg-patterns", "bogus"), ["--seg-patterns", "bogus"]),
    ("quantize: unknown flag", lambda ws: _q(ws, "--frobnicate"), ["--frobnicate"]),
    ("quantize: --precision fp4", lambda ws: _q(ws, "--precision", "fp4"), ["--precision", "--help"]),
    ("quantize: --preset slow", lambda ws: _q(ws, "--preset", "slow"), ["--preset", "--help"]),
    ("quantize: --high-precision fp64", lambda ws: _q(ws, "--high-precision", "fp64"), ["--high-precision"]),
    ("quantize: fp8 with entropy", lambda ws: _q(ws, "--precision", "fp8", "--calib-method", "entropy"),
     ["--calib-method entropy", "fp8"]),
    ("quantize: --block-size 100", lambda ws: _q(ws, "--precision", "w4a16", "--block-size", "100"),
     ["--block-size 100", "power of two"]),
    ("quantize: --block-size 8", lambda ws: _q(ws, "--precision", "w4a8", "--block-size", "8"), ["--block-size 8"]),
    ("quantize: --block-size 0", lambda ws: _q(ws, "--block-size", "0"), ["--block-size"]),
    ("quantize: --weight-rounding adaround", lambda ws: _q(ws, "--weight-rounding", "adaround"),
     ["--weight-rounding", "--help"]),
    ("quantize: --low-rank -4", lambda ws: _q(ws, "--low-rank", "-4"), ["--low-rank -4", "rank"]),
    ("quantize: --low-rank x", lambda ws: _q(ws, "--low-rank", "x"), ["--low-rank", "auto"]),
    ("quantize: w4a16 with attention", lambda ws: _q(ws, "--precision", "w4a16", "--quantize-attention"),
     ["--quantize-attention", "w4a16"]),
    # inspect
    ("inspect: no model", lambda ws: ["inspect"], ["MODEL"]),
    ("inspect: missing model", lambda ws: ["inspect", ws.inputs / "nope.onnx"], ["does not exist"]),
    ("inspect: --json is the model", lambda ws: ["inspect", ws.model, "--json", ws.model], ["--json", ".json"]),
    ("inspect: --json exists", lambda ws: ["inspect", ws.model, "--json", _json_file(ws)], ["plan.json", "--force"]),
    ("inspect: --json folder missing", lambda ws: ["inspect", ws.model, "--json", ws.root / "nodir" / "p.json"],
     ["nodir"]),
    # sensitivity
    ("sensitivity: no --calib", lambda ws: ["sensitivity", ws.model], ["--calib"]),
    ("sensitivity: --top 0", lambda ws: ["sensitivity", ws.model, "--calib", ws.calib, "--top", "0"], ["--top"]),
    ("sensitivity: --report exists", lambda ws: ["sensitivity", ws.model, "--calib", ws.calib, "--report",
                                                 _json_file(ws, "s.json")], ["s.json", "--force"]),
    ("sensitivity: --report not .json", lambda ws: ["sensitivity", ws.model, "--calib", ws.calib, "--report",
                                                    ws.out / "s.md"], ["--report", ".json"]),
    # compare
    ("compare: no --data", lambda ws: ["compare", ws.model, ws.model], ["--data"]),
    ("compare: missing quantized model", lambda ws: ["compare", ws.model, ws.inputs / "nope.onnx", "--data",
                                                     ws.calib], ["nope.onnx"]),
    ("compare: --json is the model", lambda ws: ["compare", ws.model, ws.model, "--data", ws.calib, "--json",
                                                 ws.model], ["--json", ".json"]),
    ("compare: --json exists", lambda ws: ["compare", ws.model, ws.model, "--data", ws.calib, "--json",
                                           _json_file(ws, "c.json")], ["c.json", "--force"]),
    ("compare: --batch-size 0", lambda ws: ["compare", ws.model, ws.model, "--data", ws.calib, "--batch-size", "0"],
     ["--batch-size"]),
    # check-trt
    ("check-trt: no model", lambda ws: ["check-trt"], ["MODEL"]),
    ("check-trt: missing model", lambda ws: ["check-trt", ws.inputs / "nope.onnx"], ["does not exist"]),
    ("check-trt: not onnx", lambda ws: ["check-trt", _not_onnx(ws)[1]], ["not an ONNX model"]),
    # build-trt
    ("build-trt: missing model", lambda ws: ["build-trt", ws.inputs / "nope.onnx"], ["does not exist"]),
    ("build-trt: bad --shapes", lambda ws: ["build-trt", ws.model, "--shapes", "X=1x8x16"], ["--shapes"]),
    ("build-trt: --runs 0", lambda ws: ["build-trt", ws.model, "--runs", "0"], ["--runs"]),
    # demo
    ("demo: -o is a file", lambda ws: ["demo", "-o", ws.existing], ["-o", "not a folder"]),
    ("demo: earlier run without --force", lambda ws: ["demo", "-o", ws.out] if ws.file("demo_grid.png") else [],
     ["demo_grid.png", "--force"]),
    ("demo: -o in /proc", lambda ws: ["demo", "-o", "/proc/segquant_demo"], ["/proc", "not writable"]),
    ("demo: --steps 0", lambda ws: ["demo", "-o", ws.out / "d", "--steps", "0"], ["--steps"]),
    ("demo: --classes 11", lambda ws: ["demo", "-o", ws.out / "d", "--classes", "11"], ["--classes"]),
    ("demo: --seeds -1", lambda ws: ["demo", "-o", ws.out / "d", "--seeds", "-1"], ["--seeds"]),
    ("demo: --precision w4a16", lambda ws: ["demo", "-o", ws.out / "d", "--precision", "w4a16"], ["--precision"]),
    # verbosity flags in either place do not change what a bad input gets
    ("quantize -v: -o exists", lambda ws: ["quantize", ws.model, "--calib", ws.calib, "-o", ws.existing, "-v", "-q"],
     ["old.onnx", "--force"]),
]

BUNDLED = [example_path(n) for n in ("demo_dit.onnx", "demo_dit_calib.npz", "demo_dit_eval.npz",
                                     "demo_dit_conds.npz")]


def _digest(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file()] + BUNDLED
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _entries(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def _fake_gpu_fallback(monkeypatch) -> None:
    import onnxruntime as ort

    real = ort.InferenceSession

    def cpu_only(model, opts=None, providers=None, provider_options=None):
        return real(model, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", cpu_only)


def test_the_table_is_large_and_covers_every_subcommand():
    commands = {case[0].split(":")[0].split()[0] for case in CASES}
    assert commands == {"quantize", "inspect", "sensitivity", "compare", "check-trt", "build-trt", "demo"}
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    _, build, needles = case
    ws = Workspace(tmp_path)
    argv = [str(a) for a in build(ws)]
    assert argv, "the case builder must return a command line"
    monkeypatch.chdir(ws.cwd)
    for module in ws.hidden_modules:
        monkeypatch.setitem(sys.modules, module, None)
    if getattr(ws, "fake_gpu_fallback", False):
        _fake_gpu_fallback(monkeypatch)
    before, listing = _digest(tmp_path), _entries(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    lines = err.strip("\n").splitlines()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("segquant-onnx: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert _entries(tmp_path) == listing  # no new file or folder anywhere, the working directory included
    assert _digest(tmp_path) == before  # every input (and every existing file) byte-identical
