import os

import numpy as np
import pytest

from ripple.runtime_py.planner import plan_reads
from ripple.runtime_py.reader import FlashReader, ReadError


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=64 * 4096, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    return path, data


def test_reader_uses_o_direct_on_this_disk(data_file):
    path, _ = data_file
    with FlashReader(path) as r:
        assert r.o_direct, r.fallback_reason


@pytest.mark.parametrize("queue_depth", [1, 4, 32])
def test_reader_returns_exact_bytes_under_random_plans(data_file, queue_depth):
    path, data = data_file
    rng = np.random.default_rng(queue_depth)
    bb = 1000
    with FlashReader(path, queue_depth) as r:
        for _ in range(10):
            slots = np.sort(rng.choice(len(data) // bb - 1, size=40, replace=False))
            plan = plan_reads(slots, 0, bb, 4096)
            res = r.read(plan.extents)
            assert res.bytes_read == plan.bytes_read and res.reads == len(plan.extents)
            with open(path, "rb") as f:   # the buffered read to compare against
                for (off, n), s in zip(plan.extents.tolist(), res.starts.tolist()):
                    f.seek(off)
                    assert res.buffer[s:s + n].tobytes() == f.read(n)


def test_buffered_fallback_is_reported(data_file):
    path, _ = data_file
    with FlashReader(path, o_direct=False) as r:
        assert not r.o_direct and r.fallback_reason


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ReadError, match="nope.rflash"):
        FlashReader(tmp_path / "nope.rflash")


def test_read_past_end_of_file_is_a_clear_error(data_file):
    path, data = data_file
    with FlashReader(path) as r:
        with pytest.raises(ReadError, match="offset"):
            r.read(np.array([[len(data), 4096]]))
