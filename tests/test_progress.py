"""Progress bars of the auto searches: every slow phase advances (per trial, per site, per feed)."""

from __future__ import annotations

import re

from tqdm import tqdm

from conftest import build_linear_model
from segquant_onnx import pipeline
from segquant_onnx.analysis import held_back, outlier_search
from segquant_onnx.solve import choose, fit
from segquant_onnx.config import QuantConfig


class _Drawn(tqdm):
    """A bar as on a terminal (tqdm hides bars off one: disable=None), drawn at every update rather than
    at most every 0.1 s, so the final counts of these fast runs reach stderr."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("disable") is None:
            kwargs["disable"] = False
        super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})


def _counts(err: str, desc: str) -> list[tuple[int, int]]:
    """(n, total) of every drawing of the bar named `desc`."""
    return [(int(n), int(t)) for n, t in re.findall(rf"{re.escape(desc)}: +\d+%\|[^|]*\| (\d+)/(\d+)", err)]


def test_auto_searches_show_advancing_bars(write_calib, capsys, monkeypatch):
    for module in (held_back, choose, fit, outlier_search):
        monkeypatch.setattr(module, "tqdm", _Drawn)
    model, calib = build_linear_model("matmul"), write_calib("matmul", n=8)  # every 4th feed held back: 2
    config = QuantConfig(calibration={"method": "auto"}, smoothquant={"mode": "auto"})
    capsys.readouterr()
    shown = pipeline.quantize(model, calib, config, progress=True, evaluate=False)
    err = capsys.readouterr().err
    sites, duals = len(shown.plan.sites), len(shown.plan.dual)
    assert (sites, duals) == (2, 1)
    # 4 trials: SmoothQuant auto/off x DualScale auto/off; each solves every site and scores 2 feeds
    # (no "held-back reference" bar: calibration computed the reference on those feeds)
    expected = {"checking choices": 4, "solving sites": sites, "DualScale gains": duals,
                "scoring held-back feeds": 2}
    for desc, total in expected.items():
        counts = _counts(err, desc)
        assert counts and {t for _, t in counts} == {total}, (desc, counts)
        assert max(n for n, _ in counts) == total, (desc, counts)  # advanced to the end, not stuck at 0
    assert not _counts(err, "held-back reference")
    quiet = pipeline.quantize(model, calib, config, progress=False, evaluate=False)
    assert capsys.readouterr().err == ""
    assert shown.model.SerializeToString() == quiet.model.SerializeToString()  # progress changes no number

