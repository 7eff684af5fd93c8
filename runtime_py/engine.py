"""Flash-backed decoding: embeddings, attention and norms in DRAM; every FFN weight read
from the flash file, per token, for that token's active neurons only.

Active sets: `oracle`, the true set computed beside the engine from a DRAM copy of the
gate/up weights (a phone cannot: it would need those weights in DRAM), or `predicted`, a
set policy (tuning.predictor) from the layer input alone. With predicted sets the engine
reads the predicted bundles, then keeps the neurons whose true score, computed from the gate/up
rows just read, clears the threshold: a false positive costs a read, a false negative a
dropped neuron. The oracle is computed beside it for measurement only (missed neurons, extra
bytes per token) when `measure_misses` is on; off, no FFN weight is held in DRAM at all.
runtime_py.resident sums what the engine holds (Generation.resident).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..layout.reader import Layout
from ..tuning.forward import FFN, TorchModel, forward, new_cache
from ..tuning.sparsity import scores
from .bundle_tensors import decode_tensors
from .planner import Plan, chain_ends, covered_slots, plan_reads
from .reader import FlashReader, ReadResult
from .resident import resident_bytes
from .whole_ffn import whole_ffn

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
    hidden_seconds: float = 0.0   # read time overlapped with compute (runtime_py.read_ahead)

    def take(self) -> "IOStats":
        """The figures so far, and zero for the next step (one FFN serves every step)."""
        done = dataclasses.replace(self)
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)
        return done


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


GEMV_PARTS = ("gate", "up")        # the parts every read bundle needs (ReLU bundles: up only)


class FFNWeightsAbsent(ValueError):
    """The oracle set was asked of a model built without FFN weights in DRAM."""


def set_chooser(tm: TorchModel, thresholds: np.ndarray, criterion: str, stats: IOStats,
                bundle_bytes: int, sets=None, measure_misses: bool = True):
    """choose(layer, hf (T, d)) -> the neurons to fetch per token, (T, n) bool: the oracle set
    (sets None) or the set policy's prediction; with predicted sets and measure_misses, the
    oracle is scored beside it and missed neurons / extra bytes go into stats."""
    n = tm.desc.d_ffn

    def oracle(layer: int, hf: torch.Tensor) -> torch.Tensor:
        if float(thresholds[layer]) < 0:       # below every score (sparsity.ALL_ACTIVE): dense
            return torch.ones(hf.shape[0], n, dtype=torch.bool)
        if tm.layers[layer]["w_up"] is None:
            raise FFNWeightsAbsent("oracle sets score every neuron from the FFN weights in DRAM, and this "
                                   "model was built without them; use predicted sets, or to_torch(ffn=True)")
        return scores(tm, layer, hf, criterion)[1] > float(thresholds[layer])   # (tokens, n)

    def choose(layer: int, hf: torch.Tensor) -> torch.Tensor:
        if sets is None:
            return oracle(layer, hf)
        want = sets(layer, hf)
        if measure_misses:
            mask = oracle(layer, hf)
            stats.missed += int((mask & ~want).sum())
            stats.extra_bytes += int((want.any(0) & ~mask.any(0)).sum()) * bundle_bytes
        return want
    return choose


def fetch(layout: Layout, reader: FlashReader, layer: int, wanted: np.ndarray, stats: IOStats,
          planner=None, store=None, out: np.ndarray | None = None, ahead=None,
          got=None) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of the bundles of neurons `wanted` (unique ids): (rows (k, bundle_bytes) uint8,
    their ids), the ones read from flash in slot order, then the cache's hits. Counts the I/O.
    planner: None (one read per run) or (slots, region_offset, bundle_bytes, align) -> Plan,
    e.g. runtime_py.strategies.layer_planner (access collapse from a device profile).
    store: None or a runtime_py.cache.BundleStore: bundles it holds are not read.
    out: (k, bundle_bytes) uint8 to fill instead, e.g. the buffer the compiled graph allocated.
    ahead, got: None, or a runtime_py.read_ahead.ReadAhead and what its take(layer) gave: a
    layer it read whole comes from there (the cache is not consulted: every bundle is in
    hand); the others are planned and read here and tell it how much of their region the
    plan read."""
    bb = layout.bundle_bytes
    if out is None:
        out = np.empty((len(wanted), bb), dtype=np.uint8)
    if got is not None:
        slots = np.sort(layout.slot_of[layer][wanted])
        np.take(ahead.region(got[0], layer), slots, axis=0, out=out)
        count_read(stats, *got, len(wanted) * bb, len(wanted))
        return out, layout.perm[layer][slots]
    hit = store.access(layer, wanted) if store is not None else None
    # Taken before `keep`: admitting this step's misses may evict a bundle that just hit.
    any_hit = hit is not None and hit.any()
    hit_rows = store.rows(layer, wanted[hit]) if any_hit else None
    miss = wanted[~hit] if any_hit else wanted
    slots = np.sort(layout.slot_of[layer][miss])
    region = int(layout.region_offsets[layer])
    plan = (planner or plan_reads)(slots, region, bb, layout.alignment)
    if ahead is not None:
        ahead.note_plan(layer, plan.bytes_read)
    res = reader.read(plan.extents)
    gather(res, plan, region, bb, out=out[:len(slots)])
    read_ids = layout.perm[layer][slots]
    if store is not None:
        store.keep(layer, read_ids, out[:len(slots)])
        if store.cache.reads_through:
            read_through(layout, layer, plan, res, slots, store)
    ids = read_ids
    if hit_rows is not None:
        out[len(slots):] = hit_rows
        ids = np.concatenate((read_ids, wanted[hit]))
    count_read(stats, res, res.seconds, len(wanted) * bb, len(wanted))
    return out, ids


