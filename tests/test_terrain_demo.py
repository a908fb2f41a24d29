"""The pure parts of the terrain demo (scripts/terrain_demo.py, scripts/terrain_render.py): heightmap
normalisation, PSNR/SSIM and SQNR on synthetic terrains, the hillshaded tiles, the grid, the README table and
the command line's validation. No network and no model: fetching, quantizing and sampling are the script's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tr(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import terrain_render

    return terrain_render


@pytest.fixture()
def demo(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import terrain_demo

    return terrain_demo


def hills(seed: int = 0, size: int = 64) -> np.ndarray:
    """A smooth synthetic heightmap, lowest point 0 (as the package's zero_floor gives)."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    h = sum(rng.uniform(0.5, 2) * np.sin(2 * np.pi * (rng.uniform(1, 3) * x + rng.uniform(1, 3) * y)
                                          + rng.uniform(0, 6)) for _ in range(4))
    return (h - h.min()).astype(np.float32)


def test_normalise_divides_by_the_reference_top(tr):
    ref = hills()
    got = tr.normalise(ref * 0.5, ref)
    assert got.max() == pytest.approx(0.5)
    assert tr.normalise(np.ones((8, 8)), np.zeros((8, 8))).max() == 1.0  # flat reference: divide by 1


def test_compare_matches_the_definitions(tr):
    ref = hills()
    noise = np.random.default_rng(1).normal(0, 0.01, ref.shape) * ref.max()
    m = tr.compare(ref, ref + noise)
    mse = np.mean((noise / ref.max()) ** 2)
    assert m["psnr_db"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-9)
    assert 0.8 < m["ssim"] < 1.0
    assert tr.compare(ref, ref)["psnr_db"] == math.inf and tr.compare(ref, ref)["ssim"] == pytest.approx(1.0)
    # a scaled-up copy: PSNR drops by the known amount, independent of the reference's height units
    assert tr.compare(ref * 3, ref * 3 * 1.1)["psnr_db"] == pytest.approx(tr.compare(ref, ref * 1.1)["psnr_db"])


def test_non_finite_heights_give_nan_not_a_number_that_looks_good(tr):
    ref = hills()
    bad = ref.copy()
    bad[3, 3] = np.nan
    m = tr.compare(ref, bad)
    assert math.isnan(m["psnr_db"]) and math.isnan(m["ssim"])
    assert math.isnan(tr.output_sqnr(ref, bad))
    assert tr.mean_finite([1.0, float("nan"), 3.0]) == 2.0
    assert math.isnan(tr.mean_finite([float("nan")]))


def test_output_sqnr(tr):
    ref = np.full((4, 4), 2.0)
    assert tr.output_sqnr(ref, ref + 0.2) == pytest.approx(20.0)


def test_shade_colours_heights_and_marks_bad_pixels(tr):
    pytest.importorskip("matplotlib")
    ref = hills()
    img = tr.shade(ref, ref)
    assert img.shape == (*ref.shape, 3) and img.dtype == np.uint8
    low, high = np.unravel_index(ref.argmin(), ref.shape), np.unravel_index(ref.argmax(), ref.shape)
    # the terrain colour map: blue-green lowlands, pale highlands
    assert int(img[low].sum()) < int(img[high].sum())
    bad = ref.copy()
    bad[5, 7] = np.inf
    assert tuple(tr.shade(bad, ref)[5, 7]) == tr.BAD_PIXEL
    assert tuple(img[5, 7]) != tr.BAD_PIXEL


