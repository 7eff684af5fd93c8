"""The GGUF's own FFN tensors of each layer, in one aligned extent per layer, beside the bundles.

A weakly sparse model's plans read (nearly) every bundle of a layer token after token
(SmolLM2 at sparsity 0.6: ~90% of each region; runtime_py.read_ahead), and then bundles are
the costlier way to hold it: a bundle keeps a neuron's down column, which crosses the GGUF's
blocks of 32 along the down rows, so it is requantized to 8 bits (q4d8: 61.4 MB a token on
SmolLM2) or to 4 bits with a second rounding (q4: perplexity +27%). Read whole, the layer
needs no per-neuron access, so it can be read as llama.cpp reads it: the GGUF's gate, up and
down blocks as stored (49.9 MB a token, no rounding of ours). `ripple pack --whole-copy`
writes them into whole.rflash with whole.json beside the layout; the engine reads a layer
read whole from there and multiplies the blocks in place (runtime_py.whole_ffn).

Per layer the extent holds gate, up, down in that order, each part starting on a 64-byte
boundary (tvm-ffi takes such a buffer without a copy), the extent padded to the alignment so
O_DIRECT reads it as one run. whole.json names the source checkpoint (its hash must be the
manifest's), the parts and per layer the offset, a blake2b-128 checksum and a CRC32 per
alignment block (layout.block_crc), so reads with `--verify` are checked as bundle reads are.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic_file import atomic_write
from .block_crc import BlockChecks, BlockCrc, decode_table, encode_table, file_checks
from .errors import LayoutChecksumError, LayoutError
from .header import align_up

WHOLE_FILE, WHOLE_MANIFEST = "whole.rflash", "whole.json"
PARTS = ("gate", "up", "down")
KINDS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}      # GGUF block types the compiled GEMV multiplies
_PART_ALIGN = 64
_VERSION = 1


@dataclass(frozen=True)
class Part:
    name: str                  # gate | up | down
    kind: str                  # q4_1 | q8_0 (compile.qgemv)
    shape: tuple[int, int]     # (rows, cols) of the values: gate/up (d_ffn, d), down (d, d_ffn)
    at: int                    # byte offset in the layer's extent
    nbytes: int


@dataclass(frozen=True, eq=False)
class WholeCopy:
    path: Path                 # whole.rflash
    source_hash: str
    alignment: int
    parts: tuple[Part, ...]    # the same in every layer
    offsets: np.ndarray        # int64 (n_layers,): each layer's extent in whole.rflash
    layer_bytes: int           # an extent's bytes, padded to the alignment
    checksums: tuple[str, ...]
    block_crc32: tuple[np.ndarray, ...]    # per layer, uint32 per alignment block

    @property
    def n_layers(self) -> int:
        return len(self.offsets)

    @property
    def file_bytes(self) -> int:
        """Where the last layer's extent ends: whole.rflash holds at least this many bytes."""
        return int(self.offsets.max()) + self.layer_bytes if self.n_layers else 0

    def blocks(self, raw: np.ndarray, part: Part) -> np.ndarray:
        """uint8 (rows, row bytes): a part's blocks in a layer's extent as read (a view)."""
        return raw[part.at:part.at + part.nbytes].reshape(part.shape[0], -1)


def write_whole_copy(out_dir: str | os.PathLike, layers: list[dict], gguf_path: str | os.PathLike,
                     source_hash: str, alignment: int = 4096) -> WholeCopy:
    """Write out_dir/whole.rflash, then out_dir/whole.json (the commit point), each whole or
    not at all. layers: per layer {part: a GGUF tensor (qtype, shape, raw blocks)}, as
    tuning.load_gguf.ffn_tensors reads them from gguf_path (named in errors)."""
    parts, at = [], 0
    for p in PARTS:
        t = layers[0][p]
        parts.append(Part(p, KINDS[t.qtype.name], tuple(int(s) for s in t.shape), at, int(t.raw.nbytes)))
        at = align_up(at + int(t.raw.nbytes), _PART_ALIGN)
    layer_bytes = align_up(at, alignment)
    for i, got in enumerate(layers):
        for part in parts:
            t = got[part.name]
            if KINDS[t.qtype.name] != part.kind or tuple(t.shape) != part.shape:
                raise LayoutError(f"{gguf_path}: blk.{i}.ffn_{part.name}.weight is {t.qtype.name} "
                                  f"{tuple(t.shape)}, layer 0's is {part.kind} {part.shape}; a whole "
                                  f"copy needs every layer alike; pack without --whole-copy")
    out_dir = Path(out_dir)
    offsets, sums, crcs = [], [], []
    with atomic_write(out_dir / WHOLE_FILE) as f:
        for got in layers:
            extent = np.zeros(layer_bytes, np.uint8)
            for part in parts:
                extent[part.at:part.at + part.nbytes] = got[part.name].raw.reshape(-1)
            offsets.append(f.tell())
            sums.append(hashlib.blake2b(extent, digest_size=16).hexdigest())
            crc = BlockCrc(alignment)
            crc.update(extent)
            crcs.append(encode_table(crc.finish()))
            f.write(extent.tobytes())
    doc = {"version": _VERSION, "source_hash": source_hash, "alignment": alignment,
           "layer_bytes": layer_bytes,
           "parts": [{"name": p.name, "kind": p.kind, "shape": list(p.shape), "at": p.at, "bytes": p.nbytes}
                     for p in parts],
           "layers": [{"offset": o, "checksum": c, "block_crc32": b} for o, c, b in zip(offsets, sums, crcs)]}
    with atomic_write(out_dir / WHOLE_MANIFEST, "w") as f:
        json.dump(doc, f, indent=1)
    return open_whole_copy(out_dir, source_hash)


