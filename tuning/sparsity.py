"""Which FFN neurons count as active, and what that costs in perplexity.

A neuron is active for a token when its score exceeds the layer's threshold. Scores:
- `coef`: |silu(gate)*up| (SwiGLU) or relu(up) (ReLU), the magnitude of what W_down receives,
  so dropping the smallest ones perturbs the output least;
- `gate`: |silu(gate)| alone (CATS); SwiGLU only.
Thresholds are per-layer quantiles of the calibration scores, so sparsity s drops a
fraction s of (token, neuron) pairs in every layer. A ReLU layer's zeros are inactive at
any s (threshold >= 0), so its sparsity is at least the natural one.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .forward import FFN, TorchModel, ffn_output, ffn_parts, forward

CRITERIA = ("coef", "gate")
ALL_ACTIVE = -1.0   # a threshold below every score: dense


def scores(tm: TorchModel, layer: int, h: torch.Tensor, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficient, score) per neuron for the normalised FFN input h."""
    coef, gate = ffn_parts(tm, layer, h)
    if criterion == "gate":
        if gate is None:
            raise ValueError("criterion 'gate' needs a gated (SwiGLU) FFN; use 'coef' for ReLU models")
        return coef, gate.abs()
    return coef, coef.abs()


def thresholds_for(layer_scores: np.ndarray, sparsity: float) -> float:
    if sparsity <= 0:
        return ALL_ACTIVE
    return float(max(np.quantile(layer_scores.astype(np.float32), sparsity), 0.0))


def sparse_ffn(tm: TorchModel, thresholds: np.ndarray, criterion: str) -> FFN:
    """The FFN with inactive neurons' coefficients zeroed (what the flash engine computes)."""
    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        coef, score = scores(tm, layer, h, criterion)
        return ffn_output(tm, layer, coef * (score > float(thresholds[layer])))
    return ffn


def perplexity(tm: TorchModel, seqs: list[np.ndarray], ffn: FFN | None = None) -> float:
    nll, count = 0.0, 0
    for seq in seqs:
        t = torch.from_numpy(seq)[None]
        logits = forward(tm, t[:, :-1], ffn=ffn)
        nll += float(F.cross_entropy(logits[0], t[0, 1:], reduction="sum"))
        count += len(seq) - 1
    return math.exp(nll / max(count, 1))
