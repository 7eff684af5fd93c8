"""Bundles read from flash, decoded straight into float32 torch tensors for the engine's FFN.

The same values as layout.bundle.decode_bundles, bit for bit (the same float32 operations:
q4 `d*q + m`, int8 `q * scale`, fp16 widening), but all parts of all k bundles in a few
vectorised torch ops instead of numpy per part: on the embedded SmolLM2 with q4 bundles,
decode_bundles took 274 ms of a 362 ms token (30 layers, ~900 predicted neurons each,
`ripple generate --sets predicted`, one thread), nearly all in q4.dequantize_rows' numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layout import q4, q8
from ..layout.bundle import BLOCK_DTYPES, BundleSpec, part_codec


@dataclass
class BundleTensors:
    up: torch.Tensor                 # (k, d)
    down_t: torch.Tensor             # (k, d): column i of W_down as a row
    gate: torch.Tensor | None        # (k, d), SwiGLU only
    up_bias: torch.Tensor | None     # (k,), ReLU models with an up bias only
    gate_up: torch.Tensor | None = None   # (k, P, d): gate and up (P=2) or up (P=1) in one array


def decode_tensors(spec: BundleSpec, raw: np.ndarray, parts: tuple[str, ...] | None = None) -> BundleTensors:
    """raw uint8 (k, spec.bundle_bytes), as gathered from a read -> float32 tensors.
    parts: decode only these (block encodings; the others come back None), e.g. gate/up of
    every bundle read, then down only of the neurons some token keeps."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != spec.bundle_bytes:
        raise ValueError(f"raw bundles must be uint8 (k, {spec.bundle_bytes}), got {raw.dtype} {raw.shape}")
    r = torch.from_numpy(np.ascontiguousarray(raw))
    k, d, n_parts = r.shape[0], spec.d_model, len(spec.parts)
    if k == 0:       # a layer that keeps no neuron; byte views of an empty tensor fail in torch
        want = spec.parts if parts is None else parts
        empty = {n: torch.zeros(0, d) if n in want else None for n in spec.parts}
        gu = [n for n in spec.parts if n != "down"]
        return BundleTensors(empty.get("up"), empty.get("down"), empty.get("gate"),
                             torch.zeros(0) if spec.has_up_bias else None,
                             torch.zeros(0, len(gu), d) if all(n in want for n in gu) else None)
    if spec.dtype in BLOCK_DTYPES:
        want = spec.parts if parts is None else parts
        q4_parts = [(n, at) for n, at in zip(spec.parts, spec.part_offsets) if n in want and part_codec(spec, n) is q4]
        got = {}
        if q4_parts:
            # The Q4_1 parts (gate, up) lead the bundle, adjacent: one call over (k*P, row_bytes).
            first, pb = q4_parts[0][1], spec.part_bytes
            vals = _q4_rows(r[:, first:first + len(q4_parts) * pb].reshape(k * len(q4_parts), pb), d)
            vals = vals.view(k, len(q4_parts), d)
            got = {n: vals[:, i] for i, (n, _) in enumerate(q4_parts)}
        for name, at, size in zip(spec.parts, spec.part_offsets, spec.part_sizes):
            if name in want and part_codec(spec, name) is q8:
                got[name] = _q8_rows(r[:, at:at + size], d)
        bias = r[:, sum(spec.part_sizes):].contiguous().view(torch.float32)[:, 0] if spec.has_up_bias else None
        stacked = vals if q4_parts and [n for n, _ in q4_parts] == [n for n in spec.parts if n != "down"] else None
        return BundleTensors(got.get("up"), got.get("down"), got.get("gate"), bias, stacked)
    if spec.dtype == "fp16":
        v16 = r.view(torch.float16)                                           # (k, elems)
        vals = v16[:, :n_parts * d].float().reshape(k, n_parts, d)
        side = v16[:, -1:].float() if spec.has_up_bias else None
    elif spec.dtype == "int8":
        nv = n_parts * d
        side = r[:, nv:].contiguous().view(torch.float32)                     # (k, side_floats)
        vals = r[:, :nv].view(torch.int8).float().reshape(k, n_parts, d) * side[:, :n_parts, None]
        side = side[:, -1:] if spec.has_up_bias else None
    else:
        raise ValueError(f"bundle dtype {spec.dtype!r} has no torch decoder")
    got = {name: vals[:, i] for i, name in enumerate(spec.parts)}
    return BundleTensors(got["up"], got["down"], got.get("gate"), None if side is None else side[:, 0],
                         vals[:, :n_parts - 1])


def _q4_rows(raw: torch.Tensor, d: int) -> torch.Tensor:
    """layout.q4.dequantize_rows in torch: uint8 (k, row_bytes) -> float32 (k, d)."""
    k, nb = raw.shape[0], d // q4.BLOCK
    b = raw.reshape(k, nb, q4.BLOCK_BYTES)
    step_min = b[..., 0:4].contiguous().view(torch.float16).float()     # (k, nb, 2): d, m
    qs = b[..., 4:]
    q = torch.empty(k, nb, 2, q4.BLOCK // 2, dtype=torch.float32)
    q[:, :, 0] = qs & 15                       # value j: low nibble of byte j
    q[:, :, 1] = qs >> 4                       # value j + 16: its high nibble
    q = q.view(k, nb, q4.BLOCK)
    return q.mul_(step_min[..., 0:1]).add_(step_min[..., 1:2]).view(k, d)


def _q8_rows(raw: torch.Tensor, d: int) -> torch.Tensor:
    """layout.q8.dequantize_rows in torch: int8 values then float16 scales per 32."""
    k = raw.shape[0]
    q = raw[:, :d].contiguous().view(torch.int8).float().reshape(k, -1, q8.BLOCK)
    step = raw[:, d:].contiguous().view(torch.float16).float()            # (k, nb)
    return (q * step[..., None]).reshape(k, d)
