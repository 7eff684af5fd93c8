"""The on-flash layout: bundle encoding, the packed file, and every way it can be wrong."""
import json
import os

import numpy as np
import pytest

from ripple.layout import (BundleSpec, LayoutChecksumError, LayoutError, Manifest, bundle_offset,
                           check_source, decode_bundles, describe, encode_bundles, open_layout,
                           verify_layout, write_layout)
from ripple.layout.header import HEADER_BYTES, MAGIC

D, N, LAYERS = 64, 96, 3
SWIGLU = BundleSpec("swiglu", D, "fp16", False)
RELU = BundleSpec("relu", D, "fp16", True)


def _weights(spec, n=N, seed=0):
    rng = np.random.default_rng(seed)
    w = {"up": rng.standard_normal((n, spec.d_model), dtype=np.float32),
         "down_t": rng.standard_normal((n, spec.d_model), dtype=np.float32)}
    if spec.activation == "swiglu":
        w["gate"] = rng.standard_normal((n, spec.d_model), dtype=np.float32)
    if spec.has_up_bias:
        w["up_bias"] = rng.standard_normal(n, dtype=np.float32)
    return w


def _layers(spec=SWIGLU, n_layers=LAYERS, n=N):
    """(bundles in neuron order, a non-identity perm) per layer."""
    out = []
    for l in range(n_layers):
        bundles = encode_bundles(spec, **_weights(spec, n, seed=l))
        perm = np.random.default_rng(100 + l).permutation(n)
        assert not np.array_equal(perm, np.arange(n))
        out.append((bundles, perm))
    return out


def _pack(out_dir, layers=None, spec=SWIGLU, **kw):
    args = dict(meta={"sparsity": 0.9}, source="/ckpt/model", source_hash="ab" * 16)
    args.update(kw)
    return write_layout(out_dir, spec, _layers(spec) if layers is None else layers, **args)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x5A]))


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# --- bundle encoding ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", [SWIGLU, RELU], ids=["swiglu", "relu+bias"])
def test_bundles_round_trip_up_to_fp16_rounding(spec):
    w = _weights(spec)
    got = decode_bundles(spec, encode_bundles(spec, **w))
    for name, want in w.items():
        np.testing.assert_array_equal(getattr(got, name), want.astype(np.float16).astype(np.float32))
    assert (got.gate is None) == (spec.activation == "relu")
    assert (got.up_bias is None) == (not spec.has_up_bias)


def test_fp16_bundle_viewed_as_float16_is_gate_up_down_then_bias():
    for spec in (SWIGLU, RELU):
        w = _weights(spec, n=5)
        raw = encode_bundles(spec, **w)
        assert raw.dtype == np.uint8 and raw.shape == (5, spec.bundle_bytes)
        cols = [w[p if p != "down" else "down_t"] for p in spec.parts]
        if spec.has_up_bias:
            cols.append(w["up_bias"][:, None])
        want = np.concatenate(cols, axis=1).astype("<f2")
        np.testing.assert_array_equal(raw.view("<f2"), want)


def test_bundle_sizes_follow_the_parts():
    assert SWIGLU.parts == ("gate", "up", "down") and SWIGLU.bundle_bytes == 3 * D * 2
    assert RELU.parts == ("up", "down") and RELU.bundle_bytes == (2 * D + 1) * 2


def test_encode_rejects_values_beyond_fp16_range():
    w = _weights(SWIGLU, n=4)
    w["gate"][2, 3] = 1e6
    with pytest.raises(ValueError, match="gate.*float16"):
        encode_bundles(SWIGLU, **w)


def test_unsupported_bundle_dtype_is_refused():
    with pytest.raises(ValueError, match="q8"):
        BundleSpec("swiglu", D, "q8", False)


# --- packing and reading back --------------------------------------------------------------

