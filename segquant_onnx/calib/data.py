"""Calibration data: `.npz` files, a directory of them (streamed), or any iterable of feed dicts.

Layout of an `.npz`: one array per graph input. Axis 0 counts samples. An array of the model input's
rank is cut along axis 0 into batches of the model's static batch size (or `batch_size` when the
batch is dynamic); an array of one rank more holds one whole feed per entry of axis 0.

Everything that can be checked without reading the data (names, dtypes, ranks, static dims) is
checked up front; NaN/Inf are checked batch by batch as data streams. The same reader opens eval and
compare data: its `role` names the data and its CLI flag in every message.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_BATCH = 8


@dataclass(frozen=True)
class DataRole:
    """What the data is for, as messages name it: `Eval data file x.npz (--eval) ...`."""

    noun: str  # "eval data"
    flag: str  # the CLI flag (or environment variable) that passes it

    @property
    def title(self) -> str:
        return self.noun[0].upper() + self.noun[1:]

    def file(self, path) -> str:
        return f"{path} ({self.flag})"


ROLES = {
    "calibration": DataRole("calibration data", "--calib"),
    "eval": DataRole("eval data", "--eval"),
    "compare": DataRole("compare data", "--data"),
    "polygraphy": DataRole("Polygraphy data", "SEGQUANT_DATA"),  # scripts/polygraphy_data_loader.py
}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for static dims, str/None for dynamic ones

    @property
    def static_batch(self) -> int | None:
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None


def model_inputs(graph: gs.Graph) -> list[InputSpec]:
    """The data each graph input takes: its own type, except bfloat16, which .npz cannot hold and which the
    sessions run through a float32 shadow of the graph (ir.runtime.float32_shadow): float32 data."""
    return [
        InputSpec(t.name, np.dtype(np.float32) if t.dtype == onnx.TensorProto.BFLOAT16 else np.dtype(t.dtype),
                  tuple(t.shape) if t.shape is not None else ())
        for t in graph.inputs
    ]


def _npz_headers(path: Path, role: DataRole) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the arrays in an .npz without loading them."""
    try:
        with zipfile.ZipFile(path) as zf:
            headers = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                headers[info.filename[:-4]] = (tuple(shape), np.dtype(dtype))
            return headers
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UserError(f"{role.title} file {role.file(path)} is not a readable .npz archive ({exc}).") from None


@dataclass(frozen=True)
class _FileLayout:
    path: Path
    num_feeds: int
    num_samples: int  # in the first input's array; a feed is a whole batch of them
    stacked: dict[str, bool]  # input name -> one feed per axis-0 entry
    batch: int


def _count(name: str, samples: int, batches: int, batch: int) -> str:
    """`'x': 20 samples (2 batches of 8)`: what one input's array holds, for a mismatch message."""
    return f"'{name}': {samples} samples" + (f" ({batches} batches of {batch})" if batch != 1 else "")


def _layout(path: Path, inputs: list[InputSpec], batch_size: int | None, role: DataRole) -> _FileLayout:
    headers = _npz_headers(path, role)
    where = role.file(path)
    names = {s.name for s in inputs}
    missing = [s.name for s in inputs if s.name not in headers]
    if missing:
        raise UserError(
            f"{role.title} file {where} has no array for model input '{missing[0]}'; "
            f"add one (the model's inputs are {sorted(names)})."
        )
    extra = sorted(set(headers) - names)
    if extra:
        log.warning("%s file %s: ignoring arrays that are not model inputs: %s", role.noun, where, extra)

    static = {s.static_batch for s in inputs if len(s.shape) and s.static_batch is not None}
    batch = static.pop() if len(static) == 1 else (batch_size or DEFAULT_DYNAMIC_BATCH)
    stacked, feeds, samples, per_feed_batch = {}, {}, {}, {}  # per input
    for spec in inputs:
        shape, dtype = headers[spec.name]
        if dtype != spec.dtype:
            raise UserError(
                f"{role.title} array '{spec.name}' in {where} is {dtype}, but the model input expects "
                f"{spec.dtype}; convert it with .astype(np.{spec.dtype})."
            )
        rank = len(spec.shape)
        if len(shape) == rank + 1:
            stacked[spec.name], feeds[spec.name], per_feed = True, shape[0], shape[1:]
            per_feed_batch[spec.name] = shape[1] if rank else 1
            samples[spec.name] = shape[0] * per_feed_batch[spec.name]
        elif len(shape) == rank and rank > 0:
            stacked[spec.name], per_feed = False, (batch,) + shape[1:]
            feeds[spec.name], samples[spec.name], per_feed_batch[spec.name] = shape[0] // batch, shape[0], batch
            if shape[0] % batch:
                log.warning("%s array '%s' in %s: %d samples is not a multiple of the batch size %d; "
                            "the last %d samples are not used", role.noun, spec.name, where, shape[0], batch,
                            shape[0] % batch)
        else:
            raise UserError(
                f"{role.title} array '{spec.name}' in {where} has rank {len(shape)}, but the model input "
                f"has rank {rank}; give it rank {rank} (samples on axis 0) or {rank + 1} (one feed per entry)."
            )
        for got, want in zip(per_feed, spec.shape):
            if isinstance(want, int) and got != want:
                raise UserError(
                    f"{role.title} array '{spec.name}' in {where} has per-feed shape {tuple(per_feed)}, but "
                    f"the model input has shape {spec.shape}; fix the array's shape."
                )
    if len(set(feeds.values())) > 1:
        counts = ", ".join(_count(n, samples[n], feeds[n], per_feed_batch[n]) for n in feeds)
        unit = "samples" if len(set(samples.values())) > 1 else "batches"  # same samples, cut differently
        raise UserError(
            f"{role.title} arrays in {where} disagree on the number of {unit} ({counts}); "
            "give every input the same number."
        )
    num_feeds = next(iter(feeds.values()), 0)
    return _FileLayout(path, num_feeds, next(iter(samples.values()), 0), stacked, batch)


