"""The whole decode step of a model as one Relax module: what `ripple compile` builds into APP/.

    prefill(tokens (n,) int32, kv, pos Shape[p], params) -> logits (1, vocab) f32
    decode (token  (1,) int32, kv, pos Shape[p], params) -> logits (1, vocab) f32

Both run the same layers on the step's n tokens (decode: n = 1), placed at positions p..p+n-1,
and return the last token's logits. kv (L, 2, max_len, n_kv * head_dim) is the KV cache: the
caller allocates it once and passes it to every call; attention writes the step's keys and
values into it in place. params is one tuple of tensors, in the order `param_layout` names.

Per layer: norm, one GEMV over the concatenated q/k/v rows (GGUF blocks), attention (RoPE, KV
in place), the output GEMV, norm, then the FFN through the native flash runtime
(compile/native, registered as packed functions):
  a layer read whole:  raw = ripple.rt.whole(layer), the layer's extent of the whole copy (the
                       GGUF's own gate/up/down blocks, read ahead by the runtime); the GEMVs
                       multiply it where it lies;
  a sparse layer:      logits = the low-rank predictor on the layer input; bundles =
                       ripple.rt.fetch(layer, logits), the bundles of the predicted neurons
                       (cache, plan, O_DIRECT reads in the runtime); the sparse kernel keeps the
                       read neurons whose own score clears the layer's threshold (compile.ffn).
  lookahead (DecodeSpec.lookahead[t] = j > 0): once layer t - j's FFN input is known, layer t's
                       set is predicted from it (tuning.lookahead) and ripple.rt.prefetch(t,
                       logits) queues its reads, which run while layers t-j..t-1 compute; layer
                       t's fetch takes them and reads the rest of its own set on demand, so the
                       neurons computed are the same-layer predictor's.
Which layers are read whole is decided at compile time (android_host.app_build) and is the same for the
graph and the runtime's config. Python does not sit between layers: the VM runs the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

from ..layout.bundle import BundleSpec
from . import decode_kernels as K
from .ffn import VIEW_DTYPE, buffer_cols, sparse_ffn
from .qgemv import qgemm, qgemv, row_bytes, schedule_qgemv
from .schedule import DEFAULT, Knobs, schedule_sparse

WHOLE, FETCH, PREFETCH = "ripple.rt.whole", "ripple.rt.fetch", "ripple.rt.prefetch"
FUNCTIONS = ("prefill", "decode")
LAYER_WHOLE, LAYER_SPARSE = 1, 0


@dataclass(frozen=True)
class WholeParts:
    """A whole copy's parts, the same in every layer (layout.whole_copy.Part): (name, kind,
    rows, cols, byte offset in the layer's extent)."""
    layer_bytes: int
    parts: tuple[tuple[str, str, int, int, int], ...]


@dataclass(frozen=True)
class DecodeSpec:
    arch: str                       # "llama" | "opt" (tuning.model.ARCHS)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ffn: int
    vocab: int
    norm: str                       # "rms" | "layer"
    norm_eps: float
    rope: bool
    activation: str                 # "swiglu" | "relu"
    kv_dtype: str                   # "float16" | "float32"
    embed_kind: str                 # q4_1 | q8_0
    lm_head_kind: str | None        # None: tied to the embedding
    qkv_kind: str
    o_kind: str
    bias: bool                      # q/k/v/o biases (OPT)
    pos_rows: int                   # rows of the learned position table (0: none)
    pos_offset: int
    layer_mode: tuple[int, ...]     # per layer: LAYER_WHOLE or LAYER_SPARSE
    whole: WholeParts | None
    bundle: BundleSpec | None
    knobs: Knobs = DEFAULT
    keep: str = "coef"              # the sparse kernel's criterion (compile.ffn keep=)
    score_thresholds: tuple[float, ...] = ()
    predictor_rank: int = 0         # 0: no predictor, the runtime fetches every bundle
    lookahead: tuple[int, ...] = ()  # per layer: prefetched from this many layers before (0: not)
    lookahead_rank: int = 0

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def qkv_rows(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.layer_mode) if m == LAYER_SPARSE]

    def prefetched_from(self, source: int) -> list[int]:
        """The layers whose sets are predicted, and reads issued, at layer `source`'s FFN input."""
        return [t for t, j in enumerate(self.lookahead) if j and t - j == source]


