"""The TVM FFN kernels: same numbers as numpy on the bundle bytes as they lie in the file, for
any k with one compiled kernel; the Relax graph reads through the flash hook."""
import numpy as np
import pytest
import tvm
from tvm import relax

from ripple.compile.build import build_dense, build_graph
from ripple.compile.graph import FLASH_READ
from ripple.compile.schedule import SPACE, Knobs, valid
from ripple.layout import BundleSpec, decode_bundles, write_layout
from ripple.layout.reader import open_layout
from ripple.runtime_py import tvm_ffn
from ripple.runtime_py.engine import IOStats
from ripple.runtime_py.reader import FlashReader
from ripple.tuning.kernels import kernel_view, random_bundles

from kernel_cases import N, assert_close, check_keep_threshold, check_random_active_sets, check_schedule, reference

D = 64
SPECS = [BundleSpec("swiglu", D, "fp16"), BundleSpec("swiglu", D, "int8"),
         BundleSpec("relu", D, "fp16", True), BundleSpec("relu", D, "int8", True),
         BundleSpec("relu", D, "fp16", False)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.activation}-{s.dtype}-bias{int(s.has_up_bias)}")
def test_one_sparse_kernel_matches_numpy_for_every_k(spec):
    check_random_active_sets(spec, (1, 7, N))


@pytest.mark.parametrize("spec, keep", [(SPECS[0], "coef"), (SPECS[1], "gate"), (SPECS[3], "coef")],
                         ids=["swiglu-fp16-coef", "swiglu-int8-gate", "relu-int8-coef"])
def test_thresholded_kernel_keeps_only_neurons_whose_own_score_clears_it(spec, keep):
    check_keep_threshold(spec, keep)


@pytest.mark.parametrize("knobs", [
    Knobs(down="k", down_split=4, down_vec=16),
    Knobs(lanes=64, rows=1, down_vec=8, down_chunk=4),
    Knobs(lanes=8, rows=64, down_vec=32, down_chunk=2),
], ids=["split-k", "wide-lanes", "narrow-lanes"])
def test_other_schedules_compute_the_same_ffn(knobs):
    assert valid(knobs, D) and all(getattr(knobs, f) in SPACE[f] for f in SPACE)
    check_schedule(BundleSpec("swiglu", D, "int8"), knobs)


@pytest.mark.parametrize("activation, bias", [("swiglu", False), ("relu", True)])
def test_dense_kernel_matches_numpy(activation, bias):
    spec = BundleSpec(activation, D, "fp16", bias)
    raw = random_bundles(spec, N, seed=5)
    b = decode_bundles(spec, raw)
    x = np.random.default_rng(6).standard_normal(D).astype(np.float32)
    mats = ([b.gate] if b.gate is not None else []) + [b.up] + ([b.up_bias] if bias else []) \
        + [np.ascontiguousarray(b.down_t.T)]
    y = tvm.runtime.tensor(np.zeros(D, np.float32))
    build_dense(activation, D, N, bias)["main"](
        tvm.runtime.tensor(x), *[tvm.runtime.tensor(m.astype(np.float16)) for m in mats], y)
    assert_close(y.numpy(), reference(spec, raw, x))


@pytest.fixture
def recording_hook():
    """Registers a hook that records its calls; the runtime's own hook is put back after."""
    calls = []
    yield calls
    tvm.register_global_func(FLASH_READ, tvm_ffn.HOOK, override=True)


def test_layer_graph_reads_the_active_ids_through_the_flash_hook(recording_hook):
    spec = BundleSpec("swiglu", D, "fp16")
    raw_all = random_bundles(spec, N, seed=7)

    def hook(layer, ids, out):
        got = np.from_dlpack(ids).copy()
        recording_hook.append((int(layer), got.tolist()))
        np.from_dlpack(out)[...] = kernel_view(spec, raw_all[got])
    tvm.register_global_func(FLASH_READ, hook, override=True)
    vm = relax.VirtualMachine(build_graph(spec), tvm.cpu())   # resolves the hook now
    x = np.random.default_rng(8).standard_normal(D).astype(np.float32)
    ids = np.array([2, 11, 30, 47], np.int64)
    y = vm["main"](5, tvm.runtime.tensor(ids), tvm.runtime.tensor(x)).numpy()
    assert recording_hook == [(5, [2, 11, 30, 47])]
    assert_close(y, reference(spec, raw_all[ids], x))
    y0 = vm["main"](1, tvm.runtime.tensor(np.zeros(0, np.int64)), tvm.runtime.tensor(x)).numpy()
    assert recording_hook[-1] == (1, []) and not y0.any()


def test_flash_hook_fills_the_buffer_with_the_bundles_as_in_the_file(tmp_path):
    spec = BundleSpec("swiglu", D, "int8")
    raw = [random_bundles(spec, N, seed=10 + layer) for layer in range(2)]
    perms = [np.random.default_rng(20 + layer).permutation(N) for layer in range(2)]
    write_layout(tmp_path, spec, list(zip(raw, perms)), {}, "mem", "00" * 16)
    layout = open_layout(tmp_path)
    stats = IOStats()
    ids = np.array([40, 3, 17], np.int64)
    out = np.zeros((3, spec.bundle_bytes), np.int8)
    with FlashReader(layout.path, 4, o_direct=False) as reader:
        hook = tvm_ffn.FlashHook()
        hook.bind(layout, reader, stats)
        hook.read(1, ids, out)
    in_slot_order = ids[np.argsort(layout.slot_of[1][ids])]
    np.testing.assert_array_equal(out.view(np.uint8), raw[1][in_slot_order])
    assert stats.active == 3 and stats.bytes_needed == 3 * spec.bundle_bytes
    assert stats.bytes_read >= stats.bytes_needed and stats.reads >= 1
