"""Outlier-channel counts chosen per site by their effect at the model output, on held-back feeds.

A site's candidate counts ("levels") come from the calibration statistics: its top channels by
abs-max that pass the ratio rule, cut at each cap of `outlier_candidates` (level 0: none). Which
level each site takes is decided at the model output, because layer-level error ranks these
configurations badly: a layer can lose most of its own error and the output nothing.

One analysis session serves the whole search. Every candidate site is built once per level, each copy
fully quantized as it would be with that level (outlier split, smoothing, DualScale and Q/DQ by the
same rewrites as the output graph, with the scales solve gives for that level), and the copies'
outputs are blended by one-hot gates:

    Y = Y_0 + sum_l g_l * (Y_l - Y_0)          g_l: graph inputs, at most one of them 1

so any assignment of levels to sites is one run per held-back feed, with nothing rebuilt. The search
is one sweep of coordinate descent from the configuration the global-cap trials chose: each site in
turn (the sites with the most candidate channels first) takes, with the others fixed, the fewest
channels whose output SQNR is within `outlier_min_gain_db` of its best level's, within the FLOP budget
of the float branches. The sweep visits at most MAX_SWEEP_SITES sites (the others keep their starting
level), and stops before a site whose runs would take it past SWEEP_BUDGET calibration passes: each visit costs
a run of the level graph (the model plus a copy of each site per extra level) per level and held-back feed,
and on a real conv UNet with 256 sites an unbounded sweep did not end within 25 minutes (capped at 48 sites,
`best` still timed out at 600 s inside it: the level graph there is several times the model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from segquant_onnx.config import OutlierConfig
from segquant_onnx.ir.naming import Namer
from segquant_onnx.plan import QuantPlan
from segquant_onnx.params import Quantization
from segquant_onnx.rewrite import apply_quantization
from segquant_onnx.analysis.gates import typed_gate
from segquant_onnx.analysis.sensitivity import GatedSession
from segquant_onnx.ir.linear import input_channels

log = logging.getLogger(__name__)

COPY_BUDGET_BYTES = 1 << 30  # level copies may always take this much, or as much as the linear weights
MAX_SWEEP_SITES = 48  # sites the sweep visits, most candidate channels first
# the sweep's runs, in runs of the float model on one feed, at most this many calibration passes (each level
# graph run counted by its linear FLOPs over the model's); a bound, not a tuned value: with it the eval SQNR of
# --preset best on the real MiniLM, ViT and text detector stayed what it was without it (to 0.001 dB)
SWEEP_BUDGET = 4.0


@dataclass(frozen=True)
class SiteLevels:
    """A site's candidate outlier sets, by level: `caps[l]` is the cap that gave `channels[l]`."""

    site: str
    caps: tuple[int, ...]
    channels: tuple[np.ndarray, ...]  # channels[0] is empty
    float_flops: tuple[float, ...]  # FLOPs of the float branch at each level


def site_levels(plan: QuantPlan, by_cap: dict[int, dict[str, np.ndarray]]) -> dict[str, SiteLevels]:
    """The distinct outlier sets each site gets under the caps (`by_cap`: cap -> choose_outliers(cap)
    without a FLOP budget); only sites with at least one non-empty set."""
    levels = {}
    for site in plan.sites:
        caps, sets = [0], [np.zeros(0, np.int64)]
        for cap in sorted(by_cap):
            idx = by_cap[cap].get(site.name)
            if idx is not None and len(idx) and not any(np.array_equal(idx, s) for s in sets):
                caps.append(cap)
                sets.append(idx)
        if len(sets) > 1:
            k = input_channels(site)
            levels[site.name] = SiteLevels(site.name, tuple(caps), tuple(sets),
                                           tuple(site.flops * len(s) / k for s in sets))
    return levels


def copies_bytes(plan: QuantPlan, levels: dict[str, SiteLevels]) -> int:
    """Float32 weight bytes the analysis graph adds: one weight per candidate site and level > 0."""
    shapes = {s.name: s.weight_shape for s in plan.sites}
    return sum(4 * int(np.prod(shapes[n])) * (len(lv.channels) - 1) for n, lv in levels.items())


def level_gate(site: str, level: int) -> str:
    return f"outlier_level/{site}/{level}"


