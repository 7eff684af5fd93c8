"""`ripple bench io`: every I/O strategy replayed on real O_DIRECT reads of this disk, side by
side, against the physical limit.

One run: measure this disk's latency table (the planner's device profile) and sequential
bandwidth, load a workload's activation masks (calibration masks fit placements and caches,
held-out masks are replayed), write one flash file per placement (reused across runs),
plan every strategy's reads for the same held-out tokens, then read them token by token,
strategies interleaved so that all see the same background load, with one reader
(same engine, same queue depth). The storage model replays the same plans on the measured
profile (its error is reported) and, with --device, re-plans and predicts for a phone.

Lower bound per token: bytes of active bundles not in the cache / sequential bandwidth
measured in this run. This module imports nothing heavy at top (the CLI builds its parser).

I/O waited (runtime_py.lookahead_timeline): every strategy's reads are also priced on a
timeline of the token's layers in series with one device queue, with each layer's compute
(given, or timed here on the model's reference forward): what the FFNs wait for. Without
lookahead that is the serial read time above; the `lookahead` strategy issues each layer's
predicted reads layers early (issue 25), and only this figure shows what that hides.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..atomic_file import atomic_write, save_figure, write_result

DEFAULT_STRATEGIES = ("dense", "llmflash", "ripple", "ours")
SEQ_FILE_BYTES = 64 << 20     # test file for fio's sequential figure when no probe left one


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says what to change."""


@dataclass
class Workload:
    """Activation masks and the bundles they index. masks_*: (L, T, n) bool."""
    name: str
    model: str
    sparsity: float | None
    calib: "object"
    heldout: "object"
    spec: "object"                       # layout.bundle.BundleSpec
    bundles: "object"                    # callable(layer) -> (n, bundle_bytes) uint8, neuron order
    source: str
    source_hash: str
    arch: str
    meta: dict = field(default_factory=dict)


def register(bench_sub) -> None:
    p = bench_sub.add_parser("io", help="I/O strategies side by side on real O_DIRECT reads (JSON + PNG)")
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (the embedded model) or a GGUF file / Hugging Face folder")
    p.add_argument("--workload", choices=list(WORKLOADS), default="real",
                   help="real: the model's profiled activations; relu-synthetic: the ReLU-regime generator; "
                        "relu-tiny: the small ReLU model `make relu-model` trains here")
    p.add_argument("--sparsity", type=float, help="profile at this sparsity (default: the model's default)")
    p.add_argument("--profile", help="activation profile (.npz) to use instead of profiling")
    p.add_argument("--tokens", type=int, default=64, help="held-out tokens measured (default 64)")
    p.add_argument("--warmup", type=int, default=16, help="held-out tokens that only warm caches (default 16)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time the same reads this many times, strategies in turn (default 1); the JSON "
                        "gives each round's figures and ratios beside the mean: this host drifts")
    p.add_argument("--queue-depth", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.10, help="DRAM budget as a fraction of FFN bytes (default 0.10)")
    p.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
    p.add_argument("--device", action="append", default=[],
                   help="device profile (name in devices/ or JSON) to add modelled figures for; repeatable")
    p.add_argument("--host-profile", help="this disk's measured profile (skips the probe; else probed now)")
    p.add_argument("--cache-dir", default="build/cache/io", help="flash files, placements, profiles kept here")
    p.add_argument("--engine", choices=["auto", "aio", "threads"], default="auto")
    p.add_argument("--sets", choices=["oracle", "predicted"], default="oracle",
                   help="held-out sets replayed: the profile's true masks (oracle), or a predictor's "
                        "(needs --predictor and a profile recorded with --record-inputs)")
    p.add_argument("--predictor", help="predictor file for --sets predicted (`ripple train-predictor`)")
    p.add_argument("--lookahead", help="lookahead predictors (lookahead.npz, `ripple train-predictor "
                   "--lookahead J`) for --strategies lookahead")
    p.add_argument("--lookahead-distance", type=int,
                   help="layers ahead the lookahead strategy reads (default: of the file's distances, the "
                        "one with the least modelled wait on each profile)")
    p.add_argument("--layer-compute-ms", type=float, nargs="+", metavar="MS",
                   help="per-layer compute for the I/O-waited timeline: PRE FFN (before the FFN, the FFN), "
                        "or one total split evenly (default: timed here on the model's reference forward)")
    p.add_argument("--json", required=True, help="results JSON (a PNG is written beside it)")
    p.set_defaults(run=run_local)
    return p


def run_local(args) -> None:
    """`ripple bench io` on this machine (android_host.remote_replay adds the device's flags
    and runs the reads there when they are given)."""
    r = bench_io_cmd(model=args.model, workload=args.workload, sparsity=args.sparsity, profile=args.profile,
                     tokens=args.tokens, warmup=args.warmup, queue_depth=args.queue_depth, budget=args.budget,
                     strategies=args.strategies, devices=args.device, host_profile=args.host_profile,
                     cache_dir=args.cache_dir, engine=args.engine, json_out=args.json,
                     sets=args.sets, predictor=args.predictor, rounds=args.rounds,
                     lookahead=args.lookahead, lookahead_distance=args.lookahead_distance,
                     layer_compute_ms=args.layer_compute_ms)
    print_table(r)


# ---------------------------------------------------------------- workloads

