"""Hostile bytes in the header and manifest parsers: random bytes, truncations, flipped bits,
absurd sizes always end in a LayoutError (or a layout that is valid), never in another
exception, a hang, or a huge allocation."""
import copy
import json
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ripple.layout import BundleSpec, LayoutError, Manifest, encode_bundles, open_layout, write_layout
from ripple.layout.header import _CRC_AT, _STRUCT, HEADER_BYTES, decode_header

D, N, LAYERS = 16, 24, 2
SPEC = BundleSpec("swiglu", D, "fp16", False)
# Per example: a parse of a few KB. A hang or a quadratic path blows through this.
FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    layers = [(encode_bundles(SPEC, *(rng.standard_normal((N, D), dtype=np.float32) for _ in range(3))),
               rng.permutation(N)) for _ in range(LAYERS)]
    write_layout(d, SPEC, layers, {"sparsity": 0.5}, "/ckpt", "ab" * 16)
    return d, (d / "model.rflash").read_bytes()[:HEADER_BYTES], (d / "manifest.json").read_bytes()


def _parse_manifest(data: bytes):
    try:
        return Manifest.from_json(data, where="m.json")
    except LayoutError as e:
        assert str(e).startswith("m.json: ") and "\n" not in str(e)
        return None


def _parse_header(block: bytes):
    try:
        return decode_header(block, "h.rflash")
    except LayoutError as e:
        assert str(e).startswith("h.rflash: ") and "\n" not in str(e)
        return None


def _with_crc(block: bytes) -> bytes:
    b = bytearray(block)
    b[_CRC_AT:_CRC_AT + 4] = bytes(4)
    struct.pack_into("<I", b, _CRC_AT, zlib.crc32(b))
    return bytes(b)


# --- header -------------------------------------------------------------------------------------

@FAST
@given(st.binary(max_size=HEADER_BYTES + 64))
def test_random_bytes_as_a_header_are_refused(data):
    assert _parse_header(data) is None


@FAST
@given(data=st.data())
def test_truncated_or_bit_flipped_header_is_refused(packed, data):
    _, header, _ = packed
    cut = data.draw(st.integers(0, HEADER_BYTES - 1))
    assert _parse_header(header[:cut]) is None
    # CRC-32 has Hamming distance 4 at this length: every error of up to 3 bits is caught.
    bits = data.draw(st.lists(st.integers(0, HEADER_BYTES * 8 - 1), min_size=1, max_size=3, unique=True))
    b = bytearray(header)
    for bit in bits:
        b[bit // 8] ^= 1 << (bit % 8)
    assert _parse_header(bytes(b)) is None


@FAST
@given(fields=st.tuples(*[st.integers(0, 2**32 - 1)] * 9, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)))
def test_header_with_a_valid_crc_and_absurd_fields_never_opens_against_its_manifest(packed, tmp_path_factory,
                                                                                      fields):
    """A header a bug (not bit rot) wrote: right magic and crc, any values. decode_header may
    accept it; open_layout must then refuse it against the manifest."""
    d, header, manifest = packed
    version, act, dtype, flags, n_layers, d_model, d_ffn, bb, align, data_off, file_bytes = fields
    block = bytearray(header)
    raw = list(_STRUCT.unpack_from(header))
    raw[1], raw[3], raw[4], raw[5] = 1, act % 4, dtype % 5, flags
    raw[6:11] = n_layers, d_model, d_ffn, bb, align
    raw[12], raw[13] = data_off, file_bytes
    block[:_STRUCT.size] = _STRUCT.pack(*raw)
    block = _with_crc(bytes(block))
    h = _parse_header(block)
    if h is None:
        return
    out = tmp_path_factory.mktemp("h")
    (out / "manifest.json").write_bytes(manifest)
    (out / "model.rflash").write_bytes(block + (d / "model.rflash").read_bytes()[HEADER_BYTES:])
    same = (h.n_layers, h.d_model, h.d_ffn, h.bundle_bytes, h.alignment) == (LAYERS, D, N, SPEC.bundle_bytes, 4096) \
        and h.activation == "swiglu" and h.dtype == "fp16" and not h.has_up_bias \
        and h.data_offset == 4096 and h.file_bytes == len((d / "model.rflash").read_bytes())
    if same:
        open_layout(out)
    else:
        with pytest.raises(LayoutError, match="different packs"):
            open_layout(out)