def build_level_graph(graph: gs.Graph, plan: QuantPlan, levels: dict[str, SiteLevels],
                      by_cap: dict[int, Quantization]) -> gs.Graph:
    """The analysis graph: `graph` (canonical, not yet quantized) with every site quantized as
    `by_cap[0]` says, plus, per candidate site, one fully quantized copy per level > 0 (params from
    `by_cap[cap of that level]`), blended into the site's output by the level gates (graph inputs)."""
    g = graph.copy()
    nodes = {n.name: n for n in g.nodes}
    namer = Namer(g)
    base = by_cap[0]
    sites = {s.name: s for s in plan.sites}
    duals = {d.site: d for d in plan.dual}
    params, dual, outliers = dict(base.params), dict(base.dual), {}
    copies, dual_copies = [], []
    for name, lv in levels.items():
        node = nodes[name]
        y = node.outputs[0]
        y0 = gs.Variable(namer(name, "level0_output"), dtype=y.dtype, shape=y.shape)
        node.outputs[0] = y0
        acc = y0
        for level in range(1, len(lv.channels)):
            copy = namer(name, f"outliers_level{level}")
            y_l = gs.Variable(namer(copy, "output"), dtype=y.dtype, shape=y.shape)
            g.nodes.append(gs.Node(node.op, copy, dict(node.attrs), inputs=list(node.inputs), outputs=[y_l]))
            gate = gs.Variable(level_gate(name, level), np.float32, shape=[])
            g.inputs.append(gate)
            gate, cast = typed_gate(namer, copy, gate, y.dtype or np.float32)
            g.nodes.extend(cast)
            diff, scaled = (gs.Variable(namer(copy, part), dtype=y.dtype) for part in ("delta", "gated_delta"))
            out = y if level == len(lv.channels) - 1 else gs.Variable(namer(copy, "blend"), dtype=y.dtype)
            g.nodes.append(gs.Node("Sub", namer(copy, "sub"), inputs=[y_l, y0], outputs=[diff]))
            g.nodes.append(gs.Node("Mul", namer(copy, "gate"), inputs=[diff, gate], outputs=[scaled]))
            g.nodes.append(gs.Node("Add", namer(copy, "add"), inputs=[acc, scaled], outputs=[out]))
            acc = out
            q = by_cap[lv.caps[level]]
            copies.append(replace(sites[name], name=copy))
            params[copy], outliers[copy] = q.params[name], lv.channels[level]
            if name in q.dual:
                dual[copy] = q.dual[name]
                dual_copies.append(replace(duals[name], site=copy))
    apply_quantization(g, replace(plan, sites=plan.sites + tuple(copies), dual=plan.dual + tuple(dual_copies)),
                       Quantization(params, dual, outliers, format=base.format))
    return g


@dataclass(frozen=True)
class SearchResult:
    outliers: dict[str, np.ndarray]
    heldback_sqnr_db: float  # of the chosen levels, in the analysis session
    start_sqnr_db: float  # of the starting configuration
    trials: list  # per site: channels and held-back output SQNR of every level tried, and the choice


