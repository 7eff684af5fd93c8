"""Read a Hugging Face checkpoint folder (config.json + safetensors or pytorch_model.bin)
into a ModelDesc, for the OPT and Llama families.

Tensors are read one at a time and converted to float32 as they are taken, so a model is
never held twice in memory (a 7B model is 28 GB in float32).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model import OPT_POSITION_OFFSET, LayerWeights, ModelDesc, ModelLoadError, checkpoint_hash


@dataclass(frozen=True)
class Family:
    arch: str                    # key of model.ARCHS
    tied_default: bool           # tie_word_embeddings when config.json leaves it out
    layer_prefix: str            # per-layer key prefix, "{i}" = layer index
    layer_keys: dict             # LayerWeights field -> key after the prefix
    top_keys: dict               # ModelDesc field -> key


_LLAMA = Family(
    arch="llama", tied_default=False,      # LlamaConfig / MistralConfig default
    layer_prefix="model.layers.{i}.",
    layer_keys={
        "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
        "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
        "wo": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight",
        "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
        "w_down": "mlp.down_proj.weight"},
    top_keys={"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"})

_OPT = Family(
    arch="opt", tied_default=True,         # OPTForCausalLM always ties lm_head to the embedding
    layer_prefix="model.decoder.layers.{i}.",
    layer_keys={
        "attn_norm": "self_attn_layer_norm.weight", "attn_norm_b": "self_attn_layer_norm.bias",
        "wq": "self_attn.q_proj.weight", "bq": "self_attn.q_proj.bias",
        "wk": "self_attn.k_proj.weight", "bk": "self_attn.k_proj.bias",
        "wv": "self_attn.v_proj.weight", "bv": "self_attn.v_proj.bias",
        "wo": "self_attn.out_proj.weight", "bo": "self_attn.out_proj.bias",
        "ffn_norm": "final_layer_norm.weight", "ffn_norm_b": "final_layer_norm.bias",
        "w_up": "fc1.weight", "b_up": "fc1.bias", "w_down": "fc2.weight", "b_down": "fc2.bias"},
    top_keys={"embed": "model.decoder.embed_tokens.weight",
              "pos_embed": "model.decoder.embed_positions.weight",
              "final_norm": "model.decoder.final_layer_norm.weight",
              "final_norm_b": "model.decoder.final_layer_norm.bias"})

# config.json model_type -> family.
FAMILIES = {"llama": _LLAMA, "mistral": _LLAMA, "opt": _OPT}


def load_hf(folder: str | os.PathLike) -> ModelDesc:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such folder; pass a Hugging Face checkpoint folder "
                             f"(config.json + weights) or a .gguf file")
    config = _read_json(folder / "config.json", "config.json is missing; download the whole "
                                                "model folder, not only the weights")
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelLoadError(f"{folder}: model_type {model_type!r} is not supported; supported: "
                             f"{sorted(FAMILIES)} (Llama-architecture models also load as GGUF)")
    dims = _opt_dims(config, folder) if family is _OPT else _llama_dims(config, folder)
    shapes = _shapes(dims, family)
    source = _WeightFiles(folder)

    def take(key, field):
        return source.get(key, shapes[field])

    layers = [LayerWeights(**{f: take(family.layer_prefix.format(i=i) + k, f)
                              for f, k in family.layer_keys.items()})
              for i in range(dims["n_layers"])]
    top = {f: take(k, f) for f, k in family.top_keys.items()}
    tied = config.get("tie_word_embeddings", family.tied_default)
    # Sharing the array is how ModelDesc says "tied"; HF ignores a stored lm_head when tied.
    lm_head = top["embed"] if tied else take("lm_head.weight", "lm_head")

    generation = _read_json(folder / "generation_config.json", None)
    eos = _ids(config.get("eos_token_id")) + _ids(generation.get("eos_token_id"))
    bos = config.get("bos_token_id", generation.get("bos_token_id"))
    return ModelDesc(**dims, **top, lm_head=lm_head, layers=layers, source=str(folder),
                     source_hash=checkpoint_hash(folder), name=folder.name,
                     bos_token_id=None if bos is None else int(bos),
                     eos_token_ids=list(dict.fromkeys(eos)))


def _llama_dims(config: dict, folder: Path) -> dict:
    unsupported = []
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config['hidden_act']!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        unsupported.append("attention/MLP biases")
    # transformers 5 writes rope_parameters; 4.x wrote rope_theta + rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        unsupported.append(f"RoPE scaling {rope_type!r}")
    if unsupported:
        raise ModelLoadError(f"{folder}: {', '.join(unsupported)} not supported; the forward pass "
                             f"implements the plain Llama block (SwiGLU, no biases, plain RoPE)")
    n_heads = _int(config, "num_attention_heads", folder)
    d = _int(config, "hidden_size", folder)
    return dict(
        arch="llama", d_model=d, n_layers=_int(config, "num_hidden_layers", folder),
        n_heads=n_heads, n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        head_dim=int(config.get("head_dim") or d // n_heads),
        d_ffn=_int(config, "intermediate_size", folder),
        vocab_size=_int(config, "vocab_size", folder),
        max_positions=_int(config, "max_position_embeddings", folder),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))


def _opt_dims(config: dict, folder: Path) -> dict:
    d = _int(config, "hidden_size", folder)
    unsupported = []
    # opt-350m: post-LayerNorm and a 512-wide embedding projected up to the model width.
    if not config.get("do_layer_norm_before", True):
        unsupported.append("do_layer_norm_before=false (post-LayerNorm)")
    if config.get("word_embed_proj_dim", d) != d:
        unsupported.append(f"word_embed_proj_dim {config['word_embed_proj_dim']} != hidden_size {d}")
    if config.get("activation_function", "relu") != "relu":
        unsupported.append(f"activation_function {config['activation_function']!r}")
    if (not config.get("enable_bias", True) or not config.get("layer_norm_elementwise_affine", True)
            or config.get("_remove_final_layer_norm", False)):
        unsupported.append("OPT without biases or LayerNorm weights")
    if unsupported:
        raise ModelLoadError(f"{folder}: {', '.join(unsupported)} not supported; only pre-LayerNorm "
                             f"ReLU OPT models (opt-125m, opt-1.3b and up) load")
    n_heads = _int(config, "num_attention_heads", folder)
    return dict(
        arch="opt", d_model=d, n_layers=_int(config, "num_hidden_layers", folder),
        n_heads=n_heads, n_kv_heads=n_heads, head_dim=d // n_heads,
        d_ffn=_int(config, "ffn_dim", folder), vocab_size=_int(config, "vocab_size", folder),
        max_positions=_int(config, "max_position_embeddings", folder),
        norm_eps=1e-5,                     # OPT's nn.LayerNorm default; config.json has no field
        rope_theta=0.0)


def _shapes(dims: dict, family: Family) -> dict:
    d, n, v = dims["d_model"], dims["d_ffn"], dims["vocab_size"]
    q, kv = dims["n_heads"] * dims["head_dim"], dims["n_kv_heads"] * dims["head_dim"]
    return {
        "attn_norm": (d,), "attn_norm_b": (d,), "ffn_norm": (d,), "ffn_norm_b": (d,),
        "wq": (q, d), "bq": (q,), "wk": (kv, d), "bk": (kv,), "wv": (kv, d), "bv": (kv,),
        "wo": (d, q), "bo": (d,), "w_gate": (n, d), "w_up": (n, d), "b_up": (n,),
        "w_down": (d, n), "b_down": (d,),
        "embed": (v, d), "lm_head": (v, d), "final_norm": (d,), "final_norm_b": (d,),
        "pos_embed": (dims["max_positions"] + OPT_POSITION_OFFSET, d),
    }


class _WeightFiles:
    """The weight files of one folder: which file holds each key, opened on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.file_of: dict[str, Path] = {}
        self.open: dict[Path, object] = {}
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (folder / index).is_file():
                weight_map = _read_json(folder / index, None).get("weight_map", {})
                self.file_of = {k: folder / f for k, f in weight_map.items()}
                break
            if (folder / single).is_file():
                self.file_of = {k: folder / single for k in self._handle(folder / single).keys()}
                break
        else:
            raise ModelLoadError(f"{folder}: no model.safetensors, pytorch_model.bin or their "
                                 f"sharded .index.json; download the weight files too")
        for f in set(self.file_of.values()):
            if not f.is_file():
                raise ModelLoadError(f"{f}: weight shard named by the index is missing; "
                                     f"download it too")

    def get(self, key: str, shape: tuple) -> np.ndarray:
        import torch  # only here: the GGUF path should not pay for importing torch

        # Checkpoints saved from the bare OPTModel / LlamaModel have no "model." prefix.
        found = next((k for k in (key, key.removeprefix("model.")) if k in self.file_of), None)
        if found is None:
            raise ModelLoadError(f"{self.folder}: tensor {key} is missing from the weight files; "
                                 f"the checkpoint is incomplete or config.json describes another model")
        f = self.file_of[found]
        handle = self._handle(f)
        if f.suffix == ".safetensors":
            t = handle.get_tensor(found)           # a fresh tensor, safe to hand out as is
        else:
            t = handle[found]
        if tuple(t.shape) != tuple(shape):
            raise ModelLoadError(f"{f}: tensor {found} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(shape)} from config.json; config and weights disagree")
        # .bin tensors alias the mmap'd file, so copy them even when already float32.
        return t.to(torch.float32, copy=f.suffix != ".safetensors").numpy()

    def _handle(self, f: Path):
        if f not in self.open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open
                    # torch, not numpy: numpy has no bfloat16.
                    self.open[f] = safe_open(str(f), framework="pt")
                else:
                    import torch
                    self.open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # each library reports a bad file its own way
                raise ModelLoadError(f"{f}: cannot read weight file ({e}); download it again") from e
        return self.open[f]


def _read_json(path: Path, missing: str | None) -> dict:
    """missing=None: an optional file, {} when absent."""
    if not path.is_file():
        if missing is None:
            return {}
        raise ModelLoadError(f"{path.parent}: {missing}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e


def _int(config: dict, key: str, folder: Path) -> int:
    if config.get(key) is None:
        raise ModelLoadError(f"{folder}: config.json has no {key}; the config is incomplete")
    return int(config[key])


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
