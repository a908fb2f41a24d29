"""The command line, in-process: help, inspect, quantize + report, and one-line errors for bad input."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_linear_model, calib_inputs, dir_listing, save
from segquant_onnx.cli import main


@pytest.fixture
def model(make_linear_model, tmp_path):
    (tmp_path / "in").mkdir()
    return make_linear_model("matmul", directory=tmp_path / "in")


@pytest.fixture
def calib(write_calib):
    return write_calib("matmul", n=4)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("segquant-onnx: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# -- help -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["inspect", "--help"]])
def test_help_exits_zero(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: segquant-onnx")
    if argv[0] == "quantize":
        assert "--calib" in out and "-o OUT" in out


def test_no_command_prints_help_and_fails(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "usage:" in out


# -- inspect ----------------------------------------------------------------------------------------
def test_inspect_prints_the_sites(capsys, model):
    code, out, err = run(capsys, "inspect", model)
    assert code == 0 and not err
    assert out.splitlines()[0] == "2 linear sites"
    table = out.split("\n\n")[0].splitlines()  # the sites table ends at the first blank line
    rows = [line.split() for line in table[3:]]
    assert [r[:3] for r in rows] == [["fc1", "MatMul", "16x32"], ["fc2", "MatMul", "32x16"]]
    assert [r[3] for r in rows] == ["50.0%", "50.0%"]


def test_inspect_json_to_stdout(capsys, model):
    code, out, _ = run(capsys, "inspect", model, "--json", "-", "--exclude", "fc2")
    plan = json.loads(out)
    assert code == 0
    assert [s["name"] for s in plan["sites"]] == ["fc1"]
    assert [(d["name"], d["reason"]) for d in plan["declined"]] == [("fc2", "excluded by --exclude 'fc2'")]


def test_inspect_explain_lists_declined_nodes(capsys, model):
    code, out, _ = run(capsys, "inspect", model, "--exclude", "fc1", "--explain")
    assert code == 0
    assert "1 linear sites" in out and "1 declined" in out
    assert any(line.split()[:2] == ["fc1", "MatMul"] and "excluded" in line for line in out.splitlines())


# -- quantize ---------------------------------------------------------------------------------------
def test_quantize_writes_the_model_and_a_report(capsys, model, calib, tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    code, stdout, err = run(capsys, "quantize", model, "--calib", calib, "-o", out, "--report", report, "-q",
                            "--dualscale", "off")
    assert code == 0, err
    assert "quantized 2 linear sites" in stdout and f"wrote {out}" in stdout
    data = json.loads(report.read_text())
    q = onnx.load(str(out))
    weight_dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert data["summary"]["sites_quantized"] == len(data["sites"]) == len(weight_dqs) == 2
    assert data["summary"]["sites_declined"] == 0
    assert data["output"] == str(out) and data["input"] == str(model)
    assert set(data["output_error"]) == {"Y"} and data["output_error"]["Y"]["sqnr_db"] > 20
    assert dir_listing(tmp_path) == ["calib.npz", "in", "in/matmul.onnx", "q.json", "q.md", "q.onnx"]


def test_quantize_refuses_an_existing_output_without_force(capsys, model, calib, tmp_path):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", out, "-q")
    assert_one_line_error(code, err, str(out), "--force")
    assert out.read_bytes() == b"keep me"
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", out, "-q", "--force")
    assert code == 0 and onnx.load(str(out)).graph.node


def test_extra_calibration_arrays_warn_but_succeed(capsys, caplog, model, write_npz, tmp_path):
    calib = write_npz("extra.npz", X=calib_inputs("matmul", 3), timestep=np.arange(3, dtype=np.int64))
    out = tmp_path / "q.onnx"
    with caplog.at_level(logging.WARNING, logger="segquant_onnx"):
        code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", out, "-q")
    assert code == 0, err
    assert out.is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("timestep" in w for w in warnings)


# -- bad input: exit 2, one line, no traceback, no output ------------------------------------------
def _qdq_model():
    nodes = [helper.make_node("QuantizeLinear", ["X", "s", "zp"], ["Xq"]),
             helper.make_node("DequantizeLinear", ["Xq", "s", "zp"], ["Xd"]),
             helper.make_node("MatMul", ["Xd", "W"], ["Y"])]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp"),
             numpy_helper.from_array(np.ones((16, 16), np.float32), "W")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _bad_case(case, tmp_path, model, calib):
    """argv (without -q) and the strings the error line must contain."""
    out = tmp_path / "out" / "q.onnx"
    x = calib_inputs("matmul", 4)
    npz = tmp_path / "bad.npz"
    if case == "missing model":
        missing = tmp_path / "nope.onnx"
        return ["quantize", missing, "--calib", calib, "-o", out], [str(missing), "does not exist"]
    if case == "not onnx":
        bad = tmp_path / "bad.onnx"
        bad.write_text("this is a text file, not a protobuf \xff")
        return ["quantize", bad, "--calib", calib, "-o", out], [str(bad), "not an ONNX model"]
    if case == "missing external data":
        ext = save(build_linear_model(), tmp_path / "ext.onnx", external=True)
        (tmp_path / "ext.onnx.data").unlink()
        return ["quantize", ext, "--calib", calib, "-o", out], ["ext.onnx.data", "missing"]
    if case == "calib missing input":
        np.savez(npz, x_wrong_name=x)
        return ["quantize", model, "--calib", npz, "-o", out], [str(npz), "'X'"]
    if case == "wrong dtype":
        np.savez(npz, X=x.astype(np.float64))
        return ["quantize", model, "--calib", npz, "-o", out], ["'X'", "float64", "float32"]
    if case == "wrong rank":
        np.savez(npz, X=x.reshape(4, -1))
        return ["quantize", model, "--calib", npz, "-o", out], ["'X'", "rank"]
    if case == "nan":
        x[1, 2, 3] = np.nan
        np.savez(npz, X=x)
        return ["quantize", model, "--calib", npz, "-o", out], ["'X'", "NaN"]
    if case == "zero samples":
        np.savez(npz, X=x[:0])
        return ["quantize", model, "--calib", npz, "-o", out], [str(npz), "zero samples"]
    if case == "output is input":
        return ["quantize", model, "--calib", calib, "-o", model], [str(model), "input model"]
    if case == "output dir missing":
        target = tmp_path / "no_such_dir" / "q.onnx"
        return ["quantize", model, "--calib", calib, "-o", target], [str(tmp_path / "no_such_dir"), "does not exist"]
    if case == "already quantized":
        q = tmp_path / "already.onnx"
        onnx.save_model(_qdq_model(), str(q))
        return ["quantize", q, "--calib", calib, "-o", out], [str(q), "already quantized", "QuantizeLinear"]
    if case == "missing --calib":
        return ["quantize", model, "-o", out], ["--calib"]
    raise ValueError(case)


BAD_CASES = ["missing model", "not onnx", "missing external data", "calib missing input", "wrong dtype",
             "wrong rank", "nan", "zero samples", "output is input", "output dir missing", "already quantized",
             "missing --calib"]


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "progress"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(request, capsys, tmp_path, model, calib, case, quiet):
    (tmp_path / "out").mkdir()
    argv, needles = _bad_case(case, tmp_path, model, calib)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, out, err = run(capsys, *argv, *(["-q"] if quiet else []))
    assert_one_line_error(code, err, *needles)
    assert dir_listing(tmp_path / "out") == []
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed (the input included)


def test_output_directory_not_writable(capsys, tmp_path, model, calib):
    if os.geteuid() == 0:
        pytest.skip("root can write into a 0o500 directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", locked / "q.onnx", "-q")
        assert_one_line_error(code, err, str(locked), "not writable")
        assert dir_listing(locked) == []
    finally:
        locked.chmod(0o700)


def test_output_directory_not_writable_is_reported_before_any_work(capsys, tmp_path, model, calib, monkeypatch):
    """Where chmod cannot lock root out, the check itself is exercised through os.access."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if (str(p) == str(locked) and mode == os.W_OK)
                        else real_access(p, mode))
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", locked / "q.onnx", "-q")
    assert_one_line_error(code, err, str(locked), "not writable")
    assert dir_listing(locked) == []


