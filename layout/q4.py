"""4-bit blocks in GGUF's Q4_1 byte format: 32 values as float16 step d, float16 minimum m,
then 16 bytes of nibbles (byte j holds value j in its low nibble, value j+16 in its high one);
value = d*q + m, q in 0..15. 20 bytes per 32 values (5 bits a value).

The same bytes as llama.cpp's Q4_1, so a GGUF tensor's blocks can be copied into a bundle as
they are, and the same quantization rule (ggml's quantize_row_q4_1_ref: d = (max-min)/15 in
float32, q = trunc((x-min)/d + 0.5) clipped to 15), so a row quantized here is byte-equal to
the one llama.cpp's quantize tool writes from the same floats.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32               # values per block
BLOCK_BYTES = 20         # 2 (d) + 2 (m) + 16 (nibbles)
_HALF = BLOCK // 2
_FP16 = np.dtype("<f2")
_FP16_MAX = float(np.finfo(np.float16).max)


def row_bytes(n_values: int) -> int:
    """Bytes of one row of n_values (a multiple of BLOCK) as Q4_1 blocks."""
    if n_values % BLOCK:
        raise ValueError(f"Q4_1 rows hold whole blocks of {BLOCK} values; {n_values} is not a "
                         f"multiple of {BLOCK}")
    return n_values // BLOCK * BLOCK_BYTES


def quantize_rows(w: np.ndarray) -> np.ndarray:
    """float (n, c) -> uint8 (n, row_bytes(c)): each row as c/32 Q4_1 blocks.

    Raises ValueError when a block holds NaN/inf or its minimum or step is beyond float16's
    range: the stored block would decode to inf or NaN."""
    w = np.asarray(w, dtype=np.float32)
    n, c = w.shape
    row_bytes(c)
    blocks = w.reshape(n, c // BLOCK, BLOCK)
    lo = blocks.min(axis=-1, keepdims=True)
    hi = blocks.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        d = (hi - lo) / np.float32(15)
        ok = np.isfinite(d) & (np.abs(lo) <= _FP16_MAX) & (d <= _FP16_MAX)
    if not ok.all():
        raise ValueError("values are NaN/inf or span more than float16 can hold per block "
                         f"(|min| or (max-min)/15 > {_FP16_MAX:g}); Q4_1 blocks cannot store them")
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc((blocks - lo) * inv + np.float32(0.5)).astype(np.int32).clip(0, 15).astype(np.uint8)
    out = np.empty((n, c // BLOCK, BLOCK_BYTES), dtype=np.uint8)
    out[..., 0:2] = d.astype(_FP16).view(np.uint8)
    out[..., 2:4] = lo.astype(_FP16).view(np.uint8)
    out[..., 4:] = q[..., :_HALF] | (q[..., _HALF:] << np.uint8(4))
    return out.reshape(n, -1)


def dequantize_rows(raw: np.ndarray, n_values: int) -> np.ndarray:
    """uint8 (n, row_bytes(n_values)) -> float32 (n, n_values)."""
    raw = np.ascontiguousarray(raw)
    n = raw.shape[0]
    b = raw.reshape(n, n_values // BLOCK, BLOCK_BYTES)
    d = b[..., 0:2].copy().view(_FP16).astype(np.float32)
    m = b[..., 2:4].copy().view(_FP16).astype(np.float32)
    qs = b[..., 4:]
    q = np.concatenate((qs & np.uint8(15), qs >> np.uint8(4)), axis=-1).astype(np.float32)
    return (d * q + m).reshape(n, n_values)


def steps(raw: np.ndarray, n_values: int) -> tuple[np.ndarray, np.ndarray]:
    """(d, m) float32 (n, n_values/32): each block's stored step and minimum."""
    raw = np.ascontiguousarray(raw)
    b = raw.reshape(raw.shape[0], n_values // BLOCK, BLOCK_BYTES)
    return (b[..., 0:2].copy().view(_FP16)[..., 0].astype(np.float32),
            b[..., 2:4].copy().view(_FP16)[..., 0].astype(np.float32))
