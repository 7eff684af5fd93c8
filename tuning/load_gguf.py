"""Read a Llama-architecture GGUF file (llama.cpp's format) into a ModelDesc.

Weights are dequantized to float32 and the attention rows are put back in Hugging Face
order, so the same forward pass runs GGUF and Hugging Face checkpoints. The stored blocks
stay reachable through `gguf_tensors`, because the flash file can carry Q4_1 FFN blocks
as they are instead of re-quantizing them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from .model import LayerWeights, ModelDesc, ModelLoadError, checkpoint_hash

# What llama.cpp's quantize tool writes for Llama weights and gguf.quants can dequantize.
# The IQ*/ternary types dequantize too, but no model we run uses them; add one when it does.
SUPPORTED_QTYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
})

# LayerWeights field -> GGUF tensor name inside "blk.N.".
_LAYER_TENSORS = {
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
    "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up",
    "w_down": "ffn_down",
}


@dataclass
class GGUFTensor:
    name: str
    qtype: Q
    shape: tuple[int, ...]       # numpy / Hugging Face order (rows, cols): GGUF's ne reversed
    raw: np.ndarray              # uint8 (rows, bytes per row): the blocks as stored, a view of the file
    offset: int                  # absolute byte offset of `raw` in the file


def gguf_tensors(path: str | os.PathLike) -> dict[str, GGUFTensor]:
    """Every tensor of a GGUF file, undecoded. attn_q/attn_k rows are in llama.cpp's RoPE
    order here; load_gguf undoes that, FFN tensors need nothing undone."""
    path = Path(path)
    return _tensors(_open(path), path)


def dequantize(t: GGUFTensor) -> np.ndarray:
    """float32 (rows, cols) in memory of its own (F32 would otherwise alias the file)."""
    w = gguf.quants.dequantize(t.raw, t.qtype).reshape(t.shape)
    return w.copy() if t.qtype == Q.F32 else w.astype(np.float32, copy=False)


def ffn_q4_1_rows(path: str | os.PathLike, n_layers: int) -> list[dict[str, np.ndarray]]:
    """Per layer, the FFN gate/up tensors the GGUF stores as Q4_1: {"gate", "up"} -> uint8
    (d_ffn, d/32 * 20), row i = neuron i's row as 32-value blocks along the hidden dimension,
    a view of the file. Tensors of another type are left out (they get quantized instead).
    ffn_down is never here: its blocks run along its rows, across neurons, not down a column."""
    tensors = gguf_tensors(path)
    out = []
    for i in range(n_layers):
        got = {}
        for part in ("gate", "up"):
            t = tensors.get(f"blk.{i}.ffn_{part}.weight")
            if t is not None and t.qtype == Q.Q4_1:
                got[part] = t.raw
        out.append(got)
    return out


@dataclass
class StoredMatrix:
    """A matrix as the GGUF stores it, rows in Hugging Face order (load_gguf's order)."""
    name: str                    # the GGUF tensor name
    qtype: Q
    shape: tuple[int, int]       # (rows, cols) of the values
    raw: np.ndarray              # uint8 (rows, bytes per row): whole blocks, so a row gather is exact


# ModelDesc's non-FFN matrices -> GGUF tensor names ("blk.N." prefixed per layer).
NON_FFN_MATRICES = {f: _LAYER_TENSORS[f] for f in ("wq", "wk", "wv", "wo")}


def non_ffn_blocks(path: str | os.PathLike) -> tuple[dict[str, StoredMatrix], list[dict[str, StoredMatrix]]]:
    """The stored blocks of the non-FFN matrices, undecoded: ({"embed", and "lm_head" when the
    file has output.weight}, per layer {"wq", "wk", "wv", "wo"}). attn_q/attn_k rows get the
    row gather load_gguf applies to their values (unpermute_rope_rows); the others are views
    of the file."""
    path = Path(path)
    reader = _open(path)
    tensors = _tensors(reader, path)
    n_layers = int(_meta(reader, path, "llama.block_count"))
    heads = {"wq": int(_meta(reader, path, "llama.attention.head_count"))}
    heads["wk"] = int(_meta(reader, path, "llama.attention.head_count_kv", heads["wq"]))

    def stored(name: str, field: str | None = None) -> StoredMatrix:
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{path}: tensor {name} is missing; re-convert the model with "
                                 f"llama.cpp's convert_hf_to_gguf.py")
        raw = unpermute_rope_rows(t.raw, heads[field]) if field in heads else t.raw
        return StoredMatrix(name, t.qtype, t.shape, raw)

    model = {"embed": stored("token_embd.weight")}
    if "output.weight" in tensors:
        model["lm_head"] = stored("output.weight")
    layers = [{f: stored(f"blk.{i}.{g}.weight", f) for f, g in NON_FFN_MATRICES.items()}
              for i in range(n_layers)]
    return model, layers


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute, which interleaves the two rotary
    halves of each head (GGML's RoPE rotates adjacent pairs, HF's rotate_half rotates halves)."""
    half = w.shape[0] // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def load_gguf(path: str | os.PathLike) -> ModelDesc:
    path = Path(path)
    reader = _open(path)
    arch = _meta(reader, path, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"{path}: GGUF architecture is {arch!r}; only 'llama' GGUF files are supported "
            f"(use the Hugging Face folder of this model instead)")
    tensors = _tensors(reader, path)
    for t in tensors.values():
        if t.qtype not in SUPPORTED_QTYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name} is {t.qtype.name}, which is not supported; "
                f"re-quantize to one of {sorted(q.name for q in SUPPORTED_QTYPES)} (e.g. Q4_1)")

    d = int(_meta(reader, path, "llama.embedding_length"))
    n_layers = int(_meta(reader, path, "llama.block_count"))
    n_heads = int(_meta(reader, path, "llama.attention.head_count"))
    n_kv = int(_meta(reader, path, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_meta(reader, path, "llama.attention.key_length", d // n_heads))
    d_ffn = int(_meta(reader, path, "llama.feed_forward_length"))
    rope_dims = int(_meta(reader, path, "llama.rope.dimension_count", head_dim))
    scaling = _meta(reader, path, "llama.rope.scaling.type", "none")
    if rope_dims != head_dim or scaling not in ("none", ""):
        raise ModelLoadError(
            f"{path}: RoPE over {rope_dims} of {head_dim} dims with scaling {scaling!r} is not "
            f"supported; the forward pass implements plain RoPE over the whole head")
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: tensor token_embd.weight is missing; the file is not a "
                             f"complete llama.cpp model, re-convert it with convert_hf_to_gguf.py")
    vocab = int(_meta(reader, path, "llama.vocab_size", tensors["token_embd.weight"].shape[0]))

    q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim
    shapes = {"attn_norm": (d,), "ffn_norm": (d,), "wq": (q_rows, d), "wk": (kv_rows, d),
              "wv": (kv_rows, d), "wo": (d, q_rows), "w_gate": (d_ffn, d), "w_up": (d_ffn, d),
              "w_down": (d, d_ffn)}

    def take(name, shape):
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{path}: tensor {name} is missing; re-convert the model with "
                                 f"llama.cpp's convert_hf_to_gguf.py")
        if t.shape != tuple(shape):
            raise ModelLoadError(f"{path}: tensor {name} has shape {t.shape}, expected "
                                 f"{tuple(shape)} from the file's llama.* metadata")
        return dequantize(t)

    layers = []
    for i in range(n_layers):
        w = {f: take(f"blk.{i}.{g}.weight", shapes[f]) for f, g in _LAYER_TENSORS.items()}
        w["wq"] = unpermute_rope_rows(w["wq"], n_heads)
        w["wk"] = unpermute_rope_rows(w["wk"], n_kv)
        layers.append(LayerWeights(**w))

    embed = take("token_embd.weight", (vocab, d))
    # No output.weight means tied embeddings (llama.cpp drops the duplicate); sharing the
    # array is how ModelDesc says "tied".
    lm_head = take("output.weight", (vocab, d)) if "output.weight" in tensors else embed
    eos = [int(_meta(reader, path, k)) for k in
           ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if _meta(reader, path, k, None) is not None]
    bos = _meta(reader, path, "tokenizer.ggml.bos_token_id", None)
    return ModelDesc(
        arch="llama", d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, d_ffn=d_ffn, vocab_size=vocab,
        max_positions=int(_meta(reader, path, "llama.context_length")),
        norm_eps=float(_meta(reader, path, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_meta(reader, path, "llama.rope.freq_base", 10000.0)),
        embed=embed, final_norm=take("output_norm.weight", (d,)), lm_head=lm_head,
        layers=layers, source=str(path), source_hash=checkpoint_hash(path),
        name=str(_meta(reader, path, "general.name", path.stem)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=list(dict.fromkeys(eos)))


_REQUIRED = object()


def _meta(reader: gguf.GGUFReader, path: Path, key: str, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"{path}: metadata key {key} is missing; re-convert the model "
                                 f"with a current llama.cpp convert_hf_to_gguf.py")
        return default
    return field.contents()


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file; check the path "
                             f"(or run without one to use the embedded SmolLM2)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) < 4:
        raise ModelLoadError(f"{path}: file is empty or truncated ({len(magic)} bytes); "
                             f"download it again")
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF'); "
                             f"pass a llama.cpp .gguf file or a Hugging Face folder")
    try:
        reader = gguf.GGUFReader(path)
    # GGUFReader reports a file cut short as whatever numpy trips over first.
    except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: GGUF file is truncated or corrupt ({e}); "
                             f"download it again") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelLoadError(f"{path}: GGUF file is truncated (tensor {t.name} ends at byte "
                                 f"{t.data_offset + t.n_bytes} of {size}); download it again")
    return reader


def _tensors(reader: gguf.GGUFReader, path: Path) -> dict[str, GGUFTensor]:
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        qtype = Q(t.tensor_type)
        try:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        except ValueError as e:
            raise ModelLoadError(f"{path}: tensor {t.name}: {e}; the file is corrupt") from e
        raw = np.asarray(t.data).view(np.uint8).reshape(byte_shape)
        out[t.name] = GGUFTensor(t.name, qtype, shape, raw, int(t.data_offset))
    return out


def ffn_tensors(gguf_path: str | os.PathLike, n_layers: int) -> list[dict]:
    """Per layer {part: GGUFTensor} for a whole copy (layout.whole_copy.write_whole_copy);
    LayoutError when a part is missing or of a type the compiled GEMV cannot multiply."""
    from ..layout.errors import LayoutError
    from ..layout.whole_copy import KINDS, PARTS

    if Path(gguf_path).suffix != ".gguf":
        raise LayoutError(f"{gguf_path}: --whole-copy carries a GGUF's own FFN blocks, and this is not a "
                          "GGUF; pack without --whole-copy")
    tensors = gguf_tensors(gguf_path)
    out = []
    for i in range(n_layers):
        got = {}
        for p in PARTS:
            t = tensors.get(f"blk.{i}.ffn_{p}.weight")
            if t is None:
                raise LayoutError(f"{gguf_path}: tensor blk.{i}.ffn_{p}.weight is missing; a whole "
                                  f"copy needs a SwiGLU GGUF (gate, up, down); pack without --whole-copy")
            if t.qtype.name not in KINDS:
                raise LayoutError(f"{gguf_path}: blk.{i}.ffn_{p}.weight is {t.qtype.name}; a whole copy "
                                  f"carries {'/'.join(KINDS)} blocks only; pack without --whole-copy")
            got[p] = t
        out.append(got)
    return out
