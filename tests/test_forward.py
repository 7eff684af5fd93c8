"""Our forward pass against transformers' own models on the same weights."""
import numpy as np
import torch

from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import forward, new_cache, to_torch


def hf_logits(path, tokens):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens)[None]).logits[0].numpy()


def test_opt_forward_matches_transformers(random_opt_dir):
    tokens = np.random.default_rng(0).integers(0, 128, 20)
    ours = forward(to_torch(load_model(random_opt_dir)), torch.from_numpy(tokens)[None])[0].numpy()
    np.testing.assert_allclose(ours, hf_logits(random_opt_dir, tokens), atol=1e-4)


def test_llama_forward_matches_transformers(random_llama_dir):
    tokens = np.random.default_rng(1).integers(0, 128, 20)
    ours = forward(to_torch(load_model(random_llama_dir)), torch.from_numpy(tokens)[None])[0].numpy()
    np.testing.assert_allclose(ours, hf_logits(random_llama_dir, tokens), atol=1e-4)


def test_cached_decoding_matches_one_full_pass(random_llama_dir):
    tm = to_torch(load_model(random_llama_dir))
    tokens = torch.from_numpy(np.random.default_rng(2).integers(0, 128, 12))[None]
    full = forward(tm, tokens)
    cache = new_cache(tm, 1, 12)
    steps = [forward(tm, tokens[:, :5], cache)] + [forward(tm, tokens[:, i:i + 1], cache) for i in range(5, 12)]
    np.testing.assert_allclose(torch.cat(steps, 1).numpy(), full.numpy(), atol=1e-4)


def test_fp16_kv_cache_decodes_like_the_fp32_one_in_half_the_bytes(random_llama_dir):
    from ripple.runtime_py.resident import kv_bytes
    tm = to_torch(load_model(random_llama_dir))
    tokens = torch.from_numpy(np.random.default_rng(3).integers(0, 128, 12))[None]
    out = {}
    for dtype in (torch.float32, torch.float16):
        cache = new_cache(tm, 1, 12, dtype)
        steps = [forward(tm, tokens[:, :5], cache)] + [forward(tm, tokens[:, i:i + 1], cache) for i in range(5, 12)]
        out[dtype] = (torch.cat(steps, 1).numpy(), kv_bytes(cache))
    assert out[torch.float16][1] * 2 == out[torch.float32][1]
    np.testing.assert_allclose(out[torch.float16][0], out[torch.float32][0], atol=2e-2)
    assert (out[torch.float16][0].argmax(-1) == out[torch.float32][0].argmax(-1)).mean() > 0.9


def test_left_padded_rows_give_the_same_logits_as_unpadded_ones(random_llama_dir, random_opt_dir):
    for path in (random_llama_dir, random_opt_dir):
        tm = to_torch(load_model(path))
        a, b = [5, 6, 7, 8, 9], [10, 11, 12]
        batch = torch.tensor([a, [0, 0] + b])
        padded = forward(tm, batch, pad=torch.tensor([0, 2]))
        np.testing.assert_allclose(padded[0].numpy(), forward(tm, torch.tensor([a]))[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(padded[1, 2:].numpy(), forward(tm, torch.tensor([b]))[0].numpy(), atol=1e-5)
        assert torch.isfinite(padded).all()
