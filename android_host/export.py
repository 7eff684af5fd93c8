"""`ripple export`: the files an app ships for one target, and the check that they load back.

OUT/
  ffn_kernels.so   the per-layer Relax graph (flash-read hook + sparse FFN kernel), compiled
                   for the target (tuned knobs when the target's tuning database has them)
  model.rflash     the bundles, as packed
  manifest.json    the layout's manifest (dims, placement, checksums)
  export.json      what the app needs to call the kernels: functions, hook, target, bundle
  whole_kernels.so, whole.rflash, whole.json   when the layout has a whole copy (`ripple pack
                   --whole-copy`): the GGUF's own FFN blocks per layer and a GEMV per part
                   shape, for layers read whole (runtime_py/whole_ffn computes them so)
  README.md        how an app loads them
Predictor weights are not shipped: none exist yet (export.json says "predictor": null).
The folder is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tvm

from ..compile.build import build_graph, knobs_for
from ..compile.elf import GLIBC_ONLY, read_elf
from ..compile.ffn import VIEW_DTYPE, buffer_cols
from ..compile.graph import FLASH_READ, KERNEL
from ..compile.targets import export_library, runs_here, target_dict
from ..layout.bundle import decode_bundles
from ..layout.header import MODEL_FILE
from ..layout.manifest import MANIFEST_FILE
from ..layout.reader import bundle_offset, open_layout
from ..layout.whole_copy import WHOLE_FILE, WHOLE_MANIFEST, open_whole_copy, verify_whole_copy

KERNELS_FILE = "ffn_kernels.so"
WHOLE_KERNELS_FILE = "whole_kernels.so"
EXPORT_FILE = "export.json"
README_FILE = "README.md"
FORMAT = 1
_MACHINE = {"android-arm64": "aarch64", "host": os.uname().machine}


class ExportError(ValueError):
    """An export folder that cannot be written or does not validate; names the file and fix."""


def export_cmd(target: str, layout_dir: str, out_dir: str, db: str | None = None) -> dict:
    target_dict(target)                       # an unknown target fails before any work
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose a new --out")
    layout = open_layout(layout_dir, verify=True)
    spec = layout.spec
    knobs, tuned = knobs_for(spec, target, db)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o755)                      # mkdtemp makes it private; an app bundle is not
    try:
        linker = export_library(build_graph(spec, target, knobs), tmp / KERNELS_FILE, target)
        shutil.copyfile(layout.path, tmp / MODEL_FILE)
        shutil.copyfile(layout.manifest_path, tmp / MANIFEST_FILE)
        so = tmp / KERNELS_FILE
        info = {
            "format": FORMAT, "target": target, "target_json": target_dict(target),
            "linked_with": linker.via,
            "kernels": {"file": KERNELS_FILE, "bytes": so.stat().st_size,
                        "sha256": hashlib.sha256(so.read_bytes()).hexdigest()},
            "functions": {
                "main": {"args": ["layer: int64", "ids: (k,) int64", f"x: ({spec.d_model},) float32"],
                         "returns": f"y: ({spec.d_model},) float32", "calls": FLASH_READ},
                "ffn_bundles": {"args": [f"x: ({spec.d_model},) float32",
                                         f"bundles: (k, {buffer_cols(spec)}) {VIEW_DTYPE[spec.dtype]}"],
                                "returns": f"y: ({spec.d_model},) float32"},
            },
            "hook": {"name": FLASH_READ, "args": ["layer", "ids", "out"],
                     "fills": f"out (k, {buffer_cols(spec)}) {VIEW_DTYPE[spec.dtype]}: the bundles "
                              f"of ids, rows in slot order, bytes as in {MODEL_FILE}"},
            "kernel": KERNEL, "bundle": asdict(spec), "knobs": knobs.to_dict(), "tuned": tuned,
            "layout": {"file": MODEL_FILE, "manifest": MANIFEST_FILE,
                       "bytes": (tmp / MODEL_FILE).stat().st_size},
            "predictor": None,
            "tvm": tvm.__version__,
        }
        copy = open_whole_copy(layout.path.parent, layout.manifest.source_hash)
        if copy is not None:
            verify_whole_copy(copy)
            info["whole_copy"] = _export_whole(copy, target, tmp)
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=1))
        (tmp / README_FILE).write_text(_readme(info, layout.manifest.arch))
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        result = validate_export(tmp)
        if out.exists():
            out.rmdir()                       # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**result, "out": str(out), "linked_with": linker.via}


def validate_export(out_dir: str | os.PathLike) -> dict:
    """Load an export back and check it: layout checksums, the .so's machine and needs, and on
    the host, the kernel's output on layer 0's first bundles against numpy."""
    out = Path(out_dir)
    try:
        info = json.loads((out / EXPORT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{out / EXPORT_FILE}: unreadable ({e}); re-run `ripple export`") from None
    if info.get("format") != FORMAT:
        raise ExportError(f"{out}: export format {info.get('format')}, this ripple reads {FORMAT}")
    target = info["target"]
    so = out / info["kernels"]["file"]
    if not so.is_file():
        raise ExportError(f"{so}: missing; re-run `ripple export`")
    if hashlib.sha256(so.read_bytes()).hexdigest() != info["kernels"]["sha256"]:
        raise ExportError(f"{so}: does not match its sha256 in {EXPORT_FILE}; re-run `ripple export`")
    elf = read_elf(so)
    if elf.machine != _MACHINE[target] or not elf.shared:
        raise ExportError(f"{so}: is a {elf.machine} {'shared object' if elf.shared else 'executable'}, "
                          f"target {target} needs an {_MACHINE[target]} shared object")
    glibc = [n for n in elf.needed if n in GLIBC_ONLY]
    if target.startswith("android") and glibc:
        raise ExportError(f"{so}: needs {', '.join(glibc)}, which Android does not have; "
                          f"re-export with the NDK (ANDROID_NDK_HOME) or this ripple's cross link")
    layout = open_layout(out, verify=True)
    result = {"out": str(out), "target": target, "machine": elf.machine, "needed": list(elf.needed),
              "layout_verified": True, "tuned": info["tuned"], "files": sorted(p.name for p in out.iterdir())}
    if runs_here(target):
        result["kernel_max_rel_err"] = _check_kernel(so, layout)
    if "whole_copy" in info:
        result.update(_validate_whole(out, info, layout.manifest.source_hash))
    return result


def _export_whole(copy, target: str, tmp: Path) -> dict:
    """The whole copy's files and its GEMVs for the target, into the export folder."""
    from ..compile.qgemv import kernel_name, whole_kernels
    export_library(whole_kernels(copy.parts, target), tmp / WHOLE_KERNELS_FILE, target)
    shutil.copyfile(copy.path, tmp / WHOLE_FILE)
    shutil.copyfile(copy.path.with_name(WHOLE_MANIFEST), tmp / WHOLE_MANIFEST)
    so = tmp / WHOLE_KERNELS_FILE
    return {"file": WHOLE_FILE, "manifest": WHOLE_MANIFEST, "layer_bytes": copy.layer_bytes,
            "kernels": {"file": WHOLE_KERNELS_FILE, "bytes": so.stat().st_size,
                        "sha256": hashlib.sha256(so.read_bytes()).hexdigest()},
            "parts": {p.name: {"kind": p.kind, "shape": list(p.shape), "at": p.at, "bytes": p.nbytes,
                               "function": kernel_name(p.kind, *p.shape)} for p in copy.parts},
            "functions": "f(x (n, cols) float32, blocks (rows, row bytes) uint8, y (n, rows) float32); "
                         "y = down(silu(gate(x)) * up(x))"}


