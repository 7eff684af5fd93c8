"""The decode engine with an I/O policy (collapse planner, DRAM cache) computes the same
logits as without one, reads fewer bundles once the cache holds some, and never more
bytes than the budget in DRAM."""
import numpy as np
import pytest

from ripple.android_host.devices import published_table
from ripple.layout.bundle import BundleSpec, encode_bundles
from ripple.layout.pack import write_layout
from ripple.layout.reader import open_layout
from ripple.runtime_py.cache import BundleStore, make_cache
from ripple.runtime_py.engine import IOStats, flash_ffn
from ripple.runtime_py.reader import FlashReader
from ripple.runtime_py.strategies import STRATEGIES, layer_planner
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import to_torch

from test_engine import step_logits

PROFILE = published_table(100.0, 20_000, 2000, [4096 << i for i in range(11)], [1, 2, 4, 8, 16, 32])
TOKENS = [3, 17, 99, 5, 42, 7, 8, 64, 12, 30, 31, 2]


@pytest.fixture(scope="module")
def llama(random_llama_dir, tmp_path_factory):
    desc = load_model(random_llama_dir)
    rng = np.random.default_rng(0)
    spec = BundleSpec(desc.activation, desc.d_model, "fp16", False)
    perms = [rng.permutation(desc.d_ffn) for _ in desc.layers]
    out = tmp_path_factory.mktemp("llama")
    write_layout(out, spec, ((encode_bundles(spec, lw.w_up, lw.w_down.T, lw.w_gate, lw.b_up), p)
                             for lw, p in zip(desc.layers, perms)), {}, desc.source, desc.source_hash)
    return desc, open_layout(out)


def plain_and_policed(tm, layout, thr, store):
    """Logits and I/O of plain reads, and of Ripple's collapse planner with `store`."""
    plan = layer_planner(STRATEGIES["ripple"], PROFILE, 8, tm.desc.d_ffn)
    plain, policed = IOStats(), IOStats()
    with FlashReader(layout.path, 8) as reader:
        ref = step_logits(tm, TOKENS, lambda: flash_ffn(tm, layout, reader, thr, "coef", plain))
        got = step_logits(tm, TOKENS, lambda: flash_ffn(tm, layout, reader, thr, "coef", policed,
                                                       planner=plan, store=store))
    return ref, got, plain, policed


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "linking", "window"])
def test_cached_and_collapsed_reads_give_the_same_logits(llama, policy):
    desc, layout = llama
    tm = to_torch(desc)
    thr = np.full(desc.n_layers, 0.02)
    budget = desc.n_layers * desc.d_ffn * layout.bundle_bytes // 5
    store = BundleStore(make_cache(policy, budget, layout.bundle_bytes, layout.perm))
    ref, got, plain, policed = plain_and_policed(tm, layout, thr, store)
    assert store.cache.used_bytes <= budget
    assert store.stored <= store.cache.entries
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert policed.bytes_needed == plain.bytes_needed
    assert store.hits > 0


def test_read_through_keeps_gap_bundles_with_their_exact_bytes(llama):
    """A planner that reads through gaps and an LRU that keeps what it read there: the same
    logits as plain reads, and the store holds bundles no token asked for, byte for byte as
    the file has them."""
    desc, layout = llama
    tm = to_torch(desc)
    thr = np.full(desc.n_layers, 0.02)
    budget = desc.n_layers * desc.d_ffn * layout.bundle_bytes // 3
    store = BundleStore(make_cache("lru", budget, layout.bundle_bytes, layout.perm, read_through=True))
    asked = [set() for _ in range(desc.n_layers)]
    access = store.access

    def recording(layer, ids):
        asked[layer].update(np.asarray(ids).tolist())
        return access(layer, ids)
    store.access = recording
    ref, got, _, _ = plain_and_policed(tm, layout, thr, store)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert store.cache.used_bytes <= budget
    raw = np.fromfile(layout.path, np.uint8)
    never_asked = 0
    for l in range(desc.n_layers):
        held = np.flatnonzero(store.row_of[l * desc.d_ffn:(l + 1) * desc.d_ffn] >= 0)
        for i in held.tolist():
            off = int(layout.region_offsets[l]) + int(layout.slot_of[l][i]) * layout.bundle_bytes
            assert (store.rows(l, np.array([i]))[0] == raw[off:off + layout.bundle_bytes]).all()
            never_asked += i not in asked[l]
    assert never_asked > 0


def test_predicted_sets_with_io_policy_compute_the_same_on_torch_and_tvm(llama):
    """Predicted sets (the oracle with a tenth of the neurons flipped: misses and false
    positives), a collapse planner and a cache: the compiled backend keeps the same neurons
    (its kernel re-checks each read neuron's score), reads the same bytes and counts the
    same misses as the torch backend."""
    import torch

    from ripple.runtime_py.tvm_ffn import tvm_ffn
    from ripple.tuning.sparsity import scores

    desc, layout = llama
    tm = to_torch(desc)
    thr = np.full(desc.n_layers, 0.02)
    flip = torch.from_numpy(np.random.default_rng(1).random((desc.n_layers, desc.d_ffn)) < 0.1)

    def sets(layer, hf):
        return (scores(tm, layer, hf, "coef")[1] > thr[layer]) ^ flip[layer]

    budget = desc.n_layers * desc.d_ffn * layout.bundle_bytes // 5
    plan = layer_planner(STRATEGIES["ripple"], PROFILE, 8, desc.d_ffn)
    got, stats = {}, {}
    for name, make in (("torch", flash_ffn), ("tvm", tvm_ffn)):
        store, st = BundleStore(make_cache("s3fifo", budget, layout.bundle_bytes, layout.perm)), IOStats()
        with FlashReader(layout.path, 8) as reader:
            got[name] = step_logits(tm, TOKENS, lambda: make(tm, layout, reader, thr, "coef", st, sets=sets,
                                                             planner=plan, store=store))
        stats[name] = st
        assert store.hits > 0
    np.testing.assert_allclose(got["tvm"], got["torch"], atol=1e-4, rtol=0)
    t, v = stats["torch"], stats["tvm"]
    assert (v.bytes_read, v.reads, v.missed, v.extra_bytes) == (t.bytes_read, t.reads, t.missed, t.extra_bytes)
    assert t.missed > 0 and t.extra_bytes > 0


