"""Activation predictors: a layer's active neurons from its FFN input, before any FFN weight is read.

Per layer, a low-rank two-layer map from the normalised FFN input h to one logit per neuron,
logits = B·relu(A·h + a) + b (Deja Vu, Liu et al. 2023, §4.1; LLM in a Flash, Alizadeh et
al. 2024, §3.1), trained with binary cross-entropy on profiled (h, active mask) pairs. A
neuron is predicted active when its logit exceeds the layer's logit threshold, chosen on
held-back calibration tokens so that a target share of the truly active (token, neuron)
pairs is predicted (recall).

The engine reads the predicted set, then, since gate/up rows arrive with each bundle, keeps
only neurons whose true score clears the sparsity threshold: a false positive costs one
bundle read, a false negative a dropped neuron (`predicted_ffn` is that policy without flash).

A rank-r predictor costs 2·r·(d_model + d_ffn) FLOPs per token per layer against the dense
FFN's 2·3·d_model·d_ffn (SwiGLU): r = 48 is 3.8% on SmolLM2 (d 576, n 1536). Weights are
kept in fp16, as they sit in DRAM.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..headed_npz import load_headed, save_headed
from .forward import FFN, TorchModel, ffn_output
from .sparsity import scores

FORMAT = "ripple-predictor-1"
PREDICTOR_FILE = "predictor.npz"


class PredictorError(ValueError):
    pass


@dataclass
class Predictor:
    a: np.ndarray                 # (L, d_model, r) fp16
    a_bias: np.ndarray            # (L, r) fp16
    b: np.ndarray                 # (L, r, d_ffn) fp16
    b_bias: np.ndarray            # (L, d_ffn) fp16
    thresholds: np.ndarray        # (L,) float32, on the logits
    score_thresholds: np.ndarray  # (L,) float32: the sparsity's thresholds on the true scores
    sparsity: float
    criterion: str
    recall_target: float
    source_hash: str
    activation: str               # "swiglu" or "relu": what a dense FFN costs
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.a.shape[0]

    @property
    def d_model(self) -> int:
        return self.a.shape[1]

    @property
    def rank(self) -> int:
        return self.a.shape[2]

    @property
    def d_ffn(self) -> int:
        return self.b.shape[2]


@dataclass
class PredictorCost:
    dram_bytes: int               # all layers' weights and thresholds
    flops_per_token: int          # one layer
    ffn_flops_per_token: int      # one layer's dense FFN (its matmuls)

    @property
    def flops_frac(self) -> float:
        return self.flops_per_token / self.ffn_flops_per_token


def cost(p: Predictor) -> PredictorCost:
    d, r, n = p.d_model, p.rank, p.d_ffn
    # Two matmuls, two bias adds, the relu, the threshold compare.
    flops = 2 * r * (d + n) + 2 * r + 2 * n
    mats = 3 if p.activation == "swiglu" else 2
    nbytes = sum(x.nbytes for x in (p.a, p.a_bias, p.b, p.b_bias, p.thresholds))
    return PredictorCost(int(nbytes), int(flops), 2 * mats * d * n)


# ------------------------------------------------------------------ training

RECALL_GRID = (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def with_recall(p: Predictor, recall: float) -> Predictor:
    """The same predictor at another recall target of RECALL_GRID (thresholds picked in training)."""
    key = f"{recall:g}"
    try:
        thr = [layer["recall_thresholds"][key] for layer in p.meta["layers"]]
    except KeyError:
        raise PredictorError(f"recall {recall:g} is not one of the trained operating points "
                             f"{', '.join(f'{r:g}' for r in RECALL_GRID)}") from None
    return Predictor(p.a, p.a_bias, p.b, p.b_bias, np.array(thr, np.float32), p.score_thresholds,
                     p.sparsity, p.criterion, recall, p.source_hash, p.activation, p.meta)


@dataclass
class TrainConfig:
    rank: int = 48
    # Share of true (token, neuron) pairs predicted, per layer, on held-back calibration tokens.
    # SmolLM2 at sparsity 0.8: 0.999 kept held-out perplexity within 3% of the oracle's, 0.99 did not.
    recall: float = 0.999
    epochs: int = 20
    batch: int = 256
    lr: float = 1e-2              # measured on SmolLM2 layers 2/15/28: same loss as 3e-3 in ~60% of the epochs
    val_frac: float = 0.1         # last calibration tokens, held back to pick thresholds
    patience: int = 5             # epochs without a better validation loss before stopping
    seed: int = 0


@dataclass
class LayerFit:
    a: np.ndarray
    a_bias: np.ndarray
    b: np.ndarray
    b_bias: np.ndarray
    train_loss: list[float]       # per epoch
    val_loss: list[float]


def fit_layer(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              cfg: TrainConfig) -> LayerFit:
    """One layer's predictor, fitted by BCE; the epoch of least validation loss is kept.
    Inputs are standardised while training and the scaling folded into A afterwards."""
    g = torch.Generator().manual_seed(cfg.seed)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.float32))
    xv = torch.from_numpy(np.asarray(x_val, dtype=np.float32))
    yv = torch.from_numpy(np.asarray(y_val, dtype=np.float32))
    mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
    d, n = xt.shape[1], yt.shape[1]
    rate = yt.mean(0).clamp(1e-4, 1 - 1e-4)
    A = (torch.randn(d, cfg.rank, generator=g) / d ** 0.5).requires_grad_()
    a = torch.zeros(cfg.rank, requires_grad=True)
    B = (torch.randn(cfg.rank, n, generator=g) / cfg.rank ** 0.5 * 0.1).requires_grad_()
    b = torch.log(rate / (1 - rate)).clone().requires_grad_()   # start at each neuron's base rate
    params = [A, a, B, b]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, len(xt) // cfg.batch) * cfg.epochs)

    def logits(xb):
        return F.relu((xb - mu) / sd @ A + a) @ B + b

    best, best_state, since = float("inf"), None, 0
    train_loss, val_loss = [], []
    for _ in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=g)
        total, count = 0.0, 0
        for i in range(0, len(xt) - cfg.batch + 1, cfg.batch):
            idx = order[i:i + cfg.batch]
            loss = F.binary_cross_entropy_with_logits(logits(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        train_loss.append(total / max(count, 1))
        with torch.no_grad():
            v = float(F.binary_cross_entropy_with_logits(logits(xv), yv))
        val_loss.append(v)
        if v < best - 1e-5:
            best, since = v, 0
            best_state = [p.detach().clone() for p in params]
        else:
            since += 1
            if since >= cfg.patience:
                break
    A, a, B, b = best_state
    folded = [t.numpy().astype(np.float16) for t in (A / sd[:, None], a - (mu / sd) @ A, B, b)]
    if not all(np.isfinite(w).all() for w in folded):
        raise PredictorError("predictor weights overflow fp16 (an FFN input dimension barely varies "
                             "in the calibration text); profile more, or more varied, text")
    return LayerFit(*folded, train_loss, val_loss)


def _logits(h: torch.Tensor, a, a_bias, b, b_bias) -> torch.Tensor:
    return F.relu(h @ a + a_bias) @ b + b_bias


def _f32(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(w, dtype=np.float32))


def recall_threshold(logits: torch.Tensor, truth: torch.Tensor, recall: float) -> float:
    """The logit threshold that `recall` of the true pairs' logits exceed."""
    pos = logits[truth].float()
    if pos.numel() == 0:
        return float("inf")
    # kth smallest, k = the pairs we may miss; `>` then keeps the rest.
    miss = int(np.floor((1.0 - recall) * pos.numel()))
    if miss == 0:
        return float(pos.min()) - 1e-6
    return float(torch.kthvalue(pos, miss).values)


