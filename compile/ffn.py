"""The FFN as TVM tensor expressions over the gathered bundle buffer, as it lies in the file.

Sparse kernel: main(x (d,) f32, bundles, y (d,) f32) with k, the number of active bundles, a
symbolic dimension: one compiled kernel serves every k. `bundles` is the reader's buffer of
k bundles, viewed as
  fp16: (k, elems) float16  - gate row | up row | down column   (SwiGLU)
                               up row | down column [| up bias]  (ReLU)
  int8: (k, bundle_bytes) int8 - the same parts as int8, then float32 side data (a scale per
        part, then the up bias) read from the last bytes of each row.
  q4:   (k, bundle_bytes) uint8 - each part as d/32 GGUF Q4_1 blocks (fp16 step, fp16 minimum,
        16 bytes of nibbles), then the float32 up bias; the kernel unpacks the nibbles and the
        block's step and minimum in place (value = step * q + minimum).
  q4d8: (k, bundle_bytes) uint8 - gate/up as q4's, the down column as d int8 values then d/32
        float16 scales (layout.q8): the int8 kernel's down part with a scale per 32 outputs.
y = W_down[:, active] @ act(active rows of W_up/W_gate @ x), without b_down (the engine adds it).

keep="coef"|"gate" adds an input thr (1,) f32 after the bundles: a neuron contributes only if
its own criterion (|coefficient|, or |silu(gate)|) exceeds thr. Predicted sets need it: the
engine reads the predicted bundles and keeps the neurons whose true score, computed from the
rows just read, clears the layer's threshold (runtime_py.engine).

Dense kernel (the baseline it is compared with): the whole FFN from matrices in their usual
layout (W_gate, W_up (n, d), W_down (d, n)), fp16, n fixed at compile time.

Stage names ("gu", "act", "y") are what compile.schedule schedules.
"""
from __future__ import annotations

from tvm import te, tirx

from ..layout import q4, q8
from ..layout.bundle import BundleSpec

_I64 = "int64"
# Which storage dtype a bundle's values are read as, per layout dtype.
VIEW_DTYPE = {"fp16": "float16", "int8": "int8", "q4": "uint8", "q4d8": "uint8"}


def _i64(v: int):
    return tirx.IntImm(_I64, int(v))


def buffer_cols(spec: BundleSpec) -> int:
    """Columns of the (k, cols) view of a gathered buffer the kernel takes."""
    return spec.elems if spec.dtype == "fp16" else spec.bundle_bytes


def gemv_parts(spec: BundleSpec) -> int:
    """Rows of a bundle multiplied with x: gate and up (SwiGLU) or up (ReLU)."""
    return len(spec.parts) - 1


def _side_f32(W, i, byte: int):
    """The float32 at byte offset `byte` of int8 row i (little-endian), read in place."""
    b = [W[i, byte + t].astype("uint8").astype("uint32") for t in range(4)]
    bits = b[0] | (b[1] << tirx.const(8, "uint32")) | (b[2] << tirx.const(16, "uint32")) \
        | (b[3] << tirx.const(24, "uint32"))
    return tirx.reinterpret("float32", bits)


def _f16(W, i, byte):
    """The float16 at byte offset `byte` of uint8 row i (little-endian), as float32."""
    bits = W[i, byte].astype("uint16") | (W[i, byte + 1].astype("uint16") << tirx.const(8, "uint16"))
    return tirx.reinterpret("float16", bits).astype("float32")


KEEP_CRITERIA = ("coef", "gate")


def _keeper(keep: str | None):
    """(extra inputs, kept(a, silu_gate) -> expression) for sparse_ffn's keep option."""
    if keep is None:
        return [], lambda a, sg: a
    if keep not in KEEP_CRITERIA:
        raise ValueError(f"keep {keep!r} is not one of {KEEP_CRITERIA}")
    thr = te.placeholder((_i64(1),), "float32", name="thr")

    def kept(a, sg):
        crit = sg if keep == "gate" else a
        return te.if_then_else(te.abs(crit) > thr[_i64(0)], a, tirx.const(0.0, "float32"))
    return [thr], kept


