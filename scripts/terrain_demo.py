"""A real diffusion demo: the terrain UNet's own sampler through ONNX Runtime, FP32 against four INT8 models.

The model is the consistency-distilled terrain UNet that PyPI's ``adaptive-terrain-diffusion`` 0.4.2 ships
(``scripts/real_models.py`` fetches it and writes its calibration data along the package's sampler). This
script quantizes it with NVIDIA ModelOpt (INT8, max calibration, its default fp16 rest; in its own virtualenv),
ONNX Runtime ``quantize_static`` (QDQ, per-channel symmetric INT8 on MatMul/Gemm/Conv: its default op set
fails on this model, BENCHMARKS.md), ``segquant-onnx quantize`` as shipped and with ``--preset best`` (each
timed in its own process; the best preset under its own time limit), then samples with the package's own
``TerrainGenerator`` (its code, imported from the wheel) on each model from the same seeds:

- ``generate``: the package's sampler, one consistency step from noise at sigma_max = 80 (the package refuses
  more steps: "The distilled consistency model supports exactly one step");
- ``generate_from``: its variation sampler, the FP32 terrain re-noised at sigma = 0.002 (80 / 0.002)^strength
  and denoised in one step; at 0.5 in the grid, and at strengths 0.1 .. 1.0 for the error curve: the
  denoiser's output SQNR and the heightmap PSNR against FP32 on identical inputs, per noise level.

It writes ``terrain_grid.png`` (rows: methods, columns: seeds; hillshaded ``terrain`` colour map scaled to the
FP32 terrain of the column, PSNR under each tile), ``terrain_step_error.png`` and ``terrain_metrics.json``
into ``--docs`` (default docs/terrain_demo) and rewrites the README's terrain table.

Usage::

    python scripts/terrain_demo.py                     # needs pip access once, the demo extra, ModelOpt's venv
    python scripts/terrain_demo.py --methods fp32,default --no-readme --docs /tmp/terrain

Quantized models and timings are kept in ``<work-dir>/terrain_demo/`` (git-ignored) and reused unless
``--force``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import terrain_render as tr

log = logging.getLogger("terrain_demo")
ROOT = Path(__file__).resolve().parents[1]
CURVE_STRENGTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
VARIATION_STRENGTH = 0.5
GRID_VARIATIONS = 2
VARIATION_SEED = 1000  # generate_from's seed is VARIATION_SEED + the column's seed: other noise than generate's


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # fp32 | modelopt | ort | ours
    args: tuple[str, ...] = ()  # ours: the CLI flags after the model, data and output; ModelOpt: --quantize_mode
    rest: str = "fp32"  # the dtype of the unquantized rest the tool writes


METHODS = {
    "fp32": Method("FP32", "fp32"),
    "modelopt": Method("ModelOpt INT8 max", "modelopt", rest="fp16"),
    "ort": Method("ORT quantize_static INT8", "ort"),
    "default": Method("ours default", "ours", (), rest="fp16"),
    "best": Method("ours --preset best", "ours", ("--preset", "best"), rest="fp16"),
    "fast": Method("ours --preset fast", "ours", ("--preset", "fast"), rest="fp16"),
    "outliers16": Method("ours --outlier-channels 16", "ours", ("--outlier-channels", "16"), rest="fp16"),
    # FP8 E4M3 (README, Real pretrained models: INT8 cannot hold this model's activations; FP8's step grows with
    # the value)
    "modelopt-fp8": Method("ModelOpt FP8 max", "modelopt", ("fp8",), rest="fp16"),
    "fp8": Method("ours --precision fp8", "ours", ("--precision", "fp8"), rest="fp16"),
}
DEFAULT_METHODS = "fp32,modelopt,ort,default,best,outliers16,modelopt-fp8,fp8"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated: exit 2 with one line naming the flag on a bad value."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench_out", help="cache folder (default bench_out/)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "terrain_demo", help="where the images go")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--no-readme", action="store_true", help="leave the README's table alone")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, fp32 first, of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--difficulty", type=int, default=50, help="the terrain difficulty label, 1..100 (default 50)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per quantizer (default 900)")
    p.add_argument("--best-timeout", type=float, default=1500.0, help="seconds for --preset best (default 1500)")
    p.add_argument("--modelopt-python", type=Path, help="a python with nvidia-modelopt (default: its bench venv)")
    p.add_argument("--force", action="store_true", help="quantize again even when a cached model exists")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names or names[0] != "fp32" or len(set(names)) != len(names):
        p.error(f"--methods {args.methods!r}: give fp32 first, then distinct names of {','.join(METHODS)}")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds) or len(args.seeds) > 8:
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: 1 to 8 distinct seeds, each at least 0")
    if not 1 <= args.difficulty <= 100:
        p.error(f"--difficulty {args.difficulty}: the model knows difficulties 1 to 100")
    if args.timeout <= 0 or args.best_timeout <= 0:
        p.error("--timeout and --best-timeout must be positive seconds")
    args.method_names = names
    if not args.no_readme and (not args.readme.is_file()
                               or args.readme.read_text().split("\n").count(tr.TABLE_HEADER) != 1):
        p.error(f"--readme {args.readme}: no terrain table header in it to rewrite (or use --no-readme)")
    return args


# ---------------------------------------------------------------------------------------------------------
# quantize: each tool in its own measured process (scripts/benchkit), cached with its timing

def quantize_all(args, info: dict) -> dict[str, dict]:
    """method key -> {"path", "seconds", "peak_rss_mib", "error", "command"} (FP32: the model itself)."""
    from benchkit.cases import ModelCase
    from benchkit.launch import finish
    from benchkit.measure import LINEAR_OPS
    from benchkit.runners import MODELOPT_METHODS, run_modelopt, run_ort

    out_dir = args.work_dir / "terrain_demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    case = ModelCase("terrain", Path(info["onnx"]), Path(info["calib_path"]), Path(info["eval_path"]), "")
    runs = {"fp32": {"path": info["onnx"], "error": None}}
    for key in args.method_names[1:]:
        method, record = METHODS[key], out_dir / f"{key}.run.json"
        if record.is_file() and not args.force:
            runs[key] = json.loads(record.read_text())
            if runs[key]["error"] or Path(runs[key]["path"]).is_file():
                log.info("%s: cached (%s)", method.label, record)
                continue
        timeout = args.best_timeout if key == "best" else args.timeout
        log.info("%s: quantizing (limit %.0f s)", method.label, timeout)
        if method.kind == "modelopt":
            python = modelopt_python(args)
            mode = method.args[0] if method.args else "int8"
            # max calibration and ModelOpt's default fp16 rest (FP8: its INT8 calibration rescaled, max only)
            mo = replace(next(m for m in MODELOPT_METHODS if m.slug == "max-fp16"), mode=mode,
                         slug="max-fp16" if mode == "int8" else f"{mode}-max-fp16")
            run = run_modelopt(case, mo, out_dir, timeout, python) if python else None
            command = f"{python} -m modelopt.onnx.quantization --quantize_mode {mode} --calibration_method max " \
                      "--calibration_eps cpu --high_precision_dtype fp16 (ModelOpt's default rest)"
        elif method.kind == "ort":
            run = run_ort(case, "MinMax", LINEAR_OPS, out_dir, timeout)
            command = ("onnxruntime.quantization.quantize_static(QDQ, per_channel, QInt8 activations and weights, "
                       "symmetric, MinMax, op_types_to_quantize=MatMul/Gemm/Conv)")
        else:
            out = out_dir / f"ours-{key}.onnx"
            cmd = [sys.executable, "-m", "segquant_onnx", "quantize", str(case.onnx_path), "--calib",
                   str(case.calib_path), "-o", str(out), "--no-eval", "--force", "-q",
                   "--report", str(out_dir / f"ours-{key}.json"), *method.args]
            run = finish(cmd, out, out_dir / f"ours-{key}.log", timeout)
            command = " ".join(["segquant-onnx quantize model.onnx --calib calib.npz -o out.onnx --no-eval",
                                *method.args])
        if run is None:
            runs[key] = {"path": None, "error": "ModelOpt could not be installed (see the log above)"}
        else:
            runs[key] = {"path": str(run.output), "seconds": run.seconds, "peak_rss_mib": run.peak_rss_mib,
                         "error": run.error, "command": command.strip()}
        record.write_text(json.dumps(runs[key], indent=1))
        log.info("%s: %s", method.label, runs[key]["error"] or f"{runs[key]['seconds']:.0f} s")
    return runs


def modelopt_python(args) -> Path | None:
    if args.modelopt_python is not None:
        return args.modelopt_python
    from benchkit.results import BenchState
    from benchkit.runners import ensure_modelopt_venv

    return ensure_modelopt_venv(args.work_dir, BenchState())


# ---------------------------------------------------------------------------------------------------------
# sample: the package's own TerrainGenerator on every model

def load_package(wheel: Path):
    """The terrain package's ``TerrainGenerator``, imported from its (pure-Python) wheel."""
    sys.path.insert(0, str(wheel))
    from terrain_diffusion import TerrainGenerator

    return TerrainGenerator


