"""The reader returns the exact bytes of every bundle under random plans of every planner
policy, with both engines, checked against a buffered read of the same file."""
import numpy as np
import pytest

from ripple.android_host.devices import published_table
from ripple.runtime_py.engine import gather
from ripple.runtime_py.planner import plan_bundles, plan_cheapest, plan_collapse, plan_reads
from ripple.runtime_py.reader import FlashReader, ReadError

BB, REGION, N = 3456, 8192, 300
PROFILE = published_table(100.0, 20_000, 2000, [4096 << i for i in range(11)], [1, 2, 4, 8, 16, 32])


@pytest.fixture(scope="module")
def region_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, REGION + N * BB + 4096, dtype=np.uint8)
    data = data[:len(data) // 4096 * 4096]
    path = tmp_path_factory.mktemp("reads") / "region.bin"
    path.write_bytes(data.tobytes())
    return path


def plans(slots):
    return {"runs": plan_reads(slots, REGION, BB),
            "runs-split": plan_reads(slots, REGION, BB, 4096, 8192, 16384),
            "bundles": plan_bundles(slots, REGION, BB),
            "collapse": plan_collapse(slots, REGION, BB, PROFILE, 8),
            "cheapest": plan_cheapest(slots, REGION, BB, PROFILE, 8)}


@pytest.mark.parametrize("engine", ["aio", "threads"])
@pytest.mark.parametrize("queue_depth", [1, 8, 32])
def test_reader_returns_every_bundle_exactly_under_random_plans(region_file, engine, queue_depth):
    rng = np.random.default_rng(queue_depth)
    with open(region_file, "rb") as f:
        want = np.frombuffer(f.read(), np.uint8)
    with FlashReader(region_file, queue_depth, engine=engine) as r:
        assert r.engine == engine and r.o_direct
        for _ in range(4):
            slots = np.flatnonzero(rng.random(N) < rng.uniform(0.05, 0.6))
            for name, plan in plans(slots).items():
                res = r.read(plan.extents)
                got = gather(res, plan, REGION, BB)
                expect = np.stack([want[REGION + s * BB:REGION + (s + 1) * BB] for s in
                                   np.repeat(plan.run_starts, plan.run_lens) + _offsets(plan.run_lens)])
                assert (got == expect).all(), name


def _offsets(lens):
    return np.concatenate([np.arange(k) for k in lens]) if len(lens) else np.zeros(0, np.int64)


def test_aio_reader_reports_a_read_past_the_end_with_its_offset(region_file):
    size = region_file.stat().st_size
    with FlashReader(region_file, 8, engine="aio") as r:
        with pytest.raises(ReadError, match="offset"):
            r.read(np.array([[0, 4096], [size, 4096]]))


def test_unknown_engine_is_refused(region_file):
    with pytest.raises(ValueError, match="threads"):
        FlashReader(region_file, 8, engine="uring")
