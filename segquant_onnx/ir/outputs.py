"""One policy for every path the tool writes: `-o`, `--report`, `--json`, `--plot`, `demo -o`.

Checked together, before any work, for all the outputs of one run:
- the extension fits what is written (`.onnx`, `.json`, `.png`; a folder for the demo);
- never an input of the run (the model, its external data, the calibration or eval data);
- never another output of the same run (a report's `.md` and a model's `.data` count as outputs);
- an existing file only with `--force`;
- the folder exists and a file can really be created there (a probe file, removed at once: permission
  bits alone do not say that `/proc` or a read-only mount refuses writes).

Files are then written atomically (`write_atomic`): a temporary file beside the target, renamed into
place, with the permissions a plain `open()` would give, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from segquant_onnx.errors import UserError


@dataclass(frozen=True)
class Output:
    """A path this run will write. `suffix` is the extension it must have ("" for a folder);
    `companions` are files written beside it (or, for a folder, inside it)."""

    flag: str
    path: Path
    suffix: str
    companions: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        return self.companions if self.suffix == "" else (self.path, *self.companions)


def model_output(path, flag: str = "-o") -> Output:
    """A model: `OUT.onnx`, and its external data `OUT.onnx.data` when it is large."""
    path = Path(path)
    return Output(flag, path, ".onnx", (path.with_name(path.name + ".data"),))


def report_output(path, flag: str = "--report") -> Output:
    """A JSON report and the Markdown one beside it (r.json -> r.md)."""
    path = Path(path)
    return Output(flag, path, ".json", (markdown_path(path),))


def markdown_path(report_path) -> Path:
    """Where the Markdown report goes beside the JSON one: r.json -> r.md (else r.<ext>.md)."""
    p = Path(report_path)
    return p.with_suffix(".md") if p.suffix == ".json" else Path(f"{p}.md")


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # hard links and symlinks too
    return a.resolve() == b.resolve()


def _probe(folder: Path, flag: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".segquant-probe-", dir=folder)
    except OSError as exc:
        raise UserError(f"Output directory {folder} is not writable ({exc.strerror}); choose another {flag} "
                        "path.") from None
    os.close(fd)
    os.unlink(probe)


def check_outputs(outputs: Sequence[Output], inputs: Iterable, force: bool) -> None:
    """Refuse, with one sentence naming the flag and path, any output that breaks the policy above."""
    inputs = [Path(p) for p in inputs if p is not None]
    seen: list[tuple[Path, str]] = []
    for out in outputs:
        if out.suffix and out.path.suffix.lower() != out.suffix:
            raise UserError(f"{out.flag} {out.path} must end in {out.suffix}; choose a {out.suffix} path.")
        if not out.suffix and out.path.exists() and not out.path.is_dir():
            raise UserError(f"{out.flag} {out.path} is a file, not a folder; choose a folder path.")
        for f in (out.path, *out.files):
            for given in inputs:
                if _same(f, given) or (given.is_dir() and given.resolve() in f.resolve().parents):
                    what = "is" if f == out.path and _same(f, given) else f"would write {f} into or over"
                    raise UserError(f"{out.flag} {out.path} {what} an input of this run ({given}); choose "
                                    "another path.")
            for other, flag in seen:
                if _same(f, other):
                    raise UserError(f"{out.flag} {out.path} would overwrite {other}, written by {flag} in this "
                                    "run; give each output its own path.")
        for f in out.files:
            if f.exists() and not force:
                raise UserError(f"Output file {f} already exists; remove it or pass --force to replace it.")
        seen += [(f, out.flag) for f in (out.path, *out.files)]
        folder = out.path if not out.suffix else out.path.parent
        while not out.suffix and not folder.exists():  # a folder output is created with its parents
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"Output directory {folder} does not exist; create it first or choose another "
                            f"{out.flag} path.")
        _probe(folder, out.flag)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path` (same extension), then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; the user's other files get their umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))
