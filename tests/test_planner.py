import numpy as np
import pytest

from ripple.runtime_py.planner import covered_slots, plan_reads, runs


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


# ---- policies over the profile: region, bundles, collapse, cheapest

from ripple.android_host.devices import published_table  # noqa: E402
from ripple.runtime_py import storage_model as sm  # noqa: E402
from ripple.runtime_py.planner import (aligned_runs, candidate_costs, merge_runs, plan_bundles,  # noqa: E402
                                       plan_cheapest, plan_collapse, plan_region, split_requests)

SIZES = [4096 << i for i in range(11)]
QDS = [1, 2, 4, 8, 16, 32]
IOPS_BOUND = published_table(100.0, 20_000, 2000, SIZES, QDS)     # 20K IOPS, 2 GB/s
BW_BOUND = published_table(10.0, 10_000_000, 2000, SIZES, QDS)    # requests nearly free


def coverage(extents, nbytes):
    """How many extents read each byte of the first nbytes of the file."""
    diff = np.zeros(nbytes + 1, np.int64)
    np.add.at(diff, np.minimum(extents[:, 0], nbytes), 1)
    np.add.at(diff, np.minimum(extents[:, 0] + extents[:, 1], nbytes), -1)
    return np.cumsum(diff)[:nbytes]


def random_slots(seed, n=1536, density=0.4):
    rng = np.random.default_rng(seed)
    return np.flatnonzero(rng.random(n) < density)