@pytest.mark.parametrize("spec", [SWIGLU, RELU], ids=["swiglu", "relu+bias"])
def test_slot_s_of_layer_l_holds_the_bundle_of_neuron_perm_s(tmp_path, spec):
    layers = _layers(spec)
    _pack(tmp_path, layers, spec=spec)
    lay = open_layout(tmp_path)
    data = (tmp_path / "model.rflash").read_bytes()
    bb = spec.bundle_bytes
    for l, (bundles, perm) in enumerate(layers):
        np.testing.assert_array_equal(lay.perm[l], perm)
        for s in range(N):
            at = bundle_offset(lay, l, s)
            assert data[at:at + bb] == bundles[perm[s]].tobytes()


def test_slot_of_inverts_the_placement(tmp_path):
    layers = _layers()
    _pack(tmp_path, layers)
    lay = open_layout(tmp_path)
    for l, (_, perm) in enumerate(layers):
        np.testing.assert_array_equal(lay.slot_of[l][perm], np.arange(N))


def test_gathered_region_decodes_to_the_weights_in_placement_order(tmp_path):
    spec = RELU
    w = _weights(spec, seed=0)
    perm = np.random.default_rng(7).permutation(N)
    _pack(tmp_path, [(encode_bundles(spec, **w), perm)], spec=spec)
    lay = open_layout(tmp_path)
    raw = np.fromfile(lay.path, dtype=np.uint8, count=N * spec.bundle_bytes,
                      offset=int(lay.region_offsets[0])).reshape(N, spec.bundle_bytes)
    got = decode_bundles(spec, raw)
    np.testing.assert_array_equal(got.up, w["up"][perm].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got.up_bias,
                                  w["up_bias"][perm].astype(np.float16).astype(np.float32))


def test_regions_start_on_alignment_and_file_is_padded_to_it(tmp_path):
    _pack(tmp_path)
    lay = open_layout(tmp_path)
    size = (tmp_path / "model.rflash").stat().st_size
    assert size % 4096 == 0 and size == lay.file_bytes
    assert all(off % 4096 == 0 for off in lay.region_offsets)
    assert lay.region_offsets[0] >= HEADER_BYTES
    ends = lay.region_offsets + N * SWIGLU.bundle_bytes
    assert (ends[:-1] <= lay.region_offsets[1:]).all() and ends[-1] <= size


def test_larger_alignment_is_honoured(tmp_path):
    _pack(tmp_path, alignment=16384)
    lay = open_layout(tmp_path)
    assert lay.alignment == 16384 and (lay.region_offsets % 16384 == 0).all()
    assert (tmp_path / "model.rflash").stat().st_size % 16384 == 0


def test_file_starts_with_the_magic(tmp_path):
    _pack(tmp_path)
    assert (tmp_path / "model.rflash").read_bytes()[:8] == MAGIC


def test_manifest_records_dims_source_meta_and_checksums(tmp_path):
    written = _pack(tmp_path, arch="smollm2")
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["model"] == {"arch": "smollm2", "n_layers": LAYERS, "d_model": D, "d_ffn": N}
    assert doc["source"] == {"path": "/ckpt/model", "hash": "ab" * 16}
    assert doc["meta"] == {"sparsity": 0.9}
    assert [x["checksum"] for x in doc["layers"]] == [r.checksum for r in written.layers]
    assert Manifest.from_json(written.to_json()).to_json() == written.to_json()


def test_numpy_values_in_meta_are_written_as_plain_json(tmp_path):
    _pack(tmp_path, meta={"thresholds": np.array([0.1, 0.2], dtype=np.float32),
                          "sparsity": np.float32(0.5)})
    meta = open_layout(tmp_path).manifest.meta
    assert meta["sparsity"] == 0.5 and len(meta["thresholds"]) == 2


def test_layers_may_come_from_a_generator(tmp_path):
    _pack(tmp_path, (x for x in _layers()))
    assert open_layout(tmp_path, verify=True).n_layers == LAYERS


def test_open_layout_accepts_the_rflash_path(tmp_path):
    _pack(tmp_path)
    assert open_layout(tmp_path / "model.rflash").path == tmp_path / "model.rflash"


def test_intact_layout_verifies(tmp_path):
    _pack(tmp_path)
    verify_layout(open_layout(tmp_path))


