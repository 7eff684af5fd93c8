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
from .qgemv import lane_sum

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


# Keys scored per softmax update: one running-maximum rescale of the accumulator per block
# instead of per position (the one-pass update took two exps and a rescale per position).
ATTN_BLOCK = 16
# Parts each KV head's context is split into, one parallel task each (merged after): with
# SmolLM2's 3 KV heads, 6 tasks keep 2 cores equally busy.
ATTN_SPLIT = 2


def _exp(x):
    """exp(x) for x <= 0 as vectorizable arithmetic (LLVM turns a vector exp into one libm call
    a lane, each with the vector registers spilled around it): x = k ln2 + r, |r| <= ln2/2,
    exp(r) by its Taylor series to r^7 (truncation 5e-9; a few float32 ulps in all), times 2^k
    built in the exponent bits. x is clamped at -87 (exp 1.6e-38 where 0 is due): the softmax's
    sums are at least 1 (the maximum's own term)."""
    f32 = "float32"
    x = tirx.max(x, tirx.const(-87.0, f32))
    k = tirx.floor(x * tirx.const(1.4426950408889634, f32) + tirx.const(0.5, f32))
    r = x - k * tirx.const(0.693145751953125, f32) - k * tirx.const(1.428606765330187e-06, f32)
    poly = tirx.const(1.0 / 5040, f32)
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        poly = poly * r + tirx.const(c, f32)
    scale = tirx.reinterpret(f32, (k.astype("int32") + tirx.const(127, "int32")) << tirx.const(23, "int32"))
    return poly * scale


