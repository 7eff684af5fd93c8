"""`ripple export`: the APP folder an app ships for one target (app_build: the whole decode
step's library, the native flash runtime, params with the predictor, flash files, tokenizer,
device profile, app.json), and the check that it loads back.

The check reads every file app.json names: sizes, the library's sha256, each shared object's
machine and what it links (no glibc for Android), the layout's and the whole copy's
checksums; on the host it also decodes two tokens with the library and the runtime.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..compile.app_files import APP_FILE, AppError, load_app_json
from ..compile.elf import GLIBC_ONLY, read_elf
from ..compile.targets import runs_here
from ..layout.header import MODEL_FILE
from ..layout.manifest import MANIFEST_FILE, read_manifest
from ..layout.reader import open_layout
from ..layout.whole_copy import open_whole_copy, verify_whole_copy
from .app_cmds import compile_cmd

_MACHINE = {"android-arm64": "aarch64", "host": os.uname().machine}


class ExportError(AppError):
    """An export folder that does not validate; names the file and the fix."""


def export_cmd(target: str, layout_dir: str, out_dir: str, storage: str | None = None,
               budget_mb: float = 0.0) -> dict:
    compile_cmd(out_dir, layout=layout_dir, target=target, storage=storage, budget_mb=budget_mb)
    return validate_export(out_dir)


def validate_export(out_dir: str | os.PathLike) -> dict:
    out = Path(out_dir)
    info = load_app_json(out)
    target = info["target"]
    for name, f in info["files"].items():
        p = out / name
        if not p.is_file() or p.stat().st_size != f["bytes"]:
            raise ExportError(f"{p}: missing or not the {f['bytes']} bytes {APP_FILE} lists; export again")
        if "machine" not in f:
            continue
        elf = read_elf(p)
        want = _MACHINE["host" if name.startswith("libtvm") or name == "ripple-run" else target]
        if elf.machine != want:
            raise ExportError(f"{p}: is {elf.machine} code, target {target} needs {want}; export again")
        glibc = [n for n in elf.needed if n in GLIBC_ONLY]
        if target.startswith("android") and glibc:
            raise ExportError(f"{p}: needs {', '.join(glibc)}, which Android does not have; export with "
                              f"the NDK (ANDROID_NDK_HOME) or this ripple's cross link")
    lib = out / info["library"]
    if hashlib.sha256(lib.read_bytes()).hexdigest() != info["files"][info["library"]]["sha256"]:
        raise ExportError(f"{lib}: does not match its sha256 in {APP_FILE}; export again")
    # An APP whose layers are all read whole ships no model.rflash (app_build): its manifest
    # still names the checkpoint the whole copy must come from.
    bundles = (out / MODEL_FILE).is_file()
    source_hash = (open_layout(out, verify=True).manifest if bundles else
                   read_manifest(out / MANIFEST_FILE)).source_hash
    copy = open_whole_copy(out, source_hash)
    if copy is not None:
        verify_whole_copy(copy)
    result = {"out": str(out), "target": target, "files": sorted(info["files"]),
              "total_bytes": info["total_bytes"], "machine": read_elf(lib).machine,
              "needed": list(read_elf(lib).needed), "layout_verified": bundles,
              "whole_copy_verified": copy is not None, "sets": info["sets"], "layers": info["layers"]}
    if runs_here(target):
        from ..runtime_py.app_session import AppSession
        with AppSession(out) as s:
            gen = s.generate([1], 2)
        result["decoded_ids"] = gen.ids
    return result
