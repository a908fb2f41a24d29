"""Run one quantizer in its own measured process: wall time, peak RSS (``ru_maxrss``), its log.

Every method (ours and the peers) goes through :func:`run_measured`, so their time and memory are
taken the same way; :func:`repeated` keeps the fastest wall time and the largest peak of N runs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchkit.cases import REPO_ROOT


@dataclass
class QuantRun:
    """What running one quantizer produced (before evaluation)."""

    output: Path | None
    seconds: float | None = None
    peak_rss_mib: float | None = None
    error: str | None = None  # first line of the failure; None when it worked
    self_reported_sqnr: float | None = None  # the tool's own number, where it reports one
    log_path: Path | None = None
    report: dict | None = None  # segquant-onnx's JSON report
    runs: int = 1


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def last_error_line(log_text: str) -> str:
    """The most telling line of a failed tool's log: the last line naming an error, else the last."""
    lines = [ln.strip() for ln in log_text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Exception" in line:
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


# A tiny launcher between the benchmark and each quantizer. Linux carries a process's peak RSS
# across fork + exec (exec folds the old address space's high-water mark into the new program's
# ru_maxrss), so a quantizer started straight from this process would report at least this
# process's own peak (hundreds of MiB once torch is imported for the exports). The launcher is
# ``python -S`` with only os/sys loaded (about 10 MiB); it forks the quantizer, waits for it with
# wait4 and writes that child's ru_maxrss (KiB) to a file.
_LAUNCHER = """
import os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        sys.stderr.write(f"cannot run {cmd[0]}: {exc}\\n")
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def session_rss_mib(sid: int) -> float:
    """Resident memory of every process in session ``sid`` (the launcher's: it and the quantizer), MiB."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat (after the name): the session id
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: resident pages
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


def run_measured(cmd: list[str], log_path: Path, timeout_s: float, rss_limit_gib: float | None = None):
    """Run ``cmd``; return (returncode, or None on timeout, or "rss" when it passed ``rss_limit_gib`` and was
    stopped; wall seconds, peak RSS MiB or None, log).

    Peak RSS is the quantizer process's ``ru_maxrss`` (with any descendants it waited for), taken
    by :data:`_LAUNCHER`; wall time includes the launcher's start-up (a few ms). With ``rss_limit_gib`` the
    process group's RSS is polled twice a second and the group killed once it passes the limit (a peer that
    needs more memory than the machine can spare is a result, not a crashed machine).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log_path.with_suffix(".maxrss")
    rss_file.unlink(missing_ok=True)
    with open(log_path, "w") as log_file:
        log_file.write("$ " + shlex.join(cmd) + "\n")
        log_file.flush()
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *cmd],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                start_new_session=True)
        rc = None
        while True:
            try:
                rc = proc.wait(timeout=0.5 if rss_limit_gib else timeout_s)
                break
            except subprocess.TimeoutExpired:
                over = rss_limit_gib is not None and session_rss_mib(proc.pid) > rss_limit_gib * 1024
                if over or time.perf_counter() - start > timeout_s:
                    os.killpg(proc.pid, 9)  # the launcher and the quantizer share this new session
                    proc.wait()
                    rc = "rss" if over else None
                    break
        seconds = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    rss = int(rss_file.read_text()) / 1024.0 if rss_file.is_file() else None
    return rc, seconds, rss, text


def finish(cmd: list[str], out: Path, log_path: Path, timeout_s: float, rss_limit_gib: float | None = None) -> QuantRun:
    """Run a quantizer command that should write ``out``; a failure is a QuantRun with its error."""
    if out.exists():
        out.unlink()
    rc, seconds, rss, text = run_measured(cmd, log_path, timeout_s, rss_limit_gib)
    run = QuantRun(output=out, seconds=seconds, peak_rss_mib=rss, log_path=log_path)
    if rc == "rss":
        run.error = f"stopped at {rss_limit_gib:g} GiB RSS after {seconds:.0f} s (the run's memory limit)"
    elif rc is None:
        run.error = f"timed out after {timeout_s:.0f} s"
    elif rc != 0:
        run.error = f"exit {rc}: {last_error_line(text)}"
    elif not out.is_file():
        run.error = "exited 0 but wrote no model"
    return run


def repeated(run_once: Callable[[], QuantRun], times: int) -> QuantRun:
    """Run a quantizer ``times`` times (stopping at a failure): the last run, with the fastest wall
    time and the largest peak RSS of all runs."""
    runs = []
    for _ in range(times):
        runs.append(run_once())
        if runs[-1].error is not None:
            return runs[-1]
    last = runs[-1]
    last.seconds = min(r.seconds for r in runs)
    rss = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
    last.peak_rss_mib = max(rss) if rss else None
    last.runs = len(runs)
    return last
