"""Report: what was quantized how, what was declined and why, sizes, and the measured error."""

from __future__ import annotations

import json
from collections import Counter
import math
import os

from segquant_onnx.ir.outputs import write_atomic, write_text_atomic
from segquant_onnx.plan import QuantPlan
from segquant_onnx.solve.low_rank import low_rank_flops
from segquant_onnx.params import SiteParams


def site_rows(plan: QuantPlan, params: dict[str, SiteParams] | None = None, floating=frozenset()) -> list[dict]:
    total = plan.total_flops or 1
    rows = []
    for s in plan.sites:
        row = {"name": s.name, "op": s.op, "weight_shape": list(s.weight_shape), "weight_axis": s.weight_axis,
               "flops": s.flops, "flop_share": round(s.flops / total, 6)}
        if s.name in floating:
            row["float"] = True  # kept in float by the fallback
        elif params and s.name in params:
            p = params[s.name]
            row.update(act_amax=p.act_amax, act_scale=p.act_scale, method=p.method, smooth_alpha=p.alpha,
                       layer_sqnr_db=p.layer_sqnr_db, gptq=p.rounded is not None)
            if p.low_rank is not None:
                r = p.low_rank[0].shape[1]
                k, n = p.low_rank[0].shape[0], p.low_rank[1].shape[1]
                row.update(low_rank=r, low_rank_flops=low_rank_flops(r, k, n, s.flops))
        rows.append(row)
    return rows


def _table(headers: list[str], rows: list[list], aligns: str) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, aligns))
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def format_plan(plan: QuantPlan, explain: bool = False) -> str:
    total = plan.total_flops or 1
    rows = [[s.name, s.op, "x".join(map(str, s.weight_shape)), f"{100 * s.flops / total:.1f}%"] for s in plan.sites]
    out = [f"{len(plan.sites)} linear sites", _table(["site", "op", "weight", "FLOPs"], rows, "llrr")]
    if plan.segments:
        out.append(f"\n{len(plan.segments)} SegLinear patterns (split so each segment has its own scales)")
        out.append(_table(["linear", "kind", "via", "segment sizes"],
                          [[m.linear, m.kind, m.via, "+".join(map(str, m.sizes))] for m in plan.segments], "llll"))
    if plan.dual:
        out.append(f"\n{len(plan.dual)} DualScale candidates (SiLU/GELU -> linear; applied where calibration shows a gain)")
        out.append(_table(["site", "activation"], [[d.site, d.kind] for d in plan.dual], "ll"))
    if plan.declined:
        out.append(f"\n{len(plan.declined)} declined")
        if explain:
            out.append(_table(["node", "op", "reason"], [[d.name, d.op, d.reason] for d in plan.declined], "lll"))
        else:
            out += [f"  {n} x {r}" for r, n in Counter(d.reason for d in plan.declined).items()]
            out.append("  (--explain lists each one)")
    return "\n".join(out)


