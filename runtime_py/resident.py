"""What the engine holds in DRAM, summed from the arrays themselves: the model's weights by
kind (non-FFN, and any FFN copy), the FFN bundle cache, the activation predictor and the KV
cache. Shared storage (tied embeddings) counts once. `ripple bench e2e` reports this figure
as ours' model bytes resident, beside the process RSS."""
from __future__ import annotations

from collections.abc import Iterable


from ..tuning.forward import FFN_WEIGHTS, KVCache, TorchModel, Weight
from ..tuning.quantized_matrix import QuantizedMatrix


def _tensors(tm: TorchModel) -> Iterable[tuple[str, Weight | None]]:
    yield from (("embed", tm.embed), ("lm_head", tm.lm_head), ("final_norm", tm.final_norm),
                ("final_norm_b", tm.final_norm_b), ("pos_embed", tm.pos_embed), ("inv_freq", tm.inv_freq))
    for lw in tm.layers:
        yield from lw.items()


def _storage(w: Weight) -> tuple[int, int, str]:
    """(address, bytes, dtype key) of what holds a weight: a tensor's whole storage, or a
    QuantizedMatrix's blocks (key: its kind, e.g. "q4_1")."""
    if isinstance(w, QuantizedMatrix):
        return w.raw.ctypes.data, w.nbytes, w.kind
    return w.untyped_storage().data_ptr(), w.untyped_storage().nbytes(), str(w.dtype).removeprefix("torch.")


def weight_bytes(tm: TorchModel) -> dict[str, int]:
    """{"non_ffn": bytes, "ffn": bytes of FFN matrices held in DRAM (0 when built with
    ffn=False), "non_ffn_dtypes": {dtype or block kind: bytes}}; b_down counts as non-FFN (it
    is added per token and never stored in bundles)."""
    seen, out, dtypes = set(), {"non_ffn": 0, "ffn": 0}, {}
    for name, t in _tensors(tm):
        if t is None:
            continue
        address, nbytes, key = _storage(t)
        if address in seen:
            continue
        seen.add(address)
        if name in FFN_WEIGHTS:
            out["ffn"] += nbytes
        else:
            out["non_ffn"] += nbytes
            dtypes[key] = dtypes.get(key, 0) + nbytes
    return {**out, "non_ffn_dtypes": dtypes}


def kv_bytes(kv: KVCache | None) -> int:
    return 0 if kv is None else sum(t.untyped_storage().nbytes() for t in (*kv.k, *kv.v))


def cache_bytes(store) -> int:
    """Bytes of bundles a runtime_py.cache.BundleStore holds (0 for none)."""
    return 0 if store is None else store.nbytes


def predictor_bytes(sets) -> int:
    """Bytes of a set policy's weights: policies that hold tensors expose `tensors()`."""
    tensors = getattr(sets, "tensors", None)
    return 0 if tensors is None else int(sum(t.untyped_storage().nbytes() for t in tensors()))


def resident_bytes(tm: TorchModel, kv: KVCache | None = None, store=None, sets=None, ahead=None) -> dict:
    """Everything the engine holds, by kind, and the total (the figure bench e2e reports).
    ahead: a runtime_py.read_ahead.ReadAhead, whose layers pinned from a whole copy count as
    FFN cache (its read buffers, like the reader's, are I/O staging and are not counted)."""
    w = weight_bytes(tm)
    pinned = 0 if ahead is None else ahead.pinned_bytes
    out = {"non_ffn_weights": w["non_ffn"], "ffn_weights_dram_copy": w["ffn"],
           "ffn_cache": cache_bytes(store) + pinned, "predictor": predictor_bytes(sets), "kv_cache": kv_bytes(kv)}
    out["total"] = int(sum(out.values()))
    out["non_ffn_dtypes"] = w["non_ffn_dtypes"]
    return out
