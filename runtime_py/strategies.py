"""I/O strategies that the benchmarks compare: one interface, differing only in policy.

A strategy is a placement (tuning.placement), a planner policy (runtime_py.planner) and a
cache policy (runtime_py.cache). Given a layer's active neurons for each token, it says
which bundles are in DRAM and which extents to read; `plan_trace` does that for a whole
activation trace, so a benchmark can time the reads or hand them to the storage model.

- dense:    every bundle of every layer, read in large requests (llama.cpp-like streaming
            of the FFN weights, with no DRAM to keep them);
- llmflash: checkpoint order, one read per active bundle, windowing cache (k = 5)
            (LLM in a Flash, Alizadeh et al. 2023);
- ripple:   Ripple's placement, access collapse, linking-aligned S3-FIFO cache
            (arXiv 2410.19274);
- ours:     our placement, the cheapest plan by the storage model, and a hybrid cache: a
            share of the budget pinned (moved off the read path by the layout), by frequency
            or by what a bundle costs to read (cache.io_value: its bytes, and a request each
            time it would be read alone), the rest LRU, which also keeps what a plan read in
            its gaps (read-through); what it pins by and the share are those the storage
            model finds fastest on calibration masks (`tune`);
- lookahead: ripple's placement, planner and cache, with each layer's predicted set read
            `distance` layers early (tuning.lookahead; issue 25) and what that missed read
            on demand: runtime_py.lookahead_timeline plans and prices it. Ripple's policy
            and not ours, so that against `ripple` at the same DRAM budget the one
            difference is when the reads are issued (ours' cheapest plan also prices a
            plan at its own queue depth, which reads issued ahead share with others).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import planner as pl
from .cache import NeuronCache, io_value, make_cache, pinned_last
from .storage_model import StorageProfile, gap_threshold_bytes

PLANNERS = ("region", "bundles", "collapse", "cheapest")


@dataclass(frozen=True)
class Strategy:
    name: str
    placement: str                 # a tuning.placement strategy
    planner: str                   # one of PLANNERS
    cache: str                     # a runtime_py.cache policy
    pinned_last: bool = False      # layout puts the pinned cache's bundles at region ends
    pinned_share: float | None = None   # hybrid cache: share pinned; None = choose (`tune`)
    pin_by: str | None = "frequency"   # pinned/hybrid: "frequency", "io" (cache.io_value); None = choose (`tune`)
    read_through: bool = False     # hybrid's LRU part keeps what plans read in their gaps
    # pin_by "io": the values, from the strategy's placement before pinned bundles move
    # (`tune` fixes them, so that every cache built for the laid-out file pins the same ones).
    pin_value: np.ndarray | None = field(default=None, compare=False, repr=False)
    # Layers ahead its reads are issued (runtime_py.lookahead_timeline): 0 at the layer's own
    # FFN input; None: choose among a lookahead file's distances.
    distance: int | None = 0

    def describe(self) -> dict:
        return {"placement": self.placement, "planner": self.planner, "cache": self.cache,
                "pinned_last": self.pinned_last, "pinned_share": self.pinned_share,
                "pin_by": self.pin_by, "read_through": self.read_through, "distance": self.distance}


STRATEGIES: dict[str, Strategy] = {
    "dense": Strategy("dense", "identity", "region", "none"),
    "llmflash": Strategy("llmflash", "identity", "bundles", "window"),
    "ripple": Strategy("ripple", "ripple", "collapse", "linking"),
    "ours": Strategy("ours", "ours", "cheapest", "hybrid", pinned_last=True, pin_by=None, read_through=True),
    "lookahead": Strategy("lookahead", "ripple", "collapse", "linking", distance=None),
}
PIN_BY = ("frequency", "io")


class StrategyError(ValueError):
    pass


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def layer_plan(s: Strategy, slots: np.ndarray, n_slots: int, region_offset: int, bundle_bytes: int,
               storage: StorageProfile, queue_depth: int, align: int = 4096) -> pl.Plan:
    """The extents strategy `s` reads for one layer, given the slots it must fetch."""
    if s.planner == "region":
        return pl.plan_region(n_slots, region_offset, bundle_bytes, storage, queue_depth, align)
    if s.planner == "bundles":
        return pl.plan_bundles(slots, region_offset, bundle_bytes, align)
    if s.planner == "collapse":
        return pl.plan_collapse(slots, region_offset, bundle_bytes, storage, queue_depth, align)
    if s.planner == "cheapest":
        return pl.plan_cheapest(slots, region_offset, bundle_bytes, storage, queue_depth, align)
    raise StrategyError(f"strategy {s.name}: unknown planner {s.planner!r}; one of {', '.join(PLANNERS)}")


def build_cache(s: Strategy, budget_bytes: int, bundle_bytes: int, perm: np.ndarray,
                calib_masks: np.ndarray) -> NeuronCache:
    if s.cache == "hybrid" and s.pinned_share is None:
        raise StrategyError(f"strategy {s.name}: choose its pinned share first (strategies.tune)")
    if s.pin_by is None and s.cache in ("pinned", "hybrid"):
        raise StrategyError(f"strategy {s.name}: choose what it pins by first (strategies.tune)")
    if s.pin_by not in PIN_BY + (None,):
        raise StrategyError(f"strategy {s.name}: pin_by {s.pin_by!r} is not one of {', '.join(PIN_BY)}")
    if s.pin_by == "io" and s.cache in ("pinned", "hybrid") and s.pin_value is None:
        raise StrategyError(f"strategy {s.name}: compute its pin values first (strategies.tune)")
    return make_cache(s.cache, budget_bytes, bundle_bytes, perm, calib_masks,
                      1.0 if s.pinned_share is None else s.pinned_share,
                      value=s.pin_value if s.pin_by == "io" else None, read_through=s.read_through)


def layout_perm(s: Strategy, perm: np.ndarray, cache: NeuronCache) -> np.ndarray:
    """The placement the flash file is written in: the strategy's, with pinned bundles
    moved to the end of each region when the strategy asks for it."""
    perm = np.asarray(perm, np.int64)
    if not s.pinned_last:
        return perm
    if not hasattr(cache, "pinned"):
        raise StrategyError(f"strategy {s.name}: pinned_last needs a pinned cache, not {cache.policy}")
    return np.stack([pinned_last(perm[l], cache.pinned(l)) for l in range(len(perm))])


@dataclass
class TracePlan:
    """One strategy's reads over a trace: plans[t][l] for measured token t and layer l."""
    strategy: Strategy
    plans: list[list[pl.Plan]]
    active: np.ndarray             # (T, L) active bundles per token and layer
    hits: np.ndarray               # (T, L) of those, already in DRAM
    meta: dict = field(default_factory=dict)
    # Lookahead (runtime_py.lookahead_timeline.plan_lookahead_trace): ahead[t][l] is issued
    # `distance` layers early, plans[t][l] on demand; misses (T, L): bundles read on demand.
    ahead: list[list[pl.Plan]] | None = None
    distance: int = 0
    misses: np.ndarray | None = None

    def _layers(self, t: int) -> list[list[pl.Plan]]:
        return [[p] for p in self.plans[t]] if self.ahead is None else \
            [[a, p] for a, p in zip(self.ahead[t], self.plans[t])]

    def extents(self, t: int) -> list[np.ndarray]:
        """Per layer, every extent it reads (ahead and on demand, by offset)."""
        out = []
        for ps in self._layers(t):
            e = np.concatenate([p.extents for p in ps]) if len(ps) > 1 else ps[0].extents
            out.append(e[np.argsort(e[:, 0], kind="stable")] if len(ps) > 1 else e)
        return out

    def bytes_read(self) -> np.ndarray:
        return np.array([sum(p.bytes_read for ps in self._layers(t) for p in ps) for t in range(len(self.plans))])

    def reads(self) -> np.ndarray:
        return np.array([sum(len(p.extents) for ps in self._layers(t) for p in ps) for t in range(len(self.plans))])

    def on_demand(self) -> np.ndarray:
        """(T, L) bundles read once the layer's own set is known: without lookahead, all it needs."""
        return self.active - self.hits if self.misses is None else self.misses


