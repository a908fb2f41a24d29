"""The benchmark keeps working: `scripts/bench.py` runs end to end on the bundled example (one run of about a
minute, shared by the tests that read it: marked slow, run by `python -m pytest -m slow`, which .ci/run does on
its own line), every row of its feature matrix is a valid QuantConfig, and its demo-dynamo case is the trained
checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# The end-to-end run keeps these rows of the feature matrix (the timed rows, the per-layer pair, the
# DualScale and fallback cells, an FP8 graph through the SQNR session, check-trt and TensorRT-RTX): `--quick`
# with every row costs about twice as long, and the other rows run the same benchmark code with other
# QuantConfig fields (checked below without running them).
INT8_ROWS = ("naive INT8", "+SegLinear", "+DualScale all", "default", "default + target 40 dB")
E2E_ROWS = (*INT8_ROWS, "FP8 default")
_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from benchkit import runners
from benchkit.driver import main
runners.OURS_MATRIX = tuple(m for m in runners.OURS_MATRIX if m.label in sys.argv[2].split(";"))
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """`bench.py --quick --skip-modelopt` (bundled example, segquant-onnx and ONNX Runtime), E2E_ROWS only."""
    tmp = tmp_path_factory.mktemp("bench")
    md = tmp / "BENCH.md"
    r = subprocess.run([sys.executable, "-c", _RUN, str(SCRIPTS), ";".join(E2E_ROWS), "--quick", "--skip-modelopt",
                        "--work-dir", str(tmp / "work"), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=900, cwd=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, md.read_text(), json.loads((tmp / "work" / "bench_results.json").read_text())


def _table(text: str, header: str) -> dict[str, dict[str, str]]:
    """The Markdown table whose header starts with `header`: method -> {column: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        rows[cells["method"]] = cells
    return rows


@pytest.mark.slow
def test_bench_prints_the_report_it_writes(bench_run):
    stdout, text, _ = bench_run
    assert stdout == text + "\n"  # print() adds one newline: the file holds nothing the run did not print
    assert "python scripts/bench.py --quick --skip-modelopt" in text


@pytest.mark.slow
def test_bench_measures_every_row(bench_run):
    _, text, data = bench_run
    table = _table(text, "| model | method | precision | SQNR dB |")
    # grouped by precision: INT8 (ours, then the peers), then FP8
    assert list(table) == ["FP32 reference", *INT8_ROWS, "ORT MinMax", "ORT MinMax, MatMul/Gemm/Conv only",
                           "FP8 default"]
    assert {m: c["precision"] for m, c in table.items()} == {
        m: "fp32" if m == "FP32 reference" else "FP8, fp32 rest" if m == "FP8 default" else "INT8, fp32 rest"
        for m in table}
    for method, cells in table.items():
        assert cells["model"] == "example"
        assert re.fullmatch(r"-?\d+\.\d\d|ref", cells["SQNR dB"]), (method, cells["SQNR dB"])
        assert cells["TensorRT-RTX"] != "-" and re.fullmatch(r"\d+/\d+", cells["quantized weights"])
    # ours build with TensorRT-RTX and break none of its rules; the tool's own SQNR agrees with the benchmark's
    for method in E2E_ROWS:
        assert table[method]["TensorRT-RTX"] == "built" and table[method]["check-trt violations"] == "0"
        own = table[method]["tool's own SQNR"]
        if method in ("naive INT8", "default", "FP8 default"):  # timed rows: evaluate=False, like the peers
            assert own == "-"
        else:
            assert abs(float(own) - float(table[method]["SQNR dB"])) < 0.015, (method, own)
    assert re.fullmatch(r"\d+\.\d\d \(\d+ sites float\)", table["default + target 40 dB"]["quantized FLOPs %"])
    assert re.fullmatch(r"\d+\.\d \(\d+/\d+ sites\)", table["+DualScale all"]["DualScale extra FLOPs %"])
    # the JSON beside the table holds the same rows with their full numbers; ORT Entropy ran and was dropped
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == list(table) and all(r["error"] is None for r in rows.values())
    assert all(f"{rows[m]['sqnr_db']:.2f}" == table[m]["SQNR dB"] for m in table if m != "FP32 reference")
    assert "example / ORT Entropy" in {n["what"] for n in data["notes"]}
    assert [e["model"] for e in data["per_layer"]] == ["example"]
    assert "| example | +SegLinear |" in text.split("## Per-layer SQNR")[1]
    # the summary compares within a precision: an INT8 line and an FP8 line
    summary = text.split("## Against the peers")[1].split("##")[0]
    assert "| example | INT8, fp32 rest | " in summary and "| example | FP8, fp32 rest | - | - | - | " in summary


def test_fp8_graphs_get_an_fp8_session_and_no_cpu_latency(bench_run, monkeypatch):
    """Any tool's FP8 graph runs on ONNX Runtime's CPU with its Q/DQ fusions off (else QGemm's type check
    fails); the latency section times only INT8 / fp32 rows."""
    _, _, data = bench_run
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from benchkit.measure import has_float8
    from benchkit.results import ResultRow
    from benchkit.sections import timeable

    outputs = {r["method"]: Path(r["output"]) for r in data["rows"]}
    assert has_float8(outputs["FP8 default"])
    assert not has_float8(outputs["default"]) and not has_float8(outputs["FP32 reference"])
    assert timeable(ResultRow("m", "naive INT8", "ours")) and timeable(ResultRow("m", "ref", "fp32", "fp32"))
    assert not timeable(ResultRow("m", "FP8 default", "ours", "fp8"))
    assert not timeable(ResultRow("m", "ModelOpt max, fp16 rest", "modelopt", "int8", "fp16"))


def test_every_feature_row_is_a_valid_quant_config(monkeypatch):
    from segquant_onnx import QuantConfig

    monkeypatch.syspath_prepend(str(SCRIPTS))
    from benchkit.runners import OURS_MATRIX
    from benchkit.tables import methods_table

    labels = [m.label for m in OURS_MATRIX]
    assert set(E2E_ROWS) <= set(labels)
    for method in OURS_MATRIX:
        config = QuantConfig(**method.fields)
        # every row writes an fp32 rest (compared with the peers' fp32-rest rows), in its label's format, but
        # the shipped default's own row (fp16 rest, beside ModelOpt's fp16-rest row)
        shipped = method.label == "default, fp16 rest"
        assert config.precision.high_precision.value == ("fp16" if shipped else "fp32"), method.label
        assert not shipped or config == QuantConfig(), method.label
        assert config.precision.format.value == ("fp8" if method.label.startswith("FP8") else "int8"), method.label
        assert method.baseline is None or labels.index(method.baseline) < labels.index(method.label)
    fp8 = {m.label: QuantConfig(**m.fields) for m in OURS_MATRIX if m.label.startswith("FP8")}
    assert fp8["FP8 naive"].dualscale.mode.value == "off" and not fp8["FP8 naive"].seglinear.output
    assert fp8["FP8 default"] == QuantConfig(precision={"format": "fp8", "high_precision": "fp32"})
    best = fp8["FP8 best"]
    assert (best.smoothquant.mode.value, best.outliers.mode.value, best.fallback.target_sqnr,
            best.fallback.max_fallback_pct) == ("auto", "auto", 40.0, 5.0)
    assert methods_table().count("`QuantConfig(") == len(OURS_MATRIX)


def test_help_lists_the_flags():
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench.py"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    flags = set(re.findall(r"--[a-z-]+", r.stdout))
    assert flags == {"--help", "--work-dir", "--quick", "--skip-modelopt", "--skip-ort-entropy", "--models", "--repeat",
                     "--timeout", "--markdown", "--suite", "--rss-limit-gib", "--methods", "--trt", "--precision"}


def test_demo_dynamo_is_the_trained_checkpoint_through_the_dynamo_exporter(tmp_path, monkeypatch):
    """The bench's `demo-dynamo` case: the saved demo checkpoint re-exported with dynamo=True computes
    what the bundled TorchScript export computes, on the demo's own eval feeds."""
    import numpy as np
    import onnx

    pytest.importorskip("diffusers")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    monkeypatch.syspath_prepend(str(SCRIPTS))
    from benchkit.cases import DATA_DIR, iter_samples, prepare_models

    (case,) = prepare_models(["demo-dynamo"], tmp_path)
    assert case.onnx_path.parent == tmp_path / "models" and case.calib_path.name == "demo_dit_calib.npz"
    model = onnx.load(case.onnx_path)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    assert any(n.op_type == "Split" for n in model.graph.node)  # dynamo writes chunk as Split
    feed = next(iter_samples(case.eval_path))
    got = ort.InferenceSession(str(case.onnx_path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = ort.InferenceSession(str(DATA_DIR / "demo_dit.onnx"), providers=["CPUExecutionProvider"]).run(
        None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_workers_section_is_replaced_and_keeps_its_analysis(tmp_path, monkeypatch):
    """`bench.py --suite workers` rewrites only its own section, and the hand-written analysis below the
    marker survives a new run."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from benchkit.scaling import NOTES_MARK, SECTION_TITLE, write_section

    md = tmp_path / "B.md"
    md.write_text(f"# B\n\n## Results\n\nr\n\n{SECTION_TITLE}\n\nold table\n{NOTES_MARK}\nthe analysis\n\n"
                  "## Real pretrained models\n\nreal\n")
    write_section(md, f"{SECTION_TITLE}\n\nnew table\n")
    text = md.read_text()
    assert "old table" not in text and "new table" in text
    assert text.index("new table") < text.index(NOTES_MARK) < text.index("the analysis") < text.index("## Real")
    assert text.count(SECTION_TITLE) == 1 and "## Results\n\nr" in text


def test_a_method_over_the_memory_limit_is_stopped_and_says_so(tmp_path):
    """launch.finish with rss_limit_gib: a process that grows past it is killed, and that is its error."""
    sys.path.insert(0, str(SCRIPTS))
    from benchkit.launch import finish

    grow = [sys.executable, "-c", "import time; b = bytearray(600 << 20); b[::4096] = b'x' * len(b[::4096]); "
            "time.sleep(30)"]
    run = finish(grow, tmp_path / "never.onnx", tmp_path / "grow.log", timeout_s=60, rss_limit_gib=0.25)
    assert run.error is not None and run.error.startswith("stopped at 0.25 GiB RSS"), run.error
    assert run.seconds < 30
    small = finish([sys.executable, "-c", f"open({str(tmp_path / 'ok.onnx')!r}, 'w').write('x')"],
                   tmp_path / "ok.onnx", tmp_path / "ok.log", timeout_s=60, rss_limit_gib=0.25)
    assert small.error is None and small.peak_rss_mib < 256
