"""check-trt, build-trt and compare on the command line (in-process): exit codes, output, one-line errors."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import onnx
import pytest

from segquant_onnx.examples import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL, example_path
from segquant_onnx.cli import main
from segquant_onnx.analysis.compare import TensorError
from segquant_onnx.config import QuantConfig
from segquant_onnx.tensorrt.build import tensorrt_rtx_available
from segquant_onnx.tensorrt.gpu import full_tensorrt
from segquant_onnx.tensorrt.check import RULES
import references
from trt_graphs import make_qdq_matmul
from trt_graphs import v_int32_bias

needs_rtx = pytest.mark.skipif(not tensorrt_rtx_available(), reason="tensorrt_rtx_bindings not installed")
FP, EVAL = example_path(EXAMPLE_MODEL), example_path(EXAMPLE_EVAL)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The bundled example quantized with the default config, and its report."""
    from segquant_onnx.pipeline import quantize

    out = tmp_path_factory.mktemp("q") / "example_int8.onnx"
    result = quantize(FP, example_path(EXAMPLE_CALIB), output=out, eval_data=EVAL, progress=False)
    return out, result.report


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    lines = err.strip("\n").splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("segquant-onnx: error: ") and "Traceback" not in err
    assert all(n in lines[0] for n in needles), lines[0]


def save(model, path):
    onnx.save(model, str(path))
    return path


# -- check-trt ---------------------------------------------------------------------------------------
def test_check_trt_passes_our_output(capsys, quantized):
    code, out, _ = run(capsys, "check-trt", quantized[0])
    assert code == 0
    assert "no violations" in out and "Q/DQ nodes checked" in out


def test_check_trt_lists_violations_and_exits_1(capsys, tmp_path):
    code, out, _ = run(capsys, "check-trt", save(v_int32_bias(), tmp_path / "bias.onnx"))
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[0].startswith("int32-dequantize  b_dq: ")
    assert lines[-1].startswith("1 violation(s)")


def test_check_trt_rules_lists_every_rule_with_its_source(capsys):
    code, out, _ = run(capsys, "check-trt", "--rules")
    assert code == 0
    assert all(f"{rule}: " in out for rule in RULES) and out.count("source: ") == len(RULES)


@pytest.mark.parametrize("argv, needle", [
    (["check-trt"], "needs MODEL"),
    (["check-trt", "missing.onnx"], "missing.onnx"),
    (["check-trt", "{junk}"], "is not an ONNX model"),
])
def test_check_trt_bad_input(capsys, tmp_path, argv, needle):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    code, _, err = run(capsys, *[a.replace("{junk}", str(junk)) for a in argv])
    assert_one_line_error(code, err, needle)


# -- build-trt ---------------------------------------------------------------------------------------
@needs_rtx
def test_build_trt_builds_our_output(capsys, quantized):
    code, out, _ = run(capsys, "build-trt", quantized[0])
    assert code == 0
    assert "parsed: yes" in out and "built: yes" in out


@needs_rtx
def test_build_trt_reports_parser_errors_with_the_node(capsys, tmp_path):
    code, out, _ = run(capsys, "build-trt", save(v_int32_bias(), tmp_path / "bias.onnx"))
    assert code == 1
    assert "parsed: no" in out and "name: b_dq" in out


@needs_rtx
@pytest.mark.parametrize("how", ["shapes", "calib"])
def test_build_trt_dynamic_batch_gets_a_profile(capsys, tmp_path, how):
    model = save(make_qdq_matmul(batch="N"), tmp_path / "dyn.onnx")
    np.savez(tmp_path / "calib.npz", X=np.zeros((3, 16, 64), np.float32))
    extra = ["--shapes", "X:2x16x64"] if how == "shapes" else ["--calib", tmp_path / "calib.npz", "--batch-size", 3]
    code, out, _ = run(capsys, "build-trt", model, *extra)
    assert code == 0 and "built: yes" in out


@needs_rtx
def test_build_trt_dynamic_batch_without_shapes_sets_it_to_1_with_a_warning(capsys, caplog, tmp_path):
    """As trtexec does: every dynamic dimension 1, said in one warning that names the input and dim."""
    caplog.set_level(logging.WARNING, logger="segquant_onnx")
    code, out, _ = run(capsys, "build-trt", save(make_qdq_matmul(batch="N"), tmp_path / "dyn.onnx"))
    assert code == 0 and "built: yes" in out
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "X (N, 16, 64) -> 1x16x64" in warnings[0], warnings


@needs_rtx
def test_build_trt_takes_the_shapes_quantize_recorded(capsys, caplog, tmp_path):
    """quantize records the first calibration feed's shapes in the model; build-trt's profile uses them."""
    from conftest import build_linear_model, calib_inputs
    from segquant_onnx.ir.finalize import CALIBRATION_SHAPES_KEY
    from segquant_onnx.pipeline import quantize

    model = build_linear_model("matmul")
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    np.savez(tmp_path / "calib.npz", X=calib_inputs("matmul", n=6))
    out = tmp_path / "q.onnx"
    quantize(model, tmp_path / "calib.npz", QuantConfig(calibration={"batch_size": 2}), output=out, progress=False,
             evaluate=False)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props[CALIBRATION_SHAPES_KEY] == "X:2x8x16"
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="segquant_onnx")
    code, text, _ = run(capsys, "build-trt", out)
    assert code == 0 and "built: yes" in text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no fallback to 1


