"""Writing a layout: bundles in placement order, one aligned region per layer, atomically.

Both files are written under temporary names in out_dir, fsynced, then renamed over the
final names: model.rflash first, manifest.json last, so the manifest is the commit point.
Whatever goes wrong (an exception, Ctrl-C), the temporary files are removed and the final
names hold what they held before: the old layout, or nothing.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from .block_crc import BlockCrc
from .bundle import BundleSpec
from .errors import LayoutWriteError
from .header import (HEADER_BYTES, MODEL_FILE, Header, align_up, encode_header,
                     is_valid_alignment, regions_digest)
from .manifest import MANIFEST_FILE, LayerRegion, Manifest, plain_meta

# Family name recorded when the caller gives none; matches tuning.model.ARCHS.
_DEFAULT_ARCH = {"swiglu": "llama", "relu": "opt"}

# Bundles are gathered into placement order this many bytes at a time, so packing a layer
# costs the caller's array plus this much, not a second copy of the layer.
_CHUNK_BYTES = 8 << 20


def write_layout(out_dir: str | os.PathLike, spec: BundleSpec,
                 layers: Iterable[tuple[np.ndarray, np.ndarray]], meta: dict, source: str,
                 source_hash: str, alignment: int = 4096, *, arch: str | None = None,
                 quantization: dict | None = None) -> Manifest:
    """Write out_dir/model.rflash and out_dir/manifest.json; returns the manifest written.

    `layers` yields, per layer in order, (bundles uint8 (n, bundle_bytes) in neuron order,
    perm: slot s gets neuron perm[s]). It may be a generator: one layer is held at a time.
    `quantization` (the manifest's field of that name) is read after `layers` is exhausted,
    so the generator may fill it as it encodes (layout.quantization.QuantizationReport)."""
    if not is_valid_alignment(alignment):
        raise ValueError(f"alignment must be a power of two >= 512, got {alignment!r}")
    meta = plain_meta(meta)
    if not isinstance(source_hash, str):
        raise ValueError(f"source_hash must be a str, got {type(source_hash).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final_model, final_manifest = out_dir / MODEL_FILE, out_dir / MANIFEST_FILE
    _remove_stale_temps(out_dir)
    temps: list[Path] = []
    try:
        tmp_model = _temp_name(final_model, temps)
        with _create(tmp_model) as f:
            regions, d_ffn = _write_regions(f, spec, layers, alignment)
            end = regions[-1].offset + regions[-1].nbytes
            file_bytes = align_up(end, alignment)
            # The padding makes O_DIRECT reads of aligned extents at the tail stay in the file.
            f.truncate(file_bytes)
            header = Header(activation=spec.activation, dtype=spec.dtype,
                            has_up_bias=spec.has_up_bias, n_layers=len(regions),
                            d_model=spec.d_model, d_ffn=d_ffn, bundle_bytes=spec.bundle_bytes,
                            alignment=alignment, data_offset=regions[0].offset,
                            file_bytes=file_bytes,
                            regions_digest=regions_digest([r.checksum for r in regions]))
            f.seek(0)
            f.write(encode_header(header))
            f.flush()
            os.fsync(f.fileno())
        manifest = Manifest(arch=arch or _DEFAULT_ARCH[spec.activation], n_layers=len(regions),
                            d_model=spec.d_model, d_ffn=d_ffn, spec=spec, alignment=alignment,
                            file_bytes=file_bytes, source=str(source), source_hash=source_hash,
                            layers=regions, meta=meta,
                            quantization=plain_meta(quantization or {}))
        tmp_manifest = _temp_name(final_manifest, temps)
        with _create(tmp_manifest) as f:
            f.write(manifest.to_json().encode())
            f.flush()
            os.fsync(f.fileno())
        _commit(out_dir, tmp_model, tmp_manifest, final_model, final_manifest, temps)
    except BaseException as e:
        for p in temps:
            p.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, (LayoutWriteError, PermissionError,
                                                           FileNotFoundError)):
            raise _write_error(out_dir, e) from e
        raise
    return manifest


def _write_error(out_dir: Path, e: OSError) -> LayoutWriteError:
    why = {errno.ENOSPC: "free space there or pack to another disk",
           errno.EDQUOT: "free space there or pack to another disk",
           errno.EFBIG: "the file system or a ulimit caps the file size; pack to another disk"}
    fix = why.get(e.errno, "check the disk")
    return LayoutWriteError(f"{out_dir}: writing the layout failed ({e.strerror or e}); {fix}; "
                            f"nothing was left half-written, the previous files are unchanged")


def _write_regions(f, spec: BundleSpec, layers, alignment: int) -> tuple[list[LayerRegion], int]:
    bb = spec.bundle_bytes
    offset = align_up(HEADER_BYTES, alignment)
    regions: list[LayerRegion] = []
    d_ffn = None
    total = len(layers) if hasattr(layers, "__len__") else None
    with tqdm(total=total, desc="pack", unit="layer", file=sys.stderr) as bar:
        for i, item in enumerate(layers):
            bundles, perm = _check_layer(i, item, spec)
            n = bundles.shape[0]
            if d_ffn is None:
                d_ffn = n
            elif n != d_ffn:
                raise ValueError(f"layer {i} has {n} neurons, layer 0 has {d_ffn}; every layer "
                                 f"must have the same d_ffn")
            f.seek(offset)
            h = hashlib.blake2b(digest_size=16)
            crc = BlockCrc(alignment)
            step = max(1, _CHUNK_BYTES // bb)
            for s in range(0, n, step):
                chunk = bundles[perm[s:s + step]]
                h.update(chunk)
                crc.update(chunk)
                f.write(chunk)
            regions.append(LayerRegion(offset=offset, nbytes=n * bb, checksum=h.hexdigest(),
                                       placement=perm.copy(), block_crc32=crc.finish()))
            offset = align_up(offset + n * bb, alignment)
            bar.update(1)
    if not regions:
        raise ValueError("layers yielded nothing; a layout needs at least one layer")
    return regions, d_ffn


def _check_layer(i: int, item, spec: BundleSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        bundles, perm = item
    except (TypeError, ValueError):
        raise ValueError(f"layer {i}: expected a pair (bundles, perm), got "
                         f"{type(item).__name__}") from None
    bb = spec.bundle_bytes
    if not isinstance(bundles, np.ndarray) or bundles.dtype != np.uint8 or bundles.ndim != 2 \
            or bundles.shape[1] != bb or bundles.shape[0] == 0:
        got = (f"{bundles.dtype} {bundles.shape}" if isinstance(bundles, np.ndarray)
               else type(bundles).__name__)
        raise ValueError(f"layer {i}: bundles must be uint8 (n, {bb}) from encode_bundles, "
                         f"got {got}")
    n = bundles.shape[0]
    perm = np.asarray(perm)
    if perm.ndim != 1 or perm.shape[0] != n or (perm.dtype.kind not in "iu"):
        raise ValueError(f"layer {i}: perm must be {n} ints (one slot per neuron), got "
                         f"{perm.dtype} {perm.shape}")
    perm = perm.astype(np.int64)
    if perm.min() < 0 or perm.max() >= n:
        raise ValueError(f"layer {i}: perm is not a permutation of range({n}): it holds "
                         f"{perm.min() if perm.min() < 0 else perm.max()}")
    counts = np.bincount(perm, minlength=n)
    if counts.max() != 1:
        raise ValueError(f"layer {i}: perm is not a permutation of range({n}): neurons "
                         f"{np.flatnonzero(counts > 1)[:5].tolist()} repeat, "
                         f"{np.flatnonzero(counts == 0)[:5].tolist()} are missing")
    return bundles, perm


_TEMP = re.compile(rf"\.(?:{re.escape(MODEL_FILE)}|{re.escape(MANIFEST_FILE)})\.(\d+)\.[0-9a-f]+\.tmp\Z")


def _remove_stale_temps(out_dir: Path) -> None:
    # A pack killed outright (SIGKILL, power loss) cannot clean up after itself; its temporary
    # files would hold a model's worth of disk until someone looked. The pid in the name says
    # whether their writer is gone; a live one (another pack running here) is left alone.
    for p in out_dir.iterdir():
        m = _TEMP.match(p.name)
        if m and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_name(final: Path, temps: list[Path]) -> Path:
    # Recorded before it exists, so an interrupt right after creation still cleans it up.
    p = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    temps.append(p)
    return p


def _create(path: Path):
    # os.open with 0o666 keeps the user's umask (mkstemp would leave the layout 0600).
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def _commit(out_dir: Path, tmp_model: Path, tmp_manifest: Path, final_model: Path,
            final_manifest: Path, temps: list[Path]) -> None:
    # Between the two renames the final names hold a new model.rflash and the old manifest.
    # Keep a hard link to the old model.rflash so a failure there can put the pair back.
    # Without hard links (FAT, some FUSE mounts) the old model.rflash cannot come back; the
    # new one is then removed, and the old manifest alone fails to open with "run ripple pack".
    backup = None
    if final_model.exists():
        backup = _temp_name(final_model, temps)
        try:
            os.link(final_model, backup)
        except OSError:
            backup = None
    os.replace(tmp_model, final_model)
    try:
        _fsync_dir(out_dir)  # the manifest must never reach the disk before its model file
        os.replace(tmp_manifest, final_manifest)
    except BaseException:
        if backup is not None:
            os.replace(backup, final_model)
        else:
            final_model.unlink(missing_ok=True)
        raise
    _fsync_dir(out_dir)
    if backup is not None:
        backup.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
