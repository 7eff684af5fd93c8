"""A synthetic ReLU-regime activation workload (labelled synthetic wherever it is reported).

Ripple's large gains are on ReLU models at 3-10% active (OPT-6.7B: 16384 FFN neurons per
layer, about 3% active per token), a regime the embedded SwiGLU model (24-50% active) does
not show. This generator stands in for such profiles until real ones are at hand. Per layer:

- neurons fall into co-activation clusters (log-normal sizes around `cluster_mean`),
  ids shuffled so that the checkpoint order carries no structure;
- a token activates a few clusters (Poisson count, cluster popularity Zipf(`zipf`)), and
  clusters persist from one token to the next with probability `persistence` (text keeps
  its topic); in an active cluster neuron i fires with its own probability q_i ~ Beta(2, 1.5);
- independent of clusters, neuron i also fires with a background rate b_i from a Pareto
  tail, a `background` share of all activations; the `hot_fraction` hottest neurons fire on
  20-60% of tokens (the hot neurons LLM in a Flash reports);
- so activation frequencies are heavy-tailed, as profiled on OPT (with the defaults: 2.9%
  active, the top 1% of neurons fire on 46% of tokens, the median one on 1.5%, and 44% of
  the neurons carry 80% of the activations).
The cluster share, within-cluster probabilities and persistence are assumptions, not fits to
a model: read results on this workload as "if co-activation is this clustered".

Calibration and held-out masks share the model (clusters, q, b) but not the text: held-out
tokens come from another seed and a cluster popularity perturbed by a log-normal factor
(`heldout_shift`), as other text would favour other topics.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticSpec:
    n: int = 16384                 # FFN neurons per layer (OPT-6.7B)
    n_layers: int = 4
    density: float = 0.03          # mean active fraction per token
    cluster_mean: float = 32.0
    zipf: float = 1.0
    persistence: float = 0.5
    background: float = 0.3        # share of activations outside clusters
    hot_fraction: float = 0.005
    heldout_shift: float = 0.5
    seq_len: int = 128

    def describe(self) -> dict:
        return {"generator": "ripple.tuning.synthetic", **asdict(self)}


@dataclass
class _LayerModel:
    cluster_of: np.ndarray     # (n,) cluster id
    q: np.ndarray              # (n,) firing probability inside an active cluster
    b: np.ndarray              # (n,) background rate
    popularity: np.ndarray     # (G,) sums to 1
    rate: float                # mean new clusters per token


def _layer_model(spec: SyntheticSpec, rng: np.random.Generator) -> _LayerModel:
    n = spec.n
    sizes = []
    while sum(sizes) < n:
        sizes.append(max(2, int(round(rng.lognormal(np.log(spec.cluster_mean) - 0.18, 0.6)))))
    sizes[-1] -= sum(sizes) - n
    if sizes[-1] < 1:
        sizes.pop()
    G = len(sizes)
    cluster_of = rng.permutation(np.repeat(np.arange(G), sizes))
    q = rng.beta(2.0, 1.5, n)
    popularity = np.arange(1, G + 1, dtype=np.float64) ** -spec.zipf
    popularity = rng.permutation(popularity / popularity.sum())

    b = rng.pareto(1.5, n) + 1.0
    b *= spec.background * spec.density / b.mean()
    hot = rng.choice(n, max(1, int(spec.hot_fraction * n)), replace=False)
    b[hot] = rng.uniform(0.2, 0.6, len(hot))
    b = np.clip(b, 0.0, 0.6)

    # Clusters active per token at steady state: rate / (1 - persistence). Find the rate
    # that gives the cluster share of the density (bisection on the Poisson coverage).
    mass = np.bincount(cluster_of, weights=q, minlength=G)
    want = max(spec.density * n - b.sum(), 0.0)

    def expected(rate: float) -> float:
        lam = rate / (1.0 - spec.persistence)
        return float((1.0 - np.exp(-lam * popularity)) @ mass)

    lo, hi = 0.0, float(G)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) < want else (lo, mid)
    return _LayerModel(cluster_of, q, b, popularity, lo)


def _tokens(spec: SyntheticSpec, m: _LayerModel, popularity: np.ndarray, n_tokens: int,
            rng: np.random.Generator) -> np.ndarray:
    G = len(popularity)
    active = np.zeros(G, bool)
    z = np.zeros((n_tokens, G), bool)
    for t in range(n_tokens):
        if t % spec.seq_len == 0:
            active[:] = False                       # a new sequence: no topic carried over
        active &= rng.random(G) < spec.persistence
        new = rng.choice(G, rng.poisson(m.rate), p=popularity)
        active[new] = True
        z[t] = active
    fire = z[:, m.cluster_of] & (rng.random((n_tokens, spec.n), dtype=np.float32) < m.q.astype(np.float32))
    fire |= rng.random((n_tokens, spec.n), dtype=np.float32) < m.b.astype(np.float32)
    return fire


def relu_layer(spec: SyntheticSpec, layer: int, calib_tokens: int, heldout_tokens: int,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration (T, n), held-out (T', n)) bool masks of one layer."""
    rng = np.random.default_rng([seed, layer])
    m = _layer_model(spec, rng)
    calib = _tokens(spec, m, m.popularity, calib_tokens, np.random.default_rng([seed, layer, 1]))
    shifted = m.popularity * rng.lognormal(0.0, spec.heldout_shift, len(m.popularity))
    held = _tokens(spec, m, shifted / shifted.sum(), heldout_tokens,
                   np.random.default_rng([seed, layer, 2]))
    return calib, held


def planted_order(spec: SyntheticSpec, layer: int, seed: int = 0) -> np.ndarray:
    """The order the generator's own structure suggests (known only because it is
    synthetic): hot neurons first, hottest first, then clusters by popularity, members by
    firing probability. A reference for how much of the planted structure a placement
    fitted on masks recovers, not an optimum."""
    m = _layer_model(spec, np.random.default_rng([seed, layer]))
    hot = m.b >= 0.2
    cold = np.flatnonzero(~hot)
    cold = cold[np.lexsort((-m.q[cold], -m.popularity[m.cluster_of[cold]]))]
    hot = np.flatnonzero(hot)
    return np.concatenate((hot[np.argsort(-m.b[hot], kind="stable")], cold)).astype(np.int64)
