"""Command line: `segquant-onnx quantize | inspect | sensitivity` (also `python -m segquant_onnx`); the other
subcommands register themselves from EXTRA_COMMANDS."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from segquant_onnx.version import __version__
from segquant_onnx.calib.data import DEFAULT_DYNAMIC_BATCH
from segquant_onnx.cli.argtypes import positive_int, rank_or_auto
from segquant_onnx.config import (CALIB_METHODS, DUALSCALE_MODES, GROUPS, HIGH_PRECISIONS, PRECISIONS, PRESET_NAMES,
                                  WEIGHT_ROUNDINGS,
                                  PRESETS, OutlierConfig, Preset, QuantConfig, SmoothQuantConfig)
from segquant_onnx.errors import UserError
from segquant_onnx.examples import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL, example_path
from segquant_onnx.ir.outputs import markdown_path

log = logging.getLogger("segquant_onnx")

SEG_PATTERNS = ("output", "input", "heads")
# modules with `add_parser(subparsers)` registering more subcommands (set_defaults(func=...))
EXTRA_COMMANDS: tuple[str, ...] = ("segquant_onnx.cli.demo", "segquant_onnx.cli.trt")


# flag (argparse dest) -> (config group, field): where each plain quantize flag lands
FLAG_SETTINGS = {
    "precision": ("precision", "format"), "high_precision": ("precision", "high_precision"),
    "quantize_attention": ("precision", "quantize_attention"), "block_size": ("precision", "block_size"),
    "weight_rounding": ("precision", "weight_rounding"), "low_rank": ("precision", "low_rank"),
    "weight_clip": ("precision", "weight_clip"),
    "calib_method": ("calibration", "method"), "percentile": ("calibration", "percentile"),
    "batch_size": ("calibration", "batch_size"), "dry_rewrite": ("seglinear", "dry_rewrite"),
    "dualscale": ("dualscale", "mode"), "dualscale_min_gain": ("dualscale", "min_gain_db"),
    "outlier_ratio": ("outliers", "ratio"), "outlier_flops": ("outliers", "max_flop_pct"),
    "outlier_min_gain": ("outliers", "min_gain_db"), "sensitivity": ("fallback", "sensitivity"),
    "target_sqnr": ("fallback", "target_sqnr"), "max_fallback": ("fallback", "max_fallback_pct"),
    "per_layer": ("runtime", "per_layer"), "allow_unquantized": ("runtime", "allow_unquantized"),
    "workers": ("runtime", "workers"), "ray_address": ("runtime", "ray_address"),
}


def _config(args) -> QuantConfig:
    """The settings the subcommand's flags give, over its --preset (balanced where it has none): a flag not
    given (None: the flags a preset sets) or that the subcommand lacks keeps the preset's value or default."""
    groups: dict[str, dict] = {g: {} for g in GROUPS}
    for dest, (group, name) in FLAG_SETTINGS.items():
        if getattr(args, dest, None) is not None:
            groups[group][name] = getattr(args, dest)
    patterns = set(args.seg_patterns) if args.seglinear else set()
    groups["seglinear"].update(output="output" in patterns, input="input" in patterns, heads="heads" in patterns)
    groups["fallback"]["exclude"] = tuple(args.exclude or ())
    groups["runtime"]["providers"] = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    if getattr(args, "smoothquant", None) is not None:
        s = SmoothQuantConfig.from_flag(args.smoothquant)
        groups["smoothquant"].update(mode=s.mode, alpha=s.alpha)
    if getattr(args, "outlier_channels", None) is not None:
        o = OutlierConfig.from_flag(args.outlier_channels)
        groups["outliers"].update(mode=o.mode, count=o.count)
    return QuantConfig.preset(getattr(args, "preset", Preset.BALANCED), **groups)