def param_layout(s: DecodeSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor of the params tuple, in order."""
    def blocks(kind: str, rows: int, cols: int):
        return (rows, row_bytes(kind, cols)), "uint8"

    d, out = s.d_model, []
    out.append(("embed", *blocks(s.embed_kind, s.vocab, d)))
    if s.pos_rows:
        out.append(("pos_embed", (s.pos_rows, d), "float32"))
    if s.rope:
        out.append(("inv_freq", (s.head_dim // 2,), "float32"))
    for i in range(s.n_layers):
        out.append((f"l{i}.attn_norm", (d,), "float32"))
        if s.norm == "layer":
            out.append((f"l{i}.attn_norm_b", (d,), "float32"))
        out.append((f"l{i}.wqkv", *blocks(s.qkv_kind, s.qkv_rows, d)))
        if s.bias:
            out.append((f"l{i}.bqkv", (s.qkv_rows,), "float32"))
        out.append((f"l{i}.wo", *blocks(s.o_kind, d, s.n_heads * s.head_dim)))
        if s.bias:
            out.append((f"l{i}.bo", (d,), "float32"))
        out.append((f"l{i}.ffn_norm", (d,), "float32"))
        if s.norm == "layer":
            out.append((f"l{i}.ffn_norm_b", (d,), "float32"))
        if s.bias:
            out.append((f"l{i}.b_down", (d,), "float32"))
        if s.layer_mode[i] == LAYER_SPARSE and s.predictor_rank:
            r, n = s.predictor_rank, s.d_ffn
            out += [(f"l{i}.pred_a", (d, r), "float16"), (f"l{i}.pred_a_bias", (r,), "float16"),
                    (f"l{i}.pred_b", (r, n), "float16"), (f"l{i}.pred_b_bias", (n,), "float16")]
        if s.lookahead and s.lookahead[i]:
            r, n = s.lookahead_rank, s.d_ffn
            out += [(f"l{i}.la_a", (d, r), "float16"), (f"l{i}.la_a_bias", (r,), "float16"),
                    (f"l{i}.la_b", (r, n), "float16"), (f"l{i}.la_b_bias", (n,), "float16")]
    out.append(("final_norm", (d,), "float32"))
    if s.norm == "layer":
        out.append(("final_norm_b", (d,), "float32"))
    if s.lm_head_kind is not None:
        out.append(("lm_head", *blocks(s.lm_head_kind, s.vocab, d)))
    return out


def _gemv(kind: str, rows: int, cols: int, flat=None, tokens=None) -> tirx.PrimFunc:
    """The GEMV for a call on `tokens` rows of x: a decode token's (n = 1, tuned for one token),
    or a prompt's (symbolic n: qgemm, each block dequantized once for all the tokens)."""
    if isinstance(tokens, tirx.Var):
        return K.opaque(qgemm(kind, rows, cols, flat))
    func, stages = qgemv(kind, rows, cols, flat)
    return K.opaque(schedule_qgemv(func, stages, rows)["main"])


def _gemv_key(kind: str, rows: int, cols: int, tokens) -> str:
    return f"{'gemm' if isinstance(tokens, tirx.Var) else 'gemv'}_{kind}_{rows}x{cols}"


class _Kernels:
    """Each kernel added to the module once, by a key."""

    def __init__(self, bb: relax.BlockBuilder):
        self.bb, self.gv = bb, {}

    def __call__(self, key: str, make):
        if key not in self.gv:
            self.gv[key] = self.bb.add_func(make().without_attr("global_symbol"), key)
        return self.gv[key]


def decode_module(s: DecodeSpec) -> tvm.IRModule:
    """The Relax module of prefill and decode for spec s (see the module docstring)."""
    if s.lookahead and (len(s.lookahead) != s.n_layers or not s.lookahead_rank or any(
            j and (j > t or s.layer_mode[t] != LAYER_SPARSE) for t, j in enumerate(s.lookahead))):
        raise ValueError("lookahead: one distance per layer, > 0 only for sparse layers and at most the "
                         "layer's index, with a predictor rank")
    if s.whole is None and LAYER_WHOLE in s.layer_mode:
        raise ValueError("layers read whole need the layout's whole copy (ripple pack --whole-copy)")
    if s.bundle is None and LAYER_SPARSE in s.layer_mode:
        raise ValueError("sparse layers need the layout's bundle spec")
    bb = relax.BlockBuilder()
    kern = _Kernels(bb)
    names = [name for name, _, _ in param_layout(s)]
    ptypes = [relax.TensorType(list(shape), dtype) for _, shape, dtype in param_layout(s)]
    for fname in FUNCTIONS:
        _step_function(bb, kern, s, fname, names, ptypes)
    return bb.get()


def _step_function(bb, kern, s: DecodeSpec, fname: str, names, ptypes) -> None:
    d = s.d_model
    n = tirx.IntImm("int64", 1) if fname == "decode" else tirx.Var("n", "int64")
    m, p = tirx.Var("m", "int64"), tirx.Var("p", "int64")
    tokens = relax.Var("tokens", relax.TensorType([n], "int32"))
    kv_type = relax.TensorType([s.n_layers, 2, m, s.kv_dim], s.kv_dtype)
    kv = relax.Var("kv", kv_type)
    pos = relax.Var("pos", relax.ShapeType([p]))
    params = relax.Var("params", relax.TupleType(ptypes))

    def act(width, rows=n):
        return relax.TensorType([rows, width], "float32")

    # Impure: the flash runtime's calls read files and keep state.
    with bb.function(fname, [tokens, kv, pos, params], pure=False):
        P = {name: bb.emit(relax.TupleGetItem(params, i), name_hint=name.replace(".", "_"))
             for i, name in enumerate(names)}

        def call(key, make, args, width, rows=n):
            return bb.emit(relax.call_tir(kern(key, make), relax.Tuple(list(args)), out_ty=act(width, rows)))

        def gemv(x, w, kind, rows, cols, bias=None):
            y = call(_gemv_key(kind, rows, cols, n), lambda: _gemv(kind, rows, cols, tokens=n), (x, w), rows)
            return y if bias is None else bb.emit(relax.op.add(y, bias))

        def normed(x, w, b, rows=n):
            if s.norm == "rms":
                return call("rms_norm", lambda: K.rms_norm(d, s.norm_eps), (x, w), d, rows)
            return call("layer_norm", lambda: K.layer_norm(d, s.norm_eps), (x, w, b), d, rows)

        x = call(f"embed_{s.embed_kind}", lambda: K.embed_rows(s.embed_kind, s.vocab, d),
                 (tokens, P["embed"]), d)
        if s.pos_rows:
            x = bb.emit(relax.call_tir(kern("add_positions", lambda: K.add_positions(d, s.pos_offset)),
                                       relax.Tuple([x, P["pos_embed"], relax.prim_value(p)]), out_ty=act(d)))
        inv_freq = P["inv_freq"] if s.rope else relax.const(np.zeros(max(s.head_dim // 2, 1), np.float32))
        for i in range(s.n_layers):
            h = normed(x, P[f"l{i}.attn_norm"], P.get(f"l{i}.attn_norm_b"))
            qkv = gemv(h, P[f"l{i}.wqkv"], s.qkv_kind, s.qkv_rows, d, P.get(f"l{i}.bqkv"))
            att = bb.emit(relax.call_tir_inplace(
                kern("attention", lambda: K.attention(s.n_heads, s.n_kv_heads, s.head_dim, s.kv_dtype, s.rope)),
                relax.Tuple([qkv, kv, inv_freq, relax.prim_value(tirx.IntImm("int64", i)), relax.prim_value(p)]),
                inplace_indices=[1, -1], out_ty=[kv_type, act(s.n_heads * s.head_dim)]))
            kv = bb.emit(relax.TupleGetItem(att, 0))
            o = gemv(bb.emit(relax.TupleGetItem(att, 1)), P[f"l{i}.wo"], s.o_kind, d, s.n_heads * s.head_dim,
                     P.get(f"l{i}.bo"))
            x = bb.emit(relax.op.add(x, o))
            h = normed(x, P[f"l{i}.ffn_norm"], P.get(f"l{i}.ffn_norm_b"))
            for t in s.prefetched_from(i):      # issued before this layer's FFN: its compute hides them too
                _prefetch(bb, kern, s, t, h, n, P)
            y = _whole_ffn(bb, kern, s, i, h, n) if s.layer_mode[i] == LAYER_WHOLE else \
                _sparse_ffn(bb, kern, s, i, h, n, P, fname)
            if s.bias:
                y = bb.emit(relax.op.add(y, P[f"l{i}.b_down"]))
            x = bb.emit(relax.op.add(x, y))
        last = bb.emit(relax.call_tir(kern("last_row", lambda: K.last_row(d)), relax.Tuple([x]),
                                      out_ty=relax.TensorType([1, d], "float32")))
        h = normed(last, P["final_norm"], P.get("final_norm_b"), rows=1)
        kind = s.lm_head_kind or s.embed_kind
        head = P["lm_head"] if s.lm_head_kind else P["embed"]
        logits = bb.emit(relax.call_tir(kern(f"gemv_{kind}_{s.vocab}x{d}", lambda: _gemv(kind, s.vocab, d)),
                                        relax.Tuple([h, head]), out_ty=relax.TensorType([1, s.vocab], "float32")))
        bb.emit_func_output(logits)


def _whole_ffn(bb, kern, s: DecodeSpec, layer: int, h, n):
    """y = down(silu(gate h) * up h) on the layer's whole-copy extent as the runtime holds it."""
    w = s.whole
    raw = bb.emit(relax.Call(relax.ExternFunc(WHOLE), [relax.prim_value(tirx.IntImm("int64", layer))],
                             ty_args=[relax.TensorType([w.layer_bytes], "uint8")]))
    parts = {name: (kind, rows, cols, at) for name, kind, rows, cols, at in w.parts}

    def gemv(x, kind, rows, cols, at):
        key = f"whole_{_gemv_key(kind, rows, cols, n)}_at{at}"
        return bb.emit(relax.call_tir(kern(key, lambda: _gemv(kind, rows, cols, (w.layer_bytes, at), n)),
                                      relax.Tuple([x, raw]), out_ty=relax.TensorType([n, rows], "float32")))

    gk, gr, gc, gat = parts["gate"]
    uk, ur, uc, uat = parts["up"]
    if gk == uk and uat == gat + gr * row_bytes(gk, gc):
        # gate and up blocks lie back to back: one GEMV over both.
        gu = gemv(h, gk, 2 * gr, gc, gat)
    else:
        gu = bb.emit(relax.op.concat([gemv(h, gk, gr, gc, gat), gemv(h, uk, ur, uc, uat)], axis=1))
    a = bb.emit(relax.call_tir(kern(f"silu_mul_{gr}", lambda: K.silu_mul(gr)), relax.Tuple([gu]),
                               out_ty=relax.TensorType([n, gr], "float32")))
    dk, dr, dc, dat = parts["down"]
    return gemv(a, dk, dr, dc, dat)


def _logits(bb, kern, s: DecodeSpec, h, n, rank: int, w):
    """(n, d_ffn) float32: a low-rank predictor (a, a_bias, b, b_bias) on the FFN input h."""
    N = s.d_ffn
    return bb.emit(relax.call_tir(
        kern(f"predictor_r{rank}", lambda: K.opaque(K.schedule_predictor(K.predictor_logits(s.d_model, rank, N)))),
        relax.Tuple([h, *w]), out_ty=relax.TensorType([n, N], "float32")))


def _prefetch(bb, kern, s: DecodeSpec, target: int, h, n, P) -> None:
    """Layer `target`'s set predicted from this layer's FFN input, its reads queued."""
    w = [P[f"l{target}.la_{k}"] for k in ("a", "a_bias", "b", "b_bias")]
    logits = _logits(bb, kern, s, h, n, s.lookahead_rank, w)
    bb.emit(relax.Call(relax.ExternFunc(PREFETCH), [relax.prim_value(tirx.IntImm("int64", target)), logits],
                       ty_args=[relax.ObjectType()]))


def _sparse_ffn(bb, kern, s: DecodeSpec, layer: int, h, n, P, fname: str):
    """The predicted neurons' bundles fetched by the runtime, then the thresholded sparse kernel."""
    spec, N = s.bundle, s.d_ffn
    if s.predictor_rank:
        logits = _logits(bb, kern, s, h, n, s.predictor_rank,
                         [P[f"l{layer}.pred_{k}"] for k in ("a", "a_bias", "b", "b_bias")])
    else:       # no predictor: the runtime fetches every bundle (its config says sets_all)
        logits = bb.emit(relax.op.zeros(relax.ShapeExpr([n, N]), "float32"))
    cols, vdt = buffer_cols(spec), VIEW_DTYPE[spec.dtype]
    got = bb.emit(relax.Call(relax.ExternFunc(FETCH), [relax.prim_value(tirx.IntImm("int64", layer)), logits],
                             ty_args=[relax.TensorType(ndim=2, dtype=vdt)]))
    k = tirx.Var("k", "int64")
    bundles = bb.match_cast(got, relax.TensorType([k, cols], vdt))
    thr = relax.const(np.array([s.score_thresholds[layer]], np.float32))
    d = s.d_model
    if fname == "decode":
        x = bb.emit(relax.op.reshape(h, [d]))
        y = bb.emit(relax.call_tir(
            kern("sparse_ffn", lambda: K.opaque(schedule_sparse(sparse_ffn(spec, s.keep), spec, s.knobs)["main"])),
            relax.Tuple([x, bundles, thr]), out_ty=relax.TensorType([d], "float32")))
        return bb.emit(relax.op.reshape(y, [1, d]))
    from .ffn import sparse_ffn_tokens
    return bb.emit(relax.call_tir(kern("sparse_ffn_tokens", lambda: K.opaque(sparse_ffn_tokens(spec, s.keep))),
                                  relax.Tuple([h, bundles, thr]), out_ty=relax.TensorType([n, d], "float32")))