def cache_key(*parts) -> str:
    """A short hash of the parts that name a cached file (profiles, placements, layouts)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p if isinstance(p, (bytes, bytearray, memoryview)) else str(p).encode())
    return h.hexdigest()


def real_workload(model: str, sparsity: float | None, profile: str | None, cache_dir: Path) -> Workload:
    """A model's profiled masks (self-sampled calibration and held-out text) and its bundles."""
    import numpy as np

    from ..layout.bundle import BundleSpec, encode_bundles
    from ..tuning.checkpoint import default_model_path, load_model
    from ..tuning.profile import ProfileError, load_profile
    from .interface import profile_cmd

    path = str(default_model_path()) if model in (None, "smollm2") else model
    desc = load_model(path)
    if profile is None:
        tag = "default" if sparsity is None else f"s{sparsity:g}"
        profile = str(cache_dir / f"profile-{desc.source_hash[:16]}-{tag}.npz")
        if not Path(profile).is_file():
            print(f"bench io: profiling {desc.name or path} ({tag}) into {profile}", file=sys.stderr)
            profile_cmd(path, profile, sparsity=sparsity)
    p = load_profile(profile)
    if p.source_hash != desc.source_hash:
        raise ProfileError(f"{profile}: profiled on another checkpoint than {path}; drop --profile "
                           "or profile this model")
    if sparsity is not None and abs(p.sparsity - sparsity) > 1e-9:
        raise BenchError(f"{profile} is at sparsity {p.sparsity}, not {sparsity}; drop --profile")
    spec = BundleSpec(desc.activation, desc.d_model, "fp16", desc.layers[0].b_up is not None)

    def bundles(l: int) -> np.ndarray:
        lw = desc.layers[l]
        return encode_bundles(spec, lw.w_up, lw.w_down.T, lw.w_gate, lw.b_up)

    return Workload("real", desc.name or Path(path).name, p.sparsity, p.masks("calib"), p.masks("heldout"),
                    spec, bundles, path, desc.source_hash, desc.arch,
                    {"profile": profile, "text": p.meta.get("text"), "criterion": p.criterion})


def predicted_sets(wl: Workload, predictor: str | None) -> None:
    """Replay a predictor's sets instead of the true ones: what the engine reads with
    `--sets predicted` (tuning.predictor, applied to the profile's recorded FFN inputs)."""
    from ..tuning.predictor import check_predictor, load_predictor, predicted_masks
    from ..tuning.profile import load_profile
    if "profile" not in wl.meta or not predictor:
        raise BenchError("--sets predicted needs a profiled workload (real, relu-tiny) and --predictor FILE")
    pred = load_predictor(predictor)
    L, _, n = wl.heldout.shape
    check_predictor(pred, wl.source_hash, L, pred.d_model, n, predictor)
    if wl.sparsity is not None and abs(pred.sparsity - wl.sparsity) > 1e-9:
        raise BenchError(f"{predictor} was trained for sparsity {pred.sparsity:g}, the profile is at {wl.sparsity:g}")
    wl.heldout = predicted_masks(pred, load_profile(wl.meta["profile"]).inputs("heldout"))
    wl.meta.update(sets="predicted", predictor=str(predictor))


def lookahead_sets(wl: Workload, path: str, tokens: int) -> dict:
    """{distance: (L, tokens, n) bool}: each target layer's set predicted from the recorded FFN
    input of the layer `distance` before it (tuning.lookahead); rows of layers with none before
    them stay empty (they are read on demand)."""
    import numpy as np

    from ..tuning.lookahead import load_lookahead, predicted
    from ..tuning.profile import load_profile
    la = load_lookahead(path)
    L, _, n = wl.heldout.shape
    if la.source_hash != wl.source_hash or la.a.shape[1] != L or la.b.shape[-1] != n:
        raise BenchError(f"{path}: lookahead predictors of another checkpoint or shape than {wl.source}; "
                         "train them on this model's profile (`ripple train-predictor --lookahead`)")
    if wl.sparsity is not None and abs(la.sparsity - wl.sparsity) > 1e-9:
        raise BenchError(f"{path} was trained for sparsity {la.sparsity:g}, the profile is at {wl.sparsity:g}")
    x = load_profile(wl.meta["profile"]).inputs("heldout")
    out = {}
    for k, j in enumerate(la.distances):
        m = np.zeros((L, tokens, n), bool)
        for t in range(j, L):
            m[t] = predicted(la, k, t, x[t - j][:tokens])
        out[int(j)] = m
    wl.meta["lookahead"] = str(path)
    return out


def layer_compute(wl: Workload, given_ms, steps: int = 8) -> tuple:
    """(pre_s (L,), ffn_s (L,), source): each layer's compute before its FFN and its FFN's,
    given (--layer-compute-ms) or timed on this host: the model's torch reference forward
    (fp32, dense FFN), one token decoded after a short prompt with its KV cache, median of
    `steps` tokens, split at the FFN's entry and exit; with torch's threads and with one, the
    faster kept (on this 2-core host, busy, two threads made a 64-wide attention 7.8 ms
    against 0.02 ms alone), since less compute hides less: the lookahead's figure errs
    high. A phone's kernels differ; the source says which was used."""
    import numpy as np
    L = wl.heldout.shape[0]
    if given_ms:
        if len(given_ms) > 2 or min(given_ms) < 0:
            raise BenchError(f"--layer-compute-ms {given_ms}: PRE FFN or one total, in ms, non-negative")
        pre, ffn = (given_ms[0] / 2, given_ms[0] / 2) if len(given_ms) == 1 else given_ms
        return np.full(L, pre * 1e-3), np.full(L, ffn * 1e-3), \
            f"given: {pre:g} ms before the FFN + {ffn:g} ms FFN per layer" + (" (one total, split evenly)"
                                                                            if len(given_ms) == 1 else "")
    if "profile" not in wl.meta:
        raise BenchError(f"--workload {wl.name} has no model to time: give --layer-compute-ms PRE FFN")
    import torch

    from ..tuning.checkpoint import load_model
    from ..tuning.forward import to_torch
    tm = to_torch(load_model(wl.source))
    threads = torch.get_num_threads()
    best = None
    try:
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            pre, ffn = _timed_decode(tm, steps)
            if best is None or pre.sum() + ffn.sum() < best[0].sum() + best[1].sum():
                best = (pre, ffn, n)
    finally:
        torch.set_num_threads(threads)
    pre, ffn, n = best
    return pre, ffn, (f"measured: this host's torch reference forward (fp32, dense FFN, {n} thread(s), the faster "
                      f"of {sorted({threads, 1})}), one decoded token, median of {steps}: {pre.mean() * 1e3:.3f} ms "
                      f"before the FFN + {ffn.mean() * 1e3:.3f} ms FFN per layer")