def test_describe_reports_sizes_and_source(tmp_path):
    _pack(tmp_path)
    info = describe(open_layout(tmp_path))
    assert info["bundle_bytes"] == SWIGLU.bundle_bytes and info["n_regions"] == LAYERS
    assert info["ffn_bytes"] == LAYERS * N * SWIGLU.bundle_bytes
    assert info["file_bytes"] == (tmp_path / "model.rflash").stat().st_size
    assert info["dtype"] == "fp16" and info["alignment"] == 4096
    assert info["source_hash"] == "ab" * 16 and info["meta_keys"] == ["sparsity"]


def test_check_source_refuses_a_layout_from_another_checkpoint(tmp_path):
    _pack(tmp_path)
    lay = open_layout(tmp_path)
    check_source(lay, "ab" * 16)
    with pytest.raises(LayoutError, match="another|not this checkpoint"):
        check_source(lay, "cd" * 16)


def test_bundle_offset_takes_arrays_of_slots(tmp_path):
    _pack(tmp_path)
    lay = open_layout(tmp_path)
    offs = bundle_offset(lay, 1, np.array([0, 5]))
    assert offs.tolist() == [lay.region_offsets[1], lay.region_offsets[1] + 5 * lay.bundle_bytes]
    with pytest.raises(IndexError):
        bundle_offset(lay, 1, N)


# --- damaged files ---------------------------------------------------------------------------

def test_flipped_region_byte_raises_checksum_error_naming_the_layer_and_offset(tmp_path):
    _pack(tmp_path)
    lay = open_layout(tmp_path)
    off = int(lay.region_offsets[1])
    _flip(lay.path, off + 1000)
    with pytest.raises(LayoutChecksumError, match=rf"layer 1 region at offset {off}\b") as e:
        verify_layout(open_layout(tmp_path))
    assert e.value.regions == [(1, off)]


def test_open_with_verify_catches_a_flipped_region_byte(tmp_path):
    _pack(tmp_path)
    off = int(open_layout(tmp_path).region_offsets[2])
    _flip(tmp_path / "model.rflash", off)
    with pytest.raises(LayoutChecksumError, match="layer 2"):
        open_layout(tmp_path, verify=True)


@pytest.mark.parametrize("offset", [0, 30, 2000], ids=["magic", "d_model", "zero_tail"])
def test_flipped_header_byte_raises_layout_error(tmp_path, offset):
    _pack(tmp_path)
    _flip(tmp_path / "model.rflash", offset)
    with pytest.raises(LayoutError, match="magic|corrupt"):
        open_layout(tmp_path)


def test_truncated_file_raises_layout_error_with_expected_and_actual_size(tmp_path):
    _pack(tmp_path)
    path = tmp_path / "model.rflash"
    full = path.stat().st_size
    os.truncate(path, full - 4096)
    with pytest.raises(LayoutError, match=rf"truncated.*{full}.*{full - 4096}"):
        open_layout(tmp_path)


def test_missing_model_file_says_to_run_ripple_pack(tmp_path):
    with pytest.raises(LayoutError, match="ripple pack"):
        open_layout(tmp_path)


