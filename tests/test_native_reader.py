"""The native flash reader (compile/native), built for this machine and loaded into this
process: it must return exactly what runtime_py.reader.FlashReader returns for any plan, fail
in one line on bad input, and build for android-arm64 without glibc."""
import re
import subprocess

import numpy as np
import pytest
import tvm
import tvm_ffi

from ripple.android_host.remote_reader import open_reader
from ripple.compile import native_reader as nr
from ripple.compile.elf import read_elf
from ripple.runtime_py.planner import plan_bundles, plan_reads
from ripple.runtime_py.reader import FlashReader

FILE_BYTES = 6 << 20


@pytest.fixture(scope="module")
def reader():
    return open_reader(None, "host")


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    path = tmp_path_factory.mktemp("native") / "model.rflash"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes())
    return str(path)


def random_plan(rng, bundle_bytes: int):
    """Extents of a random layer of a random region: runs, gaps, collapse, request splits,
    and the per-bundle plan whose extents share blocks."""
    n = int(rng.integers(8, 600))
    region = int(rng.integers(0, 64)) * 4096 + 4096
    n = min(n, (FILE_BYTES - region) // bundle_bytes)
    slots = np.flatnonzero(rng.random(n) < rng.uniform(0.02, 0.6))
    if rng.random() < 0.3:
        return plan_bundles(slots, region, bundle_bytes).extents
    return plan_reads(slots, region, bundle_bytes, 4096, max_gap_bytes=int(rng.choice([0, 4096, 65536])),
                      max_request_bytes=int(rng.choice([0, 16384, 131072]))).extents


def test_native_reader_returns_the_python_readers_bytes_under_random_plans(reader, flash):
    rng = np.random.default_rng(1)
    with FlashReader(flash, 8) as py:
        for i in range(40):
            ext = random_plan(rng, int(rng.choice([1152, 3456, 4096, 7000])))
            qd = int(rng.choice([1, 3, 8, 32]))
            sec, got = reader.read_extents(flash, ext, qd, fetch=True)
            want = py.read(ext).buffer
            assert sec >= 0 and got.dtype == np.uint8
            assert np.array_equal(got, want), f"plan {i}: {len(ext)} extents at qd {qd}"


def test_native_reader_refuses_unaligned_extents_and_reads_past_the_end(reader, flash):
    fn = reader.module[nr.READ_EXTENTS]
    with pytest.raises(Exception, match=r"extent 0 \(100, 4096\) is not a positive range aligned"):
        fn(flash, tvm.runtime.tensor(np.array([[100, 4096]], np.int64)), None, 4)
    with pytest.raises(Exception, match=rf"short read at offset {FILE_BYTES} .*truncated"):
        fn(flash, tvm.runtime.tensor(np.array([[FILE_BYTES - 4096, 8192]], np.int64)), None, 4)
    with pytest.raises(Exception, match=r"no-such-file: open failed: No such file"):
        fn(flash + ".no-such-file", tvm.runtime.tensor(np.zeros((1, 2), np.int64) + 4096), None, 1)
    with pytest.raises(Exception, match=r"out holds 4096 bytes, the extents need 8192"):
        fn(flash, tvm.runtime.tensor(np.array([[0, 8192]], np.int64)),
           tvm.runtime.tensor(np.zeros(4096, np.uint8)), 1)


def test_native_probe_sees_larger_requests_take_longer(reader, flash):
    small = reader.probe_cell(flash, 4096, 1, 0.1)
    large = reader.probe_cell(flash, 1 << 20, 1, 0.1)
    assert 0 < small < large


def test_native_prepare_writes_a_test_file_once(reader, tmp_path):
    path = str(tmp_path / "probe.bin")
    assert reader.prepare(path, 1 << 20) == 1 << 20
    before = open(path, "rb").read(4096)
    assert reader.prepare(path, 1 << 19) == 1 << 20     # big enough: kept as it is
    assert open(path, "rb").read(4096) == before and len(set(before)) > 200


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """2 layers x 300 neurons of d=64 SwiGLU fp16 bundles (384 bytes: runs cross blocks),
    placed in a random order."""
    from ripple.layout import BundleSpec
    from ripple.layout.pack import write_layout
    from ripple.layout.reader import open_layout
    spec, n, rng = BundleSpec("swiglu", 64, "fp16"), 300, np.random.default_rng(4)
    layers = [(rng.integers(0, 256, (n, spec.bundle_bytes), dtype=np.uint8), rng.permutation(n))
              for _ in range(2)]
    d = tmp_path_factory.mktemp("hook")
    write_layout(d, spec, layers, {}, "random", "native-hook-test")
    return open_layout(d)


def test_native_flash_hook_fills_the_graphs_buffer_like_the_python_hook(reader, layout):
    from ripple.runtime_py.engine import IOStats
    from ripple.runtime_py.tvm_ffn import FlashHook
    py = FlashHook()
    rng = np.random.default_rng(5)
    with FlashReader(str(layout.path), 8) as fr:
        py.bind(layout, fr, IOStats())
        reader.bind(str(layout.path), layout, 8)
        for _ in range(20):
            layer = int(rng.integers(0, 2))
            ids = rng.choice(300, int(rng.integers(1, 300)), replace=False)
            ids = layout.perm[layer][np.sort(layout.slot_of[layer][ids])]     # slot order, as the engine asks
            want = np.zeros((len(ids), 192), np.float16)
            py.read(layer, ids, want)
            got = tvm.runtime.tensor(np.zeros((len(ids), 192), np.float16))
            reader.hook_read(layer, ids, got)
            assert np.array_equal(got.numpy().view(np.uint8), want.view(np.uint8))
    assert reader.hook_stats()["calls"] == 20


def test_loading_the_reader_registers_its_globals_but_keeps_an_existing_flash_hook(reader, tmp_path):
    import shutil
    copy = tmp_path / "copy.so"      # another path: loaded afresh, its constructor runs again
    shutil.copyfile(reader.library, copy)
    old = tvm.get_global_func(nr.HOOK_GLOBAL, allow_missing=True)
    marker = []
    tvm.register_global_func(nr.HOOK_GLOBAL, lambda *a: marker.append(a), override=True)
    try:
        mod = nr.load_reader(copy)
        assert mod[nr.GLOBALS_FN]() == len(nr.GLOBALS) - 1
        tvm.get_global_func(nr.HOOK_GLOBAL)(0, 1, 2)
        assert marker == [(0, 1, 2)]                       # the host's hook stayed
        for name in nr.GLOBALS:
            assert tvm.get_global_func(name, allow_missing=True) is not None, name
        assert tvm.get_global_func("ripple.native.abi")() == nr.ABI
    finally:
        if old is not None:
            tvm.register_global_func(nr.HOOK_GLOBAL, old, override=True)
        else:
            tvm_ffi.registry.remove_global_func(nr.HOOK_GLOBAL)


def test_android_reader_is_an_aarch64_library_that_needs_only_bionic(tmp_path):
    so = nr.build_reader("android-arm64", tmp_path)
    info = read_elf(so)
    assert info.machine == "aarch64" and info.shared
    assert set(info.needed) <= {"libc.so", "libdl.so"}, info.needed
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", str(so)], capture_output=True, text=True,
                          check=True).stdout
    undefined = {ln.split()[-1] for ln in syms.splitlines() if re.search(r"\sUND\s", ln) and "GLOBAL" in ln}
    assert undefined and undefined <= nr.BIONIC_CALLS, undefined - nr.BIONIC_CALLS
    exported = {ln.split()[-1] for ln in syms.splitlines() if "__tvm_ffi_ripple" in ln}
    assert {f"__tvm_ffi_{f}" for f in (nr.PREPARE, nr.PROBE, nr.READ_EXTENTS, nr.BIND, nr.HOOK,
                                        nr.ABI_FN)} <= exported
