"""y = W x for a matrix kept as GGUF blocks (Q4_1, Q8_0), read in place by a compiled kernel.

The non-FFN weights (attention, tied embedding/LM head) stay in DRAM as the GGUF stores
them: 4.5 (Q4_1) or 8.5 (Q8_0) bits a value instead of bf16's 16. Each row of W is d/32
blocks of 32 values:
  q4_1: fp16 step d, fp16 minimum m, 16 bytes of nibbles (value j: low nibble of byte j,
        value j+16: its high nibble); value = d*q + m
  q8_0: fp16 scale d, 32 int8; value = d*q
main(x (n, d) f32, w (rows, d/32 * block bytes) uint8, y (n, rows) f32), n symbolic: one
kernel per (kind, rows, d) serves a decode token (n = 1) and a prompt step (tokens one
after another, the row's blocks still in cache).

Each value is dequantized in registers exactly as gguf.quants does it (f32 d*q + m) and
multiplied with x, so only the order of the sums differs from dequantize-then-matmul.
"""
from __future__ import annotations

import functools

import tvm
from tvm import s_tir, te, tirx

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
