"""NVIDIA's ONNX parser (TensorRT-RTX, CPU-only) accepts good Q/DQ graphs and rejects bad ones.

Graphs are built with onnx.helper and written to tmp_path. Tests that need TensorRT-RTX skip when
``tensorrt_rtx_bindings`` is not installed.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import onnx
import pytest

from trt_graphs import make_qdq_matmul

from segquant_onnx.tensorrt import build as tensorrt_build
from segquant_onnx.tensorrt.build import BuildResult, build_engine, tensorrt_rtx_available


@pytest.fixture
def trt():
    return pytest.importorskip("tensorrt_rtx_bindings")


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def assert_built(result: BuildResult) -> None:
    assert result.parsed, result.errors
    assert result.built, result.errors
    assert result.errors == ()
    assert result.engine_bytes > 0
    assert result.num_layers > 0


# --- no TensorRT needed ---------------------------------------------------------------------


def test_import_safe_without_tensorrt_rtx(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)  # makes the import fail
    monkeypatch.delitem(sys.modules, "segquant_onnx.tensorrt.build", raising=False)
    module = importlib.import_module("segquant_onnx.tensorrt.build")
    assert module.tensorrt_rtx_available() is False
    with pytest.raises(ImportError, match="tensorrt-rtx"):
        module.build_engine("unused.onnx")


def test_build_result_is_frozen():
    result = BuildResult(parsed=True, built=False, errors=("x",), engine_bytes=0, num_layers=1)
    with pytest.raises(Exception):
        result.built = True  # type: ignore[misc]


# --- TensorRT-RTX ---------------------------------------------------------------------------


def test_available(trt):
    assert tensorrt_rtx_available() is True


def test_good_int8_graph_parses_and_builds(trt, tmp_path):
    result = build_engine(save(make_qdq_matmul(), tmp_path / "good.onnx"))
    assert_built(result)


def test_accepts_pathlib_path(trt, tmp_path):
    path = tmp_path / "good.onnx"
    save(make_qdq_matmul(), path)
    assert_built(build_engine(path))


def test_external_data_next_to_model(trt, tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = model_dir / "ext.onnx"
    onnx.save(
        make_qdq_matmul(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert (model_dir / "ext.onnx.data").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert_built(build_engine(path))


def test_int32_bias_dequantize_is_rejected(trt, tmp_path):
    result = build_engine(save(make_qdq_matmul(int32_bias=True), tmp_path / "bias.onnx"))
    assert result.parsed is False
    assert result.built is False
    assert result.engine_bytes == 0
    assert result.errors
    text = "\n".join(result.errors)
    assert "dq_bias" in text
    assert "int32" in text.lower()


@pytest.mark.parametrize(
    "kwargs, node",
    [
        ({"x_scale": 0.0}, "q_x"),
        ({"x_scale": -0.05}, "q_x"),
        ({"w_scale": np.r_[np.full(5, 0.01), 0.0, np.full(26, 0.01)]}, "dq_w"),
        ({"w_scale": np.r_[np.full(5, 0.01), -0.01, np.full(26, 0.01)]}, "dq_w"),
    ],
    ids=["act-zero", "act-negative", "weight-channel-zero", "weight-channel-negative"],
)
def test_non_positive_scale_is_rejected(trt, tmp_path, kwargs, node):
    result = build_engine(save(make_qdq_matmul(**kwargs), tmp_path / "scale.onnx"))
    assert result.parsed is False
    assert result.built is False
    assert result.errors
    text = "\n".join(result.errors)
    assert "Scale coefficients must all be positive" in text
    assert node in text


def test_fp32_unquantized_ops_build(trt, tmp_path):
    assert_built(build_engine(save(make_qdq_matmul(float_tail=True), tmp_path / "fp32.onnx")))


def test_fp16_unquantized_ops_build(trt, tmp_path):
    assert_built(build_engine(save(make_qdq_matmul(float_tail=True, fp16=True), tmp_path / "fp16.onnx")))


def test_dynamic_batch_needs_a_shape(trt, tmp_path):
    path = save(make_qdq_matmul(batch="N"), tmp_path / "dyn.onnx")
    with pytest.raises(ValueError, match="'X'"):
        build_engine(path)


def test_dynamic_batch_builds_with_profile(trt, tmp_path):
    path = save(make_qdq_matmul(batch="N"), tmp_path / "dyn.onnx")
    assert_built(build_engine(path, shapes={"X": (2, 16, 64)}))


@pytest.mark.parametrize(
    "shapes, match",
    [
        ({"X": (2, 16)}, "rank"),
        ({"X": (2, 16, 65)}, "static dims"),
        ({"X": (0, 16, 64)}, "non-positive"),
        ({"X": (2, 16, 64), "Z": (1,)}, "unknown"),
    ],
    ids=["rank", "static-dim", "zero", "unknown-name"],
)
def test_bad_shapes_raise_value_error(trt, tmp_path, shapes, match):
    path = save(make_qdq_matmul(batch="N"), tmp_path / "dyn.onnx")
    with pytest.raises(ValueError, match=match):
        build_engine(path, shapes=shapes)


def test_static_graph_accepts_matching_shapes(trt, tmp_path):
    path = save(make_qdq_matmul(), tmp_path / "good.onnx")
    assert_built(build_engine(path, shapes={"X": (1, 16, 64)}))


def test_missing_file_raises(trt, tmp_path):
    with pytest.raises(FileNotFoundError):
        build_engine(tmp_path / "missing.onnx")


def test_parse_errors_are_logged_not_printed(trt, tmp_path, caplog, capfd):
    caplog.set_level("ERROR", logger=tensorrt_build.__name__)
    result = build_engine(save(make_qdq_matmul(x_scale=-1.0), tmp_path / "neg.onnx"))
    assert not result.parsed
    assert any("Scale coefficients must all be positive" in r.getMessage() for r in caplog.records)
    captured = capfd.readouterr()
    assert "Scale coefficients" not in captured.out + captured.err
