"""Timeline of one token's decode, layers in series, one device queue: how long the FFNs
wait for their bundles when reads are issued at the layer's own FFN input (every strategy
before lookahead) or layers earlier (issue 25): with distance J, layer t's at layer
t - min(J, t)'s FFN input, as the compiled runtime issues them (`ripple compile --lookahead
J`: layer 0 has no layer before it, layers 1..J-1 go as far ahead as they can).

Per layer l the token computes `pre_s[l]` (attention, norms) up to its FFN input, waits for
the layer's bundles, then computes `ffn_s[l]`. Reads are issued at FFN inputs:
- at layer l's input, layer l's `demand` extents (without lookahead: all of its reads; with
  lookahead: the bundles of its own set that neither the cache nor the reads issued ahead
  hold, known only now), and
- the `ahead` extents of every layer t whose source (`sources`) is l (its set predicted from
  layer l's FFN input, tuning.lookahead), which join the same queue as every other layer's.

The device serves requests first in, first out; a request occupies it for
storage_model.service_s(size, q) = latency(size, q) / q (Little's law), q the requests
outstanding when it is issued (those already queued and its own batch), at most
`queue_depth`. Its service is fixed when it is issued: requests issued later and kept in
flight beside it make the later ones cheaper, not it. Back-to-back pieces of one batch are
a stream and cost at most their bytes at the sequential bandwidth, as in storage_model.batch_s.
A batch issued to an empty queue therefore takes exactly batch_s, so without lookahead the
waited time is storage_model.replay's serial per-layer read time, and the strategies'
figures are comparable.

`plan_lookahead_trace` plans what a lookahead strategy issues early and on demand over a
trace; `token_timeline` prices one token's reads; both are pure but for the cache.
`measured_token` runs the same schedule on real reads, the compute emulated by spinning.
"""
from __future__ import annotations

import bisect
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import planner as pl
from .cache import NeuronCache
from .storage_model import StorageProfile, service_s
from .strategies import Strategy, TracePlan, layer_plan

EMPTY = np.zeros((0, 2), np.int64)


class TimelineError(ValueError):
    pass


@dataclass
class LayerReads:
    """One layer's reads in one token: (m, 2) extents (offset, length)."""
    ahead: np.ndarray      # issued at the FFN input of its source layer (`sources`)
    demand: np.ndarray     # issued at this layer's own FFN input


@dataclass
class Timeline:
    """One token. Queue depths are requests outstanding at the device, at most queue_depth;
    the mean is over the time the device had any."""
    waited_s: float               # sum over layers of the time the FFN waited for its bundles
    token_s: float                # compute + waits, first layer's input to last FFN's end
    layer_waited_s: np.ndarray    # (L,)
    bytes_read: int
    requests: int
    max_queue_depth: int
    mean_queue_depth: float


def sources(distance: int, L: int) -> np.ndarray:
    """(L,) the layer whose FFN input each layer's reads ahead are issued at: t - min(J, t);
    -1 where none is (layer 0, or distance 0)."""
    t = np.arange(L)
    return np.where((t > 0) & (distance > 0), t - np.minimum(distance, t), -1)


def request_service_s(p: StorageProfile, extents: np.ndarray, qd: int) -> np.ndarray:
    """(m,) device time of each request of one batch at queue depth qd: service_s, with a
    stream of back-to-back pieces scaled down to its sequential time when that is less
    (storage_model.batch_s's rule, per request, so that the batch sums to batch_s)."""
    ext = np.asarray(extents, np.int64).reshape(-1, 2)
    if len(ext) == 0:
        return np.zeros(0)
    sizes = ext[:, 1].astype(np.float64)
    t = np.asarray(service_s(p, sizes, qd), np.float64).reshape(-1)
    if len(ext) < 2:
        return t
    order = np.argsort(ext[:, 0], kind="stable")
    o, z = ext[order, 0], sizes[order]
    stream = np.empty(len(ext), np.int64)
    stream[order] = np.concatenate(([0], np.cumsum(o[1:] != o[:-1] + z[:-1])))
    table = np.bincount(stream, weights=t)
    seq = np.bincount(stream, weights=sizes) / p.seq_bytes_per_s
    pieces = np.bincount(stream)
    scale = np.where(pieces > 1, np.minimum(table, seq) / table, 1.0)
    return t * scale[stream]