def sample(generator_cls, model_path: str, seeds: list[int], difficulty: int, sources: dict | None) -> dict:
    """Per seed: ``generate`` (heights and the raw model output) and, from ``sources[seed]`` (the FP32 terrain;
    None: this is the FP32 run, its own terrain), ``generate_from`` at every CURVE_STRENGTHS."""
    from tqdm import tqdm

    from benchkit.measure import has_float8, make_session

    if has_float8(Path(model_path)):
        class Float8Generator(generator_cls):
            """The package's generator on the benchmark's FP8 session (benchkit.measure.FP8_SESSION: ONNX
            Runtime's CPU Q/DQ fusions take 8-bit integers only); the package's own is ORT_ENABLE_ALL."""

            @staticmethod
            def _create_session(path, device):
                return make_session(Path(path)), "cpu"

        generator_cls = Float8Generator
    gen = generator_cls(model=model_path, device="cpu")
    raw: list[np.ndarray] = []
    denoise = gen._denoise  # observed, not changed: the model-space output each sampler call returns

    def recording(*a, **k):
        out = denoise(*a, **k)
        raw.append(out.copy())
        return out

    gen._denoise = recording
    result = {}
    with tqdm(total=len(seeds) * (1 + len(CURVE_STRENGTHS)), desc=Path(model_path).stem, leave=False) as bar:
        for seed in seeds:
            heights = gen.generate(1, difficulty=difficulty, seed=seed)[0]
            entry = {"generate": heights, "generate_raw": raw[-1], "curve": [], "curve_raw": []}
            bar.update()
            source = heights if sources is None else sources[seed]
            for strength in CURVE_STRENGTHS:
                entry["curve"].append(gen.generate_from(source, difficulty=difficulty, strength=strength,
                                                        seed=VARIATION_SEED + seed)[0])
                entry["curve_raw"].append(raw[-1])
                bar.update()
            result[seed] = entry
    return result


