"""What a run was measured on: the machine, the versions, the source and data it read, and whether
they changed under it (the benchmark shares its tree with people editing the library)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from benchkit.cases import REPO_ROOT


def source_fingerprint() -> str:
    """Short hash of segquant-onnx's Python sources (the package and the passes it loads), so that a
    report can tell when the library changed while the benchmark ran."""
    digest = hashlib.sha256()
    for folder in (REPO_ROOT / "segquant_onnx", REPO_ROOT / "passes"):
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else ():
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:10]


def file_digest(path: Path) -> str:
    """Short sha256 of a file (models and data can change under a running benchmark too)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    except OSError:
        return "missing"


def case_digests(cases) -> dict[str, str]:
    return {f"{c.name}:{kind}": file_digest(path) for c in cases
            for kind, path in (("onnx", c.onnx_path), ("calib", c.calib_path), ("eval", c.eval_path))}


def git_description() -> str:
    """'<commit> (clean)' or '<commit> + uncommitted changes', or 'not a git checkout'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "segquant_onnx", "passes"],
                               capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"{head} + uncommitted changes" if dirty else f"{head} (clean)"


def machine_info() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return [f"{os.cpu_count()} logical CPUs (nproc {len(os.sched_getaffinity(0))})", f"CPU: {cpu}",
            f"RAM: {ram}", f"OS: {platform.platform()}"]


def versions(modelopt_python: Path | None) -> list[str]:
    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    ort_dist = "onnxruntime-gpu" if dist("onnxruntime-gpu") != "not installed" else "onnxruntime"
    out = [f"Python {platform.python_version()}"]
    out += [f"{n} {dist(n)}" for n in ("segquant-onnx", "numpy", "onnx", ort_dist, "torch", "diffusers",
                                      "tensorrt_rtx_cu12_bindings")]
    main_env = "benchmark env: " + ", ".join(out)
    lines = [main_env]
    if modelopt_python is not None:
        code = ("import importlib.metadata as m\n"
                "for n in ('nvidia-modelopt','onnx','onnxruntime-gpu','onnxruntime','torch','numpy'):\n"
                "    try: print(n, m.version(n))\n"
                "    except m.PackageNotFoundError: pass\n")
        proc = subprocess.run([str(modelopt_python), "-c", code], capture_output=True, text=True)
        lines.append("ModelOpt venv: " + ", ".join(proc.stdout.split("\n")[:-1]))
    return lines


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