def _timed_decode(tm, steps: int) -> tuple:
    """(pre_s, ffn_s) per layer: median over `steps` decoded tokens (tuning.forward with its
    KV cache), split at each FFN's entry and exit."""
    import numpy as np
    import torch

    from ..tuning.forward import dense_ffn, forward, new_cache
    L = tm.desc.n_layers
    ffn, marks = dense_ffn(tm), []

    def timed(layer, h):
        t0 = time.perf_counter()
        y = ffn(layer, h)
        marks.append((t0, time.perf_counter()))
        return y
    context = max(1, min(32, tm.desc.max_positions - steps - 2))
    tok = torch.from_numpy(np.random.default_rng(0).integers(0, tm.desc.vocab_size, (1, context + steps + 1)))
    cache = new_cache(tm, 1, context + steps + 1)
    forward(tm, tok[:, :context], cache)
    pre, ffn_t = np.zeros((steps + 1, L)), np.zeros((steps + 1, L))
    for i in range(steps + 1):        # the first step warms what the prompt did not
        marks.clear()
        prev = time.perf_counter()
        forward(tm, tok[:, context + i:context + i + 1], cache, ffn=timed, last_only=True)
        for layer, (a, b) in enumerate(marks):
            pre[i, layer], ffn_t[i, layer], prev = a - prev, b - a, b
    return np.median(pre[1:], 0), np.median(ffn_t[1:], 0)


def lookahead_trace(s, wl: Workload, held, ahead: dict, layout, budget_bytes: int, storage, queue_depth: int,
                    warmup: int, compute: tuple):
    """Strategy s's lookahead reads of the held-out tokens planned for `storage`, at its distance
    J or (distance None) at each of `ahead`'s, keeping the least modelled wait on `storage`;
    the trace's meta keeps every distance's wait (ms per token). Layer t reads the set
    predicted min(J, t) layers before it, as `ripple compile --lookahead J` issues them."""
    import numpy as np

    from ..runtime_py.lookahead_timeline import plan_lookahead_trace, trace_timelines
    from ..runtime_py.strategies import build_cache
    if ahead is None:
        raise BenchError(f"strategy {s.name} needs lookahead sets: give --lookahead FILE (it runs here only)")
    dists = sorted(ahead) if s.distance is None else [s.distance]
    best, per = None, {}
    for j in dists:
        if not set(range(1, j + 1)) <= set(ahead):
            raise BenchError(f"--lookahead-distance {j}: the lookahead file has distances {sorted(ahead)}, "
                             f"it needs 1..{j}")
        sets = np.stack([ahead[max(1, min(j, t))][t, :held.shape[1]] for t in range(held.shape[0])])
        cache = build_cache(s, budget_bytes, wl.spec.bundle_bytes, layout.perm, wl.calib)
        tr = plan_lookahead_trace(s, held, sets, j, layout.perm, cache, layout.region_offsets,
                                  wl.spec.bundle_bytes, storage, queue_depth, warmup, layout.alignment)
        per[j] = float(np.mean([x.waited_s for x in trace_timelines(tr, *compute[:2], storage, queue_depth)]) * 1e3)
        if best is None or per[j] < per[best.distance]:
            best = tr
    best.meta["waited_ms_per_distance"] = {str(j): round(v, 3) for j, v in per.items()}
    best.meta["distance_chosen_by"] = "given" if s.distance is not None else \
        "least modelled wait on the profile planned for, held-out tokens"
    return best


def timeline_figures(tr, storage, queue_depth: int, compute: tuple | None, bb: int) -> dict:
    """A trace's I/O waited per token and what it read, by runtime_py.lookahead_timeline on
    `storage`; compute None: no compute (the waits of strategies without lookahead do not
    depend on it; token time is then left out)."""
    import numpy as np

    from ..runtime_py.lookahead_timeline import trace_timelines
    L = tr.active.shape[1]
    pre, ffn = (np.zeros(L), np.zeros(L)) if compute is None else compute[:2]
    tls = trace_timelines(tr, pre, ffn, storage, queue_depth)
    need = (tr.active - tr.hits).sum(1) * bb
    out = {"modelled_waited_ms": round(float(np.mean([x.waited_s for x in tls]) * 1e3), 3),
           "unused_bytes_per_token": int(np.mean(tr.bytes_read() - need)),
           "misses_per_token": round(float(tr.on_demand().sum(1).mean()), 1),
           "max_queue_depth": int(max(x.max_queue_depth for x in tls)),
           "mean_queue_depth": round(float(np.mean([x.mean_queue_depth for x in tls])), 2)}
    if compute is not None:
        out["modelled_token_ms"] = round(float(np.mean([x.token_s for x in tls]) * 1e3), 3)
    if tr.ahead is not None:
        out["lookahead"] = {"distance": tr.distance, "chosen_by": tr.meta.get("distance_chosen_by"),
                            "modelled_waited_ms_per_distance": tr.meta.get("waited_ms_per_distance")}
    return out


def waited_ratio(res: dict, key: str) -> float | None:
    """lookahead's I/O waited over ripple's (issue 25 asks for <= 0.5 at the same DRAM budget)."""
    if "lookahead" not in res or "ripple" not in res or not res["ripple"].get(key):
        return None
    return round(res["lookahead"][key] / res["ripple"][key], 3)


def synthetic_workload(calib_tokens: int = 1024, heldout_tokens: int = 256, seed: int = 0) -> Workload:
    """tuning.synthetic's ReLU-regime masks; bundles of OPT-6.7B's size (d_model 4096, fp16,
    up bias), random bytes: what is read matters, not what it computes."""
    import numpy as np

    from ..layout.bundle import BundleSpec
    from ..tuning.synthetic import SyntheticSpec, relu_layer

    spec_s = SyntheticSpec()
    layers = [relu_layer(spec_s, l, calib_tokens, heldout_tokens, seed) for l in range(spec_s.n_layers)]
    spec = BundleSpec("relu", 4096, "fp16", True)

    def bundles(l: int) -> np.ndarray:
        return np.random.default_rng([seed, l]).integers(0, 256, (spec_s.n, spec.bundle_bytes), dtype=np.uint8)

    desc = spec_s.describe()
    return Workload("relu-synthetic", "synthetic ReLU (OPT-6.7B-sized bundles)", spec_s.density,
                    np.stack([c for c, _ in layers]), np.stack([h for _, h in layers]), spec, bundles,
                    "synthetic", cache_key(json.dumps(desc, sort_keys=True), seed), "opt",
                    {"generator": desc, "label": "synthetic (tuning.synthetic)"})


