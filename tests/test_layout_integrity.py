"""Nothing corrupt is used silently: every single-byte flip in a region is caught by its
checksum, at open with verify and, block by block, on read with verification on; a layout
packed from another checkpoint is refused."""
import os

import numpy as np
import pytest

from ripple.layout import (BundleSpec, LayoutChecksumError, LayoutError, block_checks,
                           encode_bundles, open_layout, verify_layout, write_layout)
from ripple.runtime_py.engine import generate
from ripple.runtime_py.planner import plan_reads
from ripple.runtime_py.reader import FlashReader

from conftest import save_random_llama

# Small enough to flip every byte of a region: 40 bundles of 96 bytes, 3840 bytes, in one
# 4 KiB block with 256 bytes of padding.
D, N, LAYERS = 16, 40, 2
SPEC = BundleSpec("swiglu", D, "fp16", False)


def _layers():
    rng = np.random.default_rng(0)
    return [(encode_bundles(SPEC, rng.standard_normal((N, D), dtype=np.float32),
                            rng.standard_normal((N, D), dtype=np.float32),
                            rng.standard_normal((N, D), dtype=np.float32)), rng.permutation(N))
            for _ in range(LAYERS)]


@pytest.fixture
def layout(tmp_path):
    write_layout(tmp_path, SPEC, _layers(), {}, "/ckpt", "ab" * 16)
    return open_layout(tmp_path)


def _xor(path, offset, mask=0x01):
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)[0]
        os.pwrite(fd, bytes([b ^ mask]), offset)
    finally:
        os.close(fd)


def _region_extents(layout, layer):
    return plan_reads(np.arange(N), int(layout.region_offsets[layer]), SPEC.bundle_bytes,
                      layout.alignment).extents