def plan_trace(s: Strategy, masks: np.ndarray, perm: np.ndarray, cache: NeuronCache,
               region_offsets: np.ndarray, bundle_bytes: int, storage: StorageProfile,
               queue_depth: int, warmup: int = 0, align: int = 4096) -> TracePlan:
    """masks (L, T, n) bool, perm (L, n) as laid out on flash. The first `warmup` tokens
    only warm the cache; plans are kept for the tokens after them."""
    masks = np.asarray(masks, bool)
    perm = np.asarray(perm, np.int64)
    L, T, n = masks.shape
    slot_of = np.argsort(perm, axis=1)
    plans, active, hits = [], [], []
    for t in range(T):
        row, act, hit = [], [], []
        for l in range(L):
            ids = np.flatnonzero(masks[l, t])
            h = cache.access(t, l, ids) if s.planner != "region" else np.zeros(len(ids), bool)
            if t < warmup and not cache.reads_through:
                continue
            slots = np.sort(slot_of[l][ids[~h]])
            plan = layer_plan(s, slots, n, int(region_offsets[l]), bundle_bytes, storage, queue_depth, align)
            if cache.reads_through:
                cache.read_through(l, perm[l][pl.covered_slots(plan, int(region_offsets[l]), bundle_bytes, n)])
            if t < warmup:
                continue
            row.append(plan)
            act.append(len(ids))
            hit.append(int(h.sum()))
        if t >= warmup:
            plans.append(row)
            active.append(act)
            hits.append(hit)
    return TracePlan(s, plans, np.array(active).reshape(-1, L), np.array(hits).reshape(-1, L),
                     {"warmup": warmup, "cache_policy": cache.policy, "cache_entries": cache.entries,
                      "cache_capacity": cache.capacity})


