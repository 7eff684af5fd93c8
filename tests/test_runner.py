"""ripple-run, the native runner (compile/native/ripple_run.cc), against a toy APP folder built
here with Relax: the same prefill/decode signature as the real model (tokens, kv written in
place, pos shape, params tuple -> logits (1, V)), whose greedy next id is (sum of every token
the kv holds + params' offset) % V, so a kv the runner failed to keep across calls changes
the ids. The hooked variant calls ripple.rt.fetch, a packed global of a toy runtime library
(built here) whose ripple.rt.open reads runtime.bin into the logits and whose ripple.rt.stats
counts fixed figures per call.

The runner must decode what a Python loop over the same VM decodes, report sane figures, fail
in one line with exit code 2 on bad input, and need no libpython."""
import ctypes
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.script import tirx as T

from ripple.compile.errors import ToolchainError
from ripple.compile.runner import build_runner, runtime_libraries

L, KVD, V = 2, 4, 32
OFFSET = 3
PARAMS = {"offset": np.array([OFFSET], "int32"),
          "bias": (np.arange(V) % 7).astype("uint8"),
          "scale": np.array([0.01], "float16")}
RUNTIME_BIN = (np.arange(V, dtype="float32") % 5) * 1e-4     # below the bias steps: argmax keeps
# What the toy runtime's ripple.rt.stats adds per ripple.rt.fetch call of n tokens (see RT_SOURCE).
IO_WAIT_S, BYTES_READ, READS, ACTIVE = 0.001, 4096, 1, 10

RT_SOURCE = r"""
#include <cstring>
#include <fstream>
#include <string>
#include <vector>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
namespace ffi = tvm::ffi;
static std::vector<float> table;
static double st[24];
__attribute__((constructor)) static void register_globals() {
  ffi::Function::SetGlobal("ripple.rt.open", ffi::Function::FromTyped([](ffi::String path) {
    std::ifstream f(std::string(path), std::ios::binary | std::ios::ate);
    if (!f) TVM_FFI_THROW(ValueError) << "cannot open " << path;
    size_t size = f.tellg();
    f.seekg(0);
    table.resize(size / 4);
    f.read(reinterpret_cast<char*>(table.data()), size);
    std::memset(st, 0, sizeof st);
    st[9] = 8192; st[10] = double(size); st[11] = 1; st[12] = 2;
  }));
  ffi::Function::SetGlobal("ripple.rt.fetch", ffi::Function::FromTyped([](ffi::Tensor tokens, ffi::Tensor out) {
    if (table.empty()) TVM_FFI_THROW(RuntimeError) << "ripple.rt.open was not called";
    double n = double(tokens.numel());
    float* o = static_cast<float*>(out.data_ptr());
    for (int64_t i = 0; i < out.numel(); ++i) o[i] = table[i % table.size()];
    st[0] += 0.001 * n; st[1] += 0.002 * n; st[2] += 4096 * n; st[3] += 1000 * n;
    st[4] += n; st[5] += 10 * n; st[7] += 1;
  }));
  ffi::Function::SetGlobal("ripple.rt.stats", ffi::Function::FromTyped([](ffi::Tensor out) {
    std::memcpy(out.data_ptr(), st, sizeof st);
  }));
}
"""


@T.prim_func
def write_kv(var_kv: T.handle, var_tok: T.handle, p: T.int64, var_seen: T.handle):
    m = T.int64()
    n = T.int64()
    kv = T.match_buffer(var_kv, (L, 2, m, KVD), "float32")
    tok = T.match_buffer(var_tok, (n,), "int32")
    seen = T.match_buffer(var_seen, (1,), "float32")
    for i, l in T.grid(n, L):
        kv[l, 0, p + i, 0] = T.Cast("float32", tok[i])
        kv[l, 1, p + i, 0] = T.Cast("float32", p + i)
    seen[0] = T.float32(0)
    for j in range(p + n):
        seen[0] = seen[0] + kv[L - 1, 0, j, 0]


@T.prim_func
def toy_logits(seen: T.Buffer((1,), "float32"), off: T.Buffer((1,), "int32"),
               bias: T.Buffer((V,), "uint8"), scale: T.Buffer((1,), "float16"),
               fetched: T.Buffer((V,), "float32"), out: T.Buffer((1, V), "float32")):
    for v in range(V):
        hit = T.Cast("int32", v) == T.truncmod(T.Cast("int32", seen[0]) + off[0], V)
        out[0, v] = (T.Select(hit, T.float32(10), T.float32(0))
                     + T.Cast("float32", bias[v]) * T.Cast("float32", scale[0]) + fetched[v])


