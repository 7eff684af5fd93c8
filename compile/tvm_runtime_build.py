"""Cross-building the TVM runtime (libtvm_ffi.so, libtvm_runtime.so) for aarch64 Linux (glibc).

The apache-tvm wheel is x86_64 only, but it ships the C++ sources of both libraries: tvm_ffi's
src/ffi (the list its CMakeLists.txt builds) and tvm's src/runtime. A Relax VM that loads a
compiled module and runs it needs tvm_ffi whole and, of the runtime, the core files beside
src/runtime/*.cc, memory/ and vm/ (not rpc/, not extra/: disco, cuDNN, TensorRT...).

The wheel leaves out seven headers those sources include (tvm/support/io.h, serializer.h,
cuda/nvtx.h; src/support/{base64,bytes_io,utils}.h; compiler-rt's builtin_fp16.h). They come
from an apache/tvm checkout: RIPPLE_TVM_SOURCE, else build/tvm-source (v0.27.dev0's copies
match the 0.27 wheel: its runtime sources are byte-identical to that tag's).

Built with Debian's aarch64-linux-gnu-g++ at nice 19, two compilers at a time (other work
shares the machine), cached under build/native/linux-arm64/tvm-HASH/ by a hash of the sources,
the headers and the command lines (50 files; minutes on 2 cores, once).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import ToolchainError

TARGET = "linux-arm64"
CROSS_CXX = "aarch64-linux-gnu-g++"
CROSS_PACKAGE = "g++-aarch64-linux-gnu"
BUILD_DIR = Path("build") / "native"
TVM_SOURCE_ENV = "RIPPLE_TVM_SOURCE"
DEFAULT_TVM_SOURCE = Path("build") / "tvm-source"
LIBS = ("libtvm_ffi.so", "libtvm_runtime.so")
# What the wheel's sources include but the wheel does not ship, relative to a tvm checkout.
MISSING_HEADERS = ("include/tvm/support/io.h", "include/tvm/support/serializer.h",
                   "include/tvm/support/cuda/nvtx.h", "src/support/base64.h",
                   "src/support/bytes_io.h", "src/support/utils.h",
                   "3rdparty/compiler-rt/builtin_fp16.h")
# tvm_ffi/CMakeLists.txt: _tvm_ffi_objs_sources + _tvm_ffi_extra_objs_sources (extra C++ API on).
FFI_SOURCES = ("backtrace.cc", "backtrace_win.cc", "object.cc", "error.cc", "function.cc",
               "tensor.cc", "dtype.cc", "container.cc", "init_once.cc", "custom_allocator.cc",
               *(f"extra/{f}.cc" for f in (
                   "structural_equal", "structural_hash", "structural_visit", "structural_mutate",
                   "visit_error_context", "json_parser", "json_writer", "serialization", "dataclass",
                   "reflection_extra", "module", "library_module", "library_module_system_lib",
                   "library_module_dynamic_lib", "env_context", "env_c_api")))
# The CMake options' defines: no libbacktrace (not shipped), no segfault handler.
FFI_DEFINES = ("-DTVM_FFI_EXPORTS", "-DTVM_FFI_USE_LIBBACKTRACE=0",
               "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0", "-DTVM_FFI_CMAKE_LITTLE_ENDIAN=1")
RUNTIME_DIRS = ("", "memory", "vm")      # under src/runtime; not its subfolders cuda/, hexagon/
_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-w")   # -w: third-party code, not ours to lint


@dataclass(frozen=True)
class RuntimeBuild:
    """The two aarch64 libraries, in one folder (the runner links and rpaths them there)."""
    folder: Path
    seconds: float        # 0.0 when it came from the cache

    @property
    def libraries(self) -> list[Path]:
        return [self.folder / lib for lib in LIBS]


def cross_compiler(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    cxx = shutil.which(CROSS_CXX, path=env.get("PATH"))
    if cxx is None:
        raise ToolchainError(f"{CROSS_CXX} not found: apt-get install {CROSS_PACKAGE}")
    return cxx


def tvm_source(env: dict | None = None) -> Path:
    """The tvm checkout that supplies MISSING_HEADERS."""
    env = os.environ if env is None else env
    root = Path(env.get(TVM_SOURCE_ENV) or DEFAULT_TVM_SOURCE)
    absent = [h for h in MISSING_HEADERS if not (root / h).is_file()]
    if absent:
        raise ToolchainError(
            f"{root}: no {absent[0]} (the wheel omits {len(MISSING_HEADERS)} headers its runtime "
            f"sources include): set {TVM_SOURCE_ENV} to an apache/tvm checkout at v0.27.dev0, e.g. "
            f"git clone --depth 1 --branch v0.27.dev0 https://github.com/apache/tvm {DEFAULT_TVM_SOURCE}")
    return root


def _wheel() -> tuple[Path, Path]:
    import tvm
    import tvm_ffi
    return Path(tvm.__file__).resolve().parent, Path(tvm_ffi.__file__).resolve().parent


def _sources() -> tuple[list[Path], list[Path]]:
    tvm_dir, ffi_dir = _wheel()
    ffi = [ffi_dir / "src" / "ffi" / f for f in FFI_SOURCES]
    rt = sorted(p for d in RUNTIME_DIRS for p in (tvm_dir / "src" / "runtime" / d).glob("*.cc"))
    for p in ffi:
        if not p.is_file():
            raise ToolchainError(f"{p}: missing; reinstall apache-tvm-ffi")
    return ffi, rt


def _stage(stage: Path, src: Path) -> None:
    """A tvm source tree the relative includes resolve in: the wheel's src/runtime and include
    plus the checkout's missing headers ("../support/bytes_io.h" from src/runtime/x.cc)."""
    tvm_dir, _ = _wheel()
    shutil.copytree(tvm_dir / "src" / "runtime", stage / "src" / "runtime")
    shutil.copytree(tvm_dir / "include", stage / "include")
    for h in MISSING_HEADERS:
        (stage / h).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / h, stage / h)


