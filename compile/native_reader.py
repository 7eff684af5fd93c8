"""Building the phone-side native library (native/*.c) for a named target.

A phone runs TVM's native RPC server, not Python: the storage probe and the I/O replay must
run there as compiled code, and so must the flash runtime a compiled model calls per layer
and per token (native/flash_runtime.c, ripple.rt.*). It is one companion shared library,
loaded next to the kernels with `remote.load_module` (or a server's `--load-library`, or a
native runner's dlopen); native/registry.c says how its functions reach TVM.

host:          the system C compiler, against glibc.
android-arm64: the NDK's clang when ANDROID_NDK_HOME is set; else Debian's aarch64 gcc with
               glibc's headers but no glibc: -nostdlib against empty stand-ins named like
               bionic's libc.so and libdl.so (as compile.targets links the kernels), outline
               atomics and the stack protector off (both would call into libgcc / glibc).
linux-arm64:   Debian's aarch64 gcc against glibc, the host's flags (runs under qemu-aarch64).
Builds are cached under build/native/TARGET/ by a hash of the sources and the command.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .errors import ToolchainError
from .native_build import cached_build
from .targets import linker_for

NATIVE = Path(__file__).resolve().parent / "native"
# One library from these, each file one idea (native/ripple_native.h says what they share).
SOURCES = tuple(NATIVE / f for f in ("ffi_args.c", "read_pool.c", "ripple_reader.c",
                                     "runtime_config.c", "flash_runtime.c", "timed_step.c",
                                     "registry.c"))
HEADERS = tuple(NATIVE / f for f in ("ripple_native.h", "runtime_config.h"))
LIB_NAME = "libripple_reader.so"
BUILD_DIR = Path("build") / "native"
ABI = 2                      # RIPPLE_ABI in native/ripple_native.h
# Module functions (load_module(lib)[name]) and the globals the library registers.
PREPARE, PROBE, READ_EXTENTS = "ripple_storage_prepare", "ripple_storage_probe", "ripple_flash_read_extents"
BIND, HOOK, STATS = "ripple_flash_bind", "ripple_flash_read", "ripple_flash_stats"
RT_OPEN, RT_WHOLE, RT_FETCH = "ripple_rt_open", "ripple_rt_whole", "ripple_rt_fetch"
RT_PREFETCH = "ripple_rt_prefetch"
RT_STATS, RT_CLOSE, RT_STEP = "ripple_rt_stats", "ripple_rt_close", "ripple_rt_step"
ABI_FN, GLOBALS_FN = "ripple_native_abi", "ripple_native_globals"
GLOBALS = ("ripple.storage.prepare", "ripple.storage.probe", "ripple.flash.read_extents",
           "ripple.flash.bind", "ripple.flash.read", "ripple.flash.stats",
           "ripple.rt.open", "ripple.rt.whole", "ripple.rt.fetch", "ripple.rt.prefetch",
           "ripple.rt.stats", "ripple.rt.close",
           "ripple.rt.step",
           "ripple.native.abi", "ripple.native.globals")
HOOK_GLOBAL = "ripple.flash.read"      # compile.graph.FLASH_READ; kept when already registered
# What the android build may call: bionic's libc and libdl.
BIONIC_CALLS = frozenset(
    "__errno clock_gettime close dlopen dlsym free fsync lseek madvise malloc memcmp memcpy memset mmap "
    "munmap open posix_memalign pread pthread_cond_broadcast pthread_cond_signal pthread_cond_wait qsort "
    "pthread_create pthread_detach pthread_join pthread_mutex_lock pthread_mutex_unlock rename "
    "snprintf strcmp strcpy strerror strlen unlink vsnprintf write".split())

_WARN = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared"]
# Never unloaded (globals it registers point into it); its own symbols bind to itself (the
# TVM kernels loaded beside it define the same context symbol names).
_LINK = ["-Wl,-z,nodelete", "-Wl,-Bsymbolic"]


def _ffi_include() -> Path:
    import tvm_ffi
    inc = Path(tvm_ffi.__file__).resolve().parent / "include"
    if not (inc / "tvm" / "ffi" / "c_api.h").is_file():
        raise ToolchainError(f"{inc}: no tvm/ffi/c_api.h; reinstall apache-tvm-ffi")
    return inc


def _stubs(gcc: str, folder: Path, names=("libc.so", "libdl.so")) -> list[str]:
    """Empty shared objects with bionic's sonames; the flags that link against them."""
    src = folder / "stub.c"
    src.write_text("")
    for lib in names:
        subprocess.run([gcc, "-shared", "-nostdlib", f"-Wl,-soname,{lib}", "-o", str(folder / lib),
                        str(src)], check=True, capture_output=True)
    return [f"-L{folder}"] + [f"-l{n[3:-3]}" for n in names]


def compile_command(target_name: str, out: Path, stub_dir: Path | None = None) -> list[str]:
    """The compiler command line that builds the reader for `target_name` into `out`."""
    inc = f"-I{_ffi_include()}"
    linker = linker_for(target_name)
    if linker.via == "host-cc":
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise ToolchainError("no C compiler (gcc/cc) found: install gcc")
        return [cc, *_WARN, "-pthread", inc, *_LINK, "-o", str(out), *map(str, SOURCES), "-ldl"]
    if linker.via == "cross-glibc":     # linux-arm64: the host's command, aarch64's gcc
        return [linker.compiler, *_WARN, "-pthread", inc, *_LINK, "-o", str(out), *map(str, SOURCES), "-ldl"]
    # Android 15 devices may use 16 KiB pages: align segments for them.
    android = [*_LINK, "-Wl,-z,max-page-size=16384", f"-Wl,-soname,{LIB_NAME}"]
    if linker.via == "ndk":
        clang = linker.compiler[:-2] if linker.compiler.endswith("++") else linker.compiler
        return [clang, *_WARN, inc, *android, "-o", str(out), *map(str, SOURCES), "-ldl"]
    stubs = _stubs(linker.compiler, stub_dir) if stub_dir else ["-L<stubs>", "-lc", "-ldl"]
    return [linker.compiler, *_WARN, "-nostdlib", "-mno-outline-atomics", "-fno-stack-protector",
            "-U_FORTIFY_SOURCE", "-DRIPPLE_BIONIC", inc, *android, "-Wl,--no-as-needed",
            "-o", str(out), *map(str, SOURCES), *stubs]


def build_reader(target_name: str = "host", build_dir: str | os.PathLike | None = None) -> Path:
    """The native library for `target_name` (built once per sources and command)."""
    root = Path(build_dir) if build_dir is not None else BUILD_DIR
    h = hashlib.blake2b(digest_size=8)
    for f in (*SOURCES, *HEADERS):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(" ".join(compile_command(target_name, Path("OUT"))).encode())
    return cached_build(root / target_name / h.hexdigest(), LIB_NAME,
                        lambda out, tmp: compile_command(target_name, out, tmp), f"{LIB_NAME} for {target_name}")


def load_reader(path: str | os.PathLike | None = None):
    """The host build loaded into this process (a tvm.runtime.Module of the functions)."""
    import tvm
    return tvm.runtime.load_module(str(path or build_reader("host")))
