"""Regenerate the README's demo table and images from one run of `segquant-onnx demo`.

Runs `segquant_onnx.diffusion.demo.run_demo` with the README's settings (20 Euler steps, seeds 0 1 2, all
classes) into a temporary directory, copies `demo_grid.png`, `demo_step_error.png` and
`demo_metrics.json` into docs/demo/, and rewrites the README's table (and its "Measured (N s)") from
the metrics the demo returned, rounded as `segquant-onnx demo` prints them.
tests/test_readme_numbers.py checks the table against a fresh run.

With ``--precision w4a8`` it renders the W4A8 grid instead (naive W4A8 vs SegQuant's best W4A8 recipe,
`segquant-onnx demo --precision w4a8`) into docs/demo/ as `demo_grid_w4a8.png`, `demo_step_error_w4a8.png`
and `demo_metrics_w4a8.json`, prints the metrics and leaves the README as it is (its W4A8 paragraph quotes them).

Usage::

    python scripts/readme_demo.py                     # needs the `demo` extra (Pillow, matplotlib)
    python scripts/readme_demo.py --precision w4a8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segquant_onnx.diffusion.demo import DEMO_PRECISIONS, format_metrics, run_demo

ROOT = Path(__file__).resolve().parents[1]
README, DOCS = ROOT / "README.md", ROOT / "docs" / "demo"
STEPS, SEEDS, CLASSES = 20, (0, 1, 2), None  # the README's settings: all classes
HEADER = "| method | PSNR dB | SSIM | output SQNR dB (eval feeds) | mean per-step SQNR dB |"
IMAGES = ("demo_grid.png", "demo_step_error.png")
MEASURED = re.compile(r"Measured \(\d+(?:\.\d+)? s\)")


def table_rows(metrics: dict) -> list[str]:
    """One Markdown row per method, rounded as `format_metrics` prints (PSNR/SQNR 0.01 dB, SSIM 1e-4)."""
    rows = []
    for name, m in metrics["methods"].items():
        sq = m["eval_output_sqnr_db"]
        rows.append(f"| {name} | {m['psnr_db']:.2f} | {m['ssim']:.4f} | {'n/a' if sq is None else f'{sq:.2f}'} | "
                    f"{np.mean(m['step_sqnr_db_same_input']):.2f} |")
    return rows


def rewrite_readme(text: str, metrics: dict, seconds: float | None = None) -> str:
    """`text` with the demo table's rows (and the "Measured (N s)" before it) replaced."""
    lines = text.split("\n")
    if lines.count(HEADER) != 1:
        raise SystemExit(f"README: expected the demo table header once, found it {lines.count(HEADER)} times:\n{HEADER}")
    start = lines.index(HEADER) + 2  # after the |---| line
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = table_rows(metrics)
    text = "\n".join(lines)
    if seconds is not None:
        text = MEASURED.sub(f"Measured ({seconds:.0f} s)", text, count=1)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the images go (default: docs/demo)")
    parser.add_argument("--precision", choices=tuple(DEMO_PRECISIONS), default="int8",
                        help="int8: the README's table and images (default); w4a8: the W4A8 grid, files suffixed "
                             "_w4a8, the README left as it is")
    args = parser.parse_args(argv)
    suffix = "" if args.precision == "int8" else f"_{args.precision}"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="segquant-readme-demo-") as tmp:
        out = Path(tmp) / "demo"
        started = time.perf_counter()
        metrics = run_demo(out, steps=STEPS, seeds=SEEDS, classes=CLASSES, progress=False, precision=args.precision)
        seconds = time.perf_counter() - started
        print(format_metrics(metrics))
        args.docs.mkdir(parents=True, exist_ok=True)

        def copy_name(name: str) -> str:
            return f"{Path(name).stem}{suffix}{Path(name).suffix}"

        for name in IMAGES:
            shutil.copyfile(out / name, args.docs / copy_name(name))
        # the metrics file lists where the run wrote: the temporary folder; name the copies instead
        metrics["files"] = [str((args.docs / copy_name(Path(f).name)).relative_to(ROOT))
                            if args.docs.is_relative_to(ROOT) else str(args.docs / copy_name(Path(f).name))
                            for f in metrics["files"]]
        (args.docs / copy_name("demo_metrics.json")).write_text(json.dumps(metrics, indent=1, default=float))
    if args.precision != "int8":
        print(f"demo ran in {seconds:.1f} s; wrote {', '.join(map(copy_name, IMAGES))} and "
              f"{copy_name('demo_metrics.json')} to {args.docs}; README left as it is")
        return 0

    text = rewrite_readme(args.readme.read_text(), metrics, seconds)
    tmp_readme = args.readme.with_name(args.readme.name + ".tmp")
    tmp_readme.write_text(text)
    os.replace(tmp_readme, args.readme)
    print(f"demo ran in {seconds:.1f} s; wrote {', '.join(IMAGES)} and demo_metrics.json to {args.docs}; "
          f"updated the table in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
