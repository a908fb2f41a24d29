"""`segquant-onnx demo`: FP32 vs naive INT8 vs SegQuant images from the bundled demo DiT
(the work is segquant_onnx.diffusion.demo; this is its command line)."""

from __future__ import annotations

from pathlib import Path

from segquant_onnx.cli.argtypes import positive_int
from segquant_onnx.diffusion.demo import DEMO_PRECISIONS, W4A8_LOW_RANK, format_metrics, run_demo


def _cmd_demo(args) -> int:
    metrics = run_demo(Path(args.output_dir), args.steps, args.seeds, args.classes, progress=not args.quiet,
                       save_models=args.save_models, force=args.force, precision=args.precision)
    print(format_metrics(metrics))
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="FP32 vs naive INT8 vs SegQuant images from the bundled trained demo DiT",
                       description="Quantize the bundled demo DiT naively and with SegQuant, sample the same seeds "
                                   "with all three through ONNX Runtime, write an image grid and a per-step error "
                                   "plot, print PSNR/SSIM vs the FP32 images. Files in DIR are kept unless --force.")
    d.add_argument("-o", "--output-dir", default="segquant_demo", metavar="DIR", help="default: %(default)s")
    d.add_argument("--steps", type=positive_int, default=20, metavar="N", help="Euler steps (default: %(default)s)")
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noise seeds (default: 0 1 2)")
    d.add_argument("--classes", type=int, nargs="+", default=None, help="digit classes (default: all)")
    d.add_argument("--precision", choices=tuple(DEMO_PRECISIONS), default="int8",
                   help="int8: naive INT8 vs SegQuant's defaults (default); w4a8: naive W4A8 (INT4 weights rounded "
                        "to nearest, no SegLinear/DualScale) vs the best W4A8 recipe (--preset best with GPTQ and "
                        f"--low-rank {W4A8_LOW_RANK})")
    d.add_argument("--save-models", action="store_true", help="also write the two quantized .onnx files to DIR")
    d.add_argument("--force", action="store_true", help="replace the files of an earlier run in DIR")
    d.set_defaults(func=_cmd_demo)