def _commands(cxx: str, stage: Path, objs: Path, out: Path) -> tuple[list[list[str]], list[list[str]]]:
    """(compile commands, the two link commands); the paths are those of a build folder."""
    tvm_dir, ffi_dir = _wheel()
    ffi_inc = [f"-I{ffi_dir / 'include'}", f"-I{ffi_dir / '3rdparty' / 'dlpack' / 'include'}"]
    ffi, rt = _sources()
    compiles = []
    for p in ffi:
        o = objs / ("ffi_" + p.relative_to(ffi_dir / "src" / "ffi").as_posix().replace("/", "_") + ".o")
        compiles.append([cxx, *_FLAGS, "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                         *FFI_DEFINES, *ffi_inc, "-c", str(p), "-o", str(o)])
    rt_inc = [f"-I{stage / 'include'}", *ffi_inc, f"-I{stage / '3rdparty' / 'compiler-rt'}"]
    for p in rt:
        rel = p.relative_to(tvm_dir)
        o = objs / ("rt_" + rel.relative_to("src/runtime").as_posix().replace("/", "_") + ".o")
        compiles.append([cxx, *_FLAGS, "-DTVM_RUNTIME_EXPORTS", *rt_inc, "-c", str(stage / rel), "-o", str(o)])
    ffi_objs = [c[-1] for c in compiles if Path(c[-1]).name.startswith("ffi_")]
    rt_objs = [c[-1] for c in compiles if Path(c[-1]).name.startswith("rt_")]
    links = [
        [cxx, "-shared", "-o", str(out / LIBS[0]), *ffi_objs, "-Wl,-soname,libtvm_ffi.so",
         "-Wl,--no-undefined", "-pthread", "-ldl"],
        [cxx, "-shared", "-o", str(out / LIBS[1]), *rt_objs, "-Wl,-soname,libtvm_runtime.so",
         f"-L{out}", "-ltvm_ffi", "-Wl,--no-undefined", "-Wl,-rpath,$ORIGIN", "-pthread", "-ldl"],
    ]
    return compiles, links


def _key(cxx: str, src: Path) -> str:
    h = hashlib.blake2b(digest_size=8)
    ffi, rt = _sources()
    for p in (*ffi, *rt):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    for rel in MISSING_HEADERS:
        h.update(rel.encode() + b"\0" + (src / rel).read_bytes())
    import tvm
    import tvm_ffi
    # The wheel's own headers change with its version, not between installs of one version.
    h.update(f"{tvm.__version__} {tvm_ffi.__version__}".encode())
    compiles, links = _commands(cxx, Path("STAGE"), Path("OBJ"), Path("OUT"))
    h.update(repr((compiles, links)).encode())
    return h.hexdigest()


def _run(cmd: list[str]) -> None:
    r = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        src = cmd[cmd.index("-c") + 1] if "-c" in cmd else cmd[cmd.index("-o") + 1]
        raise ToolchainError(f"building the aarch64 TVM runtime failed at {Path(src).name}: "
                             f"{' '.join(r.stderr.split())[:600]}")


def build_tvm_runtime(build_dir: str | os.PathLike | None = None, jobs: int = 2,
                      progress=None) -> RuntimeBuild:
    """libtvm_ffi.so and libtvm_runtime.so for aarch64 Linux, built once per sources and
    commands; `progress(str)` hears one line per file (default: stderr)."""
    say = progress or (lambda s: print(s, file=sys.stderr, flush=True))
    cxx = cross_compiler()
    src = tvm_source()
    root = Path(build_dir) if build_dir is not None else BUILD_DIR
    folder = root / TARGET / f"tvm-{_key(cxx, src)}"
    if all((folder / lib).is_file() for lib in LIBS):
        return RuntimeBuild(folder, 0.0)
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        tmp = Path(tmp)
        stage, objs, out = tmp / "stage", tmp / "obj", tmp / "out"
        objs.mkdir()
        out.mkdir()
        _stage(stage, src)
        compiles, links = _commands(cxx, stage, objs, out)
        done = 0

        def one(cmd):
            _run(cmd)
            return Path(cmd[cmd.index("-c") + 1]).name

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for name in pool.map(one, compiles):
                done += 1
                say(f"[{done}/{len(compiles)}] {name} ({time.monotonic() - t0:.0f} s)")
        for cmd in links:
            _run(cmd)
            say(f"linked {Path(cmd[cmd.index('-o') + 1]).name}")
        if folder.exists():                 # a partial folder a killed build left
            shutil.rmtree(folder)
        os.replace(out, folder)
    return RuntimeBuild(folder, time.monotonic() - t0)


if __name__ == "__main__":
    b = build_tvm_runtime()
    print(f"{b.folder} ({b.seconds:.0f} s)")
