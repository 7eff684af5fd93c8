"""The compiled engine in `ripple bench e2e`: APP folders (android_host.app_build) built from the bench's
`ours` layout and cached beside it, run in a Python process through AppSession (`ours`,
`ours-dense`) or by the native runner APP/ripple-run, with no Python in its process (`native`);
held-out perplexity from the APP's own logits, one decode call per token.

An APP folder is named by what it is built from (AppRecipe: layout, DRAM budget, the device
profile file's hash, KV dtype, which layers are read whole, which sets), so a change to any of
them builds a new one and the old ones of the same checkpoint go.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .bench_io import BenchError, cache_key

APP_PREFIX = "app-"
STORAGE_PREFIX = "storage-"
# How each configuration's perplexity was measured (JSON `ppl_source`).
PPL_APP = ("the APP's own logits: each held-out sequence from an empty KV cache, its first token "
           "prefilled, then one decode call per token (teacher-forced), every logit scored")
PPL_NATIVE = "not measured: ripple-run decodes greedily; it runs the same APP as ours (ours' ppl)"
RUNNER_TIMEOUT_S = 1800


@dataclass(frozen=True)
class AppRecipe:
    """What one APP folder is built from; its cache key is made of exactly these."""
    layout_dir: str
    budget_mb: float              # whole layers pinned in DRAM (app_build._pinned_layers)
    storage_file: str             # device profile the collapse rule comes from (app_cmds.storage_rule)
    kv_dtype: str
    whole_layers: str             # app_build.WHOLE_LAYERS
    sets: str | None              # None: predicted when the layout has a predictor
    lookahead: int = 0            # sparse layers' reads issued this many layers early (app_build)
    profile: str | None = None    # the budget pins the bundles of sparse layers hottest on its text

    def key(self) -> str:
        sha = hashlib.sha256(Path(self.storage_file).read_bytes()).hexdigest()
        return cache_key(Path(self.layout_dir).name, f"{self.budget_mb:.6f}", sha, self.kv_dtype,
                         self.whole_layers, self.sets, self.lookahead, self.profile)


def save_storage(storage, cdir: Path, budget_bytes: int, details: dict) -> Path:
    """The run's measured StorageProfile as a device profile file (android_host.devices), named
    by its contents; the ones of earlier runs go (the APPs copy theirs)."""
    from .devices import Device, host_cpu_target, host_dram_bytes, save_device
    dev = Device("bench-e2e-probe", "measured", storage, host_dram_bytes(), int(budget_bytes),
                 host_cpu_target(), details)
    sha = hashlib.sha256(json.dumps(dev.to_json(), sort_keys=True).encode()).hexdigest()[:16]
    path = cdir / f"{STORAGE_PREFIX}{sha}.json"
    if not path.is_file():
        save_device(path, dev)
    for old in cdir.glob(f"{STORAGE_PREFIX}*.json"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def recipes(layout_dir: str, whole_copy: bool, budget_bytes: int, storage_file: Path, kv_dtype: str,
            configs, profile: str | None = None, lookahead: int = 0, ffn_bytes: int = 0) -> dict:
    """Per configuration, the APP it runs. ours and native: the layout as `ripple compile`
    builds it by default (layers read whole when there is a whole copy, else predicted sets),
    the DRAM budget as pinned whole layers, or as the sparse layers' hottest bundles on the
    profile's text. lookahead: ours with each sparse layer's reads issued `lookahead` layers
    early. ours-dram: ours with every FFN byte (`ffn_bytes`) in DRAM, read once at open: the
    same engine with nothing to read. ours-dense: every FFN byte read every token, no
    budget: every layer read whole from the copy, or every bundle (sets all) without one."""
    mb = budget_bytes / (1 << 20)
    ours = AppRecipe(layout_dir, mb, str(storage_file), kv_dtype, "auto", None, 0, profile)
    dense = AppRecipe(layout_dir, 0.0, str(storage_file), kv_dtype, "all" if whole_copy else "none",
                      None if whole_copy else "all")
    table = {"ours": ours, "native": ours, "ours-dense": dense,
             "lookahead": AppRecipe(layout_dir, mb, str(storage_file), kv_dtype, "none", None, lookahead, profile),
             "ours-dram": AppRecipe(layout_dir, ffn_bytes / (1 << 20), str(storage_file), kv_dtype, "auto", None)}
    return {c: table[c] for c in configs if c in table}


def app_path(cdir: Path, r: AppRecipe) -> Path:
    return cdir / f"{APP_PREFIX}{Path(r.layout_dir).name}-{r.key()}"


def prepare_apps(model: str, cdir: Path, wanted: dict, source_hash: str, predictor: str | None,
                 queue_depth: int, read_ahead: int) -> dict:
    """APP folder per configuration (name -> path), built when missing or unreadable; APPs of
    this checkpoint that no configuration of this run uses are removed."""
    from ..compile.app_files import AppError, load_app_json
    from .app_build import build_app
    from ..tuning.lookahead import LOOKAHEAD_FILE, beside
    from ..tuning.predictor import PREDICTOR_FILE
    from .app_cmds import storage_rule
    dirs = {name: app_path(cdir, r) for name, r in wanted.items()}
    keep = set(dirs.values())
    for old in list(cdir.glob(f"{APP_PREFIX}*")) + list(cdir.glob(f".{APP_PREFIX}*.tmp-*")):
        if old in keep or not old.is_dir():
            continue
        try:
            mine = old.name.startswith(".") or load_app_json(old)["model"]["source_hash"] == source_hash
        except (AppError, KeyError, TypeError):
            mine = True                   # unreadable: a build of ours that did not finish
        if mine:
            shutil.rmtree(old, ignore_errors=True)
    for name, r in wanted.items():
        out = dirs[name]
        try:
            load_app_json(out)
            continue
        except AppError:
            shutil.rmtree(out, ignore_errors=True)
        # app_build finds the predictor in the layout folder, as `ripple train-predictor --out
        # LAYOUT` leaves it; the bench trains it into its cache, keyed by the profile.
        if predictor and not (Path(r.layout_dir) / PREDICTOR_FILE).is_file():
            _link(Path(predictor), Path(r.layout_dir) / PREDICTOR_FILE)
        ahead = beside(predictor) if predictor else None
        if r.lookahead and ahead is not None and ahead.is_file():
            (Path(r.layout_dir) / LOOKAHEAD_FILE).unlink(missing_ok=True)
            _link(ahead, Path(r.layout_dir) / LOOKAHEAD_FILE)
        print(f"bench e2e: compiling the {name} APP into {out}", file=sys.stderr)
        # As `ripple compile --layout L --storage F` (app_cmds.compile_cmd), with the checkpoint given.
        gap, request, storage_file = storage_rule(r.storage_file, queue_depth, r.layout_dir)
        build_app(r.layout_dir, str(out), model=model, kv_dtype=r.kv_dtype, queue_depth=queue_depth,
                  read_ahead=read_ahead, budget_mb=r.budget_mb, collapse_gap_bytes=gap, max_request_bytes=request,
                  storage_file=storage_file, whole_layers=r.whole_layers, sets=r.sets, lookahead=r.lookahead,
                  profile=r.profile)
    return {name: str(d) for name, d in dirs.items()}


def describe(app_dir: str, recipe: AppRecipe) -> dict:
    """What an APP is, for the JSON's details: its recipe and what app.json says it does."""
    from ..compile.app_files import load_app_json
    info = load_app_json(app_dir)
    return {"dir": app_dir, "recipe": asdict(recipe), "layers": info["layers"], "sets": info["sets"],
            "sparsity": info["sparsity"], "io": info["io"], "kv_dtype": info["kv_dtype"],
            "compile_seconds": info["compile_seconds"], "total_bytes": info["total_bytes"]}


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


