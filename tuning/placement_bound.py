"""A lower bound on a layer's reads per token that no order of its neurons can beat, not even
an order fitted on the very tokens the bound is computed on.

Summed over tokens, reads = active slots - W(order), W the sum of co-activation counts C(i, j)
(off-diagonal M^T M) over the pairs of adjacent slots, so a bound on reads is a bound on the
heaviest Hamiltonian path. A path is a forest in which every degree is at most 2; lifting the
degree limits with multipliers pi >= 0 gives, for ANY pi (Lagrangian duality),

    W(path) <= L(pi) = 2 sum_i pi_i + max over forests F of sum_{(i,j) in F} (C_ij - pi_i - pi_j),

because sum over the path of (C_ij - pi_i - pi_j) = W - sum_i pi_i deg(i) >= W - 2 sum_i pi_i.
Only edges with positive reduced weight matter, and the best forest is Kruskal's. Its minimum
over pi equals the LP over the forest polytope with degrees <= 2: the degree-2 LP (fractional
2-matching) plus every subtour constraint x(E(S)) <= |S| - 1, which the 2-matching LP lacks
(on groups that always fire together it closes each group into a cycle and counts one pair
too many per group; the forest cannot).

On real masks the forest adds little to the 2-matching LP (SmolLM2 layer 5, held-out:
the LP, solved exactly with HiGHS over all 1.1M pairs, allows 277.740 reads per token; L(pi)
at its dual 277.7405; ours fitted on those tokens needs 279.7), but the degree-2 relaxation it
replaces allowed 78.3: that one lets every neuron pair with the same two hubs.

Computing it: the multipliers are the 2-matching LP's dual, found by coordinate descent on
candidate edges (each neuron's K largest reduced weights C_ij - pi_i - pi_j). Each round ends
with one pass over ALL pairs, in row blocks of the co-activation matrix (bounded memory:
n = 16384 is 1 GiB of int32 counts at once), which re-picks the candidates and certifies
L(pi): the forest is taken over the candidates, and the positive reduced weights of every
other pair are added on top, which only raises the value (a forest splits into its candidate
edges and the rest), so the bound holds whatever pi the search ends at. Not done, because
measured not worth it: Held-Karp subgradient steps on L after the 2-matching dual (0.07%
higher bound on a relu-tiny layer, none on SmolLM2 or relu-synthetic, and they need many
more passes over all pairs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .coactivation import BLOCK_BYTES, PAIR_COUNT_MAX_DENSITY

# Candidate edges per neuron: the multipliers settle on each neuron's 2-3 best reduced weights,
# so 16 leaves room for them to move between passes (measured: 8 and 32 end within 0.01% of it).
CANDIDATES = 16
SWEEPS = 20                 # coordinate-descent sweeps per round (2-matching dual)
MAX_ROUNDS = 12             # passes over all pairs, each certifying a bound
# A round that moves the bound on reads by less than this fraction ends the search (the
# rounds after it gain ~0.01% each: relu-synthetic layer 0, 203.94 -> 203.96 reads in 7 more).
TOLERANCE = 1e-4


@dataclass
class LayerBound:
    reads_per_token: float    # no order needs fewer reads per token on these masks
    weight: float             # certified bound on the co-activations of adjacent slots, summed
    active: int               # active (token, neuron) pairs
    tokens: int
    pi: np.ndarray            # (n,) multipliers of the lowest L(pi) found (the bound, unless the
                              # degree-2 relaxation was lower, which real masks never had)
    rounds: int               # passes over all pairs


# --- co-activation rows, one block at a time ------------------------------------------------

@njit(cache=True, nogil=True, parallel=True)
def _count_rows(r0, r1, tok_ptr, tok_idx, neu_ptr, neu_tok, out):
    """Rows r0..r1 of C by counting, for each token on which neuron a fires, every neuron
    active on it: sum_t |A_t|^2 increments instead of n^2 T multiply-adds (sparse masks)."""
    for i in prange(r1 - r0):
        a = r0 + i
        row = out[i]
        row[:] = 0
        for x in range(neu_ptr[a], neu_ptr[a + 1]):
            t = neu_tok[x]
            for y in range(tok_ptr[t], tok_ptr[t + 1]):
                row[tok_idx[y]] += 1


class _Rows:
    """Blocks of rows of C (int32, diagonal included) under a memory budget; recounted on
    every pass unless one block holds them all."""

    def __init__(self, masks: np.ndarray, block_bytes: int):
        T, n = masks.shape
        self.n = n
        self.step = max(1, block_bytes // (4 * n))
        self.sparse = float(masks.mean()) < PAIR_COUNT_MAX_DENSITY
        self.whole = None
        if self.sparse:
            tok, neu = np.nonzero(masks)                       # token-major, neurons ascending
            self.tok_ptr = np.zeros(T + 1, np.int64)
            np.cumsum(np.bincount(tok, minlength=T), out=self.tok_ptr[1:])
            self.tok_idx = neu.astype(np.int64)
            self.neu_ptr = np.zeros(n + 1, np.int64)
            np.cumsum(np.bincount(neu, minlength=n), out=self.neu_ptr[1:])
            self.neu_tok = tok[np.argsort(neu, kind="stable")].astype(np.int64)
        else:
            self.f = np.ascontiguousarray(masks, dtype=np.float32)

    def __iter__(self):
        if self.step >= self.n:      # all rows in one block: counted once for every pass
            if self.whole is None:
                self.whole = next(self._blocks())[1].copy()
            yield 0, self.whole
        else:
            yield from self._blocks()

    def _blocks(self):
        buf = np.empty((min(self.step, self.n), self.n), np.int32) if self.sparse else None
        for r0 in range(0, self.n, self.step):
            r1 = min(self.n, r0 + self.step)
            if self.sparse:
                _count_rows(r0, r1, self.tok_ptr, self.tok_idx, self.neu_ptr, self.neu_tok, buf)
                yield r0, buf[:r1 - r0]
            else:                     # float32 sums of 0/1: exact below 2^24 tokens
                yield r0, (self.f[:, r0:r1].T @ self.f).astype(np.int32)


@njit(cache=True, nogil=True, parallel=True)
def _scan_block(block, r0, pi, nbr, cnt, overflow):
    """For each row a: its K largest reduced weights C_ab - pi_a - pi_b (b != a) as candidates
    (nbr, cnt = C_ab), and the sum of the positive reduced weights of its other pairs
    (overflow), added term by term rather than as a total minus the candidates', so that
    rounding cannot lower it."""
    rows, n = block.shape
    k = nbr.shape[1]
    chunks = min(rows, 64)
    for ch in prange(chunks):
        taken = np.zeros(n, np.bool_)
        best = np.empty(k)
        idx = np.empty(k, np.int64)
        for i in range(ch * rows // chunks, (ch + 1) * rows // chunks):
            a = r0 + i
            row = block[i]
            best[:] = -np.inf
            idx[:] = -1
            positive = 0
            for b in range(n):
                if b == a:
                    continue
                r = row[b] - pi[a] - pi[b]
                if r > 0:
                    positive += 1
                if r > best[k - 1]:
                    q = k - 1
                    while q > 0 and best[q - 1] < r:
                        best[q] = best[q - 1]
                        idx[q] = idx[q - 1]
                        q -= 1
                    best[q] = r
                    idx[q] = b
            for q in range(k):
                nbr[a, q] = idx[q]
                cnt[a, q] = row[idx[q]]
            rest = 0.0
            if positive > k:            # else every positive pair is a candidate
                for q in range(k):
                    taken[idx[q]] = True
                for b in range(n):
                    if b != a and not taken[b]:
                        r = row[b] - pi[a] - pi[b]
                        if r > 0:
                            rest += r
                for q in range(k):
                    taken[idx[q]] = False
            overflow[a] = rest


# --- the bound on candidate edges -----------------------------------------------------------

@njit(cache=True, nogil=True)
def _find(parent, x):
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        parent[x], x = root, parent[x]
    return root


@njit(cache=True, nogil=True)
def _forest(eu, ev, ec, pi, deg):
    """Kruskal's heaviest forest of the positive reduced weights ec - pi_u - pi_v; its weight,
    and each neuron's degree in it (deg)."""
    n = len(pi)
    w = ec - pi[eu] - pi[ev]
    order = np.argsort(-w)
    parent = np.arange(n)
    deg[:] = 0
    total = 0.0
    for e in order:
        if w[e] <= 0:
            break
        u, v = eu[e], ev[e]
        ru, rv = _find(parent, u), _find(parent, v)
        if ru != rv:
            parent[ru] = rv
            total += w[e]
            deg[u] += 1
            deg[v] += 1
    return total


