"""I/O planner: active slots of one layer's region -> read extents (pure functions).

A run is a maximal range of consecutive active slots; each run becomes one byte range,
widened to the device block so it can be read with O_DIRECT. Ranges that then share or
touch a block are merged, because reading one block twice is never cheaper than once.
`max_gap_bytes` merges runs whose gap is at most that many bytes (access collapse), and
`max_request_bytes` cuts long extents into requests that keep the device queue busy.

Policies over that one mechanism (all take the device's storage profile, none a constant):
- `plan_region`:    the whole region (dense: every bundle of the layer);
- `plan_bundles`:   one request per active bundle (LLM in a Flash's bundle reads);
- `plan_collapse`:  access collapse (Ripple): merge across a gap when reading it costs no
                    more than one more request at the queue depth the plan will run at
                    (storage_model.gap_threshold_bytes). The queue depth is that of the plan
                    itself, found by iterating; on a bandwidth-bound device (deep queues
                    hide the per-request cost) the threshold, and so the merging, shrinks;
- `plan_cheapest`:  ours: the cheapest, by the storage model, of collapse at a ladder of
                    thresholds (0 ... whole region) and request sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import storage_model as sm


@dataclass
class Plan:
    extents: np.ndarray       # (m, 2) int64: file offset, length; both multiples of align
    run_starts: np.ndarray    # (r,) first slot of each run of active slots
    run_lens: np.ndarray      # (r,) slots in each run
    run_extent: np.ndarray    # (r,) index of the extent that holds each run
    gap_bytes: int = 0        # collapse threshold the plan was made with

    @property
    def bytes_read(self) -> int:
        return int(self.extents[:, 1].sum())


def runs(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of consecutive values in sorted unique slots: (starts, lengths)."""
    if len(slots) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = slots[np.concatenate(([0], breaks))]
    ends = slots[np.concatenate((breaks - 1, [len(slots) - 1]))] + 1
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def plan_reads(slots: np.ndarray, region_offset: int, bundle_bytes: int, align: int = 4096,
               max_gap_bytes: int = 0, max_request_bytes: int = 0) -> Plan:
    runs_ = aligned_runs(slots, region_offset, bundle_bytes, align)
    return merge_runs(runs_, region_offset, bundle_bytes, align, max_gap_bytes, max_request_bytes)


def aligned_runs(slots: np.ndarray, region_offset: int, bundle_bytes: int, align: int = 4096):
    """(starts, lens, a_lo, a_hi): each run of slots and its byte range widened to blocks."""
    slots = np.asarray(slots, dtype=np.int64)
    if len(slots) > 1 and not (slots[1:] > slots[:-1]).all():   # the engine's are sorted already
        slots = np.unique(slots)
    starts, lens = runs(slots)
    lo = region_offset + starts * bundle_bytes
    hi = lo + lens * bundle_bytes
    return starts, lens, lo // align * align, -(-hi // align) * align


def merge_runs(aligned, region_offset: int, bundle_bytes: int, align: int, max_gap_bytes: int,
               max_request_bytes: int = 0) -> Plan:
    starts, lens, a_lo, a_hi = aligned
    # A new extent starts where the gap to the previous run's end exceeds max_gap_bytes.
    new = np.ones(len(starts), dtype=bool)
    if len(starts) > 1:
        new[1:] = a_lo[1:] - a_hi[:-1] > max_gap_bytes
    run_extent = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.concatenate((first[1:] - 1, [len(starts) - 1])) if len(first) else first
    extents = np.stack((a_lo[first], a_hi[last] - a_lo[first]), axis=1).astype(np.int64) \
        if len(first) else np.zeros((0, 2), np.int64)
    plan = Plan(extents, starts, lens, run_extent.astype(np.int64), int(max_gap_bytes))
    return split_requests(plan, region_offset, bundle_bytes, max_request_bytes, align) \
        if max_request_bytes else plan


