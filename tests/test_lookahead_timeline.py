"""The lookahead timeline (runtime_py.lookahead_timeline): layers in series, one device queue;
reads issued at the layer's own FFN input or `distance` layers ahead; and `ripple bench io
--strategies lookahead` on it."""
import json

import numpy as np
import pytest

from ripple.android_host.devices import published_table
from ripple.runtime_py import storage_model as sm
from ripple.runtime_py.cache import make_cache
from ripple.runtime_py.lookahead_timeline import (LayerReads, TimelineError, layer_reads, plan_lookahead_trace,
                                                  sources, token_timeline)
from ripple.runtime_py.strategies import Strategy, virtual_offsets

EMPTY = np.zeros((0, 2), np.int64)
PHONE = published_table(100.0, 20_000, 2000, [4096 << i for i in range(11)], [1, 2, 4, 8, 16, 32])
# A device already saturated at one request: a request costs the same whatever is beside it.
FLAT = sm.StorageProfile(np.array([4096, 1 << 20]), np.array([1]), np.array([[100.0], [2000.0]]), 500.0)


def scattered(rng, layer, k, region=1 << 22):
    """k one-block extents at random places of a layer's region (no two touch)."""
    blocks = np.sort(rng.choice(region // 8192, k, replace=False)) * 8192 + layer * region
    return np.stack((blocks, np.full(k, 4096)), axis=1).astype(np.int64)


def layers(seed, L=6, k=20):
    rng = np.random.default_rng(seed)
    return [scattered(rng, l, k) for l in range(L)]


def test_without_lookahead_a_token_waits_the_storage_models_serial_read_time():
    ext = layers(0)
    tl = token_timeline([LayerReads(EMPTY, e) for e in ext], 0, 1e-3, 2e-3, PHONE, 32)
    assert tl.waited_s == pytest.approx(float(sm.replay(PHONE, [ext], 32)[0]), rel=1e-9)
    assert tl.token_s == pytest.approx(tl.waited_s + 6 * 3e-3, rel=1e-9)
    assert tl.bytes_read == sum(int(e[:, 1].sum()) for e in ext) and tl.requests == 6 * 20


def test_back_to_back_pieces_cost_what_batch_s_says():
    ext = np.array([[0, 1 << 20], [1 << 20, 1 << 20], [5 << 20, 4096]], np.int64)
    tl = token_timeline([LayerReads(EMPTY, ext)], 0, 0.0, 0.0, PHONE, 8)
    assert tl.waited_s == pytest.approx(sm.batch_s(PHONE, ext[:, 1], 8, ext[:, 0]), rel=1e-9)


def test_with_no_compute_and_a_saturated_device_lookahead_waits_as_long_as_serial_reads():
    ext = layers(1)
    serial = token_timeline([LayerReads(EMPTY, e) for e in ext], 0, 0.0, 0.0, FLAT, 32)
    ahead = token_timeline([LayerReads(EMPTY, ext[0])] + [LayerReads(e, EMPTY) for e in ext[1:]], 1, 0.0, 0.0,
                           FLAT, 32)
    assert ahead.waited_s == pytest.approx(serial.waited_s, rel=1e-9)


def test_with_compute_longer_than_reads_only_layers_nothing_predicts_wait():
    ext, j = layers(2), 2
    reads = [LayerReads(EMPTY, e) for e in ext[:j]] + [LayerReads(e, EMPTY) for e in ext[j:]]
    tl = token_timeline(reads, j, 0.05, 0.05, PHONE, 32)
    first = sum(sm.batch_s(PHONE, e[:, 1], 32, e[:, 0]) for e in ext[:j])
    assert tl.waited_s == pytest.approx(first, rel=1e-9)
    assert (tl.layer_waited_s[j:] == 0).all()


def test_reads_issued_ahead_queue_before_a_later_layers_demand():
    """One queue, first in first out: a layer's misses wait behind the reads issued earlier."""
    ext = layers(3, L=3, k=200)
    reads = [LayerReads(EMPTY, ext[0]), LayerReads(EMPTY, ext[1][:1]), LayerReads(ext[2], EMPTY)]
    tl = token_timeline(reads, 2, 0.0, 0.0, PHONE, 32)
    alone = sm.batch_s(PHONE, ext[1][:1, 1], 32)
    assert tl.layer_waited_s[1] > 10 * alone


def test_queue_depth_never_exceeds_the_readers():
    ext = layers(4, L=8, k=50)
    reads = [LayerReads(EMPTY, ext[0])] + [LayerReads(e[:40], e[40:]) for e in ext[1:]]
    for qd in (1, 4, 32):
        tl = token_timeline(reads, 1, 1e-4, 1e-4, PHONE, qd)
        assert 1 <= tl.max_queue_depth <= qd and 0 < tl.mean_queue_depth <= tl.max_queue_depth


def test_reads_ahead_of_a_layer_nothing_lies_before_are_refused():
    ext = layers(5, L=3)
    with pytest.raises(TimelineError, match="layer 0"):
        token_timeline([LayerReads(ext[0], EMPTY), LayerReads(ext[1], EMPTY), LayerReads(EMPTY, ext[2])], 2,
                       0.0, 0.0, PHONE, 8)


def test_layers_before_the_distance_go_as_far_ahead_as_they_can():
    """As the compiled runtime: distance 3 issues layers 1, 2, 3 at layer 0, layer 4 at 1."""
    assert sources(3, 6).tolist() == [-1, 0, 0, 0, 1, 2] and sources(0, 3).tolist() == [-1, -1, -1]
    ext = layers(6, L=4, k=5)
    reads = [LayerReads(EMPTY, ext[0])] + [LayerReads(e, EMPTY) for e in ext[1:]]
    tl = token_timeline(reads, 3, 0.05, 0.05, PHONE, 32)     # compute far longer than the reads
    assert tl.layer_waited_s[0] > 0 and (tl.layer_waited_s[1:] == 0).all()


def test_misses_and_unused_bytes_are_counted_exactly():
    """One bundle a block, one request a bundle, nothing cached: a layer reads its predicted
    set ahead and on demand exactly the bundles of its own set that were not predicted."""
    L, n, bb = 3, 64, 4096
    own = np.zeros((L, 2, n), bool)
    ahead = np.zeros((L, 2, n), bool)
    own[:, :, :10] = True                   # every layer needs bundles 0..9
    ahead[1:, :, 5:20] = True               # predicted 5..19: 5 missed, 10 read for nothing
    s = Strategy("bundles", "identity", "bundles", "none", distance=1)
    perm = np.tile(np.arange(n), (L, 1))
    cache = make_cache("none", 0, bb, perm)
    offsets = virtual_offsets(L, n, bb)
    tr = plan_lookahead_trace(s, own, ahead, 1, perm, cache, offsets, bb, PHONE, 8, warmup=1)
    assert tr.misses.tolist() == [[10, 5, 5]]
    assert tr.bytes_read().tolist() == [(10 + 2 * (15 + 5)) * bb]
    unused = tr.bytes_read() - (tr.active - tr.hits).sum(1) * bb
    assert unused.tolist() == [2 * 10 * bb]
    r = layer_reads(tr, 0)
    assert len(r[0].ahead) == 0 and len(r[1].ahead) == 15 and len(r[2].demand) == 5
    assert sorted(r[1].demand[:, 0].tolist()) == [offsets[1] + i * bb for i in range(5)]


def test_a_perfect_prediction_leaves_nothing_on_demand():
    L, n, bb = 4, 128, 4096
    rng = np.random.default_rng(0)
    own = rng.random((L, 5, n)) < 0.2
    s = Strategy("lookahead", "ripple", "collapse", "linking", distance=2)
    perm = np.stack([rng.permutation(n) for _ in range(L)])
    cache = make_cache("linking", L * n * bb // 10, bb, perm, own)
    tr = plan_lookahead_trace(s, own, own, 2, perm, cache, virtual_offsets(L, n, bb), bb, PHONE, 8)
    # layer 1 goes one layer ahead (as far as it can), 2 and 3 two: only layer 0 reads on demand
    assert (tr.misses[:, 1:] == 0).all() and (tr.misses[:, 0] == tr.active[:, 0] - tr.hits[:, 0]).all()


# ---------------------------------------------------------------- ripple bench io --strategies lookahead

@pytest.fixture(scope="module")
def lookahead_run(random_llama_dir, recorded_llama_profile, tmp_path_factory):
    from ripple.android_host.bench_io import bench_io_cmd
    from ripple.tuning.lookahead import save_lookahead, train_lookahead
    from ripple.tuning.predictor import TrainConfig, save_predictor, train_from_profile
    from ripple.tuning.profile import save_profile
    d = tmp_path_factory.mktemp("lookahead")
    tm, prof = recorded_llama_profile
    save_profile(prof, d / "p.npz")
    cfg = TrainConfig(rank=4, epochs=1, batch=64)
    pred = save_predictor(train_from_profile(prof, tm, cfg), d / "pr.npz")
    save_lookahead(train_lookahead(prof, [1], cfg), d / "la.npz")
    r = bench_io_cmd(model=str(random_llama_dir), profile=str(d / "p.npz"), tokens=4, warmup=2, queue_depth=8,
                     host_profile="pixel8-ufs31", devices=["oneplus12-ufs40"], cache_dir=str(d / "cache"),
                     strategies=["ripple", "lookahead"], sets="predicted", predictor=str(pred),
                     lookahead=str(d / "la.npz"), json_out=str(d / "io.json"), quick_table=True)
    return r, d


def test_bench_io_reports_lookahead_beside_ripple_from_one_timeline(lookahead_run):
    r, d = lookahead_run
    on_disk = json.loads((d / "io.json").read_text())
    assert on_disk["compute_source"].startswith("measured")
    la, rp = on_disk["strategies"]["lookahead"], on_disk["strategies"]["ripple"]
    assert la["lookahead"]["distance"] == 1 and set(la["lookahead"]["modelled_waited_ms_per_distance"]) == {"1"}
    for v in (la, rp):
        for k in ("modelled_waited_ms", "unused_bytes_per_token", "misses_per_token", "max_queue_depth",
                  "mean_queue_depth", "modelled_token_ms"):
            assert k in v
        assert 0 < v["max_queue_depth"] <= 8
    # Without lookahead the timeline's wait is the serial read time the storage model gives.
    assert rp["modelled_waited_ms"] == pytest.approx(rp["modelled_per_token_io_ms"], rel=1e-3, abs=2e-3)
    assert la["misses_per_token"] <= rp["misses_per_token"]
    phone = on_disk["modelled"]["oneplus12-ufs40"]
    assert set(phone["strategies"]) == {"ripple", "lookahead"}
    assert "lookahead_over_ripple_waited" in phone["ratios"]
    assert "lookahead_over_ripple_waited" in on_disk["ratios"]
    assert (d / "io.png").stat().st_size > 0


def test_bench_io_decodes_every_strategy_with_the_same_emulated_compute(lookahead_run):
    r, _ = lookahead_run
    for v in r["strategies"].values():
        assert v["waited_ms"] > 0 and len(v["per_round_waited_ms"]) == 1
    assert len(r["layer_compute_ms"]["pre"]) == r["layers"]
    assert r["ratios"]["lookahead_over_ripple_waited_measured"] == pytest.approx(
        r["strategies"]["lookahead"]["waited_ms"] / r["strategies"]["ripple"]["waited_ms"], rel=2e-3, abs=2e-3)


def test_given_compute_is_pre_and_ffn_or_one_total_split_evenly():
    from types import SimpleNamespace

    from ripple.android_host.bench_io import BenchError, layer_compute
    wl = SimpleNamespace(heldout=np.zeros((3, 1, 1)), meta={}, name="relu-synthetic")
    pre, ffn, src = layer_compute(wl, [0.5, 1.5])
    assert pre.tolist() == [5e-4] * 3 and ffn.tolist() == [1.5e-3] * 3 and src.startswith("given")
    pre, ffn, src = layer_compute(wl, [2.0])
    assert pre.tolist() == ffn.tolist() == [1e-3] * 3 and "split evenly" in src
    with pytest.raises(BenchError, match="--layer-compute-ms"):
        layer_compute(wl, None)


class SlowReader:
    """Stands in for FlashReader: every read() call takes `seconds`."""
    def __init__(self, seconds):
        self.seconds = seconds

    def read(self, extents):
        import time
        time.sleep(self.seconds)


def test_measured_decode_hides_reads_issued_ahead_behind_longer_compute():
    from concurrent.futures import ThreadPoolExecutor

    from ripple.runtime_py.lookahead_timeline import measured_token
    ext = layers(6, L=4, k=2)
    ahead = [LayerReads(EMPTY, ext[0])] + [LayerReads(e, EMPTY) for e in ext[1:]]
    serial = [LayerReads(EMPTY, e) for e in ext]
    with ThreadPoolExecutor(max_workers=1) as io:
        # 40 ms of compute between issue and need: room for a busy host to wake the reader late.
        got = measured_token(io, SlowReader(0.004), ahead, 1, 0.02, 0.02)
        base = measured_token(io, SlowReader(0.004), serial, 0, 0.02, 0.02)
    assert got.layer_waited_s[0] >= 0.003 and (got.layer_waited_s[1:] < 0.002).all(), got
    assert (base.layer_waited_s >= 0.003).all() and base.token_s >= 4 * 0.044


def test_lookahead_without_predicted_sets_is_refused_before_any_work(random_llama_dir, tmp_path):
    from ripple.android_host.bench_io import BenchError, bench_io_cmd
    with pytest.raises(BenchError, match="--sets predicted"):
        bench_io_cmd(model=str(random_llama_dir), strategies=["ripple", "lookahead"], cache_dir=str(tmp_path),
                     host_profile="pixel8-ufs31")
