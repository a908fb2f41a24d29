"""The command line, in-process: help, inspect, quantize + report, and one-line errors for bad input."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import onnx
import pytest

from conftest import calib_inputs, dir_listing
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
    assert set(data["output_error"]) == {"Y"} and data["output_error"]["Y"]["sqnr_db"] > 34.5  # measured 36.77
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


# -- bad input: more in test_bad_inputs.py (the permanent table) ----------------------------------
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
    """Where chmod cannot lock root out, the write probe itself is made to fail."""
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if str(dir) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", locked / "q.onnx", "-q")
    assert_one_line_error(code, err, str(locked), "not writable", "Permission denied")
    assert dir_listing(locked) == []


def test_verbosity_flags_work_before_and_after_the_subcommand(capsys, tmp_path, model, calib):
    code, _, err = run(capsys, "-q", "quantize", model, "--calib", calib, "-o", tmp_path / "a.onnx")
    assert code == 0 and "it/s" not in err
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "b.onnx", "-q", "-v")
    assert code == 0, err
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_allow_unquantized_writes_a_model_without_sites(capsys, tmp_path, model, calib):
    out = tmp_path / "q.onnx"
    code, _, err = run(capsys, "quantize", model, "--calib", calib, "-o", out, "-q", "--exclude", ".")
    assert code == 2 and "nothing to quantize" in err and not out.exists()
    code, stdout, err = run(capsys, "quantize", model, "--calib", calib, "-o", out, "-q", "--exclude", ".",
                            "--allow-unquantized")
    assert code == 0, err
    q = onnx.load(str(out))
    assert not [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert "quantized 0 linear sites (0.0% of linear FLOPs in INT8)" in stdout


def test_summary_says_where_the_report_went_and_files_get_the_usual_mode(capsys, tmp_path, model, calib):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code, stdout, err = run(capsys, "quantize", model, "--calib", calib, "-o", out, "-q", "--report", report)
    assert code == 0, err
    assert f"wrote {report} and {tmp_path / 'r.md'}" in stdout
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, report, tmp_path / "r.md"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_inspect_json_to_a_file_is_guarded_and_then_written(capsys, tmp_path, model):
    plan = tmp_path / "plan.json"
    code, stdout, _ = run(capsys, "inspect", model, "--json", plan)
    assert code == 0 and json.loads(plan.read_text())["sites"] and f"wrote {plan}" in stdout
    code, _, err = run(capsys, "inspect", model, "--json", plan)
    assert_one_line_error(code, err, "already exists")
    assert run(capsys, "inspect", model, "--json", plan, "--force")[0] == 0


def test_quantize_help_is_grouped_and_ends_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    headings = [line[:-1] for line in out.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert headings == ["options", "input and output", "preset", "precision", "calibration", "SegLinear", "DualScale",
                        "SmoothQuant", "outlier channels", "fallback and target", "evaluation and report", "runtime",
                        "examples"]
    assert out.count("segquant-onnx quantize model.onnx") == 5


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
                       "--exclude", ".", "-q", "--allow-unquantized")
    assert code == 0, err
    data = _strict_json(report.read_text())
    assert data["summary"]["sites_quantized"] == 0


def test_no_eval_writes_the_same_model_without_measuring(capsys, tmp_path, model, calib, monkeypatch):
    from segquant_onnx.analysis import layer_error

    code, out, _ = run(capsys, "quantize", model, "--calib", calib, "-o", tmp_path / "with.onnx", "-q")
    assert code == 0 and "SQNR" in out

    def no_measuring(*args, **kwargs):
        raise AssertionError("--no-eval must not open evaluation sessions")

    monkeypatch.setattr(layer_error, "compare_outputs", no_measuring)
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


@pytest.mark.parametrize("preset", ["fast", "balanced", "best"])
def test_presets_run_end_to_end_and_the_report_holds_their_settings(capsys, model, write_calib, tmp_path, preset):
    from segquant_onnx import QuantConfig

    report = tmp_path / "r.json"
    code, _, err = run(capsys, "quantize", model, "--calib", write_calib("matmul", n=8), "-o", tmp_path / "q.onnx",
                       "-q", "--preset", preset, "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["config"] == QuantConfig.preset(preset).as_dict()
    # fast: one calibration pass, nothing scored on held-back feeds; the others check DualScale there
    assert bool(r["heldback_trials"]) is (preset != "fast")
    assert (r["fallback"] is not None) is (preset == "best")
    if preset == "best":
        assert r["summary"]["int8_flop_fraction"] >= 0.95
