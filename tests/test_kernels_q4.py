"""q4 kernels: the TVM sparse FFN reads Q4_1 blocks as they lie in the file and gives numpy's
numbers for any k (one kernel); it cross-compiles for android-arm64; the engine on a q4 layout
of the embedded model computes the model with those dequantized weights, on both backends."""
import copy
import re
import subprocess

import numpy as np
import pytest
import torch
import tvm

from ripple.android_host.interface import inspect_cmd, pack_cmd
from ripple.compile.build import build_graph, build_sparse
from ripple.compile.schedule import Knobs, valid
from ripple.compile.targets import export_library
from ripple.layout import BundleSpec, decode_bundles, open_layout
from ripple.runtime_py.engine import IOStats, flash_ffn, generate
from ripple.runtime_py.reader import FlashReader
from ripple.runtime_py.tvm_ffn import tvm_ffn
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import forward, new_cache, to_torch
from ripple.tuning.kernels import kernel_view, random_bundles
from ripple.tuning.sparsity import ALL_ACTIVE

from conftest import embedded_gguf

D, N = 64, 48
SPECS = [BundleSpec("swiglu", D, "q4"), BundleSpec("relu", D, "q4", True)]


def reference(spec, raw, x):
    b = decode_bundles(spec, raw)
    u = b.up.astype(np.float64) @ x + (b.up_bias if b.up_bias is not None else 0)
    if spec.activation == "swiglu":
        g = b.gate.astype(np.float64) @ x
        a = g / (1 + np.exp(-g)) * u
    else:
        a = np.maximum(u, 0)
    return a @ b.down_t


def run_kernel(lib, spec, raw, x):
    y = tvm.runtime.tensor(np.full(spec.d_model, np.nan, np.float32))   # k=0 must write zeros
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(kernel_view(spec, raw)), y)
    return y.numpy()