def train_predictor(inputs: np.ndarray, masks, cfg: TrainConfig, *, score_thresholds: np.ndarray,
                    sparsity: float, criterion: str, source_hash: str, activation: str,
                    meta: dict | None = None) -> Predictor:
    """inputs: (L, tokens, d_model) FFN inputs; masks: (L, tokens, d_ffn) bool, or a function
    layer -> that layer's (tokens, d_ffn) bool mask (to unpack one layer at a time)."""
    L, N, _ = inputs.shape
    if not 0.0 < cfg.recall <= 1.0:
        raise PredictorError(f"recall target {cfg.recall} is outside (0, 1]; pass e.g. --recall 0.99")
    if cfg.rank < 1:
        raise PredictorError(f"rank {cfg.rank} must be at least 1")
    n_val = max(1, int(round(N * cfg.val_frac)))
    if N - n_val < cfg.batch:
        raise PredictorError(f"only {N} calibration tokens: need at least {cfg.batch + n_val}; "
                             "profile more (--calib-tokens)")
    mask_of = masks if callable(masks) else (lambda layer: masks[layer])
    fits, thr, stats = [], [], []
    bar = tqdm(range(L), desc="train-predictor", unit="layer")
    for layer in bar:
        x = np.asarray(inputs[layer], dtype=np.float32)
        y = np.asarray(mask_of(layer), dtype=bool)
        fit = fit_layer(x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:], cfg)
        lv = _logits(torch.from_numpy(x[-n_val:]), *map(_f32, (fit.a, fit.a_bias, fit.b, fit.b_bias)))
        truth = torch.from_numpy(y[-n_val:])
        t = recall_threshold(lv, truth, cfg.recall)
        pred = lv > t
        tp = int((pred & truth).sum())
        stats.append({"epochs": len(fit.val_loss), "train_loss": fit.train_loss[-1],
                      "val_loss": min(fit.val_loss), "first_loss": fit.train_loss[0],
                      "val_recall": tp / max(int(truth.sum()), 1),
                      "val_precision": tp / max(int(pred.sum()), 1),
                      # Other operating points of the same predictor, for a recall sweep.
                      "recall_thresholds": {f"{r:g}": recall_threshold(lv, truth, r) for r in RECALL_GRID}})
        bar.set_postfix(loss=f"{stats[-1]['val_loss']:.3f}", prec=f"{stats[-1]['val_precision']:.2f}")
        fits.append(fit)
        thr.append(t)
    info = dict(meta or {})
    info.update(train_tokens=int(N - n_val), val_tokens=int(n_val), layers=stats,
                config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    return Predictor(np.stack([f.a for f in fits]), np.stack([f.a_bias for f in fits]),
                     np.stack([f.b for f in fits]), np.stack([f.b_bias for f in fits]),
                     np.array(thr, dtype=np.float32), np.asarray(score_thresholds, dtype=np.float32),
                     float(sparsity), criterion, float(cfg.recall), source_hash, activation, info)


def true_masks(tm: TorchModel, inputs: np.ndarray, score_thresholds: np.ndarray, criterion: str):
    """layer -> (tokens, d_ffn) bool: which neurons the FFN inputs activate at these thresholds
    (to train for another sparsity than the one a profile recorded masks at)."""
    def mask(layer: int) -> np.ndarray:
        h = torch.from_numpy(np.asarray(inputs[layer], dtype=np.float32))
        _, s = scores(tm, layer, h, criterion)
        return (s > float(score_thresholds[layer])).numpy()
    return mask


@dataclass
class TrainingData:
    inputs: np.ndarray            # (L, tokens, d_model) fp16 FFN inputs of the sparse model
    masks: Callable[[int], np.ndarray]   # layer -> (tokens, d_ffn) bool true sets
    score_thresholds: np.ndarray  # (L,)
    sparsity: float


def training_data(profile, tm: TorchModel, sparsity: float | None = None) -> TrainingData:
    """(h, mask) pairs at `sparsity` (default: the profile's). At another profiled sparsity the
    profile's calibration sequences are run again through the model sparse at that sparsity,
    since the FFN inputs themselves move with it (predictors trained on 0.8's inputs and
    measured at 0.5 lost ~0.1 of held-out recall on SmolLM2)."""
    from .profile import record_inputs, thresholds_at
    if profile.source_hash != tm.desc.source_hash:
        raise PredictorError("the profile was recorded on another checkpoint than this model; "
                             "profile this model (`ripple profile --record-inputs`)")
    n = profile.d_ffn
    if sparsity is None or np.isclose(sparsity, profile.sparsity):
        inputs, packed = profile.inputs("calib"), profile.masks_calib
        sparsity, thr = profile.sparsity, profile.thresholds
    else:
        profile.inputs("calib")            # the same requirement, and the same message, as above
        thr = thresholds_at(profile.grid, profile.grid_thresholds, sparsity)
        inputs, packed = record_inputs(tm, profile.sequences("calib"), profile.criterion, thr)
    return TrainingData(inputs, lambda layer: np.unpackbits(packed[layer], axis=-1, count=n).astype(bool),
                        np.asarray(thr), float(sparsity))


def train_from_profile(profile, tm: TorchModel, cfg: TrainConfig, sparsity: float | None = None,
                       data: TrainingData | None = None) -> Predictor:
    """A predictor for `sparsity` (default: the profile's) from a profile with recorded FFN inputs."""
    data = data or training_data(profile, tm, sparsity)
    # The FFN inputs are those of the model sparse at the predictor's own sparsity.
    meta = {"profile_sparsity": profile.sparsity, "inputs_sparsity": data.sparsity,
            "text": profile.meta.get("text")}
    return train_predictor(data.inputs, data.masks, cfg, score_thresholds=data.score_thresholds,
                           sparsity=data.sparsity,
                           criterion=profile.criterion, source_hash=tm.desc.source_hash,
                           activation=tm.desc.activation, meta=meta)


# ------------------------------------------------------------------ use

@dataclass
class TorchPredictor:
    """A Predictor's weights as held in DRAM: the fp16 tensors it stores, or (int8) the
    matrices as int8 with an fp32 scale per output column, half again; `logits` widens each
    layer's to fp32 per call. On the embedded SmolLM2 (rank 48) fp16 is 6.2 MB, a tenth of what
    the engine holds; int8 is 3.1 MB, for ~0.6 ms more per token (one thread)."""
    a: list[torch.Tensor]
    a_bias: list[torch.Tensor]
    b: list[torch.Tensor]
    b_bias: list[torch.Tensor]
    thresholds: np.ndarray
    a_scale: list[torch.Tensor] | None = None      # int8: per column of a (rank,) and b (d_ffn,)
    b_scale: list[torch.Tensor] | None = None


PREDICTOR_DRAM = ("fp16", "int8")


def to_torch(p: Predictor, weights: str = "fp16") -> TorchPredictor:
    """weights: "fp16" (as stored: outputs equal the fp32 copies') or "int8" (see TorchPredictor)."""
    if weights not in PREDICTOR_DRAM:
        raise ValueError(f"predictor weights {weights!r}: one of {PREDICTOR_DRAM}")
    t = lambda w: [torch.from_numpy(np.ascontiguousarray(x)) for x in w]  # noqa: E731
    if weights == "fp16":
        return TorchPredictor(t(p.a), t(p.a_bias), t(p.b), t(p.b_bias), p.thresholds.copy())
    qa, sa = zip(*(_int8_columns(w) for w in p.a))
    qb, sb = zip(*(_int8_columns(w) for w in p.b))
    return TorchPredictor(list(qa), t(p.a_bias), list(qb), t(p.b_bias), p.thresholds.copy(), list(sa), list(sb))


def _int8_columns(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per column (a column feeds one output)."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(scale.astype(np.float32))


def logits(tp: TorchPredictor, layer: int, h: torch.Tensor) -> torch.Tensor:
    if tp.a_scale is None:
        a, b = tp.a[layer].float(), tp.b[layer].float()
    else:
        a, b = tp.a[layer].float() * tp.a_scale[layer], tp.b[layer].float() * tp.b_scale[layer]
    return _logits(h, a, tp.a_bias[layer].float(), b, tp.b_bias[layer].float())


def predict(tp: TorchPredictor, layer: int, h: torch.Tensor) -> torch.Tensor:
    """(..., d_ffn) bool: the predicted active set of each token."""
    return logits(tp, layer, h) > float(tp.thresholds[layer])


def predicted_masks(p: Predictor, inputs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(L, tokens, d_ffn) bool: the predicted sets of recorded FFN inputs (L, tokens, d_model),
    for replaying a predictor's reads without running the model."""
    tp = to_torch(p)
    out = np.empty((inputs.shape[0], inputs.shape[1], p.d_ffn), dtype=bool)
    for layer in range(inputs.shape[0]):
        for i in range(0, inputs.shape[1], chunk):
            h = torch.from_numpy(np.asarray(inputs[layer, i:i + chunk], dtype=np.float32))
            out[layer, i:i + chunk] = predict(tp, layer, h).numpy()
    return out


# What the engine and the benchmarks swap: (layer, h (tokens, d_model)) -> (tokens, d_ffn) bool.
SetPolicy = Callable[[int, torch.Tensor], torch.Tensor]


class LowRankSets:
    """The low-rank predictor as a set policy; `tensors()` is what it holds in DRAM."""

    def __init__(self, tp: TorchPredictor):
        self.tp = tp

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return predict(self.tp, layer, h)

    def tensors(self) -> list[torch.Tensor]:
        tp = self.tp
        return [*tp.a, *tp.a_bias, *tp.b, *tp.b_bias, *(tp.a_scale or []), *(tp.b_scale or [])]


def lowrank_sets(tp: TorchPredictor) -> SetPolicy:
    return LowRankSets(tp)


@dataclass
class SetCounts:
    """Per layer, summed over tokens: true, predicted and both (token, neuron) pairs."""
    true: np.ndarray
    predicted: np.ndarray
    hit: np.ndarray
    tokens: np.ndarray

    @classmethod
    def zeros(cls, n_layers: int) -> "SetCounts":
        return cls(*(np.zeros(n_layers, np.int64) for _ in range(4)))

    def add(self, layer: int, truth: torch.Tensor, pred: torch.Tensor) -> None:
        self.true[layer] += int(truth.sum())
        self.predicted[layer] += int(pred.sum())
        self.hit[layer] += int((truth & pred).sum())
        self.tokens[layer] += truth.numel() // truth.shape[-1]

    def summary(self, counts: slice | int = slice(None)) -> dict:
        t, p, h = (int(np.sum(x[counts])) for x in (self.true, self.predicted, self.hit))
        return {"recall": h / max(t, 1), "precision": h / max(p, 1), "size_ratio": p / max(t, 1),
                "extra_frac": (p - h) / max(t, 1), "missed_frac": (t - h) / max(t, 1)}


def predicted_ffn(tm: TorchModel, sets: SetPolicy, score_thresholds: np.ndarray,
                  criterion: str, counts: SetCounts | None = None) -> FFN:
    """The FFN as the engine computes it with predicted sets: a neuron contributes when it was
    predicted (read) and its true score clears the threshold."""
    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        coef, score = scores(tm, layer, h, criterion)
        truth = score > float(score_thresholds[layer])
        pred = sets(layer, h.reshape(-1, h.shape[-1])).reshape(truth.shape)
        if counts is not None:
            counts.add(layer, truth, pred)
        return ffn_output(tm, layer, coef * (truth & pred))
    return ffn


# ------------------------------------------------------------------ files

def check_predictor(p: Predictor, source_hash: str, n_layers: int, d_model: int, d_ffn: int,
                    where: str = "predictor") -> None:
    """Refuse a predictor trained for another model or shape."""
    differ = []
    if p.source_hash != source_hash:
        differ.append(f"checkpoint hash {p.source_hash} vs {source_hash}")
    for name, mine, theirs in (("layers", p.n_layers, n_layers), ("d_model", p.d_model, d_model),
                               ("d_ffn", p.d_ffn, d_ffn)):
        if mine != theirs:
            differ.append(f"{name} {mine} vs {theirs}")
    if differ:
        raise PredictorError(f"{where} was trained for another model ({'; '.join(differ)}); "
                             "run `ripple train-predictor` for this one")


def predictor_path(path: str | os.PathLike) -> Path:
    """A layout folder's predictor, or the file itself."""
    p = Path(path)
    return p / PREDICTOR_FILE if p.is_dir() else p


def save_predictor(p: Predictor, path: str | os.PathLike) -> Path:
    path = predictor_path(path)
    header = dict(sparsity=p.sparsity, criterion=p.criterion,
                  recall_target=p.recall_target, source_hash=p.source_hash,
                  activation=p.activation, n_layers=p.n_layers, d_model=p.d_model,
                  d_ffn=p.d_ffn, rank=p.rank, meta=p.meta)
    save_headed(path, FORMAT, header, dict(a=p.a, a_bias=p.a_bias, b=p.b, b_bias=p.b_bias,
                                           thresholds=p.thresholds, score_thresholds=p.score_thresholds))
    return path


def load_predictor(path: str | os.PathLike) -> Predictor:
    path = predictor_path(path)
    def build(h: dict, z: dict) -> tuple[Predictor, dict]:
        return Predictor(z["a"], z["a_bias"], z["b"], z["b_bias"], z["thresholds"],
                         z["score_thresholds"], float(h["sparsity"]), h["criterion"],
                         float(h["recall_target"]), h["source_hash"], h["activation"], h["meta"]), h
    p, h = load_headed(path, FORMAT, build, PredictorError, "predictor", "ripple train-predictor")
    shapes = (p.n_layers, p.d_model, p.d_ffn, p.rank)
    if shapes != (h["n_layers"], h["d_model"], h["d_ffn"], h["rank"]) or \
            p.b.shape[:2] != (p.n_layers, p.rank) or len(p.thresholds) != p.n_layers:
        raise PredictorError(f"{path}: arrays disagree with its header; run `ripple train-predictor` again")
    return p
