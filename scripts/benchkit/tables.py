"""The Markdown tables of BENCHMARKS.md, one function per table, from the collected rows and sections."""

from __future__ import annotations

import math
import re

from benchkit import runners
from benchkit.results import ResultRow, ok
from benchkit.sections import PER_LAYER_MODELS


def fmt(value, spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def short(text: str, limit: int = 110) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def trt_cell(row: ResultRow) -> str:
    """Status, plus the gist of the cause: "X: Error Code 4: API Usage Error (msg. In f at src)" -> msg."""
    if row.trt_error is None:
        return row.trt
    text = row.trt_cause or row.trt_error
    match = re.search(r"Error Code \d+: [^(]*\((.*?)(?: In \w+ at [^)]*)?\)\s*$", text)
    return f"{row.trt}: {short(match.group(1) if match else text, 160)}"


def precision_cell(r: ResultRow) -> str:
    """The quantized linears' format and the dtype of the rest: "INT8, fp32 rest"; "fp32" for the reference."""
    return "fp32" if r.precision == "fp32" else f"{r.precision.upper()}, {r.high_precision} rest"


def flops_cell(r: ResultRow) -> str:
    """Quantized (INT8 or FP8: the row's precision) share of the linear FLOPs per segquant-onnx's report
    (`summary.int8_flop_fraction`, named for INT8 but the run's format; it counts sites kept in float by the
    target fallback, not the outlier channels' float branches: those are given beside it)."""
    if r.int8_flop_fraction is None:
        return "-"
    text = f"{100 * r.int8_flop_fraction:.2f}"
    extras = []
    if r.fallback_sites:
        extras.append(f"{r.fallback_sites} sites float")
    if r.outlier_float_flop_pct:
        extras.append(f"outlier channels {r.outlier_float_flop_pct:.3f}% float")
    return text + (f" ({'; '.join(extras)})" if extras else "")


def dualscale_cell(r: ResultRow) -> str:
    if r.dualscale_extra_flop_pct is None:
        return "-"
    if not r.dualscale_applied:
        return "0"
    return f"{r.dualscale_extra_flop_pct:.1f} ({r.dualscale_applied}/{r.dualscale_candidates} sites)"


def results_table(rows: list[ResultRow]) -> str:
    head = ("| model | method | precision | SQNR dB | quantized FLOPs % | DualScale extra FLOPs % | time s (runs) "
            "| peak RSS MiB "
            "| size KiB | Q/DQ nodes | quantized weights | check-trt violations | TensorRT-RTX | tool's own SQNR |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        weights = "-" if r.weighted_linear is None else f"{r.weights_quantized}/{r.weighted_linear}"
        if r.error is not None and r.size_bytes is None:
            sqnr = f"FAILED: {r.error}"
        elif r.error is not None:
            sqnr = f"n/a ({r.error})"
        elif r.family == "fp32":
            sqnr = "ref"
        else:
            sqnr = fmt(r.sqnr_db, ".2f")
        seconds = "-" if r.seconds is None else f"{r.seconds:.2f} ({r.runs})"
        lines.append(
            f"| {r.model} | {r.method} | {precision_cell(r)} | {sqnr} | {flops_cell(r)} | {dualscale_cell(r)} "
            f"| {seconds} "
            f"| {fmt(r.peak_rss_mib, '.0f')} | {fmt(None if r.size_bytes is None else r.size_bytes / 1024, '.0f')} "
            f"| {fmt(r.qdq_nodes, 'd')} | {weights} | {fmt(r.trt_violations, 'd')} | {trt_cell(r)} "
            f"| {fmt(r.self_reported_sqnr, '.2f')} |")
    return "\n".join(lines)


def methods_table() -> str:
    from segquant_onnx import QuantConfig

    d = QuantConfig()
    lines = ["| method | QuantConfig | runs | feature table: change vs |", "|---|---|---|---|"]
    for m in runners.OURS_MATRIX:
        fields = ", ".join(f"{k}={v!r}" for k, v in m.fields.items()) if m.fields else ""
        lines.append(f"| {m.label} | `QuantConfig({fields})` | {'--repeat' if m.timed else '1'} "
                     f"| {m.baseline or '-'} |")
    lines.append("")
    lines.append(f"QuantConfig() as shipped: precision {d.precision.format} (rest {d.precision.high_precision}, "
                 f"attention quantized {d.precision.quantize_attention}), calibration method {d.calibration.method}, "
                 "SegLinear output "
                 f"{d.seglinear.output} and input {d.seglinear.input}, DualScale {d.dualscale.mode} (min gain "
                 f"{d.dualscale.min_gain_db} dB), SmoothQuant {d.smoothquant.flag}, outlier channels "
                 f"{d.outliers.flag}, target SQNR {d.fallback.target_sqnr}.")
    return "\n".join(lines)


def summary_table(rows: list[ResultRow]) -> str:
    """Per model and precision (format and rest): the best peer, our naive / default rows, our best row
    keeping >= 95% of the linear FLOPs quantized; a precision none of our rows has shows "-" for ours."""
    head = ("| model | precision | best peer | best peer TensorRT-RTX builds | naive | default | best segquant-onnx "
            "row (>= 95% of linear FLOPs quantized) | margin over best peer | over best buildable peer |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]

    def best(candidates):
        return max(candidates, key=lambda r: r.sqnr_db, default=None)

    def cell(r):
        return "-" if r is None else f"{r.sqnr_db:.2f} ({r.method})"

    def plain(r):
        return "-" if not ok(r) else f"{r.sqnr_db:.2f}"

    def margin(ours, peer):
        return "-" if ours is None or peer is None else f"{ours.sqnr_db - peer.sqnr_db:+.2f}"

    kinds = list(dict.fromkeys((r.precision, r.high_precision) for r in rows if r.family != "fp32"))
    for model in dict.fromkeys(r.model for r in rows):
        for kind in kinds:
            mine = [r for r in rows if r.model == model and (r.precision, r.high_precision) == kind]
            if not mine:
                continue
            peers = [r for r in mine if r.family in ("ort", "modelopt") and ok(r)]
            # a 5% fallback budget can land on 95% exactly: compare with a rounding margin
            ours = best(r for r in mine if r.family == "ours" and ok(r)
                        and (r.int8_flop_fraction or 0) * 100 - (r.outlier_float_flop_pct or 0) >= 95.0 - 1e-6)
            best_peer, best_built = best(peers), best(r for r in peers if r.trt == "built")
            naive, default = (next((r for r in mine if r.method == m), None)
                              for m in runners.NAIVE_AND_DEFAULT_BY_REST.get(
                                  kind, runners.NAIVE_AND_DEFAULT.get(kind[0], ("", ""))))
            lines.append(f"| {model} | {precision_cell(mine[0])} | {cell(best_peer)} | {cell(best_built)} "
                         f"| {plain(naive)} | {plain(default)} | {cell(ours)} | {margin(ours, best_peer)} "
                         f"| {margin(ours, best_built)} |")
    return "\n".join(lines)


def ratio_table(rows: list[ResultRow]) -> str:
    """Our timed naive and default rows of the peer's format (INT8: naive INT8, default; FP8: FP8 default,
    FP8 naive is not timed), time and peak RSS divided by each peer's, per model (< 1: ours is cheaper)."""
    head = ("| model | peer | naive time / peer | naive RSS / peer | default time / peer | default RSS / peer |")
    lines = [head, "|---|---|---|---|---|---|"]
    timed = {m.label for m in runners.OURS_MATRIX if m.timed}

    def ratio(a, b):
        return fmt(a / b if a and b else None, ".2f")

    for model in dict.fromkeys(r.model for r in rows):
        ours = {m: next((r for r in rows if r.model == model and r.method == m and r.error is None), None)
                for pair in runners.NAIVE_AND_DEFAULT.values() for m in pair if m in timed}
        if not any(ours.values()):
            continue
        for peer in (r for r in rows if r.model == model and r.family in ("ort", "modelopt")):
            if peer.error is not None and peer.size_bytes is None:
                lines.append(f"| {model} | {peer.method} | (peer failed) | | | |")
                continue
            cells = []
            for m in runners.NAIVE_AND_DEFAULT.get(peer.precision, ("", "")):
                o = ours.get(m)
                cells += [ratio(o and o.seconds, peer.seconds), ratio(o and o.peak_rss_mib, peer.peak_rss_mib)]
            lines.append(f"| {model} | {peer.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def feature_table(rows: list[ResultRow]) -> str:
    """Output SQNR change of each segquant-onnx row against the row it adds one thing to (its ``baseline``
    in the feature matrix: naive INT8, default, FP8 naive or FP8 default)."""
    matrix = [m for m in runners.OURS_MATRIX if m.baseline]
    head = "| model | " + " | ".join(f"{m.label} vs {m.baseline}" for m in matrix) + " |"
    lines = [head, "|" + "---|" * (len(matrix) + 1)]
    for model in dict.fromkeys(r.model for r in rows):
        by = {r.method: r for r in rows if r.model == model and r.family == "ours"}
        if not by:
            continue
        cells = []
        for m in matrix:
            base, row = by.get(m.baseline), by.get(m.label)
            cells.append(f"{row.sqnr_db - base.sqnr_db:+.2f}" if ok(row) and ok(base) else "-")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_layer_tables(entries: list[dict]) -> str:
    if not entries:
        return f"(not run: none of the models {', '.join(PER_LAYER_MODELS)} was selected)"
    lines = ["| model | method | layers | min dB | median dB | mean dB | output SQNR dB |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        for method, st in e["stats"].items():
            inf = f" (+{st['infinite']} exact)" if st["infinite"] else ""
            lines.append(f"| {e['model']} | {method} | {st['layers']}{inf} | {st['min']:.2f} | {st['median']:.2f} "
                         f"| {st['mean']:.2f} | {fmt(st['output_sqnr'], '.2f')} |")
    lines += ["", "The SegLinear sites (every linear +SegLinear split), layer output SQNR:", "",
              "| model | layer | module | segments | naive INT8 dB | +SegLinear dB | change dB |",
              "|---|---|---|---|---|---|---|"]
    for e in entries:
        for site in e["sites"]:
            a, b = site["naive"], site["seglinear"]
            delta = fmt(b - a if a is not None and b is not None else None, "+.2f")
            module = site["module"] or "-"
            segs = f"{site['kind']} {'+'.join(str(x) for x in site['sizes'])} ({site['via']})"
            lines.append(f"| {e['model']} | `{site['layer']}` | {module} | {segs} | {fmt(a, '.2f')} "
                         f"| {fmt(b, '.2f')} | {delta} |")
    return "\n".join(lines)


def latency_table(entries: list[dict]) -> str:
    if not entries:
        return "(not run: neither demo nor flux-dynamo was selected)"
    lines = ["| model | method | median ms | IQR ms | / naive INT8 | / FP32 | DualScale extra FLOPs % "
             "| outlier float FLOPs % | INT8 FLOPs % |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        med = e["median_ms"]
        base, fp = med.get("naive INT8"), med.get("FP32 reference")
        for method, ms in med.items():
            lo, hi = e["iqr_ms"][method]
            lines.append(f"| {e['model']} | {method} | {ms:.3f} | {lo:.3f}-{hi:.3f} "
                         f"| {fmt(ms / base if base else None, '.2f')} | {fmt(ms / fp if fp else None, '.2f')} "
                         f"| {fmt(e['dualscale_extra_flop_pct'].get(method), '.1f')} "
                         f"| {fmt(e.get('outlier_float_flop_pct', {}).get(method), '.3f')} "
                         f"| {fmt(e.get('int8_flop_pct', {}).get(method), '.1f')} |")
    for e in entries:
        if e.get("not_timed"):
            lines.append("")
            lines.append(f"{e['model']}, not timed (FP8, or an fp16 rest: n/a on ONNX Runtime's CPU, see above): "
                         + ", ".join(e["not_timed"]) + ".")
    return "\n".join(lines)


def image_table(entries: list[dict]) -> str:
    if not entries:
        return "(not run: demo was not selected)"
    lines = []
    for e in entries:
        lines += [f"{e['model']}: {e['classes']} classes x seeds {', '.join(map(str, e['seeds']))}, {e['steps']} Euler "
                  "steps, images vs the FP32 images from the same noise:", "",
                  "| method | PSNR dB mean (min) | SSIM mean (min) | mean per-step transformer SQNR dB "
                  "| output SQNR dB (eval feeds) |", "|---|---|---|---|---|"]
        for method, m in e["methods"].items():
            lines.append(f"| {method} | {m['psnr_db']:.2f} ({m['psnr_db_min']:.2f}) | {m['ssim']:.5f} "
                         f"({m['ssim_min']:.5f}) | {m['mean_step_sqnr_db']:.2f} | {fmt(m['output_sqnr_db'], '.2f')} |")
    return "\n".join(lines)
