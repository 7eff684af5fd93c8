"""Storage model: what a read plan costs on a device, from the device's measured latency table.

A device is described by the mean latency of one read request of `size` bytes while `qd`
requests are in flight (a table over sizes x queue depths, measured by `ripple probe
storage` or derived from published figures) and its sequential bandwidth. With `qd`
requests kept in flight, each one occupies the device for latency / qd on average
(Little's law), so a batch of requests (the reads of one layer, issued together) takes

    sum_i latency(size_i, q) / q,    q = min(queue depth, number of requests).

Between the table's points latency is interpolated in log(size) and log(qd); past the
largest size it grows in proportion to size (large reads are bandwidth-bound).

The same numbers give the planner its collapse rule: at queue depth q the cost of one more
request is `overhead_s(q)` and a byte costs 1 / `bandwidth(q)` (a line fitted through the
table's service times), so a gap of g bytes is worth reading through when
g <= overhead_s(q) * bandwidth(q) (`gap_threshold_bytes`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


class StorageModelError(ValueError):
    """A storage table that cannot describe a device (shapes, non-positive values)."""


@dataclass(frozen=True, eq=False)
class StorageProfile:
    sizes: np.ndarray          # (S,) request bytes, increasing
    queue_depths: np.ndarray   # (Q,) requests in flight, increasing
    latency_us: np.ndarray     # (S, Q) mean latency of one request
    seq_MBps: float            # sequential read bandwidth (1 MB = 1e6 bytes)
    block_bytes: int = 4096    # O_DIRECT alignment of every request

    def __post_init__(self):
        sizes = np.asarray(self.sizes, dtype=np.float64)
        qds = np.asarray(self.queue_depths, dtype=np.float64)
        lat = np.asarray(self.latency_us, dtype=np.float64)
        if sizes.ndim != 1 or qds.ndim != 1 or lat.shape != (len(sizes), len(qds)):
            raise StorageModelError(f"latency table must be (sizes {len(sizes)}, queue depths "
                                    f"{len(qds)}), got {lat.shape}")
        if len(sizes) < 2 or (np.diff(sizes) <= 0).any() or (np.diff(qds) < 0).any() \
                or len(qds) < 1 or (np.diff(qds) <= 0).any():
            raise StorageModelError("sizes and queue depths must be increasing; sizes need "
                                    "at least two points")
        if sizes[0] <= 0 or qds[0] < 1 or not np.isfinite(lat).all() or (lat <= 0).any() \
                or not self.seq_MBps > 0:
            raise StorageModelError("sizes, queue depths, latencies and seq_MBps must be positive")
        for name, a in (("sizes", sizes), ("queue_depths", qds), ("latency_us", lat)):
            a.setflags(write=False)
            object.__setattr__(self, name, a)

    @property
    def seq_bytes_per_s(self) -> float:
        return self.seq_MBps * 1e6

    def to_json(self) -> dict:
        return {"sizes": [int(s) for s in self.sizes], "queue_depths": [int(q) for q in self.queue_depths],
                "latency_us": [[round(float(x), 3) for x in row] for row in self.latency_us],
                "seq_MBps": round(float(self.seq_MBps), 3), "block_bytes": int(self.block_bytes)}

    @classmethod
    def from_json(cls, d: dict) -> "StorageProfile":
        try:
            return cls(np.array(d["sizes"]), np.array(d["queue_depths"]), np.array(d["latency_us"]),
                       float(d["seq_MBps"]), int(d.get("block_bytes", 4096)))
        except (KeyError, TypeError) as e:
            raise StorageModelError(f"storage table lacks or mistypes {e}; it needs sizes, "
                                    "queue_depths, latency_us, seq_MBps") from None


def _column(p: StorageProfile, qd: float) -> np.ndarray:
    """log latency (us) at each table size for one queue depth (interpolated in log qd)."""
    q = min(max(float(qd), p.queue_depths[0]), p.queue_depths[-1])
    return _column_at(p, q)


@functools.lru_cache(maxsize=4096)
def _column_at(p: StorageProfile, q: float) -> np.ndarray:
    log_lat = np.log(p.latency_us)
    if len(p.queue_depths) == 1:
        return log_lat[:, 0]
    lq = np.log(p.queue_depths)
    return np.array([np.interp(np.log(q), lq, row) for row in log_lat])


def latency_s(p: StorageProfile, size, qd: float) -> np.ndarray:
    """Mean latency (s) of one request of `size` bytes (scalar or array) with `qd` in flight."""
    size = np.asarray(size, dtype=np.float64)
    s = np.clip(size, p.sizes[0], p.sizes[-1])
    lat = np.exp(np.interp(np.log(s), np.log(p.sizes), _column(p, qd))) * 1e-6
    # Past the table a request is bandwidth-bound: its latency grows with its size.
    return np.where(size > p.sizes[-1], lat * size / p.sizes[-1], lat)


def service_s(p: StorageProfile, size, qd: float) -> np.ndarray:
    """Device time one request holds while `qd` are in flight: latency / qd. Beyond the
    table's deepest queue the device is taken as saturated (no further gain)."""
    q = min(max(float(qd), 1.0), float(p.queue_depths[-1]))
    return latency_s(p, size, q) / q


