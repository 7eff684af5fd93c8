"""The I/O strategies: one interface, each reading every bundle its cache does not hold."""
import numpy as np
import pytest

from ripple.android_host.devices import published_table
from ripple.runtime_py.strategies import (PINNED_SHARES, STRATEGIES, build_cache, layout_perm, plan_trace,
                                          tune, virtual_offsets)

L, N, BB, QD = 2, 256, 3456, 16
PROFILE = published_table(100.0, 20_000, 2000, [4096 << i for i in range(11)], [1, 2, 4, 8, 16, 32])


def masks(seed, tokens):
    rng = np.random.default_rng(seed)
    p = np.clip(rng.pareto(1.2, (L, N)) * 0.1, 0.01, 0.9)
    return rng.random((L, tokens, N)) < p[:, None, :]


def joined(extents):
    """(start, end) of the byte ranges the extents cover, back-to-back pieces joined."""
    out = []
    for off, n in sorted(extents.tolist()):
        if out and off <= out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n)
        else:
            out.append([off, off + n])
    return np.array(out).reshape(-1, 2)


def ready(name, calib):
    s = STRATEGIES[name]
    perm = np.stack([np.random.default_rng(l).permutation(N) for l in range(L)])
    budget = L * N * BB // 10
    s, _ = tune(s, calib, perm, BB, budget, PROFILE, QD, tokens=4, warmup=2)
    cache = build_cache(s, budget, BB, perm, calib)
    laid = layout_perm(s, perm, cache)
    return s, laid, build_cache(s, budget, BB, laid, calib)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_reads_every_active_bundle_its_cache_lacks(name):
    calib, held = masks(0, 40), masks(1, 12)
    s, laid, cache = ready(name, calib)
    offsets = virtual_offsets(L, N, BB)
    tr = plan_trace(s, held, laid, cache, offsets, BB, PROFILE, QD, warmup=2)
    slot_of = np.argsort(laid, axis=1)
    # Replay the cache on its own to know the misses of each measured token.
    _, _, shadow = ready(name, calib)
    for t in range(12):
        for l in range(L):
            ids = np.flatnonzero(held[l, t])
            hit = shadow.access(t, l, ids) if s.planner != "region" else np.zeros(len(ids), bool)
            if t < 2:
                continue
            ext = joined(tr.plans[t - 2][l].extents)
            for sl in slot_of[l][ids[~hit]].tolist():
                lo, hi = offsets[l] + sl * BB, offsets[l] + (sl + 1) * BB
                assert ((ext[:, 0] <= lo) & (hi <= ext[:, 1])).any()
    assert (tr.hits <= tr.active).all()


def test_dense_reads_whole_regions_whatever_is_active():
    calib, held = masks(0, 40), masks(2, 6)
    s, laid, cache = ready("dense", calib)
    tr = plan_trace(s, held, laid, cache, virtual_offsets(L, N, BB), BB, PROFILE, QD)
    region = -(-N * BB // 4096) * 4096
    assert (tr.bytes_read() == L * region).all()


def test_ours_moves_pinned_bundles_off_the_read_path():
    calib, held = masks(0, 40), masks(3, 10)
    s, laid, cache = ready("ours", calib)
    assert s.pinned_share in PINNED_SHARES
    offsets = virtual_offsets(L, N, BB)
    tr = plan_trace(s, held, laid, cache, offsets, BB, PROFILE, QD)
    for l in range(L):
        pinned = set(cache.pinned(l).tolist())
        k = len(pinned)
        assert set(laid[l][N - k:].tolist()) == pinned
        tail = offsets[l] + (N - k) * BB
        for row in tr.plans:
            # Nothing starts inside the pinned tail beyond the block it shares with the rest.
            assert (row[l].extents[:, 0] <= tail // 4096 * 4096).all()


def test_tune_chooses_the_pins_and_share_the_model_finds_fastest():
    calib = masks(0, 40)
    perm = np.tile(np.arange(N), (L, 1))
    s, info = tune(STRATEGIES["ours"], calib, perm, BB, L * N * BB // 10, PROFILE, QD, tokens=4, warmup=2)
    modelled = info["modelled_ms"]
    assert set(modelled) == {"frequency", "io"}
    assert all(set(m) == set(PINNED_SHARES) for m in modelled.values())
    assert modelled[s.pin_by][s.pinned_share] == min(min(m.values()) for m in modelled.values())
    assert (s.pin_value is not None) == (s.pin_by == "io")
