"""Per-block CRC32 of each region, so that a sparse read can be checked without reading
the whole region: the manifest's blake2b per region covers megabytes, a token reads a few
aligned blocks of it.

A block is `alignment` bytes of model.rflash (4 KiB by default), the unit every planned
read is made of (runtime_py.planner aligns extents to it). A region's table covers its
blocks from its offset to its padded end; the padding is zeros and is checked too.
"""
from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import LayoutChecksumError


class BlockCrc:
    """Feeds bytes in write order, one CRC32 per block; finish() pads the last block with
    the zeros the file holds there."""

    def __init__(self, block: int):
        self.block = block
        self.crcs: list[int] = []
        self._crc = 0
        self._fill = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            take = min(self.block - self._fill, len(view) - pos)
            self._crc = zlib.crc32(view[pos:pos + take], self._crc)
            self._fill += take
            pos += take
            if self._fill == self.block:
                self.crcs.append(self._crc)
                self._crc, self._fill = 0, 0

    def finish(self) -> np.ndarray:
        if self._fill:
            self.update(bytes(self.block - self._fill))
        return np.array(self.crcs, dtype=np.uint32)


def encode_table(crcs: np.ndarray) -> str:
    """The manifest's form: base64 of little-endian uint32 (a layer of SmolLM2 is ~7 KB)."""
    return base64.b64encode(np.asarray(crcs, dtype="<u4").tobytes()).decode("ascii")


def decode_table(text: str, n_blocks: int) -> np.ndarray | None:
    """None when `text` is not base64 of exactly n_blocks uint32."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None
    if len(raw) != 4 * n_blocks:
        return None
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


@dataclass(frozen=True, eq=False)
class BlockChecks:
    """What a reader needs to check the blocks it reads: the CRC of every block of the file,
    and which blocks have one (the header's block is checked at open instead)."""
    path: str
    block: int
    crcs: np.ndarray      # uint32 (file_bytes // block,)
    known: np.ndarray     # bool, same shape
    layer_of: np.ndarray  # int32, same shape: the region a block belongs to (-1: none)


def file_checks(path: str, block: int, file_bytes: int,
                regions: list[tuple[int, np.ndarray]]) -> BlockChecks:
    """regions: (offset, table) per layer, in layer order."""
    n = file_bytes // block
    crcs = np.zeros(n, np.uint32)
    known = np.zeros(n, bool)
    layer_of = np.full(n, -1, np.int32)
    for layer, (offset, table) in enumerate(regions):
        b0 = offset // block
        crcs[b0:b0 + len(table)] = table
        known[b0:b0 + len(table)] = True
        layer_of[b0:b0 + len(table)] = layer
    return BlockChecks(path, block, crcs, known, layer_of)


def check_extents(checks: BlockChecks, buffer: np.ndarray, starts: np.ndarray,
                  extents: np.ndarray) -> None:
    """Compare every block of the extents just read (buffer[starts[i]:] holds extent i) with
    its CRC; LayoutChecksumError names the first block that differs. Cost: one zlib.crc32 per
    block, ~2x a CRC over the same bytes in one call (see the issue 9 note for figures)."""
    blk = checks.block
    view = memoryview(buffer)
    for (off, n), s in zip(np.asarray(extents).tolist(), np.asarray(starts).tolist()):
        if off % blk or n % blk:
            raise ValueError(f"{checks.path}: extent ({off}, {n}) is not made of whole "
                             f"{blk}-byte blocks; checked reads need aligned extents")
        b0 = off // blk
        for i in range(n // blk):
            b = b0 + i
            if b >= len(checks.known):
                raise ValueError(f"{checks.path}: extent ({off}, {n}) ends past the layout's "
                                 f"{len(checks.known) * blk} bytes")
            if not checks.known[b]:
                continue
            if zlib.crc32(view[s + i * blk:s + (i + 1) * blk]) != int(checks.crcs[b]):
                layer = int(checks.layer_of[b])
                raise LayoutChecksumError(
                    f"{checks.path}: block at offset {b * blk} ({blk} bytes, layer {layer}) "
                    f"read back with a different checksum; the file or the device is corrupt: "
                    f"run `ripple inspect --verify`, copy it again or re-run `ripple pack`",
                    [(layer, b * blk)])
