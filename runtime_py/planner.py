"""I/O planner: active slots of one layer's region -> read extents (pure function).

A run is a maximal range of consecutive active slots; each run becomes one byte range,
widened to the device block so it can be read with O_DIRECT. Ranges that then share or
touch a block are merged, because reading one block twice is never cheaper than once.
`max_gap_bytes` merges runs whose gap is at most that many bytes (access collapse); the
foundation uses 0 (one read per run).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Plan:
    extents: np.ndarray       # (m, 2) int64: file offset, length; both multiples of align
    run_starts: np.ndarray    # (r,) first slot of each run of active slots
    run_lens: np.ndarray      # (r,) slots in each run
    run_extent: np.ndarray    # (r,) index of the extent that holds each run

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
               max_gap_bytes: int = 0) -> Plan:
    slots = np.unique(np.asarray(slots, dtype=np.int64))
    starts, lens = runs(slots)
    lo = region_offset + starts * bundle_bytes
    hi = lo + lens * bundle_bytes
    a_lo = lo // align * align
    a_hi = -(-hi // align) * align
    # A new extent starts where the gap to the previous run's end exceeds max_gap_bytes.
    new = np.ones(len(starts), dtype=bool)
    if len(starts) > 1:
        new[1:] = a_lo[1:] - a_hi[:-1] > max_gap_bytes
    run_extent = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.concatenate((first[1:] - 1, [len(starts) - 1])) if len(first) else first
    extents = np.stack((a_lo[first], a_hi[last] - a_lo[first]), axis=1).astype(np.int64) \
        if len(first) else np.zeros((0, 2), np.int64)
    return Plan(extents, starts, lens, run_extent.astype(np.int64))