def measure(ref: dict, got: dict, seeds: list[int]) -> dict:
    """Metrics of one method's samples against FP32's (same seeds, same inputs)."""
    gen = [tr.compare(ref[s]["generate"], got[s]["generate"]) for s in seeds]
    k = CURVE_STRENGTHS.index(VARIATION_STRENGTH)
    var = [tr.compare(ref[s]["curve"][k], got[s]["curve"][k]) for s in seeds]
    curve = {"sqnr_db": [], "psnr_db": [], "ssim": []}
    for i in range(len(CURVE_STRENGTHS)):
        curve["sqnr_db"].append(tr.mean_finite(tr.output_sqnr(ref[s]["curve_raw"][i], got[s]["curve_raw"][i])
                                               for s in seeds))
        pairs = [tr.compare(ref[s]["curve"][i], got[s]["curve"][i]) for s in seeds]
        curve["psnr_db"].append(tr.mean_finite(p["psnr_db"] for p in pairs))
        curve["ssim"].append(tr.mean_finite(p["ssim"] for p in pairs))
    return {"generate": {"psnr_db": tr.mean_finite(g["psnr_db"] for g in gen),
                         "ssim": tr.mean_finite(g["ssim"] for g in gen),
                         "psnr_db_per_seed": [g["psnr_db"] for g in gen], "ssim_per_seed": [g["ssim"] for g in gen],
                         "output_sqnr_db_per_seed": [tr.output_sqnr(ref[s]["generate_raw"], got[s]["generate_raw"])
                                                     for s in seeds]},
            "variation": {"strength": VARIATION_STRENGTH, "psnr_db": tr.mean_finite(v["psnr_db"] for v in var),
                          "ssim": tr.mean_finite(v["ssim"] for v in var)},
            "curve": curve}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.work_dir = args.work_dir.resolve()
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchkit.real import linear_flop_share, load_real_models

    real = load_real_models()
    try:
        info = real.prepare("terrain", args.work_dir)
        wheel = real.fetch_wheel(real.REAL_MODELS["terrain"], args.work_dir / "real" / "wheels")
    except (real.FetchError, ImportError) as exc:
        print(f"terrain_demo.py: {exc}", file=sys.stderr)
        return 2
    runs = quantize_all(args, info)
    generator_cls = load_package(wheel)
    seeds, samples = list(args.seeds), {}
    started = time.perf_counter()
    for key in args.method_names:
        if runs[key]["error"]:
            continue
        log.info("%s: sampling %d seeds", METHODS[key].label, len(seeds))
        sources = None if key == "fp32" else {s: samples["fp32"][s]["generate"] for s in seeds}
        samples[key] = sample(generator_cls, runs[key]["path"], seeds, args.difficulty, sources)
    feed = dict(np.load(info["eval_path"]))
    feed = {k: v[:1] for k, v in feed.items()}
    metrics = {"model": info["package"], "wheel_sha256": info["wheel_sha256"], "difficulty": args.difficulty,
               "seeds": seeds, "curve_strengths": list(CURVE_STRENGTHS),
               "curve_sigmas": [real.strength_sigma(s) for s in CURVE_STRENGTHS], "reference": METHODS["fp32"].label,
               "sampling_seconds": time.perf_counter() - started, "methods": {}}
    for key in args.method_names:
        m, run = METHODS[key], runs[key]
        entry = {k: run.get(k) for k in ("seconds", "peak_rss_mib", "error", "command")}
        entry["rest"] = m.rest
        if not run["error"] and key != "fp32":
            entry.update(measure(samples["fp32"], samples[key], seeds))
            entry["int8_flop_share"], entry["int8_nodes"], entry["linear_nodes"] = linear_flop_share(
                Path(run["path"]), feed)
        metrics["methods"][m.label] = entry
    write_outputs(args, metrics, samples, seeds)
    return 0


