"""Building `ripple-run` (native/ripple_run.cc), the native program that decodes an APP folder.

It links only the TVM runtime the apache-tvm wheel ships (tvm/lib/libtvm_runtime.so and
tvm_ffi/lib/libtvm_ffi.so) and includes only the tvm_ffi headers; no libpython. Its rpath
starts with $ORIGIN, where the APP builder copies those two libraries, then names the wheel's
lib folders, so the binary also runs where it was built.

host, and linux-arm64 (glibc, for qemu-aarch64) against the runtime compile.tvm_runtime_build
cross-builds: the wheel has no aarch64 runtime, and no bionic build exists yet for phones.
Builds are cached under build/native/TARGET/ by a hash of the source and the command.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .errors import ToolchainError
from .native_build import cached_build

SOURCE = Path(__file__).resolve().parent / "native" / "ripple_run.cc"
EXE_NAME = "ripple-run"
BUILD_DIR = Path("build") / "native"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")   # what the APP builder copies beside it

# -isystem for the tvm_ffi headers: they trip -Wextra (unused parameters) themselves.
_WARN = ["-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror"]


def _wheel_paths() -> tuple[Path, Path, Path]:
    """tvm_ffi's include folder and the lib folders of libtvm_runtime.so and libtvm_ffi.so."""
    import tvm
    import tvm_ffi
    ffi = Path(tvm_ffi.__file__).resolve().parent
    inc, ffi_lib = ffi / "include", ffi / "lib"
    tvm_lib = Path(tvm.__file__).resolve().parent / "lib"
    if not (inc / "tvm" / "ffi" / "extra" / "module.h").is_file():
        raise ToolchainError(f"{inc}: no tvm/ffi/extra/module.h; reinstall apache-tvm-ffi")
    for folder, lib in ((tvm_lib, RUNTIME_LIBS[0]), (ffi_lib, RUNTIME_LIBS[1])):
        if not (folder / lib).is_file():
            raise ToolchainError(f"{folder}: no {lib}; reinstall apache-tvm")
    return inc, tvm_lib, ffi_lib


def runtime_libraries(target_name: str = "host") -> list[Path]:
    """The two shared libraries ripple-run needs: the wheel's, or for linux-arm64 the ones
    compile.tvm_runtime_build cross-builds from the wheel's sources."""
    if target_name == "linux-arm64":
        from .tvm_runtime_build import build_tvm_runtime
        return build_tvm_runtime().libraries
    _, tvm_lib, ffi_lib = _wheel_paths()
    return [tvm_lib / RUNTIME_LIBS[0], ffi_lib / RUNTIME_LIBS[1]]


def compile_command(target_name: str, out: Path) -> list[str]:
    """The compiler command line that builds ripple-run for `target_name` into `out`."""
    if target_name == "linux-arm64":
        return _linux_arm64_command(out)
    if target_name != "host":
        raise ToolchainError(f"ripple-run builds for host only, not {target_name!r}: the "
                             f"apache-tvm wheel ships no runtime for other machines")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise ToolchainError("no C++ compiler (g++/c++) found: install g++")
    inc, tvm_lib, ffi_lib = _wheel_paths()
    # $ORIGIN first: inside an APP the copies beside the binary win over the build machine's.
    rpath = ":".join(["$ORIGIN", str(tvm_lib), str(ffi_lib)])
    return [cxx, *_WARN, "-isystem", str(inc), "-o", str(out), str(SOURCE),
            f"-L{tvm_lib}", f"-L{ffi_lib}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi",
            "-Wl,--as-needed", f"-Wl,-rpath,{rpath}", "-ldl", "-pthread"]


def _linux_arm64_command(out: Path) -> list[str]:
    """aarch64 glibc build against the cross-built runtime; rpath $ORIGIN only (the APP
    builder copies the two libraries beside it)."""
    from .tvm_runtime_build import build_tvm_runtime, cross_compiler
    inc, _, _ = _wheel_paths()
    cxx, lib = cross_compiler(), build_tvm_runtime().folder
    return [cxx, *_WARN, "-isystem", str(inc), "-o", str(out), str(SOURCE), f"-L{lib}",
            "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed",
            "-Wl,-rpath,$ORIGIN", "-ldl", "-pthread"]


def build_runner(target_name: str = "host", build_dir: str | os.PathLike | None = None) -> Path:
    """The ripple-run executable for `target_name` (built once per source and command)."""
    root = Path(build_dir) if build_dir is not None else BUILD_DIR
    key = hashlib.blake2b(SOURCE.read_bytes() + " ".join(
        compile_command(target_name, Path("OUT"))).encode(), digest_size=8).hexdigest()
    return cached_build(root / target_name / key, EXE_NAME, lambda out, _: compile_command(target_name, out),
                        f"{EXE_NAME} for {target_name}")
