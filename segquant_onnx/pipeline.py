"""The pipeline: load -> canonicalize -> plan -> calibrate -> solve -> rewrite -> finalize -> save + report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from segquant_onnx import __version__
from segquant_onnx.calib.data import model_inputs, open_calibration
from segquant_onnx.calib.calibrate import calibrate
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.config import QuantConfig
from segquant_onnx.errors import UserError
from segquant_onnx.analysis.evaluate import OutputError, compare_outputs
from segquant_onnx.ir.finalize import finalize
from segquant_onnx.analysis.layer_error import per_layer_error
from segquant_onnx.ir.graph_io import constant_values, export_model, load_model, model_size, save_model
from segquant_onnx.passes import DualScaleActivations, QuantizeLinearInputs, SplitLinearBySegment
from segquant_onnx.plan import QuantPlan
from segquant_onnx.params import Quantization
from segquant_onnx.rewrite import apply_quantization
from segquant_onnx.ir.outputs import check_outputs, markdown_path, model_output, report_output
from segquant_onnx.report.render import site_rows, write_json, write_markdown
from segquant_onnx.ir.runtime import check_providers, make_session, temporary_directory
from segquant_onnx.analysis.outlier_search import per_site_outliers
from segquant_onnx.analysis.sensitivity import GatedModel, gate_name, greedy_fallback, rank_sensitivity
from segquant_onnx.ir.linear import input_channels
from segquant_onnx.params import SiteParams
from segquant_onnx.solve.solver import choose_outliers, solve, solve_dual
from segquant_onnx.tensorrt.check import check_tensorrt

log = logging.getLogger(__name__)


@dataclass
class Result:
    model: onnx.ModelProto
    plan: QuantPlan
    params: dict[str, SiteParams]
    report: dict
    output_path: Path | None


@dataclass
class _Source:
    graph: gs.Graph
    path: Path | None
    source_dir: str | None
    size: int
    description: str
    uses_external_data: bool = False
    files: tuple[Path, ...] = ()


def _bar(items, desc: str, unit: str, progress: bool, total: int | None = None):
    """A progress bar over `items`, cleared when done (on a terminal only)."""
    return tqdm(items, desc=desc, unit=unit, total=total, disable=None if progress else True, leave=False)


class _HeldBack:
    """Output SQNR of candidate quantized graphs on held-back calibration feeds (a bar per feed with
    `progress`: each is one run of the whole model)."""

    def __init__(self, fp_model, feeds, src, providers, tmp, progress: bool):
        self.feeds, self.src, self.providers, self.tmp, self.progress = feeds, src, providers, tmp, progress
        session = make_session(fp_model, src.source_dir, providers, tmp)
        self.reference = [session.run(None, f) for f in _bar(feeds, "held-back reference", "feed", progress)]

    def score(self, graph: gs.Graph, plan: QuantPlan, q: Quantization, config: QuantConfig) -> float:
        """The held-back SQNR of `graph` (left as it is) quantized as `q` says."""
        candidate = graph.copy()
        apply_quantization(candidate, plan, q, config)
        return self.sqnr(candidate)

    def sqnr(self, graph: gs.Graph) -> float:
        session = make_session(export_model(graph.cleanup().toposort()), self.src.source_dir, self.providers, self.tmp)
        err = OutputError()
        for feed, ref in _bar(list(zip(self.feeds, self.reference)), "scoring held-back feeds", "feed", self.progress):
            for r, got in zip(ref, session.run(None, feed)):
                err.update(r, got)
        return err.sqnr


def _solve_all(graph, plan, cal, weight, config, outliers, progress: bool) -> Quantization:
    """Decide (method, alpha, DualScale) on the fit statistics, scored on held-back rows."""
    params = solve(plan, cal.fit_stats, weight, config, cal.samples, outliers, progress=progress)
    dual, decisions = solve_dual(plan, cal.fit_stats, cal.samples, params, weight, config, outliers, progress=progress)
    return Quantization(params, dual, outliers, decisions)


def _final(plan, cal, weight, config, q: Quantization, progress: bool) -> Quantization:
    """The same decisions, with scales from every calibration feed (held-back ones included)."""
    if cal.fit_stats is cal.stats:
        return q
    params = solve(plan, cal.stats, weight, config, cal.samples, q.outliers, chosen=q.params, progress=progress)
    dual, _ = solve_dual(plan, cal.stats, cal.samples, params, weight, config, q.outliers, decided=q.decisions,
                         progress=progress)
    return Quantization(params, dual, q.outliers, q.decisions, q.floating)


def _channel_axes(plan: QuantPlan) -> dict[str, int]:
    """Axis 1 for tensors only Convs read (their input channels), the default last axis otherwise."""
    readers: dict[str, set[str]] = {}
    for site in plan.sites:
        readers.setdefault(site.activation, set()).add(site.op)
    return {name: 1 for name, ops in readers.items() if ops == {"Conv"}}


def _decide(graph, plan, cal, weight, config, held: _HeldBack | None, progress):
    """Per-site decisions (solve), then the global choices checked at the model output on held-back
    feeds: the outlier-channel cap (`auto`), whether SmoothQuant's per-site choices (`auto`, scored on
    layer error, which can mislead) beat no smoothing at all, and whether DualScale's (`auto`) pay for
    their second GEMMs: they must beat the best variant without them by `dualscale_min_output_gain_db`.
    With `--outlier-channels auto`, each site's outlier count is then chosen at the output too."""
    pick = lambda cap: choose_outliers(plan, cal.fit_stats, cap, config.outlier_ratio, config.outlier_max_flop_pct)  # noqa: E731
    caps = (config.outlier_candidates if config.outlier_channels == "auto" else
            (0,) if config.outlier_channels == "off" else (int(config.outlier_channels),))
    variants = [config]
    if config.smoothquant == "auto":
        variants += [replace(v, smoothquant="off") for v in variants]
    if config.dualscale == "auto" and plan.dual:
        variants += [replace(v, dualscale="off") for v in variants]
    if held is None or (len(caps) == 1 and len(variants) == 1):
        return _solve_all(graph, plan, cal, weight, config, pick(caps[0]), progress), [], None
    trials, scored, seen = [], [], set()
    # a trial skipped as a repeat counts as done
    with _bar(None, "checking choices", "trial", progress, total=len(caps) * len(variants)) as bar:
        for cap in caps:
            outliers = pick(cap)
            key = tuple(sorted((k, tuple(v)) for k, v in outliers.items()))
            if key in seen:
                bar.update(len(variants))
                continue  # the same channels as a smaller cap
            seen.add(key)
            applied_none = {}  # smoothquant setting -> its DualScale-auto variant applied no DualScale site
            for variant in variants:
                if variant.dualscale == "off" and applied_none.get(variant.smoothquant):
                    bar.update()
                    continue  # the same quantization as that variant: nothing to score twice
                q = _solve_all(graph, plan, cal, weight, variant, outliers, progress)
                applied_none[variant.smoothquant] = not q.dual
                score = held.score(graph, plan, q, variant)
                trials.append({"outlier_cap": cap, "outlier_channels": sum(map(len, outliers.values())),
                               "smoothquant": variant.smoothquant, "dualscale": variant.dualscale,
                               "dual_sites": len(q.dual), "heldback_sqnr_db": round(score, 3)})
                scored.append((score, q, variant))
                bar.update()
    best = max(scored, key=lambda t: t[0])
    single = [t for t in scored if not t[1].dual]
    if best[1].dual and single:
        plain = max(single, key=lambda t: t[0])
        if best[0] - plain[0] < config.dualscale_min_output_gain_db:
            best = plain  # DualScale's extra GEMMs do not pay at the output
    search = None
    if config.outlier_channels == "auto":
        best, search = _outliers_per_site(graph, plan, cal, weight, held, caps, best, trials, progress)
    return best[1], trials, search


