"""`ripple bench io --rpc/--tracker`: the I/O strategies replayed on a device's own flash.

The host does what android_host.bench_io does up to the reads: the workload's masks, the
placements, one flash file per placement, every strategy's plans for the held-out tokens,
planned with the DEVICE's storage profile (probed on it now by its native reader, or given
with --device-profile). The flash files are uploaded into the RPC server's work folder (the
phone's app storage), checked there byte for byte against the host's copy on one token's
extents, and then the device's native reader (compile/native) reads every strategy's
extents layer by layer, token by token, strategies interleaved, and times each layer's reads
on the device, so the link's latency is not in the figures.

With --compare-local (a server on this machine: the stand-in phone), the same plans are also
read here from the host's copies, interleaved with the remote reads so that all see the same
background load: by the same native reader loaded in this process (remote vs local: what the
RPC path changes, which should be nothing: the device times its own reads) and by
runtime_py.reader.FlashReader (the native reader vs the Python one).

The JSON is bench_io's (strategies, lower bound, ratios, model error), labelled with the
device's name, plus "complete"/"error"/"tokens_done": when the device stops answering, the
tokens measured so far are kept and the run is marked incomplete.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..runtime_py.strategies import get_strategy
from .bench_io import DEFAULT_STRATEGIES, BenchError, Workload, plan_strategies
from .rpc import Endpoint, RemoteError, open_session


def _synced_copy(src: str, dst: str) -> str:
    """dst, a copy of src on the disk itself (fsync'd), so O_DIRECT reads of it are of the disk."""
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    return dst


def _local_bytes(path: str, extents: np.ndarray) -> np.ndarray:
    with open(path, "rb") as f:
        return np.frombuffer(b"".join(os.pread(f.fileno(), int(n), int(o)) for o, n in extents), np.uint8)


def replay_on_device(reader: "DeviceReader", wl: Workload, strategies=DEFAULT_STRATEGIES, tokens: int = 64,
                     warmup: int = 16, queue_depth: int = 32, budget: float = 0.10, storage=None,
                     cache_dir: str | os.PathLike = "build/cache/io", compare_local: bool = False,
                     on_token: Callable[[int], None] | None = None, progress: bool = True,
                     quick_probe: bool = False) -> dict:
    """Replay every strategy's plans on the reader's device; `storage` is the device's profile
    (None: probe it now). `on_token(t)` is called after each measured token."""
    from ..runtime_py.reader import FlashReader
    from .bench_io import ratios
    from .remote_probe import probe_device

    if tokens < 1 or warmup < 0 or queue_depth < 1:
        raise BenchError("--tokens and --queue-depth must be at least 1, --warmup at least 0")
    if not 0.0 <= budget < 1.0:
        raise BenchError(f"--budget {budget}: a fraction of FFN bytes in [0, 1)")
    L, T, n = wl.heldout.shape
    if T < warmup + tokens:
        raise BenchError(f"{T} held-out tokens, but --warmup {warmup} + --tokens {tokens} asked; "
                         "ask for fewer or profile more held-out tokens")
    cdir = Path(cache_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    bb = wl.spec.bundle_bytes
    budget_bytes = int(budget * L * n * bb)
    t_start = time.perf_counter()
    error, done, uploads, check = None, 0, {}, {}
    storage_meta = {"source": "given"} if storage is not None else {}
    strats, traces, tuned = [], {}, {}
    ms = {}
    local_ms = {}
    try:
        if storage is None:
            storage, storage_meta = probe_device(reader, quick=quick_probe, progress=progress)
        strats, _, layouts, traces, tuned = plan_strategies(
            wl, [get_strategy(s) for s in strategies], wl.heldout[:, :warmup + tokens], warmup,
            queue_depth, budget_bytes, storage, cdir)
        for s in strats:                               # one upload per distinct flash file
            p = str(layouts[s.name].path)
            if p not in uploads:
                uploads[p] = reader.put(p, f"{Path(p).parent.name}.rflash")
        for s in strats:                               # same bytes there as here
            ext = next((e for e in traces[s.name].extents(0) if len(e)), np.zeros((0, 2), np.int64))
            p = str(layouts[s.name].path)
            _, got = reader.read_extents(uploads[p], ext, queue_depth, fetch=True)
            check[s.name] = {"extents": int(len(ext)), "bytes": int(got.size),
                             "match": bool(np.array_equal(got, _local_bytes(p, ext)))}
            if not check[s.name]["match"]:
                raise BenchError(f"{uploads[p]} on {reader.where} differs from {p} (strategy {s.name}, "
                                 "token 0); the upload is damaged: re-run")
        ms = {s.name: np.zeros(tokens) for s in strats}
        locals_, native, copies = {}, None, []
        try:
            if compare_local:
                from .remote_reader import open_reader   # imports TVM: not at parser build time
                native = open_reader(None, "host")
                local_ms = {k: {s.name: np.zeros(tokens) for s in strats} for k in ("native", "python")}
                for s in strats:
                    p = str(layouts[s.name].path)
                    if p not in locals_:
                        # The Python reader reads its own copy: had both local readers read p, its
                        # blocks would be read twice a token, and a cache below O_DIRECT (a VM's disk
                        # image, a drive's cache) would favour them over the upload, read once.
                        copies.append(f"{p}.python-reader")
                        locals_[p] = FlashReader(_synced_copy(p, copies[-1]), queue_depth)
            name = reader.session.name if reader.session else "here"
            for t in tqdm(range(tokens), desc=f"bench io on {name}", unit="token", file=sys.stderr,
                          disable=not progress):
                for k in range(len(strats)):
                    s = strats[(t + k) % len(strats)]
                    p = str(layouts[s.name].path)
                    ext = traces[s.name].extents(t)
                    runs = [(ms[s.name], lambda: sum(reader.read_extents(uploads[p], e, queue_depth)[0]
                                                     for e in ext))]
                    if compare_local:
                        runs += [(local_ms["native"][s.name],
                                  lambda: sum(native.read_extents(p, e, queue_depth)[0] for e in ext)),
                                 (local_ms["python"][s.name], lambda: sum(locals_[p].read(e).seconds for e in ext))]
                    # Readers take turns going first: the one after another on the same file may
                    # find its blocks in a cache below O_DIRECT (a VM's disk image, a drive's cache).
                    for i in range(len(runs)):
                        out_ms, read = runs[(t + i) % len(runs)]
                        out_ms[t] = read() * 1e3
                done = t + 1
                if on_token:
                    on_token(t)
        finally:
            for r in locals_.values():
                r.close()
            for c in copies:
                Path(c).unlink(missing_ok=True)
    except RemoteError as e:
        error = str(e)

    seq_bps = storage.seq_MBps * 1e6 if storage is not None else None
    res = {}
    for s in (strats if done else []):
        res[s.name] = _summary(s, traces[s.name], ms[s.name][:done], bb, storage, queue_depth, seq_bps,
                               tuned[s.name])
        if compare_local:
            remote = ms[s.name][:done]
            for k in ("native", "python"):
                local = local_ms[k][s.name][:done]
                res[s.name][f"local_{k}_per_token_io_ms"] = round(float(local.mean()), 3)
                res[s.name][f"remote_over_local_{k}"] = round(float(remote.mean() / local.mean()), 3)
                # a stall of one read moves a mean over a few tokens; the median shows the rest
                res[s.name][f"remote_over_local_{k}_median"] = round(float(np.median(remote) /
                                                                           np.median(local)), 3)
    out = {
        "device": reader.session.name if reader.session else "this process (native reader)",
        "session": reader.where, "complete": error is None, "error": error,
        "model": wl.model, "workload": wl.name, "sparsity": wl.sparsity,
        "tokens": tokens, "tokens_done": done, "warmup": warmup, "queue_depth": queue_depth,
        "dram_budget_bytes": budget_bytes, "dram_budget_fraction": budget,
        "ffn_bytes": int(L * n * bb), "bundle_bytes": bb, "layers": L, "neurons": n,
        "lower_bound_ms": min((v["lower_bound_ms"] for v in res.values()), default=None),
        "seq_MBps": round(seq_bps / 1e6, 1) if seq_bps else None, "fio_seq_MBps": None,
        "reader": {"engine": "native pthreads (compile/native), on the device", "o_direct": True,
                   "queue_depth": queue_depth, "target": reader.target},
        "device_storage": {**storage_meta, "table": storage.to_json() if storage is not None else None},
        "bytes_check": check, "uploaded": {Path(k).parent.name: v for k, v in uploads.items()},
        "strategies": res,
        "workload_meta": wl.meta,
    }
    if compare_local:
        out["local_readers"] = {"native": "compile/native loaded in this process",
                                "python": "runtime_py.reader.FlashReader"}
    out["ratios"] = ratios(res, out["lower_bound_ms"]) if res else {}
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    out["host_load_average"] = os.getloadavg()[0]
    return out


def _summary(s, tr, m: np.ndarray, bb: int, storage, queue_depth: int, seq_bps: float, tuned: dict) -> dict:
    """bench_io's per-strategy figures over the first len(m) measured tokens."""
    from ..runtime_py import storage_model as sm
    t = len(m)
    needed = tr.active[:t].sum(1) * bb
    missed = (tr.active[:t] - tr.hits[:t]).sum(1) * bb
    modelled = sm.replay(storage, [tr.extents(i) for i in range(t)], queue_depth) * 1e3
    return {
        "per_token_io_ms": round(float(m.mean()), 3),
        "per_token_io_ms_median": round(float(np.median(m)), 3),
        "effective_bw_MBps": round(float(needed.sum() / (m.sum() / 1e3) / 1e6), 1),
        "reads_per_token": round(float(tr.reads()[:t].mean()), 1),
        "bytes_read_per_token": int(tr.bytes_read()[:t].mean()),
        "bytes_needed_per_token": int(needed.mean()),
        "bytes_missed_per_token": int(missed.mean()),
        "cache_hit_rate": round(float(tr.hits[:t].sum() / max(tr.active[:t].sum(), 1)), 4),
        "lower_bound_ms": round(float(missed.mean() / seq_bps * 1e3), 3),
        "modelled_per_token_io_ms": round(float(modelled.mean()), 3),
        "model_error": round(float(modelled.mean() / m.mean() - 1), 4),
        "policy": s.describe(), "tuning": tuned,
        "cache_entries": tr.meta["cache_entries"],
        "per_token_ms": [round(float(x), 3) for x in m],
    }


def bench_io_remote_cmd(endpoint: Endpoint, target: str = "android-arm64", json_out: str | None = None,
                        model: str = "smollm2", workload: str | Workload = "real", sparsity: float | None = None,
                        profile: str | None = None, tokens: int = 64, warmup: int = 16,
                        queue_depth: int = 32, budget: float = 0.10, strategies=DEFAULT_STRATEGIES,
                        device_profile: str | None = None, cache_dir: str = "build/cache/io",
                        sets: str = "oracle", predictor: str | None = None, timeout: float = 60.0,
                        name: str | None = None, compare_local: bool = False, on_token=None,
                        quick_probe: bool = False) -> dict:
    """Open the session, replay, write the JSON (also when the device was lost midway) + PNG.
    `workload`: a name in bench_io.WORKLOADS, or a Workload."""
    from .bench_io import WORKLOADS, plot, predicted_sets
    from .devices import load_device

    if not isinstance(workload, Workload) and workload not in WORKLOADS:
        raise BenchError(f"--workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    if json_out and not Path(json_out).resolve().parent.is_dir():
        raise BenchError(f"--json {json_out}: folder {Path(json_out).parent} does not exist")
    storage = load_device(device_profile).storage if device_profile else None
    cdir = Path(cache_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    with open_session(endpoint, timeout, name) as s:     # an unreachable device fails first
        try:
            from .remote_reader import open_reader
            reader = open_reader(s, target)
        except RemoteError as e:
            raise RemoteError(f"{e} (nothing measured)") from None
        wl = workload if isinstance(workload, Workload) else WORKLOADS[workload](model, sparsity, profile, cdir)
        if sets == "predicted":
            predicted_sets(wl, predictor)
        wl.meta.setdefault("sets", "oracle")
        out = replay_on_device(reader, wl, strategies, tokens, warmup, queue_depth, budget, storage, cdir,
                               compare_local, on_token, quick_probe=quick_probe)
    if device_profile:
        out["device_storage"]["profile"] = device_profile
    if json_out:
        from ..atomic_file import write_result
        write_result(json_out, out, plot if out["strategies"] else None)
    return out


def print_replay(r: dict) -> None:
    from .bench_io import print_table
    state = "complete" if r["complete"] else f"INCOMPLETE ({r['tokens_done']} of {r['tokens']} tokens): {r['error']}"
    print(f"device {r['device']} via {r['session']}: {state}")
    if not r["strategies"]:
        return
    print_table(r)
    if any("local_native_per_token_io_ms" in v for v in r["strategies"].values()):
        print("same plans read here, interleaved (ms per token):")
        print(f"{'strategy':>9} {'remote':>8} {'local native':>13} {'local python':>13} {'remote/native':>14}")
        for k, v in r["strategies"].items():
            print(f"{k:>9} {v['per_token_io_ms']:8.2f} {v['local_native_per_token_io_ms']:13.2f} "
                  f"{v['local_python_per_token_io_ms']:13.2f} {v['remote_over_local_native']:14.3f}")


def register(bench_sub) -> None:
    """`ripple bench io` (android_host.bench_io's parser) with the flags that run its reads on a
    device; without them it runs here."""
    from . import bench_io
    from .rpc import add_remote_args
    p = bench_io.register(bench_sub)
    g = add_remote_args(p, "the reads (the device's native reader, on its own flash)")
    g.add_argument("--device-profile", help="the device's storage profile to plan with (default: probe "
                   "the device now with its native reader)")
    g.add_argument("--quick-probe", action="store_true", help="probe the device with the quick grid (seconds)")
    p.set_defaults(run=_run)


def _run(args) -> None:
    from .bench_io import run_local
    from .rpc import remote_endpoint
    return run_remote(args) if remote_endpoint(args) else run_local(args)


def run_remote(args) -> None:
    """`ripple bench io --rpc/--tracker ...`."""
    from .rpc import remote_endpoint
    r = bench_io_remote_cmd(remote_endpoint(args), args.target, args.json, args.model, args.workload,
                            args.sparsity, args.profile, args.tokens, args.warmup, args.queue_depth,
                            args.budget, args.strategies, args.device_profile, args.cache_dir, args.sets,
                            args.predictor, args.rpc_timeout, args.device_name, args.compare_local,
                            quick_probe=args.quick_probe)
    print_replay(r)
    if not r["complete"]:        # the CLI prints this as its one error line, exit 2
        raise RemoteError(f"{r['error']} [{r['tokens_done']} of {r['tokens']} tokens kept in {args.json}, "
                          "marked incomplete]")