class _Tokens:
    """The token axis of a batched kernel (x (n, d), y (n, d)), or none (x (d,), y (d,)):
    `lead` prefixes a stage's shape, `at(idx)` splits a stage's indices into (token, rest)."""

    def __init__(self, batched: bool):
        self.n = te.var("n", dtype=_I64) if batched else None
        self.lead = (self.n,) if batched else ()

    def x(self, d):
        return te.placeholder((*self.lead, _i64(d)), "float32", name="x")

    def compute(self, shape, f, name):
        """te.compute over (*lead, *shape) with f(tok, *rest); tok is () when not batched."""
        nl = len(self.lead)
        return te.compute((*self.lead, *shape), lambda *idx: f(idx[:nl], *idx[nl:]), name=name)


def sparse_ffn(spec: BundleSpec, keep: str | None = None, batched: bool = False) -> tirx.PrimFunc:
    """The sparse FFN over a gathered buffer of k bundles (k symbolic); keep: see the module.
    batched: x (n, d) and y (n, d) for the n tokens of a prompt step (n symbolic), every token
    on the same bundles (sparse_ffn_tokens schedules it)."""
    if spec.dtype not in VIEW_DTYPE:
        raise ValueError(f"no kernel for bundle dtype {spec.dtype!r}; kernels exist for "
                         f"{sorted(VIEW_DTYPE)}")
    if keep == "gate" and spec.activation != "swiglu":
        raise ValueError("keep 'gate' needs a gated (SwiGLU) FFN; use 'coef' for ReLU models")
    extra, kept = _keeper(keep)
    tok = _Tokens(batched)
    if spec.dtype in ("q4", "q4d8"):
        return _sparse_ffn_q4(spec, extra, kept, tok)
    d, P = spec.d_model, gemv_parts(spec)
    k = te.var("k", dtype=_I64)
    D = _i64(d)
    x = tok.x(d)
    W = te.placeholder((k, _i64(buffer_cols(spec))), VIEW_DTYPE[spec.dtype], name="bundles")
    rj = te.reduce_axis((0, D), name="rj")
    gu = tok.compute((k, _i64(P)), lambda t, i, p: te.sum(
        W[i, p * D + rj].astype("float32") * x[(*t, rj)], axis=rj), name="gu")

    if spec.dtype == "fp16":
        def scale(i, part):
            return None

        def bias(i):
            return W[i, _i64(2 * d)].astype("float32")
    else:
        side = len(spec.parts) * d

        def scale(i, part):
            return _side_f32(W, i, side + 4 * part)

        def bias(i):
            return _side_f32(W, i, side + 4 * len(spec.parts))

    def scaled(v, i, part):
        s = scale(i, part)
        return v if s is None else v * s

    def act_fn(t, i):
        if spec.activation == "swiglu":
            g = scaled(gu[(*t, i, 0)], i, 0)
            sg = g * te.sigmoid(g)
            a = kept(sg * scaled(gu[(*t, i, 1)], i, 1), sg)
        else:
            u = scaled(gu[(*t, i, 0)], i, 0)
            if spec.has_up_bias:
                u = u + bias(i)
            a = kept(te.max(u, tirx.const(0.0, "float32")), None)
        # The down column's scale is folded into the coefficient: one multiply per neuron,
        # not one per (neuron, output).
        return scaled(a, i, P)

    act = tok.compute((k,), act_fn, name="act")
    ri = te.reduce_axis((0, k), name="ri")
    y = tok.compute((D,), lambda t, j: te.sum(
        W[ri, _i64(P * d) + j].astype("float32") * act[(*t, ri)], axis=ri), name="y")
    return te.create_prim_func([x, W, *extra, y]).with_attr("global_symbol", "main")