# ---------------------------------------------------------------- runs

def process_rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's peak RSS (VmHWM, as ripple-run reports it). Not getrusage's ru_maxrss:
    Linux carries that across exec, so a spawned worker would report its parent's peak (2.6 GB
    after the bench's profiling, for a worker whose RSS was 0.5 GB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/self/status has no VmHWM (not Linux?)")


def kv_bytes(info: dict, max_len: int) -> int:
    import numpy as np
    L, two, _, kvd = info["kv"]["shape"]
    return int(L) * int(two) * int(max_len) * int(kvd) * np.dtype(info["kv"]["dtype"]).itemsize


def app_worker(app_dir: str, prompt_ids: list[int], tokens: int, threads: int, seqs: list | None) -> dict:
    """The APP in this (spawned) process: prefill, then `tokens` timed decode calls (AppSession),
    what it holds in DRAM, and the held-out perplexity from its logits."""
    os.environ["TVM_NUM_THREADS"] = str(threads)      # before TVM's pool starts
    from ..runtime_py.app_session import AppSession
    with AppSession(app_dir, threads) as s:
        # ids = tokens + 1: the first id comes from the prefill, each next from one decode call.
        gen = s.generate(prompt_ids, tokens + 1)
        peak, rss = peak_rss(), process_rss()
        dram = s.dram_bytes(kv_bytes(s.info, len(prompt_ids) + tokens + 1))
        ppl = app_perplexity(s, seqs) if seqs else None
        o_direct, sets = s.o_direct, s.info["sets"]
    return {"token_ms": gen.token_ms, "io_ms": [st.io_wait_s * 1e3 for st in gen.steps],
            "bytes_read": [st.bytes_read for st in gen.steps], "bytes_needed": [st.bytes_needed for st in gen.steps],
            "active": [st.active for st in gen.steps], "outside_ms": gen.outside_ms,
            "prefetched_bytes": [st.prefetched_bytes for st in gen.steps], "misses": [st.misses for st in gen.steps],
            "unused_bytes": [st.unused_bytes for st in gen.steps],
            "queue_depth_mean": [st.queue_depth_mean for st in gen.steps],
            "queue_depth_max": max([st.queue_depth_max for st in gen.steps], default=0),
            "prefill_ms": gen.prefill_ms, "prefill_tokens": len(prompt_ids), "ids": gen.ids,
            "rss_bytes": rss, "peak_rss_bytes": peak, "resident": {**dram, "total": sum(dram.values())},
            "ppl": ppl, "ppl_source": PPL_APP if seqs else None, "o_direct": o_direct,
            "fallback_reason": "" if o_direct else "the runtime opened its files without O_DIRECT",
            "sets": sets, "tokens": gen.ids}


