"""`ripple bench kernels`: per-token FFN time of one layer vs the fraction of active neurons.

Side by side, in one run, on one layer of the model's real weights (default: the embedded
SmolLM2-135M, d=576, n=1536, SwiGLU):
  tvm-sparse-{dtype}-{default,tuned}     the compiled kernel on k gathered bundles, per --dtype
                                          (fp16, int8 by default; q4 on request)
  tvm-dense-fp16                          the whole FFN from matrices in their usual layout
  torch-fp16                              the engine's torch backend: decode bundles + matmuls
  torch-f32                               matmuls on weights kept as float32 (no decode)
(torch at its own thread count and at one, the faster, since OpenMP on a busy machine stalls)
Everything is timed cold (caches flushed before each call: per token, a layer's weights come
from DRAM), and held to a DRAM roofline: the bytes a variant must read over the read
bandwidth a TVM streaming kernel measures in the same run (the higher of a 256 MiB pass and a
flushed 8 MiB pass, the regime the kernels run in).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..atomic_file import save_figure

FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)
DTYPES = ("fp16", "int8", "q4", "q4d8")


def register(bench_sub) -> None:
    p = bench_sub.add_parser("kernels", help="FFN kernel time vs active fraction: TVM sparse "
                             "(default/tuned schedule, fp16/int8/q4), TVM dense, torch; DRAM roofline")
    p.add_argument("--model", help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M GGUF)")
    p.add_argument("--layer", type=int, help="layer whose weights are used (default: the middle one)")
    p.add_argument("--db", help="tuning database (default: build/tuning/kernels-host.json)")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--repeat", type=int, default=20, help="timed calls per point (median)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["fp16", "int8"],
                   help="bundle encodings of the sparse kernels (q4: d_model a multiple of 32)")
    p.add_argument("--json", required=True, help="results (a PNG is written beside it)")
    p.set_defaults(run=run_local)
    return p


def run_local(args) -> None:
    """`ripple bench kernels` on this machine (android_host.remote_kernels adds the device's
    flags and times the TVM variants there when they are given)."""
    from ..atomic_file import write_json
    res = bench_kernels(args.model, args.layer, args.db, args.fractions, args.repeat,
                        dtypes=tuple(args.dtype))
    write_json(args.json, res)
    png = plot(res, Path(args.json).with_suffix(".png"))
    print_table(res)
    print(f"wrote {args.json} and {png}")


def benchmark_layer(model: str | None, layer: int | None, fractions, repeat: int):
    """(model path, ModelDesc, layer index) the kernel benchmarks time, their flags checked
    first; the local and the device benchmark share it."""
    from ..tuning.checkpoint import default_model_path, load_model

    if repeat < 3:
        raise ValueError(f"--repeat {repeat}: use at least 3")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"--fractions {bad}: each must be in (0, 1]")
    path = model or default_model_path()
    desc = load_model(path)
    layer = desc.n_layers // 2 if layer is None else layer
    if not 0 <= layer < desc.n_layers:
        raise ValueError(f"--layer {layer}: the model has layers 0..{desc.n_layers - 1}")
    return path, desc, layer


def bench_kernels(model: str | None = None, layer: int | None = None, db: str | None = None,
                  fractions=FRACTIONS, repeat: int = 20, seed: int = 0,
                  dtypes: tuple[str, ...] = ("fp16", "int8")) -> dict:
    import torch
    import tvm

    from ..compile.bandwidth import dram_read_bandwidth
    from ..compile.build import build_dense, build_sparse, knobs_for
    from ..compile.ffn import bundle_bytes_moved, dense_bytes_moved
    from ..compile.schedule import DEFAULT
    from ..compile.targets import target_dict
    from ..compile.timing import flush, time_call, tvm_backed
    from ..compile.tuning_db import default_db_path, load_db, workload_key
    from ..layout.bundle import BundleSpec, decode_bundles, encode_bundles
    from ..tuning.kernels import kernel_view

    path, desc, layer = benchmark_layer(model, layer, fractions, repeat)
    lw, act, d, n = desc.layers[layer], desc.activation, desc.d_model, desc.d_ffn
    bias = lw.b_up is not None
    db_path = db or default_db_path("host")
    load_avg = [os.getloadavg()]
    bw = [_bandwidth(dram_read_bandwidth)]

    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal(d).astype(np.float32)
    x = tvm.runtime.tensor(x_np)
    y = tvm.runtime.tensor(np.zeros(d, np.float32))
    sets = {f: np.sort(rng.choice(n, max(1, int(round(f * n))), replace=False)) for f in fractions}
    rows, tuning = [], {}

    def reference(spec, raw):
        b = decode_bundles(spec, raw)
        u = b.up @ x_np + (b.up_bias if b.up_bias is not None else 0)
        a = (b.gate @ x_np) / (1 + np.exp(-(b.gate @ x_np))) * u if b.gate is not None else np.maximum(u, 0)
        return a @ b.down_t

    def row(variant, f, k, sec, nbytes, err=None, threads=None):
        rows.append({"variant": variant, "fraction": f, "k": int(k), "us": sec * 1e6,
                     "bytes": int(nbytes), "max_rel_err": err, "threads": threads})

    for dtype in dtypes:
        spec = BundleSpec(act, d, dtype, bias)
        bundles = encode_bundles(spec, lw.w_up, lw.w_down.T, lw.w_gate, lw.b_up)
        tuned, is_tuned = knobs_for(spec, "host", db_path)
        variants = {"default": DEFAULT}
        if is_tuned:
            variants["tuned"] = tuned
            rec = load_db(db_path)["workloads"][workload_key(spec)]
            tuning[dtype] = {k: rec[k] for k in ("knobs", "us", "default_us", "speedup", "trials",
                                                 "tune_seconds", "fractions")}
        for name, knobs in variants.items():
            lib = build_sparse(spec, "host", knobs)
            for f, ids in sets.items():
                raw = bundles[ids]
                w = tvm.runtime.tensor(kernel_view(spec, raw))
                sec = time_call(lib, [x, w, y], repeat)
                ref = reference(spec, raw)
                err = float(np.abs(y.numpy() - ref).max() / max(np.abs(ref).max(), 1e-12))
                row(f"tvm-sparse-{dtype}-{name}", f, len(ids), sec, bundle_bytes_moved(spec, len(ids)), err)

        if dtype == "fp16":
            for f, ids in sets.items():
                t_raw, raw = tvm_backed(bundles[ids])
                hx = torch.from_numpy(x_np)[None]

                def torch_ffn():     # the engine's torch backend: decode the bytes, then matmuls
                    b = decode_bundles(spec, raw)
                    return _torch_math(hx, torch.from_numpy(b.gate) if b.gate is not None else None,
                                       torch.from_numpy(b.up), torch.from_numpy(b.down_t),
                                       None if b.up_bias is None else torch.from_numpy(b.up_bias))
                sec, threads = _cold_best_threads(torch_ffn, [t_raw], flush, repeat)
                row("torch-fp16", f, len(ids), sec, bundle_bytes_moved(spec, len(ids)), threads=threads)

                parts = decode_bundles(spec, bundles[ids])
                mats = [m for m in (parts.gate, parts.up, parts.down_t) if m is not None]
                backed = [tvm_backed(m) for m in mats]
                tm = [torch.from_numpy(a) for _, a in backed]
                bias_t = None if parts.up_bias is None else torch.from_numpy(parts.up_bias)

                def torch_f32():     # weights kept as float32: no decode, twice the bytes
                    return _torch_math(hx, tm[0] if len(tm) == 3 else None, tm[-2], tm[-1], bias_t)
                sec, threads = _cold_best_threads(torch_f32, [t for t, _ in backed], flush, repeat)
                row("torch-f32", f, len(ids), sec, sum(a.nbytes for a in tm) + 8 * d, threads=threads)

    # The dense baseline: fp16 matrices in their usual layout, n fixed.
    dense = build_dense(act, d, n, bias, "host")
    mats = ([lw.w_gate] if act == "swiglu" else []) + [lw.w_up] + ([lw.b_up] if bias else []) + [lw.w_down]
    dargs = [x] + [tvm.runtime.tensor(np.ascontiguousarray(m, dtype=np.float16)) for m in mats] + [y]
    dense_sec = time_call(dense, dargs, repeat)
    ref = reference(BundleSpec(act, d, "fp16", bias), encode_bundles(
        BundleSpec(act, d, "fp16", bias), lw.w_up, lw.w_down.T, lw.w_gate, lw.b_up))
    dense_err = float(np.abs(y.numpy() - ref).max() / max(np.abs(ref).max(), 1e-12))
    row("tvm-dense-fp16", 1.0, n, dense_sec, dense_bytes_moved(act, d, n, bias), dense_err)

    bw.append(_bandwidth(dram_read_bandwidth))
    load_avg.append(os.getloadavg())
    bw_max = max(max(b.values()) for b in bw)
    for r in rows:
        r["roofline_us"] = r["bytes"] / bw_max * 1e6
        r["roofline_ratio"] = r["us"] / r["roofline_us"]

    out = {
        "model": str(path), "layer": layer,
        "dims": {"d_model": d, "d_ffn": n, "activation": act, "up_bias": bias},
        "target": target_dict("host"),
        "method": "TVM time_evaluator / perf_counter, median of repeat calls, each after "
                  "flushing every weight buffer from the caches (cold: DRAM)",
        "repeat": repeat, "fractions": list(fractions),
        "dram_read_GBps": bw_max / 1e9,
        "dram_read_GBps_runs": [{k: v / 1e9 for k, v in b.items()} for b in bw],
        "load_average_start_end": [list(l) for l in load_avg],
        "dense_us": dense_sec * 1e6,
        "tuning": tuning, "tuning_db": str(db_path),
        "rows": rows,
    }
    out.update(_headline(rows, dense_sec * 1e6))
    return out


def _torch_math(hx, gate, up, down_t, up_bias):
    import torch
    u = hx @ up.T
    if up_bias is not None:
        u = u + up_bias
    c = torch.nn.functional.silu(hx @ gate.T) * u if gate is not None else torch.relu(u)
    return c @ down_t


def _bandwidth(measure) -> dict:
    """Read bandwidth two ways (see compile.bandwidth); the roofline uses the highest seen.
    On the machine this was written on, a flushed 8 MiB buffer streams at ~2x the rate of a
    256 MiB one (14 vs 7 GB/s): fewer TLB misses, and the kernels' buffers are that size."""
    return {"stream_256MiB": measure(mib=256), "cold_8MiB": measure(mib=8, cold=True, repeat=20)}


