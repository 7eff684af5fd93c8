"""Neuron cache: which FFN bundles stay in DRAM, under a budget in bytes.

One signature for every policy: `access(token, layer, ids) -> hit mask`, called once per
token and layer with that layer's active neuron ids; it says which are already in DRAM
(the rest must be read from flash) and then updates the policy's state. Entries are
(layer, neuron) pairs, all the same size (one bundle). `used_bytes` never exceeds
`budget_bytes`. The dynamic policies split the budget evenly over layers: one budget
shared by all layers would be swept clean by the layers' cyclic order (a token touches
every layer's ~40% active bundles before the same layer comes round again; measured on
SmolLM2 at 10% budget: 0 hits for a global LRU).

Policies:
- none:     nothing cached.
- lru:      least recently used, over all layers.
- s3fifo:   S3-FIFO (Yang et al., SOSP '23): a small FIFO (10%) that filters one-hit
            bundles, a main FIFO with 2-bit frequencies and reinsertion, and a ghost FIFO
            of recently evicted keys that admits straight to main.
- linking:  Ripple's linking-aligned admission on S3-FIFO (arXiv 2410.19274): a missed
            bundle enters only when a placement neighbour (slot +-1) is hot too (active
            now or cached), so cached bundles form segments of the placement and the misses
            around them stay contiguous on flash; lone bundles enter only on a ghost hit.
- window:   LLM in a Flash's windowing (Alizadeh et al. 2023): keep the bundles active in
            the last k = 5 tokens; when they exceed the budget, the least recently active go.
- pinned:   the bundles most often active on calibration text, chosen once over all
            layers and never evicted. With the layout's help (`pinned_last`) they are not
            on the read path at all, so every cached byte is a byte no plan reads through.
- hybrid:   ours: a share of the budget pinned as above, the rest LRU per layer for what
            the current text keeps reusing. On the ReLU-regime workload (10% budget) the
            hit rate goes from 0.51 (pinned or LRU alone) to 0.58 with 75% pinned; on
            SmolLM2 the LRU part finds little (0.49 chance a bundle fires again next token
            against 0.41 for any), so the share is chosen per workload (runtime_py.strategies).
            Options: pin by `io_value` instead of frequency (what a bundle costs to read, not
            how often it is needed), and `read_through`: the LRU part also admits the
            bundles a plan read through in a gap (they are in DRAM anyway, and in a
            co-activation placement they are the neighbours of what just fired).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

POLICIES = ("none", "lru", "s3fifo", "linking", "window", "pinned", "hybrid")


class CacheError(ValueError):
    pass


class NeuronCache:
    """Base: keys are layer * n + neuron."""
    policy = "base"

    def __init__(self, budget_bytes: int, bundle_bytes: int, n_layers: int, n: int):
        if budget_bytes < 0 or bundle_bytes < 1:
            raise CacheError(f"cache budget {budget_bytes} B / bundle {bundle_bytes} B: both must be "
                             "non-negative and the bundle positive")
        self.budget_bytes = int(budget_bytes)
        self.bundle_bytes = int(bundle_bytes)
        self.n_layers, self.n = int(n_layers), int(n)
        self.capacity = min(self.budget_bytes // self.bundle_bytes, self.n_layers * self.n)

    @property
    def entries(self) -> int:
        raise NotImplementedError

    @property
    def used_bytes(self) -> int:
        return self.entries * self.bundle_bytes

    reads_through = False     # read_through admits anything (runtime_py.strategies, engine)

    def read_through(self, layer: int, ids: np.ndarray) -> None:
        """Bundles read in a gap of this layer's plan, not asked for: a policy may keep them."""

    def contains(self, layer: int, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def access(self, token: int, layer: int, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class NoCache(NeuronCache):
    policy = "none"

    @property
    def entries(self) -> int:
        return 0

    def contains(self, layer, ids):
        return np.zeros(len(ids), bool)

    def access(self, token, layer, ids):
        return np.zeros(len(ids), bool)


class _Stamped(NeuronCache):
    """Residency plus one stamp per key; evicts the smallest stamps beyond capacity."""

    def __init__(self, *a):
        super().__init__(*a)
        self.resident = np.zeros(self.n_layers * self.n, bool)
        self.stamp = np.full(self.n_layers * self.n, -1, np.int64)

    @property
    def entries(self) -> int:
        return int(self.resident.sum())

    def contains(self, layer, ids):
        return self.resident[layer * self.n + np.asarray(ids, np.int64)]

    def _trim(self) -> None:
        keys = np.flatnonzero(self.resident)
        extra = len(keys) - self.capacity
        if extra > 0:
            oldest = keys[np.argpartition(self.stamp[keys], extra - 1)[:extra]]
            self.resident[oldest] = False


class LRUCache(_Stamped):
    policy = "lru"

    def __init__(self, *a, read_through: bool = False):
        super().__init__(*a)
        self.clock = 0
        self.reads_through = read_through and self.capacity > 0   # nothing to keep them in

    def access(self, token, layer, ids):
        keys = layer * self.n + np.asarray(ids, np.int64)
        hit = self.resident[keys].copy()
        self.clock += 1
        self.stamp[keys] = self.clock
        if self.capacity:
            self.resident[keys] = True
            self._trim()
        return hit

    def read_through(self, layer, ids):
        if not self.reads_through:
            return
        keys = layer * self.n + np.asarray(ids, np.int64)
        new = keys[~self.resident[keys]]
        # Older than what was asked for in the same access: a bundle that fired goes last.
        self.stamp[new] = self.clock - 1
        self.resident[new] = True
        self._trim()


class WindowCache(_Stamped):
    """Stamp = last token a bundle was active in."""
    policy = "window"

    def __init__(self, *a, window: int = 5):
        super().__init__(*a)
        self.window = int(window)

    def access(self, token, layer, ids):
        keys = layer * self.n + np.asarray(ids, np.int64)
        lo, hi = layer * self.n, (layer + 1) * self.n
        # Bundles last active more than `window` tokens ago leave the window.
        old = self.resident[lo:hi] & (self.stamp[lo:hi] < token - self.window)
        self.resident[lo:hi][old] = False
        hit = self.resident[keys].copy()
        self.stamp[keys] = token
        if self.capacity:
            self.resident[keys] = True
            self._trim()
        return hit


class S3FIFOCache(NeuronCache):
    policy = "s3fifo"
    SMALL_SHARE = 0.1

    def __init__(self, *a):
        super().__init__(*a)
        self.small: OrderedDict[int, None] = OrderedDict()   # first = oldest
        self.main: OrderedDict[int, None] = OrderedDict()
        self.ghost: OrderedDict[int, None] = OrderedDict()
        self.freq: dict[int, int] = {}
        self.res = np.zeros(self.n_layers * self.n, bool)      # mirrors small | main
        self.small_cap = max(1, int(self.capacity * self.SMALL_SHARE)) if self.capacity else 0

    @property
    def entries(self) -> int:
        return len(self.small) + len(self.main)

    def contains(self, layer, ids):
        return self.res[layer * self.n + np.asarray(ids, np.int64)]

    def _admit(self, layer: int, ids: np.ndarray, hit: np.ndarray, keys: list[int]) -> list[int]:
        return [k for k, h in zip(keys, hit.tolist()) if not h]

    def access(self, token, layer, ids):
        ids = np.asarray(ids, np.int64)
        keys = (layer * self.n + ids).tolist()
        freq = self.freq
        hit = self.res[layer * self.n + ids].copy()
        for k in np.asarray(keys)[hit].tolist():
            freq[k] = min(freq[k] + 1, 3)
        if self.capacity:
            for k in self._admit(layer, ids, hit, keys):
                self._insert(k)
        return hit

    def _insert(self, k: int) -> None:
        while self.entries >= self.capacity:
            self._evict()
        if k in self.ghost:
            del self.ghost[k]
            self.main[k] = None
        else:
            self.small[k] = None
        self.freq[k] = 0
        self.res[k] = True

    def _evict(self) -> None:
        if len(self.small) >= self.small_cap and self.small:
            k, _ = self.small.popitem(last=False)
            if self.freq[k] > 1:
                # Accessed again while in the small queue: promote; the caller keeps
                # evicting until there is room.
                self.main[k] = None
                self.freq[k] = 0
                return
            del self.freq[k]
            self.res[k] = False
            self.ghost[k] = None
            if len(self.ghost) > max(1, self.capacity - self.small_cap):
                self.ghost.popitem(last=False)
        else:
            self._evict_main()

    def _evict_main(self) -> None:
        while True:
            k, _ = self.main.popitem(last=False)
            if self.freq[k] > 0:
                self.freq[k] -= 1
                self.main[k] = None          # reinserted at the head
            else:
                del self.freq[k]
                self.res[k] = False
                return


class LinkingCache(S3FIFOCache):
    policy = "linking"

    def __init__(self, *a, perm: np.ndarray):
        super().__init__(*a)
        self.perm = np.asarray(perm, np.int64)
        self.slot_of = np.argsort(self.perm, axis=1)

    def _admit(self, layer, ids, hit, keys):
        n, base = self.n, layer * self.n
        slots = self.slot_of[layer][ids]
        hot = np.zeros(n + 2, bool)            # by slot, padded: active now or cached
        hot[slots + 1] = True
        hot[1:n + 1] |= self.res[base:base + n][self.perm[layer]]
        linked = hot[slots] | hot[slots + 2]   # slot - 1 or slot + 1
        return [k for k, h, l in zip(keys, hit.tolist(), linked.tolist())
                if not h and (l or k in self.ghost)]


class PinnedCache(NeuronCache):
    policy = "pinned"

    def __init__(self, *a, value: np.ndarray):
        """value (L, n): the bundles of highest value are pinned (frequency, or io_value)."""
        super().__init__(*a)
        f = np.asarray(value, np.float64).reshape(-1)
        if f.shape[0] != self.n_layers * self.n:
            raise CacheError(f"pinned cache: values for {f.shape[0]} bundles, model has "
                             f"{self.n_layers} x {self.n}")
        self.resident = np.zeros_like(f, dtype=bool)
        if self.capacity:
            self.resident[np.argsort(-f, kind="stable")[:self.capacity]] = True

    @property
    def entries(self) -> int:
        return int(self.resident.sum())

    def pinned(self, layer: int) -> np.ndarray:
        """Neuron ids of `layer` held for good."""
        return np.flatnonzero(self.resident[layer * self.n:(layer + 1) * self.n])

    def contains(self, layer, ids):
        return self.resident[layer * self.n + np.asarray(ids, np.int64)]

    def access(self, token, layer, ids):
        return self.contains(layer, ids).copy()


class HybridCache(NeuronCache):
    policy = "hybrid"

    def __init__(self, pinned: PinnedCache, dynamic: NeuronCache, budget_bytes: int):
        super().__init__(budget_bytes, pinned.bundle_bytes, pinned.n_layers, pinned.n)
        self.fixed, self.dynamic = pinned, dynamic
        self.capacity = pinned.capacity + dynamic.capacity
        self.reads_through = dynamic.reads_through

    @property
    def entries(self) -> int:
        return self.fixed.entries + self.dynamic.entries

    def pinned(self, layer: int) -> np.ndarray:
        return self.fixed.pinned(layer)

    def contains(self, layer, ids):
        ids = np.asarray(ids, np.int64)
        return self.fixed.contains(layer, ids) | self.dynamic.contains(layer, ids)

    def access(self, token, layer, ids):
        ids = np.asarray(ids, np.int64)
        hit = self.fixed.access(token, layer, ids)
        rest = np.flatnonzero(~hit)
        hit[rest[self.dynamic.access(token, layer, ids[rest])]] = True
        return hit

    def read_through(self, layer, ids):
        ids = np.asarray(ids, np.int64)
        self.dynamic.read_through(layer, ids[~self.fixed.contains(layer, ids)])


class PerLayer(NeuronCache):
    """One cache of the policy per layer, each with an equal share of the budget."""

    def __init__(self, subs: list[NeuronCache], budget_bytes: int, bundle_bytes: int, n: int):
        super().__init__(budget_bytes, bundle_bytes, len(subs), n)
        self.subs = subs
        self.policy = subs[0].policy if subs else "none"
        self.capacity = sum(c.capacity for c in subs)
        self.reads_through = bool(subs) and subs[0].reads_through

    @property
    def entries(self) -> int:
        return sum(c.entries for c in self.subs)

    def contains(self, layer, ids):
        return self.subs[layer].contains(0, ids)

    def access(self, token, layer, ids):
        return self.subs[layer].access(token, 0, ids)

    def read_through(self, layer, ids):
        self.subs[layer].read_through(0, ids)


def make_cache(policy: str, budget_bytes: int, bundle_bytes: int, perm: np.ndarray,
               calib_masks: np.ndarray | None = None, pinned_share: float = 0.75,
               value: np.ndarray | None = None, read_through: bool = False) -> NeuronCache:
    """The cache of one policy. perm (L, n): the placement (linking needs slot neighbours);
    calib_masks (L, T, n) bool: calibration activity (pinned picks its bundles from it);
    pinned_share: the part of the budget hybrid pins (the rest is LRU); value (L, n): what
    pinned and hybrid pin by (default: calibration frequency; see io_value); read_through:
    hybrid's LRU part also keeps bundles read in a plan's gaps."""
    perm = np.asarray(perm)
    L, n = perm.shape
    args = (budget_bytes, bundle_bytes, L, n)
    share = (int(budget_bytes) // L // int(bundle_bytes)) * int(bundle_bytes) if L else 0
    one = (share, bundle_bytes, 1, n)
    if policy == "none":
        return NoCache(*args)
    if policy == "lru":
        return PerLayer([LRUCache(*one, read_through=read_through) for _ in range(L)], budget_bytes,
                        bundle_bytes, n)
    if policy == "s3fifo":
        return PerLayer([S3FIFOCache(*one) for _ in range(L)], budget_bytes, bundle_bytes, n)
    if policy == "linking":
        return PerLayer([LinkingCache(*one, perm=perm[l:l + 1]) for l in range(L)], budget_bytes,
                        bundle_bytes, n)
    if policy == "window":
        return PerLayer([WindowCache(*one) for _ in range(L)], budget_bytes, bundle_bytes, n)
    if policy in ("pinned", "hybrid"):
        if calib_masks is None:
            raise CacheError(f"{policy} cache needs calibration masks to pick its bundles")
        if value is None:
            value = np.asarray(calib_masks).mean(axis=1)
        if policy == "pinned":
            return PinnedCache(*args, value=value)
        if not 0.0 <= pinned_share <= 1.0:
            raise CacheError(f"pinned share {pinned_share} is outside [0, 1]")
        fixed = int(budget_bytes * pinned_share) // int(bundle_bytes) * int(bundle_bytes)
        return HybridCache(PinnedCache(fixed, bundle_bytes, L, n, value=value),
                           make_cache("lru", budget_bytes - fixed, bundle_bytes, perm, read_through=read_through),
                           budget_bytes)
    raise CacheError(f"unknown cache policy {policy!r}; choose one of {', '.join(POLICIES)}")


def io_value(masks: np.ndarray, perm: np.ndarray, request_bundles: float) -> np.ndarray:
    """(L, n): what holding each bundle in DRAM saves over calibration masks (L, T, n), in
    bundles' bytes: its bytes each token it is active in, plus a request's cost
    (`request_bundles`, a request's overhead in bundles' bytes, storage_model.gap_threshold_bytes
    / bundle bytes) each token no other active bundle lies within that many slots of it in
    `perm`, so that a plan reads it on its own. On the ReLU-regime workload nine in ten of the
    reads `ours` issues are such lone bundles; pinning by this value instead of frequency cut
    its modelled I/O by 3%."""
    masks = np.asarray(masks, bool)
    perm = np.asarray(perm, np.int64)
    L, T, n = masks.shape
    g = max(int(round(request_bundles)), 1)
    s = np.arange(n)
    lo, hi = np.clip(s - g, 0, n), np.clip(s + g + 1, 0, n)
    out = np.empty((L, n))
    for l in range(L):
        a = masks[l][:, perm[l]]                                   # (T, n) in slot order
        c = np.zeros((T, n + 1), np.int32)
        np.cumsum(a, axis=1, out=c[:, 1:])
        alone = a & (c[:, hi] - c[:, lo] == 1)                     # itself, no other within g
        out[l, perm[l]] = a.sum(0) + request_bundles * alone.sum(0)
    return out / max(T, 1)


def pinned_last(perm: np.ndarray, pinned: np.ndarray) -> np.ndarray:
    """The placement with the pinned neurons moved to the end of the region (their relative
    order kept): reads never cross them, so the rest of the layer packs closer."""
    perm = np.asarray(perm, np.int64)
    is_pinned = np.zeros(len(perm), bool)
    is_pinned[np.asarray(pinned, np.int64)] = True
    mask = is_pinned[perm]
    return np.concatenate((perm[~mask], perm[mask]))


class BundleStore:
    """The bytes behind a NeuronCache, for the decode engine: `access` says which active
    bundles are in DRAM; after the misses are read, `keep` stores the ones the policy
    admitted and drops what it evicted; `rows` hands back the stored bytes.

    The engine calls it once per layer per step, layers in order, so a step (token) is
    counted each time the layer index does not increase. Bundles sit in one slab of
    fixed-size rows indexed by key, so a layer's bookkeeping is a few vector operations
    (a dict of rows cost ~20 ms per token on the embedded model)."""

    def __init__(self, cache: NeuronCache):
        self.cache = cache
        c = cache
        self.row_of = np.full(c.n_layers * c.n, -1, np.int64)     # slab row per key, -1: not stored
        self.slab = np.empty((0, c.bundle_bytes), np.uint8)
        self.free: list[int] = []
        self.token = -1
        self._last_layer = None
        self.hits = 0

    @property
    def stored(self) -> int:
        return int((self.row_of >= 0).sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the bundles it holds."""
        return self.stored * self.cache.bundle_bytes

    def access(self, layer: int, ids: np.ndarray) -> np.ndarray:
        if self._last_layer is None or layer <= self._last_layer:
            self.token += 1
        self._last_layer = layer
        ids = np.asarray(ids, np.int64)
        hit = self.cache.access(self.token, layer, ids)
        # A bundle the policy holds but whose bytes were never read (a pinned one, before
        # its first use) is read now like a miss, then kept.
        hit &= self.row_of[layer * self.cache.n + ids] >= 0
        self.hits += int(hit.sum())
        return hit

    def keep(self, layer: int, ids: np.ndarray, rows: np.ndarray) -> None:
        """Store the rows of just-read bundles the policy holds now; forget evicted ones."""
        ids = np.asarray(ids, np.int64)
        base = layer * self.cache.n
        self._drop_evicted(layer)
        new = self.cache.contains(layer, ids) & (self.row_of[base + ids] < 0)
        if not new.any():
            return
        at = self._take(int(new.sum()))
        self.slab[at] = rows[new]
        self.row_of[base + ids[new]] = at

    def read_through(self, layer: int, ids: np.ndarray, rows: np.ndarray) -> None:
        """Bundles a plan read in its gaps (not asked for): offered to the policy, kept if it
        holds them."""
        self.cache.read_through(layer, ids)
        self.keep(layer, ids, rows)

    def rows(self, layer: int, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
        """The stored bytes of `ids` (all stored), a copy; into `out` (len(ids), bundle_bytes)
        when given, with no temporary (read_ahead fills each pinned tail so, every layer of
        every token). Rows kept together in this order (a tail stored in one `keep`) are one
        block copy instead of a gather."""
        if not len(ids):
            return out
        at = self.row_of[layer * self.cache.n + np.asarray(ids, np.int64)]
        if out is None:
            out = np.empty((len(at), self.slab.shape[1]), np.uint8)
        if at[-1] - at[0] == len(at) - 1 and (np.diff(at) == 1).all():
            out[...] = self.slab[at[0]:at[-1] + 1]
        else:
            np.take(self.slab, at, axis=0, out=out)
        return out

    def _drop_evicted(self, layer: int) -> None:
        n = self.cache.n
        mine = np.flatnonzero(self.row_of[layer * n:(layer + 1) * n] >= 0)
        if len(mine):
            gone = mine[~self.cache.contains(layer, mine)]
            self.free.extend(self.row_of[layer * n + gone].tolist())
            self.row_of[layer * n + gone] = -1

    def _take(self, k: int) -> np.ndarray:
        """k free slab rows; evictions of other layers are swept when the slab runs short,
        and it grows only when the policy really holds more."""
        if len(self.free) < k:
            for layer in range(self.cache.n_layers):
                self._drop_evicted(layer)
        if len(self.free) < k:
            old = len(self.slab)
            grow = max(k - len(self.free), min(self.cache.capacity, 2 * old + 64) - old)
            self.slab = np.concatenate((self.slab, np.empty((grow, self.slab.shape[1]), np.uint8)))
            self.free.extend(range(old, old + grow))
        at, self.free = self.free[-k:], self.free[:-k]
        return np.array(at, np.int64)
