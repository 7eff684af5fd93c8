"""q4d8 kernels: the TVM sparse FFN reads Q4_1 gate/up blocks and the 8-bit down column as they
lie in the file and gives numpy's numbers for any k (one kernel); it cross-compiles for
android-arm64; the engine on a q4d8 layout of the embedded model computes the model with the
weights its bundles decode to, on both backends."""
import copy
import re
import subprocess

import numpy as np
import pytest
import torch

from ripple.android_host.interface import inspect_cmd, pack_cmd
from ripple.compile.build import build_graph, build_sparse
from ripple.compile.schedule import Knobs, valid
from ripple.compile.targets import export_library
from ripple.layout import BundleSpec, decode_bundles, open_layout
from ripple.runtime_py.engine import IOStats, flash_ffn
from ripple.runtime_py.reader import FlashReader
from ripple.runtime_py.tvm_ffn import tvm_ffn
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import to_torch
from ripple.tuning.kernels import random_bundles
from ripple.tuning.load_gguf import ffn_q4_1_rows
from ripple.tuning.sparsity import ALL_ACTIVE

from conftest import embedded_gguf
from test_kernels_q4 import assert_close, reference, run_kernel, step_logits

D, N = 64, 48
SPECS = [BundleSpec("swiglu", D, "q4d8"), BundleSpec("relu", D, "q4d8", True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.activation}-bias{int(s.has_up_bias)}")
def test_q4d8_kernel_matches_numpy_for_active_sets_from_none_to_all(spec):
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
], ids=["split-k-wide", "wide-lanes-narrow-down"])
def test_q4d8_kernel_under_other_schedules_computes_the_same_ffn(knobs):
    """Down vectors wider than a scale's 32 values are unrolled blocks (compile.schedule.Q8_RUN)."""
    spec = SPECS[0]
    assert valid(knobs, D)
    lib = build_sparse(spec, knobs=knobs)
    raw = random_bundles(spec, N, seed=3)[:29]
    x = np.random.default_rng(4).standard_normal(D).astype(np.float32)
    assert_close(run_kernel(lib, spec, raw, x), reference(spec, raw, x))


def test_q4d8_graph_cross_compiles_for_android_without_glibc(tmp_path):
    so = tmp_path / "ffn_q4d8.so"
    export_library(build_graph(SPECS[0], "android-arm64"), so, "android-arm64")
    out = subprocess.run(["file", "-b", str(so)], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ELF 64-bit LSB shared object, ARM aarch64"), out
    dyn = subprocess.run(["readelf", "-d", "-W", str(so)], capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)) <= {"libc.so", "libm.so"}


@pytest.fixture(scope="module")
def q4d8_smollm2(tmp_path_factory):
    """The embedded model packed by `ripple pack --dtype q4d8`, and the model with its FFN
    weights replaced by what the bundles decode to (gate/up: the GGUF's own; down: 8-bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("q4d8")
    summary = pack_cmd(None, str(out), dtype="q4d8")
    layout = open_layout(out)
    desc = load_model(embedded_gguf())
    dq = copy.copy(desc)
    dq.layers = [copy.copy(lw) for lw in desc.layers]
    with open(layout.path, "rb") as f:
        for layer, lw in enumerate(dq.layers):
            f.seek(int(layout.region_offsets[layer]))
            raw = np.frombuffer(f.read(desc.d_ffn * layout.bundle_bytes), np.uint8)
            b = decode_bundles(layout.spec, raw.reshape(desc.d_ffn, -1)[layout.slot_of[layer]])
            lw.w_gate, lw.w_up, lw.w_down = b.gate, b.up, np.ascontiguousarray(b.down_t.T)
    yield summary, layout, desc, dq
    torch.set_num_threads(threads)


def test_pack_q4d8_carries_gguf_gate_up_and_reports_down_error(q4d8_smollm2):
    summary, layout, desc, dq = q4d8_smollm2
    assert summary["dtype"] == "q4d8" and summary["bundle_bytes"] == 2 * 360 + 576 + 36
    q = summary["quantization"]
    assert q["gate_up_verbatim"] is True
    assert q["parts"]["gate"]["max_abs_err"] == 0 and q["parts"]["up"]["max_abs_err"] == 0
    down = q["parts"]["down"]
    assert 0 < down["rel_rms_err"] < 0.01 and down["max_err_over_half_step"] <= 1
    measured = max(np.abs(a.w_down - b.w_down).max() for a, b in zip(desc.layers, dq.layers))
    assert down["max_abs_err"] == pytest.approx(measured, rel=1e-6)
    # gate/up bytes in the file are the GGUF's rows (layer 0, slot order = placement).
    with open(layout.path, "rb") as f:
        f.seek(int(layout.region_offsets[0]))
        raw = np.frombuffer(f.read(desc.d_ffn * layout.bundle_bytes), np.uint8).reshape(desc.d_ffn, -1)
    gguf = ffn_q4_1_rows(embedded_gguf(), 1)[0]
    rows = raw[layout.slot_of[0]]
    np.testing.assert_array_equal(rows[:, :360], gguf["gate"])
    np.testing.assert_array_equal(rows[:, 360:720], gguf["up"])
    info = inspect_cmd(str(layout.path.parent))
    assert info["dtype"] == "q4d8" and info["quantization"] == q


@pytest.mark.parametrize("backend", ["torch", "tvm"])
def test_engine_on_q4d8_layout_matches_reference_with_the_decoded_weights(q4d8_smollm2, backend):
    _, layout, desc, dq = q4d8_smollm2
    tm = to_torch(desc)
    make = flash_ffn if backend == "torch" else tvm_ffn
    all_active = np.full(desc.n_layers, ALL_ACTIVE)
    with FlashReader(layout.path) as reader:
        ours = step_logits(tm, lambda: make(tm, layout, reader, all_active, "coef", IOStats()))
    ref = step_logits(to_torch(dq), lambda: None)
    # Same float32 weights, sums in another order; the q4 test's tolerances (a wrong nibble,
    # scale or slot moves logits spanning ~55 by whole units).
    np.testing.assert_allclose(ours, ref, atol=2e-3 if backend == "torch" else 5e-3, rtol=0)
