"""Local search on a placement for the measure that matters: reads per token.

A token's reads in a layer are the maximal runs of its active slots. Each run has two
boundaries, so with a virtual all-inactive slot closing the order into a cycle,

    2 * runs(token) = number of cycle edges (i, j) where exactly one of i, j fires,

and summed over tokens, 2 * total runs = sum over cycle edges of mismatch(i, j) (the
Hamming distance of the two neurons' mask columns; `coactivation.mismatch`). Minimising
reads is therefore a symmetric TSP under a metric, which 2-opt and Or-opt improve well;
every move changes at most three edges, so its effect on the calibration reads is exact
and costs a few popcounts. Candidate moves come from each neuron's K nearest neighbours
(Johnson & McGeoch's neighbour lists with don't-look bits), which keeps a pass linear in n.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .coactivation import _popcount64, mismatch


@njit(cache=True, inline="always")
def _succ(tour, pos, a):
    i = pos[a] + 1
    return tour[0] if i == len(tour) else tour[i]


@njit(cache=True, inline="always")
def _pred(tour, pos, a):
    i = pos[a] - 1
    return tour[len(tour) - 1] if i < 0 else tour[i]


@njit(cache=True, nogil=True)
def _reverse(tour, pos, i, j):
    """Reverse the cyclic stretch of positions i..j (forward); the shorter side is reversed
    instead when that is cheaper, which is the same undirected cycle."""
    N = len(tour)
    length = (j - i) % N + 1
    if 2 * length > N:
        i, j, length = (j + 1) % N, (i - 1) % N, N - length
    for s in range(length // 2):
        a, b = (i + s) % N, (j - s) % N
        ta, tb = tour[a], tour[b]
        tour[a], tour[b] = tb, ta
        pos[tb], pos[ta] = a, b


@njit(cache=True, nogil=True)
def _in_segment(pos, N, s1_pos, L, x):
    return (pos[x] - s1_pos) % N < L


@njit(cache=True, nogil=True)
def _move_segment(tour, pos, s1_pos, L, x, reverse, buf):
    """Take the L nodes from position s1_pos, put them right after node x (reversed if
    asked); O(N), once per applied move."""
    N = len(tour)
    m = 0
    start = (s1_pos + L) % N
    for t in range(N - L):
        node = tour[(start + t) % N]
        buf[m] = node
        m += 1
        if node == x:
            for q in range(L):
                buf[m] = tour[(s1_pos + (L - 1 - q if reverse else q)) % N]
                m += 1
    for t in range(N):
        tour[t] = buf[t]
        pos[buf[t]] = t


@njit(cache=True, nogil=True)
def _push(queue, inq, head_tail, node):
    if not inq[node]:
        inq[node] = True
        queue[head_tail[1] % len(queue)] = node
        head_tail[1] += 1


@njit(cache=True, nogil=True)
def _two_opt(tour, pos, cols, nbr, a, touched):
    for direction in range(2):
        b = _succ(tour, pos, a) if direction == 0 else _pred(tour, pos, a)
        dab = mismatch(cols, a, b)
        for q in range(nbr.shape[1]):
            c = nbr[a, q]
            dac = mismatch(cols, a, c)
            if dac >= dab:
                break
            d = _succ(tour, pos, c) if direction == 0 else _pred(tour, pos, c)
            if c == b or d == a:
                continue
            gain = dab + mismatch(cols, c, d) - dac - mismatch(cols, b, d)
            if gain > 0:
                if direction == 0:     # a b .. c d  ->  a c .. b d
                    _reverse(tour, pos, pos[b], pos[c])
                else:                  # d c .. b a  ->  d b .. c a
                    _reverse(tour, pos, pos[c], pos[b])
                touched[0], touched[1], touched[2], touched[3] = a, b, c, d
                return gain
    return 0


@njit(cache=True, nogil=True)
def _or_opt(tour, pos, cols, nbr, a, max_len, buf, touched):
    N = len(tour)
    for L in range(1, max_len + 1):
        for side in range(2):      # a first or last in the segment
            s1_pos = pos[a] if side == 0 else (pos[a] - L + 1) % N
            s1, s2 = tour[s1_pos], tour[(s1_pos + L - 1) % N]
            p, nx = _pred(tour, pos, s1), _succ(tour, pos, s2)
            removed = mismatch(cols, p, s1) + mismatch(cols, s2, nx) - mismatch(cols, p, nx)
            if removed <= 0:
                continue
            for end in range(2):
                e = s1 if end == 0 else s2
                other = s2 if end == 0 else s1
                for q in range(nbr.shape[1]):
                    c = nbr[e, q]
                    dec = mismatch(cols, e, c)
                    if dec >= removed:
                        break
                    if _in_segment(pos, N, s1_pos, L, c):
                        continue
                    for where in range(2):      # between c and its successor, or predecessor
                        if where == 0:
                            x, y = c, _succ(tour, pos, c)
                        else:
                            x, y = _pred(tour, pos, c), c
                        if _in_segment(pos, N, s1_pos, L, x) or _in_segment(pos, N, s1_pos, L, y):
                            continue
                        # e attaches to c; the segment runs x first .. last y
                        first, last = (e, other) if where == 0 else (other, e)
                        gain = removed + mismatch(cols, x, y) - mismatch(cols, x, first) \
                            - mismatch(cols, last, y)
                        if gain > 0:
                            _move_segment(tour, pos, s1_pos, L, x, first != s1, buf)
                            touched[0], touched[1], touched[2] = p, nx, s1
                            touched[3], touched[4], touched[5] = s2, x, y
                            return gain
    return 0


@njit(cache=True, nogil=True)
def _search(tour, cols, nbr, max_len, max_moves):
    N = len(tour)
    pos = np.empty(N, np.int64)
    for i in range(N):
        pos[tour[i]] = i
    queue = np.empty(N, np.int64)
    inq = np.zeros(N, np.bool_)
    head_tail = np.zeros(2, np.int64)
    for i in range(N):
        _push(queue, inq, head_tail, tour[i])
    buf = np.empty(N, np.int64)
    touched = np.empty(6, np.int64)
    gained, moves = 0, 0
    while head_tail[0] < head_tail[1] and moves < max_moves:
        a = queue[head_tail[0] % N]
        head_tail[0] += 1
        inq[a] = False
        g = _two_opt(tour, pos, cols, nbr, a, touched)
        k = 4
        if g == 0:
            g = _or_opt(tour, pos, cols, nbr, a, max_len, buf, touched)
            k = 6
        if g > 0:
            gained += g
            moves += 1
            for t in range(k):
                _push(queue, inq, head_tail, touched[t])
            _push(queue, inq, head_tail, a)
    return gained, moves


@njit(cache=True, nogil=True)
def _adjacent_coactivations(cols, order):
    s = 0
    for i in range(len(order) - 1):
        for w in range(cols.shape[1]):
            s += _popcount64(cols[order[i], w] & cols[order[i + 1], w])
    return s


def calib_runs(cols: np.ndarray, order: np.ndarray) -> int:
    """Total reads over the tokens of `cols` (bit_columns) in this order: every active slot
    starts a read unless the slot before it is active too."""
    active = int(np.unpackbits(cols.view(np.uint8)).sum())
    return active - int(_adjacent_coactivations(cols, np.asarray(order, np.int64)))


def improve(order: np.ndarray, cols: np.ndarray, neighbours: np.ndarray, max_segment: int = 3,
            max_moves_per_neuron: int = 50) -> tuple[np.ndarray, int]:
    """Better order by 2-opt and Or-opt (segments up to max_segment) under the mismatch
    distance of `cols` (bit_columns of the calibration masks); candidate partners from
    `neighbours` (n, k), nearest first under that same distance. Returns the order and the
    calibration runs saved (total over tokens)."""
    n = len(order)
    if n < 8:
        return np.asarray(order, np.int64), 0
    # Node n is the virtual slot past both ends: never active, so mismatch(i, n) = c_i.
    ext_cols = np.zeros((n + 1, cols.shape[1]), np.uint64)
    ext_cols[:n] = cols
    counts = np.unpackbits(cols.view(np.uint8), axis=1).sum(axis=1)
    k = neighbours.shape[1]
    ext_nbr = np.empty((n + 1, k), np.int64)
    ext_nbr[:n] = neighbours
    ext_nbr[n] = np.argsort(counts, kind="stable")[:k]
    tour = np.empty(n + 1, np.int64)
    tour[:n] = order
    tour[n] = n
    gained, _ = _search(tour, ext_cols, ext_nbr, max_segment, max_moves_per_neuron * n)
    cut = int(np.flatnonzero(tour == n)[0])
    out = np.concatenate((tour[cut + 1:], tour[:cut]))
    assert gained % 2 == 0
    return out, gained // 2
