"""Neuron placement: co-activation statistics, the greedy Hamiltonian path, local search,
the strategies, and the `ripple place` -> `ripple pack --placement` round trip."""
import itertools
import json

import numpy as np
import pytest

from ripple.android_host.cli import main
from ripple.tuning.coactivation import coactivation, int_distance
from ripple.tuning.greedy_path import greedy_edges, greedy_path, sorted_edges
from ripple.tuning.local_search import improve
from ripple.tuning.placement import (STRATEGIES, SearchConfig, place, runs_lower_bound,
                                     runs_per_token, save_placement)
from ripple.tuning.synthetic import SyntheticSpec, relu_layer

# Dense counts over all pairs (Ripple as published) and K-nearest candidates with fragment
# joins (wide layers), the latter with few neighbours so that joining takes several rounds.
CONFIGS = {"all-pairs": SearchConfig(), "k-nearest": SearchConfig(k=4, dense_budget_bytes=0)}


def planted(groups=12, size=16, tokens=400, per_token=2, seed=0):
    """Masks in which whole groups fire together, ids shuffled; returns masks and group of
    each neuron. Groups are equally popular, so no two co-fire nearly as often as either
    fires: then keeping every group in one piece is what fewest reads means (with a rare
    group and two groups that often fire together, splitting the rare one across the two
    ends of the region and joining the other two costs fewer reads)."""
    rng = np.random.default_rng(seed)
    n = groups * size
    group_of = rng.permutation(np.repeat(np.arange(groups), size))
    masks = np.zeros((tokens, n), bool)
    for t in range(tokens):
        on = rng.choice(groups, per_token, replace=False)
        masks[t] = np.isin(group_of, on)
    return masks, group_of


def random_masks(tokens, n, density, seed=0):
    return np.random.default_rng(seed).random((tokens, n)) < density


# --- co-activation statistics ------------------------------------------------------------

@pytest.mark.parametrize("density", [0.03, 0.4], ids=["pair-counting", "matrix-product"])
@pytest.mark.parametrize("distance", ["joint", "mismatch"])
def test_neighbour_lists_are_the_k_nearest_by_brute_force(density, distance):
    m = random_masks(300, 500, density)
    st = coactivation(m, 7, distance, dense_budget_bytes=0)
    f = m.astype(np.int64)
    C, c = f.T @ f, f.sum(0)
    key = int_distance(distance, c[:, None], c[None, :], C) * 500 + np.arange(500)
    np.fill_diagonal(key, np.iinfo(np.int64).max)
    want = np.argsort(key, axis=1)[:, :7]
    np.testing.assert_array_equal(st.neighbours, want)
    np.testing.assert_array_equal(st.pair_counts, np.take_along_axis(C, want, 1))
    assert st.dense is None


def test_dense_counts_kept_only_within_the_budget():
    m = random_masks(200, 300, 0.1)
    f = m.astype(np.int64)
    np.testing.assert_array_equal(coactivation(m, 4, dense_budget_bytes=300 * 300 * 4).dense, f.T @ f)
    assert coactivation(m, 4, dense_budget_bytes=300 * 300 * 4 - 1).dense is None


# --- greedy edge heuristic -----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_greedy_edges_never_give_degree_above_two_nor_a_cycle(seed):
    rng = np.random.default_rng(seed)
    n = 60
    u, v = rng.integers(0, n, 900), rng.integers(0, n, 900)
    eu, ev = sorted_edges(u, v, rng.integers(0, 50, 900), n)
    adj, _, kept = greedy_edges(n, eu, ev)
    degree = (adj >= 0).sum(axis=1)
    assert degree.max() <= 2
    assert degree.sum() == 2 * kept
    # A forest of paths: walking from every free end covers each kept edge once, no cycle.
    seen = np.zeros(n, bool)
    edges_walked = 0
    for start in np.flatnonzero(degree < 2):
        if seen[start]:
            continue
        prev, cur = -1, start
        while cur >= 0 and not seen[cur]:
            seen[cur] = True
            nxt = next((x for x in adj[cur] if x >= 0 and x != prev), -1)
            edges_walked += nxt >= 0
            prev, cur = cur, nxt
    assert seen.all(), "a node with degree 2 everywhere around it means a cycle"
    assert edges_walked == kept


