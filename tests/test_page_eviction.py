"""Page-cache eviction (android_host.page_eviction) really empties the page cache for the
ranges asked, on this machine's disk, as mincore sees it, even while this process maps
them; only those ranges; and a GGUF's FFN ranges are exactly its FFN tensors' bytes."""
import mmap
import os

import numpy as np
import pytest

from ripple.android_host.page_eviction import (PAGE, evict, gguf_tensor_ranges, page_ranges,
                                               resident_bytes)

from conftest import write_gguf

SIZE = 8 << 20


@pytest.fixture
def cached_file(tmp_path):
    """A file on the real disk, written, fsynced (no dirty pages) and read back: all cached."""
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        assert f.read() == data
    return path, data


def test_a_file_just_read_is_resident(cached_file):
    path, _ = cached_file
    assert resident_bytes(path) == (SIZE, True)


def test_eviction_empties_the_page_cache_of_ranges_this_process_maps(cached_file):
    path, data = cached_file
    ranges = np.array([[3 * PAGE, 40 * PAGE], [SIZE // 2 + 100, 1 << 20]])
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        sum(m[i] for i in range(0, SIZE, PAGE))             # every page mapped here
        ev = evict(path, ranges)
        assert ev.verified and ev.resident_after == 0
        assert ev.mapped_bytes_dropped == ev.bytes_evicted == int(page_ranges(ranges, SIZE)[:, 1].sum())
        assert resident_bytes(path, ranges) == (0, True)
        # Only those pages went: the rest of the file is still cached.
        assert resident_bytes(path)[0] == SIZE - ev.bytes_evicted
        # The mapping refaults the evicted pages from disk with the same bytes.
        assert m[3 * PAGE:43 * PAGE] == data[3 * PAGE:43 * PAGE]


def test_whole_file_eviction_leaves_nothing_cached(cached_file):
    path, _ = cached_file
    ev = evict(path)
    assert ev.verified and ev.bytes_evicted == SIZE
    assert resident_bytes(path) == (0, True)


def test_ranges_widen_to_whole_pages_and_merge():
    r = page_ranges(np.array([[PAGE + 10, 5], [PAGE + 100, PAGE], [5 * PAGE, 1]]), 100 * PAGE)
    assert r.tolist() == [[PAGE, 2 * PAGE], [5 * PAGE, PAGE]]


def test_gguf_ffn_ranges_are_the_ffn_tensors_bytes(tmp_path):
    path = tmp_path / "tiny.gguf"
    rng = np.random.default_rng(1)
    tensors = {name: rng.standard_normal((16, 64)).astype(np.float32)
               for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_gate.weight",
                            "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.0.ffn_norm.weight",
                            "blk.1.ffn_up.weight")}
    write_gguf(path, "llama", tensors)
    ranges = gguf_tensor_ranges(path)
    raw = path.read_bytes()
    got = sorted(raw[o:o + n] for o, n in ranges.tolist())
    want = sorted(tensors[k].tobytes() for k in ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight",
                                                  "blk.0.ffn_down.weight", "blk.1.ffn_up.weight"))
    assert got == want
