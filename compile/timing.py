"""How kernels are timed: TVM's time_evaluator, one call per repeat, with every argument but
the first (x) flushed from the caches before each call.

Cold is what a layer's weights are on a phone: per token each layer's bundles come from flash
through DRAM, and 30 layers of them do not stay in cache. x is a few KiB and stays hot.
"""
from __future__ import annotations

import numpy as np
import tvm

FLUSH = "cache_flush_cpu_non_first_arg"


def time_call(lib, args: list, repeat: int = 20, cold: bool = True, name: str = "main") -> float:
    """Median seconds of one call of `name` on `args` (tvm tensors)."""
    ev = lib.jit().time_evaluator(name, tvm.cpu(), number=1, repeat=repeat,
                                  f_preproc=FLUSH if cold else "")
    return float(ev(*args).median)


def flush(*tensors) -> None:
    """Evict tvm tensors (and numpy arrays viewing them) from the caches, so numpy and torch
    are timed cold like the kernels."""
    tvm.get_global_func(FLUSH)(tvm.runtime.tensor(np.zeros(1, "float32")), *tensors)


def tvm_backed(a: np.ndarray):
    """(tvm tensor, writable numpy view of it): a copy of `a` in memory TVM allocated
    (64-byte aligned), for arrays that numpy code and TVM kernels both use."""
    t = tvm.runtime.tensor(np.ascontiguousarray(a))
    return t, np.from_dlpack(t)
