"""Command line: `segquant-onnx quantize | inspect` (also `python -m segquant_onnx`)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from importlib import resources
from pathlib import Path

from segquant_onnx import __version__
from segquant_onnx.config import CALIB_METHODS, DUALSCALE_MODES, QuantConfig
from segquant_onnx.errors import UserError

log = logging.getLogger("segquant_onnx")

EXAMPLE_MODEL = "demo_dit.onnx"  # the trained demo DiT (scripts/train_demo_dit.py)
EXAMPLE_CALIB = "demo_dit_calib.npz"
EXAMPLE_EVAL = "demo_dit_eval.npz"
SEG_PATTERNS = ("output", "input", "heads")
# modules with `add_parser(subparsers)` registering more subcommands (set_defaults(func=...))
EXTRA_COMMANDS: tuple[str, ...] = ("segquant_onnx.cli_demo", "segquant_onnx.cli_trt")


def example_path(name: str) -> Path:
    """A file of the bundled example (a tiny SD3-style DiT and its calibration/eval inputs)."""
    return Path(str(resources.files("segquant_onnx") / "data" / name))


def _config(args) -> QuantConfig:
    return QuantConfig(
        calib_method=getattr(args, "calib_method", "max"),
        percentile=getattr(args, "percentile", 99.99),
        exclude=tuple(args.exclude or ()),
        providers=tuple(p.strip() for p in getattr(args, "providers", "CPUExecutionProvider").split(",") if p.strip()),
        batch_size=getattr(args, "batch_size", None),
        seg_output=args.seglinear and "output" in args.seg_patterns,
        seg_input=args.seglinear and "input" in args.seg_patterns,
        seg_heads=args.seglinear and "heads" in args.seg_patterns,
        dry_rewrite=getattr(args, "dry_rewrite", False),
        dualscale=args.dualscale,
        dualscale_min_gain_db=getattr(args, "dualscale_min_gain", 1.0),
        per_layer=getattr(args, "per_layer", False),
        smoothquant=getattr(args, "smoothquant", "off"),
        sensitivity=getattr(args, "sensitivity", False),
        target_sqnr=getattr(args, "target_sqnr", None),
        max_fallback_pct=getattr(args, "max_fallback", 10.0),
        outlier_channels=getattr(args, "outlier_channels", "off"),
        outlier_max_flop_pct=getattr(args, "outlier_flops", 2.0),
        outlier_min_gain_db=getattr(args, "outlier_min_gain", 0.05),
        outlier_ratio=getattr(args, "outlier_ratio", 8.0),
    )


def _patterns(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in SEG_PATTERNS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown pattern '{unknown[0]}'; use {', '.join(SEG_PATTERNS)}")
    return names


def _cmd_quantize(args) -> int:
    from segquant_onnx.graph_io import check_output_path
    from segquant_onnx.pipeline import quantize
    from segquant_onnx.report import format_summary, plot_layer_error

    if args.example:
        model = Path(args.model) if args.model else example_path(EXAMPLE_MODEL)
        calib = args.calib or example_path(EXAMPLE_CALIB)
        eval_data = args.eval or (example_path(EXAMPLE_EVAL) if not args.model else None)
        output = args.output or Path("example_dit_int8.onnx")
    else:
        if not args.model:
            raise UserError("quantize needs MODEL (or --example to use the bundled example).")
        if not args.output:
            raise UserError("quantize needs -o OUT.onnx, the path to write the quantized model to.")
        if not args.calib:
            raise UserError("quantize needs --calib DATA (.npz or a directory of .npz); "
                            "it never calibrates on random data.")
        model, calib, eval_data, output = Path(args.model), args.calib, args.eval, Path(args.output)
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--plot needs matplotlib: pip install 'segquant-onnx[demo]'.")
        check_output_path(args.plot, None, args.force)
        args.per_layer = True
    if args.no_eval:
        if args.eval:
            raise UserError("--no-eval and --eval contradict each other: pass one of them.")
        eval_data = None
    result = quantize(model, calib, _config(args), output=output, force=args.force, eval_data=eval_data,
                      report_path=args.report, progress=not args.quiet, evaluate=not args.no_eval)
    print(format_summary(result.report))
    if args.plot:
        if not result.report["layer_error"]:
            raise UserError("--plot needs evaluation data: pass --eval DATA (a Python iterable cannot be re-read).")
        plot_layer_error(result.report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_sensitivity(args) -> int:
    from segquant_onnx.pipeline import quantize
    from segquant_onnx.report import format_sensitivity

    if not args.calib:
        raise UserError("sensitivity needs --calib DATA (.npz or a directory of .npz).")
    args.sensitivity = True
    result = quantize(Path(args.model), args.calib, _config(args), progress=not args.quiet,
                      report_path=args.report, force=args.force)
    print(format_sensitivity(result.report, top=args.top))
    return 0


def _cmd_inspect(args) -> int:
    from segquant_onnx.pipeline import inspect_model
    from segquant_onnx.report import format_plan

    model = args.model or (example_path(EXAMPLE_MODEL) if args.example else None)
    if model is None:
        raise UserError("inspect needs MODEL (or --example).")
    plan = inspect_model(model, _config(args))
    if args.json:
        if args.json == "-":
            print(plan.to_json())
            return 0
        Path(args.json).write_text(plan.to_json())
    print(format_plan(plan, explain=args.explain))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segquant-onnx",
        description="Quantize an exported ONNX diffusion model (DiT, UNet, transformer) to a Q/DQ graph "
                    "that ONNX Runtime runs and TensorRT builds.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="calibrate and write a quantized model",
                       description="Calibrate on DATA, insert INT8 Q/DQ on every linear site, write OUT.")
    q.add_argument("model", nargs="?", metavar="MODEL", help="input .onnx (never modified)")
    q.add_argument("-o", "--output", metavar="OUT", help="output .onnx path (must differ from MODEL)")
    q.add_argument("--calib", metavar="DATA", help=".npz (one array per input, axis 0 = samples) or a directory of .npz")
    q.add_argument("--eval", metavar="DATA", help="held-out data for the output-error summary (default: the calibration data)")
    q.add_argument("--no-eval", action="store_true",
                   help="skip the output-error measurement (no float and quantized evaluation sessions: "
                        "less time and peak memory)")
    q.add_argument("--calib-method", choices=CALIB_METHODS, default="max", help="activation clipping; auto picks per site by layer error on calibration rows held back "
                        "from the statistics (default: %(default)s)")
    q.add_argument("--percentile", type=float, default=99.99, help="for --calib-method percentile (default: %(default)s)")
    q.add_argument("--batch-size", type=int, help="calibration batch when the model's batch is dynamic (default: 8)")
    q.add_argument("--example", action="store_true", help="use the bundled example: the trained demo DiT and its trajectory calibration data")
    q.add_argument("--report", metavar="JSON", help="write a JSON report here, and a Markdown one beside it (.md)")
    q.add_argument("--plot", metavar="PNG", help="plot the per-layer output SQNR to this PNG (implies --per-layer; "
                   "needs matplotlib)")
    q.add_argument("--per-layer", action="store_true",
                   help="measure every linear layer's output SQNR vs the float graph (report; worst shown)")
    q.add_argument("--force", action="store_true", help="replace OUT (and the report) if they exist")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.add_argument("--smoothquant", default="off", metavar="auto|off|ALPHA",
                   help="SmoothQuant per site: auto searches alpha in {0.25, 0.5, 0.75} or none by layer error on a "
                        "calibration-row sample; off; or a fixed alpha (default: %(default)s)")
    q.add_argument("--outlier-channels", default="off", metavar="auto|off|N",
                   help="run up to N outlier input channels per linear (calibration abs-max > --outlier-ratio x "
                        "the median channel's) in float beside the INT8 GEMM; auto picks N globally, then per site, by the "
                        "output SQNR on held-back calibration feeds (default: %(default)s)")
    q.add_argument("--outlier-ratio", type=float, default=8.0, metavar="X",
                   help="an outlier channel's calibration abs-max exceeds X times the median channel's "
                        "(default: %(default)s)")
    q.add_argument("--outlier-min-gain", type=float, default=0.05, metavar="DB",
                   help="with --outlier-channels auto: a site takes more outlier channels only if the held-back "
                        "output SQNR gains more than DB (default: %(default)s)")
    q.add_argument("--outlier-flops", type=float, default=2.0, metavar="PERCENT",
                   help="at most this share of linear FLOPs in the float outlier branches (default: %(default)s)")
    q.add_argument("--target-sqnr", type=float, metavar="DB",
                   help="keep the most sensitive sites in float until the output SQNR on held-back calibration "
                        "feeds (every 4th) reaches DB")
    q.add_argument("--max-fallback", type=float, default=10.0, metavar="PERCENT",
                   help="with --target-sqnr: at most this share of linear FLOPs may stay in float (default: %(default)s)")
    q.add_argument("--sensitivity", action="store_true",
                   help="rank sites by output SQNR with each quantized alone (report)")
    q.add_argument("--dualscale-min-gain", type=float, default=1.0, metavar="DB",
                   help="with --dualscale auto: the layer-output SQNR gain (dB) a site needs (default: %(default)s)")
    q.add_argument("--dry-rewrite", action="store_true",
                   help="apply the structural rewrites (SegLinear) without quantizing, to check they are exact")

    i = sub.add_parser("inspect", help="list the linear sites a model has, without calibrating",
                       description="Print the quantization plan: every linear site and every declined node.")
    i.add_argument("model", nargs="?", metavar="MODEL")
    i.add_argument("--example", action="store_true", help="inspect the bundled example DiT")
    i.add_argument("--json", metavar="PATH", help="write the plan as JSON ('-' for stdout)")
    i.add_argument("--explain", action="store_true", help="list every declined node with its reason")

    se = sub.add_parser("sensitivity", help="rank linear sites by their effect on the output error",
                        description="Quantize each linear site alone and measure the model output SQNR on held-back "
                                    "calibration feeds (every 4th); most sensitive first.")
    se.add_argument("model", metavar="MODEL")
    se.add_argument("--calib", metavar="DATA", help="calibration data (.npz or directory)")
    se.add_argument("--top", type=int, default=20, help="rows to print (default: %(default)s)")
    se.add_argument("--calib-method", choices=CALIB_METHODS, default="max", help="as for quantize (default: %(default)s)")
    se.add_argument("--report", metavar="JSON", help="write the full JSON report here")
    se.add_argument("--force", action="store_true", help="replace the report if it exists")
    se.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    se.set_defaults(func=_cmd_sensitivity)
    q.set_defaults(func=_cmd_quantize)
    i.set_defaults(func=_cmd_inspect)
    for module in EXTRA_COMMANDS:  # other subcommands live in their own modules: add_parser(sub)
        importlib.import_module(module).add_parser(sub)

    for p in (q, i, se):
        p.add_argument("--exclude", action="append", metavar="REGEX", help="keep sites whose node name matches in float (repeatable)")
        p.add_argument("--seglinear", action=argparse.BooleanOptionalAction, default=True,
                       help="split linears by the segments their output/input is cut into (default: on)")
        p.add_argument("--seg-patterns", type=_patterns, default=("output", "input"), metavar="LIST",
                       help="SegLinear patterns to apply: output (Linear->chunk/split, also through a Reshape), "
                            "input (Concat or stack->Linear), heads (Reshape merging attention heads->Linear, "
                            "H narrow GEMMs); default: output,input")
        p.add_argument("--dualscale", choices=DUALSCALE_MODES, default="auto",
                       help="separate scales for the negative and positive parts of SiLU/GELU outputs, as two "
                            "GEMMs: auto (where the measured layer gain pays), all, off (default: auto)")
        p.add_argument("--providers", default="CPUExecutionProvider",
                       help="ONNX Runtime providers, comma-separated (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        print(f"segquant-onnx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segquant-onnx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
