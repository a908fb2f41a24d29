"""Evaluate: output error of a quantized graph against the floating-point graph, streamed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from segquant_onnx.solve.quant_math import sqnr_db


@dataclass
class OutputError:
    """Accumulated error of one output over all evaluated feeds."""

    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0
    dot: float = 0.0
    test_power: float = 0.0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        ref = ref.astype(np.float64)
        test = test.astype(np.float64)
        diff = ref - test
        self.signal += float((ref**2).sum())
        self.noise += float((diff**2).sum())
        self.dot += float((ref * test).sum())
        self.test_power += float((test**2).sum())
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))

    def merged(self, other: OutputError) -> OutputError:
        """The error over both sets of feeds."""
        return OutputError(self.signal + other.signal, self.noise + other.noise, max(self.max_abs, other.max_abs),
                           self.dot + other.dot, self.test_power + other.test_power)

    @property
    def sqnr(self) -> float:
        return sqnr_db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        denom = np.sqrt(self.signal * self.test_power)
        return float(self.dot / denom) if denom > 0 else 1.0

    def to_dict(self) -> dict:
        return {"sqnr_db": round(self.sqnr, 3), "max_abs_error": self.max_abs, "cosine": round(self.cosine, 6)}


def compare_outputs(reference: Callable[[], ort.InferenceSession], test: Callable[[], ort.InferenceSession], feeds,
                    progress: bool = True, total: int | None = None) -> dict[str, OutputError]:
    """Output error of `test()`'s session against `reference()`'s on `feeds`. The two sessions are never alive
    together (each can hold a whole model): the reference runs every feed first and its outputs are kept;
    `feeds` is read twice, or kept as well when it cannot be (`total` None: a one-pass iterable)."""
    session = reference()
    names = [o.name for o in session.get_outputs()]
    kept_feeds = [] if total is None else None
    outputs = []
    with tqdm(feeds, total=total, desc="evaluating (float)", unit="batch", disable=None if progress else True,
              leave=False) as bar:
        for feed in bar:
            outputs.append(session.run(names, feed))
            if kept_feeds is not None:
                kept_feeds.append(feed)
    del session
    session = test()
    errors = {name: OutputError() for name in names}
    with tqdm(zip(feeds if kept_feeds is None else kept_feeds, outputs), total=len(outputs), desc="evaluating",
              unit="batch", disable=None if progress else True, leave=False) as bar:
        for feed, ref in bar:
            for name, r, got in zip(names, ref, session.run(names, feed)):
                errors[name].update(r, got)
    return errors