def _validate_whole(out: Path, info: dict, source_hash: str) -> dict:
    """The whole copy's checksums, its library's sha256 and machine, and on the host each
    part's GEMV on layer 0 against the blocks dequantized by gguf."""
    w = info["whole_copy"]
    so = out / w["kernels"]["file"]
    if not so.is_file() or hashlib.sha256(so.read_bytes()).hexdigest() != w["kernels"]["sha256"]:
        raise ExportError(f"{so}: missing or not matching its sha256 in {EXPORT_FILE}; re-run `ripple export`")
    elf = read_elf(so)
    if elf.machine != _MACHINE[info["target"]] or not elf.shared:
        raise ExportError(f"{so}: is a {elf.machine} object, target {info['target']} needs an "
                          f"{_MACHINE[info['target']]} shared object")
    copy = open_whole_copy(out, source_hash)
    if copy is None:
        raise ExportError(f"{out / WHOLE_MANIFEST}: missing; re-run `ripple export`")
    verify_whole_copy(copy)
    result = {"whole_copy_verified": True}
    if runs_here(info["target"]):
        import gguf
        from ..tuning.quantized_matrix import GGUF_TYPE
        lib = tvm.runtime.load_module(str(so))
        with open(copy.path, "rb") as f:
            f.seek(int(copy.offsets[0]))
            raw = np.frombuffer(f.read(copy.layer_bytes), np.uint8).copy()
        err = 0.0
        for p in copy.parts:
            blocks = copy.blocks(raw, p)
            x = np.random.default_rng(0).standard_normal((1, p.shape[1])).astype(np.float32)
            y = tvm.runtime.tensor(np.zeros((1, p.shape[0]), np.float32))
            lib[w["parts"][p.name]["function"]](tvm.runtime.tensor(x), tvm.runtime.tensor(np.ascontiguousarray(blocks)), y)
            ref = x @ gguf.quants.dequantize(blocks, GGUF_TYPE[p.kind]).reshape(p.shape).T
            err = max(err, float(np.abs(y.numpy() - ref).max() / max(np.abs(ref).max(), 1e-12)))
        if err > 1e-3:
            raise ExportError(f"{so}: GEMV output differs from numpy by {err:.2e} (relative); re-run `ripple export`")
        result["whole_kernel_max_rel_err"] = err
    return result


