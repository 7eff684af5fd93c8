"""Whole-layer reads issued ahead of the compute, so a layer's bytes arrive while earlier
layers run.

A weakly sparse model's active set covers most of each layer (SmolLM2 at sparsity 0.6: the
predicted sets fill ~90% of the FFN bytes), and then the cheapest plan is the whole region
anyway; its reads need no active set, so they can start `depth` layers early (wrapping into
the next token's first layers) and overlap the attention and FFN compute in between, as a
streaming engine overlaps its reads. A layer is read ahead when its last plan read at least
`whole_fraction` of its region (`note_plan`), or always (`layers="all"`, e.g. the dense
configuration); the others are fetched on demand as before. A layer once read whole stays so:
it is no longer planned, so nothing would tell it otherwise (on SmolLM2 every layer's set fills
~90% of it token after token; a strongly sparse model's plans never come near).

Each in-flight layer has its own FlashReader (and buffer): depth + 1 readers cycle, so the
buffer of layer l is reused only when layer l + depth + 1 is issued, after l's FFN is done.
What a step waits for is counted as its I/O time; the rest of the read was hidden.

With a BundleStore whose cache pins bundles that the layout put at region ends
(strategies' pinned_last), a whole read stops before that tail: the pinned rows are read
once, when the read-ahead starts, and copied in after each read, so the DRAM budget saves
its bytes of I/O on layers read whole too (on SmolLM2 every layer: 10% of the FFN's bytes a
token, the cache's share, which a whole read would otherwise read again).

With a whole copy (layout.whole_copy: the GGUF's own gate/up/down blocks per layer, beside
the bundles), a layer read whole is read from there instead: fewer bytes than its bundles
(SmolLM2: 1.66 MB against 2.05 MB in q4d8) and no second rounding of the down blocks. The
DRAM budget then holds whole layers (`pin_bytes`: as many layers' copies as fit, read once
at start), whose reads are gone from every token; a layer goes whole when its on-demand plan
read at least `whole_fraction` of its copy's bytes.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..layout.reader import Layout
from ..layout.whole_copy import WholeCopy
from .planner import plan_reads
from .reader import FlashReader, ReadResult

REQUEST_BYTES = 1 << 20          # whole regions go out in requests of this size


def pinned_tail(layout: Layout, store) -> np.ndarray:
    """(L,) slots at the end of each region that hold exactly the bundles `store`'s cache
    pins (0 where the layout did not put them there, or nothing is pinned)."""
    L, n = layout.perm.shape
    tail = np.zeros(L, np.int64)
    if store is None or not hasattr(store.cache, "pinned"):
        return tail
    for l in range(L):
        pinned = np.sort(store.cache.pinned(l))
        if 0 < len(pinned) < n and np.array_equal(np.sort(layout.perm[l][n - len(pinned):]), pinned):
            tail[l] = len(pinned)
    return tail


class ReadAhead:
    def __init__(self, layout: Layout, queue_depth: int, depth: int = 2, layers: str = "auto",
                 whole_fraction: float = 0.9, request_bytes: int = REQUEST_BYTES, o_direct: bool = True,
                 checks=None, store=None, whole_copy: WholeCopy | None = None, pin_bytes: int = 0):
        """o_direct, checks: as FlashReader takes them, for the file the readers ahead read (the
        layout's, or with a whole copy the copy's: layout.whole_copy.whole_checks); store: the
        engine's BundleStore, whose pinned tails whole reads of bundles skip; whole_copy,
        pin_bytes: see the module."""
        if depth < 1:
            raise ValueError(f"read-ahead depth {depth}: at least 1 layer")
        if layers not in ("auto", "all"):
            raise ValueError(f"read-ahead layers {layers!r}: 'auto' or 'all'")
        self.layout, self.depth, self.whole_fraction = layout, int(depth), float(whole_fraction)
        L, n = layout.perm.shape
        self.n_layers = L
        self.whole = np.full(L, layers == "all")
        bb, align = layout.bundle_bytes, layout.alignment
        self.copy = whole_copy
        self.pinned: dict[int, np.ndarray] = {}
        if whole_copy is None:
            self.store, self.tail = store, pinned_tail(layout, store)
            # What a whole read covers: the region up to its pinned tail (the block it starts in).
            self.region_bytes = -(-(n - self.tail) * bb // align) * align
            self.extents = [plan_reads(np.arange(n - self.tail[l]), int(layout.region_offsets[l]), bb, align,
                                       max_request_bytes=request_bytes).extents for l in range(L)]
            path = layout.path
        else:
            if whole_copy.n_layers != L:
                raise ValueError(f"{whole_copy.path}: {whole_copy.n_layers} layers, the layout has {L}")
            self.store, self.tail = None, np.zeros(L, np.int64)
            self.region_bytes = np.full(L, whole_copy.layer_bytes, np.int64)
            # One "bundle" of a layer's whole extent: the planner cuts it into requests as above.
            self.extents = [plan_reads(np.arange(1), int(o), whole_copy.layer_bytes, whole_copy.alignment,
                                       max_request_bytes=request_bytes).extents for o in whole_copy.offsets]
            path = whole_copy.path
        self.readers = [FlashReader(path, queue_depth, o_direct, checks=checks)
                        for _ in range(self.depth + 1)]
        self.pool = ThreadPoolExecutor(1)
        self.pending: dict[int, Future] = {}
        self.next_reader = 0
        if self.tail.any():
            self._load_pinned()
        if whole_copy is not None and pin_bytes >= whole_copy.layer_bytes:
            self._pin_layers(min(L, int(pin_bytes) // whole_copy.layer_bytes))

    @property
    def pinned_bytes(self) -> int:
        """DRAM held by whole layers pinned from the copy (runtime_py.resident counts it)."""
        return int(sum(a.nbytes for a in self.pinned.values()))

    def _pin_layers(self, k: int) -> None:
        """The last k layers' copies, read once into DRAM of their own (64-byte aligned)."""
        import torch                # its allocator aligns to 64 bytes, as the GEMV needs
        for l in range(self.n_layers - k, self.n_layers):
            res = self.readers[0].read(self.extents[l])
            own = torch.empty(self.copy.layer_bytes, dtype=torch.uint8).numpy()
            own[:] = res.buffer[:self.copy.layer_bytes]
            self.pinned[l] = own
            self.whole[l] = True

    def _load_pinned(self) -> None:
        """Read every pinned tail once, into the store (as an app loads its DRAM-resident
        weights at start; not part of any token's I/O)."""
        from .engine import gather
        lay, bb, n = self.layout, self.layout.bundle_bytes, self.layout.perm.shape[1]
        for l in np.flatnonzero(self.tail).tolist():
            slots = np.arange(n - self.tail[l], n)
            region = int(lay.region_offsets[l])
            plan = plan_reads(slots, region, bb, lay.alignment)
            rows = gather(self.readers[0].read(plan.extents), plan, region, bb)
            self.store.keep(l, lay.perm[l][slots], rows)

    def note_plan(self, layer: int, bytes_read: int) -> None:
        """The bytes an on-demand plan of `layer` read: whole enough, and it is read ahead."""
        self.whole[layer] = bytes_read >= self.whole_fraction * self.region_bytes[layer]

    def region(self, res: ReadResult, layer: int) -> np.ndarray:
        """The bundles of a region read ahead, in slot order, as they lie in the read buffer:
        (n, bundle_bytes) uint8, a view (valid until this reader's next read). With a whole
        copy: the layer's extent, (layer_bytes,) uint8."""
        if self.copy is not None:
            return res.buffer[:self.copy.layer_bytes]
        bb, n = self.layout.bundle_bytes, self.layout.perm.shape[1]
        base = int(self.layout.region_offsets[layer] - self.extents[layer][0, 0])
        return res.buffer[base:base + n * bb].reshape(n, bb)

    def take(self, layer: int) -> tuple[ReadResult, float] | None:
        """The region of `layer` read ahead (waiting for it if still in flight) and the seconds
        waited; None when the layer is not read ahead. Issues the layer `depth` ahead."""
        if layer in self.pinned:
            self._issue((layer + self.depth) % self.n_layers)
            return ReadResult(self.pinned[layer], np.zeros(1, np.int64), 0.0, 0, 0), 0.0
        if not self.pending and self.whole.any():
            for ahead in range(self.depth):          # the first call starts the pipeline
                self._issue((layer + ahead) % self.n_layers)
        got = self.pending.pop(layer, None)
        self._issue((layer + self.depth) % self.n_layers)
        if got is None:
            return None
        t0 = time.perf_counter()
        res = got.result()
        waited = time.perf_counter() - t0
        t = int(self.tail[layer])
        if t:
            n = self.layout.perm.shape[1]
            self.store.rows(layer, self.layout.perm[layer][n - t:], out=self.region(res, layer)[n - t:])
        return res, waited

    def _issue(self, layer: int) -> None:
        if not self.whole[layer] or layer in self.pending or layer in self.pinned:
            return
        r = self.readers[self.next_reader]
        self.next_reader = (self.next_reader + 1) % len(self.readers)
        room = self.copy.layer_bytes if self.copy is not None else \
            int(self.layout.region_offsets[layer] - self.extents[layer][0, 0]) \
            + self.layout.perm.shape[1] * self.layout.bundle_bytes
        self.pending[layer] = self.pool.submit(r.read, self.extents[layer], room)

    def close(self) -> None:
        for f in self.pending.values():
            f.exception()                # none may still write into a buffer being freed
        self.pool.shutdown()
        for r in self.readers:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

