"""`segquant-onnx demo`: the trained demo DiT sampled in FP32, naive INT8 and SegQuant INT8, side by side
(`--precision w4a8`: naive W4A8 and SegQuant's best W4A8 recipe instead, W4A8_METHODS).

The bundled demo model (`data/demo_dit.onnx`, trained by `scripts/train_demo_dit.py`) is quantized
twice with its bundled trajectory calibration data: naive INT8 (SegLinear and DualScale off) and
SegQuant (the default `QuantConfig`). Each of the three graphs then samples the same classes from
the same noise (rectified-flow Euler through ONNX Runtime), and the command writes to DIR:

- `demo_grid.png`: per seed, rows FP32 / naive INT8 / SegQuant, one column per class;
- `demo_step_error.png`: per Euler step, the SQNR of each quantized transformer's output vs FP32, on
  the FP32 trajectory's inputs (the transformer's own error) and along its own trajectory (with drift);
- `demo_metrics.json`: every number printed, plus per-image and per-step values.

It prints PSNR and SSIM of each quantized run's images vs the FP32 images (the SegQuant paper's
protocol: same seed, same condition). Needs Pillow; matplotlib for the step-error plot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from segquant_onnx.config import QuantConfig
from segquant_onnx.diffusion.sampling import initial_noise, onnx_transformer, rectified_flow_sample
from segquant_onnx.errors import UserError
from segquant_onnx.examples import example_path
from segquant_onnx.diffusion.image_metrics import psnr, ssim
from segquant_onnx.ir.outputs import Output, check_outputs, write_atomic, write_text_atomic

log = logging.getLogger(__name__)

DEMO_MODEL, DEMO_CALIB, DEMO_EVAL, DEMO_CONDS = ("demo_dit.onnx", "demo_dit_calib.npz", "demo_dit_eval.npz",
                                                 "demo_dit_conds.npz")
METHODS = {
    "naive INT8": QuantConfig(seglinear={"output": False, "input": False}, dualscale={"mode": "off"}),
    "SegQuant": QuantConfig(),
}
# --precision w4a8 (the SegQuant paper's low-bit setting): naive = INT4 weights rounded to nearest, SegLinear and
# DualScale off; SegQuant = the best W4A8 recipe measured on this model (bench.py --suite int4)
W4A8_LOW_RANK = 16  # the demo DiT's linears are 64 wide: rank 32 would be half of each weight
W4A8_METHODS = {
    "naive W4A8": QuantConfig(precision={"format": "w4a8", "weight_rounding": "rtn"},
                              seglinear={"output": False, "input": False}, dualscale={"mode": "off"}),
    "SegQuant W4A8": QuantConfig.preset("best", precision={"format": "w4a8", "low_rank": W4A8_LOW_RANK}),
}
DEMO_PRECISIONS = {"int8": METHODS, "w4a8": W4A8_METHODS}
CELL = 4  # grid pixels per image pixel
OUTPUT_FILES = ("demo_grid.png", "demo_step_error.png", "demo_metrics.json")


def _data(name: str) -> Path:

    path = example_path(name)
    if not path.is_file():
        raise UserError(f"the bundled demo file {name} is missing from {path.parent}; reinstall segquant-onnx "
                        "or regenerate it with scripts/train_demo_dit.py.")
    return path


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """`10 log10(sum(ref^2) / sum((test - ref)^2))`; inf when identical."""
    reference = np.asarray(reference, np.float64)
    noise = float(np.sum((np.asarray(test, np.float64) - reference) ** 2))
    return float("inf") if noise == 0.0 else 10.0 * np.log10(float(np.sum(reference ** 2)) / noise)


def to_unit(latents: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] -> images in [0, 1] (clipped)."""
    return np.clip((latents + 1.0) / 2.0, 0.0, 1.0)