def _outliers_per_site(graph, plan, cal, weight, held: _HeldBack, caps, best, trials, progress):
    """Refine the best global-cap trial: each site's outlier count chosen at the model output
    (outlier_search), kept if the real quantized graph scores at least as well on the held-back feeds."""
    score, q, variant = best
    by_cap = {cap: choose_outliers(plan, cal.fit_stats, cap, variant.outlier_ratio, 100.0) for cap in caps}
    solve_for = lambda outliers: _solve_all(graph, plan, cal, weight, variant, outliers, progress)  # noqa: E731
    open_session = lambda model: make_session(model, held.src.source_dir, held.providers, held.tmp)  # noqa: E731
    search = per_site_outliers(graph, plan, variant, held.feeds, held.reference, by_cap, solve_for, q.outliers,
                               open_session, progress)
    if search is None:
        return best, None
    refined = solve_for(search.outliers)
    refined_score = held.score(graph, plan, refined, variant)
    channels = lambda outliers: sum(map(len, outliers.values()))  # noqa: E731
    trials.append({"outlier_cap": "per-site", "outlier_channels": channels(search.outliers),
                   "smoothquant": variant.smoothquant, "dualscale": variant.dualscale,
                   "dual_sites": len(refined.dual), "heldback_sqnr_db": round(refined_score, 3),
                   "analysis_sqnr_db": round(search.heldback_sqnr_db, 3)})
    log.info("per-site outlier channels: %.2f dB on the held-back feeds (analysis graph %.2f dB), global cap %.2f dB",
             refined_score, search.heldback_sqnr_db, score)
    # as within a site: fewer float channels win when they cost less than outlier_min_gain_db
    fewer = channels(search.outliers) < channels(q.outliers)
    if refined_score >= score or (fewer and refined_score >= score - variant.outlier_min_gain_db):
        return (refined_score, refined, variant), search
    return best, search


