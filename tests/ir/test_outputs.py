"""The output-path policy (segquant_onnx.ir.outputs): one guard for every path the tool writes."""

from __future__ import annotations

import os

import pytest

from conftest import dir_listing
from segquant_onnx.errors import UserError
from segquant_onnx.ir.outputs import Output, check_outputs, model_output, report_output, write_atomic


def test_the_input_spelled_differently_or_hard_linked_is_refused(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="is an input of this run"):
        check_outputs([model_output("./sub/../m.onnx")], [model], force=True)
    os.link(model, tmp_path / "link.onnx")
    with pytest.raises(UserError, match="input of this run"):
        check_outputs([model_output(tmp_path / "link.onnx")], [model], force=True)


def test_a_companion_file_counts(tmp_path):
    data = tmp_path / "q.onnx.data"  # an input model's external data, named like our output's
    data.write_bytes(b"weights")
    with pytest.raises(UserError, match="would write .*q.onnx.data"):
        check_outputs([model_output(tmp_path / "q.onnx")], [data], force=True)
    with pytest.raises(UserError, match="r.md.*written by --report"):
        check_outputs([report_output(tmp_path / "r.json"), Output("--notes", tmp_path / "r.md", ".md")], [], False)


def test_outputs_inside_an_input_folder_are_refused(tmp_path):
    (tmp_path / "calib").mkdir()
    with pytest.raises(UserError, match="input of this run"):
        check_outputs([model_output(tmp_path / "calib" / "q.onnx")], [tmp_path / "calib"], force=False)


def test_existing_files_need_force(tmp_path):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old")
    with pytest.raises(UserError, match="already exists.*--force") as exc:
        check_outputs([model_output(out)], [], force=False)
    assert str(out) in str(exc.value)
    check_outputs([model_output(out)], [], force=True)  # no error
    assert out.read_bytes() == b"old"


def test_a_folder_output_is_checked_file_by_file(tmp_path):
    folder = tmp_path / "demo"
    check_outputs([Output("-o", folder / "new" / "deeper", "", (folder / "new" / "deeper" / "a.png",))], [], False)
    assert not folder.exists()  # checking creates nothing
    folder.mkdir()
    (folder / "a.png").write_bytes(b"png")
    with pytest.raises(UserError, match="a.png already exists"):
        check_outputs([Output("-o", folder, "", (folder / "a.png",))], [], False)


def test_write_atomic_leaves_nothing_behind_on_failure_and_uses_the_umask(tmp_path):
    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "r.json", fail)
    assert dir_listing(tmp_path) == []
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "r.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert dir_listing(tmp_path) == ["r.json"]
