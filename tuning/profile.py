"""Activation profiling: which FFN neurons fire, per layer, per token, on real text.

Pass 1 runs the dense model on calibration text and keeps every score, from which each
layer's threshold is read off for every sparsity of a grid. Each grid point's perplexity is
measured on held-out text; by default the highest sparsity within `ppl_budget` of dense is
chosen. Pass 2 runs the sparse model at the chosen thresholds (what the engine will run) and
records the active masks, bit-packed, for calibration and held-out text separately, so that
later stages fit on one and measure on the other. The token ids are kept too (small), and
with `record_inputs` each layer's FFN input h (fp16, what `ffn(layer, h)` receives in pass 2)
for activation predictors, which learn h -> mask; off by default, as it is 16*d_model/d_ffn
times the masks' size (SmolLM2: 1,152 bytes per token per layer, 35 MB per 1,000 tokens).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..headed_npz import load_headed, save_headed
from .forward import TorchModel, ffn_output, forward
from .sparsity import perplexity, scores, sparse_ffn, thresholds_for

DEFAULT_GRID = (0.0, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
FORMAT = "ripple-profile-1"


class ProfileError(ValueError):
    pass


@dataclass
class Profile:
    criterion: str
    grid: np.ndarray                 # (g,) sparsities tried
    grid_thresholds: np.ndarray      # (g, L)
    grid_ppl: np.ndarray             # (g,) held-out perplexity at each grid sparsity
    sparsity: float                  # the one chosen
    thresholds: np.ndarray           # (L,) at the chosen sparsity
    masks_calib: np.ndarray          # (L, tokens, ceil(n/8)) uint8, np.packbits along neurons
    masks_heldout: np.ndarray        # (L, tokens, ceil(n/8)) uint8
    d_ffn: int
    source_hash: str
    meta: dict = field(default_factory=dict)
    tokens_calib: np.ndarray | None = None    # (tokens,) int32, the sequences back to back
    tokens_heldout: np.ndarray | None = None
    seq_lens_calib: np.ndarray | None = None  # (sequences,) int32
    seq_lens_heldout: np.ndarray | None = None
    inputs_calib: np.ndarray | None = None    # (L, tokens, d_model) fp16 FFN inputs, if recorded
    inputs_heldout: np.ndarray | None = None

    def masks(self, split: str) -> np.ndarray:
        """(L, tokens, n) bool."""
        packed = self.masks_calib if split == "calib" else self.masks_heldout
        return np.unpackbits(packed, axis=-1, count=self.d_ffn).astype(bool)

    def density(self, split: str = "heldout") -> np.ndarray:
        """Active fraction per layer."""
        return self.masks(split).mean(axis=(1, 2))

    def sequences(self, split: str) -> list[np.ndarray]:
        """The token sequences the masks were recorded on."""
        toks, lens = ((self.tokens_calib, self.seq_lens_calib) if split == "calib"
                      else (self.tokens_heldout, self.seq_lens_heldout))
        if toks is None:
            raise ProfileError("this profile has no token ids (written by an older ripple); "
                               "run `ripple profile` again")
        return [a.astype(np.int64) for a in np.split(toks, np.cumsum(lens)[:-1])]

    def inputs(self, split: str) -> np.ndarray:
        """(L, tokens, d_model) fp16 FFN inputs."""
        x = self.inputs_calib if split == "calib" else self.inputs_heldout
        if x is None:
            raise ProfileError("this profile has no FFN inputs; run `ripple profile "
                               "--record-inputs` (predictors learn from them)")
        return x


def _record(tm: TorchModel, seqs: list[np.ndarray], criterion: str, thresholds: np.ndarray | None,
            keep_scores: bool, desc: str, inputs: list[list] | None = None) -> tuple[list, list]:
    """Forward over seqs; per layer, the scores (fp16, if keep_scores) and active masks;
    the FFN inputs (fp16) go to inputs[layer], if given."""
    L = tm.desc.n_layers
    kept: list[list] = [[] for _ in range(L)]
    masks: list[list] = [[] for _ in range(L)]

    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        if inputs is not None:
            inputs[layer].append(h.reshape(-1, h.shape[-1]).to(torch.float16).numpy())
        coef, score = scores(tm, layer, h, criterion)
        s = score.reshape(-1, score.shape[-1])
        if keep_scores:
            kept[layer].append(s.to(torch.float16).numpy())
        if thresholds is None:
            return ffn_output(tm, layer, coef)
        active = score > float(thresholds[layer])
        masks[layer].append(np.packbits(active.reshape(-1, active.shape[-1]).numpy(), axis=-1))
        return ffn_output(tm, layer, coef * active)

    for seq in tqdm(seqs, desc=desc, unit="seq"):
        forward(tm, torch.from_numpy(seq)[None], ffn=ffn)
    return kept, masks


def record_inputs(tm: TorchModel, seqs: list[np.ndarray], criterion: str,
                  thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2 at other thresholds: ((L, tokens, d_model) fp16 FFN inputs, (L, tokens, ceil(n/8))
    packed masks) of the sparse model on seqs, e.g. a profile's own calibration sequences."""
    L = tm.desc.n_layers
    xs = [[] for _ in range(L)]
    _, m = _record(tm, seqs, criterion, thresholds, False, "record FFN inputs", xs)
    return np.stack([np.concatenate(x) for x in xs]), np.stack([np.concatenate(q) for q in m])


