"""manifest.json: everything about a layout a reader needs besides the bundle bytes.

Model dims, the bundle encoding, the source checkpoint's identity, and per layer its
placement, region and checksum; plus `meta`, a free dict where other stages record what
they measured (sparsity, per-layer thresholds, profile info).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .block_crc import decode_table, encode_table
from .bundle import BundleSpec
from .errors import LayoutError
from .header import FORMAT_VERSION, HEADER_BYTES, align_up, is_valid_alignment

MANIFEST_FILE = "manifest.json"

_CHECKSUM = re.compile(r"[0-9a-f]{32}\Z")  # blake2b-128, hex


@dataclass(eq=False)
class LayerRegion:
    offset: int               # byte offset of slot 0 in model.rflash, a multiple of alignment
    nbytes: int               # d_ffn * bundle_bytes; the padding after it is not counted
    checksum: str             # blake2b-128 hex of those nbytes
    placement: np.ndarray     # int64 (d_ffn,): slot s holds neuron placement[s]
    # uint32 CRC32 per alignment block up to the padded end (layout.block_crc), so reads
    # can be checked block by block; None in layouts packed before it existed.
    block_crc32: np.ndarray | None = None


@dataclass(eq=False)
class Manifest:
    arch: str
    n_layers: int
    d_model: int
    d_ffn: int
    spec: BundleSpec
    alignment: int
    file_bytes: int           # size of model.rflash, padded to alignment
    source: str               # checkpoint path the layout was packed from
    source_hash: str          # its identity (tuning.model.checkpoint_hash)
    layers: list[LayerRegion]
    meta: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # How the bundles were encoded from the source and the error that added, per part
    # (layout.quantization.QuantizationReport.to_dict); {} in layouts packed before it existed.
    quantization: dict = field(default_factory=dict)

    @property
    def bundle_bytes(self) -> int:
        return self.spec.bundle_bytes

    def to_json(self) -> str:
        head = {
            "format_version": self.format_version,
            "model": {"arch": self.arch, "n_layers": self.n_layers,
                      "d_model": self.d_model, "d_ffn": self.d_ffn},
            "bundle": {"activation": self.spec.activation, "dtype": self.spec.dtype,
                       "has_up_bias": self.spec.has_up_bias,
                       "bundle_bytes": self.spec.bundle_bytes},
            "alignment": self.alignment,
            "file_bytes": self.file_bytes,
            "source": {"path": self.source, "hash": self.source_hash},
            "meta": self.meta,
            "quantization": self.quantization,
        }
        layers = [{"offset": r.offset, "bytes": r.nbytes, "checksum": r.checksum,
                   "placement": np.asarray(r.placement).tolist(),
                   **({} if r.block_crc32 is None else {"block_crc32": encode_table(r.block_crc32)})}
                  for r in self.layers]
        # One line per layer: a placement is d_ffn ints, and one int per line would bury
        # the rest of the manifest.
        text = json.dumps(head, indent=2, default=_plain)
        rows = ",\n".join("    " + json.dumps(x, separators=(", ", ": ")) for x in layers)
        return text[:-2] + ',\n  "layers": [\n' + rows + "\n  ]\n}\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST_FILE) -> "Manifest":
        """Parse and check a manifest; `where` (its path) goes into every LayoutError."""
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise LayoutError(f"{where}: not valid JSON ({e}); re-run `ripple pack`") from None
        except RecursionError:   # a damaged file of "[[[[..." (found by tests/test_layout_fuzz.py)
            raise LayoutError(f"{where}: not valid JSON (nested too deep); re-run `ripple pack`") from None
        return _parse(doc, where)


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise LayoutError(f"{path}: no manifest; run `ripple pack` to build the layout") from None
    except OSError as e:
        raise LayoutError(f"{path}: cannot read the manifest ({e.strerror})") from None
    return Manifest.from_json(text, where=str(path))


def plain_meta(meta: dict) -> dict:
    """meta as the manifest will hold it, checked up front so a pack fails before it writes
    gigabytes, not after."""
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(meta, default=_plain))
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from None


def _plain(x):
    """numpy scalars and arrays in meta (a measured sparsity, a threshold per layer)."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _bad(where: str, path: str, what: str) -> LayoutError:
    return LayoutError(f"{where}: field {path} {what}; the manifest is damaged or from "
                       f"another tool, re-run `ripple pack`")


def _take(d: dict, key: str, kind: type, path: str, where: str):
    if key not in d:
        raise _bad(where, path + key, "is missing")
    v = d[key]
    # bool is an int to Python, never to us.
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok:
        raise _bad(where, path + key, f"must be {kind.__name__}, got {json.dumps(v)[:40]}")
    return v


def _count(d: dict, key: str, path: str, where: str, lo: int = 1) -> int:
    v = _take(d, key, int, path, where)
    if v < lo:
        raise _bad(where, path + key, f"must be >= {lo}, got {v}")
    return v