def read_through(layout: Layout, layer: int, plan: Plan, res: ReadResult, asked: np.ndarray, store) -> None:
    """Offer the store the bundles the plan read in its gaps, copied out of the read buffer."""
    bb, region = layout.bundle_bytes, int(layout.region_offsets[layer])
    slots = covered_slots(plan, region, bb, len(layout.perm[layer]))
    slots = slots[~np.isin(slots, asked, assume_unique=True)]
    if len(slots) == 0:
        return
    pos = region + slots * bb
    # The last extent starting at or before each bundle, and the pieces continuing it (sorted
    # extents; one read per bundle may overlap its neighbour's block: such a bundle is skipped).
    e = np.searchsorted(plan.extents[:, 0], pos, side="right") - 1
    inside = pos + bb <= chain_ends(plan.extents)[e]
    slots, pos, e = slots[inside], pos[inside], e[inside]
    at = res.starts[e] + pos - plan.extents[e, 0]
    rows = res.buffer[at[:, None] + np.arange(bb)]
    store.read_through(layer, layout.perm[layer][slots], rows)


def count_read(stats: IOStats, res: ReadResult, waited: float, bytes_needed: int, active: int) -> None:
    """Count a read: what the step waited for is its I/O time, the rest (a read ahead) was hidden."""
    stats.seconds += waited
    stats.hidden_seconds += max(res.seconds - waited, 0.0)
    stats.bytes_read += res.bytes_read
    stats.reads += res.reads
    stats.bytes_needed += bytes_needed
    stats.active += active


def copy_ffn(ahead, layer: int, got, x: torch.Tensor, stats: IOStats, n: int) -> torch.Tensor:
    """A layer read whole from its whole copy (runtime_py.read_ahead): every neuron, computed on
    the GGUF's own blocks (runtime_py.whole_ffn); all its bytes were needed."""
    count_read(stats, *got, sum(p.nbytes for p in ahead.copy.parts), n)
    return whole_ffn(ahead.copy, ahead.region(got[0], layer), x)


