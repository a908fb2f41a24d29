"""Observers: reduce each calibration batch to running statistics at once.

Memory does not grow with the calibration set: a tensor's statistics are a few scalars, one vector
over its last axis, and a fixed-size histogram of |x|. Statistics of two shards merge exactly, so
calibration can be split across processes and reduced afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

NUM_BINS = 2048
_MIN_RANGE = 2.0**-24


def _pow2_ceil(x: float) -> float:
    return 2.0 ** math.ceil(math.log2(max(x, _MIN_RANGE)))


@dataclass
class TensorStats:
    """Running statistics of one tensor.

    The histogram covers [0, hist_range) in `len(hist)` equal bins of |x|. Its range is always a
    power of two, so widening it (when a larger value arrives) merges whole bins exactly.
    """

    count: int
    amax: float
    pos_amax: float
    neg_amax: float
    channel_amax: np.ndarray
    hist: np.ndarray
    hist_range: float
    neg_count: int = 0
    # per last-axis channel: max(x, 0) and max(-x, 0); with channel_amax they give the exact range of
    # x / s for any per-channel smoothing vector s
    channel_pos_amax: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    channel_neg_amax: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    # the axis the per-channel vectors run over: -1 (the last, K of a MatMul/Gemm input) or 1 (NCHW)
    channel_axis: int = -1

    @classmethod
    def empty(cls, num_bins: int = NUM_BINS, channel_axis: int = -1) -> "TensorStats":
        """No data yet; the per-channel vector takes its size from the first batch."""
        return cls(0, 0.0, 0.0, 0.0, np.zeros(0, np.float32), np.zeros(num_bins, np.int64), _MIN_RANGE,
                   channel_axis=channel_axis)

    def _widen(self, new_range: float) -> None:
        factor = int(round(new_range / self.hist_range))
        if factor <= 1:
            return
        n = len(self.hist)
        merged = np.add.reduceat(self.hist, np.arange(0, n, factor))  # any bin count, last group may be short
        self.hist = np.zeros(n, np.int64)
        self.hist[: len(merged)] = merged
        self.hist_range = new_range

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        a = np.abs(x)
        amax = float(a.max())
        self.amax = max(self.amax, amax)
        self.pos_amax = max(self.pos_amax, float(x.max()))
        self.neg_amax = max(self.neg_amax, float(-x.min()))
        ch = x.ndim > self.channel_axis if self.channel_axis >= 0 else x.ndim > 0
        if ch and self.count == 0:
            c = x.shape[self.channel_axis]
            self.channel_amax = np.zeros(c, np.float32)
            self.channel_pos_amax = np.zeros(c, np.float32)
            self.channel_neg_amax = np.zeros(c, np.float32)
        if ch and self.channel_amax.size == x.shape[self.channel_axis]:
            rows = np.moveaxis(x, self.channel_axis, -1).reshape(-1, self.channel_amax.size)
            np.maximum(self.channel_amax, np.abs(rows).max(axis=0), out=self.channel_amax)
            np.maximum(self.channel_pos_amax, rows.max(axis=0), out=self.channel_pos_amax)
            np.maximum(self.channel_neg_amax, -rows.min(axis=0), out=self.channel_neg_amax)
        if amax >= self.hist_range:
            self._widen(_pow2_ceil(amax * (1 + 2**-20)))
        n = len(self.hist)
        idx = np.minimum((a.ravel() * (n / self.hist_range)).astype(np.int64), n - 1)
        self.hist += np.bincount(idx, minlength=n)
        self.neg_count += int(np.count_nonzero(x < 0))
        self.count += x.size

    def merge(self, other: "TensorStats") -> "TensorStats":
        """Combine two shards' statistics (in place; returns self)."""
        rng = max(self.hist_range, other.hist_range)
        self._widen(rng)
        other_hist = TensorStats(0, 0, 0, 0, other.channel_amax, other.hist.copy(), other.hist_range)
        other_hist._widen(rng)
        self.hist += other_hist.hist
        self.count += other.count
        self.neg_count += other.neg_count
        self.amax = max(self.amax, other.amax)
        self.pos_amax = max(self.pos_amax, other.pos_amax)
        self.neg_amax = max(self.neg_amax, other.neg_amax)
        for name in ("channel_amax", "channel_pos_amax", "channel_neg_amax"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine.size == 0:
                setattr(self, name, theirs.copy())
            elif mine.shape == theirs.shape:
                np.maximum(mine, theirs, out=mine)
        return self

    @property
    def bin_edges(self) -> np.ndarray:
        return np.linspace(0.0, self.hist_range, len(self.hist) + 1)


Stats = dict[str, TensorStats]


def merge_stats(a: Stats, b: Stats) -> Stats:
    """Merge shard `b` into `a` and return `a`."""
    for name, stats in b.items():
        if name in a:
            a[name].merge(stats)
        else:
            a[name] = stats
    return a


class RowSample:
    """A bounded, deterministic uniform sample of a tensor's rows (vectors over its last axis).

    Searches that need a layer's real outputs (DualScale's decision, later SmoothQuant's alpha) run on
    this sample instead of storing activations: at most `max_rows` rows are kept (reservoir
    sampling with a fixed seed, so results are reproducible).
    """

    def __init__(self, max_rows: int = 512, seed: int = 0):
        self.max_rows = max_rows
        self.rows: np.ndarray | None = None
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        rows = x.reshape(-1, x.shape[-1])
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]), np.float32)
        room = self.max_rows - len(self.rows)
        if room > 0:
            self.rows = np.concatenate([self.rows, rows[:room]])
        rest = rows[max(room, 0):]
        if len(rest):
            # reservoir: row number t (0-based, over all rows seen) replaces a random slot with p = k/(t+1)
            t = self.seen + max(room, 0) + np.arange(len(rest))
            slots = (self._rng.random(len(rest)) * (t + 1)).astype(np.int64)
            keep = slots < self.max_rows
            self.rows[slots[keep]] = rest[keep]
        self.seen += len(rows)