@functools.lru_cache(maxsize=64)
def _columns(p: StorageProfile, max_qd: int) -> np.ndarray:
    """(max_qd + 1, S): _column at each whole queue depth 0..max_qd (row 0 unused)."""
    return np.stack([_column(p, max(q, 1)) for q in range(max_qd + 1)])


def service_s_at(p: StorageProfile, sizes: np.ndarray, qds: np.ndarray) -> np.ndarray:
    """service_s for many (size, whole queue depth) pairs at once: the planner prices dozens
    of candidate plans per layer and token, and one call per plan cost ~3 ms a layer."""
    sizes = np.asarray(sizes, dtype=np.float64)
    qds = np.asarray(qds, dtype=np.int64)
    cols = _columns(p, int(qds.max(initial=1)))
    ls = np.log(p.sizes)
    x = np.log(np.clip(sizes, p.sizes[0], p.sizes[-1]))
    hi = np.clip(np.searchsorted(ls, x), 1, len(ls) - 1)
    w = (x - ls[hi - 1]) / (ls[hi] - ls[hi - 1])
    lat = np.exp(cols[qds, hi - 1] * (1 - w) + cols[qds, hi] * w) * 1e-6
    lat = np.where(sizes > p.sizes[-1], lat * sizes / p.sizes[-1], lat)
    return lat / np.clip(qds, 1, p.queue_depths[-1])


def batch_s(p: StorageProfile, sizes, queue_depth: int, offsets=None) -> float:
    """Time to read one batch of requests (one layer's extents) at `queue_depth`.

    With `offsets`, requests that continue where another ended form a stream, and a stream of
    two or more costs its bytes at the sequential bandwidth (what that figure means) if that
    is less than its requests' table costs: the table is measured with random offsets, and on the disks
    measured here a long extent cut into pieces reads as fast as one sequential read."""
    sizes = np.asarray(sizes, dtype=np.float64).ravel()
    if sizes.size == 0:
        return 0.0
    t = service_s(p, sizes, min(int(queue_depth), sizes.size))
    if offsets is None or sizes.size < 2:
        return float(t.sum())
    offsets = np.asarray(offsets, dtype=np.float64).ravel()
    order = np.argsort(offsets, kind="stable")
    o, z, tt = offsets[order], sizes[order], t[order]
    stream = np.concatenate(([0], np.cumsum(o[1:] != o[:-1] + z[:-1])))
    table = np.bincount(stream, weights=tt)
    seq = np.bincount(stream, weights=z) / p.seq_bytes_per_s
    pieces = np.bincount(stream)
    return float(np.where(pieces > 1, np.minimum(table, seq), table).sum())


@functools.lru_cache(maxsize=4096)
def affine(p: StorageProfile, qd: int) -> tuple[float, float]:
    """(overhead_s, bytes_per_s) of the line service(size) ~ overhead + size / bandwidth at
    this queue depth, fitted to the table in relative error (small and large sizes count alike)."""
    q = max(int(qd), 1)
    t = service_s(p, p.sizes, q)
    w = 1.0 / t
    A = np.stack([np.ones_like(p.sizes), p.sizes], axis=1) * w[:, None]
    (c0, c1), *_ = np.linalg.lstsq(A, t * w, rcond=None)
    # A table whose small requests cost no more per byte than large ones has no overhead
    # worth merging for; a non-positive slope would mean free bytes, which no device has.
    c1 = max(c1, 1.0 / (p.seq_bytes_per_s * 4))
    return max(float(c0), 0.0), float(1.0 / c1)


@functools.lru_cache(maxsize=4096)
def gap_threshold_bytes(p: StorageProfile, qd: int) -> int:
    """Largest gap that costs no more to read through than one more request at `qd`."""
    overhead, bw = affine(p, qd)
    return int(overhead * bw)


@functools.lru_cache(maxsize=4096)
def split_bytes(p: StorageProfile, qd: int, tolerance: float = 0.05) -> int:
    """The smallest request size whose cost per byte at `qd` is within `tolerance` of the
    best in the table: larger requests gain nothing and leave the queue empty."""
    q = max(int(qd), 1)
    per_byte = service_s(p, p.sizes, q) / p.sizes
    ok = np.flatnonzero(per_byte <= per_byte.min() * (1 + tolerance))
    return int(p.sizes[ok[0]])


def extent_request_bytes(p: StorageProfile, extent_bytes: int, qd: int, align: int = 4096) -> int:
    """The request size that reads one extent of `extent_bytes` fastest by the table: larger
    requests cost less each, but an extent cut into few of them leaves the queue nearly empty
    (a 1.66 MB layer in 1 MiB requests is two requests in flight)."""
    best, best_s = align, float("inf")
    for size in sorted({int(s) for s in p.sizes if s >= align} | {align}, reverse=True):
        n = -(-int(extent_bytes) // size)
        t = float(service_s(p, np.full(n, float(size)), min(n, max(int(qd), 1))).sum())
        if t < best_s * 0.98:          # a smaller size must win clearly: more requests cost CPU
            best, best_s = size, t
    return best


def replay(p: StorageProfile, token_plans: list[list[np.ndarray]], queue_depth: int) -> np.ndarray:
    """Modelled I/O seconds per token; token_plans[t][l] is layer l's (m, 2) extents."""
    return np.array([sum(batch_s(p, ext[:, 1], queue_depth, ext[:, 0]) for ext in layers)
                     for layers in token_plans])
