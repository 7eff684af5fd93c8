"""The Python engine's FFN backends by name: `torch` (engine.flash_ffn, torch matmuls on the
decoded bundles) or `tvm` (tvm_ffn: the per-layer compiled graph with the flash hook)."""
from __future__ import annotations

BACKENDS = ("torch", "tvm")


def ffn_backend(backend: str):
    """The FFN factory engine.generate takes as make_ffn."""
    if backend == "tvm":
        from .tvm_ffn import tvm_ffn
        return tvm_ffn
    if backend != "torch":
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    from .engine import flash_ffn
    return flash_ffn