def test_grid_layout_and_palette_png(tr, tmp_path):
    pytest.importorskip("PIL")
    pytest.importorskip("matplotlib")
    from PIL import Image

    ref = hills()
    tiles = {"FP32": [tr.shade(ref, ref)] * 3, "a method with a long name": [tr.shade(ref * 0.9, ref)] * 3}
    captions = {"a method with a long name": ["PSNR 20.0"] * 3}
    grid = tr.grid_image(tiles, captions, ["a", "b", "c"])
    assert grid.size == (120 + 3 * (tr.TILE + 4), 16 + 2 * (tr.TILE + 12 + 4))
    # the first tile sits at (120, 16), resized to TILE: its centre pixel is the shaded terrain's
    centre = np.asarray(grid)[16 + tr.TILE // 2, 120 + tr.TILE // 2]
    assert tuple(centre) == tuple(tr.shade(ref, ref)[32, 32])
    path = tmp_path / "grid.png"
    tr.save_png(grid, path)
    back = Image.open(path)
    assert back.mode == "P" and back.size == grid.size
    assert np.abs(np.asarray(back.convert("RGB"), float) - np.asarray(grid, float)).mean() < 3
    with pytest.raises(ValueError, match="3 tiles"):
        tr.grid_image({"x": [tiles["FP32"][0]]}, {}, ["a", "b", "c"])


def test_curve_plot_is_written(tr, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curve.png"
    tr.write_curve(path, [0.01, 1.0, 80.0], {"m": {"sqnr_db": [20.0, 5.0, float("nan")], "psnr_db": [30, 10, 1]}})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def metrics_fixture():
    strengths = [0.1, 0.5, 1.0]
    curve = {"sqnr_db": [25.0, 3.5, -0.7], "psnr_db": [30.0, 12.0, 4.0], "ssim": [0.9, 0.5, 0.1]}
    return {"reference": "FP32", "curve_strengths": strengths, "methods": {
        "FP32": {"rest": "fp32"},
        "ours default": {"rest": "fp16", "seconds": 51.2, "peak_rss_mib": 725.0, "int8_flop_share": 1.0,
                         "generate": {"psnr_db": 4.25, "ssim": 0.1234}, "variation": {"psnr_db": 12.0, "ssim": 0.5},
                         "curve": curve},
        "ours best": {"rest": "fp16", "seconds": 1500.0, "peak_rss_mib": None, "error": "timed out after 1500 s"}}}


def test_table_rows_and_readme_rewrite(tr):
    rows = tr.table_rows(metrics_fixture())
    assert rows[0] == "| FP32 | fp32 | - | - | - | reference | reference | reference |"
    assert rows[1] == ("| ours default | fp16 | 51 | 725 | 100.0 | 4.25 / 0.123 | 12.00 / 0.500 | -0.7 / 3.5 / 25.0 |")
    assert rows[2].startswith("| ours best | fp16 | 1500 | n/a | - | timed out after 1500 s |")
    readme = "\n".join(["intro", tr.TABLE_HEADER, "|---|", "| old | row |", "| old | row 2 |", "", "after"])
    new = tr.rewrite_table(readme, metrics_fixture()).split("\n")
    assert new[:3] == ["intro", tr.TABLE_HEADER, "|---|"] and new[3:6] == rows and new[6:] == ["", "after"]
    with pytest.raises(ValueError, match="found it 0 times"):
        tr.rewrite_table("no table here", metrics_fixture())


@pytest.mark.parametrize("argv, fragment", [
    (["--methods", "default,fp32"], "fp32 first"),
    (["--methods", "fp32,nope"], "fp32 first"),
    (["--methods", "fp32,ort,ort"], "distinct"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "1", "1"], "--seeds"),
    (["--seeds", *map(str, range(9))], "--seeds"),
    (["--difficulty", "0"], "--difficulty"),
    (["--difficulty", "101"], "--difficulty"),
    (["--timeout", "0"], "--timeout"),
    (["--best-timeout", "-5"], "--best-timeout"),
])
def test_bad_arguments_exit_2_naming_the_flag(demo, argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args([*argv, "--no-readme"])
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_readme_without_the_table_is_refused_before_any_work(demo, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no table\n")
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--readme", str(readme)])
    assert exc.value.code == 2 and "--readme" in capsys.readouterr().err


def test_good_arguments(demo):
    args = demo.parse_args(["--methods", "fp32,default,best", "--seeds", "3", "7", "--no-readme"])
    assert args.method_names == ["fp32", "default", "best"] and args.seeds == [3, 7]
    assert demo.VARIATION_STRENGTH in demo.CURVE_STRENGTHS and 1.0 in demo.CURVE_STRENGTHS


def test_readme_table_is_the_committed_metrics(tr):
    """The README's terrain table is what scripts/terrain_demo.py wrote from docs/terrain_demo/terrain_metrics.json
    (re-running it needs the network, ModelOpt and half an hour: not a CI job), so a hand edit fails here."""
    import json

    metrics = json.loads((ROOT / "docs" / "terrain_demo" / "terrain_metrics.json").read_text())
    lines = (ROOT / "README.md").read_text().split("\n")
    assert lines.count(tr.TABLE_HEADER) == 1
    start = lines.index(tr.TABLE_HEADER) + 2
    rows = []
    while lines[start + len(rows)].startswith("|"):
        rows.append(lines[start + len(rows)])
    assert rows == tr.table_rows(metrics)
    for name in ("terrain_grid.png", "terrain_step_error.png"):
        path = ROOT / "docs" / "terrain_demo" / name
        # the grid's budget: 8 method rows x 6 tiles (the FP8 rows of 2026-12-05 made it 524 kB: 400 kB was 6 rows)
        assert path.is_file() and path.stat().st_size < 600_000, f"{name}: missing or over 600 kB"