@njit(cache=True, nogil=True)
def _sweeps(nbr, cnt, y, sweeps):
    """Coordinate descent on the 2-matching dual 2 sum y + sum_e max(0, C_e - y_i - y_j) over
    the candidate edges: in y_i alone it is flat between the 3rd and 2nd largest C_ij - y_j
    and rises outside; the middle of that interval converges where its lower end stalls
    (SmolLM2 layer: 0.1% higher bound at the lower end after 200 sweeps)."""
    n, k = nbr.shape
    for _ in range(sweeps):
        for i in range(n):
            v1 = v2 = v3 = 0.0
            for q in range(k):
                r = cnt[i, q] - y[nbr[i, q]]
                if r > v3:
                    if r > v2:
                        v3 = v2
                        if r > v1:
                            v2, v1 = v1, r
                        else:
                            v2 = r
                    else:
                        v3 = r
            y[i] = 0.5 * (v2 + v3)


def _edges(nbr: np.ndarray, cnt: np.ndarray):
    n, k = nbr.shape
    a = np.repeat(np.arange(n, dtype=np.int64), k)
    b = nbr.ravel().astype(np.int64)
    c = cnt.ravel().astype(np.float64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key, first = np.unique(lo * n + hi, return_index=True)
    return key // n, key % n, c[first]


def _certify(rows: _Rows, pi: np.ndarray, k: int):
    """L(pi) over all pairs, and each neuron's k candidate neighbours with their counts."""
    n = rows.n
    nbr = np.empty((n, k), np.int64)
    cnt = np.empty((n, k), np.int64)
    overflow = np.empty(n)
    for r0, block in rows:
        _scan_block(block, r0, pi, nbr, cnt, overflow)
    eu, ev, ec = _edges(nbr, cnt)
    forest = _forest(eu, ev, ec, pi, np.zeros(n, np.int64))
    # A pair outside the candidates is in the overflow of both its rows (or of one, if it is
    # the other row's candidate): half the sum is at least the pairs' positive weights.
    return 2 * float(pi.sum()) + forest + 0.5 * float(overflow.sum()), nbr, cnt


def _check(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != np.bool_ or masks.shape[0] < 1 or masks.shape[1] < 2:
        raise ValueError(f"masks must be a (tokens >= 1, neurons >= 2) bool array, got {masks.dtype} {masks.shape}")
    return masks


# --- public ---------------------------------------------------------------------------------

def lagrangian_bound(masks: np.ndarray, pi: np.ndarray, k: int = CANDIDATES,
                     block_bytes: int = BLOCK_BYTES) -> float:
    """L(pi) of these masks, one block of rows of C at a time: for any pi >= 0, no order's
    co-activations of adjacent slots, summed over tokens, exceed it. Exact with k >= n - 1;
    with fewer candidates per neuron it can only be higher."""
    masks = _check(masks)
    n = masks.shape[1]
    pi = np.ascontiguousarray(pi, dtype=np.float64)
    if pi.shape != (n,) or not np.all(pi >= 0):
        raise ValueError(f"multipliers must be ({n},) and >= 0")
    return _certify(_Rows(masks, block_bytes), pi, max(1, min(k, n - 1)))[0]


def layer_bound(masks: np.ndarray, k: int = CANDIDATES, sweeps: int = SWEEPS,
                max_rounds: int = MAX_ROUNDS, block_bytes: int = BLOCK_BYTES) -> LayerBound:
    """The lowest bound on the path weight among: L(0) (the heaviest forest; exact when groups
    of neurons fire together and never with each other), the degree-2 relaxation (each
    neuron's two largest counts, halved; read off the pass at pi = 0, so never looser than it
    was), and L at the 2-matching dual, refined round by round on the candidates of the last
    pass until a round moves the bound by less than TOLERANCE."""
    masks = _check(masks)
    T, n = masks.shape
    k = max(1, min(k, n - 1))
    active = int(masks.sum(dtype=np.int64))
    rows = _Rows(masks, block_bytes)
    pi = np.zeros(n)
    best, nbr, cnt = _certify(rows, pi, k)
    if k >= min(2, n - 1):
        best = min(best, 0.5 * float(cnt[:, :2].sum()))
    best_pi, rounds, last = pi, 1, -np.inf
    while rounds < max_rounds:
        pi = pi.copy()
        _sweeps(nbr, cnt, pi, sweeps)
        val, nbr, cnt = _certify(rows, pi, k)
        rounds += 1
        if val < best:
            best, best_pi = val, pi
        reads = (active - val) / T
        if abs(reads - last) < TOLERANCE * abs(reads):
            break
        last = reads
    # A path's weight is an integer: a bound of 341.7 allows 341 at most. The margin is far
    # above float64 rounding in sums of n^2 terms (n * 2^-53 relative).
    weight = float(np.floor(best * (1 + 1e-9) + 1e-9))
    return LayerBound((active - weight) / T, weight, active, T, best_pi, rounds)


def runs_lower_bound(masks: np.ndarray) -> float:
    """Mean reads per token of these masks that no order of the neurons can beat, not even one
    fitted on these very tokens: active slots minus a bound on the heaviest Hamiltonian path
    of the co-activation counts (Lagrangian over forests with degree <= 2; module docstring)."""
    return layer_bound(masks).reads_per_token