PINNED_SHARES = (1.0, 0.75, 0.5)


def virtual_offsets(n_layers: int, n: int, bundle_bytes: int, align: int = 4096) -> np.ndarray:
    """Region offsets of a layout of these sizes (header block, aligned regions), for
    planning before any file is written."""
    region = -(-n * bundle_bytes // align) * align
    return align + np.arange(n_layers, dtype=np.int64) * region


def tune(s: Strategy, calib: np.ndarray, perm: np.ndarray, bundle_bytes: int, budget_bytes: int,
         storage: StorageProfile, queue_depth: int, tokens: int = 32, warmup: int = 16) -> tuple[Strategy, dict]:
    """Fix what a strategy leaves open, on calibration masks, never on held-out ones: what the
    pinned part pins by (pin_by None: "frequency" or "io", cache.io_value on `perm` with a
    request's cost from `storage`) and the hybrid cache's pinned share, both by the storage
    model's per-token I/O on the last calibration tokens. Neither wins everywhere: pinning
    lone bundles cut relu-synthetic's modelled I/O by 3%, and lost hits on relu-tiny."""
    pins = PIN_BY if s.pin_by is None else (s.pin_by,)
    if s.cache not in ("pinned", "hybrid"):
        return s, {}
    cands = []
    for pin in pins:
        value = io_value(calib, perm, gap_threshold_bytes(storage, queue_depth) / bundle_bytes) \
            if pin == "io" and s.pin_value is None else s.pin_value
        cands.append(replace(s, pin_by=pin, pin_value=value if pin == "io" else None))
    shares = PINNED_SHARES if s.cache == "hybrid" and s.pinned_share is None else (s.pinned_share,)
    if len(cands) == 1 and len(shares) == 1:
        return cands[0], {}
    from .storage_model import replay
    calib = np.asarray(calib, bool)
    L, T, n = calib.shape
    trace = calib[:, max(0, T - tokens - warmup):]
    w = min(warmup, max(trace.shape[1] - 1, 0))
    offsets = virtual_offsets(L, n, bundle_bytes)
    modelled, best = {}, None
    for c in cands:
        for share in shares:
            cand = replace(c, pinned_share=share)
            cache = build_cache(cand, budget_bytes, bundle_bytes, perm, calib)
            laid = layout_perm(cand, perm, cache)
            cache = build_cache(cand, budget_bytes, bundle_bytes, laid, calib)
            tp = plan_trace(cand, trace, laid, cache, offsets, bundle_bytes, storage, queue_depth, w)
            ms = float(replay(storage, [tp.extents(t) for t in range(len(tp.plans))], queue_depth).mean() * 1e3)
            modelled.setdefault(c.pin_by, {})[share] = ms
            if best is None or ms < best[0]:
                best = (ms, cand)
    return best[1], {"modelled_ms": modelled}


def layer_planner(s: Strategy, storage: StorageProfile, queue_depth: int, n_slots: int):
    """The strategy's planner as the engine calls it: (slots, region_offset, bundle_bytes,
    align) -> Plan."""
    def plan(slots, region_offset, bundle_bytes, align=4096):
        return layer_plan(s, slots, n_slots, region_offset, bundle_bytes, storage, queue_depth, align)
    return plan