def _analyse(graph, plan, q: Quantization, held_back, config, src, providers, tmp, progress):
    """Sensitivity ranking and (with a target) the fallback set, at the model output on held-back feeds."""
    analysis = graph.copy()
    gates = {s.name: gs.Variable(gate_name(s.name), np.float32, shape=[]) for s in plan.sites}
    analysis.inputs.extend(gates.values())
    apply_quantization(analysis, plan, q, config, gates=gates)
    session = make_session(export_model(analysis.cleanup().toposort()), src.source_dir, providers, tmp)
    model = GatedModel(session, held_back, list(plan.sites))
    ranking = rank_sensitivity(model, progress)
    fallback = None
    if config.target_sqnr is not None:
        fallback = greedy_fallback(model, ranking, config.target_sqnr, config.max_fallback_pct)
    return ranking, fallback


def _open(model) -> _Source:
    if isinstance(model, onnx.ModelProto):
        return _Source(gs.import_onnx(model), None, None, model.ByteSize(), "the model")
    loaded = load_model(model)
    return _Source(loaded.graph, loaded.path, str(loaded.path.parent), loaded.size_bytes, str(loaded.path),
                   loaded.uses_external_data, loaded.files)


def build_plan(graph: gs.Graph, config: QuantConfig) -> QuantPlan:
    """Detect with every pass, applying the structural rewrites that are exact in float (SegLinear)
    on the way, so the sites are those of the graph that will be quantized. Mutates `graph`."""
    seg = SplitLinearBySegment(config.seg_output, config.seg_input, config.seg_heads)
    matches, seg_declined = seg.detect(graph)
    segments = seg.rewrite(graph, matches)
    sites, declined = QuantizeLinearInputs(config.exclude).detect(graph)
    dual, dual_declined = ([], []) if config.dualscale == "off" else DualScaleActivations().detect(graph, sites)
    return QuantPlan(sites=tuple(sites), declined=tuple(seg_declined + declined + dual_declined),
                     segments=tuple(segments), dual=tuple(dual))


def inspect_model(model, config: QuantConfig = QuantConfig()) -> QuantPlan:
    src = _open(model)
    return build_plan(canonicalize(src.graph, src.description), config)


