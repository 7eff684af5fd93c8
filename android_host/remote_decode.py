"""Whole tokens decoded on a device over TVM RPC: `ripple bench e2e --rpc HOST:PORT --app APP`
(or `--tracker HOST:PORT --key KEY`).

The APP folder (`ripple compile --target ...`) goes to the device's work folder: the model
library and the flash runtime under names tagged by their content (a server hands back the
library it already loaded for a path), the flash files likewise, and a runtime config that
names them by their paths there. The device then runs what an app runs: the runtime opened,
the Relax VM made, the params and the KV cache in its DRAM, the prefill, and the decode loop,
each call through `ripple.rt.step` (compile/native/timed_step.c), which times it by the
device's clock and takes the greedy id there. So a token costs one round trip, and neither
the link's latency nor the logits' way back is in its time.

A device lost midway keeps the tokens it decoded: `complete` false, and the error.
With `--compare-local`, the same APP (or `--local-app`, built for this machine from the same
layout) decodes the same prompt here with APP/ripple-run, and the JSON holds `remote` and
`local`, each with `ids` and `per_token_ms_median`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..runtime_py.app_session import BUFFERS, BYTES_READ, IO_WAIT, O_DIRECT, PINNED, STATS
from .bench_io import BenchError
from .rpc import RemoteError, Session, open_session

STEP_OUT = 2 + STATS      # ripple.rt.step's out: seconds, the next id, then ripple.rt.stats


def _tag(path: Path) -> str:
    h = hashlib.blake2b(digest_size=6)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _tagged(path: Path) -> str:
    return f"{path.stem}-{_tag(path)}{path.suffix}"


def upload_app(s: Session, app: Path, info: dict, progress=None) -> dict:
    """Put what decoding needs into the device's work folder; returns the names used there.
    runtime.bin is rewritten to name the flash files by their paths on the device."""
    from ..compile.runtime_config import read_runtime_config, write_runtime_config
    cfg = read_runtime_config(app / info["runtime_config"])
    names = {}
    for key, local in (("runtime", app / info["runtime_library"]), ("model", app / info["library"]),
                       ("bundles", app / cfg.bundles_file if cfg.bundles_file else None),
                       ("whole", app / cfg.whole_file if cfg.whole_file else None)):
        if local is None:
            continue
        if not local.is_file():
            raise BenchError(f"{local}: missing; compile the APP again (ripple compile)")
        names[key] = _tagged(local)
        if progress:
            progress(f"upload {local.name} ({local.stat().st_size / 1e6:.1f} MB) as {names[key]}")
        s.upload(local, names[key])
    paths = {k: s.workpath(v) for k, v in names.items()}
    cfg = dataclasses.replace(cfg, bundles_file=paths.get("bundles"), whole_file=paths.get("whole"))
    with tempfile.TemporaryDirectory(prefix="ripple-rpc-") as tmp:
        local_cfg = Path(tmp) / "runtime.bin"
        write_runtime_config(local_cfg, cfg)
        names["config"] = _tagged(local_cfg)
        s.upload(local_cfg, names["config"])
    paths["config"] = s.workpath(names["config"])
    return {"names": names, "paths": paths}


@dataclasses.dataclass
class RemoteRun:
    """What the device decoded; cut short (complete False, error set) when it was lost."""
    prompt_ids: list[int]
    ids: list[int] = dataclasses.field(default_factory=list)
    prefill_ms: float | None = None
    token_ms: list[float] = dataclasses.field(default_factory=list)
    io_ms: list[float] = dataclasses.field(default_factory=list)
    bytes_read: list[int] = dataclasses.field(default_factory=list)
    dram: dict = dataclasses.field(default_factory=dict)
    o_direct: bool | None = None
    complete: bool = False
    error: str = ""


def remote_generate(s: Session, app: Path, info: dict, prompt_ids: list[int], n_ids: int,
                    progress=None, on_token=None) -> RemoteRun:
    """Greedy on the device: prefill, then decode until n_ids ids (the first from the prefill's
    logits, as ripple-run) or an end-of-sequence id. RemoteError mid-loop ends the run with
    what it has."""
    from ..compile.app_params import read_params
    run = RemoteRun(list(prompt_ids))
    up = upload_app(s, app, info, progress)
    s.load_module(up["names"]["runtime"])     # its constructor registers ripple.rt.* in the server
    fns = {}
    for name in ("open", "close", "stats", "step"):
        try:
            fns[name] = s.get_function(f"ripple.rt.{name}")
        except AttributeError:                 # TVM's "Module has no function"
            raise BenchError(f"{app / info['runtime_library']}: no ripple.rt.{name} on the device (a runtime "
                             f"built by an older ripple); compile the APP again") from None
    s.call("ripple.rt.open", fns["open"], up["paths"]["config"])
    try:
        return _decode(s, info, up, read_params(app, info["params"]), run, n_ids, fns, progress, on_token)
    finally:
        if s.alive:
            try:
                s.call("ripple.rt.close", fns["close"])
            except RemoteError:
                pass


def _decode(s: Session, info: dict, up: dict, params: list, run: RemoteRun, n_ids: int, fns: dict, progress,
            on_token) -> RemoteRun:
    from tvm import relax

    from .bench_app import kv_bytes
    exe = s.load_module(up["names"]["model"])
    vm = s.call("make the VM", relax.VirtualMachine, exe, s.cpu())
    if progress:
        progress(f"params to the device ({sum(a.nbytes for a in params) / 1e6:.1f} MB)")
    dev_params = [s.tensor(np.ascontiguousarray(a), "params to device") for a in params]
    tup = s.call("params tuple", s.get_function("ffi.Array"), *dev_params)
    L, two, _, kvd = info["kv"]["shape"]
    max_len = len(run.prompt_ids) + n_ids
    kv = s.tensor(np.zeros((L, two, max_len, kvd), info["kv"]["dtype"]), "KV cache to device")
    step = fns["step"]
    out = s.tensor(np.zeros(STEP_OUT, np.float64), "step out to device")
    stats = s.tensor(np.zeros(STATS, np.float64))
    s.call("ripple.rt.stats", fns["stats"], stats)
    before = s.call("download stats", stats.numpy)
    eos = set(info["eos_token_ids"])
    try:
        tokens = s.tensor(np.asarray(run.prompt_ids, np.int32), "prompt to device")
        s.call("prefill", step, vm.module, "prefill", tokens, kv, 0, tup, out,
               timeout=s.timeout + len(run.prompt_ids))
        o = s.call("download step", out.numpy)
        run.prefill_ms = float(o[0]) * 1e3
        before = o[2:]
        run.ids.append(int(o[1]))
        token = s.tensor(np.zeros(1, np.int32))
        pos = len(run.prompt_ids)
        while run.ids[-1] not in eos and len(run.ids) < n_ids:
            s.call("token to device", token.copyfrom, np.array([run.ids[-1]], np.int32))
            s.call(f"decode at {pos}", step, vm.module, "decode", token, kv, pos, tup, out)
            o = s.call("download step", out.numpy)
            d = o[2:] - before
            before = o[2:]
            run.token_ms.append(float(o[0]) * 1e3)
            run.io_ms.append(float(d[IO_WAIT]) * 1e3)
            run.bytes_read.append(int(d[BYTES_READ]))
            run.ids.append(int(o[1]))
            pos += 1
            if on_token:
                on_token(len(run.ids))
        run.complete = True
    except RemoteError as e:
        run.error = str(e)
        return run
    run.o_direct = bool(before[O_DIRECT])
    run.dram = {"params": int(info["params"]["bytes"]), "kv": kv_bytes(info, max_len),
                "runtime_pinned": int(before[PINNED]), "runtime_buffers": int(before[BUFFERS])}
    return run


def summary(run_ids: list[int], token_ms: list[float], io_ms: list[float] | None,
            bytes_read: list[int] | None, prefill_ms: float | None, n_prompt: int, dram: dict) -> dict:
    med = lambda xs: round(float(statistics.median(xs)), 3) if xs else None   # noqa: E731
    return {"ids": run_ids, "tokens_timed": len(token_ms), "per_token_ms_median": med(token_ms),
            "io_wait_ms_median": med(io_ms or []),
            "bytes_read_per_token": int(np.mean(bytes_read)) if bytes_read else None,
            "prefill_tokens_per_s": round(n_prompt / prefill_ms * 1e3, 1) if prefill_ms else None,
            "dram_bytes": {**dram, "total": sum(dram.values())} if dram else None,
            "token_ms": [round(x, 3) for x in token_ms]}


def _apps_for(model: str | None, target: str, compare_local: bool, cdir: Path) -> tuple[Path, Path | None]:
    """APP folders of the model for the device's target and, to compare, for this machine:
    compiled once from one layout (the offline steps run with their defaults) into cdir."""
    from ..tuning.checkpoint import default_model_path
    from .app_cmds import compile_cmd, offline_steps
    path = Path(model or default_model_path())
    work = cdir / f"work-{path.stem}"
    wanted = [target] + (["host"] if compare_local and target != "host" else [])
    apps = {}
    for t in wanted:
        out = cdir / f"app-{path.stem}-{t}"
        if not (out / "app.json").is_file():
            layout = offline_steps(str(path), work)
            print(f"bench e2e: compiling the APP for {t} into {out}", file=sys.stderr)
            compile_cmd(str(out), layout=str(layout), target=t)
        apps[t] = out
    return apps[target], apps.get("host") if compare_local else None


def bench_e2e_remote_cmd(endpoint, app: str | None = None, model: str | None = None, target: str = "android-arm64",
                         json_out: str | None = None, prompt: str | None = None, tokens: int = 48,
                         threads: int | None = None, compare_local: bool = False, local_app: str | None = None,
                         timeout: float = 60.0, name: str | None = None, cache_dir: str = "build/cache/e2e",
                         prompt_ids: list[int] | None = None, on_token=None) -> dict:
    """`ripple bench e2e --rpc/--tracker`: the APP decoded on the device, and with compare_local
    the same here; writes the JSON (also when the device was lost midway) and its PNG."""
    from ..atomic_file import write_result
    from ..compile.app_files import load_app_json
    from .app_cmds import prompt_ids as tokenize
    from .bench_app import native_worker
    from .bench_e2e import DEFAULT_PROMPT

    if json_out and Path(json_out).exists() and Path(json_out).is_dir():
        raise BenchError(f"--json {json_out}: is a folder; name a file")
    cdir = Path(cache_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    if app:
        remote_app = Path(app).resolve()
        host_app = Path(local_app).resolve() if local_app else remote_app
    else:
        remote_app, host_app = _apps_for(model, target, compare_local, cdir)
    info = load_app_json(remote_app)
    if compare_local:
        local_info = load_app_json(host_app)
        if local_info.get("runner") is None:
            raise BenchError(f"--compare-local: {host_app} is compiled for {local_info['target']}, not this "
                             f"machine; give --local-app APP compiled for host from the same layout")
    if prompt_ids is None:
        from ..tuning.checkpoint import load_tokenizer
        prompt_ids = tokenize(load_tokenizer(info["model"]["source"]), prompt or DEFAULT_PROMPT, True)
    n_ids = tokens + 1                      # the first id comes from the prefill
    say = lambda m: print(f"bench e2e --rpc: {m}", file=sys.stderr)   # noqa: E731
    with open_session(endpoint, timeout, name) as s:     # an unreachable device fails first
        label = s.label
        try:
            with tqdm(total=n_ids, desc="bench e2e: device tokens", unit="tok", file=sys.stderr) as bar:
                def token_done(k: int) -> None:
                    bar.update(k - bar.n)
                    if on_token:
                        on_token(k)
                run = remote_generate(s, remote_app, info, prompt_ids, n_ids, say, token_done)
        except RemoteError as e:
            run = RemoteRun(list(prompt_ids), error=str(e))
    out = {"device": name or endpoint.default_name, "session": label, "target": info["target"],
           "app": str(remote_app), "model": info["model"]["name"], "prompt_tokens": len(prompt_ids),
           "prompt_ids": prompt_ids, "tokens": tokens, "tokens_done": len(run.token_ms),
           "complete": run.complete, "error": run.error,
           "timing": "each call timed on the device by ripple.rt.step (its clock); the link is not in it",
           "o_direct": run.o_direct,
           "remote": summary(run.ids, run.token_ms, run.io_ms, run.bytes_read, run.prefill_ms,
                             len(prompt_ids), run.dram)}
    if compare_local and run.complete:
        r = native_worker(str(host_app), prompt_ids, tokens, threads or os.cpu_count() or 1)
        out["local"] = summary(r["ids"], r["token_ms"], r["io_ms"], r["bytes_read"], r["prefill_ms"],
                               len(prompt_ids), {k: v for k, v in r["resident"].items() if k != "total"})
        out["local"]["app"] = str(host_app)
        out["local"]["runner"] = "ripple-run"
        out["ids_identical"] = out["remote"]["ids"] == out["local"]["ids"]
        out["remote_over_local"] = round(out["remote"]["per_token_ms_median"] /
                                         out["local"]["per_token_ms_median"], 3)
    if json_out:
        write_result(json_out, out, plot if run.token_ms else None)
    return out


def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in ("remote", "local"):
        if key in r and r[key]["token_ms"]:
            ax.plot(r[key]["token_ms"], label=f"{key}: median {r[key]['per_token_ms_median']:.1f} ms")
    ax.set_xlabel("token")
    ax.set_ylabel("ms (device clock)")
    ax.set_title(f"{r['model']} on {r['device']} ({r['target']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_remote(r: dict) -> None:
    state = "complete" if r["complete"] else f"INCOMPLETE ({r['tokens_done']} of {r['tokens']} tokens): {r['error']}"
    print(f"device {r['device']} via {r['session']} ({r['target']}): {state}")
    print(f"{'where':>7} {'ms/token':>9} {'I/O wait':>9} {'MB read':>8} {'prompt tok/s':>13} {'MB DRAM':>8}")
    for key in ("remote", "local"):
        if key not in r:
            continue
        v = r[key]
        mb = v["bytes_read_per_token"] / 1e6 if v["bytes_read_per_token"] is not None else float("nan")
        dram = v["dram_bytes"]["total"] / 1e6 if v["dram_bytes"] else float("nan")
        fmt = lambda x: f"{x:9.2f}" if x is not None else f"{'-':>9}"   # noqa: E731
        print(f"{key:>7} {fmt(v['per_token_ms_median'])} {fmt(v['io_wait_ms_median'])} {mb:8.1f} "
              f"{v['prefill_tokens_per_s'] or float('nan'):13.1f} {dram:8.1f}")
    if "remote_over_local" in r:
        print(f"remote/local {r['remote_over_local']:.3f}; ids identical: {r['ids_identical']}")


def register(bench_sub) -> None:
    """`ripple bench e2e` (android_host.bench_e2e's parser) with the flags that decode on a
    device; without them it runs here."""
    from . import bench_e2e
    from .rpc import add_remote_args
    p = bench_e2e.register(bench_sub)
    g = add_remote_args(p, "the decode (the APP's library and flash runtime, on the device's flash)")
    g.add_argument("--app", help="the APP folder to run there (default: compile --model for --target "
                                 "into --cache-dir)")
    g.add_argument("--local-app", help="with --compare-local and an APP for another target: the same "
                                       "layout compiled for host")
    p.set_defaults(run=_run)


def _run(args) -> None:
    from .rpc import remote_endpoint
    if not remote_endpoint(args):
        if args.app or args.local_app:
            raise BenchError("--app and --local-app go with --rpc or --tracker (the local bench "
                             "compiles its own APPs)")
        from .bench_e2e import run_local
        return run_local(args)
    r = bench_e2e_remote_cmd(remote_endpoint(args), args.app, args.model, args.target, args.json, args.prompt,
                             args.tokens, args.threads, args.compare_local, args.local_app, args.rpc_timeout,
                             args.device_name, args.cache_dir)
    print_remote(r)
    if not r["complete"]:        # the CLI prints this as its one error line, exit 2
        raise RemoteError(f"{r['error']} [{r['tokens_done']} of {r['tokens']} tokens kept in {args.json}, "
                          "marked incomplete]")