def _sparse_ffn_q4(spec: BundleSpec, extra: list, kept, tok: _Tokens) -> tirx.PrimFunc:
    """sparse_ffn on Q4_1 blocks. The up GEMV dequantizes in place, sum_c (d_b q_c + m_b) x_c,
    with the block's step and minimum one broadcast per 16-lane vector: one fused multiply-add
    more per value than step * nibble * x, and no second pass over the rows for the minimums
    (measured on d=576, k=1536, 2 cores: 28% less time with the bundles in cache, 10% less
    just read from flash). q4d8: the same up part; the down column is 8-bit (_down_q8)."""
    d, P, pb = spec.d_model, gemv_parts(spec), spec.part_bytes
    nb = d // q4.BLOCK
    k = te.var("k", dtype=_I64)
    D, NB, B = _i64(d), _i64(nb), _i64(q4.BLOCK)
    x = tok.x(d)
    W = te.placeholder((k, _i64(spec.bundle_bytes)), "uint8", name="bundles")

    def block_at(part, b):
        return part * _i64(pb) + b * _i64(q4.BLOCK_BYTES)

    def nibble(i, part, c):
        """q of value c (0 <= c < d) of `part` of bundle i, as float32."""
        b, e = c // B, c % B
        byte = W[i, block_at(part, b) + _i64(4) + e % _i64(q4.BLOCK // 2)]
        shift = (e // _i64(q4.BLOCK // 2) * _i64(4)).astype("uint8")
        return ((byte >> shift) & tirx.const(15, "uint8")).astype("float32")

    rj = te.reduce_axis((0, D), name="rj")
    gu = tok.compute((k, _i64(P)), lambda t, i, p: te.sum(
        (_f16(W, i, block_at(p, rj // B)) * nibble(i, p, rj) + _f16(W, i, block_at(p, rj // B) + _i64(2)))
        * x[(*t, rj)], axis=rj), name="gu")

    def act_fn(t, i):
        if spec.activation == "swiglu":
            g = gu[(*t, i, 0)]
            sg = g * te.sigmoid(g)
            return kept(sg * gu[(*t, i, 1)], sg)
        u = gu[(*t, i, 0)]
        if spec.has_up_bias:
            u = u + _side_f32(W, i, sum(spec.part_sizes))
        return kept(te.max(u, tirx.const(0.0, "float32")), None)

    act = tok.compute((k,), act_fn, name="act")
    if spec.dtype == "q4d8":
        return _down_q8(spec, k, x, W, act, extra, tok)
    # Down: y_j = sum_i act_i (d_ib q_ij + m_ib), b = j/32. The step is folded into the
    # coefficient once per (neuron, block), the minimum into a per-block sum over neurons.
    ad = tok.compute((k, NB), lambda t, i, b: act[(*t, i)] * _f16(W, i, block_at(P, b)), name="ad")
    rk = te.reduce_axis((0, k), name="rk")
    am = tok.compute((NB,), lambda t, b: te.sum(
        act[(*t, rk)] * _f16(W, rk, block_at(P, b) + _i64(2)), axis=rk), name="am")
    ri = te.reduce_axis((0, k), name="ri")
    yq = tok.compute((D,), lambda t, j: te.sum(ad[(*t, ri, j // B)] * nibble(ri, P, j), axis=ri), name="y")
    y = tok.compute((D,), lambda t, j: yq[(*t, j)] + am[(*t, j // B)], name="y_min")
    return te.create_prim_func([x, W, *extra, y]).with_attr("global_symbol", "main")


def _down_q8(spec: BundleSpec, k, x, W, act, extra: list, tok: _Tokens) -> tirx.PrimFunc:
    """y_j = sum_i act_i s_ib q_ij, b = j/32: each block's scale is folded into the coefficient
    once per (neuron, block), as the int8 kernel folds its one scale per column."""
    d, at = spec.d_model, spec.part_offsets[-1]
    D, NB, B = _i64(d), _i64(d // q8.BLOCK), _i64(q8.BLOCK)
    ad = tok.compute((k, NB), lambda t, i, b: act[(*t, i)] * _f16(W, i, _i64(at + d) + b * _i64(2)), name="ad")
    ri = te.reduce_axis((0, k), name="ri")
    y = tok.compute((D,), lambda t, j: te.sum(
        ad[(*t, ri, j // B)] * tirx.reinterpret("int8", W[ri, _i64(at) + j]).astype("float32"), axis=ri),
        name="y")
    return te.create_prim_func([x, W, *extra, y]).with_attr("global_symbol", "main")


def sparse_ffn_tokens(spec: BundleSpec, keep: str | None = None) -> tirx.PrimFunc:
    """The batched sparse kernel, scheduled: a prompt step's n tokens on the bundles of the
    union of their sets (each token keeps, by its own score, the neurons that clear thr).
    Every stage's outermost non-token loop runs in parallel; the token loop stays serial
    inside, so the bundles a task owns are reused across tokens while in cache. Prefill only:
    decode runs the tuned single-token kernel (compile.schedule)."""
    from tvm import s_tir
    sch = s_tir.Schedule(sparse_ffn(spec, keep, batched=True))
    stages = {"q4": ("gu", "act", "ad", "am", "y", "y_min"), "q4d8": ("gu", "act", "ad", "y")}
    for name in stages.get(spec.dtype, ("gu", "act", "y")):
        blk = sch.get_sblock(name)
        tok, outer = sch.get_loops(blk)[:2]
        sch.reorder(outer, tok)
        sch.parallel(outer)
    return sch.mod["main"]


def dense_ffn(activation: str, d: int, n: int, has_up_bias: bool = False) -> tirx.PrimFunc:
    """main(x, w_gate?, w_up, b_up?, w_down, y): the dense fp16 FFN, n fixed."""
    D, N = _i64(d), _i64(n)
    x = te.placeholder((D,), "float32", name="x")
    names = ["w_gate", "w_up"] if activation == "swiglu" else ["w_up"]
    rows = [te.placeholder((N, D), "float16", name=nm) for nm in names]
    b_up = te.placeholder((N,), "float16", name="b_up") if has_up_bias else None
    w_down = te.placeholder((D, N), "float16", name="w_down")
    def gemv(Wr, name):
        rj = te.reduce_axis((0, D), name="rj_" + name)
        return te.compute((N,), lambda i: te.sum(Wr[i, rj].astype("float32") * x[rj], axis=rj),
                          name=name)

    outs = [gemv(Wr, nm) for nm, Wr in zip(["g", "u"] if len(rows) == 2 else ["u"], rows)]
    if activation == "swiglu":
        g, u = outs
        act = te.compute((N,), lambda i: g[i] * te.sigmoid(g[i]) * u[i], name="act")
    else:
        (u,) = outs
        act = te.compute((N,), lambda i: te.max(
            u[i] + (b_up[i].astype("float32") if b_up is not None else tirx.const(0.0, "float32")),
            tirx.const(0.0, "float32")), name="act")
    ri = te.reduce_axis((0, N), name="ri")
    y = te.compute((D,), lambda j: te.sum(w_down[j, ri].astype("float32") * act[ri], axis=ri),
                   name="y")
    params = [x, *rows] + ([b_up] if b_up is not None else []) + [w_down, y]
    return te.create_prim_func(params).with_attr("global_symbol", "main")


def bundle_bytes_moved(spec: BundleSpec, k: int) -> int:
    """Bytes a sparse kernel call reads and writes: k bundles, x and y."""
    return k * spec.bundle_bytes + 2 * 4 * spec.d_model


def dense_bytes_moved(activation: str, d: int, n: int, has_up_bias: bool = False) -> int:
    mats = 3 if activation == "swiglu" else 2
    return 2 * (mats * n * d + int(has_up_bias) * n) + 2 * 4 * d
