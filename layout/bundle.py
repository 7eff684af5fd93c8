"""A bundle: everything one FFN neuron needs, stored together so one read fetches it.

SwiGLU (Llama family): gate row | up row | down column.  ReLU (OPT): up row | down column,
then the up bias when the model has one. Bundles are encoded in the dtype the kernels
compute from, so a gathered buffer of k bundles is the kernel's input as is (no repacking).

int8 bundles: the parts as int8 (symmetric, scale = max|part| / 127), then float32 side data:
one scale per part, then the up bias. A gathered buffer of k int8 bundles is a (k, bundle_bytes)
int8 array; kernels read the values in place and the side data from its last bytes.

q4 bundles: each part as d_model/32 blocks in GGUF's Q4_1 byte format (layout.q4: fp16 step,
fp16 minimum, 16 bytes of nibbles; 20 bytes per 32 values along the hidden dimension), then
the up bias as float32. A GGUF's Q4_1 gate/up rows are such blocks already and are copied in
unchanged (bundles_from_q4_parts). A gathered buffer of k q4 bundles is (k, bundle_bytes) uint8.

q4d8 bundles: gate/up as q4's (Q4_1 blocks, a GGUF's copied), the down column 8-bit (layout.q8:
d int8 values, then a float16 scale per 32), then the up bias as float32. Requantizing the down
column to Q4_1 is what costs q4 its perplexity (SmolLM2-135M: +32% over the GGUF's weights;
8-bit blocks +1.6%), for 252 more bytes per bundle (1332 vs 1080 at d=576).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import q4, q8

ACTIVATIONS = ("swiglu", "relu")

# Bytes of one stored value, per encoding (q4: per 32 values, see q4.BLOCK_BYTES); everything
# else sizes itself from bundle_bytes.
_VALUE_BYTES = {"fp16": 2, "int8": 1, "q4": None, "q4d8": None}
# Encodings made of blocks of 32 along the hidden dimension (gate/up parts as Q4_1 blocks).
BLOCK_DTYPES = ("q4", "q4d8")

# Explicit little-endian: the file is read as is by kernels on ARM and x86 alike.
_FP16 = np.dtype("<f2")
_F32 = np.dtype("<f4")
# One scale per part rather than one per bundle: on SmolLM2-135M a part's max|w| differs from
# its neighbours' by up to 2x, and per-part scales cut the relative rounding error from ~1.1%
# to ~0.85% (gate, up) for 8 more bytes per bundle (0.5%).
_INT8_MAX = 127


@dataclass(frozen=True)
class BundleSpec:
    activation: str          # "swiglu" | "relu"
    d_model: int
    dtype: str = "fp16"
    has_up_bias: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if not isinstance(self.d_model, (int, np.integer)) or isinstance(self.d_model, bool) \
                or self.d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {self.d_model!r}")
        # A numpy int from a config would leak into the manifest, which json cannot write.
        object.__setattr__(self, "d_model", int(self.d_model))
        if self.dtype not in _VALUE_BYTES:
            raise ValueError(f"bundle dtype {self.dtype!r} is not supported; "
                             f"supported: {sorted(_VALUE_BYTES)}")
        if self.has_up_bias and self.activation != "relu":
            raise ValueError("only relu (OPT-style) bundles carry an up bias")
        if self.dtype in BLOCK_DTYPES and self.d_model % q4.BLOCK:
            raise ValueError(f"{self.dtype} bundles quantize blocks of {q4.BLOCK} values along the hidden "
                             f"dimension; d_model {self.d_model} is not a multiple of {q4.BLOCK}, "
                             f"use --dtype int8 or fp16")

    @property
    def parts(self) -> tuple[str, ...]:
        return ("gate", "up", "down") if self.activation == "swiglu" else ("up", "down")

    @property
    def elems(self) -> int:
        """Values per bundle: d_model per part, plus the bias."""
        return len(self.parts) * self.d_model + int(self.has_up_bias)

    @property
    def side_floats(self) -> int:
        """float32 side data after the values: int8 keeps a scale per part and the bias there,
        q4/q4d8 the bias (their scales sit in their blocks)."""
        if self.dtype == "int8":
            return len(self.parts) + int(self.has_up_bias)
        return int(self.has_up_bias) if self.dtype in BLOCK_DTYPES else 0

    @property
    def part_bytes(self) -> int:
        """Bytes of one gate/up row in the bundle (and of the down column, but for q4d8:
        part_sizes)."""
        if self.dtype in BLOCK_DTYPES:
            return q4.row_bytes(self.d_model)
        return self.d_model * _VALUE_BYTES[self.dtype]

    @property
    def part_sizes(self) -> tuple[int, ...]:
        """Bytes of each part, in `parts` order."""
        if self.dtype == "q4d8":
            return (self.part_bytes,) * (len(self.parts) - 1) + (q8.row_bytes(self.d_model),)
        return (self.part_bytes,) * len(self.parts)

    @property
    def part_offsets(self) -> tuple[int, ...]:
        """Byte offset of each part in the bundle, in `parts` order."""
        return tuple(int(o) for o in np.cumsum((0,) + self.part_sizes[:-1]))

    @property
    def bundle_bytes(self) -> int:
        if self.dtype in BLOCK_DTYPES:
            return sum(self.part_sizes) + 4 * self.side_floats
        if self.side_floats:
            return len(self.parts) * self.d_model * _VALUE_BYTES[self.dtype] + 4 * self.side_floats
        return self.elems * _VALUE_BYTES[self.dtype]


@dataclass
class Bundles:
    """Decoded bundles, float32, row j = the j-th bundle given to decode_bundles."""
    up: np.ndarray                     # (k, d)
    down_t: np.ndarray                 # (k, d): columns of W_down, as rows
    gate: np.ndarray | None = None     # (k, d), SwiGLU only
    up_bias: np.ndarray | None = None  # (k,), ReLU with bias only


def _check_up_bias(spec: BundleSpec, up_bias, n: int) -> None:
    if spec.has_up_bias:
        if up_bias is None or np.shape(up_bias) != (n,):
            raise ValueError(f"up_bias must have shape ({n},), got "
                             f"{None if up_bias is None else np.shape(up_bias)}")
    elif up_bias is not None:
        raise ValueError("this BundleSpec has has_up_bias=False; pass up_bias=None")


def encode_bundles(spec: BundleSpec, up: np.ndarray, down_t: np.ndarray,
                   gate: np.ndarray | None = None,
                   up_bias: np.ndarray | None = None) -> np.ndarray:
    """Bundles of n neurons in neuron order: uint8 (n, spec.bundle_bytes).

    up and gate are rows of W_up / W_gate, (n, d); down_t is W_down transposed, (n, d)."""
    up = np.asarray(up)
    n = up.shape[0] if up.ndim == 2 else -1
    parts = {"gate": gate, "up": up, "down": down_t}
    for name in spec.parts:
        _check_rows(name, parts[name], n, spec.d_model)
    if "gate" not in spec.parts and gate is not None:
        raise ValueError("relu bundles have no gate; pass gate=None")
    _check_up_bias(spec, up_bias, n)
    return _ENCODE[spec.dtype](spec, parts, up_bias)


def decode_bundles(spec: BundleSpec, raw: np.ndarray) -> Bundles:
    """The inverse of encode_bundles for k bundles read from a layout: raw uint8 (k, bundle_bytes)."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != spec.bundle_bytes:
        raise ValueError(f"raw bundles must be uint8 (k, {spec.bundle_bytes}), "
                         f"got {raw.dtype} {raw.shape}")
    return _DECODE[spec.dtype](spec, np.ascontiguousarray(raw))