@T.prim_func
def no_fetch(out: T.Buffer((V,), "float32")):
    for v in range(V):
        out[v] = T.float32(0)


def toy_module(hook: bool) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    gw = bb.add_func(write_kv, "write_kv")
    gl = bb.add_func(toy_logits, "toy_logits")
    gz = bb.add_func(no_fetch, "no_fetch")
    p_types = [relax.TensorType(list(a.shape), str(a.dtype)) for a in PARAMS.values()]
    for name in ("prefill", "decode"):
        n = tirx.Var("n", "int64") if name == "prefill" else 1
        m, p = tirx.Var("m", "int64"), tirx.Var("p", "int64")
        kv_ty = relax.TensorType([L, 2, m, KVD], "float32")
        tokens = relax.Var("tokens", relax.TensorType([n], "int32"))
        kv = relax.Var("kv", kv_ty)
        pos = relax.Var("pos", relax.ShapeType([p]))
        params = relax.Var("params", relax.TupleType(p_types))
        with bb.function(name, [tokens, kv, pos, params], pure=False):
            res = bb.emit(relax.op.call_tir_inplace(
                gw, relax.Tuple([kv, tokens, relax.prim_value(p)]), [0, -1],
                [kv_ty, relax.TensorType([1], "float32")]))
            fetch_ty = relax.TensorType([V], "float32")
            fetched = bb.emit(relax.call_dps_packed("ripple.rt.fetch", relax.Tuple([tokens]), out_ty=fetch_ty)
                              if hook else relax.call_tir(gz, relax.Tuple([]), out_ty=fetch_ty))
            args = [relax.TupleGetItem(res, 1)] + [relax.TupleGetItem(params, i) for i in range(len(p_types))]
            out = bb.emit(relax.call_tir(gl, relax.Tuple([*args, fetched]),
                                         out_ty=relax.TensorType([1, V], "float32")))
            bb.emit_func_output(out)
    return bb.get()