def test_every_byte_flip_in_a_region_fails_verify_naming_the_region(layout):
    off = int(layout.region_offsets[1])
    padded = -(-layout.manifest.layers[1].nbytes // layout.alignment) * layout.alignment
    for pos in range(off, off + padded):       # the region and the padding after it
        _xor(layout.path, pos)
        with pytest.raises(LayoutChecksumError) as e:
            verify_layout(layout)
        assert e.value.regions == [(1, off)], pos
        _xor(layout.path, pos)
    verify_layout(layout)


def test_open_with_verify_catches_a_flip_in_every_bundle(tmp_path, layout):
    bb = SPEC.bundle_bytes
    for layer in range(LAYERS):
        for slot in range(N):
            pos = int(layout.region_offsets[layer]) + slot * bb + (slot * 7) % bb
            _xor(layout.path, pos, 0x80)
            with pytest.raises(LayoutChecksumError, match=f"layer {layer} region"):
                open_layout(tmp_path, verify=True)
            _xor(layout.path, pos, 0x80)


@pytest.mark.parametrize("engine", ["aio", "threads"])
def test_every_byte_flip_is_caught_on_read_with_checks(layout, engine):
    off = int(layout.region_offsets[0])
    extents = _region_extents(layout, 0)
    with FlashReader(layout.path, 4, engine=engine, checks=block_checks(layout)) as r:
        assert r.engine == engine
        r.read(extents)                                   # intact: no error
        step = 1 if engine == "aio" else 13               # every byte once is enough
        for pos in range(off, off + int(extents[:, 1].sum()), step):
            _xor(layout.path, pos)
            with pytest.raises(LayoutChecksumError, match=rf"offset {off}\b.*layer 0"):
                r.read(extents)
            _xor(layout.path, pos)
        r.read(extents)


def test_reads_without_checks_do_not_look(layout):
    """The default path costs nothing: the same flip reads back without a word."""
    _xor(layout.path, int(layout.region_offsets[0]) + 5)
    with FlashReader(layout.path, 4) as r:
        r.read(_region_extents(layout, 0))


def test_a_flip_in_another_layer_does_not_fail_this_layers_reads(layout):
    _xor(layout.path, int(layout.region_offsets[1]) + 5)
    with FlashReader(layout.path, 4, checks=block_checks(layout)) as r:
        r.read(_region_extents(layout, 0))
        with pytest.raises(LayoutChecksumError, match="layer 1"):
            r.read(_region_extents(layout, 1))


def test_checked_reads_refuse_unaligned_extents(layout):
    with FlashReader(layout.path, 4, o_direct=False, checks=block_checks(layout)) as r:
        with pytest.raises(ValueError, match="whole 4096-byte blocks"):
            r.read(np.array([[int(layout.region_offsets[0]) + 96, 96]]))


def test_a_damaged_block_table_in_the_manifest_is_refused(tmp_path, layout):
    import json
    mpath = tmp_path / "manifest.json"
    doc = json.loads(mpath.read_text())
    doc["layers"][0]["block_crc32"] = "AAAA"        # base64, but 3 bytes, not 4
    mpath.write_text(json.dumps(doc))
    with pytest.raises(LayoutError, match=r"layers\[0\]\.block_crc32"):
        open_layout(tmp_path)


def test_a_layout_without_block_tables_says_so_when_asked_to_check(tmp_path, layout):
    import json
    mpath = tmp_path / "manifest.json"
    doc = json.loads(mpath.read_text())
    for entry in doc["layers"]:
        del entry["block_crc32"]
    mpath.write_text(json.dumps(doc))
    lay = open_layout(tmp_path, verify=True)          # older layouts still open and verify
    with pytest.raises(LayoutError, match="per-block checksums.*ripple pack"):
        block_checks(lay)


# --- the engine with verification on -------------------------------------------------------------

def test_generation_with_checks_stops_at_a_corrupt_weight(tmp_path, random_llama_dir):
    from ripple.android_host.interface import pack_cmd
    from ripple.tuning.checkpoint import load_model
    from ripple.tuning.forward import to_torch
    pack_cmd(str(random_llama_dir), str(tmp_path))
    lay = open_layout(tmp_path)
    desc = load_model(random_llama_dir)
    tm = to_torch(desc)
    dense = np.full(desc.n_layers, -1.0)
    with FlashReader(lay.path, 4, checks=block_checks(lay)) as r:
        clean = generate(tm, lay, r, dense, "coef", [1, 2, 3], 3)
    _xor(lay.path, int(lay.region_offsets[1]) + 1234)
    with FlashReader(lay.path, 4) as r:               # unchecked: plausible, wrong numbers
        silent = generate(tm, lay, r, dense, "coef", [1, 2, 3], 3)
    with FlashReader(lay.path, 4, checks=block_checks(lay)) as r:
        with pytest.raises(LayoutChecksumError, match="layer 1"):
            generate(tm, lay, r, dense, "coef", [1, 2, 3], 3)
    assert len(clean.tokens) == len(silent.tokens) == 3


# --- another checkpoint ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory):
    """Same shapes as random_llama_dir, other weights: only the source hash tells them apart."""
    return save_random_llama(tmp_path_factory.mktemp("llama-other"), seed=3)


def test_layout_from_another_checkpoint_of_the_same_shape_is_refused(tmp_path, random_llama_dir,
                                                                     other_llama_dir):
    from ripple.android_host.interface import generate_cmd, pack_cmd
    pack_cmd(str(random_llama_dir), str(tmp_path))
    with pytest.raises(LayoutError, match=r"was packed from .*not this checkpoint.*ripple pack"):
        generate_cmd(str(tmp_path), str(other_llama_dir), tokens=1)


def test_predictor_training_refuses_a_layout_from_another_checkpoint(tmp_path, random_llama_dir,
                                                                     other_llama_dir):
    from ripple.android_host.interface import pack_cmd, train_predictor_cmd
    from ripple.tuning.checkpoint import load_model
    from ripple.tuning.forward import to_torch
    from ripple.tuning.profile import run_profile, save_profile
    tm = to_torch(load_model(other_llama_dir))
    seqs = [np.arange(32) % 128]
    save_profile(run_profile(tm, seqs, seqs, grid=(0.0, 0.5), record_inputs=True), tmp_path / "p.npz")
    pack_cmd(str(random_llama_dir), str(tmp_path / "layout"))
    with pytest.raises(LayoutError, match="not this checkpoint"):
        train_predictor_cmd(str(tmp_path / "p.npz"), str(tmp_path / "layout"), str(other_llama_dir))
    assert not (tmp_path / "layout" / "predictor.npz").exists()
