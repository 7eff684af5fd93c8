"""q4 and q4d8 kernels: the TVM sparse FFN reads Q4_1 gate/up blocks and the down column (Q4_1
for q4, 8-bit for q4d8) as they lie in the file and gives numpy's numbers for any k (one
kernel); it cross-compiles for android-arm64; the engine on a q4 or q4d8 layout of the embedded
model computes the model with the weights its bundles decode to, on both backends."""
import copy

import numpy as np
import pytest
import torch

from ripple.android_host.interface import inspect_cmd, pack_cmd
from ripple.compile.schedule import Knobs, valid
from ripple.layout import BundleSpec, decode_bundles, open_layout
from ripple.runtime_py.backends import ffn_backend
from ripple.runtime_py.engine import IOStats, flash_ffn, generate
from ripple.runtime_py.reader import FlashReader
from ripple.runtime_py.tvm_ffn import tvm_ffn
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import to_torch
from ripple.tuning.load_gguf import ffn_q4_1_rows
from ripple.tuning.sparsity import ALL_ACTIVE

from conftest import embedded_gguf
from kernel_cases import (N, check_android_cross_compile, check_keep_threshold, check_random_active_sets,
                          check_schedule)
from test_engine import step_logits

D = 64
DTYPES = ["q4", "q4d8"]
SPECS = [BundleSpec(a, D, dtype, bias) for dtype in DTYPES for a, bias in (("swiglu", False), ("relu", True))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.dtype}-{s.activation}-bias{int(s.has_up_bias)}")
def test_kernel_matches_numpy_for_random_active_sets_from_none_to_all(spec):
    check_random_active_sets(spec, (0, 1, 7, 29, N))


@pytest.mark.parametrize("spec, keep", [(SPECS[0], "coef"), (SPECS[2], "gate"), (SPECS[3], "coef")],
                         ids=["q4-swiglu-coef", "q4d8-swiglu-gate", "q4d8-relu-coef"])
def test_thresholded_kernel_keeps_only_neurons_whose_own_score_clears_it(spec, keep):
    check_keep_threshold(spec, keep)


@pytest.mark.parametrize("dtype, knobs", [
    ("q4", Knobs(down="k", down_split=4, down_vec=64)),
    ("q4", Knobs(lanes=64, rows=1, down_vec=8, down_chunk=2)),
    ("q4", Knobs(lanes=8, rows=64, down_vec=32, down_chunk=2)),
    ("q4d8", Knobs(down="k", down_split=4, down_vec=64)),
    ("q4d8", Knobs(lanes=64, rows=1, down_vec=8, down_chunk=2)),
], ids=["q4-split-k-wide", "q4-wide-lanes", "q4-narrow-lanes", "q4d8-split-k-wide", "q4d8-wide-lanes-narrow-down"])
def test_kernel_under_other_schedules_computes_the_same_ffn(dtype, knobs):
    """Lanes wider than a 16-nibble run are unrolled runs of 16 (compile.schedule.Q4_RUN); down
    vectors wider than a scale's 32 values are unrolled blocks (compile.schedule.Q8_RUN)."""
    assert valid(knobs, D)
    check_schedule(BundleSpec("swiglu", D, dtype), knobs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_cross_compiles_for_android_without_glibc(tmp_path, dtype):
    check_android_cross_compile(BundleSpec("swiglu", D, dtype), tmp_path / f"ffn_{dtype}.so")


@pytest.fixture(scope="module")
def packed_smollm2(tmp_path_factory):
    """dtype -> the embedded model packed by `ripple pack --dtype <dtype>`, and the model with
    its FFN weights replaced by what the bundles decode to (gate/up: the GGUF's own; down:
    requantized). Each dtype is packed once per module, when a test first asks for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    packed = {}

    def pack(dtype):
        if dtype not in packed:
            out = tmp_path_factory.mktemp(dtype)
            summary = pack_cmd(None, str(out), dtype=dtype)
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
            packed[dtype] = summary, layout, desc, dq
        return packed[dtype]
    yield pack
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype, bundle_bytes, max_rel_rms, max_over_half_step", [
    ("q4", 3 * 576 // 32 * 20, 0.2, 1.05),
    ("q4d8", 2 * 360 + 576 + 36, 0.01, 1),
])
def test_pack_carries_gguf_gate_up_verbatim_and_reports_down_error(packed_smollm2, dtype, bundle_bytes,
                                                                   max_rel_rms, max_over_half_step):
    summary, layout, desc, dq = packed_smollm2(dtype)
    assert summary["dtype"] == dtype and summary["bundle_bytes"] == bundle_bytes
    q = summary["quantization"]
    assert q["gate_up_verbatim"] is True
    assert q["parts"]["gate"]["max_abs_err"] == 0 and q["parts"]["up"]["max_abs_err"] == 0
    down = q["parts"]["down"]
    assert 0 < down["rel_rms_err"] < max_rel_rms and down["max_err_over_half_step"] <= max_over_half_step
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
    assert info["dtype"] == dtype and info["quantization"] == q
    assert info["ffn_bytes_per_token"]["dense"] == 30 * 1536 * layout.bundle_bytes


TOKENS = [1, 9690, 198, 2683, 359, 253, 5356, 30, 2, 198]


@pytest.mark.parametrize("backend", ["torch", "tvm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_matches_reference_with_the_weights_the_bundles_decode_to(packed_smollm2, dtype, backend):
    _, layout, desc, dq = packed_smollm2(dtype)
    tm = to_torch(desc)
    make = flash_ffn if backend == "torch" else tvm_ffn
    all_active = np.full(desc.n_layers, ALL_ACTIVE)
    with FlashReader(layout.path) as reader:
        ours = step_logits(tm, TOKENS, lambda: make(tm, layout, reader, all_active, "coef", IOStats()))
    ref = step_logits(to_torch(dq), TOKENS, lambda: None)
    # Same float32 weights, sums in another order (TVM: per-block steps and minimums, 30 layers
    # deep); measured on q4 max 5e-5 (torch) and 5e-4 (tvm) on logits spanning ~55, while a
    # wrong nibble, block, scale or slot moves them by whole units.
    np.testing.assert_allclose(ours, ref, atol=2e-3 if backend == "torch" else 5e-3, rtol=0)


def test_tvm_and_torch_backends_generate_the_same_tokens_from_q4(packed_smollm2):
    _, layout, desc, _ = packed_smollm2("q4")
    tm = to_torch(desc)
    thr = np.full(desc.n_layers, ALL_ACTIVE)
    runs = {}
    for backend in ("torch", "tvm"):
        with FlashReader(layout.path, 8) as reader:
            runs[backend] = generate(tm, layout, reader, thr, "coef", TOKENS[:6], 4, make_ffn=ffn_backend(backend))
    assert runs["tvm"].tokens == runs["torch"].tokens and runs["torch"].tokens
    assert runs["tvm"].steps[0].bytes_needed == desc.n_layers * desc.d_ffn * layout.bundle_bytes
