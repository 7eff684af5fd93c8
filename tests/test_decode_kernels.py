"""The decode step's hand-written kernels against numpy and torch: the prompt step's GEMM
(qgemm) equals dequantize-then-matmul for every token count, and attention writes the step's
keys (RoPE as rotate_half) and values into the KV cache and attends causally, with GQA, as
torch's scaled_dot_product_attention does."""
import functools

import gguf
import numpy as np
import pytest
import torch
import tvm

from gguf_cases import random_blocks
from ripple.compile import decode_kernels as K
from ripple.compile.qgemv import BLOCK_BYTES, qgemm, row_bytes
from ripple.compile.targets import make_target

KINDS = sorted(BLOCK_BYTES)
GGUF_TYPE = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}
# (rows, cols, flat (total bytes, offset) or None): 4-row tiles and an odd block count; 2-row
# tiles in a flat buffer at an offset that is no multiple of a block.
SHAPES = {"2d": (24, 96, None), "flat": (18, 64, (2500, 37))}


@functools.lru_cache(maxsize=None)
def built(func_key, make):
    return tvm.compile(tvm.IRModule({"main": make()}), target=make_target("host"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", sorted(SHAPES))
@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_prefill_gemm_equals_dequantize_then_matmul(kind, form, n):
    rows, cols, flat = SHAPES[form]
    rng = np.random.default_rng(n)
    raw = random_blocks(kind, rows, cols, rng)
    if flat is None:
        w = raw
    else:
        w = rng.integers(0, 256, flat[0], dtype=np.uint8)      # the bytes around are not the matrix's
        w[flat[1]:flat[1] + raw.size] = raw.reshape(-1)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    y = tvm.runtime.tensor(np.full((n, rows), np.nan, np.float32))
    built(("gemm", kind, form), lambda: qgemm(kind, rows, cols, flat))["main"](
        tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    ref = x.astype(np.float64) @ gguf.quants.dequantize(raw, GGUF_TYPE[kind]).astype(np.float64).T
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_prefill_gemm_refuses_rows_that_overrun_the_flat_buffer():
    with pytest.raises(ValueError, match="do not fit"):
        qgemm("q8_0", 18, 64, (18 * row_bytes("q8_0", 64), 1))


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Hugging Face's rotate_half RoPE on x (n, heads, hd) at the tokens' positions."""
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :].astype(np.float64)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos + rotated * sin).astype(np.float32)


# (heads, kv heads, head_dim): SmolLM2's (GQA 3:1, 64) and a small one (2:1, 16)
HEADS = [(9, 3, 64), (4, 2, 16)]
# (tokens, first position): a prompt step after 3 tokens; a decode token at 9; one at 40,
# past two blocks of keys (K.ATTN_BLOCK) into a partial third
STEPS = [(5, 3), (1, 9), (1, 40)]


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("n,p", STEPS)
def test_attention_writes_kv_in_place_and_attends_causally(kv_dtype, use_rope, heads, n, p):
    H, KV, hd = heads
    layers, max_len, layer = 2, 48, 1
    rng = np.random.default_rng(n * 100 + p)
    inv_freq = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    qkv = rng.standard_normal((n, (H + 2 * KV) * hd)).astype(np.float32)
    cache = rng.standard_normal((layers, 2, max_len, KV * hd)).astype(kv_dtype)
    kv = tvm.runtime.tensor(cache)
    out = tvm.runtime.tensor(np.zeros((n, H * hd), np.float32))
    lib = built(("attention", H, KV, hd, kv_dtype, use_rope), lambda: K.attention(H, KV, hd, kv_dtype, use_rope))
    lib["main"](tvm.runtime.tensor(qkv), kv, tvm.runtime.tensor(inv_freq), layer, p, out)

    QD, KD = H * hd, KV * hd
    q = qkv[:, :QD].reshape(n, H, hd)
    k = qkv[:, QD:QD + KD].reshape(n, KV, hd)
    positions = np.arange(p, p + n)
    if use_rope:
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    got = kv.numpy()
    # the step's rows hold its keys and values; every other row is as it was
    tol = 1e-3 if kv_dtype == "float16" else 1e-6      # one fp16 rounding step
    np.testing.assert_allclose(got[layer, 0, p:p + n].astype(np.float32), k.reshape(n, KD), rtol=tol, atol=tol)
    np.testing.assert_array_equal(got[layer, 1, p:p + n], qkv[:, QD + KD:].astype(kv_dtype))
    untouched = np.ones(got.shape, bool)
    untouched[layer, :, p:p + n] = False
    np.testing.assert_array_equal(got[untouched], cache[untouched])

    # attention over what the cache holds: token t sees positions 0..p+t
    keys = torch.from_numpy(got[layer, 0, :p + n].astype(np.float32)).reshape(p + n, KV, hd).transpose(0, 1)
    values = torch.from_numpy(got[layer, 1, :p + n].astype(np.float32)).reshape(p + n, KV, hd).transpose(0, 1)
    mask = torch.ones(n, p + n, dtype=torch.bool).tril(p)
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q).transpose(0, 1), keys, values, attn_mask=mask, enable_gqa=True)
    ref = ref.transpose(0, 1).reshape(n, QD).numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