def frontier(tm: TorchModel, calib: list[np.ndarray], heldout: list[np.ndarray], grid: tuple,
             criterion: str = "coef", desc: str = "profile") -> tuple[np.ndarray, np.ndarray]:
    """((g, L) thresholds, (g,) held-out perplexity) at each sparsity of grid: thresholds are
    per-layer quantiles of the calibration scores, perplexity is measured on heldout."""
    kept, _ = _record(tm, calib, criterion, None, True, f"{desc}: calibration scores")
    layer_scores = [np.concatenate(k) for k in kept]
    del kept
    grid_thr = np.array([[thresholds_for(ls, s) for ls in layer_scores] for s in grid])
    del layer_scores
    grid_ppl = np.array([perplexity(tm, heldout, sparse_ffn(tm, thr, criterion))
                         for thr in tqdm(grid_thr, desc=f"{desc}: held-out perplexity per sparsity")])
    return grid_thr, grid_ppl


def active_fraction(tm: TorchModel, seqs: list[np.ndarray], criterion: str,
                    thresholds: np.ndarray) -> np.ndarray:
    """(L,) fraction of (token, neuron) pairs active on seqs at these per-layer thresholds."""
    _, m = _record(tm, seqs, criterion, thresholds, False, "active fraction")
    return np.array([np.unpackbits(np.concatenate(q), axis=-1, count=tm.desc.d_ffn).mean() for q in m])


def run_profile(tm: TorchModel, calib: list[np.ndarray], heldout: list[np.ndarray],
                criterion: str = "coef", sparsity: float | None = None, ppl_budget: float = 0.10,
                grid: tuple = DEFAULT_GRID, meta: dict | None = None,
                record_inputs: bool = False) -> Profile:
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ProfileError(f"sparsity {sparsity} is outside [0, 1); pass e.g. --sparsity 0.6")
    if ppl_budget < 0:
        raise ProfileError(f"perplexity budget {ppl_budget} is negative; pass e.g. --ppl-budget 0.1")
    grid = tuple(sorted(set(grid) | ({sparsity} if sparsity is not None else set())))
    grid_thr, grid_ppl = frontier(tm, calib, heldout, grid, criterion)
    dense_ppl = grid_ppl[0] if grid[0] == 0.0 else perplexity(tm, heldout)
    if sparsity is None:
        ok = [i for i, p in enumerate(grid_ppl) if p <= dense_ppl * (1 + ppl_budget)]
        chosen = max(ok, key=lambda i: grid[i]) if ok else 0
    else:
        chosen = grid.index(sparsity)
    thr = grid_thr[chosen]
    L = tm.desc.n_layers
    x_cal = [[] for _ in range(L)] if record_inputs else None
    x_held = [[] for _ in range(L)] if record_inputs else None
    _, m_cal = _record(tm, calib, criterion, thr, False, "profile: calibration masks", x_cal)
    _, m_held = _record(tm, heldout, criterion, thr, False, "profile: held-out masks", x_held)
    stack = lambda xs: None if xs is None else np.stack([np.concatenate(x) for x in xs])  # noqa: E731
    joined = lambda seqs: np.concatenate(seqs).astype(np.int32)  # noqa: E731
    lens = lambda seqs: np.array([len(q) for q in seqs], dtype=np.int32)  # noqa: E731
    info = dict(meta or {})
    info.update(calib_tokens=int(sum(map(len, calib))), heldout_tokens=int(sum(map(len, heldout))),
                ppl_dense=float(dense_ppl), ppl_budget=ppl_budget)
    info.setdefault("sparsity_rule", "fixed" if sparsity is not None else f"highest within {ppl_budget:.0%} of dense")
    return Profile(criterion, np.array(grid), grid_thr, grid_ppl, float(grid[chosen]), thr,
                   np.stack([np.concatenate(m) for m in m_cal]),
                   np.stack([np.concatenate(m) for m in m_held]),
                   tm.desc.d_ffn, tm.desc.source_hash, info,
                   joined(calib), joined(heldout), lens(calib), lens(heldout),
                   stack(x_cal), stack(x_held))


def save_profile(p: Profile, path: str | os.PathLike) -> None:
    header = dict(criterion=p.criterion, sparsity=p.sparsity, d_ffn=p.d_ffn,
                  source_hash=p.source_hash, meta=p.meta)
    save_headed(path, FORMAT, header, dict(grid=p.grid, grid_thresholds=p.grid_thresholds,
                                           grid_ppl=p.grid_ppl, thresholds=p.thresholds,
                                           masks_calib=p.masks_calib, masks_heldout=p.masks_heldout,
                                           **_optional_arrays(p)), compressed=True)


_OPTIONAL = ("tokens_calib", "tokens_heldout", "seq_lens_calib", "seq_lens_heldout",
             "inputs_calib", "inputs_heldout")


def _optional_arrays(p: Profile) -> dict:
    return {k: getattr(p, k) for k in _OPTIONAL if getattr(p, k) is not None}


def load_profile(path: str | os.PathLike) -> Profile:
    def build(h: dict, z: dict) -> Profile:
        return Profile(h["criterion"], z["grid"], z["grid_thresholds"], z["grid_ppl"],
                       float(h["sparsity"]), z["thresholds"], z["masks_calib"],
                       z["masks_heldout"], int(h["d_ffn"]), h["source_hash"], h["meta"],
                       **{k: z[k] for k in _OPTIONAL if k in z})
    return load_headed(path, FORMAT, build, ProfileError, "profile", "ripple profile")


def thresholds_at(grid, grid_thresholds, sparsity: float) -> np.ndarray:
    """Per-layer thresholds at one sparsity of a profiled grid."""
    hits = np.flatnonzero(np.isclose(np.asarray(grid), sparsity))
    if len(hits) == 0:
        raise ProfileError(f"sparsity {sparsity} was not profiled; profiled: "
                           f"{', '.join(f'{s:g}' for s in grid)}")
    return np.asarray(grid_thresholds)[hits[0]]

