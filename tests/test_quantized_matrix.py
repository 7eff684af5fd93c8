"""Non-FFN weights held as GGUF blocks (Q4_1, Q8_0): the compiled GEMVs equal
dequantize-then-matmul, the blocks are load_gguf's matrices row for row (RoPE row order
undone), the forward pass gives the fp32 model's logits, and DRAM holds the GGUF's bytes."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ripple.compile.qgemv import BLOCK_BYTES
from ripple.runtime_py.resident import weight_bytes
from ripple.tuning.checkpoint import default_model_path, load_model
from ripple.tuning.forward import (MATRICES, forward, new_cache, quantizable_non_ffn, to_torch,
                                   to_torch_quantized)
from ripple.tuning.quantized_matrix import GGUF_TYPE, QuantizedMatrix

from gguf_cases import random_blocks, write_llama_gguf

KINDS = sorted(BLOCK_BYTES)


@pytest.mark.parametrize("kind", KINDS)
# one block per row; an odd block count; an even one (q8_0 then sums even and odd blocks apart)
@pytest.mark.parametrize("rows,cols,tokens", [(40, 32, 1), (96, 160, 3), (24, 128, 2)])
def test_gemv_equals_dequantize_then_matmul(kind, rows, cols, tokens):
    rng = np.random.default_rng(rows + tokens)
    raw = random_blocks(kind, rows, cols, rng)
    w = QuantizedMatrix.from_blocks(raw, kind, (rows, cols))
    x = torch.from_numpy(rng.standard_normal((tokens, cols)).astype(np.float32))
    ref = x.double() @ torch.from_numpy(gguf.quants.dequantize(raw, GGUF_TYPE[kind])).double().T
    got = w.matmul(x)
    assert got.dtype == torch.float32 and got.shape == (tokens, rows)
    # Same f32 products, summed in another order: error at f32 rounding of the row's scale.
    scale = (x.double().abs() @ torch.from_numpy(gguf.quants.dequantize(raw, GGUF_TYPE[kind])).double().abs().T)
    assert ((got.double() - ref).abs() <= 1e-6 * scale + 1e-7).all()


def test_gemv_takes_x_at_any_address():
    # forward hands over slices; tvm refuses a tensor that is not 64-byte aligned
    rng = np.random.default_rng(5)
    raw = random_blocks("q8_0", 16, 64, rng)
    w = QuantizedMatrix.from_blocks(raw, "q8_0", (16, 64))
    base = torch.from_numpy(rng.standard_normal(65).astype(np.float32))
    x = base[1:]
    assert x.data_ptr() % 64
    np.testing.assert_allclose(w.matmul(x).numpy(), w.dequantize() @ x.numpy(), rtol=1e-5, atol=1e-6)


def test_blocks_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match=r"q4_1 blocks of a 4x64 matrix are uint8 \(4, 40\)"):
        QuantizedMatrix.from_blocks(np.zeros((4, 41), np.uint8), "q4_1", (4, 64))


# ---------------------------------------------------------------- a tiny Llama GGUF

def assert_blocks_are_the_loaded_matrices(tm, desc):
    for name in MATRICES:
        for i, lw in enumerate(desc.layers):
            np.testing.assert_array_equal(tm.layers[i][name].dequantize(), getattr(lw, name), err_msg=f"{i}.{name}")


def test_untied_gguf_blocks_are_the_loaded_matrices_and_give_its_logits(tmp_path):
    desc = load_model(write_llama_gguf(tmp_path / "tiny.gguf"))
    tq = to_torch_quantized(desc, ffn=True)
    assert tq.lm_head is not tq.embed and tq.lm_head.kind == "q8_0" and tq.layers[0]["wq"].kind == "q4_1"
    assert_blocks_are_the_loaded_matrices(tq, desc)
    np.testing.assert_array_equal(tq.lm_head.dequantize(), desc.lm_head)
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, 96, (2, 9)))
    np.testing.assert_allclose(forward(tq, tokens).numpy(), forward(to_torch(desc), tokens).numpy(),
                               rtol=0, atol=1e-5)
    lean = to_torch_quantized(desc, ffn=False)
    assert weight_bytes(lean)["ffn"] == 0 and weight_bytes(lean)["non_ffn"] == weight_bytes(tq)["non_ffn"]


def test_gguf_with_other_attention_types_is_refused_by_name(tmp_path):
    desc = load_model(write_llama_gguf(tmp_path / "f16.gguf", attn_type=Q.F16))
    assert not quantizable_non_ffn(desc)
    with pytest.raises(ValueError, match=r"tensor blk\.0\.attn_q\.weight is F16"):
        to_torch_quantized(desc)


def test_hugging_face_source_is_refused(random_llama_dir):
    desc = load_model(random_llama_dir)
    assert not quantizable_non_ffn(desc)
    with pytest.raises(ValueError, match="blocks of the GGUF file"):
        to_torch_quantized(desc)


# ---------------------------------------------------------------- the embedded SmolLM2 GGUF

@pytest.fixture(scope="module")
def smollm():
    desc = load_model(default_model_path())
    return desc, to_torch_quantized(desc, ffn=True)


def test_rope_row_gather_matches_load_gguf(smollm):
    desc, tq = smollm
    assert quantizable_non_ffn(desc)
    assert_blocks_are_the_loaded_matrices(tq, desc)
    assert tq.lm_head is tq.embed                  # tied: one copy of the blocks
    ids = np.array([[0, 1, 49151], [7, 7, 300]])
    np.testing.assert_array_equal(tq.embed.rows(torch.from_numpy(ids)).numpy(), desc.embed[ids])


def test_quantized_forward_gives_the_fp32_models_logits(smollm):
    desc, tq = smollm
    tf = to_torch(desc)
    tokens = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 1065]])
    full = forward(tf, tokens)
    # a prompt step, then decode steps (one token per GEMV call)
    cache = new_cache(tq, 1, 8)
    steps = [forward(tq, tokens[:, :5], cache)] + [forward(tq, tokens[:, i:i + 1], cache) for i in range(5, 8)]
    got = torch.cat(steps, 1)
    # identical dequantized values; only the order of f32 sums differs (logits up to ~35)
    np.testing.assert_allclose(got.numpy(), full.numpy(), rtol=0, atol=5e-4)
    assert (got.argmax(-1) == full.argmax(-1)).all()


def test_resident_bytes_are_the_ggufs_non_ffn_bytes(smollm):
    desc, tq = smollm
    reader = gguf.GGUFReader(desc.source)
    non_ffn = [t for t in reader.tensors if ".ffn_gate." not in t.name and ".ffn_up." not in t.name
               and ".ffn_down." not in t.name]
    by_type = {}
    for t in non_ffn:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    held = weight_bytes(tq)
    inv_freq = 4 * desc.head_dim // 2       # the RoPE frequencies: the only array not in the file
    assert held["non_ffn"] == sum(by_type.values()) + inv_freq
    assert held["non_ffn_dtypes"] == {"q4_1": by_type["Q4_1"], "q8_0": by_type["Q8_0"],
                                      "float32": by_type["F32"] + inv_freq}
