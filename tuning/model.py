"""One description of a decoder-only transformer, whatever checkpoint it came from.

Weights are float32 numpy arrays in Hugging Face orientation (y = W @ x, so a Linear's
weight is (out, in)). Per-architecture differences live in the ARCHS table, not in code
branches spread over the tree.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# What differs between the families we load; the forward pass reads these, nothing else.
ARCHS = {
    # Llama family (Llama, Mistral, SmolLM2, ProSparse-Llama, TurboSparse-Mistral).
    "llama": {"norm": "rms", "positions": "rope", "activation": "swiglu", "bias": False},
    # OPT family: pre-LayerNorm, learned positions offset by 2, ReLU FFN, biases everywhere.
    "opt": {"norm": "layer", "positions": "learned", "activation": "relu", "bias": True},
}

# OPT's learned position table starts at index 2 (fairseq's padding legacy).
OPT_POSITION_OFFSET = 2


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the path and the fix."""


@dataclass
class LayerWeights:
    attn_norm: np.ndarray                  # (d,)
    wq: np.ndarray                         # (n_heads*head_dim, d)
    wk: np.ndarray                         # (n_kv_heads*head_dim, d)
    wv: np.ndarray                         # (n_kv_heads*head_dim, d)
    wo: np.ndarray                         # (d, n_heads*head_dim)
    ffn_norm: np.ndarray                   # (d,)
    w_up: np.ndarray                       # (n, d)
    w_down: np.ndarray                     # (d, n)
    w_gate: np.ndarray | None = None       # (n, d), SwiGLU only
    # Biases and LayerNorm shifts: OPT only (None for Llama).
    attn_norm_b: np.ndarray | None = None
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None
    ffn_norm_b: np.ndarray | None = None
    b_up: np.ndarray | None = None         # (n,)
    b_down: np.ndarray | None = None       # (d,)


@dataclass
class ModelDesc:
    arch: str                              # key of ARCHS
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ffn: int                             # FFN neurons per layer
    vocab_size: int
    max_positions: int
    norm_eps: float
    rope_theta: float                      # unused for learned positions
    embed: np.ndarray                      # (vocab, d)
    final_norm: np.ndarray                 # (d,)
    lm_head: np.ndarray                    # (vocab, d); tied models share embed's array
    layers: list[LayerWeights]
    final_norm_b: np.ndarray | None = None
    pos_embed: np.ndarray | None = None    # (max_positions + offset, d), learned positions only
    source: str = ""                       # path of the checkpoint file or folder
    source_hash: str = ""                  # see checkpoint_hash
    name: str = ""
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def activation(self) -> str:
        return ARCHS[self.arch]["activation"]

    @property
    def ffn_bytes_fp16(self) -> int:
        mats = 3 if self.activation == "swiglu" else 2
        return self.n_layers * mats * self.d_ffn * self.d_model * 2


def checkpoint_hash(path: str | os.PathLike) -> str:
    """A cheap, stable identity for a checkpoint: blake2b over size, and the first and last MiB
    of every weight file. A layout records it so that it is never used with another model."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir()
        if p.suffix in (".safetensors", ".bin", ".gguf", ".json") and p.is_file())
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > (2 << 20):
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()
