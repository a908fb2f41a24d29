"""The pure parts of ``scripts/terrain_demo.py``: heightmaps -> images, metrics, the README table.

No network, no model: everything here takes numpy arrays (tests/test_terrain_demo.py). A heightmap is what
the terrain package's sampler returns: heights in metres, ``[H, W]``, its lowest point at 0 (``zero_floor``).
Each quantized terrain is compared with the FP32 terrain of the same seed after both are divided by that
FP32 terrain's highest point (:func:`normalise`), so the images and the PSNR/SSIM see the same numbers.
Needs Pillow and matplotlib (the ``demo`` extra) for the images; the metrics are numpy only.
"""

from __future__ import annotations

import math

import numpy as np

from segquant_onnx.diffusion.demo import sqnr_db
from segquant_onnx.diffusion.image_metrics import psnr, ssim

TILE = 128  # grid pixels per heightmap side (the model's native 128x128: one pixel per height sample)
BAD_PIXEL = (255, 0, 255)  # NaN / inf heights: a colour no terrain colour map uses
VERT_EXAG = 4.0  # hillshade relief exaggeration (heights span metres over a 128-sample tile)


def normalise(heights: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``heights`` divided by the highest point of ``reference`` (the FP32 terrain of the same seed); a flat
    reference (max <= 0) divides by 1. Non-finite values stay as they are: the metrics then say nan."""
    top = float(np.nanmax(reference)) if np.isfinite(reference).any() else 0.0
    return np.asarray(heights, np.float64) / (top if top > 0 else 1.0)


def compare(reference: np.ndarray, test: np.ndarray) -> dict:
    """PSNR and SSIM (data range 1) of ``test`` against ``reference``, both normalised by ``reference``; nan
    when ``test`` holds a non-finite height."""
    ref, got = normalise(reference, reference), normalise(test, reference)
    if not np.isfinite(got).all():
        return {"psnr_db": float("nan"), "ssim": float("nan")}
    return {"psnr_db": psnr(ref, got, 1.0), "ssim": ssim(ref, got, 1.0)}


def output_sqnr(reference: np.ndarray, test: np.ndarray) -> float:
    """The denoiser's output SQNR in dB (the benchmark's metric, on model-space outputs); nan if non-finite."""
    return sqnr_db(reference, test) if np.isfinite(test).all() else float("nan")


def mean_finite(values) -> float:
    """Mean over the finite values (inf PSNR of identical images included as inf); nan when none is a number."""
    vals = [float(v) for v in values if not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def shade(heights: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A heightmap as an RGB uint8 image: matplotlib's ``terrain`` colour map over [0, reference's top],
    hillshaded (light from the north-west, 45 degrees up); non-finite heights in BAD_PIXEL."""
    from matplotlib import colormaps
    from matplotlib.colors import LightSource

    z = normalise(heights, reference)
    bad = ~np.isfinite(z)
    z = np.clip(np.where(bad, 0.0, z), 0.0, 1.0)
    rgb = LightSource(azdeg=315, altdeg=45).shade(z, cmap=colormaps["terrain"], vmin=0.0, vmax=1.0,
                                                  vert_exag=VERT_EXAG, blend_mode="soft")
    out = np.round(np.clip(rgb[..., :3], 0.0, 1.0) * 255).astype(np.uint8)
    out[bad] = BAD_PIXEL
    return out


