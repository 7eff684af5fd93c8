"""Write a Llama-family ModelDesc as a Hugging Face checkpoint folder that load_hf reads back.

The inverse of load_hf for the Llama family (the tensor names are load_hf's own table), so a
model ripple changed (sparsify) goes to every other command as any user's `--model` folder,
and to transformers as well. float32 safetensors: the weights as trained, no second rounding
before `ripple pack` quantizes them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .load_hf import FAMILIES
from .model import ModelDesc, ModelLoadError


def save_hf(desc: ModelDesc, folder: str | os.PathLike) -> None:
    """config.json, generation_config.json and model.safetensors of desc in folder (created)."""
    from safetensors.numpy import save_file

    if desc.arch != "llama" or desc.pos_embed is not None:
        raise ModelLoadError(f"{desc.name or desc.source}: only Llama-family models are written "
                             f"as Hugging Face folders (this one is {desc.arch})")
    family = FAMILIES["llama"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tied = desc.lm_head is desc.embed
    tensors = {key: getattr(desc, field) for field, key in family.top_keys.items()}
    if not tied:
        tensors["lm_head.weight"] = desc.lm_head
    for i, lw in enumerate(desc.layers):
        prefix = family.layer_prefix.format(i=i)
        tensors.update({prefix + key: getattr(lw, field) for field, key in family.layer_keys.items()})
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": desc.d_model, "intermediate_size": desc.d_ffn,
        "num_hidden_layers": desc.n_layers, "num_attention_heads": desc.n_heads,
        "num_key_value_heads": desc.n_kv_heads, "head_dim": desc.head_dim,
        "vocab_size": desc.vocab_size, "max_position_embeddings": desc.max_positions,
        "rms_norm_eps": desc.norm_eps, "rope_theta": desc.rope_theta,
        "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
        **({"bos_token_id": desc.bos_token_id} if desc.bos_token_id is not None else {}),
        **({"eos_token_id": desc.eos_token_ids[0]} if desc.eos_token_ids else {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    generation = {k: v for k, v in (("bos_token_id", desc.bos_token_id),
                                    ("eos_token_id", desc.eos_token_ids or None)) if v is not None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=1))