def assert_close(got, want):
    # float32 sums in another order (step applied per block, minimum via block sums of x).
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(np.abs(want).max(), 1.0))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.activation}-bias{int(s.has_up_bias)}")
def test_q4_kernel_matches_numpy_for_random_active_sets_from_none_to_all(spec):
    lib = build_sparse(spec)
    raw_all = random_bundles(spec, N, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(D).astype(np.float32)
    for k in (0, 1, 7, 29, N):
        raw = raw_all[np.sort(rng.choice(N, k, replace=False))]
        got = run_kernel(lib, spec, raw, x)
        if k == 0:
            np.testing.assert_array_equal(got, np.zeros(D, np.float32))
        else:
            assert_close(got, reference(spec, raw, x))


@pytest.mark.parametrize("knobs", [
    Knobs(down="k", down_split=4, down_vec=64),
    Knobs(lanes=64, rows=1, down_vec=8, down_chunk=2),
    Knobs(lanes=8, rows=64, down_vec=32, down_chunk=2),
], ids=["split-k-wide", "wide-lanes", "narrow-lanes"])
def test_q4_kernel_under_other_schedules_computes_the_same_ffn(knobs):
    """Lanes wider than a 16-nibble run are unrolled runs of 16 (compile.schedule.Q4_RUN)."""
    spec = SPECS[0]
    assert valid(knobs, D)
    lib = build_sparse(spec, knobs=knobs)
    raw = random_bundles(spec, N, seed=3)[:29]
    x = np.random.default_rng(4).standard_normal(D).astype(np.float32)
    assert_close(run_kernel(lib, spec, raw, x), reference(spec, raw, x))


def test_q4_graph_cross_compiles_for_android_without_glibc(tmp_path):
    so = tmp_path / "ffn_q4.so"
    export_library(build_graph(BundleSpec("swiglu", D, "q4"), "android-arm64"), so, "android-arm64")
    out = subprocess.run(["file", "-b", str(so)], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ELF 64-bit LSB shared object, ARM aarch64"), out
    dyn = subprocess.run(["readelf", "-d", "-W", str(so)], capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)) <= {"libc.so", "libm.so"}


@pytest.fixture(scope="module")
def q4_smollm2(tmp_path_factory):
    """The embedded model packed as q4 by `ripple pack --dtype q4`, and the model with its FFN
    weights replaced by what the bundles decode to (gate/up: the GGUF's own; down: requantized)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("q4")
    summary = pack_cmd(None, str(out), dtype="q4")
    layout = open_layout(out)
    desc = load_model(embedded_gguf())
    dq = copy.copy(desc)
    dq.layers = [copy.copy(lw) for lw in desc.layers]
    for layer, lw in enumerate(dq.layers):
        with open(layout.path, "rb") as f:
            f.seek(int(layout.region_offsets[layer]))
            raw = np.frombuffer(f.read(desc.d_ffn * layout.bundle_bytes), np.uint8)
        b = decode_bundles(layout.spec, raw.reshape(desc.d_ffn, -1)[layout.slot_of[layer]])
        lw.w_gate, lw.w_up, lw.w_down = b.gate, b.up, np.ascontiguousarray(b.down_t.T)
    yield summary, layout, desc, dq
    torch.set_num_threads(threads)


def test_pack_q4_says_dtype_verbatim_gate_up_and_down_error(q4_smollm2):
    summary, layout, desc, dq = q4_smollm2
    assert summary["dtype"] == "q4" and summary["bundle_bytes"] == 3 * 576 // 32 * 20
    q = summary["quantization"]
    assert q["gate_up_verbatim"] is True
    assert q["parts"]["gate"]["max_abs_err"] == 0 and q["parts"]["up"]["max_abs_err"] == 0
    down = q["parts"]["down"]
    assert 0 < down["rel_rms_err"] < 0.2 and down["max_err_over_half_step"] <= 1.05
    measured = max(np.abs(a.w_down - b.w_down).max() for a, b in zip(desc.layers, dq.layers))
    assert down["max_abs_err"] == pytest.approx(measured, rel=1e-6)
    info = inspect_cmd(str(layout.path.parent))
    assert info["dtype"] == "q4" and info["quantization"] == q
    assert info["ffn_bytes_per_token"]["dense"] == 30 * 1536 * layout.bundle_bytes


TOKENS = [1, 9690, 198, 2683, 359, 253, 5356, 30, 2, 198]


def step_logits(tm, make_ffn):
    cache = new_cache(tm, 1, len(TOKENS))
    out = [forward(tm, torch.tensor([TOKENS[:4]]), cache, make_ffn())[0, -1]]
    for t in TOKENS[4:]:
        out.append(forward(tm, torch.tensor([[t]]), cache, make_ffn())[0, -1])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("backend", ["torch", "tvm"])
def test_engine_on_q4_layout_matches_reference_with_the_dequantized_weights(q4_smollm2, backend):
    _, layout, desc, dq = q4_smollm2
    tm = to_torch(desc)
    make = flash_ffn if backend == "torch" else tvm_ffn
    all_active = np.full(desc.n_layers, ALL_ACTIVE)
    with FlashReader(layout.path) as reader:
        ours = step_logits(tm, lambda: make(tm, layout, reader, all_active, "coef", IOStats()))
    ref = step_logits(to_torch(dq), lambda: None)
    # Same float32 weights, sums in another order (TVM: per-block steps and minimums, 30 layers
    # deep); measured max 5e-5 (torch) and 5e-4 (tvm) on logits spanning ~55, while a wrong
    # nibble, block or slot moves them by whole units.
    np.testing.assert_allclose(ours, ref, atol=2e-3 if backend == "torch" else 5e-3, rtol=0)


def test_tvm_and_torch_backends_generate_the_same_tokens_from_q4(q4_smollm2):
    _, layout, desc, _ = q4_smollm2
    tm = to_torch(desc)
    thr = np.full(desc.n_layers, ALL_ACTIVE)
    runs = {}
    for backend in ("torch", "tvm"):
        with FlashReader(layout.path, 8) as reader:
            runs[backend] = generate(tm, layout, reader, thr, "coef", TOKENS[:6], 4, backend=backend)
    assert runs["tvm"].tokens == runs["torch"].tokens and runs["torch"].tokens
    assert runs["tvm"].steps[0].bytes_needed == desc.n_layers * desc.d_ffn * layout.bundle_bytes