def split_requests(plan: Plan, region_offset: int, bundle_bytes: int, max_request_bytes: int,
                   align: int = 4096) -> Plan:
    """Cut extents longer than max_request_bytes into aligned pieces of at most that size.
    Pieces of one extent lie back to back in the file and in the read buffer, so a run
    keeps pointing at the piece where it starts."""
    step = max(align, max_request_bytes // align * align)
    ext = plan.extents
    if len(ext) == 0 or (ext[:, 1] <= step).all():
        return plan
    pieces = -(-ext[:, 1] // step)
    first = np.concatenate(([0], np.cumsum(pieces)[:-1]))
    idx = np.repeat(np.arange(len(ext)), pieces)
    k = np.arange(len(idx)) - first[idx]
    off = ext[idx, 0] + k * step
    length = np.minimum(step, ext[idx, 0] + ext[idx, 1] - off)
    run_pos = region_offset + plan.run_starts * bundle_bytes
    run_extent = first[plan.run_extent] + (run_pos - ext[plan.run_extent, 0]) // step
    return Plan(np.stack((off, length), axis=1).astype(np.int64), plan.run_starts, plan.run_lens,
                run_extent.astype(np.int64), plan.gap_bytes)


def chain_ends(extents: np.ndarray) -> np.ndarray:
    """(m,) for each extent (sorted by offset), the end of the run of extents that continue
    one another from it on: the pieces of one cut extent lie back to back in the file and in
    the read buffer, so a bundle may straddle them."""
    if len(extents) == 0:
        return np.zeros(0, np.int64)
    end = extents[:, 0] + extents[:, 1]
    chain = np.concatenate(([0], np.cumsum(extents[1:, 0] != end[:-1])))
    last = np.zeros(chain[-1] + 1, np.int64)
    np.maximum.at(last, chain, end)
    return last[chain]


def covered_slots(plan: Plan, region_offset: int, bundle_bytes: int, n_slots: int) -> np.ndarray:
    """Sorted slots whose whole bundle the plan reads, asked for or read through in a gap (a
    read-through cache may keep those)."""
    ext = plan.extents
    if len(ext) == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[True, ext[1:, 0] != (ext[:-1, 0] + ext[:-1, 1])]       # first piece of each chain
    lo = np.clip(-(-(ext[starts, 0] - region_offset) // bundle_bytes), 0, n_slots)
    hi = np.clip((chain_ends(ext)[starts] - region_offset) // bundle_bytes, 0, n_slots)
    k = np.maximum(hi - lo, 0)
    at = np.repeat(lo - np.concatenate(([0], np.cumsum(k)[:-1])), k)
    return np.unique(at + np.arange(int(k.sum())))


def plan_region(n_slots: int, region_offset: int, bundle_bytes: int, storage: sm.StorageProfile,
                queue_depth: int, align: int = 4096) -> Plan:
    """Every bundle of the layer, in requests of the profile's best size."""
    return plan_reads(np.arange(n_slots), region_offset, bundle_bytes, align,
                      max_request_bytes=sm.split_bytes(storage, queue_depth))


def plan_bundles(slots: np.ndarray, region_offset: int, bundle_bytes: int, align: int = 4096) -> Plan:
    """One request per active bundle, widened to the block; a block shared by two bundles
    is read twice (each bundle is fetched on its own)."""
    slots = np.unique(np.asarray(slots, dtype=np.int64))
    lo = region_offset + slots * bundle_bytes
    a_lo = lo // align * align
    a_hi = -(-(lo + bundle_bytes) // align) * align
    ones = np.ones(len(slots), np.int64)
    return Plan(np.stack((a_lo, a_hi - a_lo), axis=1).astype(np.int64).reshape(-1, 2), slots, ones,
                np.arange(len(slots), dtype=np.int64))


def collapse_gap_bytes(storage: sm.StorageProfile, queue_depth: int, n_requests: int) -> int:
    """The collapse threshold for a plan of n_requests issued at queue_depth."""
    return sm.gap_threshold_bytes(storage, max(1, min(int(queue_depth), int(n_requests))))


def plan_collapse(slots: np.ndarray, region_offset: int, bundle_bytes: int, storage: sm.StorageProfile,
                  queue_depth: int, align: int = 4096) -> Plan:
    """Access collapse with the threshold the profile gives at the plan's own queue depth."""
    runs_ = aligned_runs(slots, region_offset, bundle_bytes, align)
    plan = merge_runs(runs_, region_offset, bundle_bytes, align, 0)
    split = sm.split_bytes(storage, queue_depth)
    seen: set[int] = set()
    for _ in range(8):   # merging lowers the request count, which changes the threshold
        gap = collapse_gap_bytes(storage, queue_depth, max(len(plan.extents), 1))
        if gap in seen:
            break
        seen.add(gap)
        plan = merge_runs(runs_, region_offset, bundle_bytes, align, gap, split)
    return plan


def plan_cheapest(slots: np.ndarray, region_offset: int, bundle_bytes: int, storage: sm.StorageProfile,
                  queue_depth: int, align: int = 4096) -> Plan:
    """The plan the storage model says is fastest among collapse at gap thresholds
    0, 4 KiB, 8 KiB, ... up to the whole region, each with requests cut at the profile's
    best size and at twice and half of it."""
    runs_ = aligned_runs(slots, region_offset, bundle_bytes, align)
    if len(runs_[0]) == 0:
        return merge_runs(runs_, region_offset, bundle_bytes, align, 0)
    gaps, splits, cost = candidate_costs(runs_, storage, queue_depth, align)
    g, s = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return merge_runs(runs_, region_offset, bundle_bytes, align, int(gaps[g]), int(splits[s]))


def candidate_costs(aligned, storage: sm.StorageProfile, queue_depth: int, align: int):
    """(gaps, splits, cost (gaps, splits)): storage_model.batch_s of merge_runs(gap, split) for
    every candidate, priced in one pass without building the plans. Extents of one plan never
    touch (runs closer than the gap merge), so each extent, cut into pieces, is one stream."""
    _, _, a_lo, a_hi = aligned
    span = int(a_hi[-1] - a_lo[0])
    gaps = [0]
    while gaps[-1] < span:
        gaps.append(max(align, gaps[-1] * 2))
    gaps = np.array(gaps, np.int64)
    base = sm.split_bytes(storage, queue_depth)
    splits = np.array([max(s, align) for s in (base // 2, base, base * 2)], np.int64)
    steps = np.maximum(align, splits // align * align)
    # Extents of every gap candidate, flattened: a run starts an extent where the space to the
    # previous run exceeds the gap.
    between = a_lo[1:] - a_hi[:-1]
    new = np.ones((len(gaps), len(a_lo)), dtype=bool)
    new[:, 1:] = between[None, :] > gaps[:, None]
    row, first = np.nonzero(new)
    last = np.empty_like(first)
    last[:-1] = first[1:] - 1
    ends = np.r_[row[1:] != row[:-1], True]        # the last extent of each candidate
    last[ends] = len(a_lo) - 1
    length = (a_hi[last] - a_lo[first]).astype(np.float64)
    pieces = -(-length[None, :] // steps[:, None])                       # (splits, extents)
    n = np.stack([np.bincount(row, w, minlength=len(gaps)) for w in pieces])   # (splits, gaps)
    q = np.minimum(queue_depth, n).astype(np.int64)[:, row]              # each extent's plan's depth
    rem = length[None, :] - (pieces - 1) * steps[:, None]
    table = (pieces - 1) * sm.service_s_at(storage, np.broadcast_to(steps[:, None], q.shape), q) \
        + sm.service_s_at(storage, rem, q)
    seq = length / storage.seq_bytes_per_s
    t = np.where(pieces > 1, np.minimum(table, seq[None, :]), table)
    cost = np.stack([np.bincount(row, ts, minlength=len(gaps)) for ts in t])  # (splits, gaps)
    return gaps, splits, cost.T
