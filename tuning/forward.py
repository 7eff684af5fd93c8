"""The torch forward pass of a ModelDesc, with the FFN as a pluggable function.

The reference (dense FFN from DRAM), the profiler (records FFN coefficients), the sparsity
evaluation (thresholded FFN) and the flash-backed engine (FFN from bundles read per token)
all run this same code and differ only in the `ffn` they pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F

from .load_gguf import StoredMatrix, non_ffn_blocks
from .model import ARCHS, OPT_POSITION_OFFSET, ModelDesc, checkpoint_hash
from .quantized_matrix import KIND_OF, QuantizedMatrix

# ffn(layer, h) -> FFN output; h is the normalised layer input, (B, T, d).
FFN = Callable[[int, torch.Tensor], torch.Tensor]
# A non-FFN matrix: a tensor (fp32, bf16) or GGUF blocks (to_torch_quantized).
Weight = Union[torch.Tensor, QuantizedMatrix]


@dataclass
class TorchModel:
    desc: ModelDesc
    embed: Weight
    lm_head: Weight
    final_norm: torch.Tensor
    final_norm_b: torch.Tensor | None
    pos_embed: torch.Tensor | None
    layers: list[dict[str, Weight | None]]
    inv_freq: torch.Tensor | None


@dataclass
class KVCache:
    k: list[torch.Tensor]        # per layer (B, n_kv_heads, max_len, head_dim)
    v: list[torch.Tensor]
    length: int = 0


FFN_WEIGHTS = ("w_gate", "w_up", "w_down", "b_up")
MATRICES = ("wq", "wk", "wv", "wo")   # with embed/lm_head: the non-FFN weights `dtype` applies to


def to_torch(desc: ModelDesc, dtype: torch.dtype = torch.float32, ffn: bool = True) -> TorchModel:
    """dtype: storage of the attention matrices and embeddings/LM head (norms, biases and the
    residual stream stay fp32; `linear` computes in that dtype with fp32 accumulation).
    ffn=False: no FFN weight matrices at all (b_down stays), for engines that read them from
    flash; the returned desc then carries dimensions only, so dropping the caller's desc frees
    the float32 arrays load_model built."""
    embed = _t(desc.embed, dtype)
    lm_head = embed if desc.lm_head is desc.embed else _t(desc.lm_head, dtype)
    lean = dtype != torch.float32 or not ffn
    return _torch_model(desc, ffn, lambda layer, name: _t(getattr(desc.layers[layer], name), dtype),
                        embed, lm_head, lean)


def to_torch_quantized(desc: ModelDesc, ffn: bool = False) -> TorchModel:
    """to_torch with the attention matrices and the embedding/LM head as the GGUF stores them
    (QuantizedMatrix: Q4_1 or Q8_0 blocks, products by compiled GEMVs), read again from
    desc.source, the GGUF file desc was loaded from; norms and biases fp32. ffn: as in
    to_torch (True keeps the FFN matrices in float32). The returned desc carries dimensions
    only. ValueError for a source that is not that GGUF, or a tensor of another type."""
    model, layers = _stored_non_ffn(desc)

    def held(m: StoredMatrix) -> QuantizedMatrix:
        return QuantizedMatrix.from_blocks(m.raw, KIND_OF[m.qtype], m.shape)

    embed = held(model["embed"])
    lm_head = embed if desc.lm_head is desc.embed else held(model["lm_head"])
    return _torch_model(desc, ffn, lambda layer, name: held(layers[layer][name]), embed, lm_head, lean=True)


def quantizable_non_ffn(desc: ModelDesc) -> bool:
    """Whether to_torch_quantized takes desc: loaded from a GGUF file whose attention matrices
    and embedding/LM head are all Q4_1 or Q8_0."""
    try:
        _stored_non_ffn(desc)
    except ValueError:
        return False
    return True


def _stored_non_ffn(desc: ModelDesc) -> tuple[dict[str, StoredMatrix], list[dict[str, StoredMatrix]]]:
    """load_gguf.non_ffn_blocks of desc's source, checked against desc (views of the file)."""
    src = Path(desc.source)
    if not src.is_file() or src.suffix != ".gguf" or checkpoint_hash(src) != desc.source_hash:
        raise ValueError(f"{desc.source}: quantized non-FFN weights are the blocks of the GGUF file "
                         f"the model was loaded from, and this is not it; load a GGUF model, or use "
                         f"to_torch (bf16/fp32) for this one")
    model, layers = non_ffn_blocks(src)
    want = [(model["embed"], desc.embed)] + ([(model["lm_head"], desc.lm_head)] if "lm_head" in model else [])
    want += [(blocks[name], getattr(lw, name)) for blocks, lw in zip(layers, desc.layers) for name in MATRICES]
    for m, a in want:
        if m.qtype not in KIND_OF:
            raise ValueError(f"{src}: tensor {m.name} is {m.qtype.name}; quantized non-FFN weights "
                             f"support {sorted(q.name for q in KIND_OF)} (use to_torch for this model)")
        if m.shape != a.shape:
            raise ValueError(f"{src}: tensor {m.name} has shape {m.shape}, the model {a.shape}")
    return model, layers