def test_missing_manifest_says_to_run_ripple_pack(tmp_path):
    _pack(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(LayoutError, match=r"manifest\.json.*ripple pack"):
        open_layout(tmp_path)


def test_manifest_that_is_not_json_raises_layout_error(tmp_path):
    _pack(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(LayoutError, match=r"manifest\.json: not valid JSON"):
        open_layout(tmp_path)


def _set(doc, path, value):
    *parents, last = path
    for k in parents:
        doc = doc[k]
    if value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


_DELETE = object()


@pytest.mark.parametrize("path, value, named", [
    (("model", "d_ffn"), "96", "model.d_ffn"),
    (("model", "n_layers"), 0, "model.n_layers"),
    (("bundle", "dtype"), "q4", "bundle"),
    (("bundle", "has_up_bias"), 1, "bundle.has_up_bias"),
    (("alignment",), 1000, "alignment"),
    (("layers", 1, "offset"), 4097, r"layers\[1\].offset"),
    (("layers", 0, "placement"), list(range(N - 1)) + [0], r"layers\[0\].placement"),
    (("layers", 2, "checksum"), "xyz", r"layers\[2\].checksum"),
    (("source",), _DELETE, "source"),
    (("format_version",), 99, "format version 99"),
])
def test_manifest_with_a_bad_field_raises_layout_error_naming_it(tmp_path, path, value, named):
    _pack(tmp_path)
    mpath = tmp_path / "manifest.json"
    doc = json.loads(mpath.read_text())
    _set(doc, path, value)
    mpath.write_text(json.dumps(doc))
    with pytest.raises(LayoutError, match=rf"manifest\.json.*{named}"):
        open_layout(tmp_path)


def test_manifest_from_another_pack_is_refused(tmp_path):
    _pack(tmp_path / "a")
    other = [(encode_bundles(SWIGLU, **_weights(SWIGLU, seed=50 + l)), perm)
             for l, (_, perm) in enumerate(_layers())]
    _pack(tmp_path / "b", other)
    os.replace(tmp_path / "b" / "manifest.json", tmp_path / "a" / "manifest.json")
    with pytest.raises(LayoutError, match="different packs.*region checksums"):
        open_layout(tmp_path / "a")


# --- atomic writing ---------------------------------------------------------------------------

def _failing_layers(fail_at=2, exc=RuntimeError("boom")):
    for l, item in enumerate(_layers()):
        if l == fail_at:
            raise exc
        yield item


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()],
                         ids=["exception", "ctrl-c"])
def test_pack_failing_midway_leaves_no_files(tmp_path, exc):
    with pytest.raises(type(exc)):
        _pack(tmp_path, _failing_layers(exc=exc))
    assert list(tmp_path.iterdir()) == []


def test_failed_repack_leaves_the_previous_layout_intact(tmp_path):
    _pack(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(RuntimeError):
        _pack(tmp_path, _failing_layers())
    assert _snapshot(tmp_path) == before
    verify_layout(open_layout(tmp_path))


def test_repack_failing_between_the_renames_restores_the_previous_layout(tmp_path, monkeypatch):
    _pack(tmp_path)
    before = _snapshot(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    other = [(encode_bundles(SWIGLU, **_weights(SWIGLU, seed=9)), perm) for _, perm in _layers()]
    with pytest.raises(OSError, match="disk full"):
        _pack(tmp_path, other)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    verify_layout(open_layout(tmp_path))


def test_first_pack_failing_between_the_renames_leaves_no_files(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _pack(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_repack_replaces_the_previous_layout(tmp_path):
    _pack(tmp_path)
    _pack(tmp_path, meta={"sparsity": 0.5})
    assert open_layout(tmp_path, verify=True).manifest.meta == {"sparsity": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.rflash"]


# --- bad arguments to the writer ---------------------------------------------------------------

@pytest.mark.parametrize("bad_perm", [
    np.r_[np.arange(N - 1), 0],          # neuron 0 twice, N-1 missing
    np.r_[np.arange(N - 1), N],          # out of range
    np.arange(N - 1),                    # too short
], ids=["repeated", "out_of_range", "short"])
def test_non_permutation_perm_raises_value_error(tmp_path, bad_perm):
    layers = _layers()
    layers[1] = (layers[1][0], bad_perm)
    with pytest.raises(ValueError, match="layer 1.*perm"):
        _pack(tmp_path, layers)
    assert list(tmp_path.iterdir()) == []


def test_bundles_of_the_wrong_width_raise_value_error(tmp_path):
    layers = _layers()
    layers[0] = (layers[0][0][:, :-2], layers[0][1])
    with pytest.raises(ValueError, match=f"layer 0: bundles must be uint8 \\(n, {SWIGLU.bundle_bytes}\\)"):
        _pack(tmp_path, layers)


def test_layers_of_different_widths_raise_value_error(tmp_path):
    layers = _layers()
    layers[2] = (layers[2][0][:80], np.arange(80))
    with pytest.raises(ValueError, match="layer 2 has 80 neurons"):
        _pack(tmp_path, layers)


def test_meta_that_json_cannot_hold_raises_value_error_before_writing(tmp_path):
    with pytest.raises(ValueError, match="meta must be JSON-serialisable"):
        _pack(tmp_path, meta={"profile": object()})
    assert list(tmp_path.iterdir()) == []