def _check_rows(name: str, a, n: int, d: int) -> None:
    shape = None if a is None else np.shape(a)
    if shape is None or len(shape) != 2 or shape[1] != d or (n >= 0 and shape[0] != n):
        want = f"({n if n >= 0 else 'n'}, {d})"
        raise ValueError(f"{name} must have shape {want}, got {shape}")


def _encode_fp16(spec: BundleSpec, parts: dict, up_bias) -> np.ndarray:
    d = spec.d_model
    n = parts["up"].shape[0]
    out = np.empty((n, spec.elems), dtype=_FP16)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, by part name
        for i, name in enumerate(spec.parts):
            out[:, i * d:(i + 1) * d] = parts[name]
        if spec.has_up_bias:
            out[:, -1] = up_bias
    # A value beyond fp16's range silently becomes inf and poisons every token that reads it.
    if not np.isfinite(out).all():
        bad = [name for i, name in enumerate(spec.parts)
               if not np.isfinite(out[:, i * d:(i + 1) * d]).all()]
        if spec.has_up_bias and not np.isfinite(out[:, -1]).all():
            bad.append("up_bias")
        raise ValueError(f"{', '.join(bad)} hold NaN or values beyond float16's range "
                         f"(|x| > 65504); fp16 bundles cannot store them")
    return out.view(np.uint8)


def _decode_fp16(spec: BundleSpec, raw: np.ndarray) -> Bundles:
    d = spec.d_model
    vals = raw.view(_FP16)  # (k, elems): the same view a kernel takes of the gathered buffer
    got = {name: vals[:, i * d:(i + 1) * d].astype(np.float32) for i, name in enumerate(spec.parts)}
    bias = vals[:, -1].astype(np.float32) if spec.has_up_bias else None
    return Bundles(up=got["up"], down_t=got["down"], gate=got.get("gate"), up_bias=bias)