def sample_all(transformers: dict, latents: np.ndarray, cond: dict, steps: int) -> dict:
    """Sample with every transformer from `latents`; the first one is the reference.

    Returns per method: final latents, per-step SQNR vs the reference output on the reference's
    inputs (`same_input`) and along the method's own trajectory (`own_trajectory`).
    """
    (ref_name, ref), *others = transformers.items()
    ref_steps: list[tuple[dict, np.ndarray]] = []
    out = {ref_name: {"latents": rectified_flow_sample(ref, latents, cond, steps,
                                                       on_step=lambda i, f, v: ref_steps.append((f, v)))}}
    for name, run in others:
        own: list[np.ndarray] = []
        final = rectified_flow_sample(run, latents, cond, steps, on_step=lambda i, f, v: own.append(v))
        out[name] = {
            "latents": final,
            "same_input": [sqnr_db(v, run(f)) for f, v in ref_steps],
            "own_trajectory": [sqnr_db(v, o) for (_, v), o in zip(ref_steps, own)],
        }
    return out


def write_grid(path: Path, images: dict[str, np.ndarray], seeds: list[int], classes: list[int]) -> None:
    """Images `[seed, class, H, W]` per method -> one PNG: per seed a band of one row per method."""
    from PIL import Image, ImageDraw

    names = list(images)
    h, w = next(iter(images.values())).shape[-2:]
    cell_h, cell_w, pad, label_w, head_h = h * CELL, w * CELL, 2, 110, 16
    rows = len(seeds) * len(names)
    size = (label_w + len(classes) * (cell_w + pad), head_h + rows * (cell_h + pad) + 6 * (len(seeds) - 1))
    grid = Image.new("L", size, 255)
    draw = ImageDraw.Draw(grid)
    for j, c in enumerate(classes):
        draw.text((label_w + j * (cell_w + pad) + cell_w // 2 - 3, 2), str(c), fill=0)
    y = head_h
    for si, seed in enumerate(seeds):
        for name in names:
            draw.text((4, y + cell_h // 2 - 12), name, fill=0)
            draw.text((4, y + cell_h // 2 + 2), f"seed {seed}", fill=110)
            for j in range(len(classes)):
                tile = Image.fromarray(np.round(images[name][si, j] * 255).astype(np.uint8), "L")
                grid.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (label_w + j * (cell_w + pad), y))
            y += cell_h + pad
        y += 6
    write_atomic(path, lambda tmp: grid.save(tmp))


def write_step_plot(path: Path, results: dict, steps: int) -> bool:
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no step-error plot (pip install 'segquant-onnx[demo]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    x = np.arange(steps)
    quantized = [(n, r) for n, r in results.items() if "same_input" in r]
    for (name, r), color in zip(quantized, ("tab:red", "tab:blue", "tab:green")):
        ax.plot(x, r["same_input"], color=color, marker="o", ms=3, label=f"{name}: on FP32 trajectory inputs")
        ax.plot(x, r["own_trajectory"], color=color, ls="--", label=f"{name}: along its own trajectory")
    ax.set_xlabel("Euler step (t = 1 -> 0)")
    ax.set_ylabel("transformer output SQNR vs FP32 (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, metadata={"Software": None}))
    plt.close(fig)
    return True


def model_name(method: str, precision: str) -> str:
    """The file --save-models writes for `method`: demo_dit_naive_int8.onnx, demo_dit_segquant_w4a8.onnx."""
    return f"demo_dit_{method.split()[0].lower()}_{precision}.onnx"


def run_demo(out_dir: Path, steps: int = 20, seeds=(0, 1, 2), classes=None, progress: bool = True,
             save_models: bool = False, force: bool = False, precision: str = "int8") -> dict:
    """Quantize, sample, compare, write the files; returns the metrics (also in demo_metrics.json).
    `precision`: "int8" (naive INT8 vs SegQuant's defaults) or "w4a8" (W4A8_METHODS)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UserError("segquant-onnx demo needs Pillow for its images: pip install 'segquant-onnx[demo]'.") from None
    from segquant_onnx.pipeline import quantize

    if precision not in DEMO_PRECISIONS:
        raise UserError(f"--precision {precision}: the demo runs {' or '.join(DEMO_PRECISIONS)}.")
    methods = DEMO_PRECISIONS[precision]
    if steps < 1:
        raise UserError(f"--steps {steps} must be at least 1.")
    seeds = list(seeds)
    with np.load(_data(DEMO_CONDS)) as npz:
        conds = {k: npz[k] for k in ("encoder_hidden_states", "pooled_projections")}
    n_classes = len(conds["pooled_projections"])
    classes = list(range(n_classes)) if classes is None else list(classes)
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad or not seeds or not classes:
        raise UserError(f"--classes must be in 0..{n_classes - 1} and at least one class and seed are needed.")
    if any(s < 0 for s in seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: seeds must be at least 0.")
    out_dir = Path(out_dir)
    names = [*(model_name(name, precision) for name in methods if save_models),
             *OUTPUT_FILES]
    check_outputs([Output("-o", out_dir, "", tuple(out_dir / n for n in names))],
                  [_data(n) for n in (DEMO_MODEL, DEMO_CALIB, DEMO_EVAL, DEMO_CONDS)], force)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, files = _data(DEMO_MODEL), []
    transformers, reports = {"FP32": onnx_transformer(model)}, {}
    for name, config in methods.items():
        path = out_dir / model_name(name, precision) if save_models else None
        log.info("quantizing the demo DiT: %s", name)
        result = quantize(model, _data(DEMO_CALIB), config, output=path, force=True, eval_data=_data(DEMO_EVAL),
                          progress=progress)
        transformers[name], reports[name] = onnx_transformer(result.model), result.report
        if path is not None:
            files.append(str(path))

    shape = transformers["FP32"].inputs["hidden_states"]
    latents = np.concatenate([initial_noise(s, [1, *shape[1:]]) for s in seeds for _ in classes])
    cond = {k: np.concatenate([v[c:c + 1] for _ in seeds for c in classes]) for k, v in conds.items()}
    results = sample_all(transformers, latents, cond, steps)

    images = {name: to_unit(r["latents"][:, 0]).reshape(len(seeds), len(classes), *latents.shape[-2:])
              for name, r in results.items()}
    fp = images["FP32"].reshape(-1, *latents.shape[-2:])
    metrics = {"steps": steps, "seeds": seeds, "classes": classes, "methods": {}}
    if precision != "int8":  # the INT8 metrics file keeps its keys as they were
        metrics["precision"] = precision
    for name in methods:
        q = images[name].reshape(fp.shape)
        psnrs, ssims = [psnr(a, b) for a, b in zip(fp, q)], [ssim(a, b) for a, b in zip(fp, q)]
        err = reports[name].get("output_error", {}).get("out", {})
        metrics["methods"][name] = {
            "psnr_db": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
            "eval_output_sqnr_db": err.get("sqnr_db"),
            "step_sqnr_db_same_input": results[name]["same_input"],
            "step_sqnr_db_own_trajectory": results[name]["own_trajectory"],
            "psnr_db_per_image": psnrs, "ssim_per_image": ssims,
            "config": {k: reports[name]["config"][k] for k in ("seglinear", "dualscale")}
            | ({} if precision == "int8" else {k: reports[name]["config"][k]
                                               for k in ("precision", "smoothquant", "outliers", "fallback")}),
        }
    write_grid(out_dir / "demo_grid.png", images, seeds, classes)
    metrics["files"] = files + [str(out_dir / "demo_grid.png")]
    if write_step_plot(out_dir / "demo_step_error.png", results, steps):
        metrics["files"].append(str(out_dir / "demo_step_error.png"))
    write_text_atomic(out_dir / "demo_metrics.json", json.dumps(metrics, indent=1, default=float))
    metrics["files"].append(str(out_dir / "demo_metrics.json"))
    return metrics


def format_metrics(metrics: dict) -> str:
    width = max(12, *map(len, metrics["methods"]))
    lines = [f"demo DiT: {len(metrics['classes'])} classes x {len(metrics['seeds'])} seeds, {metrics['steps']} Euler "
             "steps; images vs FP32 from the same noise:",
             f"{'method':<{width}} {'PSNR dB':>8} {'SSIM':>7} {'output SQNR dB':>15} {'mean step SQNR dB':>18}"]
    for name, m in metrics["methods"].items():
        sq = m["eval_output_sqnr_db"]
        lines.append(f"{name:<{width}} {m['psnr_db']:8.2f} {m['ssim']:7.4f} {sq if sq is None else f'{sq:.2f}':>15} "
                     f"{np.mean(m['step_sqnr_db_same_input']):18.2f}")
    lines.append("(output SQNR: held-out trajectory inputs; step SQNR: transformer output on the FP32 trajectory)")
    lines += [f"wrote {f}" for f in metrics["files"]]
    return "\n".join(lines)
