import numpy as np
import pytest

from ripple.runtime_py.cache import POLICIES, CacheError, io_value, make_cache, pinned_last

L, N, BB = 3, 200, 1000


def trace(seed, tokens=40, density=0.3):
    rng = np.random.default_rng(seed)
    # Some neurons hot, most not, with runs of co-active neighbours.
    p = np.clip(rng.pareto(1.5, (L, N)) * density / 3, 0, 0.95)
    return rng.random((L, tokens, N)) < p[:, None, :]


def cache(policy, budget_bytes, seed=0, share=0.75, read_through=False):
    perm = np.stack([np.random.default_rng([seed, l]).permutation(N) for l in range(L)])
    return make_cache(policy, budget_bytes, BB, perm, trace(seed + 100), pinned_share=share,
                      read_through=read_through)


@pytest.mark.parametrize("read_through", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget", [0, 7 * BB + 999, 90 * BB])
def test_cache_never_exceeds_its_budget(policy, budget, read_through):
    c = cache(policy, budget, read_through=read_through)
    masks = trace(1)
    rng = np.random.default_rng(7)
    for t in range(masks.shape[1]):
        for l in range(L):
            c.access(t, l, np.flatnonzero(masks[l, t]))
            c.read_through(l, rng.choice(N, 12, replace=False))    # bundles a plan read in its gaps
            assert c.used_bytes <= budget
    assert c.capacity * BB <= budget


@pytest.mark.parametrize("policy", POLICIES)
def test_hits_are_exactly_the_bundles_held_before_the_access(policy):
    c = cache(policy, 60 * BB)
    masks = trace(2)
    for t in range(masks.shape[1]):
        for l in range(L):
            ids = np.flatnonzero(masks[l, t])
            before = c.contains(l, ids).copy()
            assert (c.access(t, l, ids) == before).all()


@pytest.mark.parametrize("policy", POLICIES)
def test_zero_budget_never_hits(policy):
    c = cache(policy, 0)
    masks = trace(3)
    assert not any(c.access(t, l, np.flatnonzero(masks[l, t])).any()
                   for t in range(10) for l in range(L))


def test_lru_evicts_the_least_recently_used():
    c = make_cache("lru", L * 2 * BB, BB, np.tile(np.arange(N), (L, 1)))   # 2 bundles per layer
    c.access(0, 0, np.array([1]))
    c.access(1, 0, np.array([2]))
    c.access(2, 0, np.array([1]))        # 1 is now more recent than 2
    c.access(3, 0, np.array([3]))        # evicts 2
    assert c.contains(0, np.array([1, 2, 3])).tolist() == [True, False, True]


def test_read_through_keeps_gap_bundles_and_evicts_them_before_what_was_asked_for():
    c = make_cache("lru", L * 4 * BB, BB, np.tile(np.arange(N), (L, 1)), read_through=True)  # 4 per layer
    c.access(0, 0, np.array([1, 2]))
    c.read_through(0, np.array([3, 4, 5]))         # read in the gaps around 1 and 2
    assert c.contains(0, np.array([1, 2, 3, 4, 5])).sum() == 4
    assert c.contains(0, np.array([1, 2])).all()    # the asked-for bundles stay
    assert c.access(1, 0, np.array([3, 4, 5])).sum() == 2   # two gap bundles stayed, and now hit


def test_read_through_is_off_unless_asked_for():
    c = make_cache("lru", L * 4 * BB, BB, np.tile(np.arange(N), (L, 1)))
    c.access(0, 0, np.array([1]))
    c.read_through(0, np.array([2, 3]))
    assert not c.reads_through and c.contains(0, np.array([2, 3])).tolist() == [False, False]


def test_hybrid_reads_through_into_its_lru_part_only():
    masks = trace(6)
    c = make_cache("hybrid", 40 * BB, BB, np.tile(np.arange(N), (L, 1)), masks, pinned_share=0.75,
                   read_through=True)
    pinned = c.pinned(0)
    free = np.setdiff1d(np.arange(N), pinned)[:2]
    c.read_through(0, np.concatenate((pinned[:2], free)))
    assert c.dynamic.contains(0, free).all() and not c.dynamic.contains(0, pinned[:2]).any()


def test_io_value_prices_a_lone_bundle_above_an_equally_frequent_one_in_a_run():
    # Slots 0-1 always fire together; slot 9 fires as often, alone, 8 slots from them.
    masks = np.zeros((1, 10, 12), bool)
    masks[0, :, [0, 1, 9]] = True
    perm = np.arange(12)[None]
    v = io_value(masks, perm, request_bundles=3.0)
    assert v[0, 0] == v[0, 1] == 1.0               # their bytes, every token
    assert v[0, 9] == 1.0 + 3.0                    # and a request of its own
    assert (v[0, [2, 3, 4, 5, 6, 7, 8, 10, 11]] == 0).all()
    # The value follows the neuron, not the slot.
    shuffled = np.array([[9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]])      # 9 now beside 0 and 1
    assert io_value(masks, shuffled, request_bundles=3.0)[0, 9] == 1.0


def test_hybrid_pins_by_the_value_it_is_given():
    masks = trace(5)
    value = np.random.default_rng(3).random((L, N))
    c = make_cache("hybrid", 40 * BB, BB, np.tile(np.arange(N), (L, 1)), masks, pinned_share=0.75, value=value)
    top = set(np.argsort(-value.reshape(-1), kind="stable")[:30].tolist())
    assert {l * N + int(i) for l in range(L) for i in c.pinned(l)} == top


def test_window_keeps_what_was_active_in_the_last_five_tokens():
    c = make_cache("window", L * N * BB, BB, np.tile(np.arange(N), (L, 1)))
    c.access(0, 0, np.array([7]))
    for t in range(1, 6):
        c.access(t, 0, np.array([]))
    assert c.contains(0, np.array([7])).tolist() == [True]     # active 5 tokens ago
    c.access(6, 0, np.array([]))
    assert c.contains(0, np.array([7])).tolist() == [False]    # 6 tokens ago: gone


def test_s3fifo_keeps_a_reused_set_through_a_scan():
    c = make_cache("s3fifo", L * 20 * BB, BB, np.tile(np.arange(N), (L, 1)))
    hot = np.arange(10)
    for t in range(5):
        c.access(t, 0, hot)
    for t in range(5, 25):               # one-time bundles, 8 per token
        c.access(t, 0, 20 + np.arange(8) + 8 * (t - 5))
    assert c.contains(0, hot).all()


def test_linking_admits_runs_of_the_placement_not_lone_bundles():
    perm = np.tile(np.arange(N), (L, 1))
    c = make_cache("linking", L * 50 * BB, BB, perm)
    c.access(0, 0, np.array([10, 11, 12, 40]))     # a run of three and a lone bundle
    assert c.contains(0, np.array([10, 11, 12, 40])).tolist() == [True, True, True, False]


def test_pinned_holds_the_most_often_active_bundles_for_good():
    masks = trace(4)
    freq = masks.mean(axis=1).reshape(-1)
    c = make_cache("pinned", 30 * BB, BB, np.tile(np.arange(N), (L, 1)), masks)
    top = set(np.argsort(-freq, kind="stable")[:30].tolist())
    held = {l * N + int(i) for l in range(L) for i in c.pinned(l)}
    assert held == top
    for t in range(10):
        c.access(t, 0, np.arange(N))
    assert {l * N + int(i) for l in range(L) for i in c.pinned(l)} == top


def test_hybrid_pins_its_share_and_runs_lru_on_the_rest():
    masks = trace(5)
    c = make_cache("hybrid", 40 * BB, BB, np.tile(np.arange(N), (L, 1)), masks, pinned_share=0.75)
    assert sum(len(c.pinned(l)) for l in range(L)) == 30
    assert c.dynamic.capacity == 10 // L * L


def test_pinned_last_moves_pinned_neurons_to_the_end_in_order():
    perm = np.array([5, 3, 0, 4, 1, 2])
    out = pinned_last(perm, np.array([3, 1]))
    assert out.tolist() == [5, 0, 4, 2, 3, 1]


def test_unknown_policy_is_refused():
    with pytest.raises(CacheError, match="lru"):
        make_cache("mru", 10 * BB, BB, np.tile(np.arange(N), (L, 1)))


def test_bundle_store_hands_back_the_bytes_it_kept_in_any_order_and_into_a_buffer():
    """rows() copies a run kept together as one block and gathers any other order; both, and
    both with `out`, give exactly the bytes kept."""
    from ripple.runtime_py.cache import BundleStore
    c = make_cache("pinned", 3 * 30 * BB, BB, np.tile(np.arange(N), (L, 1)), trace(5))
    store = BundleStore(c)
    rng = np.random.default_rng(0)
    kept = {}
    for l in range(L):
        ids = np.sort(c.pinned(l))
        kept[l] = ids, rng.integers(0, 256, (len(ids), BB), dtype=np.uint8)
        store.keep(l, *kept[l])
    for l in range(L):
        ids, rows = kept[l]
        shuffled = rng.permutation(len(ids))
        for order in (np.arange(len(ids)), shuffled, shuffled[:5]):
            np.testing.assert_array_equal(store.rows(l, ids[order]), rows[order])
            out = np.zeros((len(order), BB), np.uint8)
            assert store.rows(l, ids[order], out=out) is out
            np.testing.assert_array_equal(out, rows[order])
