"""`ripple bench placement`: reads per held-out token under each placement strategy, side by
side, on real and synthetic workloads, plus the search time on a 7B-shaped model.

Every strategy fits on a workload's calibration masks and is measured on its held-out
masks (other text), never on the tokens it was fitted on. A read is a maximal run of
active slots (what `runtime_py.planner` turns into one request before access collapse).

Workloads:
- a model (the embedded SmolLM2 by default, or any GGUF / HF folder the loaders read):
  profiled on self-sampled calibration text and measured on held-out text (other prompts,
  other seed); profiles are cached under the cache folder, so re-runs skip the model, and
  text is sampled once per model (other sparsities re-profile the recorded sequences);
- a profile file from `ripple profile` (`--profile`);
- `relu-synthetic`: ReLU-regime masks (OPT-6.7B-like) from `tuning.synthetic`, labelled
  synthetic in the JSON.
Adding a model workload is one line in MODEL_WORKLOADS (name -> (path, sparsity)).

Beside the strategies, each workload reports `ours` fitted on its held-out tokens and
measured on them (in-sample, labelled as such): not a placement, but how low the search
can go on those very tokens, which tells whether a target on held-out reads is reachable.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic_file import save_figure
from ..tuning.relu_tiny import default_folder as relu_tiny_folder, require_folder as require_relu_tiny

STRATEGY_ORDER = ("identity", "frequency", "ripple", "ours")
# name -> (model path, None for the embedded model; sparsity, None for the profile's default
# rule: the highest within 10% held-out perplexity of dense).
MODEL_WORKLOADS: dict[str, tuple[str | None, float | None]] = {
    "smollm2": (None, None),
    "smollm2-s0.8": (None, 0.8),
    # `make relu-model` trains it (half an hour, so not a default); profiled on its own
    # calibration files and measured on its held-out files (tuning.relu_tiny).
    "relu-tiny": (str(relu_tiny_folder()), None),
}
# What the label column and the plot call a model workload (default "real").
MODEL_LABELS = {"relu-tiny": "real, small (trained here)"}
SYNTHETIC_WORKLOADS = ("relu-synthetic",)
DEFAULT_WORKLOADS = ("smollm2", "smollm2-s0.8", "relu-synthetic")
# The targets, checked in the same run.
TARGET_OURS_OVER_RIPPLE = 0.85
TARGET_RIPPLE_7B_S = 60.0
TARGET_OURS_7B_S = 120.0


@dataclass
class Workload:
    name: str
    label: str                      # "real" | "synthetic"
    source: str
    calib: list                     # per layer (T, n) bool
    heldout: list                   # per layer (T', n) bool
    meta: dict = field(default_factory=dict)
    planted: list | None = None     # synthetic only: per layer, the generator's own order


class PlacementBenchError(ValueError):
    pass


# --- workloads -----------------------------------------------------------------------------

def _fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint for cache keys: names, sizes and mtimes of its files."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(str(path.resolve()).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cached_profile(model: str | None, sparsity: float | None, calib_tokens: int,
                   heldout_tokens: int, seq_len: int, seed: int, cache: Path) -> Path:
    """A profile of `model` at `sparsity` (None: the profile's default rule) from the cache,
    or profiled now and cached. Text is sampled once per model: other sparsities re-profile
    the token sequences that the default profile recorded."""
    from ..tuning.checkpoint import default_model_path

    model_path = Path(model) if model else default_model_path()
    if not model_path.exists():
        raise PlacementBenchError(f"{model_path}: no such model; pass a GGUF file or a Hugging Face folder")
    cache.mkdir(parents=True, exist_ok=True)
    key = _key({"model": _fingerprint(model_path), "sparsity": sparsity, "calib": calib_tokens,
                "heldout": heldout_tokens, "seq_len": seq_len, "seed": seed})
    path = cache / f"profile-{model_path.stem}-{key}.npz"
    if path.is_file():
        return path
    from ..tuning.calibration import CALIBRATION_PROMPTS, HELDOUT_PROMPTS, sample_sequences
    from ..tuning.checkpoint import load_model, load_tokenizer
    from ..tuning.forward import to_torch
    from ..tuning.profile import load_profile, run_profile, save_profile

    from ..tuning.relu_tiny import SPLIT_TEXT_NOTE, split_sequences

    text = "self-sampled (temperature 0.8, top-50); disjoint prompt lists and seeds"
    if sparsity is not None:
        base = load_profile(cached_profile(model, None, calib_tokens, heldout_tokens, seq_len, seed, cache))
        calib, held = base.sequences("calib"), base.sequences("heldout")
        text = base.meta.get("text", text)
    tm = to_torch(load_model(model_path))
    own = None if sparsity is not None else split_sequences(model_path, calib_tokens, heldout_tokens, seq_len)
    if own is not None:          # a folder that records text it was not trained on (relu-tiny)
        (calib, held), text = own, SPLIT_TEXT_NOTE
    elif sparsity is None:
        tok = load_tokenizer(model_path)
        calib = sample_sequences(tm, tok, CALIBRATION_PROMPTS, calib_tokens, seq_len, seed, "calibration text")
        held = sample_sequences(tm, tok, HELDOUT_PROMPTS, heldout_tokens, seq_len, seed + 1, "held-out text")
    p = run_profile(tm, calib, held, sparsity=sparsity, meta={"text": text, "model": str(model_path)})
    save_profile(p, path)
    return path


def profile_workload(name: str, path: str | Path, label: str = "real") -> Workload:
    from ..tuning.profile import load_profile

    p = load_profile(path)
    calib, held = p.masks("calib"), p.masks("heldout")
    return Workload(name, label, str(p.meta.get("model", path)), list(calib), list(held),
                    {"profile": str(path), "sparsity": p.sparsity, "criterion": p.criterion,
                     "text": p.meta.get("text")})


def synthetic_workload(name: str, spec, calib_tokens: int, heldout_tokens: int, seed: int) -> Workload:
    from tqdm import tqdm

    from ..tuning.synthetic import planted_order, relu_layer

    calib, held = [], []
    for l in tqdm(range(spec.n_layers), desc=f"{name}: generating masks", unit="layer"):
        c, h = relu_layer(spec, l, calib_tokens, heldout_tokens, seed)
        calib.append(c)
        held.append(h)
    return Workload(name, "synthetic", "ripple.tuning.synthetic (not a real model)", calib, held,
                    spec.describe(), [planted_order(spec, l, seed) for l in range(spec.n_layers)])


# --- measurement ---------------------------------------------------------------------------

def _warm_up(strategies, cfg) -> None:
    """Compile the numba kernels (or load them from numba's cache) outside the timings."""
    import numpy as np

    from ..tuning.placement import STRATEGIES

    rng = np.random.default_rng(0)
    for density in (0.03, 0.4):                    # pair counting and matrix-product paths
        m = rng.random((64, 96)) < density
        for s in strategies:
            STRATEGIES[s](m, cfg)


def measure(w: Workload, strategies, cfg, reference: bool = True) -> dict:
    import numpy as np

    from ..tuning.placement import place, read_stats

    out = {"label": w.label, "source": w.source, "layers": len(w.calib),
           "neurons": int(w.calib[0].shape[1]), "calib_tokens": int(w.calib[0].shape[0]),
           "heldout_tokens": int(w.heldout[0].shape[0]),
           "heldout_active_fraction": float(np.mean([h.mean() for h in w.heldout])),
           **({"meta": w.meta} if w.meta else {}), "strategies": {}}
    for s in strategies:
        cpu = time.process_time()
        p = place(w.calib, s, cfg)
        cpu = time.process_time() - cpu
        held, cal = read_stats(w.heldout, p.perm), read_stats(w.calib, p.perm)
        out["strategies"][s] = {
            "reads_per_token": held["reads_per_token"],
            "reads_per_token_per_layer": held["reads_per_token"] / len(w.calib),
            "mean_run_len": held["mean_run_len"],
            "search_s": float(p.search_s.sum()),
            # CPU seconds of all threads: a figure that other jobs on the machine inflate less
            "search_cpu_s": cpu,
            "calib_reads_per_token": cal["reads_per_token"],
        }
    if reference and "ours" in strategies:
        # What the search reaches on the held-out tokens when it may fit on them: no placement
        # fitted elsewhere should expect fewer reads, so it bounds what a target can ask.
        p = place(w.heldout, "ours", cfg, progress=False)
        out["reference_ours_fit_on_heldout"] = {
            "reads_per_token": read_stats(w.heldout, p.perm)["reads_per_token"],
            "note": "in-sample: fitted on the very held-out tokens it is measured on; not a deployable placement"}
    if reference:
        from tqdm import tqdm

        from ..tuning.placement import runs_lower_bound
        t0 = time.perf_counter()
        bound = sum(runs_lower_bound(h) for h in tqdm(w.heldout, desc=f"{w.name}: lower bound", unit="layer"))
        out["reads_lower_bound"] = {
            "reads_per_token": float(bound), "seconds": time.perf_counter() - t0,
            "note": "no order can beat this, not even one fitted on these held-out tokens: active "
                    "slots minus an LP bound on the adjacent co-activations (Lagrangian over forests "
                    "with degree <= 2, certified over all pairs; tuning.placement_bound)"}
    if reference and w.planted is not None:
        out["reference_planted_order"] = {
            "reads_per_token": read_stats(w.heldout, w.planted)["reads_per_token"],
            "note": "the generator's own clusters (hot first, clusters by popularity, members by "
                    "firing probability); known only because the workload is synthetic"}
    st = out["strategies"]
    if "identity" in st:
        for v in st.values():
            v["reads_vs_identity"] = v["reads_per_token"] / st["identity"]["reads_per_token"]
    if "ripple" in st and "ours" in st:
        out["ours_over_ripple"] = st["ours"]["reads_per_token"] / st["ripple"]["reads_per_token"]
    if "ripple" in st:
        for ref in ("reference_ours_fit_on_heldout", "reference_planted_order", "reads_lower_bound"):
            if ref in out:
                out[ref]["over_ripple"] = out[ref]["reads_per_token"] / st["ripple"]["reads_per_token"]
    return out


def timing_7b(strategies, cfg, layers: int, neurons: int, density: float, calib_tokens: int,
              heldout_tokens: int, seed: int) -> dict:
    """Search time on a 7B-shaped model (Llama-2-7B: 32 x 11008) with synthetic masks."""
    from ..tuning.synthetic import SyntheticSpec

    spec = SyntheticSpec(n=neurons, n_layers=layers, density=density)
    t0 = time.perf_counter()
    w = synthetic_workload(f"7B-shape {layers}x{neurons}", spec, calib_tokens, heldout_tokens, seed)
    gen_s = time.perf_counter() - t0
    r = measure(w, [s for s in strategies if s in ("ripple", "ours")], cfg, reference=False)
    return {"shape": [layers, neurons], "masks": "synthetic (tuning.synthetic)", "density": density,
            "calib_tokens": calib_tokens, "heldout_tokens": heldout_tokens,
            "generation_s": gen_s, "spec": spec.describe(),
            "strategies": {s: {"search_s": v["search_s"], "search_s_per_layer": v["search_s"] / layers,
                               "search_cpu_s": v["search_cpu_s"], "reads_per_token": v["reads_per_token"]}
                           for s, v in r["strategies"].items()}}


def _targets(result: dict) -> dict:
    t = {"ours_over_ripple_max": TARGET_OURS_OVER_RIPPLE, "ripple_7b_s_max": TARGET_RIPPLE_7B_S,
         "ours_7b_s_max": TARGET_OURS_7B_S, "met": {}}
    for name, w in result["workloads"].items():
        if "ours_over_ripple" in w:
            t["met"][f"{name}: ours/ripple reads <= {TARGET_OURS_OVER_RIPPLE}"] = \
                w["ours_over_ripple"] <= TARGET_OURS_OVER_RIPPLE
    tm = result.get("timing_7b", {}).get("strategies", {})
    if "ripple" in tm:
        t["met"][f"7B ripple search < {TARGET_RIPPLE_7B_S:g} s"] = tm["ripple"]["search_s"] < TARGET_RIPPLE_7B_S
    if "ours" in tm:
        t["met"][f"7B ours search < {TARGET_OURS_7B_S:g} s"] = tm["ours"]["search_s"] < TARGET_OURS_7B_S
    return t


def plot(result: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(result["workloads"])
    timing = result.get("timing_7b")
    fig, axes = plt.subplots(1, 2 if timing else 1, figsize=(12 if timing else 8, 4.5), squeeze=False)
    ax = axes[0, 0]
    strategies = [s for s in STRATEGY_ORDER if any(s in result["workloads"][w]["strategies"] for w in names)]
    width = 0.8 / max(len(strategies), 1)
    x = np.arange(len(names))
    for i, s in enumerate(strategies):
        vals = [result["workloads"][w]["strategies"].get(s, {}).get("reads_per_token_per_layer", np.nan)
                for w in names]
        bars = ax.bar(x + (i - (len(strategies) - 1) / 2) * width, vals, width, label=s)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    bound = [result["workloads"][w].get("reads_lower_bound", {}).get("reads_per_token", np.nan)
             / result["workloads"][w]["layers"] for w in names]
    if not np.all(np.isnan(bound)):
        ax.hlines(bound, x - 0.42, x + 0.42, colors="k", linestyles="--", lw=1,
                  label="no order can beat this (LP bound)")
    ax.set_xticks(x, [f"{w}\n({result['workloads'][w]['label']})" for w in names])
    ax.set_ylabel("reads per held-out token, per layer")
    ax.set_title("Runs of active slots per token (fewer is better)")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.3)          # room for the legend above the bars
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    if timing:
        ax = axes[0, 1]
        ts = timing["strategies"]
        bars = ax.bar(list(ts), [v["search_s"] for v in ts.values()], color=["C2", "C3"][:len(ts)])
        ax.bar_label(bars, fmt="%.1f s")
        for s, lim in (("ripple", TARGET_RIPPLE_7B_S), ("ours", TARGET_OURS_7B_S)):
            if s in ts:
                ax.axhline(lim, ls="--", lw=0.8, color="gray")
                ax.text(-0.4, lim, f"{s} target {lim:g} s", va="bottom", fontsize=8, color="gray")
        ax.set_ylabel("search time, all layers (s)")
        ax.set_title(f"{timing['shape'][0]} x {timing['shape'][1]} (7B shape, synthetic masks)")
    fig.tight_layout()
    save_figure(fig, png)


def bench_placement(json_out: str, workloads=DEFAULT_WORKLOADS, model: str | None = None,
                    profile: str | None = None, strategies=STRATEGY_ORDER, k: int = 32,
                    calib_tokens: int = 1024, heldout_tokens: int = 512, seq_len: int = 128,
                    seed: int = 0, cache: str = "build/cache/placement", synthetic_layers: int = 4,
                    synthetic_neurons: int = 16384, timing: bool = True, timing_layers: int = 32,
                    timing_neurons: int = 11008, timing_density: float = 0.03) -> dict:
    from ..tuning.placement import SearchConfig, strategy_fn
    from ..tuning.synthetic import SyntheticSpec
    from ..atomic_file import write_json

    for s in strategies:
        strategy_fn(s)
    for what, v, least in (("--k", k, 2), ("--calib-tokens", calib_tokens, 2),
                           ("--heldout-tokens", heldout_tokens, 1),
                           ("--synthetic-layers", synthetic_layers, 1),
                           ("--synthetic-neurons", synthetic_neurons, 2),
                           ("--timing-layers", timing_layers, 1), ("--timing-neurons", timing_neurons, 2)):
        if v < least:
            raise PlacementBenchError(f"{what} {v}: must be at least {least}")
    if not 0.0 < timing_density < 1.0:
        raise PlacementBenchError(f"--timing-density {timing_density}: must be in (0, 1)")
    unknown = [w for w in workloads if w not in MODEL_WORKLOADS and w not in SYNTHETIC_WORKLOADS]
    if unknown:
        raise PlacementBenchError(f"unknown workload(s) {', '.join(unknown)}; known: "
                         f"{', '.join([*MODEL_WORKLOADS, *SYNTHETIC_WORKLOADS])} (or --model / --profile)")
    out = Path(json_out)
    if not out.parent.is_dir():
        raise PlacementBenchError(f"{json_out}: folder {out.parent} does not exist")
    cache_dir = Path(cache)
    cfg = SearchConfig(k=k)
    t_start = time.time()
    load_start = os.getloadavg()

    # Build every workload first (profiling may take minutes), then measure side by side.
    ws: list[Workload] = []
    for name in workloads:
        if name in MODEL_WORKLOADS:
            path, sparsity = MODEL_WORKLOADS[name]
            if name == "relu-tiny":
                require_relu_tiny(path)        # says `make relu-model`, not "no such model"
            prof = cached_profile(path, sparsity, calib_tokens, heldout_tokens, seq_len, seed, cache_dir)
            ws.append(profile_workload(name, prof, MODEL_LABELS.get(name, "real")))
        else:
            spec = SyntheticSpec(n=synthetic_neurons, n_layers=synthetic_layers)
            ws.append(synthetic_workload(name, spec, calib_tokens, heldout_tokens, seed))
    if model:
        prof = cached_profile(model, None, calib_tokens, heldout_tokens, seq_len, seed, cache_dir)
        ws.append(profile_workload(Path(model).stem, prof))
    if profile:
        ws.append(profile_workload(Path(profile).stem, profile))
    if not ws and not timing:
        raise PlacementBenchError("nothing to measure: name workloads, --model or --profile, or drop --no-timing")

    _warm_up(strategies, cfg)
    result: dict = {"bench": "placement", "argv": sys.argv[1:], "k": k, "cpus": os.cpu_count(),
                    "measure": "reads = maximal runs of active slots per held-out token, summed "
                               "over layers; mean_run_len = active bundles per read",
                    "workloads": {}}
    for w in ws:
        result["workloads"][w.name] = measure(w, strategies, cfg)
    if timing:
        result["timing_7b"] = timing_7b(strategies, cfg, timing_layers, timing_neurons, timing_density,
                                        calib_tokens, 256, seed)
    result["targets"] = _targets(result)
    result["wall_s"] = time.time() - t_start
    result["loadavg_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    return result


def print_table(r: dict) -> None:
    print(f"{'workload':18s} {'label':9s} {'strategy':9s} {'reads/tok':>10s} {'per layer':>9s} "
          f"{'run len':>7s} {'search s':>8s}")
    for name, w in r["workloads"].items():
        for s, v in w["strategies"].items():
            print(f"{name:18s} {w['label']:9s} {s:9s} {v['reads_per_token']:10.1f} "
                  f"{v['reads_per_token_per_layer']:9.1f} {v['mean_run_len']:7.3f} {v['search_s']:8.2f}")
        if "ours_over_ripple" in w:
            print(f"{name:18s} ours / ripple reads = {w['ours_over_ripple']:.3f}")
        for ref, what in (("reference_ours_fit_on_heldout", "ours fitted on the held-out tokens themselves"),
                          ("reference_planted_order", "the generator's planted order"),
                          ("reads_lower_bound", "no order can beat this (LP bound)")):
            if "over_ripple" in w.get(ref, {}):
                print(f"{name:18s} {what} / ripple = {w[ref]['over_ripple']:.3f} (reference)")
    t = r.get("timing_7b")
    if t:
        for s, v in t["strategies"].items():
            print(f"7B shape {t['shape'][0]}x{t['shape'][1]} (synthetic, {t['density']:.0%} active): "
                  f"{s} search {v['search_s']:.1f} s ({v['search_s_per_layer']:.2f} s/layer, "
                  f"{v['search_cpu_s']:.1f} CPU s)")
    for what, ok in r["targets"]["met"].items():
        print(f"target {'met    ' if ok else 'NOT met'}  {what}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", required=True, help="result file (a PNG plot is written beside it)")
    p.add_argument("--workloads", nargs="*", default=list(DEFAULT_WORKLOADS),
                   help=f"built-in workloads (default: {' '.join(DEFAULT_WORKLOADS)}); none: only --model/--profile")
    p.add_argument("--model", help="also: this GGUF / Hugging Face folder, profiled here (cached)")
    p.add_argument("--profile", help="also: the masks of this `ripple profile` file")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGY_ORDER), choices=list(STRATEGY_ORDER))
    p.add_argument("--k", type=int, default=32, help="candidate neighbours per neuron (default 32)")
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--heldout-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="build/cache/placement", help="where profiles and text are cached")
    p.add_argument("--synthetic-layers", type=int, default=4)
    p.add_argument("--synthetic-neurons", type=int, default=16384)
    p.add_argument("--no-timing", action="store_true", help="skip the 7B-shaped timing run")
    p.add_argument("--timing-layers", type=int, default=32)
    p.add_argument("--timing-neurons", type=int, default=11008)
    p.add_argument("--timing-density", type=float, default=0.03)


def run(args) -> None:
    r = bench_placement(args.json, args.workloads, args.model, args.profile, args.strategies, args.k,
                        args.calib_tokens, args.heldout_tokens, seed=args.seed, cache=args.cache,
                        synthetic_layers=args.synthetic_layers, synthetic_neurons=args.synthetic_neurons,
                        timing=not args.no_timing, timing_layers=args.timing_layers,
                        timing_neurons=args.timing_neurons, timing_density=args.timing_density)
    print_table(r)


def register(bench_sub) -> None:
    p = bench_sub.add_parser("placement", help="reads per held-out token by placement strategy; 7B search time")
    add_arguments(p)
    p.set_defaults(run=run)
