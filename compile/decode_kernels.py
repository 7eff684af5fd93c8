"""The kernels of a whole decode step besides the FFN's: embedding rows, norms, attention with
RoPE and the KV cache written in place, the activation predictor, the SwiGLU product.

Each takes the tokens of one step, n (a decode token: 1; a prompt: all of them), as a symbolic
dimension, and the step's first position p as a scalar: one compiled kernel serves every step.
The matrix products are compile.qgemv's GEMVs on GGUF blocks; these are the glue between them,
small next to the GEMVs (SmolLM2: d 576, 9 heads), so most stay unscheduled or lightly so.
"""
from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

from .ffn import _f16

_I64 = "int64"
OPAQUE = 8      # relay/relax OpPatternKind kOpaque: FuseOps leaves a scheduled kernel alone


def _i64(v: int):
    return tirx.IntImm(_I64, int(v))


def opaque(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """A scheduled kernel that Relax's fusion must not merge into its neighbours."""
    return func.with_attr("op_pattern", OPAQUE)


def embed_rows(kind: str, vocab: int, d: int) -> tirx.PrimFunc:
    """main(tokens (n,) int32, w (vocab, row bytes) uint8, x (n, d) f32): rows of a Q4_1/Q8_0
    embedding dequantized as gguf.quants does (value = step * q [+ minimum])."""
    from .qgemv import BLOCK, BLOCK_BYTES, row_bytes
    bb = BLOCK_BYTES[kind]
    n = te.var("n", dtype=_I64)
    tok = te.placeholder((n,), "int32", name="tokens")
    w = te.placeholder((_i64(vocab), _i64(row_bytes(kind, d))), "uint8", name="w")

    def value(t, c):
        r = tok[t].astype(_I64)
        b, e = c // _i64(BLOCK), c % _i64(BLOCK)
        at = b * _i64(bb)
        if kind == "q4_1":
            byte = w[r, at + _i64(4) + e % _i64(16)]
            q = ((byte >> (e // _i64(16) * _i64(4)).astype("uint8")) & tirx.const(15, "uint8")).astype("float32")
            return _f16(w, r, at) * q + _f16(w, r, at + _i64(2))
        return _f16(w, r, at) * tirx.reinterpret("int8", w[r, at + _i64(2) + e]).astype("float32")

    x = te.compute((n, _i64(d)), value, name="x")
    return te.create_prim_func([tok, w, x])


def add_positions(d: int, offset: int) -> tirx.PrimFunc:
    """main(x (n, d), table (P, d), p, y (n, d)): y = x + table[p + t + offset] (OPT's learned
    positions start at index `offset`)."""
    n, P = te.var("n", dtype=_I64), te.var("P", dtype=_I64)
    p = te.var("p", dtype=_I64)
    x = te.placeholder((n, _i64(d)), "float32", name="x")
    table = te.placeholder((P, _i64(d)), "float32", name="table")
    y = te.compute((n, _i64(d)), lambda t, c: x[t, c] + table[p + t + _i64(offset), c], name="y")
    return te.create_prim_func([x, table, p, y])


def rms_norm(d: int, eps: float) -> tirx.PrimFunc:
    """main(x (n, d), w (d,), y (n, d)): x / sqrt(mean(x^2) + eps) * w, as torch's F.rms_norm."""
    n = te.var("n", dtype=_I64)
    x = te.placeholder((n, _i64(d)), "float32", name="x")
    w = te.placeholder((_i64(d),), "float32", name="w")
    r = te.reduce_axis((0, _i64(d)), name="r")
    ss = te.compute((n,), lambda t: te.sum(x[t, r] * x[t, r], axis=r), name="ss")
    y = te.compute((n, _i64(d)), lambda t, c: x[t, c] * tirx.rsqrt(
        ss[t] / tirx.const(float(d), "float32") + tirx.const(eps, "float32")) * w[c], name="y")
    return te.create_prim_func([x, w, y])


def layer_norm(d: int, eps: float) -> tirx.PrimFunc:
    """main(x (n, d), w (d,), b (d,), y (n, d)): LayerNorm (biased variance, as torch)."""
    n = te.var("n", dtype=_I64)
    x = te.placeholder((n, _i64(d)), "float32", name="x")
    w = te.placeholder((_i64(d),), "float32", name="w")
    b = te.placeholder((_i64(d),), "float32", name="b")
    r = te.reduce_axis((0, _i64(d)), name="r")
    inv_d = tirx.const(1.0 / d, "float32")
    total = te.compute((n,), lambda t: te.sum(x[t, r], axis=r), name="total")
    r2 = te.reduce_axis((0, _i64(d)), name="r2")
    sq = te.compute((n,), lambda t: te.sum((x[t, r2] - total[t] * inv_d) * (x[t, r2] - total[t] * inv_d),
                                           axis=r2), name="sq")
    y = te.compute((n, _i64(d)), lambda t, c: (x[t, c] - total[t] * inv_d) * tirx.rsqrt(
        sq[t] * inv_d + tirx.const(eps, "float32")) * w[c] + b[c], name="y")
    return te.create_prim_func([x, w, b, y])


def last_row(d: int) -> tirx.PrimFunc:
    """main(x (n, d), y (1, d)): the last token's row (only its logits are computed)."""
    n = te.var("n", dtype=_I64)
    x = te.placeholder((n, _i64(d)), "float32", name="x")
    y = te.compute((_i64(1), _i64(d)), lambda _, c: x[n - _i64(1), c], name="y")
    return te.create_prim_func([x, y])


def silu_mul(rows: int) -> tirx.PrimFunc:
    """main(gu (n, 2 rows), a (n, rows)): silu(gate) * up, gate and up side by side (one GEMV
    over the whole copy's gate and up blocks, which lie back to back)."""
    n = te.var("n", dtype=_I64)
    gu = te.placeholder((n, _i64(2 * rows)), "float32", name="gu")

    def f(t, i):
        g = gu[t, i]
        return g * te.sigmoid(g) * gu[t, i + _i64(rows)]
    return te.create_prim_func([gu, te.compute((n, _i64(rows)), f, name="a")])


def predictor_logits(d: int, rank: int, n_ffn: int) -> tirx.PrimFunc:
    """main(h (n, d), a (d, r) f16, a_bias (r,) f16, b (r, N) f16, b_bias (N,) f16, z (n, N) f32):
    logits = relu(h a + a_bias) b + b_bias (tuning.predictor), weights as held in DRAM (fp16),
    products in f32."""
    n = te.var("n", dtype=_I64)
    h = te.placeholder((n, _i64(d)), "float32", name="h")
    a = te.placeholder((_i64(d), _i64(rank)), "float16", name="a")
    ab = te.placeholder((_i64(rank),), "float16", name="a_bias")
    b = te.placeholder((_i64(rank), _i64(n_ffn)), "float16", name="b")
    bb = te.placeholder((_i64(n_ffn),), "float16", name="b_bias")
    rd = te.reduce_axis((0, _i64(d)), name="rd")
    hid = te.compute((n, _i64(rank)), lambda t, j: te.sum(h[t, rd] * a[rd, j].astype("float32"), axis=rd),
                     name="hid")
    act = te.compute((n, _i64(rank)), lambda t, j: te.max(hid[t, j] + ab[j].astype("float32"),
                                                          tirx.const(0.0, "float32")), name="act")
    rr = te.reduce_axis((0, _i64(rank)), name="rr")
    zr = te.compute((n, _i64(n_ffn)), lambda t, i: te.sum(act[t, rr] * b[rr, i].astype("float32"), axis=rr),
                    name="zr")
    z = te.compute((n, _i64(n_ffn)), lambda t, i: zr[t, i] + bb[i].astype("float32"), name="z")
    return te.create_prim_func([h, a, ab, b, bb, z])


def schedule_predictor(func: tirx.PrimFunc):
    """Outputs of both products in parallel tasks, the reductions' outputs as vectors (the
    weights are stored input-major, so a vector of outputs reads a contiguous run)."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    for name, vec in (("hid", 16), ("zr", 16)):
        blk = sch.get_sblock(name)
        t, j, r = sch.get_loops(blk)
        jo, ji = sch.split(j, factors=[None, vec])
        sch.reorder(t, jo, r, ji)
        if name == "zr":
            sch.parallel(jo)
        sch.vectorize(ji)
        sch.decompose_reduction(blk, r)
    return sch.mod["main"]


def attention(n_heads: int, n_kv: int, head_dim: int, kv_dtype: str, rope: bool) -> tirx.PrimFunc:
    """main(qkv (n, (H + 2 KV) hd) f32, kv (L, 2, M, KV hd), inv_freq (hd/2,), layer, p,
    out (n, H hd) f32); kv is written in place (Relax call_tir_inplace): the step's keys (after
    RoPE) and values at positions p..p+n-1 of `layer`, then each token attends to positions up
    to its own. RoPE as Hugging Face's rotate_half (load_gguf un-permutes GGUF's q/k rows).
    Softmax in one pass with a running maximum (no buffer of the context's length)."""
    H, KV, hd = n_heads, n_kv, head_dim
    half, group = max(hd // 2, 1), n_heads // n_kv
    QD, KD = H * hd, KV * hd
    scale = float(hd) ** -0.5
    use_rope = bool(rope)

    @T.prim_func
    def main(var_qkv: T.handle, var_kv: T.handle, inv_freq: T.Buffer((T.int64(half),), "float32"),
             layer: T.int64, p: T.int64, var_out: T.handle):
        T.func_attr({"op_pattern": OPAQUE})
        n = T.int64()
        L = T.int64()
        M = T.int64()
        qkv = T.match_buffer(var_qkv, (n, T.int64(QD + 2 * KD)), "float32")
        kv = T.match_buffer(var_kv, (L, T.int64(2), M, T.int64(KD)), kv_dtype)
        out = T.match_buffer(var_out, (n, T.int64(QD)), "float32")
        for t in range(n):
            pos = T.Cast("float32", p + t)
            for g in range(T.int64(KV)):
                for i in range(T.int64(hd)):
                    c0 = QD + g * hd
                    kv[layer, 0, p + t, g * hd + i] = T.Cast(kv_dtype, T.if_then_else(
                        use_rope, qkv[t, c0 + i] * T.cos(pos * inv_freq[i % half])
                        + T.if_then_else(i < half, T.float32(0) - qkv[t, c0 + (i + half) % hd],
                                         qkv[t, c0 + (i + half) % hd]) * T.sin(pos * inv_freq[i % half]),
                        qkv[t, c0 + i]))
                    kv[layer, 1, p + t, g * hd + i] = T.Cast(kv_dtype, qkv[t, QD + KD + g * hd + i])
        for h in T.parallel(T.int64(H)):
            qh = T.alloc_buffer((T.int64(hd),), "float32", scope="local")
            acc = T.alloc_buffer((T.int64(hd),), "float32", scope="local")
            st = T.alloc_buffer((T.int64(3),), "float32", scope="local")
            for t in range(n):
                pos = T.Cast("float32", p + t)
                for i in range(T.int64(hd)):
                    c0 = h * hd
                    qh[i] = T.if_then_else(
                        use_rope, qkv[t, c0 + i] * T.cos(pos * inv_freq[i % half])
                        + T.if_then_else(i < half, T.float32(0) - qkv[t, c0 + (i + half) % hd],
                                         qkv[t, c0 + (i + half) % hd]) * T.sin(pos * inv_freq[i % half]),
                        qkv[t, c0 + i]) * T.float32(scale)
                    acc[i] = T.float32(0)
                st[0] = T.float32(-3.0e38)
                st[1] = T.float32(0)
                for j in range(p + t + 1):
                    st[2] = T.float32(0)
                    for i in range(T.int64(hd)):
                        st[2] = st[2] + qh[i] * T.Cast("float32", kv[layer, 0, j, (h // group) * hd + i])
                    m_new = T.max(st[0], st[2])
                    c = T.exp(st[0] - m_new)
                    e = T.exp(st[2] - m_new)
                    st[1] = st[1] * c + e
                    for i in range(T.int64(hd)):
                        acc[i] = acc[i] * c + e * T.Cast("float32", kv[layer, 1, j, (h // group) * hd + i])
                    st[0] = m_new
                for i in range(T.int64(hd)):
                    out[t, h * hd + i] = acc[i] / st[1]
    return main
