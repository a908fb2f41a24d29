"""`bench.py --suite int4`, its parts that do not quantize anything: the arguments, the rows (each of ours is the
QuantConfig its label names; ModelOpt's are its int4 flags), the low-rank rank per model, the INT4 FLOP count
on a tiny graph, the SQNR sessions' INT4 setting, the table and the BENCHMARKS.md section it replaces. The run
itself (every tiny model, minutes) is `python scripts/bench.py --suite int4`; BENCHMARKS.md holds its output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import benchkit.driver
    import benchkit.int4

    return benchkit


def test_int4_suite_arguments(bench):
    from benchkit.cases import ALL_MODELS

    parse = bench.driver.parse_args
    args = parse(["--suite", "int4"])
    assert args.repeat == 1 and args.model_list == list(ALL_MODELS) and not args.skip_modelopt
    args = parse(["--suite", "int4", "--models", "demo,example,demo", "--repeat", "2", "--skip-modelopt"])
    assert args.model_list == ["demo", "example"] and args.repeat == 2 and args.skip_modelopt
    for bad in (["--quick"], ["--models", "example,nope"], ["--repeat", "0"], ["--models", "terrain"]):
        with pytest.raises(SystemExit):
            parse(["--suite", "int4", *bad])


@pytest.mark.parametrize("rank", [16, 32])
def test_each_row_is_the_quant_config_its_label_says(bench, rank):
    from segquant_onnx import QuantConfig

    methods = bench.int4.int4_methods(rank)
    labels = [m.label for m in methods]
    assert labels == ["INT8 default"] + [f"{f} {what}" for f in ("W4A16", "W4A8") for what in
                                         ("RTN", "GPTQ", f"GPTQ + low-rank {rank}", "best preset")]
    assert len({m.slug for m in methods}) == len(methods)
    configs = {m.label: QuantConfig(**m.fields) for m in methods}
    assert configs["INT8 default"] == QuantConfig(precision={"high_precision": "fp32"})
    for fmt in ("w4a16", "w4a8"):
        name = fmt.upper()
        p = {"format": fmt, "high_precision": "fp32"}
        assert configs[f"{name} RTN"] == QuantConfig(precision={**p, "weight_rounding": "rtn"})
        assert configs[f"{name} GPTQ"] == QuantConfig(precision={**p, "weight_rounding": "gptq"})
        assert configs[f"{name} GPTQ + low-rank {rank}"] == QuantConfig(
            precision={**p, "weight_rounding": "gptq", "low_rank": rank})
        best = configs[f"{name} best preset"]
        assert best == QuantConfig.preset("best", precision=p)  # --preset best at INT4: GPTQ on
        assert (best.smoothquant.mode.value, best.outliers.mode.value, best.fallback.target_sqnr,
                best.fallback.max_fallback_pct, best.precision.weight_rounding.value,
                best.precision.weight_clip, best.precision.low_rank) == ("auto", "auto", 40.0, 5.0, "gptq", True, 0)
    for m in methods:
        assert m.precision == (configs[m.label].precision.format.value, "fp32")
        assert m.baseline is None or labels.index(m.baseline) < labels.index(m.label)


def test_modelopt_rows_run_its_int4_modes(bench, monkeypatch, tmp_path):
    from benchkit import runners
    from benchkit.cases import ModelCase

    seen = []
    monkeypatch.setattr(runners, "finish", lambda cmd, out, log, timeout, rss_limit_gib=None: seen.append(cmd))
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    case = ModelCase("m", model, tmp_path / "c.npz", tmp_path / "e.npz", "")
    for m in bench.int4.INT4_MODELOPT:
        runners.run_modelopt(case, m, tmp_path, 1.0, Path("python"))
    flags = [dict(zip(cmd[3::2], cmd[4::2])) for cmd in seen]
    assert [(f["--quantize_mode"], f["--calibration_method"], f["--high_precision_dtype"]) for f in flags] == [
        ("int4", "awq_clip", "fp32"), ("int4", "rtn_dq", "fp32")]
    plan = bench.int4.int4_plan(bench.driver.parse_args(["--suite", "int4"]), 16, Path("python"))
    assert [p.label for p in plan] == [m.label for m in bench.int4.int4_methods(16)] + [
        "ModelOpt int4 awq_clip", "ModelOpt int4 rtn_dq"]
    assert [p.label for p in bench.int4.int4_plan(bench.driver.parse_args(["--suite", "int4"]), 16, None)][-1] == \
        "W4A8 best preset"


def _linear_model(path: Path, shapes: list[tuple[int, int]], trans_b: bool = False) -> Path:
    """x -> MatMul / Gemm(transB) chain with float weights of the given (K, N)."""
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(shapes):
        w = np.ones((n, k) if trans_b else (k, n), np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        op = helper.make_node("Gemm", [x, f"w{i}"], [f"y{i}"], transB=1) if trans_b else \
            helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"])
        nodes.append(op)
        x = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, shapes[0][0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


def test_low_rank_is_32_unless_the_linears_are_narrow(bench, tmp_path):
    low_rank_for = bench.int4.low_rank_for
    assert low_rank_for(_linear_model(tmp_path / "narrow.onnx", [(64, 64), (64, 256), (256, 64)])) == (16, 64)
    assert low_rank_for(_linear_model(tmp_path / "wide.onnx", [(512, 1024), (1024, 512), (512, 64)])) == (32, 512)
    # Gemm transB=1 stores [N, K]: min(K, N) is the same either way, the shapes are read in (K, N)
    assert bench.int4.weight_shapes(_linear_model(tmp_path / "gemm.onnx", [(32, 256)], trans_b=True)) == [(32, 256)]
    assert low_rank_for(_linear_model(tmp_path / "gemm2.onnx", [(256, 512), (512, 256)], trans_b=True)) == (32, 256)


def _int4_then_float(path: Path) -> Path:
    """x [1, 4, 32] -> MatMul(x, DQ(INT4 [32, 16], block 16)) -> MatMul(., float [16, 8])."""
    q = numpy_helper.from_array(np.zeros((32, 16), np.int8), "wq")
    q.data_type = TensorProto.INT4  # 512 zero nibbles, packed two per byte
    q.ClearField("int32_data")
    q.raw_data = bytes(256)
    inits = [q, numpy_helper.from_array(np.full((2, 16), 0.1, np.float32), "ws"),
             numpy_helper.from_array(np.ones((16, 8), np.float32), "wf")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, block_size=16),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "wf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_int4_flop_share_counts_int4_weights_only(bench, tmp_path):
    path = _int4_then_float(tmp_path / "m.onnx")
    share, int4_nodes, linear_nodes = bench.int4.int4_flop_share(path, {"x": np.ones((1, 4, 32), np.float32)})
    # 2 * 4 * 16 * 32 FLOPs behind an INT4 weight, 2 * 4 * 8 * 16 in float
    assert (int4_nodes, linear_nodes) == (1, 2) and share == pytest.approx(4096 / (4096 + 1024))
    assert bench.int4.int4_flop_share(_linear_model(tmp_path / "f.onnx", [(32, 16)]),
                                      {"x": np.ones((2, 32), np.float32)}) == (0.0, 0, 1)


def test_sqnr_sessions_compute_int4_matmuls_in_float32(bench, tmp_path):
    from benchkit.measure import SESSION_NOTE, make_session

    session = make_session(_int4_then_float(tmp_path / "m.onnx"))
    assert session.get_session_options().get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "1"
    assert "qdq_matmulnbits_accuracy_level = 1" in SESSION_NOTE
    out = session.run(None, {"x": np.ones((1, 4, 32), np.float32)})[0]
    assert np.array_equal(out, np.zeros((1, 4, 8), np.float32))  # zero INT4 weights


def test_the_table_and_the_section_it_replaces(bench):
    from benchkit.real import SECTION_TITLE as REAL, kept_section, replace_section
    from benchkit.results import ResultRow

    ok = ResultRow("demo", "W4A8 GPTQ + low-rank 16", "ours", "w4a8", sqnr_db=26.7412, seconds=3.0, peak_rss_mib=150,
                   size_bytes=400 * 1024, trt_violations=0, trt="built")
    ok.report = {"summary": {"weight_bytes": {"before": 2048 * 1024, "after": 512 * 1024}, "low_rank_sites": 9,
                             "low_rank_extra_flop_pct": 37.81}}
    failed = ResultRow("demo", "ModelOpt int4 awq_clip", "modelopt", "w4a16", size_bytes=1024,
                       error="ONNX Runtime could not run it: " + "x" * 500)
    table = bench.int4.int4_table([ok, failed], {("demo", ok.method): (0.72091, 50, 149)})
    lines = table.splitlines()
    assert lines[2] == ("| demo | W4A8 GPTQ + low-rank 16 | 26.74 | 400 | 2048 -> 512 | 72.09 (50/149) | 37.8 (9) "
                        "| 3.0 | 150 | 0 | built |")
    assert lines[3].startswith("| demo | ModelOpt int4 awq_clip | n/a (ONNX Runtime could not run it: xxx")
    assert len(lines[3]) < 260 and lines[0].count("|") == lines[3].count("|")
    # the int4 section is replaced in place; the real-models section and the rest stay as they were
    int4 = bench.int4.SECTION_TITLE
    doc = f"# B\n\ntiny\n\n{REAL}\n\nreal rows\n\n{int4}\n\nold int4\n"
    new = replace_section(doc, f"{int4}\n\nnew int4\n", int4)
    assert new == f"# B\n\ntiny\n\n{REAL}\n\nreal rows\n\n{int4}\n\nnew int4\n"
    assert kept_section(new, int4) == f"{int4}\n\nnew int4\n" and kept_section(new) == f"{REAL}\n\nreal rows\n"
    assert replace_section("# B\n", f"{int4}\n\nx\n", int4) == f"# B\n\n{int4}\n\nx\n"
