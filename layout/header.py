"""The header block of model.rflash: what a reader checks before it trusts a single offset.

Byte layout (little-endian), in a HEADER_BYTES block; the rest of the block is zero:

    off size field
      0   8  magic            b"RFLASH\\x00\\x01"
      8   4  format_version   u32
     12   4  header_bytes     u32, 4096
     16   2  activation       u16, ACTIVATION_CODES
     18   2  dtype            u16, DTYPE_CODES
     20   4  flags            u32, bit 0: bundles end with the up bias
     24   4  n_layers         u32
     28   4  d_model          u32
     32   4  d_ffn            u32, neurons (bundles) per layer
     36   4  bundle_bytes     u32
     40   4  alignment        u32, every region starts at a multiple of it; so does EOF
     44   4  reserved         u32, 0
     48   8  data_offset      u64, where layer 0's region starts
     56   8  file_bytes       u64, the file's size, padded to alignment
     64  16  regions_digest   blake2b-128 over the layers' region checksums, in layer order
     80   4  header_crc       u32, zlib crc32 of the whole block with this field zeroed

regions_digest ties the file to the manifest.json packed with it: a manifest from another
pack (say, a re-pack interrupted between its two renames) is caught at open, not by wrong
outputs.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

from .errors import LayoutError

MODEL_FILE = "model.rflash"
MAGIC = b"RFLASH\x00\x01"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
# O_DIRECT needs at least the logical block size (512 B on old eMMC, 4 KiB on UFS and NVMe).
MIN_ALIGNMENT = 512

ACTIVATION_CODES = {"swiglu": 1, "relu": 2}
# q4: GGUF Q4_1 blocks (layout.q4); q4d8: Q4_1 gate/up, 8-bit down (layout.q8).
DTYPE_CODES = {"fp16": 1, "int8": 2, "q4": 3, "q4d8": 4}

_FLAG_UP_BIAS = 1
_STRUCT = struct.Struct("<8sIIHHIIIIIIIQQ16sI")
_CRC_AT = _STRUCT.size - 4


@dataclass(frozen=True)
class Header:
    activation: str
    dtype: str
    has_up_bias: bool
    n_layers: int
    d_model: int
    d_ffn: int
    bundle_bytes: int
    alignment: int
    data_offset: int
    file_bytes: int
    regions_digest: bytes
    format_version: int = FORMAT_VERSION


def align_up(x: int, alignment: int) -> int:
    return -(-x // alignment) * alignment


def is_valid_alignment(alignment) -> bool:
    return (isinstance(alignment, int) and not isinstance(alignment, bool)
            and alignment >= MIN_ALIGNMENT and alignment & (alignment - 1) == 0)


def regions_digest(checksums: list[str]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for c in checksums:
        h.update(bytes.fromhex(c))
    return h.digest()


def encode_header(h: Header) -> bytes:
    fields = _STRUCT.pack(
        MAGIC, h.format_version, HEADER_BYTES, ACTIVATION_CODES[h.activation],
        DTYPE_CODES[h.dtype], _FLAG_UP_BIAS if h.has_up_bias else 0, h.n_layers, h.d_model,
        h.d_ffn, h.bundle_bytes, h.alignment, 0, h.data_offset, h.file_bytes,
        h.regions_digest, 0)
    block = bytearray(HEADER_BYTES)
    block[:len(fields)] = fields
    struct.pack_into("<I", block, _CRC_AT, zlib.crc32(block))
    return bytes(block)


def decode_header(block: bytes, where: str) -> Header:
    """Parse and check a header block; `where` (the file's path) goes into every error."""
    if len(block) < HEADER_BYTES:
        raise LayoutError(f"{where}: truncated header ({len(block)} of {HEADER_BYTES} bytes); "
                          f"re-run `ripple pack`")
    block = bytes(block[:HEADER_BYTES])
    (magic, version, header_bytes, act, dtype, flags, n_layers, d_model, d_ffn, bundle_bytes,
     alignment, _reserved, data_offset, file_bytes, digest, crc) = _STRUCT.unpack_from(block)
    if magic != MAGIC:
        raise LayoutError(f"{where}: not a ripple-flash layout (magic {magic!r}, expected "
                          f"{MAGIC!r}); run `ripple pack` to build one")
    zeroed = block[:_CRC_AT] + bytes(4) + block[_CRC_AT + 4:]
    if zlib.crc32(zeroed) != crc:
        raise LayoutError(f"{where}: header is corrupt (crc mismatch); copy the file again "
                          f"or re-run `ripple pack`")
    # Checked after the crc: a newer writer's header is intact, just not ours to read.
    if version != FORMAT_VERSION:
        raise LayoutError(f"{where}: format version {version}, this ripple reads version "
                          f"{FORMAT_VERSION}; re-run `ripple pack` with this ripple")
    activation = {v: k for k, v in ACTIVATION_CODES.items()}.get(act)
    dtype_name = {v: k for k, v in DTYPE_CODES.items()}.get(dtype)
    if header_bytes != HEADER_BYTES or activation is None or dtype_name is None:
        raise LayoutError(f"{where}: header has unknown values (header_bytes {header_bytes}, "
                          f"activation code {act}, dtype code {dtype}); re-run `ripple pack`")
    return Header(activation=activation, dtype=dtype_name, has_up_bias=bool(flags & _FLAG_UP_BIAS),
                  n_layers=n_layers, d_model=d_model, d_ffn=d_ffn, bundle_bytes=bundle_bytes,
                  alignment=alignment, data_offset=data_offset, file_bytes=file_bytes,
                  regions_digest=digest, format_version=version)