def _check_kernel(so: Path, layout) -> float:
    """Run the exported ffn_bundles on layer 0's first bundles; relative error vs numpy."""
    from tvm import relax

    from ..runtime_py.tvm_ffn import HOOK  # noqa: F401  (registers the hook the VM links)
    spec, k = layout.spec, min(16, layout.d_ffn)
    with open(layout.path, "rb") as f:
        f.seek(bundle_offset(layout, 0, 0))
        raw = np.frombuffer(f.read(k * spec.bundle_bytes), np.uint8).reshape(k, spec.bundle_bytes)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
    x = np.random.default_rng(0).standard_normal(spec.d_model).astype(np.float32)
    y = vm["ffn_bundles"](tvm.runtime.tensor(x), tvm.runtime.tensor(raw.view(VIEW_DTYPE[spec.dtype]))).numpy()
    b = decode_bundles(spec, raw)
    u = b.up @ x + (b.up_bias if b.up_bias is not None else 0)
    a = (b.gate @ x) / (1 + np.exp(-(b.gate @ x))) * u if b.gate is not None else np.maximum(u, 0)
    ref = a @ b.down_t
    err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12))
    if err > 1e-3:
        raise ExportError(f"{so}: kernel output differs from numpy by {err:.2e} (relative); "
                          f"the export is broken, re-run `ripple export`")
    return err


def _readme(info: dict, arch: str) -> str:
    b = info["bundle"]
    w = info.get("whole_copy")
    whole_rows = "" if w is None else (
        f"| `{WHOLE_KERNELS_FILE}` | a GEMV per part shape of the whole copy (Q4_1/Q8_0 rows as stored) |\n"
        f"| `{WHOLE_FILE}` | per layer, the GGUF's own gate, up, down blocks in one aligned extent "
        f"({w['layer_bytes']} bytes) |\n| `{WHOLE_MANIFEST}` | the parts, layer offsets and checksums |\n")
    whole_steps = "" if w is None else f"""5. A layer the app reads whole (its active set covers most of it) reads better from
   `{WHOLE_FILE}`: read its extent (O_DIRECT, one run), then per part call the function
   export.json's `whole_copy.parts` names on the part's bytes ([at, at + bytes) of the extent):
   `y = down(silu(gate(x)) * up(x))`, every neuron, no active ids.
"""
    return f"""# ripple-flash app bundle ({info['target']})

Built by `ripple export` with Apache TVM {info['tvm']}. Model family: {arch}; FFN {b['activation']},
d_model {b['d_model']}, bundles {b['dtype']}.

| file | what |
|---|---|
| `{KERNELS_FILE}` | Relax VM executable for {info['target_json']}: per-layer graph + sparse FFN kernel |
| `{MODEL_FILE}` | FFN bundles per layer in placement order (read per token, O_DIRECT) |
| `{MANIFEST_FILE}` | dims, bundle encoding, placement, region offsets and checksums |
| `{EXPORT_FILE}` | function signatures, the hook, target, schedule knobs |
{whole_rows}
**Predictor weights: none.** No predictor has been trained for this model yet, so this bundle
has no predictor file; an app must supply the active neuron ids per layer itself until one
ships here.

## Loading it in an app

1. Link the TVM runtime (with the Relax VM) into the app, as MLC-LLM's Android app does, and
   load it before this library (`{KERNELS_FILE}` leaves TVM's FFI symbols to it; C calls go to
   the system's libc/libm).
2. Register a packed function named `{info['hook']['name']}` with arguments (layer, ids, out):
   it must fill `{info['hook']['fills']}`. Find each id's slot with the manifest's placement
   (slot s holds neuron placement[s]); the bundle of slot s of layer l is at
   `layers[l].offset + s * bundle_bytes` in `{MODEL_FILE}`.
3. `mod = tvm.runtime.load_module("{KERNELS_FILE}")`; `vm = relax.VirtualMachine(mod, cpu)`
   (register the hook first: the VM looks it up when it is created).
4. Per layer and token: `y = vm["main"](layer, ids, x)` with x the normalised FFN input;
   add the layer's b_down if the model has one. `vm["ffn_bundles"](x, bundles)` runs the
   kernel on bundles the app read itself.
{whole_steps}"""