def quantize(model, calib, config: QuantConfig = QuantConfig(), *, output=None, force: bool = False,
             eval_data=None, report_path=None, progress: bool = True, evaluate: bool = True) -> Result:
    """Quantize `model` (path or ModelProto) with calibration data `calib` (see calib_data).

    Writes `output` (atomically) when given. Output error is measured against the floating-point
    graph on `eval_data`, or on the calibration data when it can be read twice; `evaluate=False`
    skips that measurement (no float and quantized evaluation sessions: less time and memory).
    """
    started = time.perf_counter()
    providers = check_providers(config.providers)
    src = _open(model)
    check_outputs([o for o in (output and model_output(output), report_path and report_output(report_path)) if o],
                  [*src.files, *(p for p in (calib, eval_data) if isinstance(p, (str, os.PathLike)))], force)
    if not evaluate and (eval_data is not None or config.per_layer):
        raise UserError("--no-eval skips the output-error measurement: drop --eval/--per-layer/--plot, or --no-eval.")

    graph = canonicalize(src.graph, src.description)
    fp_model = export_model(graph)  # the reference: canonical, before any rewrite
    plan = build_plan(graph, config)
    if not plan.sites and not config.dry_rewrite and not config.allow_unquantized:
        raise UserError(plan.nothing_to_quantize(src.description))
    inputs = model_inputs(graph)
    data = open_calibration(calib, inputs, config.batch_size)
    evaluation = None if eval_data is None else open_calibration(eval_data, inputs, config.batch_size, role="eval")

    with temporary_directory() as tmp:
        q, ranking, fallback, trials, search = Quantization({}, {}, {}), [], None, [], None
        if not config.dry_rewrite:
            sites = {s.name: s for s in plan.sites}
            searching = config.smoothquant != "off" or config.calib_method == "auto" or config.outlier_channels != "off"
            analysing = (config.sensitivity or config.target_sqnr is not None or config.outlier_channels == "auto"
                         or config.smoothquant == "auto" or (config.dualscale == "auto" and bool(plan.dual)))
            sampled = tuple(dict.fromkeys(
                [s.activation for s in plan.sites if s.channels_last and searching]
                + [sites[d.site].activation for d in plan.dual if sites[d.site].channels_last]))
            cal = calibrate(graph, plan.observed_tensors, data, source_dir=src.source_dir,
                            providers=providers, tmp_dir=tmp, progress=progress,
                            sampled=sampled, sample_rows=config.sample_rows,
                            holdout_every=config.holdout_every if (sampled or analysing) else 0,
                            keep_held_back=config.max_holdout_feeds if analysing else 0,
                            channel_axes=_channel_axes(plan))
            needs_holdout = config.sensitivity or config.target_sqnr is not None or config.outlier_channels == "auto"
            if analysing and not cal.held_back and not needs_holdout:  # only the auto checks wanted it
                log.warning("fewer than %d calibration feeds: no held-back feeds to check the auto choices at the "
                            "output: SmoothQuant is left off, DualScale decided per layer", config.holdout_every)
                config, analysing = replace(config, smoothquant="off"), False
            if analysing and not cal.held_back:
                raise UserError(f"Sensitivity, --target-sqnr and the auto choices hold back every "
                                f"{config.holdout_every}th calibration feed; give at least {config.holdout_every} "
                                "feeds in the calibration data.")
            held = _HeldBack(fp_model, cal.held_back, src, providers, tmp, progress) if analysing else None
            weights = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
            weight = lambda name: constant_values(weights[name])  # noqa: E731
            q, trials, search = _decide(graph, plan, cal, weight, config, held, progress)
            if config.sensitivity or config.target_sqnr is not None:
                ranking, fallback = _analyse(graph, plan, q, cal.held_back, config, src, providers, tmp, progress)
                if fallback:
                    q.floating = frozenset(fallback.sites)
                    q.outliers = {k: v for k, v in q.outliers.items() if k not in q.floating}
            q = _final(plan, cal, weight, config, q, progress)
            q.dual = {k: v for k, v in q.dual.items() if k not in q.floating}
            apply_quantization(graph, plan, q, config)
        quantized = finalize(graph, calibration_shapes=None if config.dry_rewrite else cal.feed_shapes)
        trt_violations = check_tensorrt(quantized, src.source_dir)

        if evaluation is None and data.num_feeds is not None and evaluate:
            evaluation = data
        errors, layers = {}, {}
        if evaluation is not None:
            errors = compare_outputs(make_session(fp_model, src.source_dir, providers, tmp),
                                     make_session(quantized, src.source_dir, providers, tmp),
                                     evaluation, progress=progress, total=evaluation.num_feeds)
            if config.per_layer:
                layers = per_layer_error(fp_model, quantized, evaluation, source_dir=src.source_dir,
                                         providers=providers, tmp_dir=tmp, progress=progress,
                                         total=evaluation.num_feeds)

    plan_flops = {site.name: site.flops for site in plan.sites}
    outlier_ranges = {}
    by_name = {site.name: site for site in plan.sites}
    if q.outliers:
        for name, idx in q.outliers.items():
            amax = cal.stats[by_name[name].activation].channel_amax
            keep = np.ones(amax.size, bool)
            keep[idx] = False
            outlier_ranges[name] = {"channel_amax": [round(float(a), 6) for a in amax[idx]],
                                    "bulk_amax": round(float(amax[keep].max(initial=0)), 6)}
    report = {
        "tool": f"segquant-onnx {__version__}",
        "input": str(src.path) if src.path else None,
        "output": str(output) if output is not None else None,
        "config": asdict(config),
        "calibration_data": data.description,
        "eval_data": evaluation.description if evaluation is not None else None,
        "sites": site_rows(plan, q.params, q.floating),
        "declined": [asdict(d) for d in plan.declined],
        "segments": [asdict(m) for m in plan.segments],
        "dualscale": [{**asdict(d), "apply": d.site in q.dual} for d in q.decisions],
        "heldback_trials": trials,
        "outliers": {
                     "sites": {name: idx.tolist() for name, idx in q.outliers.items()},
                     "per_site_search": search.trials if search else [],
                     "ranges": outlier_ranges,
                     "float_flop_pct": round(100 * sum(plan_flops[n] * len(i) / input_channels(by_name[n])
                                                       for n, i in q.outliers.items()) / max(plan.total_flops, 1), 3)},
        "sensitivity": [asdict(r) for r in ranking],
        "fallback": asdict(fallback) if fallback else None,
        "summary": {
            "sites_quantized": 0 if config.dry_rewrite else len(plan.sites) - len(fallback.sites if fallback else ()),
            "segment_rewrites": len(plan.segments),
            "dualscale_candidates": len(plan.dual),
            "dualscale_applied": len(q.dual),
            "dualscale_extra_flop_pct": round(100 * sum(plan_flops[n] for n in q.dual) / max(plan.total_flops, 1), 3),
            "outlier_sites": len(q.outliers),
            "outlier_channels": int(sum(len(i) for i in q.outliers.values())),
            "sites_declined": len(plan.declined),
            "int8_flop_fraction": (0.0 if not plan.sites or config.dry_rewrite else
                                   fallback.int8_flop_fraction if fallback else 1.0),
            "size_before": src.size,
            "size_after": model_size(quantized),
        },
        "output_error": {name: e.to_dict() for name, e in errors.items()},
        "layer_error": [{"layer": name, **e.to_dict()} for name, e in layers.items()],
        "tensorrt_check": [asdict(v) for v in trt_violations],
        "seconds": round(time.perf_counter() - started, 2),
    }
    out_path = None
    if output is not None:
        out_path = save_model(quantized, output, source_dir=src.source_dir,
                              external=True if src.uses_external_data else None)
    if report_path is not None:
        write_json(report, report_path)
        write_markdown(report, markdown_path(report_path))
    return Result(quantized, plan, q.params, report, out_path)

