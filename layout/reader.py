"""Opening a layout: the checks that must pass before anyone reads a bundle by its offset.

open_layout is cheap (the manifest, one header block, a stat) and catches missing,
truncated, mismatched or foreign files; verify_layout re-reads every region against its
checksum and is for `ripple pack --verify`, copies to a phone, and tests. block_checks hands
a reader the per-block CRCs to check every block it reads (`ripple generate --verify`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .block_crc import BlockChecks, BlockCrc, file_checks
from .bundle import BundleSpec
from .errors import LayoutChecksumError, LayoutError
from .header import HEADER_BYTES, MODEL_FILE, align_up, decode_header, regions_digest
from .manifest import MANIFEST_FILE, Manifest, read_manifest

_VERIFY_CHUNK = 8 << 20


@dataclass(frozen=True, eq=False)
class Layout:
    path: Path                   # model.rflash
    manifest_path: Path
    manifest: Manifest
    spec: BundleSpec
    bundle_bytes: int
    alignment: int
    file_bytes: int              # padded size recorded at pack time (the file may be larger)
    region_offsets: np.ndarray   # int64 (n_layers,): byte offset of slot 0 of each layer
    perm: np.ndarray             # int64 (n_layers, d_ffn): perm[l, s] = neuron at slot s
    slot_of: np.ndarray          # int64 (n_layers, d_ffn): slot_of[l, i] = slot of neuron i

    @property
    def n_layers(self) -> int:
        return self.manifest.n_layers

    @property
    def d_ffn(self) -> int:
        return self.manifest.d_ffn


def open_layout(dir_or_file: str | os.PathLike, verify: bool = False) -> Layout:
    """Open the layout in a directory (or given by its model.rflash, manifest beside it)."""
    p = Path(dir_or_file)
    if p.is_dir():
        model_path, manifest_path = p / MODEL_FILE, p / MANIFEST_FILE
    elif p.name == MANIFEST_FILE:
        model_path, manifest_path = p.with_name(MODEL_FILE), p
    else:
        model_path, manifest_path = p, p.with_name(MANIFEST_FILE)
    if not model_path.is_file():
        raise LayoutError(f"{model_path}: no such file; run `ripple pack` to build the layout")
    manifest = read_manifest(manifest_path)

    where = str(model_path)
    size = model_path.stat().st_size
    if size < manifest.file_bytes:
        raise LayoutError(f"{where}: truncated: expected {manifest.file_bytes} bytes (per "
                          f"{MANIFEST_FILE}), found {size}; copy it again or re-run `ripple pack`")
    with open(model_path, "rb") as f:
        header = decode_header(f.read(HEADER_BYTES), where)
    m, spec = manifest, manifest.spec
    expected = {
        "activation": spec.activation, "dtype": spec.dtype, "has_up_bias": spec.has_up_bias,
        "n_layers": m.n_layers, "d_model": m.d_model, "d_ffn": m.d_ffn,
        "bundle_bytes": spec.bundle_bytes, "alignment": m.alignment,
        "data_offset": m.layers[0].offset, "file_bytes": m.file_bytes,
    }
    differ = [f"{k} (header {getattr(header, k)}, manifest {v})"
              for k, v in expected.items() if getattr(header, k) != v]
    if not differ and header.regions_digest != regions_digest([r.checksum for r in m.layers]):
        differ.append("region checksums")
    if differ:
        raise LayoutError(f"{where} and {manifest_path} come from different packs: they disagree "
                          f"on {', '.join(differ)}; re-run `ripple pack`")

    perm = np.stack([r.placement for r in m.layers]).astype(np.int64)
    slot_of = np.empty_like(perm)
    np.put_along_axis(slot_of, perm, np.arange(m.d_ffn, dtype=np.int64)[None, :], axis=1)
    offsets = np.array([r.offset for r in m.layers], dtype=np.int64)
    for a in (perm, slot_of, offsets):
        a.setflags(write=False)  # shared by planner, cache and reader threads
    layout = Layout(path=model_path, manifest_path=manifest_path, manifest=m, spec=spec,
                    bundle_bytes=spec.bundle_bytes, alignment=m.alignment,
                    file_bytes=m.file_bytes, region_offsets=offsets, perm=perm, slot_of=slot_of)
    if verify:
        verify_layout(layout)
    return layout


def bundle_offset(layout: Layout, layer: int, slot):
    """Byte offset of the bundle at `slot` of `layer`: region_offsets[layer] + slot * bundle_bytes.
    `slot` may be an int (returns an int) or an int array (returns an int64 array)."""
    if np.ndim(slot) == 0:
        s = int(slot)
        if not 0 <= s < layout.d_ffn:
            raise IndexError(f"slot {s} out of range for a layer of {layout.d_ffn} bundles")
        return int(layout.region_offsets[layer]) + s * layout.bundle_bytes
    slots = np.asarray(slot, dtype=np.int64)
    if slots.size and (slots.min() < 0 or slots.max() >= layout.d_ffn):
        raise IndexError(f"slots out of range for a layer of {layout.d_ffn} bundles "
                         f"(min {slots.min()}, max {slots.max()})")
    return layout.region_offsets[layer] + slots * layout.bundle_bytes


def verify_layout(layout: Layout) -> None:
    """Re-read every region and compare it with its checksum (and, with its padding, with
    its per-block CRCs); LayoutChecksumError names each region that differs."""
    bad: list[tuple[int, int]] = []
    buf = bytearray(_VERIFY_CHUNK)
    with open(layout.path, "rb", buffering=0) as f:
        for layer, region in enumerate(layout.manifest.layers):
            f.seek(region.offset)
            h = hashlib.blake2b(digest_size=16)
            crc = BlockCrc(layout.alignment) if region.block_crc32 is not None else None
            pos, end = 0, align_up(region.nbytes, layout.alignment)
            while pos < end:
                view = memoryview(buf)[:min(end - pos, len(buf))]
                got = f.readinto(view)
                if not got:
                    raise LayoutError(f"{layout.path}: truncated: layer {layer}'s region "
                                      f"(offset {region.offset}) ends past the end of the file; "
                                      f"copy it again or re-run `ripple pack`")
                h.update(view[:max(0, min(got, region.nbytes - pos))])
                if crc is not None:
                    crc.update(view[:got])
                pos += got
            if h.hexdigest() != region.checksum or (
                    crc is not None and not np.array_equal(crc.finish(), region.block_crc32)):
                bad.append((layer, region.offset))
    if bad:
        layer, offset = bad[0]
        more = (f" (and {len(bad) - 1} more: layers {', '.join(str(b[0]) for b in bad[1:])})"
                if len(bad) > 1 else "")
        raise LayoutChecksumError(
            f"{layout.path}: layer {layer} region at offset {offset} "
            f"({layout.manifest.layers[layer].nbytes} bytes) fails its checksum{more}; the file "
            f"is corrupt, copy it again or re-run `ripple pack`", bad)


def block_checks(layout: Layout) -> BlockChecks:
    """The per-block CRCs of every region, for FlashReader(checks=...) to check each read."""
    regions = layout.manifest.layers
    if any(r.block_crc32 is None for r in regions):
        raise LayoutError(f"{layout.manifest_path}: packed before per-block checksums, so reads "
                          f"cannot be checked; re-run `ripple pack`, or run without --verify")
    return file_checks(str(layout.path), layout.alignment, layout.file_bytes,
                       [(r.offset, r.block_crc32) for r in regions])


def check_source(layout: Layout, source_hash: str) -> None:
    """Refuse a layout packed from another checkpoint than the one being loaded."""
    m = layout.manifest
    if m.source_hash != source_hash:
        raise LayoutError(f"{layout.path} was packed from {m.source or '?'} (hash "
                          f"{m.source_hash or '?'}), not this checkpoint (hash {source_hash}); "
                          f"re-run `ripple pack` for this checkpoint")


def describe(layout: Layout) -> dict:
    """What `ripple inspect` prints."""
    m = layout.manifest
    ffn_bytes = sum(r.nbytes for r in m.layers)
    return {
        "path": str(layout.path),
        "format_version": m.format_version,
        "arch": m.arch,
        "n_layers": m.n_layers,
        "d_model": m.d_model,
        "d_ffn": m.d_ffn,
        "activation": layout.spec.activation,
        "dtype": layout.spec.dtype,
        "has_up_bias": layout.spec.has_up_bias,
        "bundle_bytes": layout.bundle_bytes,
        "n_regions": len(m.layers),
        "alignment": layout.alignment,
        "file_bytes": m.file_bytes,
        "ffn_bytes": ffn_bytes,
        "header_and_padding_bytes": m.file_bytes - ffn_bytes,
        "source": m.source,
        "source_hash": m.source_hash,
        "meta_keys": sorted(m.meta),
    }
