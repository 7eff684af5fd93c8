"""`ripple bench e2e`: a token of the same GGUF, with the same threads, decoded by llama.cpp
and by the compiled flash-backed engine, side by side in one run: per-token latency, its I/O
and compute, bytes read, prompt rate, model bytes resident in DRAM beside the process RSS,
and perplexity on the same held-out text.

Configurations (CONFIGS):
- llamacpp-warm:     llama.cpp with the model in the page cache (the speed ceiling);
- llamacpp-cold:     the whole GGUF evicted from the page cache before every token, as on a
                     phone whose DRAM cannot hold it (android_host.page_eviction, mincore-checked);
- llamacpp-ffn-cold: only the FFN tensors' byte ranges evicted: the fair twin of ours, which
                     keeps attention, norms and embeddings in DRAM;
- ours:              the compiled APP (android_host.app_build: the whole decode step in one TVM library,
                     the FFN read from flash by the native runtime) built from the `ours`
                     placement, --dtype bundles, the GGUF's whole copy and the predictor, with
                     --budget as whole layers pinned in DRAM and this run's measured disk as its
                     device profile; run in a Python process through AppSession;
- ours-dense:        the same engine with no DRAM budget reading every FFN byte every token
                     (every layer read whole from the copy, or every bundle without one);
- native:            the `ours` APP run by APP/ripple-run, a process with no Python in it: its
                     peak RSS is the one to put beside llama.cpp's;
- lookahead:         `ours` with every layer sparse and each one's reads issued --lookahead
                     layers early (ripple.rt.prefetch, predicted by tuning.lookahead), its own
                     set's misses read on demand; per token also what was prefetched, the
                     misses, the bytes read for no neuron used and the queue depth reached;
- ours-dram:         `ours` with every FFN byte in DRAM (read once at open): the same engine
                     with nothing to read, what lookahead is held to.
A checkpoint that is not a GGUF (a Hugging Face folder, e.g. relu-tiny) runs the APP
configurations only: llama.cpp reads GGUF files.
The APPs are built and cached by android_host.bench_app.

Each configuration runs in its own process (spawned, or ripple-run itself), so its RSS is its
own and no configuration inherits another's page cache state or threads. llama.cpp works on a
private copy of the GGUF, so that no other process mapping the embedded file keeps its pages in
the page cache. The disk's fio figures and the planner's latency table are measured in the same
run (android_host.probe). This module imports nothing heavy at top (the CLI builds its parser).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from .bench_io import cache_key, cached_manifest

CONFIGS = ("llamacpp-warm", "llamacpp-cold", "llamacpp-ffn-cold", "ours", "ours-dense", "native", "lookahead",
           "ours-dram")
APP_CONFIGS = ("ours", "ours-dense", "native", "lookahead", "ours-dram")
DEFAULT_CONFIGS = {"gguf": CONFIGS[:6], "folder": ("ours", "lookahead", "ours-dram", "native"),
                   "folder+gguf": ("llamacpp-warm", "llamacpp-cold", "ours", "ours-dram", "native")}
LOOKAHEAD = 3              # layers ahead a sparse layer's reads are issued (the lookahead config)
LLAMA_EVICTION = {"llamacpp-warm": "none", "llamacpp-cold": "file", "llamacpp-ffn-cold": "ffn"}
CONFIG_KEYS = ("per_token_ms_median", "per_token_ms_p90", "io_ms", "compute_ms", "bytes_read_per_token",
               "model_bytes_resident", "rss_bytes", "ppl", "evicted_verified")
# Beside CONFIG_KEYS in every row (None where a configuration has no such figure).
EXTRA_KEYS = ("prefill_tokens_per_s", "peak_rss_bytes", "outside_ms_median", "ppl_source", "ids",
              "unused_bytes_per_token", "prefetched_bytes_per_token", "misses_per_token", "queue_depth_mean",
              "queue_depth_max")
# The Python engine's held-out perplexity (runtime_py.engine) is measured once beside the
# compiled engine's, as the check that compiling kept the model's quality: it keeps the TVM
# kernels on the bundles as read.
BACKEND = "tvm"
# What the Python engine holds beside the non-FFN weights when it measures that perplexity:
# the predictor's matrices in int8 (3.1 MB instead of 6.2 on SmolLM2; recall on held-out
# tokens 0.994 vs 0.998).
PREDICTOR_DRAM = "int8"
KV_DTYPE = "float16"       # as llama.cpp's default KV cache
READ_AHEAD = 2             # layers (runtime_py.read_ahead, app_build read_ahead)
MIN_TOKENS = 32            # the issue's floor for per-token medians and p90
DEFAULT_PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a "
                  "bottle. Describe the sea, the weather and every day of the week that follows.")
# Targets of the issue (same run): name -> (numerator config, its figure, denominator, its figure, limit).
TARGETS = {
    "ours_over_llamacpp_warm": ("ours", "per_token_ms_median", "llamacpp-warm", "per_token_ms_median", 1.2),
    "ours_over_llamacpp_cold": ("ours", "per_token_ms_median", "llamacpp-cold", "per_token_ms_median", 0.25),
    "dram_over_llamacpp_warm": ("ours", "model_bytes_resident", "llamacpp-warm", "model_bytes_resident", 0.6),
    "native_peak_rss_over_llamacpp_rss": ("native", "peak_rss_bytes", "llamacpp-warm", "rss_bytes", 1.0),
    "ppl_over_python_engine": ("ours", "ppl", "python-engine", "ppl", 1.02),
    # issue 25 (lookahead), on a sparse model
    "lookahead_over_ours_dram": ("lookahead", "per_token_ms_median", "ours-dram", "per_token_ms_median", 1.3),
    "lookahead_io_over_ours_io": ("lookahead", "io_ms", "ours", "io_ms", 0.5),
    "lookahead_ppl_over_ours": ("lookahead", "ppl", "ours", "ppl", 1.01),
}


def available_dtypes() -> tuple[str, ...]:
    """Bundle encodings layout.bundle accepts, the default first: q4d8 has the best perplexity
    per byte (SmolLM2-135M, 600 held-out tokens, torch reference on the decoded weights: GGUF
    10.96, q4d8 11.13 at 1332 B/bundle, q4 14.47 at 1080 B, int8 down alone 11.55), then by bytes."""
    from ..layout.bundle import BundleSpec
    ok = []
    for d in ("q4d8", "q4", "int8", "fp16"):
        try:
            BundleSpec("swiglu", 64, d)
            ok.append(d)
        except ValueError:
            pass
    return tuple(ok)


def register(bench_sub):
    """The `bench e2e` parser (android_host.remote_decode adds the device's flags to it)."""
    p = bench_sub.add_parser("e2e", help="llama.cpp (warm, cold, FFN-cold) against the compiled flash engine "
                                         "(in-process and ripple-run): per-token ms, bytes, DRAM, RSS, "
                                         "perplexity (JSON + PNG)")
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M GGUF), or a Hugging Face folder "
                                   "(the APP configurations only)")
    p.add_argument("--json", required=True, help="results JSON (a PNG is written beside it)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="one prompt, wrapped in the chat template")
    p.add_argument("--tokens", type=int, default=48, help=f"tokens timed per configuration (>= {MIN_TOKENS})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="compute threads for every configuration (default: all cores)")
    p.add_argument("--dtype", choices=available_dtypes(),
                   help="bundle encoding of ours (default: q4d8, 4-bit gate/up and 8-bit down)")
    p.add_argument("--sparsity", type=float, help="profiled sparsity (default: the profile's choice)")
    p.add_argument("--profile", help="profile to use (with --record-inputs for predicted sets); "
                                     "default: profiled once into --cache-dir")
    p.add_argument("--budget", type=float, default=0.10,
                   help="ours' DRAM for FFN weights (whole layers pinned), fraction of FFN bytes (default 0.10)")
    p.add_argument("--queue-depth", type=int, default=32)
    p.add_argument("--configs", nargs="+", choices=CONFIGS,
                   help=f"default: {' '.join(DEFAULT_CONFIGS['gguf'])} for a GGUF, "
                        f"{' '.join(DEFAULT_CONFIGS['folder'])} for a folder "
                        f"(with --llamacpp-model: {' '.join(DEFAULT_CONFIGS['folder+gguf'])})")
    p.add_argument("--llamacpp-model", metavar="GGUF",
                   help="the GGUF llama.cpp decodes, when --model is a folder made from it (`ripple sparsify`'s "
                        "output against the original): the held-out text is the same, the weights are not")
    p.add_argument("--lookahead", type=int, default=LOOKAHEAD,
                   help=f"the lookahead configuration's layers ahead (default {LOOKAHEAD})")
    p.add_argument("--cache-dir", default="build/cache/e2e", help="profile, predictor, layout, APPs, probe file")
    p.add_argument("--quick-probe", action="store_true", help="small storage probe and fio check (tests)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the configurations this many times in turn and report each figure's median "
                        "over the rounds (default 1; a shared host's speed drifts from minute to minute)")
    p.set_defaults(run=run_local)
    return p


def run_local(args) -> None:
    """`ripple bench e2e` on this machine."""
    r = bench_e2e_cmd(model=args.model, json_out=args.json, prompt=args.prompt, tokens=args.tokens,
                      threads=args.threads, dtype=args.dtype, sparsity=args.sparsity, profile=args.profile,
                      budget=args.budget, queue_depth=args.queue_depth, configs=args.configs,
                      cache_dir=args.cache_dir, quick_probe=args.quick_probe, rounds=args.rounds,
                      lookahead=args.lookahead, llamacpp_model=args.llamacpp_model)
    print_table(r)


# ---------------------------------------------------------------- preparation (main process)

def private_copy(path: Path, cdir: Path) -> Path:
    """The GGUF copied (once, fsynced) into the cache folder: only llama.cpp maps it, so
    eviction is not defeated by another process holding the same pages."""
    dest = cdir / f"llamacpp-{cache_key(path.resolve(), path.stat().st_size, path.stat().st_mtime_ns)}.gguf"
    if dest.is_file() and dest.stat().st_size == path.stat().st_size:
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


@dataclass
class OursSetup:
    """Everything the `ours` worker needs, prepared once (picklable)."""
    model: str
    layout_dir: str
    profile: str
    predictor: str | None
    strategy: object              # runtime_py.strategies.Strategy, pinned share tuned
    tuning: dict
    storage: object               # runtime_py.storage_model.StorageProfile measured in this run
    budget_bytes: int
    sparsity: float
    dtype: str
    whole_copy: bool = False      # the layout has the GGUF's own blocks per layer (layout.whole_copy)


def prepare_ours(path: Path, desc, cdir: Path, dtype: str, sparsity: float | None, budget: float,
                 queue_depth: int, storage, profile: str | None, lookahead: int = 0) -> OursSetup:
    """Profile (with FFN inputs), predictor (and with lookahead J > 0 its lookahead
    predictors, 1..J layers ahead), `ours` placement and tuned strategy, and the flash file
    packed in that placement and dtype; each cached in cdir."""
    import numpy as np

    from ..layout.bundle import BundleSpec
    from ..layout.reader import open_layout
    from ..runtime_py.strategies import build_cache, get_strategy, layout_perm, tune
    from .bench_io import placements, real_workload
    from .interface import pack_cmd, profile_cmd, train_predictor_cmd

    if profile is None:
        tag = "default" if sparsity is None else f"s{sparsity:g}"
        profile = str(cdir / f"profile-{desc.source_hash[:16]}-{tag}-inputs.npz")
        if not Path(profile).is_file():
            print(f"bench e2e: profiling {path.name} with FFN inputs into {profile}", file=sys.stderr)
            profile_cmd(str(path), profile, sparsity=sparsity, record_inputs=True)
    wl = real_workload(str(path), sparsity, profile, cdir)
    perm = placements(wl, {"ours"}, cdir)["ours"]
    L, _, n = wl.calib.shape
    bb = BundleSpec(desc.activation, desc.d_model, dtype, desc.layers[0].b_up is not None).bundle_bytes
    budget_bytes = int(budget * L * n * bb)
    s, tuned = tune(get_strategy("ours"), wl.calib, perm, bb, budget_bytes, storage, queue_depth)
    laid = layout_perm(s, perm, build_cache(s, budget_bytes, bb, perm, wl.calib))
    key = cache_key(desc.source_hash, dtype, Path(profile).resolve(), Path(profile).stat().st_mtime_ns,
                np.ascontiguousarray(laid).tobytes())
    layout_dir = cdir / f"layout-{dtype}-{key}"
    # The pinned bundles follow the probe, so a drifting disk lays out a new file now and then;
    # the ones of this checkpoint this run does not use go (61 MB each on SmolLM2 in q4d8).
    for old in cdir.glob(f"layout-{dtype}-*"):
        m = cached_manifest(old)
        if old != layout_dir and m is not None and m.get("source", {}).get("hash") == desc.source_hash:
            shutil.rmtree(old, ignore_errors=True)
            (cdir / f"placement-{old.name.rsplit('-', 1)[1]}.npz").unlink(missing_ok=True)
    try:
        open_layout(layout_dir)
    except Exception:
        place_file = cdir / f"placement-{key}.npz"
        tmp = place_file.with_name(f".{place_file.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, perm=laid)
        os.replace(tmp, place_file)
        print(f"bench e2e: packing {dtype} bundles in the ours placement into {layout_dir}", file=sys.stderr)
        pack_cmd(str(path), str(layout_dir), profile, str(place_file), dtype)
    # Layers read whole are read as the GGUF's own blocks when it has them in kinds the GEMV
    # multiplies (fewer bytes than q4d8 bundles, no requantized down; layout.whole_copy).
    from ..layout.errors import LayoutError
    from ..layout.whole_copy import open_whole_copy, write_whole_copy
    from ..tuning.load_gguf import ffn_tensors
    try:
        ffn_tensors(path, desc.n_layers)
        whole = True
    except LayoutError:
        whole = False
    if whole:
        try:
            fresh = open_whole_copy(layout_dir, desc.source_hash) is not None
        except LayoutError:            # damaged, or written by an older ripple: it is our cache
            fresh = False
        if not fresh:
            print(f"bench e2e: writing the GGUF's FFN blocks per layer into {layout_dir}", file=sys.stderr)
            write_whole_copy(layout_dir, ffn_tensors(path, desc.n_layers), path, desc.source_hash)
    from ..tuning.profile import ProfileError, load_profile
    try:
        load_profile(profile).inputs("calib")
        predictor = str(cdir / f"predictor-{cache_key(Path(profile).resolve(), Path(profile).stat().st_mtime_ns)}.npz")
    except ProfileError:       # a profile without FFN inputs: oracle sets (the JSON says which)
        predictor = None
    if predictor and (not Path(predictor).is_file() or not _has_lookahead(predictor, lookahead)):
        print(f"bench e2e: training the activation predictor{' and its lookahead' if lookahead else ''} "
              f"into {predictor}", file=sys.stderr)
        train_predictor_cmd(profile, predictor, model=str(path), lookahead=lookahead)
    return OursSetup(str(path), str(layout_dir), profile, predictor, s, tuned, storage, budget_bytes,
                     float(wl.sparsity), dtype, whole)


def _has_lookahead(predictor: str, J: int) -> bool:
    """The lookahead predictors beside `predictor` cover 1..J layers ahead (J 0: none needed)."""
    from ..tuning.lookahead import beside, load_lookahead
    if not J:
        return True
    file = beside(predictor)
    return file.is_file() and set(range(1, J + 1)) <= set(load_lookahead(file).distances)


# ---------------------------------------------------------------- workers (one process each)

def llama_prefill_ms(path: str, prompt_ids: list[int], threads: int, eviction: str) -> float:
    """llama.cpp's prompt eval, timed alone in its own context: llamacpp_decode.decode does not
    time it. The same eviction as the configuration's tokens, once before it."""
    from .llamacpp_decode import open_llama
    from .page_eviction import evict, gguf_tensor_ranges, whole_file
    llm = open_llama(path, len(prompt_ids) + 1, threads)
    try:
        if eviction != "none":
            evict(path, whole_file(path) if eviction == "file" else gguf_tensor_ranges(path))
        t0 = time.perf_counter()
        llm.eval(list(prompt_ids))
        return (time.perf_counter() - t0) * 1e3
    finally:
        llm.close()


def llama_worker(path: str, prompt_ids: list[int], tokens: int, threads: int, eviction: str,
                 seqs: list) -> dict:
    from .bench_app import peak_rss, process_rss
    from .llamacpp_decode import decode, perplexity
    python_rss = process_rss()                # this process before llama.cpp: the interpreter's share
    prefill_ms = llama_prefill_ms(path, prompt_ids, threads, eviction)
    d = decode(path, prompt_ids, tokens, threads, eviction)
    rss, peak = process_rss(), peak_rss()
    ppl = perplexity(path, seqs, threads) if seqs else None
    return {"token_ms": d.token_ms, "bytes_read": d.bytes_read, "resident_before": d.resident_before,
            "kv_bytes": d.kv_bytes, "evicted_verified": d.evicted_verified, "eviction_notes": d.eviction_notes,
            "evicted_bytes": d.evicted_bytes, "rss_bytes": rss, "peak_rss_bytes": peak,
            "python_rss_bytes": python_rss, "prefill_ms": prefill_ms, "prefill_tokens": len(prompt_ids),
            "ppl": ppl, "tokens": d.tokens}


def python_ppl_worker(setup: OursSetup, seqs: list, threads: int, queue_depth: int) -> float:
    """Held-out perplexity of the Python engine (runtime_py.engine's FFN path) with the `ours`
    policy: predicted sets (or the profile's oracle ones), the DRAM budget as pinned layers of
    the whole copy and a bundle cache, layers read whole finding their own sets in the kernel.
    The reference the compiled engine's perplexity is held to."""
    import numpy as np
    import torch

    from ..layout.reader import check_source, open_layout
    from ..layout.whole_copy import open_whole_copy
    from ..runtime_py.cache import BundleStore
    from ..runtime_py.backends import ffn_backend
    from ..runtime_py.engine import IOStats
    from ..runtime_py.read_ahead import ReadAhead
    from ..runtime_py.reader import FlashReader
    from ..runtime_py.strategies import build_cache
    from ..tuning.checkpoint import load_model
    from ..tuning.forward import quantizable_non_ffn, to_torch, to_torch_quantized
    from ..tuning.profile import load_profile, thresholds_at
    from ..tuning.sparsity import perplexity
    from .interface import set_policy

    # TVM's pool does the heavy work; a second OpenMP pool of torch's on the same cores made a
    # token 3-5x slower (--threads 2 on 2 cores: 141 ms against 43).
    torch.set_num_threads(1)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    desc = load_model(setup.model)
    layout = open_layout(setup.layout_dir)
    check_source(layout, desc.source_hash)
    meta = layout.manifest.meta
    copy = open_whole_copy(layout.path.parent, desc.source_hash) if setup.whole_copy else None
    pin = 0 if copy is None else setup.budget_bytes // copy.layer_bytes * copy.layer_bytes
    thresholds = thresholds_at(meta["grid"], meta["grid_thresholds"], setup.sparsity)
    _, policy = set_policy(layout, desc, setup.sparsity, "predicted" if setup.predictor else "oracle",
                           setup.predictor, PREDICTOR_DRAM)
    store = BundleStore(build_cache(setup.strategy, setup.budget_bytes - pin, layout.bundle_bytes, layout.perm,
                                    load_profile(setup.profile).masks("calib")))
    tm = to_torch_quantized(desc) if quantizable_non_ffn(desc) else to_torch(desc, torch.bfloat16, ffn=False)
    with FlashReader(layout.path, queue_depth) as reader, \
            ReadAhead(layout, queue_depth, READ_AHEAD, "auto", store=store, whole_copy=copy, pin_bytes=pin) as ahead:
        return float(perplexity(tm, [np.asarray(s, np.int64) for s in seqs],
                                ffn_backend(BACKEND)(tm, layout, reader, thresholds, meta.get("criterion", "coef"),
                                                     IOStats(), sets=policy, measure_misses=False, ahead=ahead)))


def _in_process(fn, *args):
    """fn(*args) in a fresh spawned process: its own RSS, threads and page-cache history."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


# ---------------------------------------------------------------- assembly

def _pct(xs, q) -> float:
    import numpy as np
    return float(np.percentile(np.asarray(xs, float), q)) if len(xs) else float("nan")


def _round(v, nd=3):
    return None if v is None else round(float(v), nd)


def config_row(name: str, raw: dict, warm_ms: float | None) -> dict:
    """The issue's figures for one configuration from its worker's raw measurements
    (CONFIG_KEYS, then EXTRA_KEYS). llama.cpp does not time its I/O apart: its io_ms is the
    per-token time above llamacpp-warm's (the page-fault stall) and its compute_ms
    llamacpp-warm's. The APP's io_ms is the time its decode call waited for reads (the
    runtime's counters) and its compute_ms the rest of the call."""
    import numpy as np
    med = _pct(raw["token_ms"], 50)
    outside = None
    if name.startswith("llamacpp"):
        warm = med if name == "llamacpp-warm" else warm_ms
        io = 0.0 if name == "llamacpp-warm" else (None if warm is None else max(med - warm, 0.0))
        compute = warm
        resident = int(_pct(raw["resident_before"], 50)) + int(raw["kv_bytes"])
        verified = raw["evicted_verified"]
        source = None if raw["ppl"] is None else "llama.cpp's own logits (logits_all), each held-out sequence " \
                                                 "from an empty context"
    else:
        io = _pct(raw["io_ms"], 50)
        compute = _pct(np.subtract(raw["token_ms"], raw["io_ms"]), 50)
        resident = int(raw["resident"]["total"])
        # O_DIRECT bypasses the page cache: every byte a token reads comes from the disk.
        verified = bool(raw["o_direct"])
        source = raw["ppl_source"]
        outside = None if raw.get("outside_ms") is None else _pct(raw["outside_ms"], 50)
    prefill = raw.get("prefill_ms")
    ahead = {}
    if "prefetched_bytes" in raw:           # the APP in this process: the runtime's lookahead counters
        ahead = {"unused_bytes_per_token": int(_pct(raw["unused_bytes"], 50)),
                 "prefetched_bytes_per_token": int(_pct(raw["prefetched_bytes"], 50)),
                 "misses_per_token": _round(np.mean(raw["misses"]), 2),
                 "queue_depth_mean": _round(np.mean(raw["queue_depth_mean"]), 2),
                 "queue_depth_max": int(raw["queue_depth_max"])}
    return {"per_token_ms_median": round(med, 3), "per_token_ms_p90": round(_pct(raw["token_ms"], 90), 3),
            "io_ms": _round(io), "compute_ms": _round(compute),
            "bytes_read_per_token": int(_pct(raw["bytes_read"], 50)), "model_bytes_resident": resident,
            "rss_bytes": int(raw["rss_bytes"]), "ppl": _round(raw["ppl"], 4), "evicted_verified": verified,
            "prefill_tokens_per_s": None if not prefill else round(raw["prefill_tokens"] / prefill * 1e3, 2),
            "peak_rss_bytes": None if raw.get("peak_rss_bytes") is None else int(raw["peak_rss_bytes"]),
            "outside_ms_median": _round(outside, 4), "ppl_source": source,
            "ids": [int(i) for i in raw["tokens"]],
            **{k: ahead.get(k) for k in EXTRA_KEYS[5:]}}


def median_rounds(rounds: list[dict]) -> dict:
    """One row per configuration from its rows of several rounds: each figure's median over
    the rounds (perplexity is measured in the first round only: it is the same every time; the
    ids and texts are the first round's); eviction verified only if it was in every round."""
    import numpy as np
    out = {}
    for name in rounds[0]:
        rows = [r[name] for r in rounds]
        row = {}
        for k, v in rows[0].items():
            vals = [x[k] for x in rows if x[k] is not None]
            if k == "evicted_verified":
                row[k] = None if any(x[k] is None for x in rows) else all(x[k] for x in rows)
            elif k in ("ppl", "ppl_source", "ids") or not vals or not isinstance(vals[0], (int, float)):
                row[k] = v
            else:
                m = float(np.median(vals))
                row[k] = int(round(m)) if isinstance(v, int) else round(m, 3)
        out[name] = row
    return out


def assemble(model: str, prompt_tokens: int, threads: int, fio: dict, raw: dict) -> dict:
    """The JSON of the issue: {"model", "prompt_tokens", "threads", "fio", "configs": {NAME: the
    figures}}; `raw` maps configuration names to their workers' measurements."""
    warm = _pct(raw["llamacpp-warm"]["token_ms"], 50) if "llamacpp-warm" in raw else None
    configs = {name: config_row(name, raw[name], warm) for name in CONFIGS if name in raw}
    return {"model": model, "prompt_tokens": int(prompt_tokens), "threads": int(threads), "fio": fio,
            "configs": configs}


def targets(configs: dict, ppl_python: float | None = None) -> dict:
    """The issue's targets (TARGETS), each as the measured ratio, the limit and whether it is
    met (None: a side was not measured). `python-engine` is the Python engine's perplexity."""
    rows = dict(configs)
    if ppl_python is not None:
        rows["python-engine"] = {"ppl": ppl_python}
    out = {}
    for key, (a, fa, b, fb, limit) in TARGETS.items():
        num = rows.get(a, {}).get(fa)
        den = rows.get(b, {}).get(fb)
        r = None if num is None or not den else num / den
        out[key] = {"ratio": None if r is None else round(r, 4), "target": limit,
                    "met": None if r is None else bool(r <= limit), "of": f"{a}.{fa} / {b}.{fb}"}
    return out


def bytes_by_sparsity(grid, ffn_bytes: int, seq_bytes_per_s: float, configs: dict) -> list[dict]:
    """Per profiled sparsity: the FFN bytes a token needs, the least time this disk (its
    sequential bandwidth, measured in this run) takes for them, and ours' floor beside the
    targets' per-token times. Ours reads ahead, so its reads overlap its compute and a token
    takes at least the longer of the two, not their sum; the same floor is given with
    llama.cpp's compute (its warm per-token time) and exact sets."""
    ours = configs.get("ours", {})
    compute = ours.get("compute_ms")
    llama_compute = configs.get("llamacpp-warm", {}).get("compute_ms")
    t_warm = configs.get("llamacpp-warm", {}).get("per_token_ms_median")
    t_cold = configs.get("llamacpp-cold", {}).get("per_token_ms_median")
    rows = []
    for s in grid:
        need = (1 - float(s)) * ffn_bytes
        io_ms = need / seq_bytes_per_s * 1e3
        floor = None if compute is None else max(io_ms, compute)
        rows.append({"sparsity": float(s), "bytes_needed_per_token": int(need),
                     "io_ms_at_seq_bw": round(io_ms, 3),
                     "ours_floor_ms": None if floor is None else round(floor, 3),
                     "floor_ms_with_llamacpp_compute": None if llama_compute is None
                     else round(max(io_ms, llama_compute), 3),
                     "meets_warm_target": None if floor is None or t_warm is None
                     else bool(floor <= TARGETS["ours_over_llamacpp_warm"][-1] * t_warm),
                     "meets_cold_target": None if floor is None or t_cold is None
                     else bool(floor <= TARGETS["ours_over_llamacpp_cold"][-1] * t_cold)})
    return rows


# ---------------------------------------------------------------- the run

def bench_e2e_cmd(model: str | None = None, json_out: str | None = None, prompt: str = DEFAULT_PROMPT,
                  tokens: int = 48, threads: int | None = None, dtype: str | None = None,
                  sparsity: float | None = None, profile: str | None = None, budget: float = 0.10,
                  queue_depth: int = 32, configs=None, cache_dir: str = "build/cache/e2e",
                  quick_probe: bool = False, rounds: int = 1, lookahead: int = LOOKAHEAD,
                  llamacpp_model: str | None = None) -> dict:
    """llamacpp_model: the GGUF the llama.cpp configurations decode when model is a folder (a
    sparsified model against its original); by default llama.cpp decodes model itself."""
    from .bench_io import BenchError
    from ..tuning.checkpoint import default_model_path
    if rounds < 1:
        raise BenchError(f"--rounds {rounds}: at least 1")
    if lookahead < 1:
        raise BenchError(f"--lookahead {lookahead}: at least 1 layer ahead")
    path = Path(model) if model else default_model_path()
    llama_src = Path(llamacpp_model) if llamacpp_model else path
    if llamacpp_model and (llama_src.suffix != ".gguf" or not llama_src.is_file()):
        raise BenchError(f"--llamacpp-model {llamacpp_model}: not a GGUF file; pass the original model's .gguf")
    gguf = llama_src.suffix == ".gguf"
    kind = "gguf" if path.suffix == ".gguf" else "folder+gguf" if gguf else "folder"
    configs = DEFAULT_CONFIGS[kind] if configs is None else configs
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise BenchError(f"--configs {' '.join(sorted(unknown))}: choose from {', '.join(CONFIGS)}")
    configs = [c for c in CONFIGS if c in set(configs)]
    if not gguf and any(c in LLAMA_EVICTION for c in configs):
        raise BenchError(f"{path}: llama.cpp reads GGUF files; for a folder choose --configs from "
                         f"{' '.join(APP_CONFIGS)}, or give the original's GGUF as --llamacpp-model")
    if any(c.startswith("llamacpp") for c in configs):
        from .llamacpp_decode import require_llama_cpp
        require_llama_cpp()                       # one line, before minutes of preparation
    dtypes = available_dtypes()
    dtype = dtype or dtypes[0]
    if dtype not in dtypes:
        raise BenchError(f"--dtype {dtype}: this layout supports {', '.join(dtypes)}")
    threads = threads or os.cpu_count() or 1
    if tokens < 1 or threads < 1 or queue_depth < 1:
        raise BenchError("--tokens, --threads and --queue-depth must be at least 1")
    if not 0.0 <= budget < 1.0:
        raise BenchError(f"--budget {budget}: a fraction of FFN bytes in [0, 1)")
    if json_out and not Path(json_out).resolve().parent.is_dir():
        raise BenchError(f"--json {json_out}: folder {Path(json_out).parent} does not exist")

    from tqdm import tqdm

    from ..tuning.checkpoint import load_model, load_tokenizer
    from ..tuning.profile import load_profile
    from .page_eviction import gguf_tensor_ranges
    from .probe import probe_storage

    t_start = time.perf_counter()
    cdir = Path(cache_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    desc = load_model(path)
    tok = load_tokenizer(path)
    if getattr(tok, "chat_template", None):
        prompt_ids = [int(i) for i in tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                              add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)]
    else:                       # a base model (relu-tiny): the prompt as it is
        prompt_ids = [int(i) for i in tok.encode(prompt)]
    notes = []
    if tokens < MIN_TOKENS:
        notes.append(f"only {tokens} tokens per configuration (the issue asks for >= {MIN_TOKENS})")

    # This disk, measured now: the planner's latency table and fio's figures beside it.
    probe = probe_storage(cdir, quick=quick_probe, with_fio=True)
    storage = probe.storage
    fio = {"checks": probe.fio, "note": probe.fio_note,
           "seq_MBps": None if probe.fio_seq_MBps is None else round(probe.fio_seq_MBps, 1),
           "probe_seq_MBps": round(storage.seq_MBps, 1), "probe_engine": probe.engine,
           "probe": "ripple probe storage" + (" --quick" if quick_probe else "")}

    setup, apps, app_info, ppl_python = None, {}, {}, None
    if any(c in APP_CONFIGS for c in configs):
        from . import bench_app
        setup = prepare_ours(path, desc, cdir, dtype, sparsity, budget, queue_depth, storage, profile,
                             lookahead if "lookahead" in configs else 0)
        profile = setup.profile
        # The APP plans its reads with this run's disk: the probe as a device profile file.
        storage_file = bench_app.save_storage(storage, cdir, setup.budget_bytes,
                                              {"probe": fio["probe"], "engine": probe.engine})
        wanted = bench_app.recipes(setup.layout_dir, setup.whole_copy, setup.budget_bytes, storage_file,
                                   KV_DTYPE, configs, setup.profile, lookahead,
                                   desc.n_layers * desc.d_ffn * _bundle_bytes(setup.layout_dir))
        apps = bench_app.prepare_apps(str(path), cdir, wanted, desc.source_hash, setup.predictor,
                                      queue_depth, READ_AHEAD)
        app_info = {name: bench_app.describe(apps[name], wanted[name]) for name in apps}
    elif profile is None:
        raise BenchError("the llama.cpp configurations alone still need the held-out text: pass --profile")
    prof = load_profile(profile)
    seqs = [s.tolist() for s in prof.sequences("heldout")]
    llama_path = private_copy(llama_src, cdir) if gguf else None

    per_round = []
    runs = [(r, name) for r in range(rounds) for name in configs]
    for r, name in tqdm(runs, desc="bench e2e: configurations", unit="config", file=sys.stderr):
        if r == len(per_round):
            per_round.append({})
        raw = per_round[r]
        held = seqs if r == 0 else None           # perplexity once: it does not change
        if name in LLAMA_EVICTION:
            raw[name] = _in_process(llama_worker, str(llama_path), prompt_ids, tokens, threads,
                                    LLAMA_EVICTION[name], held)
        elif name == "native":
            raw[name] = bench_app.native_worker(apps[name], prompt_ids, tokens, threads)
        else:
            raw[name] = _in_process(bench_app.app_worker, apps[name], prompt_ids, tokens, threads, held)
        n_done = len(raw[name]["token_ms"])
        if n_done < tokens and r == 0:
            notes.append(f"{name}: the model ended its answer after {n_done} tokens (EOS); use a longer prompt")
    if "ours" in configs:
        print("bench e2e: the Python engine's held-out perplexity (the compiled engine's reference)",
              file=sys.stderr)
        ppl_python = _in_process(python_ppl_worker, setup, seqs, threads, queue_depth)
    rows = [assemble(desc.name or path.name, len(prompt_ids), threads, fio, raw)["configs"] for raw in per_round]
    raw = per_round[0]
    out = assemble(desc.name or path.name, len(prompt_ids), threads, fio, raw)
    if rounds > 1:
        out["configs"] = median_rounds(rows)
    out["ppl_python_engine"] = None if ppl_python is None else {
        "ppl": round(ppl_python, 4), "source": "runtime_py.engine's FFN path (TVM kernels on the flash file), "
        f"{setup.dtype} at sparsity {setup.sparsity:g}, {'predicted' if setup.predictor else 'oracle'} sets, "
        "the same held-out sequences"}
    for name, r in raw.items():
        if name in LLAMA_EVICTION and r["evicted_verified"] is False:
            notes.append(f"{name}: EVICTION NOT VERIFIED by mincore: {'; '.join(r['eviction_notes'])}")
        if name in APP_CONFIGS and not r["o_direct"]:
            notes.append(f"{name}: O_DIRECT refused ({r['fallback_reason']}); reads may hit the page cache")
    for name, row in out["configs"].items():
        if name in LLAMA_EVICTION and len(row["ids"]) > 1 and len(set(row["ids"])) == 1:
            notes.append(f"{name}: decoded id {row['ids'][0]} at every step; check llamacpp_decode.last_logits "
                         "against this llama-cpp-python")
    if "ours" in out["configs"] and "native" in out["configs"] \
            and out["configs"]["ours"]["ids"] != out["configs"]["native"]["ids"]:
        notes.append("ours and native decoded different ids from the same APP and prompt")
    if "ours" in out["configs"] and "llamacpp-warm" in out["configs"]:
        a, b = out["configs"]["ours"]["ids"], out["configs"]["llamacpp-warm"]["ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        out["ids_same_as_llamacpp_prefix"] = same
        notes.append(f"ours and llama.cpp (warm) decoded the same first {same} of {min(len(a), len(b))} ids "
                     + ("(greedy, same GGUF blocks; the sums' order differs)" if llamacpp_model is None else
                        f"(greedy; llama.cpp decodes {llama_src.name}, a different model from {path.name})"))
    if llamacpp_model is not None:
        out["llamacpp_model"] = str(llama_src)
        notes.append(f"llama.cpp configurations decode {llama_src.name}; ours decode {path.name}: two models, "
                     "one prompt and one held-out text, so token time, bytes and perplexity compare the "
                     "models as each engine runs them")

    # What the ratios rest on, and why a target is or is not reached on this model.
    gguf_ffn = int(gguf_tensor_ranges(llama_path)[:, 1].sum()) if gguf else None
    file_bytes = llama_path.stat().st_size if gguf else None
    details = {"dtype": dtype if setup else None, "tokens": tokens, "sparsity": setup.sparsity if setup else None,
               "gguf_bytes": file_bytes, "gguf_ffn_bytes": gguf_ffn,
               "gguf_non_ffn_bytes": None if not gguf else file_bytes - gguf_ffn, "lookahead": lookahead,
               "load_average": os.getloadavg()[0], "tvm_bind_threads": os.environ.get("TVM_BIND_THREADS"),
               "seconds": None, "apps": app_info}
    for name, r in raw.items():
        details[name] = {k: r[k] for k in ("resident", "eviction_notes", "evicted_bytes", "sets", "threads",
                                           "python_rss_bytes") if k in r}
    if apps:
        notes.append("ours' and native's model_bytes_resident is what the APP holds (AppSession.dram_bytes, "
                     "ripple-run's dram_bytes): params (attention and embedding/LM-head weights as the GGUF "
                     "stores them, norms, the predictor), the KV cache (float16, as llama.cpp's), the whole "
                     "layers pinned by the DRAM budget and the runtime's read buffers; rss_bytes and "
                     "peak_rss_bytes are the whole process's (ours: a Python process with TVM; native: "
                     "ripple-run, no Python)")
        notes.append("ours io_ms is the decode call's wait for reads (the runtime's counters), compute_ms the "
                     "rest of the call; outside_ms_median the per-token time in Python outside the library "
                     "(AppSession); ppl_over_python_engine holds the compiled engine's perplexity to the Python "
                     "engine's on the same text (a layer read whole computes every neuron, so below 1 is expected)")
    if any(c.startswith("llamacpp") for c in raw):
        notes.append("llama.cpp io_ms = its per-token ms above llamacpp-warm's (page-fault stall); "
                     "compute_ms = llamacpp-warm's; bytes_read_per_token from /proc/self/io; "
                     "model_bytes_resident = the GGUF's bytes in the page cache when a token starts "
                     "(mincore) + its f16 KV cache at the same context length; its rss_bytes include the "
                     "Python interpreter around it (details.llamacpp-*.python_rss_bytes, measured before "
                     "llama.cpp loaded); prefill_tokens_per_s from one prompt eval timed alone, after the "
                     "configuration's eviction")
    if setup is not None:
        ffn_bytes = desc.n_layers * desc.d_ffn * _bundle_bytes(setup.layout_dir)
        details["bytes_by_sparsity"] = bytes_by_sparsity(prof.grid, ffn_bytes, storage.seq_bytes_per_s,
                                                         out["configs"])
        details["ffn_bytes_dense"] = ffn_bytes
        details["storage_table"] = storage.to_json()
        details["strategy"] = setup.strategy.describe()
        details["strategy_tuning"] = setup.tuning
    out["targets"] = targets(out["configs"], ppl_python)
    if rounds > 1:
        details["rounds"] = rows
        details["latency_ratios_per_round"] = [
            {k: t["ratio"] for k, t in targets(row).items() if k.startswith("ours_over")} for row in rows]
    details["seconds"] = round(time.perf_counter() - t_start, 1)
    out["details"] = details
    out["notes"] = notes
    if json_out:
        from ..atomic_file import write_result
        write_result(json_out, out, plot)
    return out


def _bundle_bytes(layout_dir: str) -> int:
    from ..layout.reader import open_layout
    return open_layout(layout_dir).bundle_bytes


# ---------------------------------------------------------------- report

def ours_label(d: dict) -> str:
    """How ours ran, for the plot's title and the table's header."""
    a = d.get("apps", {}).get("ours")
    if not a:
        return "not run"
    layers, io = a["layers"], a["io"]
    label = f"compiled {d.get('dtype')} APP, {len(layers['whole'])} layers read whole"
    if layers["pinned_whole"]:
        label += f" ({len(layers['pinned_whole'])} pinned in {io['pinned_bytes'] / 1e6:.1f} MB)"
    if layers["sparse"]:
        label += f", {len(layers['sparse'])} sparse at {a['sparsity']:g} ({a['sets']} sets)"
    return label


def _mb(v) -> float:
    return 0.0 if v is None else v / 1e6


def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = r["configs"]
    names = list(c)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    io = [c[k]["io_ms"] or 0.0 for k in names]
    comp = [c[k]["compute_ms"] or 0.0 for k in names]
    ax.bar(names, comp, color="#69c", label="compute")
    ax.bar(names, io, bottom=comp, color="#c66", label="I/O")
    med = [c[k]["per_token_ms_median"] for k in names]
    p90 = [c[k]["per_token_ms_p90"] for k in names]
    ax.scatter(names, med, marker="_", s=500, color="k", zorder=3, label="median")
    ax.scatter(names, p90, marker="v", color="k", zorder=3, label="p90")
    for x, v in zip(names, med):
        ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per token")
    ax.set_title("per-token latency", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    x = range(len(names))
    ax.bar([i - 0.27 for i in x], [_mb(c[k]["model_bytes_resident"]) for k in names], width=0.27, color="#3a3",
           label="model bytes resident")
    ax.bar(list(x), [_mb(c[k]["rss_bytes"]) for k in names], width=0.27, color="#999", label="process RSS")
    ax.bar([i + 0.27 for i in x], [_mb(c[k]["peak_rss_bytes"]) for k in names], width=0.27, color="#555",
           label="peak RSS")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MB")
    ax.set_title("DRAM", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    measured = [k for k in names if c[k]["ppl"] is not None]
    bars = {k: c[k]["ppl"] for k in measured}
    if r.get("ppl_python_engine"):
        bars["python engine"] = r["ppl_python_engine"]["ppl"]
    ax.bar(list(bars), list(bars.values()), color="#888")
    for xx, v in bars.items():
        ax.annotate(f"{v:.2f}", (xx, v), ha="center", va="bottom", fontsize=8)
    ax.set_title("held-out perplexity", fontsize=10)
    for a in axes:
        a.tick_params(axis="x", labelsize=8, rotation=20)
    d = r.get("details", {})
    fig.suptitle(f"ripple bench e2e: {r['model']}, {r['threads']} threads, prompt {r['prompt_tokens']} tokens, "
                 f"ours {ours_label(d)}; fio seq {r['fio'].get('seq_MBps')} MB/s", fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def print_table(r: dict) -> None:
    d = r.get("details", {})
    print(f"{r['model']}: prompt {r['prompt_tokens']} tokens, {d.get('tokens')} timed, {r['threads']} threads; "
          f"ours {ours_label(d)}")
    f = r["fio"]
    print(f"disk: fio seq {f.get('seq_MBps')} MB/s, probe seq {f.get('probe_seq_MBps')} MB/s; " + ", ".join(
        f"{'seq' if c['sequential'] else 'rand'} {c['size'] >> 10}K qd{c['qd']} fio {c['fio_MBps']:.0f} MB/s"
        for c in f.get("checks", [])))
    print(f"{'config':>18} {'ms med':>8} {'ms p90':>8} {'io ms':>7} {'cpu ms':>7} {'out ms':>7} {'MB read':>8} "
          f"{'MB resid':>9} {'MB rss':>8} {'MB peak':>8} {'pfill t/s':>9} {'ppl':>8} {'evicted':>8}")
    fmt = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
    for k, v in r["configs"].items():
        print(f"{k:>18} {v['per_token_ms_median']:8.2f} {v['per_token_ms_p90']:8.2f} {fmt(v['io_ms'], '7.2f')} "
              f"{fmt(v['compute_ms'], '7.2f')} {fmt(v['outside_ms_median'], '7.3f')} "
              f"{v['bytes_read_per_token'] / 1e6:8.2f} {v['model_bytes_resident'] / 1e6:9.1f} "
              f"{v['rss_bytes'] / 1e6:8.1f} {fmt(v['peak_rss_bytes'] and v['peak_rss_bytes'] / 1e6, '8.1f')} "
              f"{fmt(v['prefill_tokens_per_s'], '9.1f')} {fmt(v['ppl'], '8.3f')} {str(v['evicted_verified']):>8}")
    for k, v in r["configs"].items():
        if v.get("prefetched_bytes_per_token") is not None:
            print(f"{k:>18} per token: {v['prefetched_bytes_per_token'] / 1e3:.1f} kB prefetched, "
                  f"{v['unused_bytes_per_token'] / 1e3:.1f} kB read for no neuron used, {v['misses_per_token']} "
                  f"bundles read on demand; queue depth mean {v['queue_depth_mean']}, max {v['queue_depth_max']}")
    if r.get("ppl_python_engine"):
        print(f"{'python engine':>18} ppl {r['ppl_python_engine']['ppl']:.3f} ({r['ppl_python_engine']['source']})")
    for k, t in r.get("targets", {}).items():
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        print(f"target {k} ({t['of']}): {t['ratio']} (<= {t['target']}) {status}")
    for row in d.get("bytes_by_sparsity", []):
        llama = row.get("floor_ms_with_llamacpp_compute")
        print(f"  sparsity {row['sparsity']:.2f}: {row['bytes_needed_per_token'] / 1e6:6.2f} MB/token, "
              f">= {row['io_ms_at_seq_bw']:.2f} ms at the measured sequential bandwidth"
              + ("" if llama is None else f"; overlapped with llama.cpp's compute: {llama:.2f} ms"))
    for n in r.get("notes", []):
        print(("WARNING: " if "NOT VERIFIED" in n or "different ids" in n else "note: ") + n)
    if "png" in r:
        print(f"plot: {r['png']}")