def relu_tiny_workload(model, sparsity: float | None, profile: str | None, cache_dir: Path) -> Workload:
    """relu-tiny (`make relu-model`): a small ReLU model trained here, profiled on its own
    calibration files and replayed on its held-out files (tuning.relu_tiny)."""
    from ..tuning import relu_tiny

    wl = real_workload(str(relu_tiny.require_folder()), sparsity, profile, cache_dir)
    wl.name, wl.model = "relu-tiny", relu_tiny.SHORT_LABEL
    wl.meta["label"] = relu_tiny.LABEL
    return wl


# name -> loader(model, sparsity, profile, cache_dir); a workload is one line here.
WORKLOADS = {
    "real": real_workload,
    "relu-synthetic": lambda model, sparsity, profile, cache_dir: synthetic_workload(),
    "relu-tiny": relu_tiny_workload,
}


# ---------------------------------------------------------------- placements and flash files

def _placement_source_key() -> str:
    from ..tuning import coactivation, greedy_path, local_search, placement
    return cache_key(*(Path(m.__file__).read_bytes() for m in (placement, coactivation, greedy_path, local_search)))


def placements(wl: Workload, names: set[str], cache_dir: Path) -> dict:
    """perm (L, n) per placement strategy, fit on calibration masks; cached on disk."""
    import numpy as np

    from ..tuning.placement import place

    out = {}
    L, _, n = wl.calib.shape
    key = cache_key(np.packbits(wl.calib).tobytes(), _placement_source_key())
    for name in sorted(names):
        if name == "identity":
            out[name] = np.tile(np.arange(n, dtype=np.int64), (L, 1))
            continue
        f = cache_dir / f"placement-{name}-{key}.npy"
        if f.is_file():
            out[name] = np.load(f)
            continue
        perm = place(list(wl.calib), name).perm
        with atomic_write(f) as fh:
            np.save(fh, perm)
        out[name] = perm
    return out


def flash_file(wl: Workload, perm, cache_dir: Path, kind: str):
    """The workload's bundles laid out in `perm`, written once and reused (layout.pack);
    kind (e.g. "ripple", "ours+pinned") is recorded so that stale variants can go (prune_layouts)."""
    import numpy as np

    from ..layout.pack import write_layout
    from ..layout.reader import open_layout

    d = cache_dir / f"layout-{cache_key(wl.source_hash, wl.spec, np.ascontiguousarray(perm).tobytes())}"
    if (d / "manifest.json").is_file():
        try:
            return open_layout(d)
        except Exception as e:   # a stale or damaged cache entry is rewritten
            print(f"bench io: rewriting {d} ({e})", file=sys.stderr)
    layers = ((wl.bundles(l), perm[l]) for l in range(len(perm)))
    write_layout(d, wl.spec, layers, {"bench": "io", "workload": wl.name, "layout": kind}, wl.source,
                 wl.source_hash, arch=wl.arch)
    return open_layout(d)


# ---------------------------------------------------------------- the run

def host_storage(path: Path, host_profile: str | None, engine: str):
    """This disk's profile: given, or probed now on the folder the flash files live in."""
    from .devices import load_device
    from .probe import probe_storage

    if host_profile:
        d = load_device(host_profile)
        return d.storage, {"profile": host_profile, "source": d.source}
    r = probe_storage(path, quick=False, engine=engine, with_fio=False)
    return r.storage, {"probed": str(r.file), "seconds": round(r.seconds, 1), "engine": r.engine}


def layout_kind(s) -> str:
    """What a strategy's flash file is laid out by: its placement, and whether the pinned
    bundles were moved to the region ends (which follows the probe, so it drifts with the disk)."""
    return s.placement + ("+pinned" if s.pinned_last else "")