@pytest.mark.parametrize("backend", ["torch", "tvm"])
@pytest.mark.parametrize("layers", ["all", "auto"])
def test_read_ahead_gives_the_same_logits_and_reads_whole_regions_ahead(llama, backend, layers):
    """Regions read ahead on background readers: the same logits as reading on demand; with
    layers="all" every layer's bytes come from there (whole regions); with "auto" the layers
    whose last plan read nearly all of their region, so at least the on-demand bytes and at
    most whole regions."""
    from ripple.runtime_py.read_ahead import ReadAhead
    from ripple.runtime_py.tvm_ffn import tvm_ffn

    desc, layout = llama
    tm = to_torch(desc)
    thr = np.full(desc.n_layers, -1.0) if layers == "all" else np.full(desc.n_layers, 0.02)
    make = flash_ffn if backend == "torch" else tvm_ffn
    plain, ahead_stats = IOStats(), IOStats()
    with FlashReader(layout.path, 8) as reader:
        ref = step_logits(tm, TOKENS, lambda: make(tm, layout, reader, thr, "coef", plain))
        with ReadAhead(layout, 8, depth=2, layers=layers) as ahead:
            got = step_logits(tm, TOKENS, lambda: make(tm, layout, reader, thr, "coef", ahead_stats, ahead=ahead))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # The compiled backend finds a whole layer's set among all its bundles (no predictor, no
    # gather), so it counts the region as needed; torch gathers the set's rows.
    if backend == "torch":
        assert ahead_stats.bytes_needed == plain.bytes_needed
    else:
        assert ahead_stats.bytes_needed >= plain.bytes_needed
    whole = (len(TOKENS) - 3) * int(ahead.region_bytes.sum())     # a prompt step, then one per token
    if layers == "all":
        assert ahead_stats.bytes_read == whole
        assert ahead_stats.hidden_seconds > 0
    else:
        assert plain.bytes_read < ahead_stats.bytes_read < whole


@pytest.mark.parametrize("backend", ["torch", "tvm"])
def test_read_ahead_stops_before_the_pinned_tail_and_gives_the_same_logits(random_llama_dir, tmp_path, backend):
    """A layout with the pinned bundles at region ends (pinned_last) and a store that pins
    them: whole reads skip that tail (read once, at the start), with the same logits."""
    from ripple.runtime_py.cache import pinned_last
    from ripple.runtime_py.read_ahead import ReadAhead
    from ripple.runtime_py.tvm_ffn import tvm_ffn

    desc = load_model(random_llama_dir)
    rng = np.random.default_rng(4)
    spec = BundleSpec(desc.activation, desc.d_model, "fp16", False)
    calib = rng.random((desc.n_layers, 50, desc.d_ffn)) < rng.random((desc.n_layers, 1, desc.d_ffn))
    budget = desc.n_layers * desc.d_ffn * spec.bundle_bytes // 8
    perm0 = np.stack([rng.permutation(desc.d_ffn) for _ in desc.layers])
    pins = make_cache("pinned", budget, spec.bundle_bytes, perm0, calib)
    laid = np.stack([pinned_last(perm0[l], pins.pinned(l)) for l in range(desc.n_layers)])
    write_layout(tmp_path, spec, ((encode_bundles(spec, lw.w_up, lw.w_down.T, lw.w_gate, lw.b_up), p)
                                  for lw, p in zip(desc.layers, laid)), {}, desc.source, desc.source_hash)
    layout = open_layout(tmp_path)
    tm = to_torch(desc)
    thr = np.full(desc.n_layers, -1.0)
    make = flash_ffn if backend == "torch" else tvm_ffn
    store = BundleStore(make_cache("pinned", budget, spec.bundle_bytes, layout.perm, calib))
    plain, ahead_stats = IOStats(), IOStats()
    with FlashReader(layout.path, 8) as reader:
        ref = step_logits(tm, TOKENS, lambda: make(tm, layout, reader, thr, "coef", plain))
        with ReadAhead(layout, 8, depth=2, layers="all", store=store) as ahead:
            assert ahead.tail.tolist() == [len(pins.pinned(l)) for l in range(desc.n_layers)]
            assert ahead.tail.sum() > 0
            got = step_logits(tm, TOKENS, lambda: make(tm, layout, reader, thr, "coef", ahead_stats,
                                                       ahead=ahead, store=store))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    n, bb = desc.d_ffn, spec.bundle_bytes
    readable = -(-(n - ahead.tail) * bb // 4096) * 4096
    assert ahead_stats.bytes_read == (len(TOKENS) - 3) * int(readable.sum())
    assert ahead_stats.bytes_read < plain.bytes_read
