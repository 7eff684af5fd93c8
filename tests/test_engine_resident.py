"""What the engine holds in DRAM: predicted sets need no FFN weight, the accounting sums the
arrays actually held, bf16 non-FFN weights keep the tokens, and the torch bundle decoder gives
layout.bundle.decode_bundles' values bit for bit."""
import numpy as np
import pytest
import torch

from ripple.layout.bundle import BundleSpec, decode_bundles, encode_bundles
from ripple.layout.pack import write_layout
from ripple.layout.reader import open_layout
from ripple.runtime_py.bundle_tensors import decode_tensors
from ripple.runtime_py.engine import FFNWeightsAbsent, IOStats, flash_ffn, generate, report
from ripple.runtime_py.reader import FlashReader
from ripple.runtime_py.resident import resident_bytes
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import FFN_WEIGHTS, forward, new_cache, to_torch
from ripple.tuning.predictor import TrainConfig, lowrank_sets, train_from_profile
from ripple.tuning.predictor import to_torch as predictor_to_torch
from ripple.tuning.sparsity import ALL_ACTIVE


@pytest.fixture(scope="module")
def llama(random_llama_dir, tmp_path_factory):
    desc = load_model(random_llama_dir)
    spec = BundleSpec(desc.activation, desc.d_model, "fp16")
    out = tmp_path_factory.mktemp("resident")
    layers = ((encode_bundles(spec, lw.w_up, lw.w_down.T, lw.w_gate), np.arange(desc.d_ffn))
              for lw in desc.layers)
    write_layout(out, spec, layers, {}, desc.source, desc.source_hash, arch=desc.arch)
    return desc, open_layout(out)


@pytest.mark.parametrize("dtype", ["fp16", "int8", "q4", "q4d8"])
def test_torch_bundle_decoder_equals_the_layout_decoder(dtype):
    rng = np.random.default_rng(0)
    d, k = 64, 37
    spec = BundleSpec("swiglu", d, dtype)
    raw = encode_bundles(spec, rng.standard_normal((k, d)), rng.standard_normal((k, d)),
                         rng.standard_normal((k, d)))
    ref, got = decode_bundles(spec, raw), decode_tensors(spec, raw)
    for name in ("up", "down_t", "gate"):
        np.testing.assert_array_equal(getattr(got, name).numpy(), getattr(ref, name))


@pytest.mark.parametrize("dtype", ["fp16", "int8", "q4", "q4d8"])
def test_torch_bundle_decoder_takes_no_bundles(dtype):
    # a layer where no neuron is kept decodes zero bundles (seen in bench e2e with q4d8)
    spec = BundleSpec("swiglu", 64, dtype)
    got = decode_tensors(spec, np.zeros((0, spec.bundle_bytes), np.uint8))
    for name in ("up", "down_t", "gate"):
        assert tuple(getattr(got, name).shape) == (0, 64)


def test_torch_bundle_decoder_keeps_the_up_bias():
    rng = np.random.default_rng(1)
    for dtype in ("fp16", "int8", "q4"):
        spec = BundleSpec("relu", 64, dtype, has_up_bias=True)
        raw = encode_bundles(spec, rng.standard_normal((5, 64)), rng.standard_normal((5, 64)),
                             up_bias=rng.standard_normal(5))
        np.testing.assert_array_equal(decode_tensors(spec, raw).up_bias.numpy(), decode_bundles(spec, raw).up_bias)


def test_model_built_without_ffn_weights_holds_none(llama):
    desc, _ = llama
    tm = to_torch(desc, torch.bfloat16, ffn=False)
    assert all(lw[name] is None for lw in tm.layers for name in FFN_WEIGHTS)
    assert tm.desc.layers == [] and tm.desc.embed is None       # the float32 arrays are not kept
    assert tm.layers[0]["wq"].dtype == torch.bfloat16 and tm.layers[0]["attn_norm"].dtype == torch.float32


def test_predicted_sets_without_measuring_misses_run_with_no_ffn_weight(llama, recorded_llama_profile):
    desc, layout = llama
    tm_full, prof = recorded_llama_profile
    sets = lowrank_sets(predictor_to_torch(train_from_profile(prof, tm_full, TrainConfig(rank=4, epochs=1, batch=64))))
    tm = to_torch(desc, ffn=False)
    with FlashReader(layout.path) as reader:
        lean = generate(tm, layout, reader, prof.thresholds, "coef", [1, 2, 3], 4, sets=sets, measure_misses=False)
        full = generate(tm_full, layout, reader, prof.thresholds, "coef", [1, 2, 3], 4, sets=sets)
        rep = report(lean, reader, desc.n_layers * desc.d_ffn, "predicted")
    # The oracle only measures: it does not change what is computed.
    assert lean.tokens == full.tokens
    assert rep["io"]["missed_per_token"] is None and rep["summary"]["missed_per_token_mean"] is None
    assert lean.resident["ffn_weights_dram_copy"] == 0 < full.resident["ffn_weights_dram_copy"]
    with FlashReader(layout.path) as reader, pytest.raises(FFNWeightsAbsent, match="predicted sets"):
        flash_ffn(tm, layout, reader, prof.thresholds, "coef", IOStats())(0, torch.randn(1, desc.d_model))


def test_dense_oracle_needs_no_ffn_weight(llama):
    desc, layout = llama
    thr = np.full(desc.n_layers, ALL_ACTIVE)
    h = torch.randn(2, desc.d_model)
    with FlashReader(layout.path) as reader:
        lean = flash_ffn(to_torch(desc, ffn=False), layout, reader, thr, "coef", IOStats())(0, h)
        full = flash_ffn(to_torch(desc), layout, reader, thr, "coef", IOStats())(0, h)
    torch.testing.assert_close(lean, full, rtol=0, atol=0)


def test_resident_bytes_sum_the_arrays_held(llama):
    desc, _ = llama
    for dtype, ffn in ((torch.float32, True), (torch.bfloat16, False)):
        tm = to_torch(desc, dtype, ffn=ffn)
        kv = new_cache(tm, 1, 10)
        held = {}
        for t in [tm.embed, tm.lm_head, tm.final_norm, tm.inv_freq, *[v for lw in tm.layers for v in lw.values()]]:
            if t is not None:
                held[t.data_ptr()] = t.nbytes          # tied embeddings: one array
        ffn_bytes = sum(lw[n].nbytes for lw in tm.layers for n in FFN_WEIGHTS if lw[n] is not None)
        r = resident_bytes(tm, kv)
        assert r["non_ffn_weights"] + r["ffn_weights_dram_copy"] == sum(held.values())
        assert r["ffn_weights_dram_copy"] == ffn_bytes and (ffn_bytes > 0) == ffn
        assert r["kv_cache"] == 2 * desc.n_layers * desc.n_kv_heads * 10 * desc.head_dim * 4
        assert r["total"] == sum(r[k] for k in ("non_ffn_weights", "ffn_weights_dram_copy", "ffn_cache",
                                                "predictor", "kv_cache"))


def test_bf16_non_ffn_weights_keep_the_logits_close_to_fp32(llama):
    desc, _ = llama
    tokens = torch.tensor([[1, 7, 30, 2, 99, 5]])
    ref = forward(to_torch(desc), tokens)
    got = forward(to_torch(desc, torch.bfloat16), tokens)
    # bf16 keeps 8 significant bits (relative rounding <= 2^-9 per weight and per GEMV input
    # and output); on this random model the logits span ~1 and move by < 2% of that span.
    span = float(ref.max() - ref.min())
    assert float((got - ref).abs().max()) < 0.02 * span
