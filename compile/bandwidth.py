"""DRAM read bandwidth, measured with a TVM kernel that streams a buffer on the same threads
the FFN kernels use: the roofline the kernels are held to.

Two ways, and callers take the higher: a pass over a buffer much larger than the caches
(warm loop), and a pass over a cache-sized buffer flushed before each pass, the way the
kernels are timed (page-walk and TLB costs then match theirs)."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, te, tirx

from .targets import make_target
from .timing import FLUSH

_ROW = 16 * 1024          # floats per row: 64 KiB, a parallel task's share
_LANES = 16


def _stream_sum():
    """main(out (n, 16), A (n, ROW/16, 16)): out first, so a cache flush of the non-first
    arguments evicts A."""
    n = te.var("n", dtype="int64")
    A = te.placeholder((n, tirx.IntImm("int64", _ROW // _LANES), tirx.IntImm("int64", _LANES)),
                       "float32", name="A")
    r = te.reduce_axis((0, tirx.IntImm("int64", _ROW // _LANES)), name="r")
    B = te.compute((n, tirx.IntImm("int64", _LANES)), lambda i, l: te.sum(A[i, r, l], axis=r),
                   name="B")
    sch = s_tir.Schedule(te.create_prim_func([B, A]).with_attr("global_symbol", "main"))
    blk = sch.get_sblock("B")
    i, l, rr = sch.get_loops(blk)
    sch.reorder(i, rr, l)
    sch.parallel(i)
    sch.vectorize(l)
    sch.decompose_reduction(blk, rr)
    return sch.mod


def dram_read_bandwidth(target_name: str = "host", mib: int = 256, repeat: int = 7,
                        cold: bool = False) -> float:
    """Bytes per second read: median of `repeat` passes over `mib` MiB (cold: flushed first)."""
    lib = tvm.compile(_stream_sum(), target=make_target(target_name))
    rows = max(1, mib * (1 << 20) // (_ROW * 4))
    a = tvm.runtime.tensor(np.ones((rows, _ROW // _LANES, _LANES), "float32"))
    b = tvm.runtime.tensor(np.zeros((rows, _LANES), "float32"))
    lib["main"](b, a)                                   # first touch: page faults, not DRAM
    sec = lib.jit().time_evaluator("main", tvm.cpu(), number=1, repeat=repeat,
                                   f_preproc=FLUSH if cold else "")(b, a).median
    return rows * _ROW * 4 / sec
