"""Tuning the sparse FFN kernels per target: our XGBoost-guided search over the schedule knobs,
because MetaSchedule does not run in the TVM wheels we can install (see metaschedule_status).

A workload is a bundle spec (activation, dtype, d_model, bias). A setting's cost is the
geometric mean, over active fractions TUNE_FRACTIONS of the layer's n neurons, of the cold
kernel time on random bundles; one compiled kernel serves all k, so one setting is chosen
for all of them. The best setting goes into the target's tuning database.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tvm

from ..atomic_file import write_json
from ..compile.build import build_sparse
from ..compile.ffn import VIEW_DTYPE
from ..compile.schedule import DEFAULT, SPACE, Knobs, valid
from ..compile.targets import ToolchainError, runs_here, target_dict
from ..compile.timing import time_call
from ..compile.tuning_db import default_db_path, save_record, workload_key
from ..layout.bundle import BundleSpec, encode_bundles
from .tuner import tune

TUNE_FRACTIONS = (0.1, 0.2, 0.5)


def random_bundles(spec: BundleSpec, n: int, seed: int = 0) -> np.ndarray:
    """n encoded bundles of random weights (the scale of a trained FFN's, ~0.05)."""
    rng = np.random.default_rng(seed)
    w = {name: rng.standard_normal((n, spec.d_model), dtype=np.float32) * 0.05
         for name in ("up", "down_t")}
    if spec.activation == "swiglu":
        w["gate"] = rng.standard_normal((n, spec.d_model), dtype=np.float32) * 0.05
    if spec.has_up_bias:
        w["up_bias"] = rng.standard_normal(n, dtype=np.float32) * 0.05
    return encode_bundles(spec, **w)


def kernel_view(spec: BundleSpec, raw: np.ndarray) -> np.ndarray:
    """The gathered bytes (k, bundle_bytes) uint8 as the kernel's bundles argument."""
    return raw.view(VIEW_DTYPE[spec.dtype])


def measure(spec: BundleSpec, knobs: Knobs, n: int, target_name: str = "host",
            fractions=TUNE_FRACTIONS, repeat: int = 15, seed: int = 0) -> float:
    """Geometric-mean cold seconds of the kernel built with `knobs` over the fractions."""
    lib = build_sparse(spec, target_name, knobs)
    raw = random_bundles(spec, n, seed)
    rng = np.random.default_rng(seed + 1)
    x = tvm.runtime.tensor(rng.standard_normal(spec.d_model).astype(np.float32))
    y = tvm.runtime.tensor(np.zeros(spec.d_model, np.float32))
    logs = []
    for f in fractions:
        k = max(1, int(round(f * n)))
        rows = np.sort(rng.choice(n, k, replace=False))
        w = tvm.runtime.tensor(kernel_view(spec, raw[rows]))
        logs.append(np.log(time_call(lib, [x, w, y], repeat)))
    return float(np.exp(np.mean(logs)))


def tune_kernel(spec: BundleSpec, n: int, target_name: str = "host", trials: int = 32,
                db_path=None, seed: int = 0) -> dict:
    """Tune one workload; the record written to the database (also returned)."""
    _check_runs_here(target_name)
    d = spec.d_model
    res = tune(SPACE, lambda c: measure(spec, Knobs(**c), n, target_name, seed=seed),
               trials, DEFAULT.to_dict(), keep=lambda c: valid(Knobs(**c), d), seed=seed,
               desc=workload_key(spec))
    record = {
        "key": workload_key(spec), "spec": asdict(spec), "n": n,
        "fractions": list(TUNE_FRACTIONS), "objective": "geomean cold seconds over fractions",
        "knobs": res.best, "us": res.best_cost * 1e6, "default_us": res.default_cost * 1e6,
        "speedup": res.speedup, "trials": len(res.trials), "tune_seconds": res.seconds,
        "tvm": tvm.__version__,
        "history": [{"knobs": t.config, "us": t.cost * 1e6 if np.isfinite(t.cost) else None,
                     "error": t.error} for t in res.trials],
    }
    save_record(db_path or default_db_path(target_name), target_name, record)
    return record


def _check_runs_here(target_name: str) -> None:
    target_dict(target_name)                  # unknown names fail here
    if not runs_here(target_name):
        raise ToolchainError(f"target {target_name!r} cannot be timed on this machine; tuning "
                             f"measures on the device itself (tune `host` here)")


def tune_kernels_cmd(target: str = "host", trials: int = 32, db: str | None = None,
                     layout: str | None = None, model: str | None = None,
                     dtypes: tuple[str, ...] = ("fp16", "int8"), seed: int = 0) -> dict:
    """`ripple tune kernels`: tune the FFN kernels of a layout's (or a model's) shape."""
    if trials < 1:
        raise ValueError(f"--trials {trials}: must be at least 1")
    _check_runs_here(target)
    act, d, n, bias = _shape(layout, model)
    db_path = db or default_db_path(target)
    out = {"target": target, "target_json": target_dict(target), "db": str(db_path),
           "workloads": []}
    for dt in dtypes:
        rec = tune_kernel(BundleSpec(act, d, dt, bias), n, target, trials, db_path, seed)
        out["workloads"].append({k: v for k, v in rec.items() if k != "history"})
    return out


def _shape(layout: str | None, model: str | None) -> tuple[str, int, int, bool]:
    if layout:
        from ..layout.reader import open_layout
        lay = open_layout(layout)
        return lay.spec.activation, lay.spec.d_model, lay.d_ffn, lay.spec.has_up_bias
    from .checkpoint import default_model_path, load_model
    desc = load_model(model or default_model_path())
    return desc.activation, desc.d_model, desc.d_ffn, desc.layers[0].b_up is not None


# --- MetaSchedule ---------------------------------------------------------------------------

_MS_PROBE = textwrap.dedent("""
    import tempfile, tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms
    A = te.placeholder((64, 64), "float32", name="A")
    B = te.placeholder((64, 64), "float32", name="B")
    r = te.reduce_axis((0, 64), name="r")
    C = te.compute((64, 64), lambda i, j: te.sum(A[i, r] * B[r, j], axis=r), name="C")
    mod = tvm.IRModule({"main": te.create_prim_func([A, B, C]).with_attr("global_symbol", "main")})
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    with tempfile.TemporaryDirectory() as wd:
        db = ms.tune_tir(mod, target, wd, max_trials_global=2, num_trials_per_iter=2,
                         cost_model="random")
        sch = ms.tir_integration.compile_tir(db, mod, target)
    print("RIPPLE_MS_TUNED" if sch is not None else "RIPPLE_MS_NO_RESULT")
""")


def metaschedule_status(timeout: float = 300.0, cache: bool = True) -> dict:
    """Run a 2-trial MetaSchedule tune of a 64x64 matmul in a subprocess (it may crash it).

    Returns {"works": bool, "outcome": "tuned" | "no result" | "crashed (signal N)" |
    "failed (exit N)" | "timed out", "seconds": float, ...}. The probe takes 1-2 minutes on 2
    cores, so its outcome is cached per TVM and TVM-FFI version (the wheels are what decide
    it) under $RIPPLE_CACHE (default ~/.cache/ripple-flash); cache=False runs it anyway."""
    import tvm_ffi
    versions = f"tvm-{tvm.__version__}-ffi-{tvm_ffi.__version__}"
    path = Path(os.environ.get("RIPPLE_CACHE", "~/.cache/ripple-flash")).expanduser() \
        / f"metaschedule-{versions}.json"
    if cache and path.is_file():
        try:
            return {**json.loads(path.read_text()), "cached": str(path)}
        except ValueError:
            pass                               # a damaged cache is re-measured
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", _MS_PROBE], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"works": False, "outcome": "timed out", "seconds": time.perf_counter() - t0}
    sec = time.perf_counter() - t0
    if "RIPPLE_MS_TUNED" in p.stdout:
        outcome = "tuned"
    elif "RIPPLE_MS_NO_RESULT" in p.stdout:
        outcome = "no result"
    elif p.returncode < 0:
        outcome = f"crashed (signal {-p.returncode})"
    else:
        outcome = f"failed (exit {p.returncode})"
    status = {"works": outcome == "tuned", "outcome": outcome, "seconds": sec,
              "versions": versions, "stderr_tail": p.stderr.strip().splitlines()[-3:]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, status)
    return status


if __name__ == "__main__":      # python -m ripple.tuning.kernels: report MetaSchedule's state
    print(json.dumps(metaschedule_status(), indent=1))
