"""y = W x for a matrix kept as GGUF blocks (Q4_1, Q8_0), read in place by a compiled kernel.

The non-FFN weights (attention, tied embedding/LM head) stay in DRAM as the GGUF stores
them: 4.5 (Q4_1) or 8.5 (Q8_0) bits a value instead of bf16's 16. Each row of W is d/32
blocks of 32 values:
  q4_1: fp16 step d, fp16 minimum m, 16 bytes of nibbles (value j: low nibble of byte j,
        value j+16: its high nibble); value = d*q + m
  q8_0: fp16 scale d, 32 int8; value = d*q
main(x (n, d) f32, w (rows, d/32 * block bytes) uint8, y (n, rows) f32), n symbolic. Two
kernels per (kind, rows, d): qgemv, tuned for a decode token (n = 1; any n works, the blocks
dequantized again for each token), and qgemm for a prompt step (each block dequantized once
for all n tokens).

Each value is dequantized in registers exactly as gguf.quants does it (f32 d*q + m) and
multiplied with x, so only the order of the sums differs from dequantize-then-matmul.
"""
from __future__ import annotations

import functools

import tvm
from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from .schedule import Q4_RUN
from .targets import make_target

BLOCK = 32                                    # values per block, both kinds
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}        # 2 (d) [+ 2 (m)] + the quants
KINDS = tuple(BLOCK_BYTES)
# Independent partial sums per lane: a row's blocks split this many ways (even/odd blocks)
# when the block count allows. Measured on the 49152x576 LM head (q8_0, one thread): 2.10 ms
# with one chain of dependent FMAs per lane, 1.76 ms with two; q4_1 (576x576), whose nibble
# unpacking outweighs the chain, 23.5 vs 24.6 us: one.
SPLIT = {"q4_1": 1, "q8_0": 2}
_I64 = "int64"
# A block is two runs of 16 lanes: q4_1's low and high nibbles of the same 16 bytes (one
# shift per run, see schedule.Q4_RUN), q8_0's first and second 16 int8.
_RUN = Q4_RUN


def _i64(v: int):
    return tirx.IntImm(_I64, int(v))


def row_bytes(kind: str, d: int) -> int:
    """Bytes of one row of d values (a multiple of 32) as `kind` blocks."""
    if kind not in BLOCK_BYTES:
        raise ValueError(f"no GEMV kernel for {kind!r}; kernels exist for {list(KINDS)}")
    if d % BLOCK:
        raise ValueError(f"{kind} rows hold whole blocks of {BLOCK} values; {d} is not a multiple of {BLOCK}")
    return d // BLOCK * BLOCK_BYTES[kind]


def _halve(p, n, rows: int, width: int):
    return te.compute((n, _i64(rows), _i64(width)),
                      lambda t, i, l: p[t, i, l] + p[t, i, l + _i64(width)], name=f"sum{width}")


