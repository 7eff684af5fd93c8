"""The whole copy (layout.whole_copy): a GGUF's own FFN blocks per layer beside the bundles. It
holds the GGUF's bytes exactly, the engine reads layers read whole from it and computes them
as the dense model does (both backends), pinned layers cost no reads and count as resident,
and a copy that is damaged, truncated or of another checkpoint is refused in one line."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ripple.android_host.cli import main
from ripple.android_host.interface import inspect_cmd, pack_cmd
from ripple.layout.errors import LayoutChecksumError, LayoutError
from ripple.layout.reader import open_layout
from ripple.layout.whole_copy import (PARTS, WHOLE_FILE, WHOLE_MANIFEST, open_whole_copy,
                                      verify_whole_copy, whole_checks)
from ripple.runtime_py.backends import ffn_backend
from ripple.runtime_py.engine import IOStats, generate
from ripple.runtime_py.read_ahead import ReadAhead
from ripple.runtime_py.reader import FlashReader
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import forward, to_torch, to_torch_quantized
from ripple.tuning.load_gguf import gguf_tensors

from gguf_cases import write_llama_gguf


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("whole")
    gguf_path = write_llama_gguf(d / "tiny.gguf", seed=3)
    pack_cmd(str(gguf_path), str(d / "lay"), dtype="q4d8", whole_copy=True)
    desc = load_model(gguf_path)
    return gguf_path, d / "lay", desc


def test_the_copy_holds_the_ggufs_ffn_blocks_as_stored(packed):
    gguf_path, lay, desc = packed
    copy = open_whole_copy(lay, desc.source_hash)
    tensors = gguf_tensors(gguf_path)
    raw = np.fromfile(copy.path, np.uint8)
    assert copy.n_layers == desc.n_layers and tuple(p.name for p in copy.parts) == PARTS
    assert np.all(copy.offsets % copy.alignment == 0) and copy.layer_bytes % copy.alignment == 0
    for l, off in enumerate(copy.offsets.tolist()):
        extent = raw[off:off + copy.layer_bytes]
        for part in copy.parts:
            assert part.at % 64 == 0
            np.testing.assert_array_equal(copy.blocks(extent, part), tensors[f"blk.{l}.ffn_{part.name}.weight"].raw)
    assert inspect_cmd(str(lay), verify=True)["whole_copy"]["bytes_per_token_read_whole"] == \
        copy.layer_bytes * desc.n_layers


def _dense_ffn(desc, layer: int, h: torch.Tensor) -> torch.Tensor:
    lw = desc.layers[layer]
    g, u = h @ torch.from_numpy(lw.w_gate).T, h @ torch.from_numpy(lw.w_up).T
    return (F.silu(g) * u) @ torch.from_numpy(lw.w_down).T


@pytest.mark.parametrize("backend", ["torch", "tvm"])
def test_a_layer_read_from_the_copy_is_the_dense_ffn_of_the_ggufs_weights(packed, backend):
    _, lay, desc = packed
    layout = open_layout(lay)
    copy = open_whole_copy(lay, desc.source_hash)
    tm = to_torch_quantized(desc, ffn=False)
    h = torch.from_numpy(np.random.default_rng(0).standard_normal((3, desc.d_model)).astype(np.float32))
    stats = IOStats()
    with FlashReader(layout.path, 4) as reader, ReadAhead(layout, 4, 1, "all", whole_copy=copy) as ahead:
        ffn = ffn_backend(backend)(tm, layout, reader, np.zeros(desc.n_layers), "coef", stats,
                                   measure_misses=False, ahead=ahead)
        for layer in range(desc.n_layers):
            np.testing.assert_allclose(ffn(layer, h[None]).numpy()[0], _dense_ffn(desc, layer, h).numpy(),
                                       rtol=1e-4, atol=1e-4)
    assert stats.bytes_read == desc.n_layers * copy.layer_bytes
    assert stats.bytes_needed == desc.n_layers * sum(p.nbytes for p in copy.parts)
    assert stats.active == desc.n_layers * desc.d_ffn


def test_pinned_layers_are_never_read_and_count_as_resident(packed):
    _, lay, desc = packed
    layout = open_layout(lay)
    copy = open_whole_copy(lay, desc.source_hash)
    ref = to_torch(desc)
    tm = to_torch_quantized(desc, ffn=False)
    prompt = [1, 5, 9, 2]
    with FlashReader(layout.path, 4) as reader, \
            ReadAhead(layout, 4, 1, "all", whole_copy=copy, pin_bytes=copy.layer_bytes) as ahead:
        assert sorted(ahead.pinned) == [desc.n_layers - 1]
        gen = generate(tm, layout, reader, np.zeros(desc.n_layers), "coef", prompt, 4, ahead=ahead,
                       measure_misses=False)
    # Greedy tokens of the dense fp32 model on the same weights.
    ids = list(prompt)
    for _ in range(len(gen.tokens)):
        ids.append(int(forward(ref, torch.tensor([ids]))[0, -1].argmax()))
    assert gen.tokens == ids[len(prompt):]
    assert all(s.bytes_read == (desc.n_layers - 1) * copy.layer_bytes for s in gen.steps)
    assert gen.resident["ffn_cache"] == copy.layer_bytes


def test_a_copy_of_another_checkpoint_is_refused(packed):
    _, lay, _ = packed
    with pytest.raises(LayoutError, match=r"whole\.json: a whole copy of another checkpoint"):
        open_whole_copy(lay, "0" * 32)


def test_a_damaged_or_truncated_copy_is_refused_in_one_line(packed, tmp_path):
    _, lay, desc = packed
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / WHOLE_MANIFEST).write_text("{not json")
    with pytest.raises(LayoutError, match=r"whole\.json: damaged .*re-run `ripple pack --whole-copy`"):
        open_whole_copy(bad, desc.source_hash)
    (bad / WHOLE_MANIFEST).write_bytes((lay / WHOLE_MANIFEST).read_bytes())
    (bad / WHOLE_FILE).write_bytes((lay / WHOLE_FILE).read_bytes()[:-4096])
    with pytest.raises(LayoutError, match=r"whole\.rflash: truncated"):
        open_whole_copy(bad, desc.source_hash)
    flipped = bytearray((lay / WHOLE_FILE).read_bytes())
    flipped[100] ^= 0xFF
    (bad / WHOLE_FILE).write_bytes(bytes(flipped))
    with pytest.raises(LayoutChecksumError, match=r"layer 0 at offset 0 does not match"):
        verify_whole_copy(open_whole_copy(bad, desc.source_hash))


def test_a_pack_without_the_copy_removes_an_earlier_one(tmp_path):
    gguf_path = write_llama_gguf(tmp_path / "tiny.gguf")
    pack_cmd(str(gguf_path), str(tmp_path / "lay"), dtype="q4", whole_copy=True)
    assert (tmp_path / "lay" / WHOLE_FILE).is_file()
    info = pack_cmd(str(gguf_path), str(tmp_path / "lay"), dtype="q4")
    assert "whole_copy" not in info and not (tmp_path / "lay" / WHOLE_MANIFEST).exists()


def test_whole_copy_of_a_hugging_face_folder_is_one_line_and_writes_nothing(tmp_path, random_llama_dir, capsys):
    out = tmp_path / "lay"
    code = main(["pack", "--model", str(random_llama_dir), "--out", str(out), "--whole-copy"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(err) == 1 and "--whole-copy carries a GGUF's own FFN blocks" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_checked_reads_of_the_copy_catch_a_flipped_block(packed, tmp_path):
    """With the copy's per-block CRCs (what `generate --verify` hands the readers ahead), a byte
    flipped on the disk after packing fails the read that brings it, naming its offset."""
    import shutil
    _, lay, desc = packed
    bad = tmp_path / "lay"
    shutil.copytree(lay, bad)
    copy = open_whole_copy(bad, desc.source_hash)
    raw = bytearray(copy.path.read_bytes())
    at = int(copy.offsets[1]) + copy.parts[2].at + 5          # layer 1's down blocks
    raw[at] ^= 0x01
    copy.path.write_bytes(bytes(raw))
    layout = open_layout(bad)
    with ReadAhead(layout, 4, 1, "all", whole_copy=copy, checks=whole_checks(copy)) as ahead:
        ahead.take(0)
        with pytest.raises(LayoutChecksumError, match=rf"block at offset {at // 4096 * 4096} .*layer 1\)"):
            ahead.take(1)
