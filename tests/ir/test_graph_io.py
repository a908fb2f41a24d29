"""Graph IO: errors that name the file, lazy external data, atomic saves, the input never touched."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import build_linear_model, calib_inputs, dir_listing, linear_weights, run_model, save
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.config import QuantConfig
from segquant_onnx.errors import UserError
from segquant_onnx.ir.graph_io import load_model, save_model
from segquant_onnx.pipeline import quantize


def reference_output(kind: str = "matmul", hidden: int = 32) -> tuple[dict, np.ndarray]:
    feeds = {"X": calib_inputs(kind, 1, seed=7)}
    return feeds, run_model(build_linear_model(kind, hidden=hidden), feeds)[0]


# -- load errors -----------------------------------------------------------------------------------
def test_missing_file_is_named(tmp_path):
    path = tmp_path / "missing.onnx"
    with pytest.raises(UserError, match="does not exist") as exc:
        load_model(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("content", [b"definitely not a protobuf \xff\xff\xff", b"",
                                     build_linear_model().SerializeToString()[:300]])
def test_not_an_onnx_file_is_named(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is not an ONNX model") as exc:
        load_model(path)
    assert str(path) in str(exc.value)


def test_a_directory_is_not_a_model(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path)


def test_missing_external_data_file_is_named(tmp_path):
    path = save(build_linear_model(), tmp_path / "m.onnx", external=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(UserError, match="External data file") as exc:
        load_model(path)
    assert str(tmp_path / "m.onnx.data") in str(exc.value) and str(path) in str(exc.value)


# -- external data ---------------------------------------------------------------------------------
def test_external_data_loads_lazily_with_the_right_values(tmp_path):
    path = save(build_linear_model(), tmp_path / "m.onnx", external=True)
    loaded = load_model(path)
    assert loaded.uses_external_data
    assert loaded.size_bytes > path.stat().st_size  # the weights count, though they live in m.onnx.data
    consts = {n: t for n, t in loaded.graph.tensors().items() if isinstance(t, gs.Constant)}
    # nothing is read until asked
    assert all(isinstance(consts[n]._values, gs.ir.tensor.LazyValues) for n in ("W1", "W2", "b1"))
    for name, want in linear_weights("matmul").items():
        np.testing.assert_array_equal(consts[name].values, want)


def test_inline_model_is_not_external(tmp_path):
    path = save(build_linear_model(), tmp_path / "m.onnx")
    loaded = load_model(path)
    assert not loaded.uses_external_data and loaded.size_bytes == path.stat().st_size


def test_exported_external_graph_saves_to_another_directory_and_runs(tmp_path):
    (tmp_path / "in").mkdir()
    src = save(build_linear_model(), tmp_path / "in" / "m.onnx", external=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    loaded = load_model(src)
    out = save_model(gs.export_onnx(loaded.graph), out_dir / "copy.onnx", source_dir=str(src.parent))
    assert dir_listing(out_dir) == ["copy.onnx", "copy.onnx.data"]
    feeds, want = reference_output()
    np.testing.assert_array_equal(run_model(out, feeds)[0], want)
    # the saved model points at its own data file, not at the input's
    model = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"copy.onnx.data"}


def test_weights_read_after_load_export_inline(tmp_path):
    (tmp_path / "in").mkdir()
    src = save(build_linear_model(), tmp_path / "in" / "m.onnx", external=True)
    loaded = load_model(src)
    loaded.graph.tensors()["W1"].values
    out = save_model(gs.export_onnx(loaded.graph), tmp_path / "copy.onnx", source_dir=str(src.parent))
    feeds, want = reference_output()
    np.testing.assert_array_equal(run_model(out, feeds)[0], want)


def test_weights_read_after_canonicalize_export_inline(tmp_path):
    (tmp_path / "in").mkdir()
    src = save(build_linear_model(), tmp_path / "in" / "m.onnx", external=True)
    graph = canonicalize(load_model(src).graph)
    graph.tensors()["W1"].values
    model = gs.export_onnx(graph)
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    assert not (w1.data_location == onnx.TensorProto.EXTERNAL and not w1.external_data)
    out = save_model(model, tmp_path / "copy.onnx", source_dir=str(src.parent))
    feeds, want = reference_output()
    np.testing.assert_array_equal(run_model(out, feeds)[0], want)


# -- save ------------------------------------------------------------------------------------------
def test_save_inline_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = save_model(build_linear_model(), tmp_path / "m.onnx", source_dir=None)
    assert dir_listing(tmp_path) == ["m.onnx"]
    feeds, want = reference_output()
    np.testing.assert_array_equal(run_model(out, feeds)[0], want)


def test_save_external_on_request(tmp_path):
    out = save_model(build_linear_model(), tmp_path / "m.onnx", source_dir=None, external=True)
    assert dir_listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    feeds, want = reference_output()
    np.testing.assert_array_equal(run_model(out, feeds)[0], want)


@pytest.mark.parametrize("external", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, external):
    (tmp_path / "keep.txt").write_text("already here")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(build_linear_model(), tmp_path / "m.onnx", source_dir=None, external=external)
    assert dir_listing(tmp_path) == ["keep.txt"]


def test_failed_save_keeps_the_previous_output(tmp_path, monkeypatch):
    old = save_model(build_linear_model(seed=1), tmp_path / "m.onnx", source_dir=None)
    before = old.read_bytes()
    monkeypatch.setattr(onnx, "save_model", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_model(build_linear_model(seed=2), old, source_dir=None)
    assert old.read_bytes() == before and dir_listing(tmp_path) == ["m.onnx"]


def test_save_external_with_only_small_tensors(tmp_path):
    small = build_linear_model(hidden=4)  # largest tensor: 16 x 4 fp32 = 256 bytes
    out = save_model(small, tmp_path / "m.onnx", source_dir=None, external=True)
    feeds, want = reference_output(hidden=4)
    np.testing.assert_array_equal(run_model(out, feeds)[0], want)


def test_save_external_when_the_cwd_holds_a_file_named_like_the_data_file(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx.data").write_bytes(b"unrelated")
    save_model(build_linear_model(), tmp_path / "out" / "m.onnx", source_dir=None, external=True)
    assert dir_listing(tmp_path / "out") == ["m.onnx", "m.onnx.data"]


# -- the input is never modified ------------------------------------------------------------------
def _fingerprint(path):
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns


def test_quantize_leaves_the_input_untouched_and_no_temp_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    src = save(build_linear_model(), tmp_path / "in" / "m.onnx")
    calib = tmp_path / "in" / "calib.npz"
    np.savez(calib, X=calib_inputs())
    old = os.stat(src).st_mtime_ns - 10**9
    os.utime(src, ns=(old, old))  # an mtime in the past: any write would move it
    before = {p: _fingerprint(p) for p in (src, calib)}

    quantize(src, calib, QuantConfig(), output=tmp_path / "out" / "q.onnx", progress=False)
    assert {p: _fingerprint(p) for p in before} == before
    assert dir_listing(tmp_path / "in") == ["calib.npz", "m.onnx"]
    assert dir_listing(tmp_path / "out") == ["q.onnx"]


def test_quantize_an_external_data_model(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)  # neither the input's nor the output's directory
    src = save(build_linear_model(hidden=128), tmp_path / "in" / "m.onnx", external=True)
    data = tmp_path / "in" / "m.onnx.data"
    calib = tmp_path / "calib.npz"
    np.savez(calib, X=calib_inputs())
    before = {p: _fingerprint(p) for p in (src, data)}
    try:
        result = quantize(src, calib, QuantConfig(), output=tmp_path / "out" / "q.onnx", progress=False)
    finally:
        assert {p: _fingerprint(p) for p in before} == before  # untouched even when quantize fails
    assert dir_listing(tmp_path / "out") == ["q.onnx", "q.onnx.data"]
    feeds, want = reference_output(hidden=128)
    got = run_model(tmp_path / "out" / "q.onnx", feeds)[0]
    assert result.report["summary"]["sites_quantized"] == 2
    assert np.sum((got - want) ** 2) < 1e-2 * np.sum(want**2)  # > 20 dB: quantized, not broken
