"""Lookahead predictors: layer l+j's active neurons from layer l's FFN input, so that layer
l+j's reads can be issued while layers l..l+j-1 compute (Deja Vu's asynchronous lookahead,
Liu et al. 2023; ActiveFlow's cross-layer prediction, arXiv 2504.08378). On a strongly sparse
model each layer's reads otherwise start only once the layer before it is computed, and a
token pays about one request latency per layer in series.

Same low-rank form and training as the same-layer predictor (tuning.predictor.fit_layer),
on the profile's recorded FFN inputs and true masks: the input of layer l with the mask of
layer l+j, the same tokens. Per distance j and target layer, the logit threshold reaches the
recall target on held-back calibration tokens; on the profile's held-out tokens (text no
predictor trained on) this module measures what the runtime would pay for it: the share of
truly active neurons predicted (recall; the rest are read on demand once the layer's own set
is known), and the neurons predicted that no token used (bytes read for nothing).

The same-layer predictor (tuning.predictor, distance 0) is the reference the lookahead rows
are compared with (`same_layer_row`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..headed_npz import load_headed, save_headed
from .predictor import (PREDICTOR_FILE, Predictor, PredictorError, TrainConfig, _f32, _logits, fit_layer,
                        predicted_masks, recall_threshold)

FORMAT = "ripple-lookahead-1"
LOOKAHEAD_FILE = "lookahead.npz"


def beside(predictor_path) -> Path:
    """Where the lookahead predictors of a predictor file lie: DIR/lookahead.npz beside a
    layout's DIR/predictor.npz, else NAME-lookahead.npz beside NAME.npz."""
    p = Path(predictor_path)
    return p.with_name(LOOKAHEAD_FILE if p.name == PREDICTOR_FILE else f"{p.stem}-{LOOKAHEAD_FILE}")


@dataclass
class Lookahead:
    """Predictors of layer l + j from layer l's FFN input, for j in `distances`: index [k, t]
    is distance distances[k] into target layer t (source layer t - j; t < j: none, zeros)."""
    distances: list[int]
    a: np.ndarray               # (J, L, d_model, r) fp16
    a_bias: np.ndarray          # (J, L, r) fp16
    b: np.ndarray               # (J, L, r, d_ffn) fp16
    b_bias: np.ndarray          # (J, L, d_ffn) fp16
    thresholds: np.ndarray      # (J, L) float32 logit thresholds (inf where t < j)
    recall_target: float
    sparsity: float
    source_hash: str
    meta: dict = field(default_factory=dict)


@dataclass
class DistanceRow:
    """Held-out figures of one distance, per target layer (NaN where t < j)."""
    distance: int
    recall: np.ndarray          # (L,) truly active neurons predicted / truly active
    extra: np.ndarray           # (L,) predicted neurons not active / truly active (bytes for nothing)
    predicted: np.ndarray       # (L,) predicted neurons / d_ffn


def _mask(packed: np.ndarray, layer: int, n: int) -> np.ndarray:
    """(tokens, n) bool of one layer: unpacked alone (all layers of a long profile at once
    would be L x tokens x n bytes)."""
    return np.unpackbits(packed[layer], axis=-1, count=n).astype(bool)


def _fit(x, y, n_val, cfg):
    fit = fit_layer(x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:], cfg)
    lv = _logits(torch.from_numpy(x[-n_val:]), *map(_f32, (fit.a, fit.a_bias, fit.b, fit.b_bias)))
    return fit, recall_threshold(lv, torch.from_numpy(y[-n_val:]), cfg.recall)