def _t(a, as_dtype=torch.float32):
    if a is None:
        return None
    w = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return w if as_dtype == torch.float32 else w.to(as_dtype)


def _torch_model(desc: ModelDesc, ffn: bool, matrix: Callable[[int, str], Weight],
                 embed: Weight, lm_head: Weight, lean: bool) -> TorchModel:
    """The TorchModel of desc with MATRICES from matrix(layer, name), everything else fp32."""
    layers = [{name: None if not ffn and name in FFN_WEIGHTS else
               matrix(i, name) if name in MATRICES else _t(getattr(lw, name))
               for name in lw.__dataclass_fields__} for i, lw in enumerate(desc.layers)]
    inv_freq = None
    if ARCHS[desc.arch]["positions"] == "rope":
        hd = desc.head_dim
        inv_freq = 1.0 / (desc.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        inv_freq = inv_freq.float()
    return TorchModel(dims_only(desc) if lean else desc, embed, lm_head, _t(desc.final_norm),
                      _t(desc.final_norm_b), _t(desc.pos_embed), layers, inv_freq)


def dims_only(desc: ModelDesc) -> ModelDesc:
    """desc without its weight arrays (dimensions, ids and source only)."""
    return dataclasses.replace(desc, embed=None, lm_head=None, final_norm=None, final_norm_b=None,
                               pos_embed=None, layers=[])


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for fp32 x and a weight stored in fp32, bf16 or GGUF blocks. A bf16 weight
    computes in bf16 (fp32 accumulation inside the kernel, x and the result rounded to bf16):
    on this CPU (AVX-512 BF16) torch.mv over the 49152x576 LM head took 2.95 ms in bf16
    against 8.4 ms in fp32, F.linear 6.1 ms; a 576x576 layer 27 us against 18 us (one
    thread). Blocks (QuantizedMatrix) go through the compiled GEMV, in fp32."""
    if isinstance(w, QuantizedMatrix):
        y = w.matmul(x)
        return y if b is None else y + b
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    if x.numel() == x.shape[-1]:
        y = torch.mv(w, x.reshape(-1).to(w.dtype)).reshape(*x.shape[:-1], w.shape[0])
    else:
        y = F.linear(x.to(w.dtype), w)
    y = y.to(x.dtype)
    return y if b is None else y + b


def embedding(embed: Weight, tokens: torch.Tensor) -> torch.Tensor:
    """float32 (*tokens.shape, d): the looked-up rows only (blocks: only those dequantized)."""
    if isinstance(embed, QuantizedMatrix):
        return embed.rows(tokens)
    return embed[tokens].float()


def new_cache(tm: TorchModel, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> KVCache:
    """dtype: what keys and values are stored in (float16 halves the DRAM, as llama.cpp's
    default f16 KV cache); attention widens them back to fp32."""
    d = tm.desc
    shape = (batch, d.n_kv_heads, max_len, d.head_dim)
    return KVCache([torch.zeros(shape, dtype=dtype) for _ in range(d.n_layers)],
                   [torch.zeros(shape, dtype=dtype) for _ in range(d.n_layers)])


def norm(tm: TorchModel, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if ARCHS[tm.desc.arch]["norm"] == "rms":
        return F.rms_norm(x, (x.shape[-1],), w, tm.desc.norm_eps)
    return F.layer_norm(x, (x.shape[-1],), w, b, tm.desc.norm_eps)


def ffn_parts(tm: TorchModel, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(coefficient, silu(gate)) per neuron. The coefficient is what W_down multiplies:
    silu(gate)*up for SwiGLU, relu(up + b) for ReLU (which has no gate: None)."""
    w = tm.layers[layer]
    up = F.linear(h, w["w_up"], w["b_up"])
    if tm.desc.activation == "swiglu":
        gate = F.silu(F.linear(h, w["w_gate"]))
        return gate * up, gate
    return F.relu(up), None


def ffn_coefficients(tm: TorchModel, layer: int, h: torch.Tensor) -> torch.Tensor:
    return ffn_parts(tm, layer, h)[0]


def ffn_output(tm: TorchModel, layer: int, coef: torch.Tensor) -> torch.Tensor:
    w = tm.layers[layer]
    return F.linear(coef, w["w_down"], w["b_down"])


def dense_ffn(tm: TorchModel) -> FFN:
    return lambda layer, h: ffn_output(tm, layer, ffn_coefficients(tm, layer, h))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rotation(tm: TorchModel, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RoPE's (cos, sin) at these positions, (B or 1, 1, T, head_dim): once per forward, for
    every layer (per layer they were ~5% of a decode step's torch calls)."""
    if tm.inv_freq is None:
        return None
    freqs = pos.float()[..., None] * tm.inv_freq                      # (B or 1, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]                  # (B or 1, 1, T, hd)
    return emb.cos(), emb.sin()


def _attention(tm: TorchModel, layer: int, h: torch.Tensor, rot, mask: torch.Tensor | None,
               cache: KVCache | None) -> torch.Tensor:
    """mask: None when every query sees every key (a decode step)."""
    d, w = tm.desc, tm.layers[layer]
    B, T, _ = h.shape
    q = linear(h, w["wq"], w["bq"]).view(B, T, d.n_heads, d.head_dim).transpose(1, 2)
    k = linear(h, w["wk"], w["bk"]).view(B, T, d.n_kv_heads, d.head_dim).transpose(1, 2)
    v = linear(h, w["wv"], w["bv"]).view(B, T, d.n_kv_heads, d.head_dim).transpose(1, 2)
    if rot is not None:
        q, k = _rope(q, *rot), _rope(k, *rot)
    start = 0
    if cache is not None:
        start = cache.length
        cache.k[layer][:, :, start:start + T] = k
        cache.v[layer][:, :, start:start + T] = v
        k, v = cache.k[layer][:, :, :start + T].float(), cache.v[layer][:, :, :start + T].float()
    # Grouped-query heads share their key/value head inside SDPA (no repeated copies).
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=d.n_kv_heads != d.n_heads)
    return linear(out.transpose(1, 2).reshape(B, T, -1), w["wo"], w["bo"])


@torch.inference_mode()
def forward(tm: TorchModel, tokens: torch.Tensor, cache: KVCache | None = None,
            ffn: FFN | None = None, last_only: bool = False,
            pad: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, vocab) for tokens (B, T); with a cache, tokens continue from cache.length.

    pad (B,): row b is left-padded with pad[b] tokens, which no token attends to and which
    do not count as positions; it lets prompts of different lengths share one batch."""
    return forward_with_grad(tm, tokens, cache, ffn, last_only, pad)


def forward_with_grad(tm: TorchModel, tokens: torch.Tensor, cache: KVCache | None = None,
                      ffn: FFN | None = None, last_only: bool = False,
                      pad: torch.Tensor | None = None) -> torch.Tensor:
    """forward, recording autograd (what training the model's own weights needs: sparsify)."""
    ffn = ffn or dense_ffn(tm)
    start = cache.length if cache is not None else 0
    T = tokens.shape[1]
    if start + T > tm.desc.max_positions:
        raise ValueError(f"sequence of {start + T} tokens exceeds the model's "
                         f"{tm.desc.max_positions} positions; use fewer tokens")
    q_idx = torch.arange(start, start + T, device=tokens.device)
    k_idx = torch.arange(start + T, device=tokens.device)
    mask = (k_idx[None, :] <= q_idx[:, None])[None, None]              # (1, 1, T, S)
    pos = q_idx[None]                                                  # (1, T)
    if pad is not None:
        pos = (pos - pad[:, None]).clamp(min=0)                        # (B, T)
        # A pad token attends to itself only: a row with no key at all would be NaN in SDPA,
        # and NaN values leak through zero attention weights (0 * NaN).
        mask = mask & ((k_idx[None, None, None, :] >= pad[:, None, None, None])
                       | (k_idx[None, :] == q_idx[:, None])[None, None])
    x = embedding(tm.embed, tokens)
    if tm.pos_embed is not None:
        x = x + tm.pos_embed[pos + OPT_POSITION_OFFSET]
    rot = _rotation(tm, pos)
    if T == 1 and pad is None:
        mask = None                      # one query after the cache: it sees every key
    for layer, w in enumerate(tm.layers):
        x = x + _attention(tm, layer, norm(tm, x, w["attn_norm"], w["attn_norm_b"]), rot, mask, cache)
        x = x + ffn(layer, norm(tm, x, w["ffn_norm"], w["ffn_norm_b"]))
    if cache is not None:
        cache.length += T
    if last_only:
        x = x[:, -1:]
    return linear(norm(tm, x, tm.final_norm, tm.final_norm_b), tm.lm_head)