def qgemv(kind: str, rows: int, d: int, flat: tuple[int, int] | None = None) -> tuple[tirx.PrimFunc, list[str]]:
    """(the kernel as a PrimFunc, names of its lane-sum stages for the schedule).

    flat (total bytes, offset): w is a flat uint8 buffer of that many bytes holding the rows at
    that byte offset, e.g. a part of a layer's whole-copy extent as read (layout.whole_copy),
    multiplied where it lies.

    acc[t, i, c] sums lane c % 32 of blocks c // 32, c // 32 + split, ... of row i; the
    32 * split lanes are then added pairwise (down to 1). A single serial sum over the lanes,
    what rfactor emits, is a chain of 32 dependent scalar adds per row: measured here it made
    the 49152-row LM head 6.6 ms against 1.7 ms with the pairwise tree."""
    bb = BLOCK_BYTES[kind]
    rbytes = row_bytes(kind, d)
    nb = rbytes // bb
    split = SPLIT[kind] if nb % SPLIT[kind] == 0 and nb > SPLIT[kind] else 1
    n = te.var("n", dtype=_I64)
    x = te.placeholder((n, _i64(d)), "float32", name="x")
    if flat is None:
        w = te.placeholder((_i64(rows), _i64(nb * bb)), "uint8", name="w")

        def byte(i, j):
            return w[i, j]
    else:
        total, offset = flat
        if offset < 0 or offset + rows * rbytes > total:
            raise ValueError(f"{rows} rows of {rbytes} bytes at offset {offset} do not fit in {total} bytes")
        w = te.placeholder((_i64(total),), "uint8", name="w")

        def byte(i, j):
            return w[_i64(offset) + i * _i64(rbytes) + j]
    rb = te.reduce_axis((0, _i64(nb // split)), name="rb")

    def f16(i, j):
        bits = byte(i, j).astype("uint16") | (byte(i, j + _i64(1)).astype("uint16") << tirx.const(8, "uint16"))
        return tirx.reinterpret("float16", bits).astype("float32")

    def value(i, b, c):
        at, run, lane = b * _i64(bb), c // _i64(_RUN), c % _i64(_RUN)
        if kind == "q4_1":
            q = ((byte(i, at + _i64(4) + lane) >> (run * _i64(4)).astype("uint8"))
                 & tirx.const(15, "uint8")).astype("float32")
            return f16(i, at) * q + f16(i, at + _i64(2))
        return f16(i, at) * tirx.reinterpret("int8", byte(i, at + _i64(2) + c)).astype("float32")

    def block(c):
        return rb * _i64(split) + c // _i64(BLOCK)

    acc = te.compute((n, _i64(rows), _i64(BLOCK * split)), lambda t, i, c: te.sum(
        value(i, block(c), c % _i64(BLOCK)) * x[t, block(c) * _i64(BLOCK) + c % _i64(BLOCK)], axis=rb),
        name="acc")
    s, stages, width = acc, [], BLOCK * split
    while width > 1:
        width //= 2
        s = _halve(s, n, rows, width)
        stages.append(s.op.name)
    y = te.compute((n, _i64(rows)), lambda t, i: s[t, i, 0], name="y")
    return te.create_prim_func([x, w, y]).with_attr("global_symbol", "main"), stages


def _rows_per_task(rows: int) -> int:
    """Rows per parallel task: 16, or the largest power of two dividing rows (no remainder)."""
    r = 16
    while rows % r:
        r //= 2
    return r


def schedule_qgemv(func: tirx.PrimFunc, stages: list[str], rows: int):
    """Rows in parallel tasks; per row and token: the block loop with its 32 * split lanes
    as vectors of 16 (one per run), then the lane-sum tree, all on registers and a few stack
    slots (everything sits under the token loop, so no buffer is n x rows x lanes)."""
    sch = s_tir.Schedule(func)
    y = sch.get_sblock("y")
    t, i = sch.get_loops(y)
    sch.reorder(i, t)
    io, _ = sch.split(i, factors=[None, _rows_per_task(rows)])
    sch.parallel(io)
    token = sch.get_loops(y)[2]
    # compute_at, consumer first: each stage lands before the one that reads it.
    for name in reversed(["acc", *stages]):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, token)
        if name not in ("acc", stages[-1]):
            sch.vectorize(sch.get_loops(blk)[-1])
    acc = sch.get_sblock("acc")
    # io, ii, t, then the lanes and the blocks (a loop of one block, d = 32, is dropped)
    c, *b = sch.get_loops(acc)[3:]
    run, lane = sch.split(c, factors=[None, _RUN])
    if b:
        sch.reorder(b[0], run, lane)
    sch.unroll(run)
    sch.vectorize(lane)       # before decompose_reduction (TVM 0.27)
    sch.decompose_reduction(acc, b[0] if b else run)
    return sch.mod


@functools.lru_cache(maxsize=None)
def build_qgemv(kind: str, rows: int, d: int, target_name: str = "host"):
    """The compiled kernel for one matrix shape (~0.1 s; once per process and shape)."""
    func, stages = qgemv(kind, rows, d)
    return tvm.compile(schedule_qgemv(func, stages, rows), target=make_target(target_name))


@functools.lru_cache(maxsize=None)
def qgemv_function(kind: str, rows: int, d: int):
    """main(x, w, y) of the host build; takes torch tensors or tvm tensors (64-byte aligned)."""
    return build_qgemv(kind, rows, d)["main"]


def bytes_moved(kind: str, rows: int, d: int, n: int = 1) -> int:
    """Bytes one call reads and writes: the blocks once, x and y per token."""
    return rows * row_bytes(kind, d) + 4 * n * (d + rows)


def whole_kernels(parts, target_name: str = "host"):
    """One compiled module with a GEMV per distinct (kind, rows, d) of a whole copy's parts
    (layout.whole_copy), each named `kernel_name(kind, rows, d)`: what an app calls on the
    whole copy's extents (`ripple export`)."""
    funcs = {}
    for kind, rows, d in sorted({(p.kind, p.shape[0], p.shape[1]) for p in parts}):
        func, stages = qgemv(kind, rows, d)
        name = kernel_name(kind, rows, d)
        funcs[name] = schedule_qgemv(func, stages, rows)["main"].with_attr("global_symbol", name)
    return tvm.compile(tvm.IRModule(funcs), target=make_target(target_name))


def kernel_name(kind: str, rows: int, d: int) -> str:
    return f"gemv_{kind}_{rows}x{d}"


# The prompt step's GEMM (n tokens): the GEMV above dequantizes every block once per token,
# which made 40 tokens 33x one token (3072x576 q4_1, dequantizing is most of its time). Here a
# tile of rows is dequantized once into a buffer (f32, exactly gguf.quants' values, in L1) and
# multiplied with the tokens a tile at a time: per 16 values, ROWS_TILE + TOKENS_TILE vector
# loads feed ROWS_TILE * TOKENS_TILE FMAs, the accumulators in registers (16 of 32 AVX-512
# registers). Measured (3072x576, 2 threads): 40 tokens 1.4 ms against 6.2 ms.
ROWS_TILE = 4
TOKENS_TILE = 4
LANES = 16
# Parallel tasks: each dequantizes into one buffer of its own (TVM allocates buffers over
# 1 KiB from the workspace pool, a call each, so not once per row tile).
TASKS = 8


def lane_sum(v, lanes: int):
    """The sum of vector expression v's lanes, halves added pairwise through shuffles (a
    vectorized loop over halves of a local buffer came out of LLVM as an extract and an
    insert per lane)."""
    while lanes > 1:
        lanes //= 2
        v = tirx.Shuffle([v], [tirx.IntImm("int32", i) for i in range(lanes)]) + \
            tirx.Shuffle([v], [tirx.IntImm("int32", i) for i in range(lanes, 2 * lanes)])
    return v


def _row_tile(rows: int) -> int:
    r = ROWS_TILE
    while rows % r:
        r //= 2
    return r


def qgemm(kind: str, rows: int, d: int, flat: tuple[int, int] | None = None) -> tirx.PrimFunc:
    """The prompt step's kernel: main(x (n, d) f32, w, y (n, rows) f32), the same arguments as
    qgemv's (w: (rows, row bytes) uint8, or flat (total,) with the rows at byte `offset`), already
    scheduled (hand-written loops). Row tiles in parallel tasks; per tile its blocks dequantized
    once, then tokens in tiles of TOKENS_TILE (the remainder one at a time)."""
    bb = BLOCK_BYTES[kind]
    rbytes = row_bytes(kind, d)
    nb = d // BLOCK
    R, TT, V = _row_tile(rows), TOKENS_TILE, LANES
    if flat is None:
        total, offset, wshape = rows * rbytes, 0, (_i64(rows), _i64(rbytes))
    else:
        total, offset = flat
        if offset < 0 or offset + rows * rbytes > total:
            raise ValueError(f"{rows} rows of {rbytes} bytes at offset {offset} do not fit in {total} bytes")
        wshape = (_i64(total),)
    q4 = kind == "q4_1"
    D, RB, NB, BB, OFF, K = (T.int64(v) for v in (d, rbytes, nb, bb, offset, d // V))

    def f16(wb, at):
        bits = wb[at].astype("uint16") | (wb[at + 1].astype("uint16") << tirx.const(8, "uint16"))
        return tirx.reinterpret("float16", bits).astype("float32")

    @T.macro
    def tile(x, y, wl, i0, t0, nt):
        # nt tokens from t0 against rows i0..i0+R-1 (nt: TT or 1, a Python constant)
        acc = T.alloc_buffer((R * nt * V,), "float32", scope="local")
        for a in T.unroll(R * nt):
            for l in T.vectorized(V):
                acc[a * V + l] = T.float32(0)
        for k in range(K):
            for r in T.unroll(R):
                for tt in T.unroll(nt):
                    for l in T.vectorized(V):
                        acc[(r * nt + tt) * V + l] = acc[(r * nt + tt) * V + l] \
                            + wl[r * D + k * V + l] * x[t0 + tt, k * V + l]
        for r in T.unroll(R):
            for tt in T.unroll(nt):
                y[t0 + tt, i0 + r] = lane_sum(acc.vload([(r * nt + tt) * V], f"float32x{V}"), V)

    tiles = rows // R
    C = min(tiles, TASKS)

    def at(io, r, b):               # byte offset of block b of row r of tile io
        return OFF + (io * R + r) * RB + b * BB

    @T.prim_func
    def main(var_x: T.handle, var_w: T.handle, var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, D), "float32")
        w = T.match_buffer(var_w, wshape, "uint8")
        y = T.match_buffer(var_y, (n, T.int64(rows)), "float32")
        wb = T.decl_buffer((T.int64(total),), "uint8", data=w.data)
        for ch in T.parallel(T.int64(C)):
            wl = T.alloc_buffer((R * d,), "float32", scope="local")
            for io in range(ch * tiles // C, (ch + 1) * tiles // C):
                for r in range(T.int64(R)):
                    for b in range(NB):
                        if q4:
                            for c in T.vectorized(16):
                                wl[r * D + b * 32 + c] = f16(wb, at(io, r, b)) * T.Cast(
                                    "float32", wb[at(io, r, b) + 4 + c] & T.uint8(15)) + f16(wb, at(io, r, b) + 2)
                                wl[r * D + b * 32 + 16 + c] = f16(wb, at(io, r, b)) * T.Cast(
                                    "float32", wb[at(io, r, b) + 4 + c] >> T.uint8(4)) + f16(wb, at(io, r, b) + 2)
                        else:
                            for c in T.vectorized(32):
                                wl[r * D + b * 32 + c] = f16(wb, at(io, r, b)) * T.Cast(
                                    "float32", T.reinterpret("int8", wb[at(io, r, b) + 2 + c]))
                for to in range(n // TT):
                    tile(x, y, wl, io * R, to * TT, TT)
                for t in range(n // TT * TT, n):
                    tile(x, y, wl, io * R, t, 1)

    return main.with_attr("global_symbol", "main")