@pytest.mark.parametrize("argv, needle", [
    (["--calib-method", "percentile", "--percentile", "10"], "--percentile"),
    (["--exclude", "("], "--exclude"),
    (["--batch-size", "0"], "--batch-size"),
    (["--providers", "NoSuchExecutionProvider"], "NoSuchExecutionProvider"),
    (["--outlier-channels", "auto", "--outlier-min-gain", "-1"], "--outlier-min-gain"),
    (["--outlier-channels", "4", "--outlier-ratio", "0.5"], "--outlier-ratio"),
])
def test_bad_flags_are_one_line_errors(capsys, tmp_path, model, calib, argv, needle):
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "q.onnx", "-q", *argv)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "q.onnx").exists()


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_report_is_strict_json(capsys, model, calib, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "q.onnx", "--report", report, "-q")
    assert code == 0, err
    assert _strict_json(report.read_text())["summary"]["sites_quantized"] == 2


def test_report_stays_strict_json_when_the_output_is_exact(capsys, model, calib, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "q.onnx", "--report", report,
                       "--exclude", ".", "-q")
    assert code == 0, err
    data = _strict_json(report.read_text())
    assert data["summary"]["sites_quantized"] == 0


def test_no_eval_writes_the_same_model_without_measuring(capsys, tmp_path, model, calib, monkeypatch):
    from segquant_onnx import pipeline

    code, out, _ = run(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "with.onnx", "-q")
    assert code == 0 and "SQNR" in out

    def no_measuring(*args, **kwargs):
        raise AssertionError("--no-eval must not open evaluation sessions")

    monkeypatch.setattr(pipeline, "compare_outputs", no_measuring)
    code, out, _ = run(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "without.onnx", "-q",
                       "--no-eval", "--report", tmp_path / "r.json")
    assert code == 0 and "SQNR" not in out
    assert json.loads((tmp_path / "r.json").read_text())["output_error"] == {}
    assert (tmp_path / "with.onnx").read_bytes() == (tmp_path / "without.onnx").read_bytes()


@pytest.mark.parametrize("extra", [["--eval", "CALIB"], ["--per-layer"]])
def test_no_eval_contradicting_flags_are_one_line_errors(capsys, tmp_path, model, calib, extra):
    extra = [calib if a == "CALIB" else a for a in extra]
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "q.onnx", "-q", "--no-eval",
                       *extra)
    assert_one_line_error(code, err, "--no-eval")
    assert not (tmp_path / "q.onnx").exists()