def test_greedy_takes_edges_by_increasing_distance():
    # Star around node 0: only its two nearest partners fit under degree <= 2.
    eu, ev = sorted_edges(np.zeros(4, np.int64), np.arange(1, 5), np.array([5, 1, 3, 2]), 5)
    adj, _, _ = greedy_edges(5, eu, ev)
    assert set(adj[0].tolist()) == {2, 4}


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
def test_greedy_path_visits_every_neuron_once(config):
    m = random_masks(200, 150, 0.2)
    st = coactivation(m, CONFIGS[config].k, "joint", CONFIGS[config].dense_budget_bytes)
    order = greedy_path(m, st)
    assert sorted(order.tolist()) == list(range(150))


# --- local search --------------------------------------------------------------------------

def test_local_search_saves_exactly_the_calibration_reads_it_reports():
    from ripple.tuning.coactivation import bit_columns

    m = random_masks(257, 300, 0.3, seed=3)     # 257 tokens: a partly filled last word
    st = coactivation(m, 16, "mismatch")
    start = np.random.default_rng(0).permutation(300)
    better, saved = improve(start, bit_columns(m), st.neighbours)
    assert sorted(better.tolist()) == list(range(300))
    assert saved > 0
    assert runs_per_token(m, start).sum() - runs_per_token(m, better).sum() == saved


def test_calibration_reads_from_bit_columns_match_the_masks():
    from ripple.tuning.coactivation import bit_columns
    from ripple.tuning.local_search import calib_runs

    m = random_masks(130, 90, 0.35, seed=4)
    order = np.random.default_rng(1).permutation(90)
    assert calib_runs(bit_columns(m), order) == runs_per_token(m, order).sum()


# --- strategies -------------------------------------------------------------------------------

def test_runs_are_maximal_stretches_of_active_slots():
    masks = np.array([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 1]], bool)
    assert runs_per_token(masks, np.arange(6)).tolist() == [2, 0, 3]
    assert runs_per_token(masks, np.array([0, 1, 3, 2, 4, 5])).tolist() == [1, 0, 2]


@pytest.mark.parametrize("density", [0.03, 0.4])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_returns_a_permutation(strategy, density):
    m = random_masks(128, 200, density, seed=1)
    perm = STRATEGIES[strategy](m, SearchConfig())
    assert perm.shape == (200,)
    assert sorted(perm.tolist()) == list(range(200))


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("strategy", ["ripple", "ours"])
def test_planted_groups_come_out_contiguous(strategy, config):
    masks, group_of = planted()
    perm = STRATEGIES[strategy](masks, CONFIGS[config])
    slots_of_group = [np.flatnonzero(group_of[perm] == g) for g in range(group_of.max() + 1)]
    for slots in slots_of_group:
        assert slots.max() - slots.min() + 1 == len(slots)


@pytest.mark.parametrize("density", [0.03, 0.4])
def test_no_order_needs_fewer_reads_than_the_lower_bound(density):
    m = random_masks(96, 7, density, seed=3)
    perms = itertools.permutations(range(7))    # every order of 7 neurons
    best = min(runs_per_token(m, np.array(p)).mean() for p in perms)
    bound = runs_lower_bound(m)
    assert bound <= best + 1e-12
    assert bound > 0.5 * best          # and it is not vacuous


def test_lower_bound_is_below_the_search_fitted_on_the_same_tokens():
    masks, _ = planted(tokens=200)
    ours = runs_per_token(masks, STRATEGIES["ours"](masks, SearchConfig())).mean()
    assert runs_lower_bound(masks) <= ours


def test_place_rejects_an_unknown_strategy():
    from ripple.tuning.placement import PlacementError

    with pytest.raises(PlacementError, match="unknown placement strategy"):
        place([random_masks(8, 8, 0.5)], "nearest")


# --- synthetic ReLU workload ---------------------------------------------------------------

def test_synthetic_masks_are_sparse_and_heldout_is_other_text():
    spec = SyntheticSpec(n=2048, n_layers=1)
    calib, held = relu_layer(spec, 0, 512, 256)
    assert calib.shape == (512, 2048) and held.shape == (256, 2048)
    assert 0.5 * spec.density < calib.mean() < 1.5 * spec.density
    again, _ = relu_layer(spec, 0, 512, 256)
    np.testing.assert_array_equal(calib, again)                 # a seed fixes the workload
    assert not np.array_equal(calib[:256], held)


def test_planted_order_is_a_permutation_with_fewer_reads_than_checkpoint_order():
    from ripple.tuning.synthetic import planted_order

    spec = SyntheticSpec(n=2048, n_layers=1)
    _, held = relu_layer(spec, 0, 64, 256)
    order = planted_order(spec, 0)
    assert sorted(order.tolist()) == list(range(2048))
    assert runs_per_token(held, order).sum() < runs_per_token(held, np.arange(2048)).sum()


