"""``bench.py --suite workers``: calibration wall time with 1 and 2 workers (``--workers``) on the trained demo
DiT with its 80 calibration feeds, and with those feeds repeated 10 times (800 feeds: the same per-feed cost,
10x the work per worker start), the default recipe, each run a measured subprocess (``_ours-worker``);
the calibrate stage's time comes from the report's ``stage_seconds``. It also checks that every run wrote
the same bytes, and writes the "Workers" section of BENCHMARKS.md (the rest of the file is kept).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import shlex
import statistics
import textwrap
from pathlib import Path

import numpy as np

from benchkit.cases import DATA_DIR
from benchkit.launch import run_measured
from benchkit.provenance import load_average, machine_info
from benchkit.real import kept_section, replace_section
from benchkit.workers import worker_command

log = logging.getLogger(__name__)

SECTION_TITLE = "## Workers"
WORKER_COUNTS = (1, 2)
MODEL, CALIB = DATA_DIR / "demo_dit.onnx", DATA_DIR / "demo_dit_calib.npz"
FEEDS = 80  # demo_dit_calib.npz: 80 feeds of batch 1
REPEATS = 10  # the second case: the 80 feeds 10 times over


def _repeated_calib(work_dir: Path) -> Path:
    path = work_dir / f"demo_dit_calib_x{REPEATS}.npz"
    with np.load(CALIB) as npz:
        np.savez(path, **{k: np.concatenate([npz[k]] * REPEATS) for k in npz.files})
    return path


def _run(workers: int, calib: Path, work_dir: Path, i: int, timeout_s: float) -> dict:
    tag = f"{calib.stem}_w{workers}_{i}"
    out, report = work_dir / f"{tag}.onnx", work_dir / f"{tag}.json"
    fields = json.dumps({"runtime": {"workers": workers}})
    cmd = worker_command("ours", str(MODEL), str(calib), "-", str(out), str(report), fields)
    rc, seconds, rss, text = run_measured(cmd, work_dir / f"{tag}.log", timeout_s)
    if rc != 0:
        raise RuntimeError(f"--workers {workers} run {i} failed (exit {rc}): {text.strip().splitlines()[-1:]}")
    stages = json.loads(report.read_text())["stage_seconds"]
    return {"wall": seconds, "calibrate": stages["calibrate"], "rss": rss,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def _table(cases: dict[str, dict[int, list[dict]]]) -> list[str]:
    lines = ["| calibration data | workers | calibrate s (median) | calibrate s (all runs) | ratio to 1 worker "
             "| whole run s (median) | largest process peak RSS MiB | output sha256 |",
             "|---|---:|---:|---|---:|---:|---:|---|"]
    for name, runs in cases.items():
        base = statistics.median(r["calibrate"] for r in runs[WORKER_COUNTS[0]])
        for n, rs in runs.items():
            cal = statistics.median(r["calibrate"] for r in rs)
            each = ", ".join(f"{r['calibrate']:.2f}" for r in rs)
            lines.append(f"| {name} | {n} | {cal:.2f} | {each} | {cal / base:.2f} | "
                         f"{statistics.median(r['wall'] for r in rs):.2f} | {max(r['rss'] or 0 for r in rs):.0f} | "
                         f"{rs[0]['sha256'][:12]} |")
    return lines


def run_workers_suite(args, argv: list[str]) -> int:
    started = datetime.datetime.now().astimezone()
    load_at_start = load_average()
    work_dir = args.work_dir.resolve() / "workers"
    work_dir.mkdir(parents=True, exist_ok=True)
    calibs = {f"{FEEDS} feeds": CALIB, f"{FEEDS} feeds x{REPEATS}": _repeated_calib(work_dir)}
    cases: dict[str, dict[int, list[dict]]] = {name: {} for name in calibs}
    for i in range(args.repeat):  # interleaved, so a burst of load from others hits every count alike
        for name, calib in calibs.items():
            for n in WORKER_COUNTS:
                cases[name].setdefault(n, []).append(_run(n, calib, work_dir, i, args.timeout))
                log.info("%s, --workers %d, run %d: %s", name, n, i, cases[name][n][-1])
    same = all(len({r["sha256"] for rs in runs.values() for r in rs}) == 1 for runs in cases.values())
    per_feed = {name: statistics.median(r["calibrate"] for r in runs[1]) / (FEEDS * (REPEATS if "x" in name else 1))
                for name, runs in cases.items()}
    wrap = lambda text: textwrap.fill(text, 110, break_on_hyphens=False)  # noqa: E731
    parts = [SECTION_TITLE, "",
             wrap(f"Written by `{shlex.join(['python', 'scripts/bench.py', *argv])}` on {started:%Y-%m-%d %H:%M %Z} "
             f"(load average {load_at_start} at the start, {load_average()} at the end): the trained demo DiT, "
             f"its {FEEDS} calibration feeds and the same feeds {REPEATS} times over, the default recipe without "
             f"evaluation, {args.repeat} runs per case (interleaved), each in its own process. Calibrate = the "
             "report's `stage_seconds.calibrate` (worker start-up, a session per worker, the feeds, the merge)."), "",
             *_table(cases), "",
             wrap(f"Every case wrote the same bytes with 1 and 2 workers: {'yes' if same else 'NO'}. One worker: "
                  + ", ".join(f"{v * 1000:.1f} ms per feed ({k})" for k, v in per_feed.items()) + "."), "",
             "Machine: " + "; ".join(machine_info()), ""]
    section = "\n".join(parts)
    print(section)
    write_section(args.markdown, section)
    (work_dir / "bench_results_workers.json").write_text(json.dumps(cases, indent=1))
    return 0 if same else 1


def write_section(md: Path, section: str) -> None:
    """Replace the Workers section of `md` (or append it), keeping the analysis after NOTES_MARK."""
    previous = md.read_text() if md.is_file() else ""
    kept = kept_section(previous, SECTION_TITLE)
    notes = kept.split(NOTES_MARK, 1)[1] if kept and NOTES_MARK in kept else ""
    md.write_text(replace_section(previous, section + (NOTES_MARK + notes if notes else ""), SECTION_TITLE))


# BENCHMARKS.md's hand-written analysis below the table (the scaling worked out on paper) follows this
# marker; a new run keeps it
NOTES_MARK = "<!-- analysis, kept by bench.py --suite workers -->"
