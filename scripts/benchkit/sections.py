"""The extra sections, on the models that have them: per-layer SQNR with and without SegLinear, ONNX
Runtime CPU latency, and the demo DiT's images against FP32."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchkit.cases import DATA_DIR, ModelCase, iter_samples
from benchkit.launch import first_line
from benchkit.results import BenchState, SkipNote

log = logging.getLogger("bench")

PER_LAYER_MODELS = ("example", "demo", "flux-dynamo", "pixart-dynamo")  # per-layer SQNR, naive INT8 vs +SegLinear
LATENCY_MODELS = ("demo", "flux-dynamo")
LATENCY_METHODS = ("FP32 reference", "naive INT8", "default", "+DualScale all", "+outliers auto",
                   "best preset")
LATENCY_RUNS, LATENCY_WARMUP = 30, 5
IMAGE_MODELS = ("demo",)
IMAGE_METHODS = ("naive INT8", "default", "+SmoothQuant auto")  # demo DiT images vs FP32
IMAGE_SEEDS, IMAGE_STEPS = (0, 1), 20


def timeable(row) -> bool:
    """Whether the latency section times this row: the FP32 reference or INT8 with an fp32 rest. ONNX
    Runtime's CPU has no FP8 GEMM (an FP8 graph's Q/DQ run as float ops) and few fp16 kernels (it casts to
    float around the others), so those timings would describe nothing TensorRT runs."""
    return row.precision in ("fp32", "int8") and row.high_precision == "fp32"


def readable_names(onnx_path: Path) -> dict[str, str]:
    """Node name -> the PyTorch module it came from (dynamo exports record it in metadata_props
    ``pkg.torch.onnx.name_scopes``); TorchScript node names already read as module paths."""
    import ast

    import onnx

    names = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                chain = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                continue
            if len(chain) >= 2 and chain[-2]:
                names[node.name] = chain[-2]
    return names


def per_layer_section(case: ModelCase, state: BenchState) -> None:
    """Per-layer SQNR of naive INT8 and +SegLinear (``segquant_onnx.analysis.compare.compare_models(per_layer=True)``,
    i.e. ``layer_error.per_layer_error`` on the canonical float graph, as ``quantize --per-layer`` does)."""
    from segquant_onnx.analysis.compare import compare_models

    naive, seg = state.row(case.name, "naive INT8"), state.row(case.name, "+SegLinear")
    if naive is None or seg is None or naive.error or seg.error:
        state.notes.append(SkipNote(f"{case.name} / per-layer SQNR", "skipped: naive INT8 or +SegLinear failed"))
        return
    log.info("%s: per-layer SQNR, naive INT8 vs +SegLinear ...", case.name)
    layers = {}
    for row in (naive, seg):
        result = compare_models(case.onnx_path, row.output, case.eval_path, per_layer=True, progress=False)
        layers[row.method] = {entry["layer"]: entry["sqnr_db"] for entry in result["layers"]}
    stats = {}
    for method, values in layers.items():
        finite = np.array([v for v in values.values() if math.isfinite(v)])
        stats[method] = {"layers": len(values), "infinite": len(values) - len(finite),
                         "min": float(finite.min()), "median": float(np.median(finite)),
                         "mean": float(finite.mean()),
                         "output_sqnr": (naive if method == "naive INT8" else seg).sqnr_db}
    names = readable_names(case.onnx_path)
    sites = []
    for segment in (seg.report or {}).get("segments", []):
        layer = segment["linear"]
        a, b = layers["naive INT8"].get(layer), layers["+SegLinear"].get(layer)
        sites.append({"layer": layer, "module": names.get(layer), "kind": segment["kind"],
                      "sizes": list(segment["sizes"]), "via": segment["via"], "naive": a, "seglinear": b})
    state.per_layer.append({"model": case.name, "stats": stats, "sites": sites, "layers": layers})


def latency_section(case: ModelCase, state: BenchState) -> None:
    """ONNX Runtime CPU latency of the LATENCY_METHODS rows, in this one process:
    one feed (the first eval sample), every session warmed up, then LATENCY_RUNS rounds that run every
    model once each in turn (so load changes hit all of them alike); the median per model."""
    import onnxruntime as ort

    rows = [state.row(case.name, m) for m in LATENCY_METHODS]
    rows = [r for r in rows if r is not None and r.error is None and r.output is not None and timeable(r)]
    # not timed, on purpose (render.py's latency text says why): listed so the report can say so
    skipped = [r.method for r in state.rows if r.model == case.name and not timeable(r)]
    if not any(r.method == "naive INT8" for r in rows):
        state.notes.append(SkipNote(f"{case.name} / latency", "skipped: naive INT8 failed"))
        return
    log.info("%s: ONNX Runtime CPU latency of %s ...", case.name, ", ".join(r.method for r in rows))
    feed = next(iter_samples(case.eval_path))
    sessions = {}
    for row in rows:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sessions[row.method] = ort.InferenceSession(str(row.output), opts, providers=["CPUExecutionProvider"])
    for session in sessions.values():
        for _ in range(LATENCY_WARMUP):
            session.run(None, feed)
    times = {m: [] for m in sessions}
    for _ in range(LATENCY_RUNS):
        for method, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[method].append(time.perf_counter() - start)
    median = {m: float(np.median(t)) * 1e3 for m, t in times.items()}
    spread = {m: (float(np.percentile(t, 25)) * 1e3, float(np.percentile(t, 75)) * 1e3) for m, t in times.items()}
    state.latency.append({"model": case.name, "median_ms": median, "iqr_ms": spread, "not_timed": skipped,
                          "dualscale_extra_flop_pct": {r.method: r.dualscale_extra_flop_pct for r in rows},
                          "outlier_float_flop_pct": {r.method: r.outlier_float_flop_pct for r in rows},
                          "int8_flop_pct": {r.method: None if r.int8_flop_fraction is None else
                                            100 * r.int8_flop_fraction for r in rows}})


def image_section(case: ModelCase, state: BenchState) -> None:
    """Demo DiT images: FP32 vs IMAGE_METHODS, sampled from the same noise (``segquant-onnx demo``'s
    functions: rectified-flow Euler through ONNX Runtime, one thread), PSNR/SSIM vs the FP32 images."""
    from segquant_onnx.diffusion.demo import DEMO_CONDS, sample_all, to_unit
    from segquant_onnx.diffusion.image_metrics import psnr, ssim
    from segquant_onnx.diffusion.sampling import initial_noise, onnx_transformer

    rows = [state.row(case.name, m) for m in IMAGE_METHODS]
    rows = [r for r in rows if r is not None and r.error is None]
    if not rows:
        state.notes.append(SkipNote(f"{case.name} / images", "skipped: no quantized model"))
        return
    log.info("%s: sampling images with FP32, %s ...", case.name, ", ".join(r.method for r in rows))
    with np.load(DATA_DIR / DEMO_CONDS) as npz:
        conds = {k: npz[k] for k in ("encoder_hidden_states", "pooled_projections")}
    classes = list(range(len(conds["pooled_projections"])))
    transformers = {"FP32": onnx_transformer(case.onnx_path)}
    transformers.update({r.method: onnx_transformer(r.output) for r in rows})
    shape = transformers["FP32"].inputs["hidden_states"]
    latents = np.concatenate([initial_noise(s, [1, *shape[1:]]) for s in IMAGE_SEEDS for _ in classes])
    cond = {k: np.concatenate([v[c:c + 1] for _ in IMAGE_SEEDS for c in classes]) for k, v in conds.items()}
    results = sample_all(transformers, latents, cond, IMAGE_STEPS)
    fp = to_unit(results["FP32"]["latents"][:, 0])
    methods = {}
    for row in rows:
        q = to_unit(results[row.method]["latents"][:, 0])
        psnrs, ssims = [psnr(a, b) for a, b in zip(fp, q)], [ssim(a, b) for a, b in zip(fp, q)]
        methods[row.method] = {"psnr_db": float(np.mean(psnrs)), "psnr_db_min": float(np.min(psnrs)),
                               "ssim": float(np.mean(ssims)), "ssim_min": float(np.min(ssims)),
                               "mean_step_sqnr_db": float(np.mean(results[row.method]["same_input"])),
                               "output_sqnr_db": row.sqnr_db}
    state.images.append({"model": case.name, "classes": len(classes), "seeds": list(IMAGE_SEEDS),
                         "steps": IMAGE_STEPS, "methods": methods})


# (section name, function, the models it runs on), in the order they run after a model's rows
SECTIONS = (("per-layer SQNR", per_layer_section, PER_LAYER_MODELS),
            ("latency", latency_section, LATENCY_MODELS),
            ("demo images", image_section, IMAGE_MODELS))


def run_section(name: str, fn: Callable, case: ModelCase, state: BenchState) -> None:
    start = time.perf_counter()
    try:
        fn(case, state)
    except Exception as exc:
        log.exception("%s: %s failed", case.name, name)
        state.notes.append(SkipNote(f"{case.name} / {name}", f"FAILED: {type(exc).__name__}: {first_line(str(exc))}"))
    state.section_seconds[name] = state.section_seconds.get(name, 0.0) + time.perf_counter() - start