# --- manifest -----------------------------------------------------------------------------------

@FAST
@given(st.binary(max_size=4096))
@example(b"[" * 100_000)                     # nested past the recursion limit
@example(b"\xff\xfe{")                       # not UTF-8/16 text
@example(b'{"format_version": 1' + b"9" * 5000 + b"}")   # an int of 5000 digits
def test_random_bytes_as_a_manifest_are_refused(data):
    assert _parse_manifest(data) is None


@FAST
@given(data=st.data())
def test_truncated_manifest_is_refused(packed, data):
    _, _, manifest = packed
    cut = data.draw(st.integers(0, len(manifest) - 2))  # the last byte is the newline
    assert _parse_manifest(manifest[:cut]) is None


@FAST
@given(data=st.data())
def test_bit_flipped_manifest_is_refused_or_still_self_consistent(packed, data):
    """A flip in a free-text field (a path, meta) leaves valid JSON; everything else is refused.
    What parses is then checked against model.rflash by open_layout."""
    _, _, manifest = packed
    bits = data.draw(st.lists(st.integers(0, len(manifest) * 8 - 1), min_size=1, max_size=3, unique=True))
    b = bytearray(manifest)
    for bit in bits:
        b[bit // 8] ^= 1 << (bit % 8)
    m = _parse_manifest(bytes(b))
    if m is not None:
        assert m.n_layers == LAYERS and m.d_ffn == N and m.spec.bundle_bytes == SPEC.bundle_bytes


def _leaves(doc, path=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(doc, list) and doc and not all(isinstance(x, int) for x in doc):
        for i, v in enumerate(doc):
            yield from _leaves(v, path + (i,))
    yield path


_ABSURD = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**32 + 1, 2**63, 2**64, 2**70, 10**30, -(2**63),
                     1.5, float("inf"), True, None, "", "x" * 300, [], {}, [2**70] * N,
                     list(range(N))[::-1], [0] * N]),
    st.integers(), st.text(max_size=40),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                 max_leaves=12))


@settings(max_examples=300, deadline=2000)
@given(data=st.data())
def test_manifest_with_any_field_replaced_is_refused_or_valid(packed, data):
    _, _, manifest = packed
    doc = json.loads(manifest)
    paths = [p for p in _leaves(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        target = doc
        try:
            for k in path[:-1]:
                target = target[k]
            # A copy: sampled_from hands out the same [] / {} each time, and one placed inside
            # another would make the document circular.
            target[path[-1]] = copy.deepcopy(data.draw(_ABSURD))
        except (KeyError, IndexError, TypeError):   # an earlier replacement removed the parent
            pass
    m = _parse_manifest(json.dumps(doc).encode())
    if m is not None:
        assert all(sorted(r.placement.tolist()) == list(range(m.d_ffn)) for r in m.layers)


@pytest.mark.parametrize("field, value", [
    (("model", "n_layers"), 10**12), (("model", "d_ffn"), 2**62), (("model", "d_model"), 2**40),
    (("bundle", "bundle_bytes"), 2**63), (("file_bytes",), 2**64), (("alignment",), 2**62),
    (("layers", 0, "offset"), 2**62), (("layers", 1, "bytes"), 2**50),
    (("layers", 0, "placement"), [2**70] * N),
])
def test_absurd_sizes_are_refused_without_allocating_them(packed, tmp_path, field, value):
    d, _, manifest = packed
    doc = json.loads(manifest)
    target = doc
    for k in field[:-1]:
        target = target[k]
    target[field[-1]] = value
    text = json.dumps(doc).encode()
    tracemalloc.start()
    try:
        assert _parse_manifest(text) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * len(text) + (1 << 20), peak
    (tmp_path / "manifest.json").write_bytes(text)
    os.link(d / "model.rflash", tmp_path / "model.rflash")
    with pytest.raises(LayoutError, match="manifest.json"):
        open_layout(tmp_path)
