"""Solve: plan + statistics -> quantization parameters (pure numpy, no graph, no session)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from segquant_onnx.config import QuantConfig
from segquant_onnx.observers import Stats
from segquant_onnx.plan import QuantPlan
from segquant_onnx.quant_math import activation_amax, scale_from_amax, weight_scales


@dataclass(frozen=True)
class SiteParams:
    """Scales of one linear site: activation per tensor, weight per output channel."""

    act_amax: float
    act_scale: float
    weight_scale: np.ndarray
    method: str


def solve(plan: QuantPlan, stats: Stats, weight: Callable[[str], np.ndarray],
          config: QuantConfig) -> dict[str, SiteParams]:
    params = {}
    for site in plan.sites:
        amax = activation_amax(stats[site.activation], config.calib_method, config.percentile)
        params[site.name] = SiteParams(
            act_amax=amax,
            act_scale=float(scale_from_amax(amax)),
            weight_scale=weight_scales(weight(site.weight), site.weight_axis),
            method=config.calib_method,
        )
    return params
