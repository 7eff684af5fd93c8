"""Flash-backed decoding: embeddings, attention and norms in DRAM; every FFN weight read
from the flash file, per token, for that token's active neurons only.

Active sets come from `oracle`: the true set, computed beside the engine from a DRAM copy
of the gate/up weights. A phone cannot do that (it would need those weights in DRAM);
predictors replace it later, and the oracle stays for measurement, labelled as such.
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


@dataclass
class IOStats:
    """I/O of one step (a token, or the whole prompt), summed over layers."""
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_needed: int = 0
    reads: int = 0
    active: int = 0           # active neurons summed over layers


def gather(res: ReadResult, plan: Plan, region_offset: int, bundle_bytes: int) -> np.ndarray:
    """The active bundles, in slot order, copied out of the read buffer: (k, bundle_bytes)."""
    k = int(plan.run_lens.sum())
    out = np.empty(k * bundle_bytes, dtype=np.uint8)
    file_pos = region_offset + plan.run_starts * bundle_bytes
    buf_pos = res.starts[plan.run_extent] + file_pos - plan.extents[plan.run_extent, 0]
    o = 0
    for p, n in zip(buf_pos.tolist(), (plan.run_lens * bundle_bytes).tolist()):
        out[o:o + n] = res.buffer[p:p + n]
        o += n
    return out.reshape(k, bundle_bytes)


def flash_ffn(tm: TorchModel, layout: Layout, reader: FlashReader, thresholds: np.ndarray,
              criterion: str, stats: IOStats) -> FFN:
    spec, bb = layout.spec, layout.spec.bundle_bytes
    swiglu = tm.desc.activation == "swiglu"

    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        hf = h.reshape(-1, shape[-1])
        _, score = scores(tm, layer, hf, criterion)          # the oracle
        mask = score > float(thresholds[layer])              # (tokens, n)
        slots = np.sort(layout.slot_of[layer][np.flatnonzero(mask.any(0).numpy())])
        plan = plan_reads(slots, int(layout.region_offsets[layer]), bb, layout.alignment)
        res = reader.read(plan.extents)
        b = decode_bundles(spec, gather(res, plan, int(layout.region_offsets[layer]), bb))
        ids = torch.from_numpy(layout.perm[layer][slots])
        up = hf @ torch.from_numpy(b.up).T
        if b.up_bias is not None:
            up = up + torch.from_numpy(b.up_bias)
        coef = F.silu(hf @ torch.from_numpy(b.gate).T) * up if swiglu else F.relu(up)
        # Prompt steps read the union of their tokens' sets; each token keeps only its own.
        y = (coef * mask[:, ids]) @ torch.from_numpy(b.down_t)
        b_down = tm.layers[layer]["b_down"]
        if b_down is not None:
            y = y + b_down
        stats.seconds += res.seconds
        stats.bytes_read += res.bytes_read
        stats.reads += res.reads
        stats.bytes_needed += len(slots) * bb
        stats.active += len(slots)
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


def generate(tm: TorchModel, layout: Layout, reader: FlashReader, thresholds: np.ndarray,
             criterion: str, prompt_ids: list[int], n_tokens: int, tokenizer=None) -> Generation:
    """Greedy decoding, one token at a time, FFN from flash."""
    cache = new_cache(tm, 1, len(prompt_ids) + n_tokens)
    pre = IOStats()
    t0 = time.perf_counter()
    logits = forward(tm, torch.tensor([prompt_ids]), cache,
                     flash_ffn(tm, layout, reader, thresholds, criterion, pre), last_only=True)
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
                         flash_ffn(tm, layout, reader, thresholds, criterion, st))
        gen.step_seconds.append(time.perf_counter() - t0)
        gen.steps.append(st)
    if tokenizer is not None:
        gen.text = tokenizer.decode(gen.tokens, skip_special_tokens=True)
    return gen


def report(gen: Generation, reader: FlashReader, n_ffn_neurons: int) -> dict:
    """Per-token I/O figures in the shape `ripple generate --json` writes."""
    ms = [s.seconds * 1e3 for s in gen.steps]
    io = {
        "sets": SETS,
        "o_direct": reader.o_direct,
        "fallback_reason": reader.fallback_reason,
        "queue_depth": reader.queue_depth,
        "per_token_ms": ms,
        "bytes_read_per_token": [s.bytes_read for s in gen.steps],
        "bytes_needed_per_token": [s.bytes_needed for s in gen.steps],
        "reads_per_token": [s.reads for s in gen.steps],
        "effective_bw_MBps": [s.bytes_needed / s.seconds / 1e6 if s.seconds else 0.0 for s in gen.steps],
        "active_fraction_per_token": [s.active / n_ffn_neurons for s in gen.steps],
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
    }
    return {"io": io, "summary": summary, "token_ms": [s * 1e3 for s in gen.step_seconds]}
