"""Sensitivity and fallback, decided at the model output on held-back calibration feeds.

Both run one analysis session: the quantized graph built with a gate input per site, where each
site reads `x + g * (DQ(Q(x)) - x)` (and the same for its weight), so feeding g = 0/1 picks which sites
are quantized without rebuilding anything. At all gates 0 the graph computes the float model exactly.

- sensitivity: output SQNR with one site quantized at a time (N + 1 passes per feed);
- fallback: starting from everything quantized, return the most sensitive sites to float, one at a
  time, until the output SQNR on the held-back feeds reaches the target or the FLOP budget is spent.

With a target and at least MIN_SPLIT_FEEDS (6) held-back feeds, the feeds are split in two halves (even and odd
positions): the ranking and the greedy fallback run on the first, and the second, which it did not choose
on, checks the result: the whole fallback stays if it beats everything quantized there; otherwise the prefix
of its sites that scores best there (none, if no prefix beats everything quantized), of the prefixes whose last
site raised the first half's SQNR to a new high. Why: a few held-back
feeds overfit. Measured on a real text detector (PP-OCRv4, 6 held-back tiles): the greedy fallback put 24
sites in float for 15.8 -> 19.3 dB on those tiles while the eval tiles fell from 14.1 to 10.8 dB. Why the
whole first: a fallback that holds up on the other half is not trimmed to that half's own best prefix.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from itertools import count

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
from tqdm import tqdm

from segquant_onnx.analysis.evaluate import OutputError
from segquant_onnx.analysis.gates import gate_name, gated_graph
from segquant_onnx.config import FallbackConfig
from segquant_onnx.ir.runtime import run_all
from segquant_onnx.params import Quantization
from segquant_onnx.plan import LinearSite, QuantPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSensitivity:
    site: str
    flops: int
    output_sqnr_db: float  # model output SQNR with only this site quantized (with `group` > 1: only its group)
    group: int = 1  # sites quantized together in the run that gave output_sqnr_db (grouped ranking's tail)


@dataclass(frozen=True)
class Fallback:
    sites: tuple[str, ...]  # left in float, most sensitive first
    output_sqnr_db: float  # on the held-back feeds, with those sites in float
    start_sqnr_db: float  # with every site quantized
    int8_flop_fraction: float
    reached: bool
    proposed: int = 0  # sites the greedy search proposed on the first half of a split (0: no split)


class GatedSession:
    """An analysis session and the float reference on the held-back feeds: the output SQNR for any
    set of gates switched to 1. The reference is the session with every gate 0 unless given (when
    gates 0 is not the float model)."""

    def __init__(self, session: ort.InferenceSession, feeds: list[dict[str, np.ndarray]], gates: list[str],
                 reference: list[list[np.ndarray]] | None = None):
        self.session, self.feeds, self.gates = session, feeds, gates
        self._errors: dict[frozenset, OutputError] = {}
        self.outputs = [o.name for o in session.get_outputs()]
        self.reference = reference if reference is not None else self._run_all(set())

    def _run_all(self, on: set[str]) -> list[list[np.ndarray]]:
        gates = {g: np.array(1.0 if g in on else 0.0, np.float32) for g in self.gates}
        return run_all(self.session, self.outputs, [{**feed, **gates} for feed in self.feeds])

    def error_on(self, on: set[str]) -> OutputError:
        """Output error over all outputs and held-back feeds with the gates `on` at 1 (each set run once: the
        fallback asks again for sets the ranking or the greedy search already ran)."""
        key = frozenset(on)
        if key not in self._errors:
            err = OutputError()
            for ref, got in zip(self.reference, self._run_all(on)):
                for r, g in zip(ref, got):
                    err.update(r, g)
            self._errors[key] = err
        return self._errors[key]

    def sqnr_on(self, on: set[str]) -> float:
        """Output SQNR (dB) over all outputs and held-back feeds with the gates `on` at 1."""
        return self.error_on(on).sqnr


class GatedModel(GatedSession):
    """The analysis graph with one gate per site: output SQNR for a set of quantized sites."""

    def __init__(self, session: ort.InferenceSession, feeds: list[dict[str, np.ndarray]], sites: list[LinearSite]):
        self.sites = sites
        super().__init__(session, feeds, [gate_name(s.name) for s in sites])

    def sqnr(self, quantized: set[str]) -> float:
        """Output SQNR (dB) with `quantized` sites quantized, the others in float."""
        return self.sqnr_on({gate_name(name) for name in quantized})

    def error(self, quantized: set[str]) -> OutputError:
        return self.error_on({gate_name(name) for name in quantized})


def rank_sensitivity(model: GatedModel, progress: bool = True, sites: list[LinearSite] | None = None,
                     refine_flops: float | None = None) -> list[SiteSensitivity]:
    """Each of `sites` (default: all of the model's) quantized alone; most sensitive (lowest output SQNR) first.
    With `refine_flops` and more than GROUPED_MIN_SITES sites: grouped (`_grouped`), exact until the sites ranked
    alone hold that many FLOPs."""
    sites = model.sites if sites is None else sites
    if refine_flops is not None and len(sites) > GROUPED_MIN_SITES:
        return _grouped(model, sites, refine_flops, progress)
    ranked = [SiteSensitivity(s.name, s.flops, round(model.sqnr({s.name}), 3))
              for s in tqdm(sites, desc="sensitivity", unit="site", disable=None if progress else True, leave=False)]
    return sorted(ranked, key=lambda r: r.output_sqnr_db)


# up to this many sites one run per site: the grouped ranking took more runs than that on the real MiniLM (24
# sites: 36 runs per ranking, noise spread over many sites), fewer on the real ViT (77 sites: 65)
GROUPED_MIN_SITES = 64


def _grouped(model: GatedModel, sites: list[LinearSite], refine_flops: float, progress: bool) -> list[SiteSensitivity]:
    """Group testing: output noise power adds up over sites quantized together (to first order), so a group's noise
    bounds each of its sites'. Contiguous groups of about sqrt(N) sites are run first; the noisiest group is split
    in halves, each run, until the noisiest is a single site: that site is the next most sensitive (no other site
    can be noisier than the group that holds it), and is ranked with its own SQNR. That repeats until the sites
    ranked alone hold `refine_flops`; the rest follow group by group, each site with its group's SQNR (`group`).
    The fallback only reads the head of the ranking. Why: on the real terrain UNet (256 sites, two rankings per run,
    one per smoothing setting) `best` timed out at 600 s; with this and the outlier sweep's budget it took 247 s."""
    order = count()  # ties broken by the order groups were run: deterministic
    heap: list = []
    bar = tqdm(desc="sensitivity (grouped)", unit="run", disable=None if progress else True, leave=False)

    def run(group: tuple[LinearSite, ...]) -> None:
        err = model.error({s.name for s in group})
        heapq.heappush(heap, (-err.noise, next(order), group, err))
        bar.update()

    size = max(1, round(math.sqrt(len(sites))))
    for i in range(0, len(sites), size):
        run(tuple(sites[i:i + size]))
    ranked, alone = [], 0.0
    while heap and alone < refine_flops:
        _, _, group, err = heapq.heappop(heap)
        if len(group) == 1:
            ranked.append(SiteSensitivity(group[0].name, group[0].flops, round(err.sqnr, 3)))
            alone += group[0].flops
            continue
        half = len(group) // 2
        run(group[:half])
        run(group[half:])
    bar.close()
    for _, _, group, err in sorted(heap, key=lambda item: item[:2]):
        ranked += [SiteSensitivity(s.name, s.flops, round(err.sqnr, 3), len(group)) for s in group]
    return ranked


def greedy_fallback(model: GatedModel, ranking: list[SiteSensitivity], target_db: float | None,
                    max_fallback_pct: float, check: GatedModel | None = None) -> Fallback:
    """Put the most sensitive sites back to float until `target_db` is reached (or the budget of
    `max_fallback_pct` percent of the sites' FLOPs is spent, or FALLBACK_PATIENCE sites in a row reach no new
    high). With `check` (the other half of a split), each new high is scored there too, and the search stops after
    CHECK_PATIENCE new highs in a row that raise nothing there (`validated` scores those prefixes anyway)."""
    total = sum(s.flops for s in model.sites) or 1
    quantized = {s.name for s in model.sites}
    start = current = best = model.sqnr(quantized)
    kept, spent, best_len = [], 0, 0
    checked, misses = (check.sqnr(quantized) if check is not None else None), 0
    for r in ranking:
        if target_db is None or current >= target_db:
            break
        if 100.0 * (spent + r.flops) / total > max_fallback_pct:
            continue  # too expensive: try the next, cheaper one
        quantized.discard(r.site)
        kept.append(r.site)
        spent += r.flops
        current = model.sqnr(quantized)
        log.info("fallback %s -> %.2f dB", r.site, current)
        if current > best:
            best, best_len = current, len(kept)
            if check is not None:
                there = check.sqnr(quantized)
                checked, misses = (there, 0) if there > checked else (checked, misses + 1)
                if misses >= CHECK_PATIENCE:
                    log.info("fallback: %d new highs in a row raised nothing on the held-back feeds it does not "
                             "choose on (%.2f dB there): stopped", CHECK_PATIENCE, checked)
                    break
        elif len(kept) - best_len >= FALLBACK_PATIENCE:
            log.info("fallback: %d sites in a row without a new high (%.2f dB): stopped", FALLBACK_PATIENCE, best)
            break
    reached = target_db is None or current >= target_db
    return Fallback(tuple(kept), round(current, 3), round(start, 3), 1.0 - spent / total, reached)


# the greedy fallback stops after this many float sites in a row that take the output SQNR to no new high (the target
# out of reach): on the real terrain UNet in FP8 (--preset best, target 40) it wandered 29.3-31.7 dB for 22 sites after
# its high, each step a run of the gated graph (about 5 s there), and its second fallback took 69 steps. 8 cost the
# demo DiT 0.2 dB on eval (37.54 -> 37.33: 25 float sites, not 30); 16 leaves it as it was
FALLBACK_PATIENCE = 16

# with a split, the greedy fallback stops after this many new highs in a row on the feeds it chooses on that raise the
# output SQNR on the other half to no new high: it is fitting its own feeds. Measured (--preset best): the real text
# detector's fallback reached 5 new highs in 23 sites, none raising the other half, every site dropped by `validated`;
# it now stops at the seventh site. On the demo DiT 3 cost 0.3 dB on eval (17 float sites, not 30: 37.25 against
# 37.54 dB), 4 gave 37.57 (28 sites), 5 leaves it as it was
CHECK_PATIENCE = 5


def validated(fallback: Fallback, chose: GatedModel, check: GatedModel, target_db: float | None) -> Fallback:
    """`fallback` (chosen on `chose`'s feeds) if its sites raise the output SQNR on `check`'s feeds, else the
    prefix of its sites with the highest SQNR there (of the prefixes that end on a new high on `chose`'s feeds, and
    the whole), the shortest of equals; its SQNR over both sets of feeds."""
    every = {s.name for s in chose.sites}
    whole, none = len(fallback.sites), check.sqnr(every)
    full = check.sqnr(every - set(fallback.sites)) if whole else none
    if full > none:
        scores, k = {0: none, whole: full}, whole
    else:
        # the candidate prefixes: those whose last site raised the SQNR on the feeds it was chosen on to a new high
        # (the greedy search ran each prefix there: memoized); one whose last site bought nothing there is not
        # scored. Measured on the real text detector (--preset best): 23 sites proposed, 5 such prefixes
        chose_db = [chose.sqnr(every - set(fallback.sites[:j])) for j in range(whole + 1)]
        ends = [j for j in range(1, whole) if chose_db[j] > max(chose_db[:j])]
        scores = {0: none, whole: full, **{j: check.sqnr(every - set(fallback.sites[:j])) for j in ends}}
        k = max(scores, key=lambda j: (scores[j], -j))
    kept = fallback.sites[:k]
    log.info("fallback checked on %d held-back feeds it did not choose on: %d of %d sites kept (%.2f -> %.2f dB "
             "there)", len(check.feeds), k, whole, scores[0], scores[k])
    quantized = every - set(kept)
    current = chose.error(quantized).merged(check.error(quantized)).sqnr
    start = chose.error(every).merged(check.error(every)).sqnr
    flops = {s.name: s.flops for s in chose.sites}
    fraction = 1.0 - sum(flops[name] for name in kept) / (sum(flops.values()) or 1)
    return Fallback(kept, round(current, 3), round(start, 3), fraction,
                    target_db is None or current >= target_db, proposed=len(fallback.sites))


# held-back feeds from which the fallback chooses on half and checks on the other half: with 4 (tiny SD3 and FLUX),
# the greedy search reached the target on its 2 feeds with 1 float site where all 4 asked for 5 and 2, and eval
# fell 7-8 dB (48.74 -> 41.69, 47.63 -> 39.56 dB); the text detector that overfit had 6
MIN_SPLIT_FEEDS = 6


def analyse(graph: gs.Graph, plan: QuantPlan, q: Quantization, held_back: list[dict[str, np.ndarray]],
            config: FallbackConfig, sessions, progress: bool = True) -> tuple[list[SiteSensitivity], Fallback | None]:
    """Sensitivity ranking and (with `config.target_sqnr`) the fallback set, at the model output on the
    `held_back` feeds, in one analysis session (`sessions.open_graph`) of `graph` (left as it is)
    quantized as `q` says with a gate per site. With a target and MIN_SPLIT_FEEDS feeds or more, the ranking
    and the greedy search use half of them and the other half checks its sites (`validated`)."""
    session = sessions.open_graph(gated_graph(graph, plan, q), fold_dequantize=True)
    split = config.target_sqnr is not None and len(held_back) >= MIN_SPLIT_FEEDS
    model = GatedModel(session, held_back[0::2] if split else held_back, list(plan.sites))
    candidates, refine = model.sites, None
    if not config.sensitivity:
        # the ranking serves only the fallback: none is needed where everything quantized already reaches the
        # target on these feeds, and a site whose FLOPs alone pass the budget is never picked (greedy_fallback).
        # Neither changes the fallback; measured on the real ViT (--preset best): its two rankings of 77 sites took
        # 88 s each of a 309 s run, and the first ended with no site in float.
        total = sum(s.flops for s in plan.sites) or 1
        reached = model.sqnr({s.name for s in plan.sites}) >= config.target_sqnr
        candidates = [] if reached else [s for s in plan.sites if 100.0 * s.flops / total <= config.max_fallback_pct]
        # only the ranking's head matters: grouped, exact for sites holding twice the budget's FLOPs (the greedy
        # search skips sites that no longer fit, so it may read past the budget's worth)
        refine = 2.0 * config.max_fallback_pct / 100.0 * total
    ranking = rank_sensitivity(model, progress, candidates, refine)
    fallback = None
    if config.target_sqnr is not None:
        check = GatedModel(session, held_back[1::2], list(plan.sites)) if split else None
        fallback = greedy_fallback(model, ranking, config.target_sqnr, config.max_fallback_pct, check)
        if split:
            fallback = validated(fallback, model, check, config.target_sqnr)
    return ranking, fallback
