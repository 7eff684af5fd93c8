"""The params tuple of a compiled model (compile.model_graph.param_layout) as a file an app
loads: params.bin holds the tensors back to back, each at a 64-byte boundary (what tvm-ffi takes
without a copy); app.json's "params" lists name, shape, dtype, offset and bytes in tuple order.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from ..atomic_file import atomic_write
from .model_graph import DecodeSpec, param_layout

PARAMS_FILE = "params.bin"
_ALIGN = 64
Q8 = "q8_0"


def q8_blocks(w: np.ndarray) -> np.ndarray:
    """uint8 (rows, cols/32 * 34): w (rows, cols) float as GGUF Q8_0 blocks."""
    return np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(w, np.float32),
                                                     gguf.GGMLQuantizationType.Q8_0))


def write_params(folder: str | os.PathLike, spec: DecodeSpec, params: dict[str, np.ndarray]) -> dict:
    """params.bin in folder; returns app.json's "params" entry. Every tensor is checked against
    param_layout(spec) first (a mismatch is a bug here, not the user's)."""
    index, at = [], 0
    for name, shape, dtype in param_layout(spec):
        a = params[name]
        if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
            raise ValueError(f"param {name}: {a.dtype} {a.shape}, the graph takes {dtype} {tuple(shape)}")
        at = -(-at // _ALIGN) * _ALIGN
        index.append({"name": name, "shape": list(shape), "dtype": dtype, "offset": at, "nbytes": int(a.nbytes)})
        at += a.nbytes
    with atomic_write(Path(folder) / PARAMS_FILE, "wb") as f:
        for entry in index:
            f.seek(entry["offset"])
            f.write(np.ascontiguousarray(params[entry["name"]]).tobytes())
        f.truncate(at)
    return {"file": PARAMS_FILE, "bytes": at, "tensors": index}


def read_params(folder: str | os.PathLike, entry: dict) -> list[np.ndarray]:
    """The tensors of app.json's "params" entry, in tuple order (views of one read-only map)."""
    path = Path(folder) / entry["file"]
    size = path.stat().st_size
    if size < entry["bytes"]:
        raise ValueError(f"{path}: {size} bytes, app.json lists {entry['bytes']}; re-run `ripple compile`")
    mm = np.memmap(path, np.uint8, "r")
    return [mm[e["offset"]:e["offset"] + e["nbytes"]].view(e["dtype"]).reshape(e["shape"]) for e in entry["tensors"]]