def search_levels(model: GatedSession, levels: dict[str, SiteLevels], start: dict[str, np.ndarray],
                  budget_flops: float, min_gain_db: float, progress: bool = True,
                  max_runs: int | None = None) -> SearchResult:
    """One coordinate-descent sweep over the sites (see the module docstring); it stops before a site whose
    levels would take its runs of `model` past `max_runs` (the first run, of the start, included)."""
    current = {}
    for name, lv in levels.items():  # the starting level: the one whose channels `start` holds
        idx = start.get(name, lv.channels[0])
        current[name] = next((i for i, c in enumerate(lv.channels) if np.array_equal(c, idx)), 0)
    on = lambda choice: {level_gate(n, l) for n, l in choice.items() if l}  # noqa: E731
    cost = lambda choice: sum(levels[n].float_flops[l] for n, l in choice.items())  # noqa: E731
    score = start_score = model.sqnr_on(on(current))
    order = sorted(levels, key=lambda n: -len(levels[n].channels[-1]))
    if len(order) > MAX_SWEEP_SITES:
        log.info("per-site outlier search: %d of %d sites visited (most candidate channels first)",
                 MAX_SWEEP_SITES, len(order))
        order = order[:MAX_SWEEP_SITES]
    trials, runs = [], 1
    for name in tqdm(order, desc="outlier channels per site", unit="site", disable=None if progress else True,
                     leave=False):
        if max_runs is not None and runs + len(levels[name].channels) - 1 > max_runs:
            log.info("per-site outlier search: stopped after %d of %d sites, at its budget of %d runs",
                     len(trials), len(order), max_runs)
            break
        scores = {}
        for level in range(len(levels[name].channels)):
            trial = {**current, name: level}
            if level != current[name] and cost(trial) > budget_flops:
                continue
            if level != current[name]:
                runs += 1
            scores[level] = score if level == current[name] else model.sqnr_on(on(trial))
        best = max(scores.values())
        pick = min(l for l, s in scores.items() if s >= best - min_gain_db)  # fewest channels near the best
        current[name], score = pick, scores[pick]
        trials.append({"site": name, "chosen_channels": len(levels[name].channels[pick]),
                       "levels": [{"channels": len(levels[name].channels[l]), "heldback_sqnr_db": round(s, 3)}
                                  for l, s in sorted(scores.items())]})
        log.info("outliers %s: %d channels -> %.2f dB", name, len(levels[name].channels[pick]), score)
    log.info("per-site outlier search: %d runs of the level graph over the held-back feeds (budget %s)", runs,
             max_runs)
    chosen = {n: levels[n].channels[l] for n, l in current.items() if l}
    return SearchResult(chosen, score, start_sqnr_db=start_score, trials=trials)


def per_site_outliers(graph: gs.Graph, plan: QuantPlan, config: OutlierConfig, held_back: list,
                      reference: list, by_cap: dict[int, dict[str, np.ndarray]],
                      solve_for: Callable[[dict], Quantization], start: dict[str, np.ndarray],
                      make_session: Callable, progress: bool = True, calibration_runs: int | None = None
                      ) -> SearchResult | None:
    """Choose each site's outlier channels at the model output (None: no site has a choice, or the
    level copies would hold more weight bytes than the model's linear weights and COPY_BUDGET_BYTES:
    then the global cap stays).

    `reference`: the float model's outputs on `held_back`; `by_cap`: cap -> outlier channels per site without a FLOP budget; `solve_for(outliers)` gives the
    quantization (scales, DualScale) for an outlier assignment; `start`: the global-cap choice;
    `make_session(graph)`: a session for the level graph (Sessions.open_graph)."""
    levels = site_levels(plan, by_cap)
    if not levels:
        return None
    extra = copies_bytes(plan, levels)
    limit = max(sum(4 * int(np.prod(s.weight_shape)) for s in plan.sites), COPY_BUDGET_BYTES)
    if extra > limit:
        log.warning("per-site outlier search skipped: its copies would hold %.0f MB of weights, more than the "
                    "model's linear weights (%.0f MB); keeping the global cap", extra / 1e6, limit / 1e6)
        return None
    caps = sorted({c for lv in levels.values() for c in lv.caps})
    quants = {cap: solve_for({n: lv.channels[lv.caps.index(cap)] for n, lv in levels.items() if cap in lv.caps})
              for cap in tqdm(caps, desc="outlier levels", unit="level", disable=None if progress else True,
                              leave=False)}
    analysis = build_level_graph(graph, plan, levels, quants)
    session = make_session(analysis)
    model = GatedSession(session, held_back, [level_gate(n, l) for n, lv in levels.items()
                                              for l in range(1, len(lv.channels))], reference)
    budget = config.max_flop_pct / 100.0 * plan.total_flops
    max_runs = None
    if calibration_runs:  # SWEEP_BUDGET passes, in runs of the level graph on every held-back feed
        flops = {s.name: s.flops for s in plan.sites}
        ratio = 1.0 + sum((len(lv.channels) - 1) * flops[n] for n, lv in levels.items()) / (plan.total_flops or 1)
        max_runs = int(SWEEP_BUDGET * calibration_runs / (ratio * max(len(held_back), 1)))
    return search_levels(model, levels, start, budget, config.min_gain_db, progress, max_runs)
