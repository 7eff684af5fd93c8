"""The FFN of a layer read whole from its whole copy (layout.whole_copy): the GGUF's own gate,
up and down blocks, multiplied in place by the compiled GEMVs (compile.qgemv), as llama.cpp
computes it: every neuron, no threshold, so no neuron is missed and nothing is rounded twice.

y = W_down (silu(W_gate x) * W_up x), x (T, d) float32.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..layout.whole_copy import WholeCopy


def whole_ffn(copy: WholeCopy, raw: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """raw: a layer's extent as read (uint8, 64-byte aligned); x (T, d) -> y (T, d) float32.
    The kernels are called directly, not through a QuantizedMatrix per part: building three per
    layer and token cost ~50 us a layer (timed on SmolLM2's shapes, 311-445 against 263-308 us)."""
    import tvm

    from ..compile.qgemv import qgemv_function

    x = x.to(torch.float32).contiguous()
    if x.data_ptr() % 64:                # tvm-ffi takes only 64-byte aligned buffers as they are
        x = x.clone()
    out = {}
    for part in copy.parts:
        rows, cols = part.shape
        inp = x if part.name != "down" else F.silu(out["gate"]) * out["up"]
        y = torch.empty(inp.shape[0], rows, dtype=torch.float32)
        qgemv_function(part.kind, rows, cols)(inp, tvm.runtime.from_dlpack(copy.blocks(raw, part)), y)
        out[part.name] = y
    return out["down"]
