"""A weight matrix held in DRAM as GGUF blocks (Q4_1 or Q8_0), never expanded as a whole.

Issue 11: a phone's DRAM is the scarce resource, so the attention matrices and the tied
embedding/LM head stay as the GGUF stores them (SmolLM2-135M: 16.6 MB of Q4_1 and 30 MB of
Q8_0 instead of ~110 MB in bf16). Products with x run the compiled GEMV of compile.qgemv on
the blocks as they lie; an embedding lookup dequantizes only the rows it looks up.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import gguf
import numpy as np
import torch

# Our kind names -> the GGUF types they are.
GGUF_TYPE = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}
KIND_OF = {q: k for k, q in GGUF_TYPE.items()}
_ALIGN = 64        # what tvm-ffi requires of a tensor it is handed without a copy


@dataclass(eq=False)
class QuantizedMatrix:
    raw: np.ndarray              # uint8 (rows, cols/32 * block bytes), 64-byte aligned
    kind: str                    # "q4_1" | "q8_0"
    shape: tuple[int, int]       # (rows, cols) of the values
    _kernel: object = field(init=False, repr=False)

    def __post_init__(self):
        if self.kind not in GGUF_TYPE:
            raise ValueError(f"unknown block kind {self.kind!r}; known: {list(GGUF_TYPE)}")
        rows, cols = self.shape
        want = tuple(gguf.quants.quant_shape_to_byte_shape((rows, cols), GGUF_TYPE[self.kind]))
        if self.raw.dtype != np.uint8 or self.raw.shape != want:
            raise ValueError(f"{self.kind} blocks of a {rows}x{cols} matrix are uint8 {want}, "
                             f"got {self.raw.dtype} {self.raw.shape}")
        if not self.raw.flags.c_contiguous or self.raw.ctypes.data % _ALIGN:
            raise ValueError(f"blocks must be C-contiguous and {_ALIGN}-byte aligned; "
                             f"build with QuantizedMatrix.from_blocks")
        self._kernel = None

    @classmethod
    def from_blocks(cls, raw: np.ndarray, kind: str, shape: tuple[int, int]) -> "QuantizedMatrix":
        """A copy of `raw` (e.g. a view of a GGUF file) in memory of its own, aligned."""
        # torch's CPU allocator aligns to 64 bytes and allocates exactly the bytes asked for.
        own = torch.empty(np.shape(raw), dtype=torch.uint8).numpy()
        own[...] = raw
        return cls(own, kind, (int(shape[0]), int(shape[1])))

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def gguf_type(self) -> gguf.GGMLQuantizationType:
        return GGUF_TYPE[self.kind]

    def rows(self, ids) -> torch.Tensor:
        """float32 (*ids.shape, cols): the rows `ids` dequantized (an embedding lookup)."""
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"row ids must lie in [0, {self.shape[0]}); got {ids.min()}..{ids.max()}")
        vals = gguf.quants.dequantize(self.raw[ids.reshape(-1)], self.gguf_type)
        return torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32)).reshape(*ids.shape, self.shape[1])

    def dequantize(self) -> np.ndarray:
        """float32 (rows, cols): the whole matrix (for references and tests, not for the engine)."""
        return gguf.quants.dequantize(self.raw, self.gguf_type).reshape(self.shape).astype(np.float32)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., cols) float32 -> x @ W.T (..., rows) float32, by the compiled GEMV; tokens
        of a prompt step go through one call (the kernel loops over them)."""
        rows, cols = self.shape
        if x.shape[-1] != cols:
            raise ValueError(f"x has {x.shape[-1]} columns, the {rows}x{cols} matrix needs {cols}")
        x2 = x.reshape(-1, cols)
        if x2.dtype != torch.float32 or not x2.is_contiguous() or x2.data_ptr() % _ALIGN:
            x2 = x2.to(torch.float32).clone(memory_format=torch.contiguous_format)   # fresh: aligned
        y = torch.empty(x2.shape[0], rows, dtype=torch.float32)
        if x2.shape[0]:
            if self._kernel is None:    # the kernel, and the blocks as a tvm tensor (no copy)
                import tvm              # here: importing tvm costs ~1 s, and most users of
                                        # forward never multiply blocks
                from ..compile.qgemv import qgemv_function
                self._kernel = (qgemv_function(self.kind, rows, cols), tvm.runtime.from_dlpack(self.raw))
            fn, w = self._kernel
            fn(x2, w, y)
        return y.view(*x.shape[:-1], rows)