def _check_finite(feed: Mapping[str, np.ndarray], where: str, role: DataRole) -> None:
    for name, arr in feed.items():
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise UserError(f"{role.title} input '{name}' in {where} contains NaN or Inf; clean the data.")


def check_feed(feed: Mapping[str, np.ndarray], inputs: list[InputSpec], where: str,
               role: DataRole = ROLES["calibration"]) -> dict[str, np.ndarray]:
    """Validate one feed dict given from Python; return only the model's inputs."""
    out = {}
    for spec in inputs:
        if spec.name not in feed:
            raise UserError(f"{role.title} {where} has no value for model input '{spec.name}'.")
        arr = np.asarray(feed[spec.name])
        if arr.dtype != spec.dtype:
            raise UserError(
                f"{role.title} input '{spec.name}' in {where} is {arr.dtype}, but the model expects "
                f"{spec.dtype}; convert it with .astype(np.{spec.dtype})."
            )
        if arr.ndim != len(spec.shape) or any(
            isinstance(w, int) and g != w for g, w in zip(arr.shape, spec.shape)
        ):
            raise UserError(
                f"{role.title} input '{spec.name}' in {where} has shape {arr.shape}, but the model "
                f"input has shape {spec.shape}."
            )
        out[spec.name] = np.ascontiguousarray(arr)
    _check_finite(out, where, role)
    return out


class CalibrationData:
    """An iterable of validated feed dicts. `len()` is known for .npz sources (None otherwise)."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]] | None, inputs: list[InputSpec],
                 files: list[_FileLayout] = (), description: str = "calibration data",
                 role: DataRole = ROLES["calibration"]):
        self._feeds, self._inputs, self._files = feeds, inputs, list(files)
        self.description, self.role = description, role

    def __len__(self) -> int:
        if self._feeds is not None:
            raise TypeError("length unknown for a Python iterable")
        return sum(f.num_feeds for f in self._files)

    @property
    def num_feeds(self) -> int | None:
        return None if self._feeds is not None else len(self)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._feeds is not None:
            for i, feed in enumerate(self._feeds):
                yield check_feed(feed, self._inputs, f"feed {i}", self.role)
            return
        for layout in self._files:
            with np.load(layout.path) as npz:
                arrays = {s.name: npz[s.name] for s in self._inputs}  # one file in memory at a time
            for i in range(layout.num_feeds):
                feed = {}
                for name, arr in arrays.items():
                    if layout.stacked[name]:
                        feed[name] = np.ascontiguousarray(arr[i])
                    else:
                        feed[name] = np.ascontiguousarray(arr[i * layout.batch:(i + 1) * layout.batch])
                _check_finite(feed, f"{self.role.file(layout.path)}, feed {i}", self.role)
                yield feed


def open_calibration(source, inputs: list[InputSpec], batch_size: int | None = None, *,
                     role: str = "calibration") -> CalibrationData:
    """Validate `source` (path to .npz or a directory of them, or an iterable of feed dicts).

    `role` (a key of `ROLES`: "calibration", "eval", "compare", ...) names the data and the flag that
    passed it in every message.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, not {role!r}")
    what = ROLES[role]
    if isinstance(source, CalibrationData):
        return source
    if isinstance(source, Mapping):  # one in-memory npz-like dict of stacked arrays: not supported
        raise UserError(f"Pass {what.noun} as a .npz path, a directory, or an iterable of feed dicts.")
    if not isinstance(source, (str, Path)):
        return CalibrationData(iter(source), inputs, description="Python feeds", role=what)

    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise UserError(f"{what.title} directory {what.file(path)} holds no .npz files; add some or pass a file.")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"{what.title} {what.file(path)} does not exist; pass a .npz file or a directory of them.")
    layouts = [_layout(f, inputs, batch_size, what) for f in files]
    data = CalibrationData(None, inputs, layouts, description=str(path), role=what)
    if len(data) == 0:
        samples, batch = sum(f.num_samples for f in layouts), layouts[0].batch
        held = "zero samples" if samples == 0 else f"{samples} samples, fewer than one batch of {batch}"
        raise UserError(f"{what.title} {what.file(path)} holds {held}; it needs at least one full batch "
                        f"({batch} sample{'s' if batch != 1 else ''}).")
    return data
