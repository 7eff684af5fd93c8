"""A short Hamiltonian path through a layer's neurons by the greedy edge heuristic.

Ripple (arXiv 2410.19274, offline stage) takes edges by increasing distance and keeps an
edge when both ends still have degree < 2 and it closes no cycle (union-find); the kept
edges form path fragments, which are then joined end to end. Over all n^2/2 edges that
ends in one path; for n = 11008 (Llama-2-7B) that is 60M edges per layer, so wide layers
take their candidate edges from each neuron's K nearest neighbours instead, and the
fragments left are joined by running the same greedy over the fragments' end points
(their own K nearest neighbours among each other), round after round, until one remains.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .coactivation import Coactivation, coactivation

# All n(n-1)/2 edges up to this many (n = 1536: 1.2M); beyond, K-nearest candidate edges.
ALL_PAIRS_MAX = 2_000_000


@njit(cache=True, nogil=True)
def _find(parent, x):
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:          # path compression
        parent[x], x = root, parent[x]
    return root


@njit(cache=True, nogil=True)
def _take_edges(eu, ev, adj, parent):
    """Keep edges in the given order under degree <= 2 and no cycle; returns edges kept."""
    kept = 0
    for e in range(len(eu)):
        u, v = eu[e], ev[e]
        if adj[u, 1] >= 0 or adj[v, 1] >= 0:      # degree 2 already
            continue
        ru, rv = _find(parent, u), _find(parent, v)
        if ru == rv:
            continue
        parent[ru] = rv
        adj[u, 0 if adj[u, 0] < 0 else 1] = v
        adj[v, 0 if adj[v, 0] < 0 else 1] = u
        kept += 1
    return kept


@njit(cache=True, nogil=True)
def _walk(adj, start):
    n = adj.shape[0]
    order = np.empty(n, np.int64)
    prev, cur = -1, start
    for i in range(n):
        order[i] = cur
        nxt = adj[cur, 0] if adj[cur, 0] != prev else adj[cur, 1]
        prev, cur = cur, nxt
        if cur < 0:
            return order[:i + 1]
    return order


def greedy_edges(n: int, eu: np.ndarray, ev: np.ndarray, adj: np.ndarray | None = None,
                 parent: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Run the greedy over edges (eu[e], ev[e]) already sorted by increasing distance.
    Returns adj (n, 2) (-1 where a degree is free), the union-find parents, and edges kept;
    pass adj and parent back in to continue from that state."""
    if adj is None:
        adj = np.full((n, 2), -1, np.int64)
    if parent is None:
        parent = np.arange(n, dtype=np.int64)
    kept = _take_edges(np.asarray(eu, np.int64), np.asarray(ev, np.int64), adj, parent)
    return adj, parent, kept


def sorted_edges(u: np.ndarray, v: np.ndarray, dist: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges (u < v) without duplicates, by increasing integer distance, ties by
    (u, v) so that the result does not depend on the sort's whims: one key
    distance * n^2 + u * n + v, sorted, then duplicates dropped."""
    u, v = np.asarray(u, np.int64), np.asarray(v, np.int64)
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    keep = lo != hi
    key = np.sort(np.asarray(dist, np.int64)[keep] * (n * n) + lo[keep] * n + hi[keep])
    key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    pair = key % (n * n)
    return pair // n, pair % n


def candidate_edges(stats: Coactivation, max_pairs: int = ALL_PAIRS_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Every pair when the dense counts are at hand and there are at most max_pairs of them
    (Ripple as published), else each neuron's K nearest neighbours; by increasing distance."""
    n = stats.n
    if stats.dense is not None and n * (n - 1) // 2 <= max_pairs:
        u, v = np.triu_indices(n, 1)
        co = stats.dense[u, v]
    else:
        u = np.repeat(np.arange(n), stats.neighbours.shape[1])
        v = stats.neighbours.ravel()
        co = stats.pair_counts.ravel()
    return sorted_edges(u, v, stats.int_distance(u, v, co), n)


def fragment_ends(adj: np.ndarray) -> np.ndarray:
    """Nodes with a free degree: the two ends of each fragment (a lone node is both)."""
    return np.flatnonzero(adj[:, 1] < 0)


def greedy_path(masks: np.ndarray, stats: Coactivation) -> np.ndarray:
    """Neuron order (n,) of one layer: greedy edges, then fragments joined by their ends."""
    n = stats.n
    eu, ev = candidate_edges(stats)
    adj, parent, kept = greedy_edges(n, eu, ev)
    k = stats.neighbours.shape[1]
    while kept < n - 1:
        ends = fragment_ends(adj)
        # With k >= 2 every end has a candidate outside its own fragment (a fragment has
        # two ends), so each round keeps at least one edge and the loop ends.
        m = len(ends)
        # Among few ends, all their pairs: exactly the edges Ripple's full greedy would still
        # consider (only ends have a free degree); among many, their K nearest.
        budget = m * m * 4 if m * (m - 1) // 2 <= ALL_PAIRS_MAX else 0
        sub = coactivation(masks[:, ends], max(2, k), stats.distance, dense_budget_bytes=budget)
        su, sv = candidate_edges(sub)
        adj, parent, more = greedy_edges(n, ends[su], ends[sv], adj, parent)
        if more == 0:
            raise AssertionError("greedy join made no progress")   # a bug, not bad input
        kept += more
    start = int(fragment_ends(adj)[0])
    order = _walk(adj, start)
    assert len(order) == n
    return order