def format_sensitivity(report: dict, top: int = 20) -> str:
    rows = report.get("sensitivity") or []
    total = sum(r["flops"] for r in rows) or 1
    table = _table(["site", "output SQNR dB (alone)", "FLOPs"],
                   [[r["site"], f"{r['output_sqnr_db']:.2f}", f"{100 * r['flops'] / total:.1f}%"] for r in rows[:top]],
                   "lrr")
    return f"{len(rows)} sites, most sensitive first (each quantized alone, held-back calibration feeds):\n{table}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_summary(report: dict) -> str:
    s = report["summary"]
    fmt = report.get("config", {}).get("precision", {}).get("format", "int8").upper()
    attention = report.get("attention") or {}
    lines = [
        f"SegLinear split {s['segment_rewrites']} linears into segments",
        f"quantized {s['sites_quantized']} linear sites ({100 * s['int8_flop_fraction']:.1f}% of linear FLOPs in "
        f"{fmt}), "
        f"declined {s['sites_declined']}",
        f"model size {_mb(s['size_before'])} -> {_mb(s['size_after'])}"
        + (f", linear weights {_mb(wb['before'])} -> {_mb(wb['after'])}" if (wb := s.get("weight_bytes")) else ""),
    ]
    if s.get("low_rank_sites"):
        lines.append(f"low-rank branches on {s['low_rank_sites']} sites "
                     f"(+{s['low_rank_extra_flop_pct']:.1f}% GEMM FLOPs in float)")
    if s.get("dualscale_candidates"):
        gains = [d["gain_db"] for d in report["dualscale"] if d["apply"]]
        lines.insert(1, f"DualScale on {s['dualscale_applied']} of {s['dualscale_candidates']} SiLU/GELU -> linear sites "
                        f"(+{s['dualscale_extra_flop_pct']:.1f}% GEMM FLOPs"
                        + (f", layer gain {min(gains):.1f} to {max(gains):.1f} dB)" if gains else ")"))
    if attention:
        lines.append(f"attention: {len(attention)} products (Q @ K^T, softmax @ V) quantized per tensor in {fmt}")
    skipped = Counter(d["reason"] for d in report["declined"] if d["name"] not in attention)
    lines += [f"  skipped {n} x {r}" for r, n in skipped.items()]
    fb = report.get("fallback")
    if fb:
        lines.append(f"fallback: {len(fb['sites'])} sites kept in float, held-back output SQNR "
                     f"{fb['start_sqnr_db']:.2f} -> {fb['output_sqnr_db']:.2f} dB"
                     + ("" if fb["reached"] else " (target not reached within --max-fallback)"))
        lines += [f"  float: {name}" for name in fb["sites"]]
    if report.get("output_error"):
        rows = [[name, f"{e['sqnr_db']:.2f}", f"{e['cosine']:.5f}", f"{e['max_abs_error']:.4g}"]
                for name, e in report["output_error"].items()]
        lines.append(f"output error vs the FP graph on {report['eval_data']}:")
        lines.append(_table(["output", "SQNR dB", "cosine", "max |err|"], rows, "lrrr"))
    hint = low_sqnr_hint(report, fmt)
    if hint:
        lines.append(hint)
    if report.get("layer_error"):
        worst = sorted(report["layer_error"], key=lambda e: e["sqnr_db"])[:5]
        lines.append(f"lowest per-layer SQNR of {len(report['layer_error'])} layers (all in the report):")
        lines.append(_table(["layer", "SQNR dB"], [[e["layer"], f"{e['sqnr_db']:.2f}"] for e in worst], "lr"))
    if report.get("tensorrt_check"):
        found = report["tensorrt_check"]
        lines.append(f"TensorRT check: {len(found)} violation(s) (`segquant-onnx check-trt` explains the rules):")
        lines += [f"  {v['rule']}  {v['node']}: {v['message']}" for v in found[:10]]
        lines += [f"  ... and {len(found) - 10} more"] if len(found) > 10 else []
    if report.get("output"):
        lines.append(f"wrote {report['output']}")
    return "\n".join(lines)


# below this output SQNR (error power over a tenth of the signal's, cosine under about 0.95) the summary says what
# to try: the real terrain UNet gives about 0 dB in INT8 with every recipe (its sampler draws no terrain) and 20-23 dB
# in FP8; the real models that work in INT8 give 14-27 dB
LOW_SQNR_DB = 10.0


def low_sqnr_hint(report: dict, fmt: str) -> str | None:
    """One line on what to try when the lowest output SQNR (eval feeds, else the fallback's held-back feeds) is under
    LOW_SQNR_DB; None otherwise."""
    measured = [e["sqnr_db"] for e in (report.get("output_error") or {}).values()]
    if not measured and report.get("fallback"):
        measured = [report["fallback"]["output_sqnr_db"]]
    if not measured or min(measured) >= LOW_SQNR_DB:
        return None
    where = "on the eval feeds" if report.get("output_error") else "on the held-back feeds"
    advice = ("one INT8 scale per activation tensor may not hold this model's ranges: try --precision fp8, or more "
              "sites in float (--target-sqnr with a larger --max-fallback)" if fmt == "INT8" else
              "try more sites in float (--target-sqnr with a larger --max-fallback) or calibration data closer to "
              "the inputs")
    return f"hint: output SQNR {min(measured):.2f} dB {where}, under {LOW_SQNR_DB:.0f} dB: {advice}"


