"""The flash-backed engine computes the same model as the reference forward pass."""
import copy

import numpy as np
import pytest
import torch

from ripple.layout.bundle import BundleSpec, encode_bundles
from ripple.layout.pack import write_layout
from ripple.layout.reader import open_layout
from ripple.runtime_py.engine import IOStats, flash_ffn, generate, report
from ripple.runtime_py.reader import FlashReader
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import forward, new_cache, to_torch
from ripple.tuning.sparsity import ALL_ACTIVE, sparse_ffn

from conftest import embedded_gguf


def pack(desc, out_dir, seed=0):
    """Pack under a random (non-identity) placement, so slot != neuron everywhere."""
    rng = np.random.default_rng(seed)
    spec = BundleSpec(desc.activation, desc.d_model, "fp16", desc.layers[0].b_up is not None)
    perms = [rng.permutation(desc.d_ffn) for _ in desc.layers]
    layers = ((encode_bundles(spec, lw.w_up, lw.w_down.T, lw.w_gate, lw.b_up), p)
              for lw, p in zip(desc.layers, perms))
    write_layout(out_dir, spec, layers, {}, desc.source, desc.source_hash, arch=desc.arch)
    return open_layout(out_dir)


def fp16_ffn(desc):
    """The model with FFN weights rounded as the flash file stores them."""
    d = copy.copy(desc)
    r = lambda a: None if a is None else a.astype(np.float16).astype(np.float32)  # noqa: E731
    d.layers = [copy.copy(lw) for lw in desc.layers]
    for lw in d.layers:
        lw.w_up, lw.w_down, lw.w_gate, lw.b_up = r(lw.w_up), r(lw.w_down), r(lw.w_gate), r(lw.b_up)
    return d


def step_logits(tm, tokens, ffn_for_step):
    """Logits of a prompt pass then single-token steps, as generation runs them."""
    cache = new_cache(tm, 1, len(tokens))
    out = [forward(tm, torch.tensor([tokens[:4]]), cache, ffn_for_step())[0, -1]]
    for t in tokens[4:]:
        out.append(forward(tm, torch.tensor([[t]]), cache, ffn_for_step())[0, -1])
    return torch.stack(out).numpy()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    desc = load_model(embedded_gguf())
    return desc, pack(desc, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def opt(random_opt_dir, tmp_path_factory):
    desc = load_model(random_opt_dir)
    return desc, pack(desc, tmp_path_factory.mktemp("opt"), seed=1)


TOKENS = [1, 9690, 198, 2683, 359, 253, 5356, 30, 2, 198]


@pytest.mark.parametrize("which", ["smollm2", "opt"])
def test_dense_flash_engine_matches_reference(which, request):
    desc, layout = request.getfixturevalue(which)
    tokens = [t % desc.vocab_size for t in TOKENS]
    tm = to_torch(desc)
    all_active = np.full(desc.n_layers, ALL_ACTIVE)
    with FlashReader(layout.path) as reader:
        ours = step_logits(tm, tokens, lambda: flash_ffn(tm, layout, reader, all_active, "coef", IOStats()))
    # Against the same weights rounded to fp16, as stored: only summation order differs.
    ref16 = step_logits(to_torch(fp16_ffn(desc)), tokens, lambda: None)
    np.testing.assert_allclose(ours, ref16, atol=2e-3, rtol=0)
    # Against the fp32 reference, fp16 storage (11 significant bits, relative error <= 2^-11
    # per weight) moves the logits; measured 0.022 on SmolLM2 (logits span ~30), so 0.1 leaves margin
    # while a wrong bundle or slot moves them by whole units.
    ref32 = step_logits(tm, tokens, lambda: None)
    diff = np.abs(ours - ref32).max()
    print(f"{which}: max |logit diff| vs fp32 reference = {diff:.4g}")
    assert diff < 0.1
    assert (ours.argmax(-1) == ref32.argmax(-1)).all()


def test_sparse_flash_engine_matches_thresholded_reference(opt):
    desc, layout = opt
    tm = to_torch(desc)
    tm16 = to_torch(fp16_ffn(desc))
    tokens = [t % desc.vocab_size for t in TOKENS]
    # Thresholds at about half the neurons of each layer.
    h = torch.randn(64, desc.d_model)
    thr = np.array([float(torch.relu(h @ tm.layers[l]["w_up"].T + tm.layers[l]["b_up"]).median())
                    for l in range(desc.n_layers)])
    with FlashReader(layout.path) as reader:
        stats = IOStats()
        ours = step_logits(tm, tokens, lambda: flash_ffn(tm, layout, reader, thr, "coef", stats))
    ref = step_logits(tm16, tokens, lambda: sparse_ffn(tm16, thr, "coef"))
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)
    assert 0 < stats.bytes_needed < len(tokens) * desc.n_layers * desc.d_ffn * layout.bundle_bytes


def test_generation_report_has_per_token_io(opt):
    desc, layout = opt
    tm = to_torch(desc)
    with FlashReader(layout.path) as reader:
        gen = generate(tm, layout, reader, np.zeros(desc.n_layers), "coef", [1, 2, 3], 5)
        rep = report(gen, reader, desc.n_layers * desc.d_ffn)
    io = rep["io"]
    assert io["o_direct"] is True and io["sets"] == "oracle"
    n = len(gen.steps)
    assert n == 5
    for key in ("per_token_ms", "bytes_read_per_token", "bytes_needed_per_token", "reads_per_token"):
        assert len(io[key]) == n
    # Aligned reads cover whole blocks: never fewer bytes than the bundles needed.
    assert all(r >= b > 0 for r, b in zip(io["bytes_read_per_token"], io["bytes_needed_per_token"]))


def test_each_step_counts_its_own_io(opt):
    """One FFN serves the prompt and every step; each step's figures are its own, not a running
    sum: read densely (every bundle, every layer), each step reads exactly the whole FFN."""
    desc, layout = opt
    tm = to_torch(desc)
    every = desc.n_layers * desc.d_ffn * layout.bundle_bytes
    with FlashReader(layout.path) as reader:
        gen = generate(tm, layout, reader, np.full(desc.n_layers, -1.0), "coef", [1, 2, 3], 4)
    assert len(gen.steps) == 4
    assert [s.bytes_needed for s in gen.steps] == [every] * 4
    assert gen.prefill.bytes_needed == every          # the prompt reads the union once
    assert all(s.seconds > 0 and s.reads > 0 for s in gen.steps)