def write_app(folder, hook: bool, rt_lib=None, eos=(V + 100,)):
    """An APP folder as `ripple compile` writes it; with hook, the toy runtime beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    tvm.compile(toy_module(hook), target="llvm").export_library(str(folder / "model.so"))
    blob, tensors = bytearray(), []
    for name, a in PARAMS.items():
        blob += bytes(-len(blob) % 64)
        tensors.append({"name": name, "shape": list(a.shape), "dtype": str(a.dtype),
                        "offset": len(blob), "nbytes": a.nbytes})
        blob += a.tobytes()
    (folder / "params.bin").write_bytes(bytes(blob))
    app = {"format": 1, "library": "model.so",
           "params": {"file": "params.bin", "tensors": tensors},
           "functions": {"prefill": {"name": "prefill"}, "decode": {"name": "decode"}},
           "kv": {"shape": [L, 2, None, KVD], "dtype": "float32"},
           "eos_token_ids": list(eos), "vocab": V, "max_positions": 64}
    if hook:
        shutil.copy(rt_lib, folder / "libripple_runtime.so")
        (folder / "runtime.bin").write_bytes(RUNTIME_BIN.tobytes())
        app |= {"runtime_library": "libripple_runtime.so", "runtime_config": "runtime.bin"}
    (folder / "app.json").write_text(json.dumps(app, indent=1))
    return folder


def python_decode(folder, prompt, tokens, eos=()):
    """The greedy loop the runner runs, over the same VM in a Python process: (ids, logits).
    A process of its own: the toy runtime registers ripple.rt.* globals, which must not replace
    the real runtime's in this one (other tests' APPs resolve them by name)."""
    from multiprocessing import get_context
    with get_context("spawn").Pool(1) as pool:
        return pool.apply(_python_decode, (folder, prompt, tokens, eos))


def _python_decode(folder, prompt, tokens, eos):
    app = json.loads((folder / "app.json").read_text())
    if "runtime_library" in app:
        ctypes.CDLL(str(folder / app["runtime_library"]), mode=ctypes.RTLD_GLOBAL)
        tvm_ffi.get_global_func("ripple.rt.open")(str(folder / app["runtime_config"]))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in PARAMS.values()]
    kv = tvm.runtime.tensor(np.zeros((L, 2, len(prompt) + tokens, KVD), "float32"))
    out = vm["prefill"](tvm.runtime.tensor(np.array(prompt, "int32")), kv,
                        tvm.runtime.ShapeTuple([0]), params).numpy()
    ids, logits = [int(out.argmax())], [out[0]]
    while len(ids) < tokens and ids[-1] not in eos:
        out = vm["decode"](tvm.runtime.tensor(np.array(ids[-1:], "int32")), kv,
                           tvm.runtime.ShapeTuple([len(prompt) + len(ids) - 1]), params).numpy()
        ids.append(int(out.argmax()))
        logits.append(out[0])
    return ids, np.stack(logits)


@pytest.fixture(scope="module")
def runner():
    return build_runner("host")


@pytest.fixture(scope="module")
def rt_lib(tmp_path_factory):
    import tvm_ffi as ffi_pkg
    folder = tmp_path_factory.mktemp("rt")
    (folder / "rt.cc").write_text(RT_SOURCE)
    ffi = os.path.dirname(ffi_pkg.__file__)
    subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-isystem", f"{ffi}/include",
                    "-o", str(folder / "librt.so"), str(folder / "rt.cc"), f"-L{ffi}/lib", "-ltvm_ffi"],
                   check=True)
    return folder / "librt.so"


@pytest.fixture(scope="module")
def hooked_app(tmp_path_factory, rt_lib):
    return write_app(tmp_path_factory.mktemp("app") / "APP", hook=True, rt_lib=rt_lib)


@pytest.fixture(scope="module")
def plain_app(tmp_path_factory):
    return write_app(tmp_path_factory.mktemp("app") / "APP", hook=False)


def run(runner, app, tmp_path, *args, prompt="1,2,3", tokens=6, check=True):
    out = tmp_path / "run.json"
    cmd = [str(runner), "--prompt-ids", prompt, "--tokens", str(tokens), "--json", str(out)]
    if app is not None:
        cmd += ["--app", str(app)]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
        return json.loads(out.read_text())
    return r, out


def test_runner_decodes_the_ids_and_logits_of_a_python_loop_over_the_same_vm(runner, hooked_app, tmp_path):
    dump = tmp_path / "logits.f32"
    got = run(runner, hooked_app, tmp_path, "--dump-logits", str(dump), tokens=8)
    want_ids, want_logits = python_decode(hooked_app, [1, 2, 3], 8)
    assert got["ids"] == want_ids and len(set(want_ids)) > 3
    logits = np.fromfile(dump, "<f4").reshape(-1, V)
    assert logits.shape == (8, V)
    np.testing.assert_array_equal(logits, want_logits)
    # bias[1] * scale + runtime.bin[1]: the params and the runtime's file reached the model
    assert logits[0, 1] == pytest.approx(float(np.float16(0.01)) + RUNTIME_BIN[1], abs=1e-7)


def test_runner_without_a_runtime_library_skips_open_and_stats(runner, plain_app, tmp_path):
    got = run(runner, plain_app, tmp_path, prompt="5,4", tokens=5)
    assert got["ids"] == python_decode(plain_app, [5, 4], 5)[0]
    assert got["runtime_stats"] is False and got["o_direct"] is False
    assert got["io_wait_ms"] == got["bytes_read"] == [0] * 4


def test_runner_reports_per_token_figures_from_the_runtime_stats(runner, hooked_app, tmp_path):
    got = run(runner, hooked_app, tmp_path, "--threads", "1", "--max-len", "20", prompt="1,2,3,4", tokens=5)
    n = len(got["ids"]) - 1
    assert len(got["ids"]) == 5 and len(got["token_ms"]) == n
    assert all(t > 0 for t in got["token_ms"]) and got["prefill_ms"] > 0
    assert got["prefill_tokens_per_s"] == pytest.approx(4 / (got["prefill_ms"] / 1e3), rel=1e-3)
    assert got["io_wait_ms"] == pytest.approx([IO_WAIT_S * 1e3] * n)
    assert got["bytes_read"] == [BYTES_READ] * n and got["reads"] == [READS] * n
    assert got["active_neurons"] == [ACTIVE] * n
    assert got["prefill_io"]["bytes_read"] == 4 * BYTES_READ and got["prefill_io"]["reads"] == 4
    assert got["dram_bytes"] == {"params": sum(a.nbytes for a in PARAMS.values()),
                                 "kv": L * 2 * 20 * KVD * 4, "runtime_pinned": 8192,
                                 "runtime_buffers": RUNTIME_BIN.nbytes}
    assert got["o_direct"] is True and got["runtime_stats"] is True
    assert got["peak_rss_bytes"] >= got["rss_bytes"] > 0
    assert got["threads"] == 1 and got["max_len"] == 20
    assert got["prompt_ids"] == [1, 2, 3, 4] and got["app"] == str(hooked_app.resolve())
    assert got["runner"] == "ripple-run"


def test_runner_stops_after_an_eos_id(runner, plain_app, tmp_path):
    ids = python_decode(plain_app, [1, 2, 3], 8)[0]
    eos = ids[3]
    app = tmp_path / "APP"
    shutil.copytree(plain_app, app)
    edit_app(app, eos_token_ids=[eos])
    got = run(runner, app, tmp_path, tokens=8)
    assert got["ids"] == ids[:ids.index(eos) + 1] and len(got["token_ms"]) == len(got["ids"]) - 1


def test_runner_in_its_app_folder_uses_the_libraries_beside_it_and_no_python(runner, hooked_app, tmp_path):
    app = tmp_path / "APP"
    shutil.copytree(hooked_app, app)
    for lib in [runner, *runtime_libraries()]:
        shutil.copy(lib, app / lib.name)
    exe = app / "ripple-run"
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, check=True).stdout
    for lib in ("libtvm_runtime.so", "libtvm_ffi.so"):
        assert f"{lib} => {app}/{lib}" in ldd, ldd
    assert "libpython" not in ldd
    dynamic = subprocess.run(["readelf", "-d", str(exe)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", dynamic)
    assert {"libtvm_runtime.so", "libtvm_ffi.so"} <= set(needed)
    assert not [n for n in needed if "python" in n], needed
    assert re.search(r"\((RUNPATH|RPATH)\).*\[\$ORIGIN:", dynamic), dynamic
    got = run(exe, None, tmp_path, tokens=4)            # --app: the folder the runner is in
    assert got["app"] == str(app.resolve()) and got["ids"] == python_decode(hooked_app, [1, 2, 3], 4)[0]


def edit_app(app, **fields):
    """app.json with these fields replaced (None: removed)."""
    meta = json.loads((app / "app.json").read_text()) | fields
    (app / "app.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def truncate_params(app):
    data = (app / "params.bin").read_bytes()
    (app / "params.bin").write_bytes(data[:-5])


@pytest.mark.parametrize("case, args, breaks, says", [
    ("missing app.json", (), lambda app: (app / "app.json").unlink(), "app.json: not found"),
    ("truncated params", (), truncate_params, "params.bin: .* but tensor 'scale' ends at"),
    ("bad prompt ids", ("--prompt-ids", "1,x,3"), None, "--prompt-ids 1,x,3: 'x' is not a token id"),
    ("unknown flag", ("--top-k", "4"), None, "unknown argument '--top-k'"),
    ("max-len too small", ("--max-len", "4"), None, "--max-len 4 is below prompt \\+ tokens = 9"),
    ("missing runtime library", (), lambda app: (app / "libripple_runtime.so").unlink(),
     "libripple_runtime.so: not found \\(app.json runtime_library\\)"),
    ("runtime_config without a runtime", (), lambda app: edit_app(app, runtime_library=None),
     "app.json has a runtime_config but no ripple.rt.open/ripple.rt.stats is registered"),
])
def test_runner_rejects_bad_input_in_one_line_with_exit_code_2(runner, hooked_app, tmp_path,
                                                                case, args, breaks, says):
    app = tmp_path / "APP"
    shutil.copytree(hooked_app, app)
    if breaks:
        breaks(app)
    r, out = run(runner, app, tmp_path, *args, check=False)
    assert r.returncode == 2, (case, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ripple-run: error: "), r.stderr
    assert re.search(says, lines[0]), lines[0]
    assert not out.exists() and not list(tmp_path.glob("run.json*"))


def test_runner_reports_an_error_raised_by_the_model_in_one_line_with_exit_code_1(runner, plain_app, tmp_path):
    app = tmp_path / "APP"
    shutil.copytree(plain_app, app)
    edit_app(app, kv={"shape": [L, 2, None, KVD], "dtype": "float16"})   # the model's is float32
    r, out = run(runner, app, tmp_path, check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("ripple-run: error: ") and "float" in r.stderr
    assert not out.exists()


def test_runner_builds_for_host_only():
    with pytest.raises(ToolchainError, match="ripple-run builds for host only, not 'android-arm64'"):
        build_runner("android-arm64")