def _strict(value):
    """JSON has no Infinity/NaN: write them as strings ("inf" for an exact match's SQNR)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write strict JSON atomically."""
    write_text_atomic(path, json.dumps(_strict(report), indent=2, allow_nan=False))


def _md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_markdown(report: dict) -> str:
    """The report as Markdown: summary, every site with the decisions taken and its errors."""
    dual = {d["site"]: d for d in report.get("dualscale", [])}
    layer = {e["layer"]: e["sqnr_db"] for e in report.get("layer_error", [])}
    outliers = report.get("outliers", {}).get("sites", {})
    out = [f"# Quantization report: {report.get('input') or 'model'}", "", "```", format_summary(report), "```", ""]
    rows = []
    for site in report["sites"]:
        name = site["name"]
        origin = name.rsplit("/seg", 1)[0] if "/seg" in name else name
        d = dual.get(name)
        rows.append([name, site["op"], "x".join(map(str, site["weight_shape"])), f"{100 * site['flop_share']:.1f}%",
                     "float" if site.get("float") else site.get("method", "-"), _fmt(site.get("smooth_alpha")),
                     "-" if d is None else f"{'yes' if d['apply'] else 'no'} ({d['gain_db']:+.1f} dB)",
                     len(outliers.get(name, [])), _fmt(site.get("layer_sqnr_db")), _fmt(layer.get(origin))])
    out += ["## Sites", "",
            "`layer SQNR` is the site's own output error on held-back calibration rows (the search's score); "
            "`output SQNR at layer` is that layer's output in the quantized model against the float model "
            "(`--per-layer`, errors accumulated from upstream).", "",
            _md_table(["site", "op", "weight", "FLOPs", "method", "alpha", "DualScale (gain)", "outlier ch.",
                       "layer SQNR dB", "output SQNR at layer dB"], rows), ""]
    if report.get("segments"):
        out += ["## SegLinear", "", _md_table(["linear", "kind", "via", "sizes"],
                [[m["linear"], m["kind"], m["via"], "+".join(map(str, m["sizes"]))] for m in report["segments"]]), ""]
    search = report.get("outliers", {}).get("per_site_search")
    if search:
        out += ["## Outlier channels per site (held-back output SQNR for each count, the others fixed)", "",
                _md_table(["site", "chosen", "channels: SQNR dB"],
                          [[t["site"], t["chosen_channels"],
                            ", ".join(f"{lv['channels']}: {lv['heldback_sqnr_db']:.2f}" for lv in t["levels"])]
                           for t in search]), ""]
    if report.get("sensitivity"):
        out += ["## Sensitivity (each site quantized alone, held-back feeds)", "",
                _md_table(["site", "output SQNR dB"], [[r["site"], _fmt(r["output_sqnr_db"])]
                                                       for r in report["sensitivity"]]), ""]
    if report.get("declined"):
        out += ["## Declined", "", _md_table(["node", "op", "reason"],
                [[d["name"], d["op"], d["reason"]] for d in report["declined"]]), ""]
    return "\n".join(out)


def write_markdown(report: dict, path: str | os.PathLike) -> None:
    write_text_atomic(path, format_markdown(report))


def plot_layer_error(report: dict, path: str | os.PathLike) -> None:
    """Per-layer output SQNR as a PNG (matplotlib, from the `demo` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layer_error"]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(layers)), 4))
    # exact layers (kept in float, no error upstream) have infinite SQNR: draw them at the top, grey
    finite = [e["sqnr_db"] for e in layers if math.isfinite(e["sqnr_db"])] or [0.0]
    top = max(finite) + 10
    values = [e["sqnr_db"] if math.isfinite(e["sqnr_db"]) else top for e in layers]
    colors = ["tab:blue" if math.isfinite(e["sqnr_db"]) else "tab:gray" for e in layers]
    ax.bar(range(len(layers)), values, color=colors)
    ax.set_xticks(range(len(layers)), [e["layer"][-28:] for e in layers], rotation=90, fontsize=6)
    ax.set_ylabel("output SQNR at layer (dB)")
    ax.set_title(f"per-layer error vs float ({report.get('eval_data')})", fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
