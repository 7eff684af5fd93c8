"""`ripple bench kernels --rpc/--tracker`: the kernel benchmark run on a device over TVM RPC.

Each TVM variant of android_host.bench_kernels (sparse fp16/int8 with the default and, when
the target's tuning database has them, tuned knobs; the dense baseline) is built for the
device's target, uploaded and loaded there, and timed there by TVM's time_evaluator with the
same cache flush before every call (cold, as on a phone per token). The weights, x and the
active sets are the local benchmark's (same seed), so rows line up with a local run; each
output is downloaded and checked against numpy on the host. The DRAM roofline is measured on
the device with compile.bandwidth's streaming kernel. torch rows are absent: a phone runs no
Python.

The JSON is the local benchmark's, plus "device", "session", "complete" and "error": when the
device stops answering, the rows measured so far are kept and the run is marked incomplete.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .bench_kernels import FRACTIONS
from .rpc import Endpoint, RemoteError, Session, open_session


def remote_module(session: Session, executable, target: str, name: str):
    """Export a compiled module for `target`, upload it, load it on the device.

    The uploaded file is named by its content: writing over a library the server has already
    loaded changes the pages it has mapped (its next load of that name crashes it)."""
    from ..compile.targets import export_library
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        export_library(executable, path, target)
        tag = hashlib.blake2b(path.read_bytes(), digest_size=6).hexdigest()
        name = f"{path.stem}-{tag}{path.suffix}"
        if name not in session.modules:
            session.upload(path, name)
    return session.load_module(name)


def remote_time(session: Session, rmod, args: list, repeat: int, cold: bool = True,
                what: str = "kernel") -> float:
    """Median seconds of one call of rmod's main on the device (time_evaluator there)."""
    from ..compile.timing import FLUSH
    dev = session.cpu()
    ev = session.call(f"time_evaluator {what}", lambda: rmod.time_evaluator(
        "main", dev, number=1, repeat=repeat, f_preproc=FLUSH if cold else ""))
    return float(session.call(f"timing {what}", ev, *args).median)


