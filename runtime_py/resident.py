"""What the engine holds in DRAM, summed from the arrays themselves: the model's weights by
kind (non-FFN, and any FFN copy), the FFN bundle cache, the activation predictor and the KV
cache. Shared storage (tied embeddings) counts once. `ripple bench e2e` reports this figure
as ours' model bytes resident, beside the process RSS."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..tuning.forward import FFN_WEIGHTS, KVCache, TorchModel


def _tensors(tm: TorchModel) -> Iterable[tuple[str, torch.Tensor | None]]:
    yield from (("embed", tm.embed), ("lm_head", tm.lm_head), ("final_norm", tm.final_norm),
                ("final_norm_b", tm.final_norm_b), ("pos_embed", tm.pos_embed), ("inv_freq", tm.inv_freq))
    for lw in tm.layers:
        yield from lw.items()


def weight_bytes(tm: TorchModel) -> dict[str, int]:
    """{"non_ffn": bytes, "ffn": bytes of FFN matrices held in DRAM (0 when built with
    ffn=False), "non_ffn_dtypes": {dtype: bytes}}; b_down counts as non-FFN (it is added per
    token and never stored in bundles)."""
    seen, out, dtypes = set(), {"non_ffn": 0, "ffn": 0}, {}
    for name, t in _tensors(tm):
        if t is None or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        nbytes = t.untyped_storage().nbytes()
        if name in FFN_WEIGHTS:
            out["ffn"] += nbytes
        else:
            out["non_ffn"] += nbytes
            key = str(t.dtype).removeprefix("torch.")
            dtypes[key] = dtypes.get(key, 0) + nbytes
    return {**out, "non_ffn_dtypes": dtypes}


def kv_bytes(kv: KVCache | None) -> int:
    return 0 if kv is None else sum(t.untyped_storage().nbytes() for t in (*kv.k, *kv.v))


def cache_bytes(store) -> int:
    """Bytes of bundles a runtime_py.cache.BundleStore holds (0 for none)."""
    return 0 if store is None else int(sum(np.asarray(r).nbytes for r in store.rows_of.values()))


def predictor_bytes(sets) -> int:
    """Bytes of a set policy's weights: policies that hold tensors expose `tensors()`."""
    tensors = getattr(sets, "tensors", None)
    return 0 if tensors is None else int(sum(t.untyped_storage().nbytes() for t in tensors()))


def resident_bytes(tm: TorchModel, kv: KVCache | None = None, store=None, sets=None) -> dict:
    """Everything the engine holds, by kind, and the total (the figure bench e2e reports)."""
    w = weight_bytes(tm)
    out = {"non_ffn_weights": w["non_ffn"], "ffn_weights_dram_copy": w["ffn"],
           "ffn_cache": cache_bytes(store), "predictor": predictor_bytes(sets), "kv_cache": kv_bytes(kv)}
    out["total"] = int(sum(out.values()))
    out["non_ffn_dtypes"] = w["non_ffn_dtypes"]
    return out