def cached_manifest(layout_dir: Path) -> dict | None:
    """The manifest of a cached flash file, None if it has none readable (never raises: pruning
    a cache must not fail on what it cannot read)."""
    try:
        m = json.loads((Path(layout_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("meta", {}), dict) \
        and isinstance(m.get("source", {}), dict) else None


def prune_layouts(cache_dir: Path, kept: dict, wl: Workload) -> None:
    """Remove cached flash files of this workload and checkpoint that a kind of layout this run
    wrote anew replaces (kept: kind -> the folder used now): `ours` lays its pinned bundles out
    by the probe's figures, so runs on a drifting disk would each leave a whole FFN behind (1 GB
    for relu-synthetic)."""
    import shutil
    kept = {k: Path(v).resolve() for k, v in kept.items()}
    gone = 0
    for d in Path(cache_dir).glob("layout-*"):
        m = cached_manifest(d)
        if m is None:
            continue
        meta, source = m.get("meta", {}), m.get("source", {}).get("hash")
        kind = meta.get("layout")
        if kind in kept and d.resolve() != kept[kind] and meta.get("bench") == "io" \
                and meta.get("workload") == wl.name and source == wl.source_hash:
            gone += sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            shutil.rmtree(d)
    if gone:
        print(f"bench io: removed {gone / 1e9:.2f} GB of stale {wl.name} flash files", file=sys.stderr)


def read_whole(reader, request: int = 4 << 20) -> float:
    """Read the reader's whole file once in large requests; MB/s of the pass."""
    import numpy as np
    size = os.path.getsize(reader.path) // 4096 * 4096
    offs = np.arange(0, size, request, dtype=np.int64)
    ext = np.stack((offs, np.minimum(request, size - offs)), axis=1)
    t0 = time.perf_counter()
    for i in range(0, len(ext), 16):             # 64 MiB batches: a bounded buffer
        reader.read(ext[i:i + 16])
    return round(size / max(time.perf_counter() - t0, 1e-9) / 1e6, 1)


def fio_seq_MBps(path: Path) -> tuple[float | None, str | None]:
    """fio's sequential MB/s on this disk and the buffer memory it ran with (probe.fio_iomem)."""
    import shutil

    from .probe import PROBE_FILE, SEQ_QD, SEQ_REQUEST, _fio, probe_file
    if shutil.which("fio") is None:
        return None, None
    f = path / PROBE_FILE if (path / PROBE_FILE).is_file() else probe_file(path, SEQ_FILE_BYTES)
    mbps, iomem = _fio(f, SEQ_REQUEST, SEQ_QD, 2.0, sequential=True)
    return round(mbps, 1), iomem


def bench_io_cmd(model: str = "smollm2", workload: str = "real", sparsity: float | None = None,
                 profile: str | None = None, tokens: int = 64, warmup: int = 16, queue_depth: int = 32,
                 budget: float = 0.10, strategies=DEFAULT_STRATEGIES, devices=(), host_profile: str | None = None,
                 cache_dir: str = "build/cache/io", engine: str = "auto", json_out: str | None = None,
                 sets: str = "oracle", predictor: str | None = None, quick_table: bool = False,
                 rounds: int = 1, lookahead: str | None = None, lookahead_distance: int | None = None,
                 layer_compute_ms=None) -> dict:
    """quick_table: check the model with the probe's quick table (3 sizes x 2 depths, 64 MiB
    file) instead of the full one; for tests. lookahead: the lookahead.npz the `lookahead`
    strategy predicts with; layer_compute_ms: [pre, ffn] or [total] per layer (None: timed here)."""
    import numpy as np
    from tqdm import tqdm

    from ..runtime_py import storage_model as sm
    from ..runtime_py.reader import FlashReader
    from ..runtime_py.strategies import get_strategy
    from .devices import load_device
    from .probe import QUICK, InterleavedTable

    if workload not in WORKLOADS:
        raise BenchError(f"--workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    if tokens < 1 or warmup < 0 or queue_depth < 1 or rounds < 1:
        raise BenchError("--tokens, --queue-depth and --rounds must be at least 1, --warmup at least 0")
    if not 0.0 <= budget < 1.0:
        raise BenchError(f"--budget {budget}: a fraction of FFN bytes in [0, 1)")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise BenchError(f"--sparsity {sparsity}: must be in [0, 1)")
    strats = [get_strategy(s) for s in strategies]
    if any(s.distance != 0 for s in strats):
        if sets != "predicted" or not predictor or not lookahead:
            raise BenchError("--strategies lookahead needs --sets predicted --predictor FILE --lookahead FILE: a "
                             "layer's own set is the same-layer predictor's, and every strategy then reads those sets")
        if lookahead_distance is not None:
            if lookahead_distance < 1:
                raise BenchError(f"--lookahead-distance {lookahead_distance}: layers ahead, at least 1")
            strats = [replace(s, distance=lookahead_distance) if s.distance != 0 else s for s in strats]
    phones = [load_device(d) for d in devices]          # bad names fail before minutes of work
    if json_out and not Path(json_out).resolve().parent.is_dir():
        raise BenchError(f"--json {json_out}: folder {Path(json_out).parent} does not exist")
    cdir = Path(cache_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    wl = WORKLOADS[workload](model, sparsity, profile, cdir)
    true_sets = wl.heldout
    if sets == "predicted":
        predicted_sets(wl, predictor)
    wl.meta.setdefault("sets", "oracle")
    L, T, n = wl.heldout.shape
    if T < warmup + tokens:
        raise BenchError(f"{T} held-out tokens, but --warmup {warmup} + --tokens {tokens} asked; "
                         "ask for fewer or profile more held-out tokens")
    held = wl.heldout[:, :warmup + tokens]
    bb = wl.spec.bundle_bytes
    budget_bytes = int(budget * L * n * bb)
    ahead = lookahead_sets(wl, lookahead, warmup + tokens) if any(s.distance != 0 for s in strats) else None
    # Compute only moves the waits of reads issued ahead: timed when a strategy has them or asked.
    compute = layer_compute(wl, layer_compute_ms) if ahead is not None or layer_compute_ms else None

    storage, storage_meta = host_storage(cdir, host_profile, engine)

    strats, perms, layouts, traces, tuned = plan_strategies(wl, strats, held, warmup, queue_depth,
                                                            budget_bytes, storage, cdir, ahead, compute)
    prune_layouts(cdir, {layout_kind(s): Path(layouts[s.name].path).parent for s in strats}, wl)

    # The storage model is checked against the reads with a table measured between them, a
    # few cells after every token, so that both see the same load (this machine's moves).
    table = InterleavedTable(cdir, engine, **(dict(sizes=QUICK["sizes"], qds=QUICK["qds"],
                                                 file_bytes=QUICK["file_bytes"]) if quick_table else {}))
    fio_seq, fio_iomem = fio_seq_MBps(cdir)
    per_token = -(-2 * len(table.cells) // (tokens * rounds))
    # Real reads, token by token; the order of strategies rotates from token to token. With
    # compute known, each token is also decoded on the timeline (reads in a background thread,
    # compute spun), every strategy with the same compute: what the FFNs wait, measured.
    readers, io = {}, None
    waited = {s.name: np.zeros((rounds, tokens)) for s in strats} if compute is not None else None
    try:
        if waited is not None:
            from concurrent.futures import ThreadPoolExecutor

            from ..runtime_py.lookahead_timeline import layer_reads, measured_token
            io = ThreadPoolExecutor(max_workers=1)
            io.submit(lambda: None).result()          # its thread started before any token is timed
        for s in strats:
            p = str(layouts[s.name].path)
            if p not in readers:
                readers[p] = FlashReader(p, queue_depth, engine=engine)
                if not readers[p].o_direct:
                    raise BenchError(f"{p}: O_DIRECT refused ({readers[p].fallback_reason}); put "
                                     "--cache-dir on a real disk")
        warm = {p: read_whole(r) for p, r in readers.items()}
        ms = {s.name: np.zeros((rounds, tokens)) for s in strats}
        for i in tqdm(range(rounds * tokens), desc="bench io: reads", unit="token", file=sys.stderr):
            rd, t = divmod(i, tokens)
            for k in range(len(strats)):
                s = strats[(t + k + rd) % len(strats)]
                r = readers[str(layouts[s.name].path)]
                ms[s.name][rd, t] = sum(r.read(e).seconds for e in traces[s.name].extents(t)) * 1e3
            for k in range(len(strats) if waited is not None else 0):
                s = strats[(t + k + rd) % len(strats)]
                tr = traces[s.name]
                waited[s.name][rd, t] = measured_token(io, readers[str(layouts[s.name].path)], layer_reads(tr, t),
                                                       tr.distance, *compute[:2]).waited_s * 1e3
            table.step(per_token)
        check = table.profile()
        reader_engine = next(iter(readers.values())).engine
    finally:
        if io is not None:
            io.shutdown()
        table.close()
        for r in readers.values():
            r.close()

    seq_bps = check.seq_MBps * 1e6
    res = {}
    for s in strats:
        tr = traces[s.name]
        needed = tr.active.sum(1) * bb
        missed = (tr.active - tr.hits).sum(1) * bb
        modelled = sm.replay(check, [tr.extents(t) for t in range(tokens)], queue_depth) * 1e3
        m = ms[s.name].mean(0)          # per token, over the rounds
        res[s.name] = {
            "per_token_io_ms": round(float(m.mean()), 3),
            "per_token_io_ms_median": round(float(np.median(ms[s.name])), 3),
            "per_round_io_ms": [round(float(x), 3) for x in ms[s.name].mean(1)],
            "effective_bw_MBps": round(float(needed.sum() / (m.sum() / 1e3) / 1e6), 1),
            "reads_per_token": round(float(tr.reads().mean()), 1),
            "bytes_read_per_token": int(tr.bytes_read().mean()),
            "bytes_needed_per_token": int(needed.mean()),
            "bytes_missed_per_token": int(missed.mean()),
            "cache_hit_rate": round(float(tr.hits.sum() / max(tr.active.sum(), 1)), 4),
            "lower_bound_ms": round(float(missed.mean() / seq_bps * 1e3), 3),
            "modelled_per_token_io_ms": round(float(modelled.mean()), 3),
            "model_error": round(float(modelled.mean() / m.mean() - 1), 4),
            "policy": s.describe(),
            "tuning": tuned[s.name],
            "cache_entries": tr.meta["cache_entries"],
            "per_token_ms": [round(float(x), 3) for x in m],
            **timeline_figures(tr, check, queue_depth, compute, bb),
        }
        if waited is not None:
            res[s.name]["waited_ms"] = round(float(waited[s.name].mean()), 3)
            res[s.name]["per_round_waited_ms"] = [round(float(x), 3) for x in waited[s.name].mean(1)]
    out = {
        "device": "this machine (measured)", "model": wl.model, "workload": wl.name,
        "sparsity": wl.sparsity, "tokens": tokens, "warmup": warmup, "queue_depth": queue_depth,
        "dram_budget_bytes": budget_bytes, "dram_budget_fraction": budget,
        "ffn_bytes": int(L * n * bb), "bundle_bytes": bb, "layers": L, "neurons": n,
        "lower_bound_ms": min(v["lower_bound_ms"] for v in res.values()),
        "seq_MBps": round(seq_bps / 1e6, 1), "fio_seq_MBps": fio_seq, "fio_iomem": fio_iomem,
        "reader": {"engine": reader_engine, "o_direct": True, "queue_depth": queue_depth},
        # Each flash file read whole once before the timed reads, MB/s of that pass: on a
        # virtual disk the host may cache what the guest read lately, below O_DIRECT (a 1 GB
        # file untouched for an hour read at 112 MiB/s, 730 after one pass), and strategies
        # with files in different states would not be compared on the same disk.
        "files_read_whole_first_MBps": {Path(p).parent.name: v for p, v in warm.items()},
        "host_storage": {**storage_meta, "gap_threshold_bytes_qd": sm.gap_threshold_bytes(storage, queue_depth),
                         "split_bytes": sm.split_bytes(storage, queue_depth), "table": storage.to_json(),
                         "model_check_table": check.to_json(), "model_check_rounds": round(table.rounds, 2)},
        "strategies": res,
        "workload_meta": wl.meta,
    }
    out["rounds"] = rounds
    out["compute_source"] = compute[2] if compute is not None else \
        "none: no strategy reads ahead, and the waits of those that do not are their serial read times"
    if compute is not None:
        out["layer_compute_ms"] = {"pre": [round(float(x) * 1e3, 4) for x in compute[0]],
                                   "ffn": [round(float(x) * 1e3, 4) for x in compute[1]]}
    out["ratios"] = ratios(res, out["lower_bound_ms"])
    if waited_ratio(res, "modelled_waited_ms") is not None:
        out["ratios"]["lookahead_over_ripple_waited"] = waited_ratio(res, "modelled_waited_ms")
    if waited_ratio(res, "waited_ms") is not None:
        out["ratios"]["lookahead_over_ripple_waited_measured"] = waited_ratio(res, "waited_ms")
    if rounds > 1:
        out["ratios"]["per_round"] = [
            ratios({k: {"per_token_io_ms": v["per_round_io_ms"][i]} for k, v in res.items()}, out["lower_bound_ms"])
            for i in range(rounds)]
    if sets == "predicted":
        extra_bytes_read(res, strats, layouts, wl, true_sets[:, :warmup + tokens], budget_bytes, storage,
                         queue_depth, warmup)
    if phones:
        out["modelled"] = {}
        for dev in phones:
            out["modelled"][dev.name] = modelled_on(dev, strats, perms, wl, held, bb, budget_bytes, queue_depth,
                                                    warmup, layouts, ahead, compute)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    out["load_average"] = os.getloadavg()[0]
    if json_out:
        write_result(json_out, out, plot)
    return out


def ratios(res: dict, lower_bound_ms: float) -> dict:
    r = {}
    if "ours" not in res:
        return r
    ours = res["ours"]["per_token_io_ms"]
    base = {k: v["per_token_io_ms"] for k, v in res.items() if k in ("dense", "llmflash", "ripple")}
    if base:
        best = min(base, key=base.get)
        r["best_baseline"] = best
        r["best_baseline_over_ours"] = round(base[best] / ours, 3)
    if "llmflash" in base:
        r["llmflash_over_ours"] = round(base["llmflash"] / ours, 3)
    r["ours_over_lower_bound"] = round(ours / lower_bound_ms, 3) if lower_bound_ms else None
    return r


def plan_strategies(wl: Workload, strats: list, held: np.ndarray, warmup: int, queue_depth: int,
                    budget_bytes: int, storage, cache_dir: Path, ahead: dict | None = None,
                    compute: tuple | None = None) -> tuple[list, dict, dict, dict, dict]:
    """Per strategy: tune it, build its cache, lay out its flash file and plan its reads of the
    held-out tokens for `storage`. Shared by the local bench and the replay on a device.
    ahead, compute: lookahead_sets and layer_compute, for strategies that read ahead.
    Returns (strategies as tuned, placements, layouts, traces, tuning notes)."""
    from ..runtime_py.strategies import build_cache, layout_perm, plan_trace, tune
    bb = wl.spec.bundle_bytes
    perms = placements(wl, {s.placement for s in strats}, cache_dir)
    strats, layouts, traces, tuned = list(strats), {}, {}, {}
    for i, s in enumerate(strats):
        s, tuned[s.name] = tune(s, wl.calib, perms[s.placement], bb, budget_bytes, storage, queue_depth)
        strats[i] = s
        cache = build_cache(s, budget_bytes, bb, perms[s.placement], wl.calib)
        perm = layout_perm(s, perms[s.placement], cache)
        if s.pinned_last or s.cache == "linking":   # their cache reads the placement as laid out
            cache = build_cache(s, budget_bytes, bb, perm, wl.calib)
        layout = flash_file(wl, perm, cache_dir, layout_kind(s))
        layouts[s.name] = layout
        print(f"bench io: planning {s.name}", file=sys.stderr)
        if s.distance != 0:
            traces[s.name] = lookahead_trace(s, wl, held, ahead, layout, budget_bytes, storage, queue_depth,
                                             warmup, compute)
            continue
        traces[s.name] = plan_trace(s, held, layout.perm, cache, layout.region_offsets, bb, storage,
                                    queue_depth, warmup, layout.alignment)
    return strats, perms, layouts, traces, tuned


def extra_bytes_read(res: dict, strats, layouts, wl: Workload, true_held: np.ndarray, budget_bytes: int,
                     storage, queue_depth: int, warmup: int) -> None:
    """What the false positives of predicted sets cost in bytes each strategy actually read:
    the same strategy planned on the true sets of the same tokens (planned only: bytes do not
    depend on the disk). A planner that reads through gaps reads many false positives anyway,
    so this is what a phone pays, where bench predictor's extra_bytes_frac counts the predicted
    set's bundles."""
    from ..runtime_py.strategies import build_cache, plan_trace
    bb = wl.spec.bundle_bytes
    for s in strats:
        layout = layouts[s.name]
        cache = build_cache(s, budget_bytes, bb, layout.perm, wl.calib)
        tr = plan_trace(s, true_held, layout.perm, cache, layout.region_offsets, bb, storage, queue_depth,
                        warmup, layout.alignment)
        true_read = float(tr.bytes_read().mean())
        r = res[s.name]
        r["bytes_read_per_token_true_sets"] = int(true_read)
        r["extra_bytes_read_frac"] = round(r["bytes_read_per_token"] / true_read - 1, 4) if true_read else None


def modelled_on(dev, strats, perms, wl, held, bb, budget_bytes, queue_depth, warmup, layouts, ahead=None,
                compute=None) -> dict:
    """Re-plan every strategy with the phone's profile (the planner is a function of it) and
    predict its per-token I/O with the storage model: its serial read time (per_token_io_ms)
    and what the FFNs wait on the timeline (waited_ms; a lookahead distance is chosen anew)."""
    from ..runtime_py import storage_model as sm
    from ..runtime_py.strategies import build_cache, plan_trace

    out = {"source": dev.source, "seq_MBps": dev.storage.seq_MBps, "strategies": {}}
    lbs = []
    for s in strats:
        layout = layouts[s.name]
        if s.distance != 0:
            tr = lookahead_trace(s, wl, held, ahead, layout, budget_bytes, dev.storage, queue_depth, warmup, compute)
        else:
            cache = build_cache(s, budget_bytes, bb, layout.perm, wl.calib)
            tr = plan_trace(s, held, layout.perm, cache, layout.region_offsets, bb, dev.storage, queue_depth,
                            warmup, layout.alignment)
        t = sm.replay(dev.storage, [tr.extents(i) for i in range(len(tr.plans))], queue_depth) * 1e3
        missed = (tr.active - tr.hits).sum(1) * bb
        lb = float(missed.mean() / dev.storage.seq_bytes_per_s * 1e3)
        lbs.append(lb)
        out["strategies"][s.name] = {"per_token_io_ms": round(float(t.mean()), 3),
                                     "reads_per_token": round(float(tr.reads().mean()), 1),
                                     "bytes_read_per_token": int(tr.bytes_read().mean()),
                                     "effective_bw_MBps": round(float(tr.active.sum(1).mean() * bb / t.mean() / 1e3), 1),
                                     "lower_bound_ms": round(lb, 3)}
        fig = timeline_figures(tr, dev.storage, queue_depth, compute, bb)
        fig["waited_ms"] = fig.pop("modelled_waited_ms")
        out["strategies"][s.name].update(fig)
    out["lower_bound_ms"] = round(min(lbs), 3)
    out["ratios"] = ratios(out["strategies"], out["lower_bound_ms"])
    if waited_ratio(out["strategies"], "waited_ms") is not None:
        out["ratios"]["lookahead_over_ripple_waited"] = waited_ratio(out["strategies"], "waited_ms")
    return out


# ---------------------------------------------------------------- report

def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("measured here", r["strategies"], r["lower_bound_ms"], True)]
    for name, m in r.get("modelled", {}).items():
        panels.append((f"modelled: {name}", m["strategies"], m["lower_bound_ms"], False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, st, lb, measured) in zip(axes[0], panels):
        names = list(st)
        # What the FFNs wait, where the run has it (the timeline: modelled on a phone, measured
        # here with emulated compute; without lookahead it is the serial read time), else the
        # reads as timed layer by layer.
        waited = all("waited_ms" in st[k] for k in names)
        vals = [st[k]["waited_ms" if waited else "per_token_io_ms"] for k in names]
        bars = ax.bar(names, vals, color=["#888", "#c66", "#69c", "#3a3"][:len(names)] + ["#999"] * 8)
        if measured:
            ax.scatter(names, [st[k]["modelled_waited_ms" if waited else "modelled_per_token_io_ms"] for k in names],
                       marker="_", s=600, color="k", label="timeline model" if waited else "storage model", zorder=3)
            if r.get("rounds", 1) > 1:      # the rounds' spread: how far this host drifted
                rounds = "per_round_waited_ms" if waited else "per_round_io_ms"
                lo = [v - min(st[k][rounds]) for k, v in zip(names, vals)]
                hi = [max(st[k][rounds]) - v for k, v in zip(names, vals)]
                ax.errorbar(names, vals, yerr=[lo, hi], fmt="none", ecolor="k", capsize=4, lw=1,
                            label=f"{r['rounds']} rounds: min-max")
        ax.axhline(lb, ls="--", color="k", lw=1, label=f"lower bound {lb:.1f} ms")
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")      # dense is 10-50x the others on sparse workloads
        ax.set_ylabel(f"FFN I/O {'waited ' if waited else ''}per token (ms, log scale)")
        ax.legend(fontsize=8)
    fig.suptitle(f"ripple bench io: {r['model']} ({r['workload']}, sparsity {r['sparsity']}), "
                 f"QD {r['queue_depth']}, DRAM {r['dram_budget_fraction']:.0%} of FFN", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def print_table(r: dict) -> None:
    print(f"{r['model']} ({r['workload']}), sparsity {r['sparsity']}, {r['tokens']} tokens, QD {r['queue_depth']}, "
          f"reader {r['reader']['engine']}, DRAM budget {r['dram_budget_bytes'] / 1e6:.1f} MB; "
          f"seq {r['seq_MBps']:.0f} MB/s (fio {r['fio_seq_MBps']}"
          f"{', on 4 KiB-page buffers: low' if r.get('fio_iomem') == 'malloc' else ''}); lower bound {r['lower_bound_ms']:.2f} ms")
    timeline = all("modelled_waited_ms" in v for v in r["strategies"].values())
    measured = all("waited_ms" in v for v in r["strategies"].values())
    print(f"{'strategy':>9} {'io ms':>8} {'model ms':>9} {'reads':>8} {'MB read':>8} {'MB need':>8} "
          f"{'hit':>6} {'eff MB/s':>9}" + (f" {'waited':>7} {'model':>7} {'MB unused':>9} {'misses':>7} "
                                            f"{'QD max/mean':>11}" if timeline else ""))
    for k, v in r["strategies"].items():
        print(f"{k:>9} {v['per_token_io_ms']:8.2f} {v['modelled_per_token_io_ms']:9.2f} {v['reads_per_token']:8.0f} "
              f"{v['bytes_read_per_token'] / 1e6:8.2f} {v['bytes_needed_per_token'] / 1e6:8.2f} "
              f"{v['cache_hit_rate']:6.3f} {v['effective_bw_MBps']:9.0f}"
              + (f" {v['waited_ms'] if measured else float('nan'):7.2f} {v['modelled_waited_ms']:7.2f} "
                 f"{v['unused_bytes_per_token'] / 1e6:9.2f} {v['misses_per_token']:7.0f}"
                 f" {v['max_queue_depth']:>5}/{v['mean_queue_depth']:<5.1f}" if timeline else ""))
    if timeline:
        print("io ms: reads timed layer by layer (a lookahead strategy's without its overlap); waited (ms): what the "
              "FFNs waited, decoded here with the compute spun (nan: not run), and its timeline model; "
              f"compute {r.get('compute_source')}")
    for k, v in r["strategies"].items():
        if "lookahead" in v:
            print(f"{k}: distance {v['lookahead']['distance']} ({v['lookahead']['chosen_by']}); modelled wait per "
                  f"distance, ms: {v['lookahead']['modelled_waited_ms_per_distance']}")
    for name, m in r.get("modelled", {}).items():
        print(f"modelled on {name} ({m['source']}): " + ", ".join(
            f"{k} {v['per_token_io_ms']:.2f} ms" + (f" (waited {v['waited_ms']:.2f}, {v['misses_per_token']:.0f} "
                                                   f"misses, {v['unused_bytes_per_token'] / 1e6:.2f} MB unused)"
                                                   if "waited_ms" in v else "")
            for k, v in m["strategies"].items())
            + f"; lower bound {m['lower_bound_ms']:.2f} ms")
    print("ratios: " + json.dumps(r["ratios"]))
    extra = {k: v["extra_bytes_read_frac"] for k, v in r["strategies"].items() if "extra_bytes_read_frac" in v}
    if extra:
        print("bytes read with the predicted sets over those with the true sets, - 1: "
              + ", ".join(f"{k} {x:+.1%}" for k, x in extra.items() if x is not None))
    if "png" in r:
        print(f"plot: {r['png']}")