def token_timeline(reads: list[LayerReads], distance: int, pre_s, ffn_s, storage: StorageProfile,
                   queue_depth: int) -> Timeline:
    """reads[l] for each layer l; pre_s, ffn_s: (L,) seconds. Layer t's `ahead` extents are
    issued at layer t - min(distance, t)'s FFN input (`sources`; none for layer 0)."""
    L = len(reads)
    pre_s, ffn_s = np.broadcast_to(np.asarray(pre_s, np.float64), (L,)), \
        np.broadcast_to(np.asarray(ffn_s, np.float64), (L,))
    if queue_depth < 1 or (pre_s < 0).any() or (ffn_s < 0).any():
        raise TimelineError("queue depth must be at least 1 and compute times non-negative")
    src = sources(distance, L)
    for t, r in enumerate(reads):
        if len(r.ahead) and src[t] < 0:
            raise TimelineError(f"layer {t} has reads issued ahead, but no layer before it to issue them at")
    done: list[float] = []         # completion times, increasing (one server, first in first out)
    events: list[tuple[float, int]] = []
    free, now, layer_waited = 0.0, 0.0, np.zeros(L)
    ready = np.zeros(L)            # when each layer's last request completes
    for l in range(L):
        now += pre_s[l]
        batches = [(l, np.asarray(reads[l].demand, np.int64).reshape(-1, 2))]
        batches += [(int(u), np.asarray(reads[u].ahead, np.int64).reshape(-1, 2)) for u in np.flatnonzero(src == l)]
        n_new = sum(len(e) for _, e in batches)
        if n_new:
            # Issued together: all of them are in flight beside what is still outstanding.
            q = min(int(queue_depth), len(done) - bisect.bisect_right(done, now) + n_new)
            for target, ext in batches:
                if not len(ext):
                    continue
                finish = max(now, free) + np.cumsum(request_service_s(storage, ext, q))
                free = float(finish[-1])
                done.extend(finish.tolist())
                ready[target] = max(ready[target], free)
            events.append((now, n_new))
        start = max(now, ready[l])
        layer_waited[l] = start - now
        now = start + ffn_s[l]
    events.extend((t, -1) for t in done)
    max_q, mean_q = _queue_depths(events, int(queue_depth))
    every = [np.asarray(x, np.int64).reshape(-1, 2) for r in reads for x in (r.ahead, r.demand)]
    return Timeline(float(layer_waited.sum()), float(now), layer_waited,
                    int(sum(int(e[:, 1].sum()) for e in every)), int(sum(len(e) for e in every)), max_q, mean_q)


def _queue_depths(events: list[tuple[float, int]], queue_depth: int) -> tuple[int, float]:
    """(max, time-average while non-zero) of min(queue_depth, requests outstanding)."""
    if not events:
        return 0, 0.0
    # At equal times completions go first: a request done as another is issued is not beside it.
    ev = sorted(events, key=lambda e: (e[0], e[1]))
    times = np.array([e[0] for e in ev])
    level = np.minimum(np.cumsum([e[1] for e in ev]), queue_depth)
    dt = np.diff(times)
    busy = level[:-1] > 0
    span = float(dt[busy].sum())
    mean = float((level[:-1][busy] * dt[busy]).sum() / span) if span > 0 else float(level.max())
    return int(level.max()), mean


def layer_reads(tp: TracePlan, t: int) -> list[LayerReads]:
    """What token t of a trace issues per layer: for a strategy without lookahead, every read
    at the layer's own input."""
    if tp.ahead is None:
        return [LayerReads(EMPTY, p.extents) for p in tp.plans[t]]
    return [LayerReads(a.extents, p.extents) for a, p in zip(tp.ahead[t], tp.plans[t])]


def trace_timelines(tp: TracePlan, pre_s, ffn_s, storage: StorageProfile, queue_depth: int) -> list[Timeline]:
    return [token_timeline(layer_reads(tp, t), tp.distance, pre_s, ffn_s, storage, queue_depth)
            for t in range(len(tp.plans))]


