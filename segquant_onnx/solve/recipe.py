"""The recipe: every decision choose takes, and nothing fit computes (pure data, no numbers from statistics
except the measurements that decided).

    choose(fit statistics, row sample, held-back feeds) -> Recipe -> fit(all statistics) -> Quantization

A recipe decided on one set of statistics and fitted on another gives the second's scales with the
first's decisions: that is how the choices are scored on held-back data and the final scales still see
every calibration feed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np

from segquant_onnx.config import CalibMethod, DualScaleMode, SmoothQuantMode
from segquant_onnx.formats import INT8, QuantFormat, Scheme, scheme_of
from segquant_onnx.params import DualDecision

SITE_METHODS = tuple(m.value for m in CalibMethod if m is not CalibMethod.AUTO)  # what a site is fitted with


def site_methods(fmt: QuantFormat | Scheme) -> tuple[str, ...]:
    """What `--calib-method auto` compares per site: entropy (INT8's uniform levels) is INT8's only
    (a weight-only scheme's activation threshold is INT8's: reported, not inserted)."""
    act = scheme_of(fmt).activations or INT8
    return SITE_METHODS if act.dtype is np.int8 else tuple(m for m in SITE_METHODS if m != CalibMethod.ENTROPY)


@dataclass(frozen=True)
class Variant:
    """One point of the search over the global modes (what `auto` compares at the model output):
    SmoothQuant `auto`, `off` or `fixed` (with `alpha`); DualScale `auto`, `all` or `off`. Strings are
    converted to the modes."""

    smoothquant: SmoothQuantMode
    dualscale: DualScaleMode
    alpha: float | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "smoothquant", SmoothQuantMode(self.smoothquant))
            object.__setattr__(self, "dualscale", DualScaleMode(self.dualscale))
        except ValueError as exc:
            raise ValueError(f"Variant: {exc}") from None
        fixed = self.smoothquant is SmoothQuantMode.FIXED
        if fixed != (self.alpha is not None) or (fixed and not 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"Variant.alpha must be in [0, 1] with SmoothQuant 'fixed' and only then, "
                             f"got {self.alpha!r}")

    @property
    def smoothquant_flag(self) -> str:
        """As `--smoothquant` writes it: auto, off or the alpha."""
        return f"{self.alpha:g}" if self.smoothquant is SmoothQuantMode.FIXED else self.smoothquant.value


@dataclass(frozen=True)
class SiteChoice:
    """How one site is fitted: its calibration method and SmoothQuant alpha (None: no smoothing), and
    the layer output SQNR on the row sample that chose them (None without a sample)."""

    method: str
    alpha: float | None = None
    layer_sqnr_db: float | None = None

    def __post_init__(self):
        if self.method not in SITE_METHODS:
            raise ValueError(f"SiteChoice.method must be one of {SITE_METHODS}, got {self.method!r}")


def _frozen_channels(outliers: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    frozen = {}
    for name, idx in outliers.items():
        idx = np.array(idx, np.int64)  # a copy: the caller's array stays writable, this one does not
        idx.flags.writeable = False
        frozen[name] = idx
    return MappingProxyType(frozen)


@dataclass(frozen=True, eq=False)
class Recipe:
    """Per site: the calibration method and alpha (`sites`), DualScale yes/no with its measured gain
    (`dual`, one decision per candidate in plan order), the input channels that run in float beside the
    INT8 GEMM (`outliers`), and the sites kept in float altogether (`floating`)."""

    sites: Mapping[str, SiteChoice]
    dual: tuple[DualDecision, ...] = ()
    outliers: Mapping[str, np.ndarray] = field(default_factory=dict)
    floating: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "sites", MappingProxyType(dict(self.sites)))
        object.__setattr__(self, "dual", tuple(self.dual))
        object.__setattr__(self, "outliers", _frozen_channels(self.outliers))
        object.__setattr__(self, "floating", frozenset(self.floating))
        if missing := set(self.outliers) - set(self.sites):
            raise ValueError(f"Recipe: outlier channels for sites without a choice: {sorted(missing)}")

    @property
    def dual_sites(self) -> tuple[str, ...]:
        """The sites that run as two GEMMs (decided to, and not kept in float)."""
        return tuple(d.site for d in self.dual if d.apply and d.site not in self.floating)

    def in_float(self, sites: Iterable[str]) -> Recipe:
        """The same decisions with `sites` kept in float (and no outlier split on them)."""
        floating = frozenset(sites)
        return replace(self, floating=floating,
                       outliers={k: v for k, v in self.outliers.items() if k not in floating})
