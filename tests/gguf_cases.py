"""A tiny Llama GGUF written here (what tests of GGUF blocks load instead of the 100 MB model)."""
import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q


def write_llama_gguf(path, attn_type=Q.Q4_1, seed=0):
    """A 2-layer Llama GGUF (d=64, 4 heads, 2 KV heads, untied LM head): attention as
    attn_type, embedding/LM head Q8_0, FFN Q4_1, norms F32."""
    rng = np.random.default_rng(seed)
    d, n_ffn, vocab, layers = 64, 128, 96, 2
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in (("block_count", layers), ("embedding_length", d), ("feed_forward_length", n_ffn),
                   ("head_count", 4), ("head_count_kv", 2), ("context_length", 64)):
        getattr(w, f"add_{key}")(v)
    w.add_layer_norm_rms_eps(1e-5)

    def add(name, shape, qtype):
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, a.astype(np.float16) if qtype == Q.F16 else a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    add("token_embd.weight", (vocab, d), Q.Q8_0)
    add("output.weight", (vocab, d), Q.Q8_0)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    for i in range(layers):
        for name, shape in (("attn_q", (64, d)), ("attn_k", (32, d)), ("attn_v", (32, d)), ("attn_output", (d, 64))):
            add(f"blk.{i}.{name}.weight", shape, attn_type)
        for name, shape in (("ffn_gate", (n_ffn, d)), ("ffn_up", (n_ffn, d)), ("ffn_down", (d, n_ffn))):
            add(f"blk.{i}.{name}.weight", shape, Q.Q4_1)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Q4_1 / Q8_0 blocks of a rows x cols matrix, uint8 (rows, row bytes): every quant value
    equally likely; finite fp16 steps (and minimums) of both signs."""
    from ripple.compile.qgemv import BLOCK_BYTES
    bb, nb = BLOCK_BYTES[kind], cols // 32
    raw = rng.integers(0, 256, (rows, nb, bb), dtype=np.uint8)
    for at in ((0, 2) if kind == "q4_1" else (0,)):
        raw[:, :, at:at + 2] = (rng.standard_normal((rows, nb, 1)) * 0.05).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, nb * bb)