def remote_dram_bandwidth(session: Session, target: str, mib: int = 256, repeat: int = 7,
                          cold: bool = False) -> float:
    """compile.bandwidth.dram_read_bandwidth, measured on the device."""
    import tvm

    from ..compile.bandwidth import _LANES, _ROW, _stream_sum
    from ..compile.targets import make_target
    rmod = remote_module(session, tvm.compile(_stream_sum(), target=make_target(target)), target,
                         "stream_sum.so")
    rows = max(1, mib * (1 << 20) // (_ROW * 4))
    a = session.tensor(np.ones((rows, _ROW // _LANES, _LANES), "float32"))
    b = session.tensor(np.zeros((rows, _LANES), "float32"))
    session.call("stream warm-up", session.call("lookup main", rmod.__getitem__, "main"), b, a)
    sec = remote_time(session, rmod, [b, a], repeat, cold, f"stream {mib} MiB")
    return rows * _ROW * 4 / sec


def _reference(spec, raw, x):
    from ..layout.bundle import decode_bundles
    b = decode_bundles(spec, raw)
    u = b.up @ x + (b.up_bias if b.up_bias is not None else 0)
    a = (b.gate @ x) / (1 + np.exp(-(b.gate @ x))) * u if b.gate is not None else np.maximum(u, 0)
    return a @ b.down_t


def bench_kernels_remote(session: Session, target: str = "android-arm64", model: str | None = None,
                         layer: int | None = None, db: str | None = None, fractions=FRACTIONS,
                         repeat: int = 20, seed: int = 0, progress: bool = True,
                         stream_mib: int = 256, on_row=None, compare_local: bool = False) -> dict:
    """The benchmark on the session's device; `on_row(row)` is called after each measured row.
    compare_local (a server on this machine): each point is also timed here right after the
    device, on the same compiled module and inputs ("local_us" per row)."""
    from ..compile.build import build_dense, build_sparse, knobs_for
    from ..compile.ffn import bundle_bytes_moved, dense_bytes_moved
    from ..compile.schedule import DEFAULT
    from ..compile.targets import runs_here, target_dict
    from ..compile.timing import time_call
    from ..compile.tuning_db import default_db_path, load_db, workload_key
    from ..layout.bundle import BundleSpec, encode_bundles
    from ..tuning.kernels import kernel_view
    from .bench_kernels import _headline, benchmark_layer

    if compare_local and not runs_here(target):
        raise ValueError(f"--compare-local: code built for {target} does not run here; use --target host "
                         "with a server on this machine")
    path, desc, layer = benchmark_layer(model, layer, fractions, repeat)
    lw, act, d, n = desc.layers[layer], desc.activation, desc.d_model, desc.d_ffn
    bias = lw.b_up is not None
    db_path = db or default_db_path(target)
    rng = np.random.default_rng(seed)          # the local benchmark's x and sets
    x_np = rng.standard_normal(d).astype(np.float32)
    sets = {f: np.sort(rng.choice(n, max(1, int(round(f * n))), replace=False)) for f in fractions}
    rows, tuning, bw, error = [], {}, [], None
    dense_sec = None
    t0 = time.perf_counter()
    bar = tqdm(total=2 * len(fractions) + 1, desc=f"kernels on {session.name}", unit="point",
               file=sys.stderr, disable=not progress)

    def row(variant, f, k, sec, nbytes, err):
        rows.append({"variant": variant, "fraction": f, "k": int(k), "us": sec * 1e6,
                     "bytes": int(nbytes), "max_rel_err": err, "threads": None})
        if compare_local:
            rows[-1].update(local_us=local["us"], remote_over_local=sec * 1e6 / local["us"],
                            same_output_as_local=local["same_output"])
        bar.update(1)
        if on_row:
            on_row(rows[-1])

    local = {}

    def timed(rmod, args, y, ref, what, lib=None, host_args=None):
        sec = remote_time(session, rmod, args, repeat, True, what)
        out = session.call(f"download y of {what}", y.numpy)
        if compare_local:
            local["us"] = time_call(lib, host_args, repeat) * 1e6
            local["same_output"] = bool(np.array_equal(out, host_args[-1].numpy()))
        return sec, float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))

    try:
        bw.append(_bandwidth(session, target, stream_mib))
        x = session.tensor(x_np)
        y = session.tensor(np.zeros(d, np.float32))
        for dtype in ("fp16", "int8"):
            spec = BundleSpec(act, d, dtype, bias)
            bundles = encode_bundles(spec, lw.w_up, lw.w_down.T, lw.w_gate, lw.b_up)
            tuned, is_tuned = knobs_for(spec, target, db_path)
            variants = {"default": DEFAULT}
            if is_tuned:
                variants["tuned"] = tuned
                rec = load_db(db_path)["workloads"][workload_key(spec)]
                tuning[dtype] = {k: rec[k] for k in ("knobs", "us", "default_us", "speedup")}
                bar.total += len(fractions)
            for name, knobs in variants.items():
                lib = build_sparse(spec, target, knobs)
                rmod = remote_module(session, lib, target, f"sparse-{dtype}-{name}.so")
                for f, ids in sets.items():
                    raw = bundles[ids]
                    w = session.tensor(kernel_view(spec, raw))
                    sec, err = timed(rmod, [x, w, y], y, _reference(spec, raw, x_np),
                                     f"sparse {dtype} {name} k={len(ids)}", lib,
                                     _host([x_np, kernel_view(spec, raw), np.zeros(d, np.float32)]))
                    row(f"tvm-sparse-{dtype}-{name}", f, len(ids), sec, bundle_bytes_moved(spec, len(ids)), err)
        lib = build_dense(act, d, n, bias, target)
        rmod = remote_module(session, lib, target, "dense-fp16.so")
        mats = ([lw.w_gate] if act == "swiglu" else []) + [lw.w_up] + ([lw.b_up] if bias else []) + [lw.w_down]
        mats = [np.ascontiguousarray(m, dtype=np.float16) for m in mats]
        dargs = [x] + [session.tensor(m) for m in mats] + [y]
        spec = BundleSpec(act, d, "fp16", bias)
        ref = _reference(spec, encode_bundles(spec, lw.w_up, lw.w_down.T, lw.w_gate, lw.b_up), x_np)
        dense_sec, err = timed(rmod, dargs, y, ref, "dense fp16", lib,
                               _host([x_np, *mats, np.zeros(d, np.float32)]))
        row("tvm-dense-fp16", 1.0, n, dense_sec, dense_bytes_moved(act, d, n, bias), err)
        bw.append(_bandwidth(session, target, stream_mib))
    except RemoteError as e:
        error = str(e)
    finally:
        bar.close()

    bw_max = max((max(b.values()) for b in bw), default=None)
    for r in rows:
        r["roofline_us"] = r["bytes"] / bw_max * 1e6 if bw_max else None
        r["roofline_ratio"] = r["us"] / r["roofline_us"] if bw_max else None
    out = {
        "device": session.name, "session": session.label, "complete": error is None, "error": error,
        "model": str(path), "layer": layer,
        "dims": {"d_model": d, "d_ffn": n, "activation": act, "up_bias": bias},
        "target": target_dict(target),
        "method": "TVM time_evaluator on the device over RPC, median of repeat calls, each after "
                  "flushing every weight buffer from the caches (cold: DRAM)",
        "repeat": repeat, "fractions": list(fractions),
        "dram_read_GBps": bw_max / 1e9 if bw_max else None,
        "dram_read_GBps_runs": [{k: v / 1e9 for k, v in b.items()} for b in bw],
        "host_load_average": os.getloadavg()[0],
        "dense_us": dense_sec * 1e6 if dense_sec else None,
        "tuning": tuning, "tuning_db": str(db_path),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    if dense_sec:
        out.update(_headline(rows, dense_sec * 1e6))
    return out


def _host(arrays: list) -> list | None:
    import tvm
    return [tvm.runtime.tensor(a) for a in arrays]


def _bandwidth(session: Session, target: str, stream_mib: int = 256) -> dict:
    """Both of bench_kernels' ways, on the device (see bench_kernels._bandwidth)."""
    return {f"stream_{stream_mib}MiB": remote_dram_bandwidth(session, target, mib=stream_mib),
            "cold_8MiB": remote_dram_bandwidth(session, target, mib=8, cold=True, repeat=20)}


def bench_kernels_remote_cmd(endpoint: Endpoint, target: str, json_out: str, model: str | None = None,
                             layer: int | None = None, db: str | None = None, fractions=FRACTIONS,
                             repeat: int = 20, timeout: float = 60.0, name: str | None = None,
                             stream_mib: int = 256, on_row=None, compare_local: bool = False) -> dict:
    """Open the session, run, write the JSON (also when the device was lost midway) and PNG."""
    from .bench_kernels import plot
    from ..atomic_file import write_json
    if not Path(json_out).resolve().parent.is_dir():
        raise ValueError(f"--json {json_out}: folder {Path(json_out).parent} does not exist")
    with open_session(endpoint, timeout, name) as s:
        res = bench_kernels_remote(s, target, model, layer, db, fractions, repeat,
                                   stream_mib=stream_mib, on_row=on_row, compare_local=compare_local)
    write_json(json_out, res)
    if res["rows"]:
        plot(res, Path(json_out).with_suffix(".png"))
    return res



def register(bench_sub) -> None:
    """`ripple bench kernels` (android_host.bench_kernels' parser) with the flags that time its
    TVM variants on a device; without them it runs here."""
    from . import bench_kernels
    from .rpc import add_remote_args
    p = bench_kernels.register(bench_sub)
    add_remote_args(p, "the TVM variants")
    p.set_defaults(run=_run)


def _run(args) -> None:
    from .bench_kernels import run_local
    from .rpc import remote_endpoint
    return run_remote(args) if remote_endpoint(args) else run_local(args)


def run_remote(args) -> None:
    """`ripple bench kernels --rpc/--tracker ...` (flags: android_host.rpc.add_remote_args)."""
    from .bench_kernels import print_table
    from .rpc import remote_endpoint
    res = bench_kernels_remote_cmd(remote_endpoint(args), args.target, args.json, args.model, args.layer,
                                   args.db, args.fractions, args.repeat, args.rpc_timeout, args.device_name,
                                   compare_local=args.compare_local)
    if res["rows"] and res["dram_read_GBps"]:
        print_table(res)
    if res["rows"] and "local_us" in res["rows"][0]:
        print("the same modules and inputs timed here, right after the device (us):")
        for r in res["rows"]:
            print(f"  {r['variant']:<26} {r['fraction']:>5.0%}  remote {r['us']:8.1f}  local "
                  f"{r['local_us']:8.1f}  remote/local {r['remote_over_local']:.3f}"
                  f"{'' if r['same_output_as_local'] else '  OUTPUT DIFFERS'}")
    if not res["complete"]:      # the CLI prints this as its one error line, exit 2
        raise RemoteError(f"{res['error']} [{len(res['rows'])} rows kept in {args.json}, marked incomplete]")
    print(f"device {res['device']} via {res['session']}: wrote {args.json}")