# --- ripple place -> ripple pack --placement ---------------------------------------------------

@pytest.fixture(scope="module")
def opt_profile(random_opt_dir, tmp_path_factory):
    from ripple.tuning.checkpoint import load_model
    from ripple.tuning.forward import to_torch
    from ripple.tuning.profile import run_profile, save_profile

    tm = to_torch(load_model(random_opt_dir))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 128, 32) for _ in range(6)]
    p = run_profile(tm, seqs[:4], seqs[4:], sparsity=0.5, grid=(0.0, 0.5))
    path = tmp_path_factory.mktemp("profile") / "p.npz"
    save_profile(p, path)
    return path


def test_place_writes_a_placement_that_pack_lays_out_slot_by_slot(random_opt_dir, opt_profile, tmp_path,
                                                                   capsys):
    from ripple.layout import bundle_offset, decode_bundles, open_layout
    from ripple.tuning.checkpoint import load_model

    placement = tmp_path / "placement.npz"
    assert main(["place", "--profile", str(opt_profile), "--strategy", "ours", "--out", str(placement)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["strategy"] == "ours" and summary["layers"] == 2
    with np.load(placement) as z:
        perm = z["perm"]
        assert str(z["strategy"]) == "ours"
    assert not np.array_equal(perm, np.tile(np.arange(256), (2, 1)))

    out = tmp_path / "layout"
    assert main(["pack", "--model", str(random_opt_dir), "--profile", str(opt_profile),
                 "--placement", str(placement), "--out", str(out)]) == 0
    lay = open_layout(out, verify=True)
    np.testing.assert_array_equal(lay.perm, perm)
    desc = load_model(random_opt_dir)
    with open(lay.path, "rb") as f:
        for l, lw in enumerate(desc.layers):
            f.seek(bundle_offset(lay, l, 0))
            raw = np.frombuffer(f.read(256 * lay.bundle_bytes), np.uint8).reshape(256, -1)
            got = decode_bundles(lay.spec, raw)
            want = lambda w: w.astype(np.float16).astype(np.float32)  # noqa: E731
            np.testing.assert_array_equal(got.up, want(lw.w_up[perm[l]]))
            np.testing.assert_array_equal(got.down_t, want(lw.w_down.T[perm[l]]))
            np.testing.assert_array_equal(got.up_bias, want(lw.b_up[perm[l]]))


def test_place_with_a_bad_strategy_exits_2_and_writes_nothing(opt_profile, tmp_path, capsys):
    out = tmp_path / "placement.npz"
    with pytest.raises(SystemExit) as e:
        main(["place", "--profile", str(opt_profile), "--strategy", "nearest", "--out", str(out)])
    assert e.value.code == 2
    assert not out.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_place_with_a_missing_profile_is_one_line(tmp_path, capsys):
    out = tmp_path / "placement.npz"
    assert main(["place", "--profile", str(tmp_path / "none.npz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ripple profile" in err[0]
    assert not out.exists()


def test_saved_placement_is_what_pack_reads(tmp_path):
    from ripple.android_host.interface import load_placement
    from ripple.tuning.placement import Placement

    perm = np.stack([np.random.default_rng(l).permutation(10) for l in range(3)])
    save_placement(tmp_path / "p.npz", Placement("ours", perm, np.zeros(3)))
    got = load_placement(str(tmp_path / "p.npz"), 3, 10)
    np.testing.assert_array_equal(np.stack(got), perm)
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]


# --- the benchmark driver --------------------------------------------------------------------

def test_bench_placement_writes_json_and_png_per_workload(opt_profile, tmp_path):
    out = tmp_path / "placement.json"
    assert main(["bench", "placement", "--json", str(out), "--workloads", "relu-synthetic",
                 "--profile", str(opt_profile), "--synthetic-layers", "2", "--synthetic-neurons", "512",
                 "--calib-tokens", "256", "--heldout-tokens", "128", "--no-timing"]) == 0
    r = json.loads(out.read_text())
    assert set(r["workloads"]) == {"relu-synthetic", "p"}
    assert r["workloads"]["relu-synthetic"]["label"] == "synthetic"
    assert "reference_planted_order" in r["workloads"]["relu-synthetic"]
    assert "reference_planted_order" not in r["workloads"]["p"]
    for w in r["workloads"].values():
        assert set(w["strategies"]) == {"identity", "frequency", "ripple", "ours"}
        for v in w["strategies"].values():
            assert v["reads_per_token"] > 0 and v["mean_run_len"] >= 1 and v["search_s"] >= 0
    assert out.with_suffix(".png").stat().st_size > 0
