"""Flash-backed decoding: embeddings, attention and norms in DRAM; every FFN weight read
from the flash file, per token, for that token's active neurons only.

Active sets: `oracle`, the true set computed beside the engine from a DRAM copy of the
gate/up weights (a phone cannot: it would need those weights in DRAM), or `predicted`, a
set policy (tuning.predictor) from the layer input alone. With predicted sets the engine
reads the predicted bundles, then keeps the neurons whose true score, computed from the gate/up
rows just read, clears the threshold: a false positive costs a read, a false negative a
dropped neuron. The oracle is then computed beside it for measurement only (missed neurons,
extra bytes per token).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..layout.bundle import decode_bundles
from ..layout.reader import Layout
from ..tuning.forward import FFN, TorchModel, forward, new_cache
from ..tuning.sparsity import scores
from .planner import Plan, plan_reads
from .reader import FlashReader, ReadResult

SETS = "oracle"
SET_POLICIES = ("oracle", "predicted")


@dataclass
class IOStats:
    """I/O of one step (a token, or the whole prompt), summed over layers."""
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_needed: int = 0
    reads: int = 0
    active: int = 0           # active neurons summed over layers
    missed: int = 0           # predicted sets: truly active (token, neuron) pairs not read
    extra_bytes: int = 0      # predicted sets: bundle bytes read for neurons no token needed


def gather(res: ReadResult, plan: Plan, region_offset: int, bundle_bytes: int,
           out: np.ndarray | None = None) -> np.ndarray:
    """The active bundles, in slot order, copied out of the read buffer: (k, bundle_bytes).
    `out` (uint8, (k, bundle_bytes), contiguous): copy there instead, e.g. into a kernel's buffer."""
    k = int(plan.run_lens.sum())
    out = np.empty(k * bundle_bytes, dtype=np.uint8) if out is None else out.reshape(-1)
    file_pos = region_offset + plan.run_starts * bundle_bytes
    buf_pos = res.starts[plan.run_extent] + file_pos - plan.extents[plan.run_extent, 0]
    o = 0
    for p, n in zip(buf_pos.tolist(), (plan.run_lens * bundle_bytes).tolist()):
        out[o:o + n] = res.buffer[p:p + n]
        o += n
    return out.reshape(k, bundle_bytes)


def flash_ffn(tm: TorchModel, layout: Layout, reader: FlashReader, thresholds: np.ndarray,
              criterion: str, stats: IOStats, sets=None, planner=None, store=None) -> FFN:
    """sets: None for the oracle, or a set policy (layer, h) -> predicted mask.
    planner: None (one read per run) or (slots, region_offset, bundle_bytes, align) -> Plan,
    e.g. runtime_py.strategies.layer_planner (access collapse from a device profile).
    store: None or a runtime_py.cache.BundleStore: bundles it holds are not read."""
    spec, bb = layout.spec, layout.spec.bundle_bytes
    swiglu = tm.desc.activation == "swiglu"

    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        hf = h.reshape(-1, shape[-1])
        _, score = scores(tm, layer, hf, criterion)          # the oracle
        mask = score > float(thresholds[layer])              # (tokens, n)
        want = mask if sets is None else sets(layer, hf)
        wanted = np.flatnonzero(want.any(0).numpy())
        hit = store.access(layer, wanted) if store is not None else np.zeros(len(wanted), bool)
        # Taken before `keep`: admitting this step's misses may evict a bundle that just hit.
        hit_rows = store.rows(layer, wanted[hit]) if hit.any() else None
        slots = np.sort(layout.slot_of[layer][wanted[~hit]])
        region = int(layout.region_offsets[layer])
        plan = (planner or plan_reads)(slots, region, bb, layout.alignment)
        res = reader.read(plan.extents)
        rows = gather(res, plan, region, bb)
        read_ids = layout.perm[layer][slots]
        if store is not None:
            store.keep(layer, read_ids, rows)
        if hit_rows is not None:
            rows = np.concatenate((rows, hit_rows))
            read_ids = np.concatenate((read_ids, wanted[hit]))
        b = decode_bundles(spec, rows)
        ids = torch.from_numpy(read_ids)
        up = hf @ torch.from_numpy(b.up).T
        if b.up_bias is not None:
            up = up + torch.from_numpy(b.up_bias)
        gate = F.silu(hf @ torch.from_numpy(b.gate).T) if swiglu else None
        coef = gate * up if swiglu else F.relu(up)
        # Prompt steps read the union of their tokens' sets; each token keeps only its own.
        keep = mask[:, ids]
        if sets is not None:
            own = (gate.abs() if criterion == "gate" else coef.abs()) > float(thresholds[layer])
            keep = want[:, ids] & own
            stats.missed += int((mask & ~want).sum())
            stats.extra_bytes += int((want.any(0) & ~mask.any(0)).sum()) * bb
        y = (coef * keep) @ torch.from_numpy(b.down_t)
        b_down = tm.layers[layer]["b_down"]
        if b_down is not None:
            y = y + b_down
        stats.seconds += res.seconds
        stats.bytes_read += res.bytes_read
        stats.reads += res.reads
        stats.bytes_needed += len(wanted) * bb
        stats.active += len(wanted)
        return y.reshape(shape)
    return ffn


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    prefill: IOStats
    prefill_seconds: float
    steps: list[IOStats] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