def _patterns(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in SEG_PATTERNS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown pattern '{unknown[0]}'; use {', '.join(SEG_PATTERNS)}")
    return names


def _cmd_quantize(args) -> int:
    from segquant_onnx.ir.graph_io import model_files
    from segquant_onnx.ir.outputs import Output, check_outputs, model_output, report_output
    from segquant_onnx.pipeline import quantize
    from segquant_onnx.report.render import format_summary, plot_layer_error

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
    outputs = [model_output(output)]
    if args.report:
        outputs.append(report_output(args.report))
    if args.plot:
        outputs.append(Output("--plot", Path(args.plot), ".png"))
    check_outputs(outputs, [*model_files(model), calib, eval_data], args.force)
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise UserError("--plot needs matplotlib: pip install 'segquant-onnx[demo]'.")
        args.per_layer = True
    if args.no_eval:
        if args.eval:
            raise UserError("--no-eval and --eval contradict each other: pass one of them.")
        eval_data = None
    result = quantize(model, calib, _config(args), output=output, force=args.force, eval_data=eval_data,
                      report_path=args.report, progress=not args.quiet, evaluate=not args.no_eval)
    if args.plot and not result.report["layer_error"]:
        raise UserError("--plot needs evaluation data: pass --eval DATA (a Python iterable cannot be re-read).")
    print(format_summary(result.report))
    if args.report:
        print(f"wrote {args.report} and {markdown_path(args.report)}")
    if args.plot:
        plot_layer_error(result.report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_sensitivity(args) -> int:
    from segquant_onnx.pipeline import quantize
    from segquant_onnx.report.render import format_sensitivity

    if not args.calib:
        raise UserError("sensitivity needs --calib DATA (.npz or a directory of .npz).")
    args.sensitivity = True
    result = quantize(Path(args.model), args.calib, _config(args), progress=not args.quiet,
                      report_path=args.report, force=args.force)
    print(format_sensitivity(result.report, top=args.top))
    if args.report:
        print(f"wrote {args.report} and {markdown_path(args.report)}")
    return 0


def _cmd_inspect(args) -> int:
    from segquant_onnx.ir.graph_io import model_files
    from segquant_onnx.ir.outputs import Output, check_outputs, write_text_atomic
    from segquant_onnx.pipeline import inspect_model
    from segquant_onnx.report.render import format_plan

    model = args.model or (example_path(EXAMPLE_MODEL) if args.example else None)
    if model is None:
        raise UserError("inspect needs MODEL (or --example).")
    to_file = args.json not in (None, "-")
    if to_file:
        check_outputs([Output("--json", Path(args.json), ".json")], model_files(model), args.force)
    plan = inspect_model(model, _config(args))
    if args.json == "-":
        print(plan.to_json())
        return 0
    print(format_plan(plan, explain=args.explain))
    if to_file:
        write_text_atomic(args.json, plan.to_json())
        print(f"wrote {args.json}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) that says where to read more."""

    def error(self, message):
        self.exit(2, f"segquant-onnx: error: {message} (see `{self.prog} --help`).\n")


EXAMPLES = """examples:
  segquant-onnx quantize model.onnx --calib calib.npz -o model_int8.onnx
      the default: SegLinear, DualScale where it pays, INT8 weights and activations
  segquant-onnx quantize model.onnx --calib calib.npz -o model_fp8.onnx --precision fp8
      FP8 E4M3 weights and activations (opset 19; Hopper/Ada/Blackwell TensorRT)
  segquant-onnx quantize model.onnx --calib calib.npz --eval eval.npz -o q.onnx --report q.json
      measure the output error on held-out data and write a JSON + Markdown report
  segquant-onnx quantize model.onnx --calib calib.npz -o q.onnx --preset best
      the best quality with at least 95% of the linear FLOPs in INT8 (slower: searches at the output)
  segquant-onnx quantize model.onnx --calib calib.npz -o q.onnx --preset best --target-sqnr 45
      a preset with one of its settings changed (a flag given wins over the preset)
"""


QUANTIZE_GROUPS = ("input and output", "preset", "precision", "calibration", "SegLinear", "DualScale", "SmoothQuant",
                   "outlier channels", "fallback and target", "evaluation and report", "runtime")


def _groups(p, titles=("SegLinear", "DualScale", "fallback and target", "runtime")) -> dict:
    """Argument groups in the order `--help` shows them."""
    return {t: p.add_argument_group(t) for t in titles}


def _preset_default(group: str, name: str) -> str:
    """`--help`'s default of a flag a preset sets: the balanced value, and the presets that change it."""
    def word(value):
        return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    plain = getattr(getattr(QuantConfig(), group), name)
    others = [f"{p} {word(PRESETS[p][group][name])}" for p in PRESET_NAMES
              if name in PRESETS[p].get(group, {}) and PRESETS[p][group][name] != plain]
    return word(plain) + (f"; --preset {', '.join(others)}" if others else "")


def _add_model_choices(groups: dict, d: QuantConfig, dry_rewrite: bool = False) -> None:
    """The flags that change which sites and patterns the plan holds (quantize, inspect, sensitivity)."""
    g = groups["SegLinear"]
    g.add_argument("--seglinear", action=argparse.BooleanOptionalAction, default=True,
                   help="split linears by the segments their output/input is cut into (default: on)")
    default = tuple(p for p in SEG_PATTERNS if getattr(d.seglinear, p))
    g.add_argument("--seg-patterns", type=_patterns, default=default, metavar="LIST",
                   help="SegLinear patterns to apply: output (Linear->chunk/split, also through a Reshape), "
                        "input (Concat or stack->Linear), heads (Reshape merging attention heads->Linear, "
                        f"H narrow GEMMs); default: {','.join(default)}")
    if dry_rewrite:
        g.add_argument("--dry-rewrite", action="store_true",
                       help="apply the structural rewrites (SegLinear) without quantizing, to check they are exact")
    g = groups["DualScale"]
    g.add_argument("--dualscale", choices=DUALSCALE_MODES, default=None,
                   help="separate scales for the negative and positive parts of SiLU/GELU outputs, as two "
                        "GEMMs: auto (where the measured gain pays), all, off "
                        f"(default: {_preset_default('dualscale', 'mode')})")
    groups["fallback and target"].add_argument(
        "--exclude", action="append", metavar="REGEX", help="keep sites whose node name matches in float (repeatable)")
    groups["runtime"].add_argument(
        "--providers", default=",".join(d.runtime.providers),
        help="ONNX Runtime execution providers, comma-separated, e.g. CUDAExecutionProvider,CPUExecutionProvider "
             "or TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider (GPU ones need onnxruntime-gpu "
             "and a GPU; with --workers, worker i runs on GPU i mod the GPU count) (default: %(default)s)")


def _add_workers(group, d: QuantConfig) -> None:
    """--workers / --ray-address: where calibration runs (quantize, sensitivity)."""
    group.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="calibrate in N worker processes, each with its own ONNX Runtime session, the feeds "
                            "split between them and their statistics merged; the searches' held-back runs are "
                            "split the same way: the same output bytes as one process (default: "
                            f"{d.runtime.workers}, in this process)")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="run the --workers on a Ray cluster: 'local' starts one on this machine, 'auto' or "
                            "HOST:PORT joins a running one (needs: pip install \"segquant-onnx[ray]\")")


def _add_quantize_options(q, d: QuantConfig) -> None:
    groups = _groups(q, QUANTIZE_GROUPS)
    g = groups["input and output"]
    g.add_argument("model", nargs="?", metavar="MODEL", help="input .onnx (never modified)")
    g.add_argument("-o", "--output", metavar="OUT", help="output .onnx path (never MODEL; an existing file only "
                   "with --force)")
    g.add_argument("--example", action="store_true",
                   help="use the bundled example: the trained demo DiT and its trajectory calibration data")
    g.add_argument("--force", action="store_true", help="replace OUT, the report and the plot if they exist")
    g.add_argument("--allow-unquantized", action="store_true",
                   help="write the model even if no linear site can be quantized (otherwise exit 2)")

    g = groups["preset"]
    g.add_argument("--preset", choices=PRESET_NAMES, default=Preset.BALANCED.value,
                   help="how much search to spend: fast (one calibration pass, DualScale off), balanced (DualScale "
                        "checked at the output on held-back feeds), best (also SmoothQuant and outlier channels chosen "
                        "there, and a fallback to 40 dB within 5%% of the linear FLOPs); a flag given "
                        "wins over its preset (default: %(default)s)")
    g = groups["precision"]
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision.format.value,
                   help="what the linear sites are quantized to: int8, fp8 (E4M3FN, amax/448 scales, opset 19), "
                        "w4a16 (INT4 weights in blocks along K, activations in float) or w4a8 (INT4 weight blocks, "
                        "INT8 activations); INT4 needs opset 21 and quantizes MatMul/Gemm only "
                        "(default: %(default)s)")
    g.add_argument("--block-size", type=positive_int, default=d.precision.block_size,
                   help="INT4 weights: input channels per scale block, a power of two >= 16 (default: %(default)s)")
    g.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default=None,
                   help="rtn rounds each weight to the nearest grid point; gptq rounds input channel by input channel, "
                        "moving each one's error onto the next through calibration statistics (X^T X of each "
                        "layer's sampled input rows), which lowers the layer output error; auto uses GPTQ on the sites "
                        "where it lowers the layer error on rows it was not fitted on (default: "
                        f"{d.precision.weight_rounding.value}; --preset best with w4a16 or w4a8: gptq)")
    g.add_argument("--weight-clip", action="store_true", default=None,
                   help="clip each weight block's scale (ratios 1.0 down to 0.7 of its abs-max, per output channel) "
                        "where that lowers the layer output error on sampled input rows, as AWQ's clip search does "
                        "(default: off; --preset best with w4a16 or w4a8: on)")
    g.add_argument("--low-rank", type=rank_or_auto, metavar="R|auto", default=d.precision.low_rank,
                   help="keep a rank-R branch of each MatMul/Gemm weight in float (two small GEMMs in the rest's "
                        "dtype) and quantize only the residual (SVDQuant); 0 turns it off; auto picks 16, 32 or 64 "
                        "per site where the branch costs at most 10%% of its FLOPs and lowers the layer error by "
                        "1 dB or more on sampled rows (default: %(default)s)")
    g.add_argument("--high-precision", choices=HIGH_PRECISIONS, default=d.precision.high_precision.value,
                   help="dtype of the unquantized rest of an fp32 model; tensors whose calibrated range does not "
                        "fit fp16 stay fp32 (default: %(default)s)")
    g.add_argument("--quantize-attention", action="store_true",
                   help="also quantize the attention products (Q @ K^T, softmax @ V) per tensor, as TensorRT's "
                        "fused MHA kernels take them; best with --precision fp8")

    g = groups["calibration"]
    g.add_argument("--calib", metavar="DATA", help=".npz (one array per input, axis 0 = samples) or a directory of .npz")
    c = d.calibration
    g.add_argument("--calib-method", choices=CALIB_METHODS, default=None,
                   help="activation clipping; auto picks per site by layer error on calibration rows held back "
                        f"from the statistics (default: {_preset_default('calibration', 'method')})")
    g.add_argument("--percentile", type=float, default=c.percentile,
                   help="for --calib-method percentile (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=c.batch_size,
                   help=f"calibration batch when the model's batch is dynamic (default: {DEFAULT_DYNAMIC_BATCH})")

    _add_model_choices(groups, d, dry_rewrite=True)
    _add_workers(groups["runtime"], d)
    groups["DualScale"].add_argument(
        "--dualscale-min-gain", type=float, default=d.dualscale.min_gain_db, metavar="DB",
        help="with --dualscale auto: the layer-output SQNR gain (dB) a site needs (default: %(default)s)")

    g = groups["SmoothQuant"]
    alphas = ", ".join(f"{a:g}" for a in d.smoothquant.alphas)
    g.add_argument("--smoothquant", default=None, metavar="auto|off|ALPHA",
                   help=f"SmoothQuant per site: auto searches alpha in {{{alphas}}} or none by layer error on a "
                        "calibration-row sample; off; or a fixed alpha "
                        f"(default: {_preset_default('smoothquant', 'mode')})")

    g = groups["outlier channels"]
    o = d.outliers
    g.add_argument("--outlier-channels", default=None, metavar="auto|off|N",
                   help="run up to N outlier input channels per linear (calibration abs-max > --outlier-ratio x "
                        "the median channel's) in float beside the INT8 GEMM; auto picks N globally, then per site, "
                        "by the output SQNR on held-back calibration feeds "
                        f"(default: {_preset_default('outliers', 'mode')})")
    g.add_argument("--outlier-ratio", type=float, default=o.ratio, metavar="X",
                   help="an outlier channel's calibration abs-max exceeds X times the median channel's "
                        "(default: %(default)s)")
    g.add_argument("--outlier-min-gain", type=float, default=o.min_gain_db, metavar="DB",
                   help="with --outlier-channels auto: a site takes more outlier channels only if the held-back "
                        "output SQNR gains more than DB (default: %(default)s)")
    g.add_argument("--outlier-flops", type=float, default=o.max_flop_pct, metavar="PERCENT",
                   help="at most this share of linear FLOPs in the float outlier branches (default: %(default)s)")

    g = groups["fallback and target"]
    g.add_argument("--target-sqnr", type=float, default=None, metavar="DB",
                   help="keep the most sensitive sites in float until the output SQNR on held-back calibration "
                        f"feeds (every {c.holdout_every}th) reaches DB "
                        f"(default: {_preset_default('fallback', 'target_sqnr')})")
    g.add_argument("--max-fallback", type=float, default=None, metavar="PERCENT",
                   help="with --target-sqnr: at most this share of linear FLOPs may stay in float "
                        f"(default: {_preset_default('fallback', 'max_fallback_pct')})")
    g.add_argument("--sensitivity", action="store_true",
                   help="rank sites by output SQNR with each quantized alone (report)")

    g = groups["evaluation and report"]
    g.add_argument("--eval", metavar="DATA",
                   help="held-out data for the output-error summary (default: the calibration data)")
    g.add_argument("--no-eval", action="store_true",
                   help="skip the output-error measurement (no float and quantized evaluation sessions: "
                        "less time and peak memory)")
    g.add_argument("--per-layer", action="store_true",
                   help="measure every linear layer's output SQNR vs the float graph (report; worst shown)")
    g.add_argument("--report", metavar="JSON", help="write a JSON report here, and a Markdown one beside it (.md)")
    g.add_argument("--plot", metavar="PNG", help="plot the per-layer output SQNR to this PNG (implies --per-layer; "
                   "needs matplotlib)")