def remove_whole_copy(out_dir: str | os.PathLike) -> None:
    """A pack without a whole copy drops the one an earlier pack left (json first: a copy
    without its json is never read)."""
    for name in (WHOLE_MANIFEST, WHOLE_FILE):
        (Path(out_dir) / name).unlink(missing_ok=True)


def open_whole_copy(layout_dir: str | os.PathLike, source_hash: str) -> WholeCopy | None:
    """The layout folder's whole copy, None when it has none; LayoutError when it is damaged,
    truncated, or of another checkpoint than `source_hash` (the layout manifest's)."""
    d = Path(layout_dir)
    if d.is_file():
        d = d.parent
    mpath, fpath = d / WHOLE_MANIFEST, d / WHOLE_FILE
    if not mpath.is_file():
        return None
    fix = "re-run `ripple pack --whole-copy`"
    try:
        doc = json.loads(mpath.read_text())
        if doc["version"] != _VERSION:
            raise LayoutError(f"{mpath}: version {doc['version']}, this ripple reads {_VERSION}; {fix}")
        parts = tuple(Part(p["name"], p["kind"], (int(p["shape"][0]), int(p["shape"][1])), int(p["at"]),
                           int(p["bytes"])) for p in doc["parts"])
        offsets = np.array([int(x["offset"]) for x in doc["layers"]], np.int64)
        sums = tuple(str(x["checksum"]) for x in doc["layers"])
        n_blocks = int(doc["layer_bytes"]) // int(doc["alignment"])
        tables = tuple(decode_table(str(x["block_crc32"]), n_blocks) for x in doc["layers"])
        if any(t is None for t in tables):
            raise LayoutError(f"{mpath}: a block_crc32 table is not {n_blocks} CRCs; {fix}")
        copy = WholeCopy(fpath, str(doc["source_hash"]), int(doc["alignment"]), parts, offsets,
                         int(doc["layer_bytes"]), sums, tables)
    except LayoutError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise LayoutError(f"{mpath}: damaged ({type(e).__name__}: {e}); {fix}") from None
    if tuple(p.name for p in parts) != PARTS or any(p.kind not in KINDS.values() for p in parts) \
            or any(p.at + p.nbytes > copy.layer_bytes for p in parts) \
            or copy.layer_bytes % copy.alignment or np.any(offsets % copy.alignment):
        raise LayoutError(f"{mpath}: parts or offsets out of shape; {fix}")
    if copy.source_hash != source_hash:
        raise LayoutError(f"{mpath}: a whole copy of another checkpoint than the layout's; {fix}")
    if not fpath.is_file():
        raise LayoutError(f"{fpath}: no such file beside {mpath.name}; {fix}")
    if fpath.stat().st_size < copy.file_bytes:
        raise LayoutError(f"{fpath}: truncated: {fpath.stat().st_size} bytes, whole.json needs "
                          f"{copy.file_bytes}; {fix}")
    return copy


def verify_whole_copy(copy: WholeCopy) -> None:
    """Re-read every layer's extent against its checksum (`ripple pack`, `--verify`)."""
    bad = []
    with open(copy.path, "rb", buffering=0) as f:
        for l, (off, want) in enumerate(zip(copy.offsets.tolist(), copy.checksums)):
            f.seek(off)
            if hashlib.blake2b(f.read(copy.layer_bytes), digest_size=16).hexdigest() != want:
                bad.append((l, off))
    if bad:
        raise LayoutChecksumError(f"{copy.path}: layer {bad[0][0]} at offset {bad[0][1]} does not match "
                                  f"its checksum ({len(bad)} layers differ); re-run `ripple pack --whole-copy`",
                                  bad)


def whole_checks(copy: WholeCopy) -> BlockChecks:
    """The copy's per-block CRCs, for FlashReader(checks=...) to check every block it reads."""
    return file_checks(str(copy.path), copy.alignment, copy.file_bytes,
                       list(zip(copy.offsets.tolist(), copy.block_crc32)))
