"""Shared fixtures: tiny fp32 ONNX graphs built with onnx.helper + numpy, calibration writers, the tiny
diffusers exports and the demo run (once per session); the CI settings (hypothesis profile, skip policy).

Every file is written under pytest's `tmp_path`. Models are deterministic (fixed seeds), so the
quantized output of a test is reproducible.

Variants of the linear model (all `... -> gelu-ish (h * Sigmoid(1.702 h)) -> ...`):
- "matmul": X[1,8,16] -> MatMul(W1[16,32]) -> Add(b1) -> gelu -> MatMul(W2[32,16]) -> Y[1,8,16]
- "gemm":   X[8,16]   -> Gemm(X, W1[32,16], b1, transB=1) -> gelu -> Gemm(W2[32,16], b2, transB=0) -> Y[8,16]
- "conv":   X[1,3,8,8] -> Conv(W1[8,3,3,3], b1, pads=1) -> gelu -> Conv(W2[4,8,1,1], b2) -> Y[1,4,8,8]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase
from onnx import TensorProto, helper, numpy_helper

# .ci/run sets SEGQUANT_CI=1: hypothesis then draws the same examples on every run (derandomize, no example
# database) and a skip outside ALLOWED_SKIPS fails the run. Locally, hypothesis draws new examples and keeps
# the failing ones in a database outside the checkout, which replays them first on the next run.
CI = os.environ.get("SEGQUANT_CI") == "1"
_HYPOTHESIS_DB = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segquant-onnx" / "hypothesis"
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("dev", database=DirectoryBasedExampleDatabase(str(_HYPOTHESIS_DB)), deadline=None,
                          print_blob=True)
settings.load_profile("ci" if CI else "dev")
_HYPOTHESIS_HOME: str | None = None

# Skips CI accepts: they depend on the machine, not on the checkout. Any other skip means a test CI is set up
# to run did not run (a missing dependency of the `test` extra, a fixture that gave up): it fails under CI.
ALLOWED_SKIPS = (
    "needs the tensorrt package and a GPU",  # tests/cli/test_cli_trt.py: GPU only
    "TensorRT and a GPU are present",  # tests/cli/test_cli_trt.py: the no-GPU message, on a GPU machine
    "golden hashes were recorded on another machine",  # tests/test_golden_outputs.py: fingerprint differs
    "root can write into a 0o500 directory",  # tests/cli/test_cli.py: the permission test, run as root
)


def _fail_unexpected_skip(report) -> None:
    if not (CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(allowed in reason for allowed in ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = (f"{report.nodeid} was skipped under CI, where every test must run: {reason}\n"
                           "(the skips CI accepts are tests/conftest.py ALLOWED_SKIPS)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level skip (importorskip at import) skips the whole file while collecting
    _fail_unexpected_skip(outcome.get_result())


def pytest_configure(config):
    global _HYPOTHESIS_HOME
    from hypothesis.configuration import set_hypothesis_home_dir

    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="segquant-hypothesis-")
    set_hypothesis_home_dir(_HYPOTHESIS_HOME)


def pytest_unconfigure(config):
    if _HYPOTHESIS_HOME:
        shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)

GELU_ALPHA = 1.702

# input shape and the output-channel axis of each site's weight, per variant
INPUT_SHAPES = {"matmul": [1, 8, 16], "gemm": [8, 16], "conv": [1, 3, 8, 8]}
OUTPUT_SHAPES = {"matmul": [1, 8, 16], "gemm": [8, 16], "conv": [1, 4, 8, 8]}
WEIGHT_AXES = {"matmul": {"fc1": 1, "fc2": 1}, "gemm": {"fc1": 0, "fc2": 1}, "conv": {"fc1": 0, "fc2": 0}}


def _gelu_nodes(x: str, out: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Mul", [x, "gelu_alpha"], [f"{x}_scaled"], name="gelu_scale"),
        helper.make_node("Sigmoid", [f"{x}_scaled"], [f"{x}_sig"], name="gelu_sigmoid"),
        helper.make_node("Mul", [x, f"{x}_sig"], [out], name="gelu_mul"),
    ]


def linear_weights(kind: str, seed: int = 0, hidden: int = 32) -> dict[str, np.ndarray]:
    """The float weights of a variant (the same arrays `build_linear_model` stores)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    if kind == "matmul":
        return {"W1": f(16, hidden) * 0.3, "b1": f(hidden) * 0.1, "W2": f(hidden, 16) * 0.2}
    if kind == "gemm":
        return {"W1": f(hidden, 16) * 0.3, "b1": f(hidden) * 0.1, "W2": f(hidden, 16) * 0.2, "b2": f(16) * 0.1}
    if kind == "conv":
        return {"W1": f(8, 3, 3, 3) * 0.3, "b1": f(8) * 0.1, "W2": f(4, 8, 1, 1) * 0.3, "b2": f(4) * 0.1}
    raise ValueError(kind)


