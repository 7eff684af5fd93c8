"""The flash runtime's config: everything the device's runtime (native/flash_runtime.c,
`ripple.rt.open(path)`) needs to serve a compiled model its FFN weights from flash, in one
binary file a C program parses with memcpy and a few size checks.

Which layers are read whole, what is pinned in DRAM, the logit thresholds and the I/O knobs
are decided on the host (planner, cache, tuning); the runtime only follows them.

Format, little-endian, version 3 (the C side checks every size against the file's length,
that slot_of is a permutation per layer, that offsets are aligned and that the checksum
tables cover every block it will read):

    magic           8 bytes  b"RPLRT001"
    header          22 int64 version (3), file_bytes (the whole file's), n_layers L, n,
                             bundle_bytes, alignment, view_dtype (0 uint8, 1 int8, 2 float16),
                             whole_layer_bytes, sets_all, queue_depth, read_ahead,
                             collapse_gap_bytes, max_request_bytes (0: no limit), o_direct,
                             len(bundles_file), len(whole_file) (0: None), P (pinned bundles),
                             verify, B (bundle_crc32 entries), W (whole_crc32 entries),
                             lookahead J (the farthest distance a layer is prefetched from; 0: none),
                             lru_per_layer (bundles each sparse layer keeps of what it read, least
                             recently used out first; 0: none)
    names           bundles_file then whole_file, UTF-8, zero-padded together to 8 bytes
    region_offsets  int64 (L,)
    whole_offsets   int64 (L,)
    pinned_counts   int64 (L,)    pinned bundles of each layer
    thresholds      float32 (L,)
    la_thresholds   float32 (L,)  a prefetch's logit threshold (ripple.rt.prefetch); +inf: the
                                  layer is never prefetched
    slot_of         int32 (L, n)
    pinned ids      int32 (P,)    layer 0's, then layer 1's, ...
    bundle_crc32    uint32 (B,)   CRC32 of block b of bundles_file (bytes b*alignment..), or none
    whole_crc32     uint32 (W,)   the same for whole_file
    layer_mode      int8 (L,)
    pinned_layers   uint8 (L,)

File names are relative to the config's folder (an absolute name is taken as it is).

With verify, the runtime checks every block it reads against the tables (`ripple compile
--verify`); they come from the pack's own tables (block_crc_tables), never from the files, so
bytes changed since `ripple pack` are caught. Without it both tables are empty: a 7B model's
model.rflash of ~4 GB would add 4 MB to the config.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic_file import atomic_write
from ..layout.errors import LayoutError
from ..layout.reader import Layout, block_checks
from ..layout.whole_copy import WholeCopy, whole_checks

MAGIC, VERSION = b"RPLRT001", 3
HEADER = struct.Struct("<8s22q")
VIEW_DTYPES = ("uint8", "int8", "float16")     # the code is the index


def _no_crcs() -> np.ndarray:
    return np.zeros(0, np.uint32)


@dataclass(eq=False)
class RuntimeConfig:
    bundles_file: str | None          # e.g. "model.rflash", relative to the config's folder; None
                                      # when no layer is sparse (nothing reads bundles)
    whole_file: str | None            # e.g. "whole.rflash"; None when there is no whole copy
    n_layers: int
    n: int                            # neurons per layer
    bundle_bytes: int
    alignment: int
    view_dtype: str                   # what fetch returns: "uint8" | "int8" | "float16"
    region_offsets: np.ndarray        # (L,) int64: each layer's region in bundles_file
    slot_of: np.ndarray               # (L, n) int32: slot of neuron i in layer l
    whole_offsets: np.ndarray         # (L,) int64: each layer's extent in whole_file (zeros: none)
    whole_layer_bytes: int            # one layer's whole-copy extent (a multiple of alignment)
    layer_mode: np.ndarray            # (L,) int8: 0 sparse (fetch), 1 whole (whole copy)
    logit_thresholds: np.ndarray      # (L,) float32: a neuron is active when a logit exceeds it
    pinned_layers: np.ndarray         # (L,) bool: whole layers held in DRAM, read at open
    pinned_bundles: list[np.ndarray]  # per layer, int32 neuron ids held in DRAM
    sets_all: bool                    # fetch every neuron (a dense baseline), logits ignored
    queue_depth: int
    read_ahead: int                   # whole layers read this many layers early
    collapse_gap_bytes: int           # neighbouring ranges this close are read as one
    max_request_bytes: int            # 0: no limit
    o_direct: bool
    verify: bool = False              # check every block read against the tables below
    bundle_crc32: np.ndarray = field(default_factory=_no_crcs)  # (B,) uint32 a block of bundles_file
    whole_crc32: np.ndarray = field(default_factory=_no_crcs)   # (W,) uint32 a block of whole_file
    # Lookahead (tuning.lookahead): layer t's set predicted layers early and read ahead by
    # ripple.rt.prefetch; the farthest distance sizes the runtime's prefetch buffers.
    lookahead: int = 0
    la_thresholds: np.ndarray | None = None  # (L,) float32; None: +inf everywhere (no prefetch)
    # The DRAM budget's dynamic part: each sparse layer keeps this many of the bundles it read
    # (LRU), beside the pinned ones (runtime_py.cache's hybrid, per layer).
    lru_per_layer: int = 0


def block_crc_tables(layout: Layout, copy: WholeCopy | None) -> tuple[np.ndarray, np.ndarray]:
    """(bundle_crc32, whole_crc32) for a config with verify=True: one uint32 per alignment
    block of model.rflash and of whole.rflash (empty without a copy), decoded from the tables
    the pack stored (manifest.json, whole.json), never recomputed from the files: the point is
    to catch bytes that changed since `ripple pack`. Blocks no region covers (model.rflash's
    header) hold 0; the runtime never reads them. LayoutError when the layout was packed
    before per-block checksums, or its whole copy has blocks of another size."""
    bundles = block_checks(layout).crcs
    if copy is None:
        return bundles, _no_crcs()
    if copy.alignment != layout.alignment:
        raise LayoutError(f"{copy.path}: blocks of {copy.alignment} bytes, {layout.path}'s are "
                          f"{layout.alignment}; one runtime reads both by one alignment: re-run "
                          f"`ripple pack --whole-copy`")
    return bundles, whole_checks(copy).crcs


def _arrays(cfg: RuntimeConfig) -> dict[str, np.ndarray]:
    """The config's arrays in the file's dtypes; ValueError (one line) on a wrong shape."""
    L, n = int(cfg.n_layers), int(cfg.n)
    out = {"region_offsets": np.asarray(cfg.region_offsets, "<i8"),
           "whole_offsets": np.asarray(cfg.whole_offsets, "<i8"),
           "logit_thresholds": np.asarray(cfg.logit_thresholds, "<f4"),
           "la_thresholds": np.asarray(np.full(L, np.inf) if cfg.la_thresholds is None
                                       else cfg.la_thresholds, "<f4"),
           "slot_of": np.asarray(cfg.slot_of, "<i4"),
           "layer_mode": np.asarray(cfg.layer_mode, "i1"),
           "pinned_layers": np.asarray(cfg.pinned_layers, bool).astype("u1")}
    for name, a in out.items():
        want = (L, n) if name == "slot_of" else (L,)
        if a.shape != want:
            raise ValueError(f"runtime config: {name} has shape {a.shape}, want {want}")
    for name in ("bundle_crc32", "whole_crc32"):
        out[name] = np.asarray(getattr(cfg, name), "<u4")
        if out[name].ndim != 1 or (out[name].size and not cfg.verify):
            raise ValueError(f"runtime config: {name} must be 1-D, and empty unless verify is on")
    if len(cfg.pinned_bundles) != L:
        raise ValueError(f"runtime config: pinned_bundles lists {len(cfg.pinned_bundles)} layers, want {L}")
    if not 0 <= cfg.lookahead < L or (np.isfinite(out["la_thresholds"]).any() and not cfg.lookahead):
        raise ValueError(f"runtime config: lookahead {cfg.lookahead} must lie in 0..{L - 1}, and be > 0 when "
                         "a layer is prefetched")
    if not 0 <= cfg.lru_per_layer <= n:
        raise ValueError(f"runtime config: lru_per_layer {cfg.lru_per_layer} must lie in 0..{n}")
    if cfg.view_dtype not in VIEW_DTYPES:
        raise ValueError(f"runtime config: view_dtype {cfg.view_dtype!r}, want one of {VIEW_DTYPES}")
    if not np.array_equal(np.sort(out["slot_of"], axis=1), np.broadcast_to(np.arange(n), (L, n))):
        raise ValueError("runtime config: slot_of is not a permutation of 0..n-1 in every layer")
    return out


def write_runtime_config(path: str | os.PathLike, cfg: RuntimeConfig) -> None:
    """Write `cfg` to `path`, whole or not at all."""
    a = _arrays(cfg)
    pins = [np.asarray(p, "<i4").reshape(-1) for p in cfg.pinned_bundles]
    names = (cfg.bundles_file or "").encode(), (cfg.whole_file or "").encode()
    pad = -(len(names[0]) + len(names[1])) % 8
    body = [names[0], names[1], b"\0" * pad, a["region_offsets"].tobytes(), a["whole_offsets"].tobytes(),
            np.array([len(p) for p in pins], "<i8").tobytes(), a["logit_thresholds"].tobytes(),
            a["la_thresholds"].tobytes(), a["slot_of"].tobytes(), *(p.tobytes() for p in pins),
            a["bundle_crc32"].tobytes(),
            a["whole_crc32"].tobytes(), a["layer_mode"].tobytes(), a["pinned_layers"].tobytes()]
    size = HEADER.size + sum(len(b) for b in body)
    head = HEADER.pack(MAGIC, VERSION, size, cfg.n_layers, cfg.n, cfg.bundle_bytes, cfg.alignment,
                       VIEW_DTYPES.index(cfg.view_dtype), cfg.whole_layer_bytes, int(cfg.sets_all),
                       cfg.queue_depth, cfg.read_ahead, cfg.collapse_gap_bytes, cfg.max_request_bytes,
                       int(cfg.o_direct), len(names[0]), len(names[1]), sum(len(p) for p in pins),
                       int(cfg.verify), len(a["bundle_crc32"]), len(a["whole_crc32"]), int(cfg.lookahead),
                       int(cfg.lru_per_layer))
    with atomic_write(path) as f:
        f.write(head)
        for b in body:
            f.write(b)


def read_runtime_config(path: str | os.PathLike) -> RuntimeConfig:
    """The config at `path`; ValueError (one line) when it is not one, or not whole."""
    raw = Path(path).read_bytes()
    if len(raw) < HEADER.size or raw[:5] != MAGIC[:5]:
        raise ValueError(f"{path}: not a ripple runtime config (bad magic)")
    (magic, version, size, L, n, bb, align, vd, wlb, sets_all, qd, ra, gap, maxreq, od, s1, s2,
     P, verify, B, W, J, lru) = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"{path}: config version {magic.decode(errors='replace')}/{version}, this "
                         f"ripple reads {MAGIC.decode()}/{VERSION}; write it again")
    if size != len(raw) or not 0 <= vd < len(VIEW_DTYPES):
        raise ValueError(f"{path}: the header says {size} bytes, the file has {len(raw)}; write it again")
    at = HEADER.size
    want = at + s1 + s2 + (-(s1 + s2) % 8) + L * 32 + L * n * 4 + (P + B + W) * 4 + 2 * L
    if min(L, n, s1, s2, P, B, W) < 0 or want != len(raw):
        raise ValueError(f"{path}: {len(raw)} bytes, the header's sizes need {want}; write it again")

    def take(dtype, count):
        nonlocal at
        a = np.frombuffer(raw, dtype, count, at)
        at += a.nbytes
        return a.copy()

    bundles_file = raw[at:at + s1].decode() or None
    whole_file = raw[at + s1:at + s1 + s2].decode() or None
    at += s1 + s2 + (-(s1 + s2) % 8)
    region, whole, counts = take("<i8", L), take("<i8", L), take("<i8", L)
    thresholds, la_thresholds = take("<f4", L), take("<f4", L)
    slot_of = take("<i4", L * n).reshape(L, n)
    ids = take("<i4", P)
    bundle_crc32, whole_crc32 = take("<u4", B).astype(np.uint32), take("<u4", W).astype(np.uint32)
    mode, pinned = take("i1", L), take("u1", L).astype(bool)
    pins = np.split(ids, np.cumsum(counts)[:-1]) if L else []
    return RuntimeConfig(bundles_file, whole_file, L, n, bb, align, VIEW_DTYPES[vd], region, slot_of,
                         whole, wlb, mode, thresholds, pinned, pins, bool(sets_all), qd, ra, gap,
                         maxreq, bool(od), bool(verify), bundle_crc32, whole_crc32, J, la_thresholds, lru)