def app_perplexity(session, seqs) -> float:
    """exp(mean NLL) of each held-out sequence's tokens after the first, from the APP's logits:
    prefill returns only the last position's, so the first token is prefilled and each next
    one decoded, its logits scored against the token that follows (llamacpp_decode.perplexity
    scores the same positions)."""
    import numpy as np
    import tvm
    prefill, decode = session.vm["prefill"], session.vm["decode"]
    shape = tvm.runtime.ShapeTuple
    one = tvm.runtime.tensor(np.zeros(1, np.int32))
    nll, count = 0.0, 0
    for seq in seqs:
        ids = [int(t) for t in seq]
        if len(ids) < 2:
            continue
        kv = session.new_kv(len(ids))
        logits = prefill(tvm.runtime.tensor(np.asarray(ids[:1], np.int32)), kv, shape([0]), session.params)
        for pos in range(1, len(ids)):
            z = logits.numpy()[0].astype(np.float64)
            m = z.max()
            nll += float(m + np.log(np.exp(z - m).sum()) - z[ids[pos]])
            count += 1
            if pos + 1 < len(ids):
                one.copyfrom(np.array([ids[pos]], np.int32))
                logits = decode(one, kv, shape([pos]), session.params)
    return math.exp(nll / max(count, 1))


def native_worker(app_dir: str, prompt_ids: list[int], tokens: int, threads: int) -> dict:
    """APP/ripple-run as its own process (no Python in it): its JSON's per-token figures and
    the RSS the kernel counted for it (VmHWM, VmRSS)."""
    runner = Path(app_dir) / "ripple-run"
    if not runner.is_file():
        raise BenchError(f"{runner}: missing (the APP was built for another target); compile it for host")
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="ripple-run-") as tmp:
        out = Path(tmp) / "run.json"
        cmd = [str(runner), "--prompt-ids", ",".join(map(str, prompt_ids)), "--tokens", str(tokens + 1),
               "--json", str(out), "--threads", str(threads)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUNNER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{runner}: no answer after {RUNNER_TIMEOUT_S} s") from None
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise BenchError(f"{runner} exited with {p.returncode}: {last}")
        r = json.loads(out.read_text())
    dram = {k: int(v) for k, v in r["dram_bytes"].items()}
    return {"token_ms": r["token_ms"], "io_ms": r["io_wait_ms"], "bytes_read": r["bytes_read"],
            "active": r["active_neurons"], "outside_ms": None, "prefill_ms": r["prefill_ms"],
            "prefill_tokens": len(r["prompt_ids"]), "ids": r["ids"], "rss_bytes": int(r["rss_bytes"]),
            "peak_rss_bytes": int(r["peak_rss_bytes"]), "resident": {**dram, "total": sum(dram.values())},
            "ppl": None, "ppl_source": PPL_NATIVE, "o_direct": bool(r["o_direct"]),
            "fallback_reason": "" if r["o_direct"] else "the runtime opened its files without O_DIRECT",
            "threads": r.get("threads"), "tokens": r["ids"]}