def build_linear_model(kind: str = "matmul", opset: int = 17, seed: int = 0, hidden: int = 32) -> onnx.ModelProto:
    """An fp32 two-layer model of the given variant (see the module docstring)."""
    w = linear_weights(kind, seed, hidden)
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array(GELU_ALPHA, np.float32), "gelu_alpha"))
    if kind == "matmul":
        nodes = [
            helper.make_node("MatMul", ["X", "W1"], ["h0"], name="fc1"),
            helper.make_node("Add", ["h0", "b1"], ["h"], name="bias1"),
            *_gelu_nodes("h", "g"),
            helper.make_node("MatMul", ["g", "W2"], ["Y"], name="fc2"),
        ]
    elif kind == "gemm":
        nodes = [
            helper.make_node("Gemm", ["X", "W1", "b1"], ["h"], name="fc1", transB=1),
            *_gelu_nodes("h", "g"),
            helper.make_node("Gemm", ["g", "W2", "b2"], ["Y"], name="fc2", transB=0),
        ]
    elif kind == "conv":
        nodes = [
            helper.make_node("Conv", ["X", "W1", "b1"], ["h"], name="fc1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
            *_gelu_nodes("h", "g"),
            helper.make_node("Conv", ["g", "W2", "b2"], ["Y"], name="fc2", kernel_shape=[1, 1]),
        ]
    else:
        raise ValueError(kind)
    graph = helper.make_graph(
        nodes, f"{kind}_model",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, INPUT_SHAPES[kind])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, OUTPUT_SHAPES[kind])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def calib_inputs(kind: str = "matmul", n: int = 6, seed: int = 1) -> np.ndarray:
    """n samples of X on axis 0 in the batched layout (rank of the model input, batch on axis 0)."""
    shape = INPUT_SHAPES[kind]
    rng = np.random.default_rng(seed)
    return rng.standard_normal([n * shape[0]] + shape[1:]).astype(np.float32)


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.fixture
def make_linear_model(tmp_path):
    """Factory: make_linear_model(kind="matmul", name=None, opset=17, external=False) -> Path."""

    def _make(kind: str = "matmul", name: str | None = None, opset: int = 17, external: bool = False,
              hidden: int = 32, directory: Path | None = None) -> Path:
        d = directory or tmp_path
        d.mkdir(parents=True, exist_ok=True)
        return save(build_linear_model(kind, opset, hidden=hidden), d / (name or f"{kind}.onnx"), external)

    return _make


@pytest.fixture
def write_npz(tmp_path):
    """Factory: write_npz(name, **arrays) -> Path of `tmp_path/name` holding the arrays."""

    def _write(name: str = "calib.npz", **arrays) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
        return path

    return _write


@pytest.fixture
def write_calib(write_npz):
    """Factory: write_calib(kind="matmul", n=6, name="calib.npz") -> Path with valid data for that variant."""

    def _write(kind: str = "matmul", n: int = 6, name: str = "calib.npz", seed: int = 1) -> Path:
        return write_npz(name, X=calib_inputs(kind, n, seed))

    return _write


def fvi(name, shape):
    """A float tensor's value info."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def make_model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    """An opset-17 model from nodes, value infos and a dict of initializer arrays (checked)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run_model(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def dir_listing(path: Path) -> list[str]:
    """Every entry under `path` (hidden ones included), relative, sorted."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def export_script(dynamo: bool = False):
    """scripts/export_example.py as a module (tiny diffusers exports), skipping the test when torch,
    diffusers or (for the dynamo exporter) onnxscript is missing."""
    import importlib.util

    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    if dynamo:
        pytest.importorskip("onnxscript")
    spec = importlib.util.spec_from_file_location("export_example", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "export_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """tiny_export(kind, dynamo) -> (model path, export script module): each tiny diffusers transformer
    (kind "sd3", "flux" or "pixart"; TorchScript or dynamo exporter) exported once per session. The file is
    shared: write calibration data and outputs into a folder of your own, and never modify it."""
    cache: dict[tuple[str, bool], tuple[Path, object]] = {}

    def _get(kind: str, dynamo: bool) -> tuple[Path, object]:
        if (kind, dynamo) not in cache:
            script = export_script(dynamo)
            out = tmp_path_factory.mktemp(f"{kind}_{'dynamo' if dynamo else 'torchscript'}") / f"{kind}.onnx"
            script.EXPORTERS[kind](out, dynamo=dynamo)
            cache[kind, dynamo] = (out, script)
        return cache[kind, dynamo]

    return _get


@pytest.fixture(scope="session")
def demo_metrics(tmp_path_factory) -> dict:
    """`segquant-onnx demo` with the README's settings (20 Euler steps, seeds 0 1 2, all classes), run once
    per session: the metrics it returns."""
    pytest.importorskip("PIL")
    from segquant_onnx.diffusion.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("demo") / "out", steps=20, seeds=(0, 1, 2), classes=None,
                    progress=False)


def attention_model() -> onnx.ModelProto:
    """X -> q, k, v projections; softmax(q @ k^T) @ v -> o projection. Two activation x activation MatMuls."""
    nodes = [helper.make_node("MatMul", ["X", f"W{p}"], [p], name=f"to_{p}") for p in "qkv"]
    nodes += [
        helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kT"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["attn"], name="pv"),
        helper.make_node("MatMul", ["attn", "Wo"], ["Y"], name="to_out"),
    ]
    inits = [numpy_helper.from_array((np.random.default_rng(i).standard_normal((16, 16)) * 0.2).astype(np.float32), f"W{p}")
             for i, p in enumerate("qkvo")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