def flash_ffn(tm: TorchModel, layout: Layout, reader: FlashReader, thresholds: np.ndarray,
              criterion: str, stats: IOStats, sets=None, planner=None, store=None,
              measure_misses: bool = True, ahead=None) -> FFN:
    """sets: None for the oracle, or a set policy (layer, h) -> predicted mask.
    planner, store, ahead: the I/O policy (see fetch).
    measure_misses: with predicted sets, also score the oracle set (from the DRAM copy of the
    FFN weights) to count missed neurons and extra bytes; off, the engine needs no FFN weight
    in DRAM (tuning.forward.to_torch(..., ffn=False)) and stats.missed/extra_bytes stay 0."""
    spec = layout.spec
    swiglu = tm.desc.activation == "swiglu"
    choose = set_chooser(tm, thresholds, criterion, stats, layout.bundle_bytes, sets, measure_misses)

    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        hf = h.reshape(-1, shape[-1])
        got = ahead.take(layer) if ahead else None
        if got is not None and ahead.copy is not None:
            y = copy_ffn(ahead, layer, got, hf, stats, tm.desc.d_ffn)
            return (y if tm.layers[layer]["b_down"] is None else y + tm.layers[layer]["b_down"]).reshape(shape)
        want = choose(layer, hf)
        rows, read_ids = fetch(layout, reader, layer, np.flatnonzero(want.any(0).numpy()), stats,
                               planner, store, ahead=ahead, got=got)
        # Down columns only of neurons some token keeps (with predicted sets ~45% of those read).
        b = decode_tensors(spec, rows, GEMV_PARTS)
        ids = torch.from_numpy(read_ids)
        if b.gate_up is not None:          # one GEMV over gate and up rows: (T, k, P)
            gu = (hf @ b.gate_up.reshape(-1, hf.shape[-1]).T).view(hf.shape[0], -1, b.gate_up.shape[1])
            up, gate = gu[..., -1], (gu[..., 0] if swiglu else None)
        else:
            up, gate = hf @ b.up.T, (hf @ b.gate.T if swiglu else None)
        if b.up_bias is not None:
            up = up + b.up_bias
        gate = F.silu(gate) if swiglu else None
        coef = gate * up if swiglu else F.relu(up)
        # Prompt steps read the union of their tokens' sets; each token keeps only its own,
        # and with predicted sets only the neurons whose true score, from the rows just read,
        # clears the threshold.
        keep = want[:, ids]
        if sets is not None:
            keep &= (gate.abs() if criterion == "gate" else coef.abs()) > float(thresholds[layer])
        used = np.flatnonzero(keep.any(0).numpy())
        down_t = (b.down_t[used] if b.down_t is not None else
                  decode_tensors(spec, rows[used], ("down",)).down_t)
        y = (coef[:, used] * keep[:, used]) @ down_t
        b_down = tm.layers[layer]["b_down"]
        if b_down is not None:
            y = y + b_down
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
    resident: dict = field(default_factory=dict)      # runtime_py.resident.resident_bytes at the end
    misses_measured: bool = True                      # predicted sets scored against the oracle