def ffn_backend(backend: str):
    """The FFN factory of a backend: `torch` (flash_ffn) or `tvm` (runtime_py.tvm_ffn)."""
    if backend == "tvm":
        from .tvm_ffn import tvm_ffn
        return tvm_ffn
    if backend != "torch":
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    return flash_ffn


BACKENDS = ("torch", "tvm")


def generate(tm: TorchModel, layout: Layout, reader: FlashReader, thresholds: np.ndarray,
             criterion: str, prompt_ids: list[int], n_tokens: int, tokenizer=None,
             backend: str = "torch", sets=None, planner=None, store=None) -> Generation:
    """Greedy decoding, one token at a time, FFN from flash; sets: None (oracle) or a set policy;
    planner, store: the I/O policy (see flash_ffn)."""
    make_ffn = ffn_backend(backend)
    if sets is not None and make_ffn is not flash_ffn:
        raise ValueError(f"predicted sets run on the torch backend only; pass --sets oracle with --backend {backend}")
    if (planner is not None or store is not None) and make_ffn is not flash_ffn:
        raise ValueError(f"I/O planner and cache policies run on the torch backend only, not {backend}")
    policy = {} if sets is None else {"sets": sets}
    policy.update({k: v for k, v in (("planner", planner), ("store", store)) if v is not None})
    cache = new_cache(tm, 1, len(prompt_ids) + n_tokens)
    pre = IOStats()
    t0 = time.perf_counter()
    logits = forward(tm, torch.tensor([prompt_ids]), cache,
                     make_ffn(tm, layout, reader, thresholds, criterion, pre, **policy), last_only=True)
    gen = Generation(list(prompt_ids), [], "", pre, time.perf_counter() - t0)
    eos = set(tm.desc.eos_token_ids)
    for _ in range(n_tokens):
        nxt = int(logits[0, -1].argmax())
        gen.tokens.append(nxt)
        if nxt in eos:
            break
        st = IOStats()
        t0 = time.perf_counter()
        logits = forward(tm, torch.tensor([[nxt]]), cache,
                         make_ffn(tm, layout, reader, thresholds, criterion, st, **policy))
        gen.step_seconds.append(time.perf_counter() - t0)
        gen.steps.append(st)
    if tokenizer is not None:
        gen.text = tokenizer.decode(gen.tokens, skip_special_tokens=True)
    return gen


def report(gen: Generation, reader: FlashReader, n_ffn_neurons: int, sets: str = SETS) -> dict:
    """Per-token I/O figures in the shape `ripple generate --json` writes."""
    ms = [s.seconds * 1e3 for s in gen.steps]
    io = {
        "sets": sets,
        "o_direct": reader.o_direct,
        "fallback_reason": reader.fallback_reason,
        "queue_depth": reader.queue_depth,
        "per_token_ms": ms,
        "bytes_read_per_token": [s.bytes_read for s in gen.steps],
        "bytes_needed_per_token": [s.bytes_needed for s in gen.steps],
        "reads_per_token": [s.reads for s in gen.steps],
        "effective_bw_MBps": [s.bytes_needed / s.seconds / 1e6 if s.seconds else 0.0 for s in gen.steps],
        "active_fraction_per_token": [s.active / n_ffn_neurons for s in gen.steps],
        # Against the oracle set, computed beside the engine for measurement only.
        "missed_per_token": [s.missed for s in gen.steps],
        "extra_bytes_per_token": [s.extra_bytes for s in gen.steps],
        "prefill": {"io_ms": gen.prefill.seconds * 1e3, "bytes_read": gen.prefill.bytes_read,
                    "bytes_needed": gen.prefill.bytes_needed, "reads": gen.prefill.reads,
                    "total_ms": gen.prefill_seconds * 1e3},
    }
    med = lambda xs: float(np.median(xs)) if len(xs) else 0.0  # noqa: E731
    summary = {
        "tokens": len(gen.steps),
        "token_ms_median": med([s * 1e3 for s in gen.step_seconds]),
        "io_ms_median": med(ms),
        "compute_ms_median": med([(t - s.seconds) * 1e3 for t, s in zip(gen.step_seconds, gen.steps)]),
        "bytes_read_median": med(io["bytes_read_per_token"]),
        "bytes_needed_median": med(io["bytes_needed_per_token"]),
        "reads_median": med(io["reads_per_token"]),
        "effective_bw_MBps_median": med(io["effective_bw_MBps"]),
        "active_fraction_mean": float(np.mean(io["active_fraction_per_token"])) if gen.steps else 0.0,
        "missed_per_token_mean": float(np.mean(io["missed_per_token"])) if gen.steps else 0.0,
        "extra_bytes_per_token_mean": float(np.mean(io["extra_bytes_per_token"])) if gen.steps else 0.0,
    }
    return {"io": io, "summary": summary, "token_ms": [s * 1e3 for s in gen.step_seconds]}