def grid_image(tiles: dict[str, list[np.ndarray]], captions: dict[str, list[str]], columns: list[str]):
    """One PIL image: a row per method (``tiles`` keys, in order), a column per entry of ``columns``; each tile
    an RGB array, its caption (e.g. PSNR) written under it."""
    from PIL import Image, ImageDraw

    names = list(tiles)
    if not names or any(len(t) != len(columns) for t in tiles.values()):
        raise ValueError(f"every method needs {len(columns)} tiles")
    label_w, head_h, cap_h, pad = 120, 16, 12, 4
    size = (label_w + len(columns) * (TILE + pad), head_h + len(names) * (TILE + cap_h + pad))
    grid = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, col in enumerate(columns):
        draw.text((label_w + j * (TILE + pad) + 2, 2), col, fill=(0, 0, 0))
    for i, name in enumerate(names):
        y = head_h + i * (TILE + cap_h + pad)
        for k, part in enumerate(_wrap(name, 18)):
            draw.text((4, y + TILE // 2 - 16 + 11 * k), part, fill=(0, 0, 0))
        for j, tile in enumerate(tiles[name]):
            img = Image.fromarray(tile, "RGB")
            if img.size != (TILE, TILE):
                img = img.resize((TILE, TILE), Image.NEAREST)
            x = label_w + j * (TILE + pad)
            grid.paste(img, (x, y))
            caption = captions.get(name, [""] * len(columns))[j]
            draw.text((x + 2, y + TILE), caption, fill=(60, 60, 60))
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def save_png(image, path) -> None:
    """Write a PIL image as an adaptive-palette PNG (256 colours: a colour-mapped, hillshaded grid keeps its
    look at a third of the RGB file's size), atomically."""
    from PIL import Image

    from segquant_onnx.ir.outputs import write_atomic

    small = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    write_atomic(path, lambda tmp: small.save(tmp, format="PNG", optimize=True))


def write_curve(path, sigmas: list[float], curves: dict[str, dict[str, list[float]]]) -> None:
    """Two panels over the noise level sigma (log axis): the denoiser output SQNR vs FP32 and the heightmap
    PSNR vs FP32, one line per method (``curves[method] = {"sqnr_db": [...], "psnr_db": [...]}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segquant_onnx.ir.outputs import write_atomic

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for ax, key, label in zip(axes, ("sqnr_db", "psnr_db"),
                              ("denoiser output SQNR vs FP32 (dB)", "heightmap PSNR vs FP32 (dB)")):
        for name, c in curves.items():
            ax.plot(sigmas, [v if math.isfinite(v) else np.nan for v in c[key]], marker="o", ms=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("noise level sigma (one consistency step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
    plt.close(fig)


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


TABLE_HEADER = ("| method | rest | wall time s | peak RSS MiB | quantized linear FLOPs % | "
                "generate: PSNR dB / SSIM | generate_from 0.5: PSNR dB / SSIM | "
                "denoiser SQNR dB at sigma 80 / 0.4 / 0.0058 |")


def table_rows(metrics: dict) -> list[str]:
    """The README's rows, one per method in ``metrics["methods"]`` (FP32 first, as the reference)."""
    rows = []
    strengths = metrics["curve_strengths"]
    picks = [strengths.index(s) for s in (1.0, 0.5, 0.1) if s in strengths]
    for name, m in metrics["methods"].items():
        if m.get("error"):
            rows.append(f"| {name} | {m.get('rest', '-')} | {fmt(m.get('seconds'), '.0f')} | "
                        f"{fmt(m.get('peak_rss_mib'), '.0f')} | - | {m['error']} | - | - |")
            continue
        if name == metrics["reference"]:
            rows.append(f"| {name} | fp32 | - | - | - | reference | reference | reference |")
            continue
        gen, var = m["generate"], m["variation"]
        share = m.get("int8_flop_share")
        sq = " / ".join(fmt(m["curve"]["sqnr_db"][i], ".1f") for i in picks)
        rows.append(f"| {name} | {m['rest']} | {fmt(m.get('seconds'), '.0f')} | {fmt(m.get('peak_rss_mib'), '.0f')} | "
                    f"{fmt(None if share is None else 100 * share, '.1f')} | {fmt(gen['psnr_db'], '.2f')} / "
                    f"{fmt(gen['ssim'], '.3f')} | {fmt(var['psnr_db'], '.2f')} / {fmt(var['ssim'], '.3f')} | {sq} |")
    return rows


def rewrite_table(text: str, metrics: dict) -> str:
    """``text`` (the README) with the rows under TABLE_HEADER replaced; the header must occur exactly once."""
    lines = text.split("\n")
    if lines.count(TABLE_HEADER) != 1:
        raise ValueError(f"expected the terrain table header once in the README, found it {lines.count(TABLE_HEADER)}"
                         f" times:\n{TABLE_HEADER}")
    start = lines.index(TABLE_HEADER) + 2
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = table_rows(metrics)
    return "\n".join(lines)
