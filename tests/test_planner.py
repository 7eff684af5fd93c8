import numpy as np
import pytest

from ripple.runtime_py.planner import plan_reads, runs


def covered_bytes(extents):
    return {b for off, n in extents.tolist() for b in range(off, off + n)}


def test_runs_are_maximal_ranges_of_consecutive_slots():
    starts, lens = runs(np.array([0, 1, 2, 5, 7, 8]))
    assert starts.tolist() == [0, 5, 7]
    assert lens.tolist() == [3, 1, 2]


@pytest.mark.parametrize("seed", range(5))
def test_extents_are_aligned_and_cover_every_active_bundle(seed):
    rng = np.random.default_rng(seed)
    bb, region, align = 3456, 8192, 4096
    slots = np.sort(rng.choice(500, size=120, replace=False))
    plan = plan_reads(slots, region, bb, align)
    assert (plan.extents % align == 0).all()
    got = covered_bytes(plan.extents)
    for s in slots.tolist():
        assert set(range(region + s * bb, region + (s + 1) * bb)) <= got


def test_no_byte_is_read_twice():
    rng = np.random.default_rng(1)
    plan = plan_reads(np.sort(rng.choice(400, 200, replace=False)), 0, 1000, 4096)
    ext = plan.extents
    assert (ext[1:, 0] >= ext[:-1, 0] + ext[:-1, 1]).all()


def test_one_read_per_run_when_runs_are_blocks_apart():
    bb = 4096
    plan = plan_reads(np.array([0, 1, 5, 9, 10, 11]), 0, bb, 4096)
    assert plan.extents.tolist() == [[0, 2 * bb], [5 * bb, bb], [9 * bb, 3 * bb]]


def test_runs_sharing_a_block_become_one_read():
    # Bundles of 1000 bytes: slots 0 and 2 both live in the first 4 KiB block.
    plan = plan_reads(np.array([0, 2]), 0, 1000, 4096)
    assert plan.extents.tolist() == [[0, 4096]]
    assert plan.run_extent.tolist() == [0, 0]


def test_gap_merging_only_merges_gaps_up_to_the_limit():
    bb = 4096
    slots = np.array([0, 2, 10])   # gaps of 1 and 7 bundles
    plan = plan_reads(slots, 0, bb, 4096, max_gap_bytes=2 * bb)
    assert plan.extents.tolist() == [[0, 3 * bb], [10 * bb, bb]]


def test_empty_active_set_reads_nothing():
    plan = plan_reads(np.array([], dtype=np.int64), 0, 100, 4096)
    assert plan.extents.shape == (0, 2) and plan.bytes_read == 0