def write_outputs(args, metrics: dict, samples: dict, seeds: list[int]) -> None:
    from segquant_onnx.ir.outputs import write_text_atomic

    args.docs.mkdir(parents=True, exist_ok=True)
    k = CURVE_STRENGTHS.index(VARIATION_STRENGTH)
    # noise-like variation tiles barely compress: the grid shows them for the first GRID_VARIATIONS seeds only
    var_seeds = seeds[:GRID_VARIATIONS]
    columns = [f"seed {s}: generate" for s in seeds] + [f"seed {s}: from, {VARIATION_STRENGTH:g}" for s in var_seeds]
    tiles, captions, curves = {}, {}, {}
    ref = samples["fp32"]
    for key in args.method_names:
        label = METHODS[key].label
        if key not in samples:  # a quantizer that failed or timed out: a grey row that says so
            tiles[label] = [np.full((tr.TILE, tr.TILE, 3), 225, np.uint8)] * len(columns)
            captions[label] = [metrics["methods"][label]["error"][:22]] + [""] * (len(columns) - 1)
            continue
        tiles[label] = ([tr.shade(samples[key][s]["generate"], ref[s]["generate"]) for s in seeds]
                        + [tr.shade(samples[key][s]["curve"][k], ref[s]["curve"][k]) for s in var_seeds])
        if key == "fp32":
            captions[label] = [f"top {ref[s]['generate'].max():.2f} m" for s in seeds] + [
                f"top {ref[s]['curve'][k].max():.2f} m" for s in var_seeds]
            continue
        m = metrics["methods"][label]
        captions[label] = [f"PSNR {tr.fmt(v, '.1f')}" for v in m["generate"]["psnr_db_per_seed"]] + [
            f"PSNR {tr.fmt(tr.compare(ref[s]['curve'][k], samples[key][s]['curve'][k])['psnr_db'], '.1f')}"
            for s in var_seeds]
        curves[label] = m["curve"]
    tr.save_png(tr.grid_image(tiles, captions, columns), args.docs / "terrain_grid.png")
    if curves:
        tr.write_curve(args.docs / "terrain_step_error.png", metrics["curve_sigmas"], curves)
    write_text_atomic(args.docs / "terrain_metrics.json", json.dumps(metrics, indent=1, default=float))
    if not args.no_readme:
        write_text_atomic(args.readme, tr.rewrite_table(args.readme.read_text(), metrics))
    print("\n".join([tr.TABLE_HEADER, "|" + "---|" * tr.TABLE_HEADER.count(" | ") + "---|", *tr.table_rows(metrics)]))
    log.info("wrote terrain_grid.png, terrain_step_error.png and terrain_metrics.json to %s", args.docs)


if __name__ == "__main__":
    sys.exit(main())