def _dot(q, at, kv, layer, j, col, hd: int, lanes: int):
    """q[at:at + hd] . kv[layer, 0, j, col:col + hd] in f32, as vectors of `lanes`."""
    ty = f"float32x{lanes}" if lanes > 1 else "float32"
    acc = None
    for c in range(hd // lanes):
        k = kv.vload([layer, _i64(0), j, col + _i64(c * lanes)], f"{kv.dtype}x{lanes}" if lanes > 1 else kv.dtype)
        term = q.vload([at + c * lanes], ty) * k.astype(ty)
        acc = term if acc is None else acc + term
    return lane_sum(acc, lanes)


def _lanes(hd: int) -> int:
    """Vector width over head_dim: the widest of 16, 8, 4, 2, 1 dividing it."""
    v = 16
    while hd % v:
        v //= 2
    return v


def attention(n_heads: int, n_kv: int, head_dim: int, kv_dtype: str, rope: bool) -> tirx.PrimFunc:
    """main(qkv (n, (H + 2 KV) hd) f32, kv (L, 2, M, KV hd), inv_freq (hd/2,), layer, p,
    out (n, H hd) f32); kv is written in place (Relax call_tir_inplace): the step's keys (after
    RoPE) and values at positions p..p+n-1 of `layer`, then each token attends to positions up
    to its own. RoPE as Hugging Face's rotate_half (load_gguf un-permutes GGUF's q/k rows).

    Parallel tasks: each KV head's context in ATTN_SPLIT parts, the KV head's group of query
    heads together (each key and value read and widened once for the group). Per task and
    token, q (roped, scaled) and the accumulators are vectors over head_dim, and the context is
    taken ATTN_BLOCK keys at a time: their scores (vector dot products), one rescale by the
    block's new maximum, then the values weighted by exp(score - max) (online softmax, no
    buffer of the context's length). The parts' (max, sum, accumulator) are then merged."""
    H, KV, hd = n_heads, n_kv, head_dim
    half, group = max(hd // 2, 1), n_heads // n_kv
    QD, KD = H * hd, KV * hd
    V, B, S = _lanes(hd), ATTN_BLOCK, ATTN_SPLIT
    NV = hd // V
    scale = float(hd) ** -0.5
    use_rope = bool(rope)
    if use_rope and hd % 2:
        raise ValueError(f"RoPE rotates halves of head_dim; {hd} is odd")
    HD, HALF, QDI, KDI = (T.int64(v) for v in (hd, half, QD, KD))

    @T.macro
    def cos_sin(cs, inv_freq, pos):
        # cs[:half] = cos(pos f), cs[half:] = sin(pos f), one token's angles for every head
        for i in range(HALF):
            cs[i] = T.cos(pos * inv_freq[i])
            cs[i + half] = T.sin(pos * inv_freq[i])

    def lo(ctx, task):              # task's part of a context of ctx keys: lo(ctx, task)..hi - 1
        return ctx * (task % S) // S

    def hi(ctx, task):
        return ctx * (task % S + 1) // S

    def col(task, gh):              # q's first column for query head gh of task's KV head
        return (task // S * group + gh) * hd

    @T.prim_func
    def main(var_qkv: T.handle, var_kv: T.handle, inv_freq: T.Buffer((T.int64(half),), "float32"),
             layer: T.int64, p: T.int64, var_out: T.handle):
        T.func_attr({"op_pattern": OPAQUE, "tirx.noalias": True})
        n = T.int64()
        L = T.int64()
        M = T.int64()
        qkv = T.match_buffer(var_qkv, (n, T.int64(QD + 2 * KD)), "float32")
        kv = T.match_buffer(var_kv, (L, T.int64(2), M, KDI), kv_dtype)
        out = T.match_buffer(var_out, (n, QDI), "float32")
        part_acc = T.alloc_buffer((n, T.int64(H), T.int64(S), HD), "float32")
        part_ml = T.alloc_buffer((n, T.int64(H), T.int64(S), T.int64(2)), "float32")   # max, sum
        cs0 = T.alloc_buffer((hd,), "float32", scope="local")
        for t in range(n):
            if use_rope:
                cos_sin(cs0, inv_freq, T.Cast("float32", p + t))
            for g in range(T.int64(KV)):
                if use_rope:
                    for i in T.vectorized(HALF):
                        kv[layer, 0, p + t, g * hd + i] = T.Cast(
                            kv_dtype, qkv[t, QD + g * hd + i] * cs0[i] - qkv[t, QD + g * hd + half + i] * cs0[half + i])
                        kv[layer, 0, p + t, g * hd + half + i] = T.Cast(
                            kv_dtype, qkv[t, QD + g * hd + half + i] * cs0[i] + qkv[t, QD + g * hd + i] * cs0[half + i])
                else:
                    for i in T.vectorized(HD):
                        kv[layer, 0, p + t, g * hd + i] = T.Cast(kv_dtype, qkv[t, QD + g * hd + i])
                for i in T.vectorized(HD):
                    kv[layer, 1, p + t, g * hd + i] = T.Cast(kv_dtype, qkv[t, QD + KD + g * hd + i])
        for task in T.parallel(T.int64(KV * S)):
            cs = T.alloc_buffer((hd,), "float32", scope="local")
            q = T.alloc_buffer((group * hd,), "float32", scope="local")
            acc = T.alloc_buffer((group * hd,), "float32", scope="local")
            s = T.alloc_buffer((group * B,), "float32", scope="local")
            st = T.alloc_buffer((group * 4,), "float32", scope="local")   # max, sum, block max, rescale
            for t in range(n):
                if use_rope:
                    cos_sin(cs, inv_freq, T.Cast("float32", p + t))
                for gh in T.unroll(group):
                    if use_rope:
                        for i in T.vectorized(HALF):
                            q[gh * hd + i] = (qkv[t, col(task, gh) + i] * cs[i]
                                              - qkv[t, col(task, gh) + half + i] * cs[half + i]) * T.float32(scale)
                            q[gh * hd + half + i] = (qkv[t, col(task, gh) + half + i] * cs[i]
                                                     + qkv[t, col(task, gh) + i] * cs[half + i]) * T.float32(scale)
                    else:
                        for i in T.vectorized(HD):
                            q[gh * hd + i] = qkv[t, col(task, gh) + i] * T.float32(scale)
                    for i in T.vectorized(HD):
                        acc[gh * hd + i] = T.float32(0)
                    st[gh * 4] = T.float32(-3.0e38)
                    st[gh * 4 + 1] = T.float32(0)
                for jb in range((hi(p + t + 1, task) - lo(p + t + 1, task) + B - 1) // B):
                    for gh in T.unroll(group):
                        st[gh * 4 + 2] = st[gh * 4]
                    for jj in range(T.min(T.int64(B), hi(p + t + 1, task) - lo(p + t + 1, task) - jb * B)):
                        for gh in T.unroll(group):
                            s[gh * B + jj] = _dot(q, gh * hd, kv, layer, lo(p + t + 1, task) + jb * B + jj,
                                                  task // S * hd, hd, V)
                            st[gh * 4 + 2] = T.max(st[gh * 4 + 2], s[gh * B + jj])
                    for gh in T.unroll(group):
                        st[gh * 4 + 3] = _exp(st[gh * 4] - st[gh * 4 + 2])
                        st[gh * 4] = st[gh * 4 + 2]
                        st[gh * 4 + 1] = st[gh * 4 + 1] * st[gh * 4 + 3]
                        for i in T.vectorized(HD):
                            acc[gh * hd + i] = acc[gh * hd + i] * st[gh * 4 + 3]
                        for jj in T.vectorized(B):      # past the part's end: unused lanes
                            s[gh * B + jj] = _exp(s[gh * B + jj] - st[gh * 4])
                    for jj in range(T.min(T.int64(B), hi(p + t + 1, task) - lo(p + t + 1, task) - jb * B)):
                        for gh in T.unroll(group):
                            st[gh * 4 + 1] = st[gh * 4 + 1] + s[gh * B + jj]
                        for c in T.unroll(NV):
                            for gh in T.unroll(group):
                                for l in T.vectorized(V):
                                    acc[gh * hd + c * V + l] = acc[gh * hd + c * V + l] + s[gh * B + jj] * T.Cast(
                                        "float32", kv[layer, 1, lo(p + t + 1, task) + jb * B + jj,
                                                      task // S * hd + c * V + l])
                for gh in T.unroll(group):
                    for i in T.vectorized(HD):
                        part_acc[t, task // S * group + gh, task % S, i] = acc[gh * hd + i]
                    part_ml[t, task // S * group + gh, task % S, 0] = st[gh * 4]
                    part_ml[t, task // S * group + gh, task % S, 1] = st[gh * 4 + 1]
        for t in range(n):
            for h in range(T.int64(H)):
                # merge the parts: weights exp(max_s - max), an empty part's (-3e38, 0, 0) adds 0
                st0 = T.alloc_buffer((S + 2,), "float32", scope="local")
                st0[S] = part_ml[t, h, 0, 0]
                for sp in range(T.int64(S)):
                    st0[S] = T.max(st0[S], part_ml[t, h, sp, 0])
                st0[S + 1] = T.float32(0)
                for sp in range(T.int64(S)):
                    st0[sp] = _exp(part_ml[t, h, sp, 0] - st0[S])
                    st0[S + 1] = st0[S + 1] + st0[sp] * part_ml[t, h, sp, 1]
                for i in T.vectorized(HD):
                    out[t, h * hd + i] = T.float32(0)
                for sp in range(T.int64(S)):
                    for i in T.vectorized(HD):
                        out[t, h * hd + i] = out[t, h * hd + i] + st0[sp] * part_acc[t, h, sp, i]
                for i in T.vectorized(HD):
                    out[t, h * hd + i] = out[t, h * hd + i] / st0[S + 1]
    return main