def _add_verbosity(p, default) -> None:
    """-v / -q, accepted before and after the subcommand (a subcommand's copy does not reset the other)."""
    p = next((g for g in p._action_groups if g.title == "runtime"), p)
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress details")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    d = QuantConfig()
    parser = _Parser(
        prog="segquant-onnx",
        description="Quantize an exported ONNX diffusion model (DiT, UNet, transformer) to a Q/DQ graph "
                    "that ONNX Runtime runs and TensorRT builds.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="calibrate and write a quantized model", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Calibrate on DATA, insert INT8 (or FP8) Q/DQ on every linear site, write OUT.")
    _add_quantize_options(q, d)
    q.set_defaults(func=_cmd_quantize)

    i = sub.add_parser("inspect", help="list the linear sites a model has, without calibrating",
                       description="Print the quantization plan: every linear site and every declined node.")
    i.add_argument("model", nargs="?", metavar="MODEL")
    i.add_argument("--example", action="store_true", help="inspect the bundled example DiT")
    i.add_argument("--json", metavar="PATH", help="write the plan as JSON to PATH (.json; '-' for stdout)")
    i.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    i.add_argument("--explain", action="store_true", help="list every declined node with its reason")
    _add_model_choices(_groups(i), d)
    i.set_defaults(func=_cmd_inspect)

    se = sub.add_parser("sensitivity", help="rank linear sites by their effect on the output error",
                        description="Quantize each linear site alone and measure the model output SQNR on held-back "
                                    f"calibration feeds (every {d.calibration.holdout_every}th); most sensitive first.")
    se.add_argument("model", metavar="MODEL")
    se.add_argument("--calib", metavar="DATA", help="calibration data (.npz or directory)")
    se.add_argument("--top", type=positive_int, default=20, help="rows to print (default: %(default)s)")
    se.add_argument("--calib-method", choices=CALIB_METHODS, default=d.calibration.method.value,
                    help="as for quantize (default: %(default)s)")
    se.add_argument("--report", metavar="JSON", help="write the full JSON report here (and a Markdown one beside it)")
    se.add_argument("--force", action="store_true", help="replace the report if it exists")
    se_groups = _groups(se)
    _add_model_choices(se_groups, d)
    _add_workers(se_groups["runtime"], d)
    se.set_defaults(func=_cmd_sensitivity)
    for module in EXTRA_COMMANDS:  # other subcommands live in their own modules: add_parser(sub)
        importlib.import_module(module).add_parser(sub)
    for p in sub.choices.values():
        _add_verbosity(p, argparse.SUPPRESS)
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
    except RuntimeError as exc:
        from segquant_onnx.calib.workers import WorkerError  # a worker failed twice: one line, no stack trace
        if not isinstance(exc, WorkerError):
            raise
        print(f"segquant-onnx: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("segquant-onnx: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the checks ran before any work: this is the machine (disk full, I/O error)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"segquant-onnx: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