def _cold(fn, tensors, flush, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        flush(*tensors)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _cold_best_threads(fn, tensors, flush, repeat: int) -> tuple[float, int]:
    """torch at its own thread count and at one thread, the faster: on a busy 2-core machine
    two OpenMP threads can be 100x slower than one (measured: 16 ms vs 0.12 ms for a GEMV)."""
    import torch
    own = torch.get_num_threads()
    best = (_cold(fn, tensors, flush, repeat), own)
    if own > 1:
        torch.set_num_threads(1)
        try:
            best = min(best, (_cold(fn, tensors, flush, repeat), 1))
        finally:
            torch.set_num_threads(own)
    return best


def _headline(rows: list[dict], dense_us: float) -> dict:
    at20 = [r for r in rows if abs(r["fraction"] - 0.2) < 1e-9 and r["variant"].startswith("tvm-sparse")]
    if not at20:
        return {"ratio_20pct_vs_dense": None, "roofline_ratio_20pct": None}
    best = min(at20, key=lambda r: r["us"])
    fp16 = min((r["us"] for r in at20 if "-fp16-" in r["variant"]), default=None)
    return {"ratio_20pct_vs_dense": best["us"] / dense_us,
            "roofline_ratio_20pct": best["roofline_ratio"],
            "best_sparse_20pct": best["variant"],
            "ratio_20pct_vs_dense_same_dtype_fp16": None if fp16 is None else fp16 / dense_us,
            "targets": {"ratio_20pct_vs_dense": 0.3, "roofline_ratio_20pct": 2.0}}


def print_table(res: dict) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in res["rows"]))
    fr = res["fractions"]
    print(f"FFN of layer {res['layer']} (d={res['dims']['d_model']}, n={res['dims']['d_ffn']}, "
          f"{res['dims']['activation']}), cold; DRAM read {res['dram_read_GBps']:.1f} GB/s")
    print(f"{'variant':<28}" + "".join(f"{f:>9.0%}" for f in fr) + "   (us; x roofline)")
    for v in variants:
        cells = {r["fraction"]: r for r in res["rows"] if r["variant"] == v}
        line = "".join(f"{cells[f]['us']:9.1f}" if f in cells else f"{'':9}" for f in fr)
        rr = "".join(f" {cells[f]['roofline_ratio']:.2f}" if f in cells else "" for f in fr)
        print(f"{v:<28}{line}  ({rr.strip()})")
    if res.get("ratio_20pct_vs_dense") is not None:
        print(f"20% active: best sparse ({res['best_sparse_20pct']}) / dense TVM = "
              f"{res['ratio_20pct_vs_dense']:.3f} (target <= 0.3); x roofline = "
              f"{res['roofline_ratio_20pct']:.2f} (target <= 2)")


def plot(res: dict, png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for v in dict.fromkeys(r["variant"] for r in res["rows"]):
        pts = sorted((r["fraction"], r["us"]) for r in res["rows"] if r["variant"] == v)
        if v.startswith("tvm-dense"):
            ax.axhline(pts[0][1], color="k", ls="--", label=f"{v} (all {res['dims']['d_ffn']})")
            continue
        ax.plot(*zip(*pts), marker="o", label=v)
    for dt, ls in (("fp16", ":"), ("int8", "-."), ("q4", "--")):
        pts = sorted((r["fraction"], r["roofline_us"]) for r in res["rows"]
                     if r["variant"] == f"tvm-sparse-{dt}-default")
        if pts:
            ax.plot(*zip(*pts), color="grey", ls=ls, label=f"DRAM roofline, {dt} bundles")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("active fraction of FFN neurons")
    ax.set_ylabel("time per token, one layer (us, cold)")
    ax.set_title(f"sparse FFN kernels, d={res['dims']['d_model']} n={res['dims']['d_ffn']}; "
                 f"DRAM {res['dram_read_GBps']:.1f} GB/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png, dpi=120)
    return png
