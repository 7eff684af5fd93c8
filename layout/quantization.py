"""A model's FFN weights as bundles of a dtype, and what the encoding cost against the source.

The source weights are the checkpoint as loaded (for a GGUF: its own dequantization), so the
error reported is what the bundles add on top of the checkpoint. q4 from a GGUF whose gate/up
tensors are Q4_1 blocks of 32 along the hidden dimension: those blocks become the bundle's
gate/up parts byte for byte (error 0, no second rounding). Down columns run across the GGUF's
blocks (a block is 32 consecutive values of a row of W_down, i.e. 32 neurons), so they are
quantized again from the dequantized weights; that error is measured here. q4d8 carries the
same gate/up blocks and quantizes the down columns to 8 bits (layout.q8) instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import q4
from .bundle import (BLOCK_DTYPES, BundleSpec, bundles_from_q4_parts, decode_bundles,
                     encode_bundles, part_codec)

VERBATIM = "gguf Q4_1 blocks, copied"
ENCODED = "encoded from the source weights"


@dataclass
class PartError:
    """Error of one bundle part (gate, up or down) summed over the layers seen so far."""
    source: str
    max_abs: float = 0.0
    sq_err: float = 0.0
    sq_ref: float = 0.0
    # q4/q4d8 only: max |error| / (step/2), step = the block's stored float16 step (q4d8 down:
    # its scale). Quantization proper is within 1; float16 rounding of a Q4_1 block's stored
    # step and minimum can add ~1e-2.
    max_over_half_step: float | None = None

    def add(self, got: np.ndarray, want: np.ndarray, half_step: np.ndarray | None = None) -> None:
        err = np.abs(got.astype(np.float64) - want)
        self.max_abs = max(self.max_abs, float(err.max(initial=0.0)))
        self.sq_err += float(np.square(err).sum())
        self.sq_ref += float(np.square(want, dtype=np.float64).sum())
        if half_step is not None:
            hs = np.repeat(half_step, q4.BLOCK, axis=1)
            ratio = float((err[hs > 0] / hs[hs > 0]).max(initial=0.0))
            self.max_over_half_step = max(self.max_over_half_step or 0.0, ratio)

    def to_dict(self) -> dict:
        out = {"source": self.source, "max_abs_err": self.max_abs,
               "rel_rms_err": float(np.sqrt(self.sq_err / self.sq_ref)) if self.sq_ref else 0.0}
        if self.max_over_half_step is not None:
            out["max_err_over_half_step"] = self.max_over_half_step
        return out


@dataclass
class QuantizationReport:
    """What the manifest's "quantization" field and `ripple pack` say about the encoding."""
    dtype: str
    parts: dict[str, PartError] = field(default_factory=dict)

    @property
    def gate_up_verbatim(self) -> bool:
        gu = [p for name, p in self.parts.items() if name != "down"]
        return bool(gu) and all(p.source == VERBATIM for p in gu)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype,
                "reference": "the source checkpoint's weights as loaded (GGUF: its own "
                             "dequantization)",
                "gate_up_verbatim": self.gate_up_verbatim,
                "parts": {name: p.to_dict() for name, p in self.parts.items()}}


def encode_layer(spec: BundleSpec, w_up: np.ndarray, w_down: np.ndarray,
                 w_gate: np.ndarray | None = None, b_up: np.ndarray | None = None,
                 q4_blocks: dict[str, np.ndarray] | None = None,
                 report: QuantizationReport | None = None) -> np.ndarray:
    """One layer's bundles, uint8 (n, spec.bundle_bytes), in neuron order.

    w_up, w_gate (n, d), w_down (d, n): float weights. q4_blocks (q4, q4d8): part name ->
    uint8 (n, spec.part_bytes) Q4_1 rows to carry unchanged (a GGUF's gate/up); their floats
    must be those blocks' dequantization. report: accumulates each part's error."""
    down_t = np.ascontiguousarray(w_down.T)
    floats = {"gate": w_gate, "up": w_up, "down": down_t}
    q4_blocks = q4_blocks or {}
    if q4_blocks and spec.dtype not in BLOCK_DTYPES:
        raise ValueError(f"Q4_1 blocks can only be carried into {' or '.join(BLOCK_DTYPES)} "
                         f"bundles, not {spec.dtype}")
    if spec.dtype == "q4d8" and "down" in q4_blocks:
        raise ValueError("q4d8 bundles hold the down column in 8 bits; pass Q4_1 blocks for "
                         "gate/up only")
    if spec.dtype in BLOCK_DTYPES:
        parts = {}
        for name in spec.parts:
            if name in q4_blocks:
                parts[name] = q4_blocks[name]
                continue
            try:
                parts[name] = part_codec(spec, name).quantize_rows(floats[name])
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        raw = bundles_from_q4_parts(spec, parts, b_up)
    else:
        raw = encode_bundles(spec, w_up, down_t, w_gate, b_up)
    if report is not None:
        got = decode_bundles(spec, raw)
        for name, at, size in zip(spec.parts, spec.part_offsets, spec.part_sizes):
            part = report.parts.setdefault(
                name, PartError(VERBATIM if name in q4_blocks else ENCODED))
            if part.source != (VERBATIM if name in q4_blocks else ENCODED):
                part.source = "mixed: some layers copied, some encoded"
            half = None
            if spec.dtype in BLOCK_DTYPES:
                codec = part_codec(spec, name)
                step = codec.steps(raw[:, at:at + size], spec.d_model)
                half = (step[0] if codec is q4 else step) / 2
            part.add(getattr(got, "down_t" if name == "down" else name), floats[name], half)
    return raw