def _parse(doc, where: str) -> Manifest:
    if not isinstance(doc, dict):
        raise _bad(where, "(top level)", "must be an object")
    version = _take(doc, "format_version", int, "", where)
    if version != FORMAT_VERSION:
        raise LayoutError(f"{where}: format version {version}, this ripple reads version "
                          f"{FORMAT_VERSION}; re-run `ripple pack` with this ripple")
    model = _take(doc, "model", dict, "", where)
    arch = _take(model, "arch", str, "model.", where)
    n_layers = _count(model, "n_layers", "model.", where)
    d_model = _count(model, "d_model", "model.", where)
    d_ffn = _count(model, "d_ffn", "model.", where)

    bundle = _take(doc, "bundle", dict, "", where)
    activation = _take(bundle, "activation", str, "bundle.", where)
    dtype = _take(bundle, "dtype", str, "bundle.", where)
    has_up_bias = _take(bundle, "has_up_bias", bool, "bundle.", where)
    bundle_bytes = _count(bundle, "bundle_bytes", "bundle.", where)
    try:
        spec = BundleSpec(activation, d_model, dtype, has_up_bias)
    except ValueError as e:
        raise _bad(where, "bundle", f"is not a bundle this ripple reads ({e})") from None
    if bundle_bytes != spec.bundle_bytes:
        raise _bad(where, "bundle.bundle_bytes",
                   f"is {bundle_bytes}, but a {dtype} {activation} bundle of d_model {d_model} "
                   f"is {spec.bundle_bytes}")

    alignment = _take(doc, "alignment", int, "", where)
    if not is_valid_alignment(alignment):
        raise _bad(where, "alignment", f"must be a power of two >= 512, got {alignment}")
    file_bytes = _count(doc, "file_bytes", "", where)
    source = _take(doc, "source", dict, "", where)
    source_path = _take(source, "path", str, "source.", where)
    source_hash = _take(source, "hash", str, "source.", where)
    meta = _take(doc, "meta", dict, "", where)
    quantization = _take(doc, "quantization", dict, "", where) if "quantization" in doc else {}

    raw_layers = _take(doc, "layers", list, "", where)
    if len(raw_layers) != n_layers:
        raise _bad(where, "layers", f"has {len(raw_layers)} entries, model.n_layers is {n_layers}")
    layers = []
    end = HEADER_BYTES
    for i, raw in enumerate(raw_layers):
        p = f"layers[{i}]."
        if not isinstance(raw, dict):
            raise _bad(where, f"layers[{i}]", "must be an object")
        offset = _count(raw, "offset", p, where, lo=0)
        nbytes = _count(raw, "bytes", p, where)
        checksum = _take(raw, "checksum", str, p, where)
        placement = _placement(_take(raw, "placement", list, p, where), d_ffn, p, where)
        if offset % alignment or offset < end:
            raise _bad(where, p + "offset", f"is {offset}; regions start at multiples of "
                       f"{alignment} after the header and the previous region (>= {end})")
        if nbytes != d_ffn * bundle_bytes:
            raise _bad(where, p + "bytes", f"is {nbytes}, d_ffn * bundle_bytes is "
                       f"{d_ffn * bundle_bytes}")
        if not _CHECKSUM.match(checksum):
            raise _bad(where, p + "checksum", "must be 32 lowercase hex digits (blake2b-128)")
        blocks = None
        if "block_crc32" in raw:
            n_blocks = align_up(nbytes, alignment) // alignment
            blocks = decode_table(_take(raw, "block_crc32", str, p, where), n_blocks)
            if blocks is None:
                raise _bad(where, p + "block_crc32", f"must be base64 of {n_blocks} uint32 CRCs")
        end = offset + nbytes
        layers.append(LayerRegion(offset, nbytes, checksum, placement, blocks))
    if file_bytes != align_up(end, alignment):
        raise _bad(where, "file_bytes", f"is {file_bytes}; the last region ends at {end}, "
                   f"padded to {align_up(end, alignment)}")
    return Manifest(arch=arch, n_layers=n_layers, d_model=d_model, d_ffn=d_ffn, spec=spec,
                    alignment=alignment, file_bytes=file_bytes, source=source_path,
                    source_hash=source_hash, layers=layers, meta=meta, format_version=version,
                    quantization=quantization)


def _placement(values: list, d_ffn: int, p: str, where: str) -> np.ndarray:
    if len(values) != d_ffn or not all(isinstance(v, int) and not isinstance(v, bool)
                                       for v in values):
        raise _bad(where, p + "placement", f"must be {d_ffn} ints")
    if any(not 0 <= v < d_ffn for v in values):   # before numpy: 2**70 would overflow int64
        raise _bad(where, p + "placement", f"is not a permutation of range({d_ffn})")
    perm = np.asarray(values, dtype=np.int64)
    if perm.size and (perm.min() < 0 or perm.max() >= d_ffn
                      or np.bincount(perm, minlength=d_ffn).max() != 1):
        raise _bad(where, p + "placement", f"is not a permutation of range({d_ffn})")
    return perm