@pytest.mark.parametrize("shapes", ["X", "X:2xfoo", ":2x16"])
def test_build_trt_bad_shapes(capsys, tmp_path, shapes):
    code, _, err = run(capsys, "build-trt", save(make_qdq_matmul(), tmp_path / "m.onnx"), "--shapes", shapes)
    assert_one_line_error(code, err, "--shapes")


def test_build_trt_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "build-trt", tmp_path / "nope.onnx")
    assert_one_line_error(code, err, "nope.onnx")


@pytest.mark.skipif(full_tensorrt() is not None, reason="TensorRT and a GPU are present")
def test_build_trt_benchmark_needs_a_gpu(capsys, quantized):
    code, _, err = run(capsys, "build-trt", quantized[0], "--benchmark", "--baseline", FP)
    assert_one_line_error(code, err, "--benchmark", "GPU")


@pytest.mark.skipif(full_tensorrt() is None, reason="needs the tensorrt package and a GPU")
def test_build_trt_benchmark_with_tensorrt_on_a_gpu(capsys, quantized):
    code, out, _ = run(capsys, "build-trt", quantized[0], "--benchmark", "--baseline", FP, "--calib", EVAL,
                       "--runs", 5)
    assert code == 0 and "speed-up" in out


# -- compare -----------------------------------------------------------------------------------------
def test_compare_matches_the_quantize_report(capsys, quantized, tmp_path):
    path, report = quantized
    code, out, _ = run(capsys, "compare", FP, path, "--data", EVAL, "--per-layer", "--json", tmp_path / "c.json", "-q")
    assert code == 0
    result = json.loads((tmp_path / "c.json").read_text())
    got, want = result["outputs"]["out"], report["output_error"]["out"]
    assert got["sqnr_db"] == pytest.approx(want["sqnr_db"], abs=0.01)
    assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-5)
    assert 0 < got["max_abs_error"] < 1 and got["psnr_db"] > got["sqnr_db"]
    assert len(result["layers"]) > 10 and "per linear layer" in out
    assert f"{got['sqnr_db']:.2f}" in out
    # both of those come from OutputError: recomputed here in numpy from the saved files
    ref, test = (np.concatenate([o.ravel() for o in _outputs(p, EVAL)]).astype(np.float64) for p in (FP, path))
    err = test - ref
    assert got["sqnr_db"] == pytest.approx(references.sqnr_db(ref, test), abs=0.01)
    assert got["cosine"] == pytest.approx(ref @ test / np.linalg.norm(ref) / np.linalg.norm(test), abs=1e-6)
    assert got["max_abs_error"] == pytest.approx(np.abs(err).max(), rel=1e-6)
    assert got["psnr_db"] == pytest.approx(10 * np.log10((ref.max() - ref.min()) ** 2 / (err**2).mean()), abs=0.01)


def _outputs(model, data) -> list[np.ndarray]:
    """The model's first output on every sample of `data` (one feed each)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with np.load(data) as npz:
        n = len(npz[session.get_inputs()[0].name])
        return [session.run(None, {i.name: npz[i.name][k:k + 1] for i in session.get_inputs()})[0] for k in range(n)]


def test_compare_a_model_with_itself_is_exact(capsys, tmp_path):
    code, out, _ = run(capsys, "compare", FP, FP, "--data", EVAL, "--json", tmp_path / "c.json", "-q")
    assert code == 0
    got = json.loads((tmp_path / "c.json").read_text())["outputs"]["out"]
    assert got == {"sqnr_db": "inf", "max_abs_error": 0.0, "cosine": 1.0, "psnr_db": "inf"}


def test_psnr_uses_the_reference_range():
    e = TensorError()
    e.update(np.array([0.0, 1.0]), np.array([0.0, 0.5]))  # MSE 0.125, range 1
    assert e.psnr == pytest.approx(10 * math.log10(1 / 0.125))
    assert e.sqnr == pytest.approx(10 * math.log10(1 / 0.25))


@pytest.mark.parametrize("case", ["no-data", "missing-quant", "other-outputs", "bad-data"])
def test_compare_bad_input(capsys, tmp_path, case):
    other = save(make_qdq_matmul(), tmp_path / "other.onnx")
    np.savez(tmp_path / "bad.npz", nothing=np.zeros(3, np.float32))
    argv, needle = {
        "no-data": ([FP, FP], "--data"),
        "missing-quant": ([FP, tmp_path / "nope.onnx", "--data", EVAL], "nope.onnx"),
        "other-outputs": ([FP, other, "--data", EVAL], "other.onnx"),
        "bad-data": ([FP, FP, "--data", tmp_path / "bad.npz"], "bad.npz"),
    }[case]
    code, _, err = run(capsys, "compare", *argv)
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("command", ["check-trt", "build-trt", "compare"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith(f"usage: segquant-onnx {command}")
