"""The params tuple of a compiled model (compile.model_graph.param_layout) from its checkpoint.

Matrices stay as the GGUF stores them (Q4_1 / Q8_0 blocks, multiplied in place by the compiled
GEMVs): a GGUF's own blocks are copied; a Hugging Face folder's float matrices are quantized to
Q8_0 here (gguf.quants, the same bytes llama.cpp would write), near lossless at 8.5 bits a value.
q, k and v rows are concatenated, so one GEMV computes all three. Norms, biases, positions and
RoPE frequencies stay float32; the predictor's matrices float16, as trained.
"""
from __future__ import annotations

import numpy as np

from ..compile.app_params import Q8, q8_blocks
from ..compile.model_graph import LAYER_SPARSE, DecodeSpec


def matrix_kinds(desc) -> dict[str, str]:
    """The block kind of each stored matrix (embed, lm_head, qkv, o): a GGUF's own when it is
    Q4_1 / Q8_0 throughout, else Q8_0 (quantized by model_params)."""
    from ..tuning.forward import quantizable_non_ffn
    if not quantizable_non_ffn(desc):
        return {"embed": Q8, "lm_head": Q8, "qkv": Q8, "o": Q8, "gguf_blocks": False}
    model, layers = _stored(desc)
    qkv = {layers[i][f].qtype for i in range(desc.n_layers) for f in ("wq", "wk", "wv")}
    o = {layers[i]["wo"].qtype for i in range(desc.n_layers)}
    kind = lambda qs: _kind(next(iter(qs))) if len(qs) == 1 else Q8  # noqa: E731
    return {"embed": _kind(model["embed"].qtype),
            "lm_head": _kind(model["lm_head"].qtype) if "lm_head" in model else None,
            "qkv": kind(qkv), "o": kind(o), "gguf_blocks": len(qkv) == 1 and len(o) == 1}


def _kind(qtype) -> str | None:
    from ..tuning.quantized_matrix import KIND_OF
    return KIND_OF.get(qtype)


def _is_gguf(desc) -> bool:
    from ..tuning.forward import quantizable_non_ffn
    return quantizable_non_ffn(desc)


def _stored(desc):
    from ..tuning.load_gguf import non_ffn_blocks
    return non_ffn_blocks(desc.source)


def model_params(desc, spec: DecodeSpec, predictor=None, lookahead=None) -> dict[str, np.ndarray]:
    """Every tensor param_layout(spec) names, from desc (a tuning.model.ModelDesc with its
    weights) and, for sparse layers, the predictor (tuning.predictor.Predictor) and the
    lookahead predictors of the distances spec.lookahead names (tuning.lookahead.Lookahead)."""
    kinds = (spec.embed_kind, spec.qkv_kind, spec.o_kind, spec.lm_head_kind)
    stored = _stored(desc) if any(k not in (None, Q8) for k in kinds) or _is_gguf(desc) else None

    def blocks(kind: str, where: str, w: np.ndarray, layer: int | None = None) -> np.ndarray:
        """The file's own blocks when they are of `kind`, else w quantized to Q8_0."""
        if stored is not None:
            m = stored[0].get(where) if layer is None else stored[1][layer].get(where)
            if m is not None and _kind(m.qtype) == kind:
                return np.ascontiguousarray(m.raw)
        if kind != Q8:
            raise ValueError(f"{desc.source}: {where} is not stored as {kind}; compile it with Q8_0 matrices")
        return q8_blocks(w)

    out: dict[str, np.ndarray] = {"embed": blocks(spec.embed_kind, "embed", desc.embed)}
    if spec.pos_rows:
        out["pos_embed"] = np.ascontiguousarray(desc.pos_embed, np.float32)
    if spec.rope:
        hd = desc.head_dim
        inv = 1.0 / (desc.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        out["inv_freq"] = inv.astype(np.float32)      # as tuning.forward: float64, then float32
    f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    for i, lw in enumerate(desc.layers):
        out[f"l{i}.attn_norm"] = f32(lw.attn_norm)
        if spec.norm == "layer":
            out[f"l{i}.attn_norm_b"] = f32(lw.attn_norm_b)
        out[f"l{i}.wqkv"] = np.concatenate([blocks(spec.qkv_kind, f, getattr(lw, f), i) for f in ("wq", "wk", "wv")])
        if spec.bias:
            out[f"l{i}.bqkv"] = f32(np.concatenate([lw.bq, lw.bk, lw.bv]))
        out[f"l{i}.wo"] = blocks(spec.o_kind, "wo", lw.wo, i)
        if spec.bias:
            out[f"l{i}.bo"] = f32(lw.bo)
        out[f"l{i}.ffn_norm"] = f32(lw.ffn_norm)
        if spec.norm == "layer":
            out[f"l{i}.ffn_norm_b"] = f32(lw.ffn_norm_b)
        if spec.bias:
            out[f"l{i}.b_down"] = f32(lw.b_down)
        if spec.layer_mode[i] == LAYER_SPARSE and spec.predictor_rank:
            f16 = lambda a: np.ascontiguousarray(a, np.float16)  # noqa: E731
            out[f"l{i}.pred_a"], out[f"l{i}.pred_a_bias"] = f16(predictor.a[i]), f16(predictor.a_bias[i])
            out[f"l{i}.pred_b"], out[f"l{i}.pred_b_bias"] = f16(predictor.b[i]), f16(predictor.b_bias[i])
        if spec.lookahead and spec.lookahead[i]:
            k = lookahead.distances.index(spec.lookahead[i])
            for name in ("a", "a_bias", "b", "b_bias"):
                out[f"l{i}.la_{name}"] = np.ascontiguousarray(getattr(lookahead, name)[k, i], np.float16)
    out["final_norm"] = f32(desc.final_norm)
    if spec.norm == "layer":
        out["final_norm_b"] = f32(desc.final_norm_b)
    if spec.lm_head_kind is not None:
        out["lm_head"] = blocks(spec.lm_head_kind, "lm_head", desc.lm_head)
    return out