def merged_gaps(plan, region, bb, align):
    """Aligned gaps between consecutive runs that one extent reads through."""
    lo = region + plan.run_starts * bb
    a_lo = lo // align * align
    a_hi = -(-(lo + plan.run_lens * bb) // align) * align
    first_piece = plan.run_extent
    same = np.zeros(len(lo), bool)
    if len(lo) > 1:
        # Runs i and i+1 are in one read when no extent boundary lies between them.
        ends = plan.extents[:, 0] + plan.extents[:, 1]
        for i in range(len(lo) - 1):
            e = first_piece[i]
            covered = plan.extents[e, 0] <= a_hi[i] - 1 and a_lo[i + 1] < ends[e:first_piece[i + 1] + 1].max()
            contiguous = all(ends[k] == plan.extents[k + 1, 0] for k in range(e, first_piece[i + 1]))
            same[i] = covered and contiguous and a_lo[i + 1] > a_hi[i]
    return (a_lo[1:] - a_hi[:-1])[same[:-1]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("profile", [IOPS_BOUND, BW_BOUND], ids=["iops-bound", "bw-bound"])
@pytest.mark.parametrize("policy", ["collapse", "cheapest", "bundles", "region"])
def test_every_policy_covers_every_active_bundle_with_aligned_extents(seed, profile, policy):
    bb, region, align = 3456, 4096, 4096
    slots = random_slots(seed, 400)
    plan = {"collapse": lambda: plan_collapse(slots, region, bb, profile, 32, align),
            "cheapest": lambda: plan_cheapest(slots, region, bb, profile, 32, align),
            "bundles": lambda: plan_bundles(slots, region, bb, align),
            "region": lambda: plan_region(400, region, bb, profile, 32, align)}[policy]()
    assert (plan.extents % align == 0).all()
    cov = coverage(plan.extents, region + 401 * bb)
    for s in slots.tolist():
        assert (cov[region + s * bb:region + (s + 1) * bb] >= 1).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("profile", [IOPS_BOUND, BW_BOUND], ids=["iops-bound", "bw-bound"])
def test_cheapest_prices_every_candidate_as_the_storage_model_prices_its_plan(seed, profile):
    """candidate_costs prices all (gap, split) plans in one pass; each price must be what
    batch_s gives the plan merge_runs builds, and plan_cheapest must return the cheapest."""
    rng = np.random.default_rng(seed)
    bb, region, qd = int(rng.choice([1368, 3456, 9000])), 4096 * int(rng.integers(1, 5)), int(rng.choice([1, 8, 32]))
    slots = random_slots(seed, int(rng.integers(50, 2000)), float(rng.uniform(0.02, 0.9)))
    runs_ = aligned_runs(slots, region, bb, 4096)
    gaps, splits, cost = candidate_costs(runs_, profile, qd, 4096)
    for (g, s), c in np.ndenumerate(cost):
        plan = merge_runs(runs_, region, bb, 4096, int(gaps[g]), int(splits[s]))
        assert c == pytest.approx(sm.batch_s(profile, plan.extents[:, 1], qd, plan.extents[:, 0]), rel=1e-9)
    best = plan_cheapest(slots, region, bb, profile, qd)
    assert sm.batch_s(profile, best.extents[:, 1], qd, best.extents[:, 0]) == pytest.approx(cost.min(), rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("policy", ["collapse", "cheapest"])
def test_collapsed_plans_read_no_byte_twice(seed, policy):
    fn = plan_collapse if policy == "collapse" else plan_cheapest
    plan = fn(random_slots(seed), 4096, 3456, IOPS_BOUND, 32)
    ext = plan.extents
    assert (ext[1:, 0] >= ext[:-1, 0] + ext[:-1, 1]).all()


def test_runs_point_at_the_extent_holding_their_first_byte():
    bb, region = 3456, 8192
    slots = random_slots(3)
    plan = plan_collapse(slots, region, bb, IOPS_BOUND, 32)
    pos = region + plan.run_starts * bb
    ext = plan.extents[plan.run_extent]
    assert ((ext[:, 0] <= pos) & (pos < ext[:, 0] + ext[:, 1])).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("profile", [IOPS_BOUND, BW_BOUND], ids=["iops-bound", "bw-bound"])
def test_collapse_never_reads_through_a_gap_that_costs_more_than_a_request(seed, profile):
    bb, region, align = 3456, 4096, 4096
    slots = random_slots(seed, density=0.15)
    plan = plan_collapse(slots, region, bb, profile, 32, align)
    thresholds = {q: sm.gap_threshold_bytes(profile, q) for q in range(1, 33)}
    assert plan.gap_bytes in thresholds.values()
    q = next(q for q, g in thresholds.items() if g == plan.gap_bytes)
    overhead, bw = sm.affine(profile, q)
    gaps = merged_gaps(plan, region, bb, align)
    assert (gaps <= plan.gap_bytes).all()
    assert (gaps / bw <= overhead * 1.0001).all()


def test_collapse_merges_every_gap_up_to_its_threshold():
    bb, region, align = 3456, 4096, 4096
    slots = random_slots(1, density=0.15)
    plan = plan_collapse(slots, region, bb, IOPS_BOUND, 32, align)
    lo = region + plan.run_starts * bb
    a_lo = lo // align * align
    a_hi = -(-(lo + plan.run_lens * bb) // align) * align
    gaps = a_lo[1:] - a_hi[:-1]
    separate = plan.run_extent[1:] != plan.run_extent[:-1]
    split_only = np.array([plan.extents[plan.run_extent[i], 0] + plan.extents[plan.run_extent[i], 1]
                           == plan.extents[plan.run_extent[i] + 1, 0] for i in np.flatnonzero(separate)], bool)
    # Runs in different requests are either beyond the threshold or cut by the request size.
    assert (gaps[separate][~split_only] > plan.gap_bytes).all()


def test_collapse_threshold_comes_from_the_profile():
    slots = random_slots(2, density=0.2)
    slow_iops = plan_collapse(slots, 4096, 3456, IOPS_BOUND, 32)
    fast_iops = plan_collapse(slots, 4096, 3456, BW_BOUND, 32)
    assert slow_iops.gap_bytes > fast_iops.gap_bytes
    assert len(slow_iops.extents) < len(fast_iops.extents)
    assert slow_iops.bytes_read > fast_iops.bytes_read


def test_collapse_backs_off_on_a_bandwidth_bound_device():
    # Requests cost ~nothing at depth: only runs sharing or touching a block merge.
    slots = random_slots(5, density=0.2)
    plan = plan_collapse(slots, 0, 3456, BW_BOUND, 32)
    assert plan.gap_bytes < 4096
    assert plan.extents.tolist() == plan_reads(slots, 0, 3456, 4096, 0,
                                               sm.split_bytes(BW_BOUND, 32)).extents.tolist()


@pytest.mark.parametrize("seed", range(3))
def test_cheapest_plan_costs_no_more_than_the_alternatives_by_the_model(seed):
    slots = random_slots(seed)
    cost = lambda p: sm.batch_s(IOPS_BOUND, p.extents[:, 1], 32, p.extents[:, 0])  # noqa: E731
    best = cost(plan_cheapest(slots, 0, 3456, IOPS_BOUND, 32))
    assert best <= cost(plan_collapse(slots, 0, 3456, IOPS_BOUND, 32)) * (1 + 1e-9)
    assert best <= cost(plan_reads(slots, 0, 3456, 4096)) * (1 + 1e-9)
    assert best <= cost(plan_region(1536, 0, 3456, IOPS_BOUND, 32)) * (1 + 1e-9)


def test_split_requests_cut_long_extents_and_keep_their_bytes():
    plan = plan_reads(np.arange(100), 4096, 3456, 4096)
    cut = split_requests(plan, 4096, 3456, 65536)
    assert (cut.extents[:, 1] <= 65536).all() and (cut.extents % 4096 == 0).all()
    assert (coverage(cut.extents, 4096 + 100 * 3456 + 4096) == coverage(plan.extents, 4096 + 100 * 3456 + 4096)).all()
    assert cut.bytes_read == plan.bytes_read


def test_one_read_per_bundle_reads_a_shared_block_twice():
    # Bundles of 3456 B: slots 0 and 1 share the block at 0.
    plan = plan_bundles(np.array([0, 1]), 0, 3456, 4096)
    assert plan.extents.tolist() == [[0, 4096], [0, 8192]]
    assert plan.run_extent.tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(6))
def test_covered_slots_are_the_bundles_lying_wholly_inside_the_extents(seed):
    rng = np.random.default_rng(seed)
    n, bb, region = 300, 3456, 8192
    slots = np.sort(rng.choice(n, 40, replace=False))
    plan = plan_reads(slots, region, bb, 4096, max_gap_bytes=int(rng.integers(0, 5)) * 4096,
                      max_request_bytes=[0, 16384][seed % 2])
    got = covered_slots(plan, region, bb, n)
    want = [s for s in range(n) if _inside(plan.extents, region + s * bb, region + (s + 1) * bb)]
    assert got.tolist() == want
    assert set(slots.tolist()) <= set(got.tolist())


def _inside(extents, lo, hi):
    """[lo, hi) lies inside extents that continue one another."""
    covered = lo
    for o, m in sorted(extents.tolist()):
        if o <= covered < o + m:
            covered = o + m
    return covered >= hi
