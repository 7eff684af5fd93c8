"""The bound on reads per token that no neuron order beats (tuning.placement_bound): below the
best of all n! orders, never looser than the degree-2 relaxation it replaced, exact on groups
that fire together, and the same whether the co-activation rows come in blocks or at once."""
import itertools

import numpy as np
import pytest

from ripple.tuning.placement import runs_lower_bound
from ripple.tuning.placement_bound import lagrangian_bound, layer_bound


def random_masks(tokens, n, density, seed):
    return np.random.default_rng(seed).random((tokens, n)) < density


def co_firing_groups(tokens, sizes, seed, noise=0.05):
    """Groups that fire together, two at a time, plus stray activations; ids shuffled."""
    rng = np.random.default_rng(seed)
    group_of = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    masks = np.zeros((tokens, len(group_of)), bool)
    for t in range(tokens):
        masks[t] = np.isin(group_of, rng.choice(len(sizes), 2, replace=False))
    return masks ^ (rng.random(masks.shape) < noise)


def one_group_per_token(tokens, sizes, seed, idle=0.2):
    """Each token fires one whole group (or none); returns masks and the group of each neuron."""
    rng = np.random.default_rng(seed)
    group_of = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    masks = np.zeros((tokens, len(group_of)), bool)
    for t in range(tokens):
        if rng.random() >= idle:
            masks[t] = group_of == rng.integers(len(sizes))
    return masks, group_of


def best_of_all_orders(masks):
    """Mean reads per token of the best of all n! orders."""
    n = masks.shape[1]
    perms = np.array(list(itertools.permutations(range(n))))
    m = masks[:, perms]                                           # (T, n!, n)
    runs = m[..., 0].astype(np.int64) + (m[..., 1:] & ~m[..., :-1]).sum(axis=-1)
    return runs.mean(axis=0).min()


def counts(masks):
    f = masks.astype(np.int64)
    c = f.T @ f
    np.fill_diagonal(c, 0)
    return c


def degree2_bound(masks):
    """The bound this one replaced: each neuron's two largest co-activation counts, halved."""
    top2 = np.sort(counts(masks), axis=1)[:, -2:].sum()
    return (masks.sum() - top2 / 2) / masks.shape[0]


def lagrangian_by_hand(masks, pi):
    """2 sum pi + Kruskal's heaviest forest of C_ij - pi_i - pi_j over every pair."""
    c, n = counts(masks), masks.shape[1]
    edges = sorted(((c[i, j] - pi[i] - pi[j], i, j) for i in range(n) for j in range(i + 1, n)),
                   reverse=True)
    root = list(range(n))

    def find(x):
        while root[x] != x:
            x = root[x]
        return x

    total = 0.0
    for w, i, j in edges:
        if w <= 0:
            break
        if find(i) != find(j):
            root[find(i)] = find(j)
            total += w
    return 2 * pi.sum() + total


SMALL = {
    "sparse": random_masks(64, 8, 0.1, seed=1),
    "half": random_masks(64, 8, 0.5, seed=2),
    "dense": random_masks(64, 7, 0.8, seed=3),
    "co-firing groups": co_firing_groups(64, [3, 3, 2], seed=4),
    "two groups, noisy": co_firing_groups(48, [4, 4], seed=5, noise=0.15),
}


@pytest.mark.parametrize("case", list(SMALL))
def test_no_order_of_the_neurons_needs_fewer_reads_than_the_bound(case):
    masks = SMALL[case]
    assert runs_lower_bound(masks) <= best_of_all_orders(masks) + 1e-12


@pytest.mark.parametrize("case", list(SMALL))
def test_bound_is_never_looser_than_the_degree_2_relaxation(case):
    masks = SMALL[case]
    assert runs_lower_bound(masks) >= degree2_bound(masks) - 1e-12


@pytest.mark.parametrize("density", [0.03, 0.4])
def test_bound_is_never_looser_than_the_degree_2_relaxation_on_wide_layers(density):
    masks = random_masks(256, 300, density, seed=6)
    assert runs_lower_bound(masks) >= degree2_bound(masks) - 1e-12


@pytest.mark.parametrize("sizes", [[3, 5, 4, 6, 2], [10] * 40], ids=["5 groups", "40 groups, sparse"])
def test_bound_is_the_planted_optimum_when_whole_groups_fire_alone(sizes):
    masks, group_of = one_group_per_token(300, sizes, seed=7)
    groups_active = np.mean([len(np.unique(group_of[row])) for row in masks])
    assert runs_lower_bound(masks) == pytest.approx(groups_active, abs=1e-12)


@pytest.mark.parametrize("density", [0.03, 0.4], ids=["pair-counted rows", "matrix-product rows"])
def test_bound_in_row_blocks_is_the_bound_in_one_piece(density):
    masks = random_masks(200, 240, density, seed=8)
    pi = np.random.default_rng(9).random(240) * masks.sum(axis=0).max() / 2
    one_row = 4 * 240
    assert lagrangian_bound(masks, pi, k=4, block_bytes=one_row * 7) == \
        lagrangian_bound(masks, pi, k=4, block_bytes=1 << 30)
    assert layer_bound(masks, block_bytes=one_row * 7).reads_per_token == \
        layer_bound(masks, block_bytes=1 << 30).reads_per_token


@pytest.mark.parametrize("density", [0.03, 0.4])
def test_lagrangian_bound_with_every_pair_a_candidate_is_exact(density):
    masks = random_masks(150, 40, density, seed=10)
    pi = np.random.default_rng(11).random(40) * masks.sum(axis=0).max() / 3
    assert lagrangian_bound(masks, pi, k=39) == pytest.approx(lagrangian_by_hand(masks, pi), rel=1e-12)


@pytest.mark.parametrize("density", [0.03, 0.4])
def test_fewer_candidates_only_raise_the_lagrangian_bound(density):
    masks = random_masks(150, 40, density, seed=12)
    pi = np.random.default_rng(13).random(40) * masks.sum(axis=0).max() / 3
    exact = lagrangian_by_hand(masks, pi)
    for k in (1, 2, 5):
        assert lagrangian_bound(masks, pi, k=k) >= exact - 1e-9


def test_negative_multipliers_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        lagrangian_bound(random_masks(8, 5, 0.5, seed=0), -np.ones(5))