def train_lookahead(profile, distances: list[int], cfg: TrainConfig) -> Lookahead:
    """Predictors for each distance in `distances` and each target layer that has a source
    layer, from a profile with recorded FFN inputs, at the profile's sparsity."""
    x_all = profile.inputs("calib")
    L, N, d = x_all.shape
    n = profile.d_ffn
    if not distances or min(distances) < 1 or max(distances) >= L:
        raise PredictorError(f"lookahead distances {distances}: each must lie in 1..{L - 1} (layers ahead)")
    n_val = max(1, int(round(N * cfg.val_frac)))
    if N - n_val < cfg.batch:
        raise PredictorError(f"only {N} calibration tokens: need at least {cfg.batch + n_val}; "
                             "profile more (--calib-tokens)")
    J, r = len(distances), cfg.rank
    out = Lookahead(list(distances), np.zeros((J, L, d, r), np.float16), np.zeros((J, L, r), np.float16),
                    np.zeros((J, L, r, n), np.float16), np.zeros((J, L, n), np.float16),
                    np.full((J, L), np.inf, np.float32), cfg.recall, float(profile.sparsity),
                    profile.source_hash)
    pairs = [(k, t) for k, j in enumerate(distances) for t in range(j, L)]
    for k, t in tqdm(pairs, desc="lookahead predictors", unit="layer"):
        j = distances[k]
        fit, thr = _fit(np.asarray(x_all[t - j], np.float32), _mask(profile.masks_calib, t, n), n_val, cfg)
        out.a[k, t], out.a_bias[k, t], out.b[k, t], out.b_bias[k, t] = fit.a, fit.a_bias, fit.b, fit.b_bias
        out.thresholds[k, t] = thr
    out.meta = {"train_tokens": int(N - n_val), "val_tokens": int(n_val),
                "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    return out


def predicted(la: Lookahead, k: int, target: int, h: np.ndarray) -> np.ndarray:
    """(tokens, d_ffn) bool: target layer's set predicted at distance la.distances[k] from the
    FFN inputs h (tokens, d_model) of layer target - distance."""
    w = [la.a[k, target], la.a_bias[k, target], la.b[k, target], la.b_bias[k, target]]
    lv = _logits(torch.from_numpy(np.asarray(h, np.float32)), *map(_f32, w))
    return (lv > float(la.thresholds[k, target])).numpy()


def _row(j: int, pred_of, profile) -> DistanceRow:
    L = profile.masks_heldout.shape[0]
    rec, extra, share = (np.full(L, np.nan) for _ in range(3))
    for t in range(j, L):
        p, truth = pred_of(t), _mask(profile.masks_heldout, t, profile.d_ffn)
        act = max(int(truth.sum()), 1)
        rec[t] = (p & truth).sum() / act
        extra[t] = (p & ~truth).sum() / act
        share[t] = p.mean()
    return DistanceRow(j, rec, extra, share)


def same_layer_row(pred: Predictor, profile) -> DistanceRow:
    """The same-layer predictor's held-out row (distance 0)."""
    masks = predicted_masks(pred, profile.inputs("heldout"))
    return _row(0, lambda t: masks[t], profile)


def heldout_rows(la: Lookahead, profile) -> list[DistanceRow]:
    """Each distance's recall, extra and predicted share per target layer, on held-out tokens."""
    x = profile.inputs("heldout")
    return [_row(j, lambda t, k=k, j=j: predicted(la, k, t, x[t - j]), profile)
            for k, j in enumerate(la.distances)]


def save_lookahead(la: Lookahead, path) -> None:
    save_headed(path, FORMAT, {"distances": la.distances, "recall_target": la.recall_target,
                               "sparsity": la.sparsity, "source_hash": la.source_hash, "meta": la.meta},
                dict(a=la.a, a_bias=la.a_bias, b=la.b, b_bias=la.b_bias, thresholds=la.thresholds))


def load_lookahead(path) -> Lookahead:
    def build(h: dict, z: dict) -> Lookahead:
        return Lookahead(list(h["distances"]), z["a"], z["a_bias"], z["b"], z["b_bias"], z["thresholds"],
                         float(h["recall_target"]), float(h["sparsity"]), h["source_hash"], h["meta"])
    la = load_headed(path, FORMAT, build, PredictorError, "lookahead predictor",
                     "ripple train-predictor --lookahead")
    if la.thresholds.shape != la.a.shape[:2] or la.a.shape[0] != len(la.distances):
        raise PredictorError(f"{path}: arrays disagree with its header; train the lookahead again")
    return la
