"""Neuron placement: per layer, the order of neuron bundles on flash.

A token's reads in a layer are the maximal runs of consecutive slots holding its active
neurons (`runs_per_token`); a placement that keeps co-firing neurons together turns many
short reads into few long ones (Ripple, arXiv 2410.19274). Every strategy has one
signature, (calibration masks (T, n) bool, SearchConfig) -> perm (n,), with perm[s] the
neuron at slot s, and they differ only in policy:

- identity:  checkpoint order (as good as a random order on real models);
- frequency: hottest first (LLM in a Flash's hot/cold split, as one order);
- ripple:    Ripple's offline stage as published: distance 1 - P(i,j), P the joint
             co-activation probability, shortest Hamiltonian path by the greedy edge heuristic;
- ours:      the reads themselves as the objective. Summed over tokens, reads = active slots
             - co-activations of adjacent slots, so Ripple's path length is the right
             objective and its greedy construction is where reads are lost: ours improves
             Ripple's path and a second greedy path (under the mismatch distance, a metric)
             with 2-opt / Or-opt moves whose change in calibration reads is exact, and keeps
             the better of the two.

Strategies fit on calibration masks; reads are measured on held-out masks.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..atomic_file import atomic_write

FORMAT = "ripple-placement-1"


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class SearchConfig:
    k: int = 32               # candidate neighbours per neuron (greedy edges, local search)
    max_segment: int = 3      # Or-opt moves segments of up to this many neurons
    dense_budget_bytes: int = 64 << 20   # keep the n x n counts below this (coactivation)


@dataclass
class Placement:
    strategy: str
    perm: np.ndarray                          # (L, n) int64: perm[l, s] = neuron at slot s
    search_s: np.ndarray                      # (L,) seconds per layer, statistics included
    meta: dict = field(default_factory=dict)


def check_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != np.bool_:
        raise PlacementError(f"masks must be a (tokens, neurons) bool array, got {masks.dtype} {masks.shape}")
    if masks.shape[1] < 2:
        raise PlacementError(f"a layer needs at least 2 neurons to place, got {masks.shape[1]}")
    return masks


def identity(masks: np.ndarray, cfg: SearchConfig) -> np.ndarray:
    return np.arange(check_masks(masks).shape[1], dtype=np.int64)


def frequency(masks: np.ndarray, cfg: SearchConfig) -> np.ndarray:
    counts = check_masks(masks).sum(axis=0, dtype=np.int64)
    return np.argsort(-counts, kind="stable").astype(np.int64)


# The searches import numba-compiled modules when first used, so that importing this module
# (the CLI's error list does) stays cheap.
def ripple(masks: np.ndarray, cfg: SearchConfig) -> np.ndarray:
    from .coactivation import coactivation
    from .greedy_path import greedy_path

    masks = check_masks(masks)
    return greedy_path(masks, coactivation(masks, cfg.k, "joint", cfg.dense_budget_bytes))


def ours(masks: np.ndarray, cfg: SearchConfig) -> np.ndarray:
    """Two greedy paths, Ripple's (1 - P(i,j)) and one under the mismatch distance, each
    improved by 2-opt / Or-opt on the calibration reads; the one with fewer reads wins.
    Neither start wins everywhere (held-out, after the search: on five SmolLM2 layers the
    mismatch start ends 0.4% lower, on a relu-synthetic layer Ripple's ends 1% lower).
    Not done, because measured worse: a separate block of hot neurons (LLM in a Flash) in
    front: 0.6% (> 70% active) to 3% (> 50%) more held-out reads on SmolLM2; the exact
    objective already places them. Iterated local search (double-bridge kicks): 0.8% fewer
    reads on relu-synthetic for 25x the search time."""
    from .coactivation import bit_columns, coactivations
    from .greedy_path import greedy_path
    from .local_search import calib_runs, improve

    masks = check_masks(masks)
    joint, near = coactivations(masks, cfg.k, ("joint", "mismatch"), cfg.dense_budget_bytes)
    cols = bit_columns(masks)
    best, best_runs = None, None
    for stats in (joint, near):
        order, _ = improve(greedy_path(masks, stats), cols, near.neighbours, cfg.max_segment)
        runs = calib_runs(cols, order)
        if best_runs is None or runs < best_runs:
            best, best_runs = order, runs
    return best


STRATEGIES: dict[str, Callable[[np.ndarray, SearchConfig], np.ndarray]] = {
    "identity": identity, "frequency": frequency, "ripple": ripple, "ours": ours}


def strategy_fn(name: str) -> Callable[[np.ndarray, SearchConfig], np.ndarray]:
    if name not in STRATEGIES:
        raise PlacementError(f"unknown placement strategy {name!r}; choose one of "
                             f"{', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def place(layer_masks: Iterable[np.ndarray], strategy: str, cfg: SearchConfig = SearchConfig(),
          progress: bool = True, n_layers: int | None = None) -> Placement:
    """One permutation per layer from each layer's calibration masks (T, n) bool (an
    iterable, so that a caller can unpack one layer at a time; n_layers for the progress bar)."""
    from tqdm import tqdm

    fn = strategy_fn(strategy)
    perms, secs = [], []
    total = n_layers if n_layers is not None else (len(layer_masks) if hasattr(layer_masks, "__len__") else None)
    items = layer_masks if not progress else tqdm(layer_masks, desc=f"place: {strategy}", unit="layer",
                                                  total=total)
    for masks in items:
        t0 = time.perf_counter()
        perm = np.asarray(fn(masks, cfg), np.int64)
        secs.append(time.perf_counter() - t0)
        check_perm(perm, masks.shape[1])
        perms.append(perm)
    if not perms:
        raise PlacementError("no layers to place")
    return Placement(strategy, np.stack(perms), np.array(secs), {"k": cfg.k, "max_segment": cfg.max_segment})


def check_perm(perm: np.ndarray, n: int) -> None:
    if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
        raise AssertionError(f"strategy returned no permutation of range({n})")   # a bug


def runs_per_token(masks: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """(T,) reads each token needs in this layer: maximal runs of active slots."""
    m = np.asarray(masks)[:, perm]
    return m[:, 0].astype(np.int64) + (m[:, 1:] & ~m[:, :-1]).sum(axis=1, dtype=np.int64)


def runs_lower_bound(masks: np.ndarray) -> float:
    """Mean reads per token of these masks that no order of the neurons can beat, not even
    one fitted on these very tokens. Summed over tokens, reads = active slots - C summed over
    adjacent pairs, and a Hamiltonian path is a forest with degrees <= 2: the bound is active
    slots minus a Lagrangian bound on the heaviest such forest (multipliers: the dual of the
    degree-2 LP), certified over all pairs (`placement_bound`)."""
    from .placement_bound import runs_lower_bound as bound    # numba, imported when used

    return bound(check_masks(masks))


def read_stats(layer_masks: Iterable[np.ndarray], perms: Iterable[np.ndarray]) -> dict:
    """Reads a token needs over all layers (mean over tokens) and active bundles per read."""
    per_layer, active, runs_total = [], 0, 0
    for masks, perm in zip(layer_masks, perms):
        r = runs_per_token(masks, perm)
        per_layer.append(float(r.mean()))
        runs_total += int(r.sum())
        active += int(np.asarray(masks).sum())
    return {"reads_per_token": float(sum(per_layer)),
            "reads_per_token_per_layer": per_layer,
            "mean_run_len": active / max(runs_total, 1)}


def save_placement(path: str | os.PathLike, p: Placement) -> None:
    """npz with `perm` (L, n) (what `ripple pack --placement` reads), `strategy`, `meta`."""
    meta = dict(p.meta, format=FORMAT, strategy=p.strategy, search_s=p.search_s.tolist())
    with atomic_write(path) as f:
        np.savez(f, perm=p.perm.astype(np.int64), strategy=np.array(p.strategy),
                 meta=np.array(json.dumps(meta)))


def place_cmd(profile: str, strategy: str, out: str, k: int = 32) -> dict:
    """`ripple place`: placement from a profile's calibration masks, and its held-out reads
    beside the checkpoint order's."""
    from .profile import load_profile

    strategy_fn(strategy)                # a bad name fails before minutes of search
    if k < 2:
        raise PlacementError(f"--k {k}: need at least 2 candidate neighbours per neuron")
    if not Path(out).parent.is_dir():
        raise PlacementError(f"{out}: folder {Path(out).parent} does not exist")
    prof = load_profile(profile)
    L = prof.masks_calib.shape[0]

    def layer(packed: np.ndarray, l: int) -> np.ndarray:   # one layer unpacked at a time
        return np.unpackbits(packed[l], axis=-1, count=prof.d_ffn).astype(bool)

    p = place((layer(prof.masks_calib, l) for l in range(L)), strategy, SearchConfig(k=k), n_layers=L)
    p.meta.update(profile=str(profile), source_hash=prof.source_hash, sparsity=prof.sparsity,
                  calib_tokens=int(prof.masks_calib.shape[1]))
    ident = read_stats((layer(prof.masks_heldout, l) for l in range(L)), [np.arange(prof.d_ffn)] * L)
    got = read_stats((layer(prof.masks_heldout, l) for l in range(L)), p.perm)
    p.meta.update(heldout_reads_per_token=got["reads_per_token"],
                  heldout_reads_per_token_identity=ident["reads_per_token"])
    save_placement(out, p)
    return {"out": str(out), "strategy": strategy, "layers": L, "neurons": prof.d_ffn,
            "search_s": round(float(p.search_s.sum()), 2),
            "heldout_reads_per_token": round(got["reads_per_token"], 1),
            "heldout_reads_per_token_identity": round(ident["reads_per_token"], 1),
            "heldout_mean_run_len": round(got["mean_run_len"], 3)}
