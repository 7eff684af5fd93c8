"""Co-activation statistics of one layer: how often each neuron fires, how often pairs fire
together, and for each neuron its K nearest neighbours under a pair distance.

Two pair distances, both read off the co-activation count C(i,j) over T calibration tokens
and the activation counts c_i:
- `joint`:    1 - C(i,j)/T, Ripple's distance (arXiv 2410.19274, offline stage): the
              co-activation probability P(i,j) turned into a length;
- `mismatch`: c_i + c_j - 2 C(i,j), the tokens on which exactly one of the two fires. A token
              starts or ends a read at slot boundary (i,j) exactly when one of i, j fires and the
              other does not, so the sum of mismatches along a placement is twice its reads
              (plus the two path ends). It is a metric (Hamming distance of the mask columns).

Counts are built one block of rows at a time so that memory stays bounded: for n = 16384
(OPT-6.7B) a dense int32 n x n matrix is 1 GiB, far above a phone-sized budget; the
neighbour lists are n x K. Dense layers (SwiGLU at 25-50% active) count with a float32
matrix product; sparse ones (ReLU at a few % active) count the active pairs of every token,
which costs sum_t |A_t|^2 instead of n^2 T (30x less at 3% active).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

DISTANCES = ("joint", "mismatch")
# A dense n x n co-activation matrix is kept only below this many bytes (int32 entries).
DENSE_BUDGET_BYTES = 64 << 20   # SearchConfig.dense_budget_bytes repeats it
# Rows of counts held at once while selecting neighbours.
BLOCK_BYTES = 32 << 20
# Counting active pairs one by one beats a BLAS product below about this density (measured
# on this 2-core host: pair counting ~1 ns per pair, sgemm ~0.03 ns per multiply-add).
PAIR_COUNT_MAX_DENSITY = 0.15


def check_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != np.bool_ or masks.shape[1] < 2:
        raise ValueError(f"masks must be a (tokens, neurons >= 2) bool array, got {masks.dtype} {masks.shape}")
    return masks


@dataclass
class Coactivation:
    n_tokens: int
    counts: np.ndarray            # (n,) int64: tokens on which neuron i fires
    distance: str                 # "joint" | "mismatch"
    neighbours: np.ndarray        # (n, k) int32: nearest first, never i itself
    pair_counts: np.ndarray       # (n, k) int32: C(i, neighbours[i, j])
    dense: np.ndarray | None      # (n, n) int32 C, when it fits DENSE_BUDGET_BYTES

    @property
    def n(self) -> int:
        return len(self.counts)

    def int_distance(self, i: np.ndarray, j: np.ndarray, co: np.ndarray) -> np.ndarray:
        return int_distance(self.distance, self.counts[i], self.counts[j], co)


def int_distance(distance: str, ci: np.ndarray, cj: np.ndarray, co: np.ndarray) -> np.ndarray:
    """An integer that orders pairs as their distance does (int64): `joint` -C(i,j), which
    is T (1 - P(i,j)) - T; `mismatch` c_i + c_j - 2 C(i,j)."""
    co = np.asarray(co, dtype=np.int64)
    if distance == "joint":
        return -co
    if distance == "mismatch":
        return np.asarray(ci, np.int64) + np.asarray(cj, np.int64) - 2 * co
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")


@njit(cache=True, nogil=True, inline="always")
def _select_row(row, a, counts, k, mismatch_key, nbr, pc):
    """The k nearest neighbours of neuron a given its co-activation row, in one pass: an
    int64 key distance * n + id (ties by id, whatever order rows come in) kept in a sorted
    array of k, which after the first few hundred entries is rarely touched."""
    n = len(row)
    best = np.full(k, np.iinfo(np.int64).max, np.int64)
    for b in range(n):
        if b == a:
            continue
        if mismatch_key:
            key = (counts[a] + counts[b] - 2 * np.int64(row[b])) * n + b
        else:
            key = -np.int64(row[b]) * n + b
        if key < best[k - 1]:
            q = k - 1
            while q > 0 and best[q - 1] > key:
                best[q] = best[q - 1]
                q -= 1
            best[q] = key
    for q in range(k):
        b = best[q] % n
        nbr[a, q] = b
        pc[a, q] = row[b]


@njit(cache=True, nogil=True, parallel=True)
def _pair_rows(tok_ptr, tok_idx, neu_ptr, neu_tok, counts, k, mismatch_keys, nbr, pc, dense):
    """Row a of C by counting, for each token on which a fires, every neuron active on that
    token: sum_t |A_t|^2 increments in all, 30x fewer than n^2 T multiply-adds at 3% active.
    One count serves every distance asked for (nbr, pc: (distances, n, k))."""
    n = len(counts)
    chunks = 64
    for ch in prange(chunks):
        row = np.zeros(n, np.int32)
        for a in range(ch * n // chunks, (ch + 1) * n // chunks):
            row[:] = 0
            for x in range(neu_ptr[a], neu_ptr[a + 1]):
                t = neu_tok[x]
                for y in range(tok_ptr[t], tok_ptr[t + 1]):
                    row[tok_idx[y]] += 1
            for d in range(len(mismatch_keys)):
                _select_row(row, a, counts, k, mismatch_keys[d], nbr[d], pc[d])
            if dense.shape[0] == n:
                dense[a] = row


@njit(cache=True, nogil=True, parallel=True)
def _block_rows(block, r0, counts, k, mismatch_keys, nbr, pc):
    for i in prange(block.shape[0]):
        for d in range(len(mismatch_keys)):
            _select_row(block[i], r0 + i, counts, k, mismatch_keys[d], nbr[d], pc[d])


def coactivation(masks: np.ndarray, k: int = 32, distance: str = "joint",
                 dense_budget_bytes: int = DENSE_BUDGET_BYTES,
                 block_bytes: int = BLOCK_BYTES) -> Coactivation:
    """Statistics of one layer from its (tokens, n) bool masks."""
    return coactivations(masks, k, (distance,), dense_budget_bytes, block_bytes)[0]


def coactivations(masks: np.ndarray, k: int, distances: tuple[str, ...],
                  dense_budget_bytes: int = DENSE_BUDGET_BYTES,
                  block_bytes: int = BLOCK_BYTES) -> list[Coactivation]:
    """Statistics under several distances from one count of the co-activations."""
    masks = check_masks(masks)
    for distance in distances:
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    T, n = masks.shape
    k = max(1, min(k, n - 1))
    counts = masks.sum(axis=0, dtype=np.int64)
    keep_dense = n * n * 4 <= dense_budget_bytes
    dense = np.empty((n, n) if keep_dense else (0, 0), np.int32)
    keys = np.array([d == "mismatch" for d in distances])
    nbr = np.empty((len(distances), n, k), np.int32)
    pc = np.empty((len(distances), n, k), np.int32)
    if float(masks.mean()) < PAIR_COUNT_MAX_DENSITY:
        tok, neu = np.nonzero(masks)                       # token-major, neurons ascending
        tok_ptr = np.zeros(T + 1, np.int64)
        np.cumsum(np.bincount(tok, minlength=T), out=tok_ptr[1:])
        by_neuron = np.argsort(neu, kind="stable")
        neu_ptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(neu, minlength=n), out=neu_ptr[1:])
        _pair_rows(tok_ptr, neu.astype(np.int64), neu_ptr, tok[by_neuron].astype(np.int64),
                   counts, k, keys, nbr, pc, dense)
    else:
        f = np.ascontiguousarray(masks, dtype=np.float32)
        step = max(1, block_bytes // (n * 4))
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            block = (f[:, r0:r1].T @ f).astype(np.int32)  # float32 sums of 0/1: exact below 2^24
            if keep_dense:
                dense[r0:r1] = block
            _block_rows(block, r0, counts, k, keys, nbr, pc)
    return [Coactivation(T, counts, d, nbr[i], pc[i], dense if keep_dense else None)
            for i, d in enumerate(distances)]


def bit_columns(masks: np.ndarray) -> np.ndarray:
    """(n, W) uint64: neuron i's activations over the tokens, 64 tokens a word, so that the
    mismatch distance of a pair is a popcount of an XOR of W words."""
    masks = check_masks(masks)
    T, n = masks.shape
    packed = np.packbits(masks.T, axis=1)                   # (n, ceil(T/8))
    W = -(-packed.shape[1] // 8)
    out = np.zeros((n, W * 8), np.uint8)
    out[:, :packed.shape[1]] = packed
    return out.view(np.uint64)


@njit(cache=True, inline="always")
def _popcount64(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(cache=True, inline="always")
def mismatch(cols, a, b):
    """Tokens on which exactly one of neurons a, b fires (cols from bit_columns)."""
    s = 0
    for w in range(cols.shape[1]):
        s += _popcount64(cols[a, w] ^ cols[b, w])
    return np.int64(s)