def generate(tm: TorchModel, layout: Layout, reader: FlashReader, thresholds: np.ndarray,
             criterion: str, prompt_ids: list[int], n_tokens: int, tokenizer=None,
             make_ffn=None, sets=None, planner=None, store=None,
             measure_misses: bool = True, kv_dtype: torch.dtype = torch.float32, ahead=None) -> Generation:
    """Greedy decoding, one token at a time, FFN from flash; make_ffn: flash_ffn (default) or
    another factory of its signature (runtime_py.backends); sets: None (oracle) or a set
    policy; planner, store, ahead: the I/O policy; measure_misses: see flash_ffn; kv_dtype: the
    KV cache's storage (tuning.forward.new_cache)."""
    make_ffn = make_ffn or flash_ffn
    policy = {"sets": sets, "planner": planner, "store": store, "measure_misses": measure_misses,
              "ahead": ahead}
    cache = new_cache(tm, 1, len(prompt_ids) + n_tokens, kv_dtype)
    stats = IOStats()
    t0 = time.perf_counter()
    # Built once: per step it cost ~1.2 ms of a token (the TVM backend's tensors and binding).
    ffn = make_ffn(tm, layout, reader, thresholds, criterion, stats, **policy)
    logits = forward(tm, torch.tensor([prompt_ids]), cache, ffn, last_only=True)
    gen = Generation(list(prompt_ids), [], "", stats.take(), time.perf_counter() - t0,
                     misses_measured=sets is None or measure_misses)
    eos = set(tm.desc.eos_token_ids)
    for _ in range(n_tokens):
        nxt = int(logits[0, -1].argmax())
        gen.tokens.append(nxt)
        if nxt in eos:
            break
        t0 = time.perf_counter()
        logits = forward(tm, torch.tensor([[nxt]]), cache, ffn)
        gen.step_seconds.append(time.perf_counter() - t0)
        gen.steps.append(stats.take())
    if tokenizer is not None:
        gen.text = tokenizer.decode(gen.tokens, skip_special_tokens=True)
    gen.resident = resident_bytes(tm, cache, store, sets, ahead)
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
        # Read time overlapped with compute by read-ahead (not in per_token_ms, which is waited).
        "hidden_ms_per_token": [s.hidden_seconds * 1e3 for s in gen.steps],
        "bytes_read_per_token": [s.bytes_read for s in gen.steps],
        "bytes_needed_per_token": [s.bytes_needed for s in gen.steps],
        "reads_per_token": [s.reads for s in gen.steps],
        "effective_bw_MBps": [s.bytes_needed / s.seconds / 1e6 if s.seconds else 0.0 for s in gen.steps],
        "active_fraction_per_token": [s.active / n_ffn_neurons for s in gen.steps],
        # Against the oracle set, computed beside the engine for measurement only (None: not
        # measured, the engine ran without the FFN weights in DRAM).
        "misses_measured": gen.misses_measured,
        "missed_per_token": [s.missed for s in gen.steps] if gen.misses_measured else None,
        "extra_bytes_per_token": [s.extra_bytes for s in gen.steps] if gen.misses_measured else None,
        "prefill": {"io_ms": gen.prefill.seconds * 1e3, "bytes_read": gen.prefill.bytes_read,
                    "bytes_needed": gen.prefill.bytes_needed, "reads": gen.prefill.reads,
                    "total_ms": gen.prefill_seconds * 1e3},
    }
    med = lambda xs: float(np.median(xs)) if len(xs) else 0.0  # noqa: E731
    summary = {
        "tokens": len(gen.steps),
        "token_ms_median": med([s * 1e3 for s in gen.step_seconds]),
        "io_ms_median": med(ms),
        "io_hidden_ms_median": med(io["hidden_ms_per_token"]),
        "compute_ms_median": med([(t - s.seconds) * 1e3 for t, s in zip(gen.step_seconds, gen.steps)]),
        "bytes_read_median": med(io["bytes_read_per_token"]),
        "bytes_needed_median": med(io["bytes_needed_per_token"]),
        "reads_median": med(io["reads_per_token"]),
        "effective_bw_MBps_median": med(io["effective_bw_MBps"]),
        "active_fraction_mean": float(np.mean(io["active_fraction_per_token"])) if gen.steps else 0.0,
        "missed_per_token_mean": None if not gen.misses_measured else
        float(np.mean(io["missed_per_token"])) if gen.steps else 0.0,
        "extra_bytes_per_token_mean": None if not gen.misses_measured else
        float(np.mean(io["extra_bytes_per_token"])) if gen.steps else 0.0,
    }
    return {"io": io, "summary": summary, "token_ms": [s * 1e3 for s in gen.step_seconds],
            "resident": gen.resident}
