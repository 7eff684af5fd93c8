"""Compile targets as named data, and how each one links its shared library.

A target is a TVM target dict. `host` is filled in from the machine the code runs on (the
CPU LLVM detects, the cores the OS reports): a fixed mcpu would either waste the host's
vector units or emit instructions it lacks. Phones are named by their ABI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm.target import codegen

from .errors import ToolchainError

# `host` gets mcpu and num-cores at use; the others are complete.
TARGETS: dict[str, dict] = {
    "host": {"kind": "llvm"},
    # Every ARMv8-A phone has NEON; fp16 arithmetic (+fullfp16) is ARMv8.2 and is not needed:
    # kernels widen fp16 to f32 with fcvtl, which base NEON has.
    "android-arm64": {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
    # aarch64 Linux with glibc: runs here under qemu-aarch64 (compile.tvm_runtime_build builds
    # its TVM runtime); phones use android-arm64.
    "linux-arm64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
}

# Debian's cross compiler; links for glibc, so the library is linked without it (see linker_for).
CROSS_GCC = "aarch64-linux-gnu-gcc"
# The NDK's clang for API level 24 (Android 7.0), below the minimum of most current apps.
NDK_CLANG = "toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android24-clang++"


def target_dict(name: str) -> dict:
    """The TVM target dict for a named target (host: this machine's CPU and core count)."""
    if name not in TARGETS:
        raise ToolchainError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    t = dict(TARGETS[name])
    if name == "host":
        t["mcpu"] = codegen.llvm_get_system_cpu()
        t["num-cores"] = os.cpu_count() or 1
    return t


def make_target(name: str) -> tvm.target.Target:
    return tvm.target.Target(target_dict(name))


def runs_here(name: str) -> bool:
    """Whether code built for `name` can be loaded and timed in this process."""
    return name == "host"


@dataclass(frozen=True)
class Linker:
    """How a target's object files become the .so an app loads."""
    via: str                  # "host-cc" | "ndk" | "cross-gcc" | "cross-glibc"
    compiler: str             # executable, or "" for TVM's default host compiler
    options: tuple[str, ...]  # extra flags for the link


def linker_for(name: str, env: dict | None = None) -> Linker:
    """The NDK when ANDROID_NDK_HOME is set; else Debian's aarch64 gcc without its C library.

    Android has bionic, not glibc: a library that NEEDs libc.so.6 does not load on a phone.
    Without the NDK, the library is linked -nostdlib against empty stand-ins named like
    bionic's libc.so and libm.so (what the NDK's stub libraries are), so it NEEDs those and
    its few C calls (memset, memcpy, expf) bind to bionic's when the app loads it."""
    env = os.environ if env is None else env
    target_dict(name)
    if name == "host":
        return Linker("host-cc", "", ())
    if name == "linux-arm64":       # glibc's own libc: the library runs where glibc does
        gcc = shutil.which(CROSS_GCC, path=env.get("PATH"))
        if gcc is None:
            raise ToolchainError(f"{CROSS_GCC} not found: apt-get install gcc-aarch64-linux-gnu")
        return Linker("cross-glibc", gcc, ())
    ndk_home = env.get("ANDROID_NDK_HOME")
    if ndk_home:
        clang = Path(ndk_home) / NDK_CLANG
        if not clang.is_file():
            raise ToolchainError(f"ANDROID_NDK_HOME={ndk_home} has no {NDK_CLANG}; point it at "
                                 f"an NDK r23 or newer, or unset it to use {CROSS_GCC}")
        return Linker("ndk", str(clang), ())
    gcc = shutil.which(CROSS_GCC, path=env.get("PATH"))
    if gcc is None:
        raise ToolchainError(f"{CROSS_GCC} not found: run `make sysdeps` (Debian package "
                             f"gcc-aarch64-linux-gnu) or set ANDROID_NDK_HOME")
    return Linker("cross-gcc", gcc, ("-nostdlib", "-Wl,--no-as-needed"))


BIONIC_STUBS = ("libc.so", "libm.so")


def _bionic_stubs(gcc: str, folder: Path) -> list[str]:
    """Empty shared objects with bionic's sonames; returns the link flags that use them."""
    src = folder / "stub.c"
    src.write_text("")
    for lib in BIONIC_STUBS:
        subprocess.run([gcc, "-shared", "-nostdlib", f"-Wl,-soname,{lib}", "-o",
                        str(folder / lib), str(src)], check=True, capture_output=True)
    return [f"-L{folder}", "-lc", "-lm"]


def export_library(module, path: str | os.PathLike, target_name: str) -> Linker:
    """Write a compiled module (Executable) as a shared library for `target_name`."""
    from tvm.support import cc, ndk
    linker = linker_for(target_name)
    if linker.via == "host-cc":
        module.export_library(str(path))
    elif linker.via == "ndk":
        old = os.environ.get("TVM_NDK_CC")
        os.environ["TVM_NDK_CC"] = linker.compiler      # what tvm.support.ndk links with
        try:
            module.export_library(str(path), fcompile=ndk.create_shared)
        finally:
            if old is None:
                os.environ.pop("TVM_NDK_CC", None)
            else:
                os.environ["TVM_NDK_CC"] = old
    elif linker.via == "cross-glibc":
        module.export_library(str(path), fcompile=cc.cross_compiler(linker.compiler))
    else:
        with tempfile.TemporaryDirectory() as stubs:
            opts = list(linker.options) + _bionic_stubs(linker.compiler, Path(stubs))
            module.export_library(str(path), fcompile=cc.cross_compiler(linker.compiler, options=opts))
    return linker