def _encode_int8(spec: BundleSpec, parts: dict, up_bias) -> np.ndarray:
    d, names = spec.d_model, spec.parts
    n = parts["up"].shape[0]
    values = np.empty((n, len(names) * d), dtype=np.int8)
    side = np.empty((n, spec.side_floats), dtype=_F32)
    bad = []
    for i, name in enumerate(names):
        w = np.asarray(parts[name], dtype=np.float64)
        if not np.isfinite(w).all():
            bad.append(name)
            continue
        amax = np.abs(w).max(axis=1)
        scale = np.where(amax > 0, amax / _INT8_MAX, 1.0)
        values[:, i * d:(i + 1) * d] = np.clip(np.rint(w / scale[:, None]), -_INT8_MAX, _INT8_MAX)
        side[:, i] = scale
    if spec.has_up_bias:
        with np.errstate(over="ignore", invalid="ignore"):
            side[:, -1] = up_bias
        if not np.isfinite(side[:, -1]).all():
            bad.append("up_bias")
    if bad:
        raise ValueError(f"{', '.join(bad)} hold NaN or inf (up_bias: or values beyond float32); "
                         f"int8 bundles cannot store them")
    out = np.empty((n, spec.bundle_bytes), dtype=np.uint8)
    out[:, :values.shape[1]] = values.view(np.uint8)
    out[:, values.shape[1]:] = side.view(np.uint8)
    return out


def _decode_int8(spec: BundleSpec, raw: np.ndarray) -> Bundles:
    d, names = spec.d_model, spec.parts
    nv = len(names) * d
    vals = raw[:, :nv].view(np.int8)
    side = np.ascontiguousarray(raw[:, nv:]).view(_F32)      # (k, side_floats)
    got = {name: vals[:, i * d:(i + 1) * d].astype(np.float32) * side[:, i:i + 1]
           for i, name in enumerate(names)}
    bias = side[:, -1].astype(np.float32) if spec.has_up_bias else None
    return Bundles(up=got["up"], down_t=got["down"], gate=got.get("gate"), up_bias=bias)


def bundles_from_q4_parts(spec: BundleSpec, parts: dict[str, np.ndarray],
                          up_bias: np.ndarray | None = None) -> np.ndarray:
    """q4 / q4d8 bundles from parts already encoded: uint8 (n, spec.bundle_bytes).

    parts: name -> uint8 (n, its spec.part_sizes entry): Q4_1 rows, e.g. a GGUF's ffn_gate/ffn_up
    rows as they lie in the file (copied, not re-rounded); the down columns as q4.quantize_rows
    (q4) or q8.quantize_rows (q4d8)."""
    if spec.dtype not in BLOCK_DTYPES:
        raise ValueError(f"bundles_from_q4_parts builds {' or '.join(BLOCK_DTYPES)} bundles, "
                         f"the spec is {spec.dtype}")
    if set(parts) != set(spec.parts):
        raise ValueError(f"parts must be exactly {spec.parts}, got {sorted(parts)}")
    n = None
    for name, size in zip(spec.parts, spec.part_sizes):
        a = parts[name]
        ok = isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 2 \
            and a.shape[1] == size and a.shape[0] == (a.shape[0] if n is None else n)
        if not ok:
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            form = "8-bit blocks" if spec.dtype == "q4d8" and name == "down" else "Q4_1 blocks"
            raise ValueError(f"{name} must be {form}, uint8 ({'n' if n is None else n}, "
                             f"{size}), got {got}")
        n = a.shape[0]
    _check_up_bias(spec, up_bias, n)
    out = np.empty((n, spec.bundle_bytes), dtype=np.uint8)
    for name, at, size in zip(spec.parts, spec.part_offsets, spec.part_sizes):
        out[:, at:at + size] = parts[name]
    end = sum(spec.part_sizes)
    if spec.has_up_bias:
        with np.errstate(over="ignore", invalid="ignore"):
            bias = np.asarray(up_bias).astype(_F32)
        if not np.isfinite(bias).all():
            raise ValueError("up_bias holds NaN or inf (or values beyond float32); "
                             f"{spec.dtype} bundles cannot store them")
        out[:, end:] = bias.reshape(n, 1).view(np.uint8)
    return out


def part_codec(spec: BundleSpec, name: str):
    """The module (q4 or q8) whose quantize_rows / dequantize_rows / row_bytes encode part
    `name` of a q4 or q4d8 bundle."""
    return q8 if spec.dtype == "q4d8" and name == "down" else q4


def _encode_q4(spec: BundleSpec, parts: dict, up_bias) -> np.ndarray:
    blocks = {}
    for name in spec.parts:
        try:
            blocks[name] = part_codec(spec, name).quantize_rows(parts[name])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return bundles_from_q4_parts(spec, blocks, up_bias)


def _decode_q4(spec: BundleSpec, raw: np.ndarray) -> Bundles:
    d = spec.d_model
    got = {name: part_codec(spec, name).dequantize_rows(raw[:, at:at + size], d)
           for name, at, size in zip(spec.parts, spec.part_offsets, spec.part_sizes)}
    bias = (np.ascontiguousarray(raw[:, sum(spec.part_sizes):]).view(_F32)[:, 0].astype(np.float32)
            if spec.has_up_bias else None)
    return Bundles(up=got["up"], down_t=got["down"], gate=got.get("gate"), up_bias=bias)


_ENCODE = {"fp16": _encode_fp16, "int8": _encode_int8, "q4": _encode_q4, "q4d8": _encode_q4}
_DECODE = {"fp16": _decode_fp16, "int8": _decode_int8, "q4": _decode_q4, "q4d8": _decode_q4}