def plan_lookahead_trace(s: Strategy, own: np.ndarray, ahead: np.ndarray, distance: int, perm: np.ndarray,
                         cache: NeuronCache, region_offsets: np.ndarray, bundle_bytes: int,
                         storage: StorageProfile, queue_depth: int, warmup: int = 0,
                         align: int = 4096) -> TracePlan:
    """own (L, T, n): each layer's set, known at its FFN input (the same-layer predictor's);
    ahead (L, T, n): layer t's set predicted from its source layer's FFN input (`sources`:
    t - min(distance, t); row 0 is not used). Per token and layer: the ahead plan covers
    the predicted set minus what the cache holds (planned with strategy s's planner); the
    cache then sees the layer's own set as in strategies.plan_trace, and the needed bundles
    no ahead read covers are planned on demand (misses). The first `warmup` tokens only warm
    the cache."""
    own, ahead = np.asarray(own, bool), np.asarray(ahead, bool)
    perm = np.asarray(perm, np.int64)
    L, T, n = own.shape
    if ahead.shape != own.shape or not 1 <= distance < L:
        raise TimelineError(f"lookahead sets {ahead.shape} vs own sets {own.shape}, distance {distance}: "
                            f"need equal shapes and a distance in 1..{L - 1}")
    slot_of = np.argsort(perm, axis=1)
    src = sources(distance, L)

    def plan(l: int, ids: np.ndarray) -> pl.Plan:
        return layer_plan(s, np.sort(slot_of[l][ids]), n, int(region_offsets[l]), bundle_bytes, storage,
                          queue_depth, align)

    def covered(l: int, p: pl.Plan) -> np.ndarray:
        return perm[l][pl.covered_slots(p, int(region_offsets[l]), bundle_bytes, n)]

    plans, aheads, active, hits, misses = [], [], [], [], []
    for t in range(T):
        early = [plan(l, np.zeros(0, np.int64)) for l in range(L)]
        row, act, hit, miss = [], [], [], []
        for l in range(L):
            # The reads of the layers whose source is l are planned at l's input, before those
            # layers are accessed this token: the cache is what it held then.
            for u in np.flatnonzero(src == l):
                ids = np.flatnonzero(ahead[u, t])
                early[u] = plan(int(u), ids[~cache.contains(int(u), ids)])
            ids = np.flatnonzero(own[l, t])
            h = cache.access(t, l, ids)
            need = ids[~h]
            late = need[~np.isin(need, covered(l, early[l]))]
            p = plan(l, late)
            if cache.reads_through:
                cache.read_through(l, np.union1d(covered(l, early[l]), covered(l, p)))
            row.append(p)
            act.append(len(ids))
            hit.append(int(h.sum()))
            miss.append(len(late))
        if t >= warmup:
            plans.append(row)
            aheads.append(early)
            active.append(act)
            hits.append(hit)
            misses.append(miss)
    return TracePlan(s, plans, np.array(active).reshape(-1, L), np.array(hits).reshape(-1, L),
                     {"warmup": warmup, "cache_policy": cache.policy, "cache_entries": cache.entries,
                      "cache_capacity": cache.capacity},
                     ahead=aheads, distance=distance, misses=np.array(misses).reshape(-1, L))


@dataclass
class MeasuredToken:
    waited_s: float
    token_s: float
    layer_waited_s: np.ndarray    # (L,)


def _spin(seconds: float) -> None:
    """Busy-wait, as compute would hold a core; sleep(0) offers the reader thread the GIL."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(0)


def measured_token(io: ThreadPoolExecutor, reader, reads: list[LayerReads], distance: int, pre_s,
                   ffn_s) -> MeasuredToken:
    """token_timeline's schedule on real reads: `reader` (runtime_py.reader.FlashReader) reads
    each batch on `io`, one worker (the caller's, started before: a thread started inside would
    be timed), batches first in first out, one read() call (up to its queue depth in flight) at
    a time; the compute between FFN inputs is spun on this thread.
    Unlike the model, batches issued together are not in flight together: the layer's own
    first, then the one issued ahead."""
    L = len(reads)
    pre_s = np.broadcast_to(np.asarray(pre_s, np.float64), (L,))
    ffn_s = np.broadcast_to(np.asarray(ffn_s, np.float64), (L,))
    # A thread waiting for the GIL gets it from a spinning one only after the switch interval
    # (5 ms by default): as long as a whole read here; 20 us keeps the reader thread prompt.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(2e-5)
    try:
        return _measured(io, reader, reads, distance, pre_s, ffn_s)
    finally:
        sys.setswitchinterval(switch)


def _measured(io, reader, reads, distance, pre_s, ffn_s) -> MeasuredToken:
    L = len(reads)
    src = sources(distance, L)
    pending: list[list] = [[] for _ in range(L)]
    waited = np.zeros(L)
    t0 = time.perf_counter()
    for l in range(L):
        _spin(pre_s[l])
        at = time.perf_counter()         # the FFN input: issuing the reads is part of the wait
        if len(reads[l].demand):
            pending[l].append(io.submit(reader.read, reads[l].demand))
        for u in np.flatnonzero(src == l):
            if len(reads[u].ahead):
                pending[u].append(io.submit(reader.read, reads[u].ahead))
        for f in pending[l]:
            f.result()                   # a read error surfaces here, on the layer that needed it
        waited[l] = time.perf_counter() - at
        _spin(ffn_s[l])
    return MeasuredToken(float(waited.sum()), time.perf_counter() - t0, waited)
