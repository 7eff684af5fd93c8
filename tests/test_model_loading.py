"""Checkpoint loading: Hugging Face folders and GGUF files become the same ModelDesc."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from ripple.tuning.checkpoint import default_model_path, load_model, load_tokenizer
from ripple.tuning.load_gguf import gguf_tensors, load_gguf
from ripple.tuning.load_hf import load_hf
from ripple.tuning.model import ModelLoadError

from conftest import write_gguf


# ---------------------------------------------------------------- tiny Hugging Face models

def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, vocab_size=100,
        max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=True,
        activation_function="relu")).eval()


def tiny_llama(tied: bool = False, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=100, tie_word_embeddings=tied)).eval()
    return model.to(dtype)


def state(model) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


# LayerWeights field -> the Hugging Face state dict key within one layer.
OPT_LAYER_KEYS = {"attn_norm": "self_attn_layer_norm.weight", "attn_norm_b": "self_attn_layer_norm.bias",
                  "wq": "self_attn.q_proj.weight", "bq": "self_attn.q_proj.bias",
                  "wk": "self_attn.k_proj.weight", "bk": "self_attn.k_proj.bias",
                  "wv": "self_attn.v_proj.weight", "bv": "self_attn.v_proj.bias",
                  "wo": "self_attn.out_proj.weight", "bo": "self_attn.out_proj.bias",
                  "ffn_norm": "final_layer_norm.weight", "ffn_norm_b": "final_layer_norm.bias",
                  "w_up": "fc1.weight", "b_up": "fc1.bias", "w_down": "fc2.weight", "b_down": "fc2.bias"}
LLAMA_LAYER_KEYS = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
                    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
                    "wo": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight",
                    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
                    "w_down": "mlp.down_proj.weight"}


def assert_layers_equal(desc, sd, layers_prefix, keys, absent):
    """Every layer's fields in keys are float32 and equal the state dict's; field absent is None."""
    for i, lw in enumerate(desc.layers):
        for field, key in keys.items():
            got = getattr(lw, field)
            assert got.dtype == np.float32 and np.array_equal(got, sd[f"{layers_prefix}{i}.{key}"]), (i, field)
        assert getattr(lw, absent) is None


def assert_opt_weights(desc, sd):
    p = "model.decoder."
    assert np.array_equal(desc.embed, sd[p + "embed_tokens.weight"])
    assert np.array_equal(desc.pos_embed, sd[p + "embed_positions.weight"])
    assert np.array_equal(desc.final_norm, sd[p + "final_layer_norm.weight"])
    assert np.array_equal(desc.final_norm_b, sd[p + "final_layer_norm.bias"])
    assert desc.lm_head is desc.embed
    assert_layers_equal(desc, sd, p + "layers.", OPT_LAYER_KEYS, "w_gate")


def assert_llama_weights(desc, sd):
    assert np.array_equal(desc.embed, sd["model.embed_tokens.weight"])
    assert np.array_equal(desc.final_norm, sd["model.norm.weight"])
    assert np.array_equal(desc.lm_head, sd["lm_head.weight"])
    assert_layers_equal(desc, sd, "model.layers.", LLAMA_LAYER_KEYS, "bq")


def test_opt_safetensors_folder_loads_every_weight(tmp_path):
    model = tiny_opt()
    model.save_pretrained(tmp_path)
    desc = load_model(tmp_path)
    assert (desc.arch, desc.d_model, desc.n_layers, desc.n_heads, desc.d_ffn, desc.vocab_size,
            desc.max_positions) == ("opt", 64, 2, 4, 256, 100, 64)
    assert desc.pos_embed.shape == (66, 64)      # learned positions start at index 2
    assert_opt_weights(desc, state(model))
    assert desc.source == str(tmp_path) and len(desc.source_hash) == 32


def test_opt_pytorch_bin_folder_loads_every_weight(tmp_path):
    # transformers 5 always writes safetensors (safe_serialization=False is ignored), so the
    # legacy layout is written by hand, as older checkpoints on the Hub have it.
    model = tiny_opt()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_opt_weights(load_model(tmp_path), state(model))


def test_keys_without_model_prefix_load(tmp_path):
    # Checkpoints saved from the bare OPTModel (e.g. facebook/opt-125m) say "decoder.layers...".
    model = tiny_opt()
    model.config.save_pretrained(tmp_path)
    save_file({k.removeprefix("model."): v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    assert_opt_weights(load_model(tmp_path), state(model))


def test_llama_with_untied_lm_head_loads_every_weight(tmp_path):
    model = tiny_llama(tied=False)
    model.save_pretrained(tmp_path)
    desc = load_model(tmp_path)
    assert (desc.arch, desc.n_heads, desc.n_kv_heads, desc.head_dim, desc.d_ffn) == \
        ("llama", 4, 2, 16, 128)
    assert desc.layers[0].wk.shape == (32, 64)
    assert desc.lm_head is not desc.embed
    assert_llama_weights(desc, state(model))


def test_llama_with_tied_embeddings_shares_the_embedding_array(tmp_path):
    model = tiny_llama(tied=True)
    model.save_pretrained(tmp_path)
    desc = load_model(tmp_path)
    assert desc.lm_head is desc.embed
    assert_llama_weights(desc, state(model))


def test_bfloat16_weights_become_float32(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    assert_llama_weights(load_model(tmp_path), state(model))


def test_sharded_safetensors_load_through_the_index(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_llama_weights(load_model(tmp_path), state(model))


# ---------------------------------------------------------------- the embedded GGUF

LAYERS_CHECKED = (0, 17, 29)


@pytest.fixture(scope="module")
def smollm():
    return load_model(default_model_path())


@pytest.fixture(scope="module")
def transformers_smollm():
    """transformers' own GGUF reader: dequantizes and un-permutes q/k independently of ours."""
    from transformers import AutoModelForCausalLM
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_embedded_gguf_has_smollm2_dims(smollm):
    assert (smollm.arch, smollm.n_layers, smollm.d_model, smollm.n_heads, smollm.n_kv_heads,
            smollm.head_dim, smollm.d_ffn, smollm.vocab_size) == \
        ("llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert smollm.rope_theta == 1e5 and smollm.lm_head is smollm.embed
    assert smollm.layers[0].w_gate.shape == (1536, 576) and smollm.layers[0].w_down.shape == (576, 1536)
    assert smollm.bos_token_id == 1 and smollm.eos_token_ids == [2]
    assert smollm.name and smollm.source_hash


@pytest.mark.parametrize("field,key", [
    ("wq", "self_attn.q_proj.weight"), ("wk", "self_attn.k_proj.weight"),
    ("wv", "self_attn.v_proj.weight"), ("w_gate", "mlp.gate_proj.weight"),
    ("w_down", "mlp.down_proj.weight"), ("attn_norm", "input_layernorm.weight")])
def test_gguf_weights_match_transformers_gguf_loading(smollm, transformers_smollm, field, key):
    for i in LAYERS_CHECKED:
        np.testing.assert_allclose(getattr(smollm.layers[i], field),
                                   transformers_smollm[f"model.layers.{i}.{key}"], rtol=0, atol=1e-6)


def test_gguf_embedding_matches_transformers_gguf_loading(smollm, transformers_smollm):
    np.testing.assert_allclose(smollm.embed, transformers_smollm["model.embed_tokens.weight"],
                               rtol=0, atol=1e-6)


def test_gguf_raw_ffn_blocks_are_the_stored_q4_1_bytes(smollm):
    t = gguf_tensors(default_model_path())["blk.3.ffn_gate.weight"]
    assert t.qtype == gguf.GGMLQuantizationType.Q4_1 and t.shape == (1536, 576)
    assert t.raw.dtype == np.uint8 and t.raw.shape == (1536, 576 // 32 * 20)
    with open(default_model_path(), "rb") as f:
        f.seek(t.offset)
        assert f.read(t.raw.nbytes) == t.raw.tobytes()
    assert np.array_equal(gguf.quants.dequantize(t.raw, t.qtype), smollm.layers[3].w_gate)


def test_tokenizer_of_embedded_gguf_round_trips_text():
    tok = load_tokenizer(default_model_path())
    ids = tok("The quick brown fox")["input_ids"]
    assert tok.decode(ids) == "The quick brown fox"


# ---------------------------------------------------------------- bad input

def test_missing_path_is_named(tmp_path):
    for path in (tmp_path / "nothing", tmp_path / "nothing.gguf"):
        with pytest.raises(ModelLoadError, match="nothing"):
            load_model(path)


def test_folder_without_config_json_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*config.json"):
        load_model(tmp_path)


def test_unsupported_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*'gpt2' is not supported"):
        load_model(tmp_path)


def test_post_layernorm_opt_is_rejected(tmp_path):
    tiny_opt().config.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "do_layer_norm_before": False}))
    with pytest.raises(ModelLoadError, match="do_layer_norm_before.*not supported"):
        load_hf(tmp_path)


def test_folder_without_weights_is_rejected(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(tmp_path)


def save_tiny_llama_with(path, edit):
    """tiny_llama saved to path with its state dict changed by edit(state_dict) on the way."""
    tiny_llama().save_pretrained(path)
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    save_tiny_llama_with(tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path)


def test_tensor_of_wrong_shape_is_named(tmp_path):
    save_tiny_llama_with(tmp_path, lambda sd: sd.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(100, 64)}))
    with pytest.raises(ModelLoadError, match=r"gate_proj.weight has shape \(100, 64\), expected \(128, 64\)"):
        load_model(tmp_path)


def test_truncated_gguf_is_rejected(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError, match=f"{cut}.*truncated"):
        load_model(cut)


def test_text_file_named_gguf_is_rejected(tmp_path):
    fake = tmp_path / "notes.gguf"
    fake.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match=f"{fake}.*not a GGUF file"):
        load_model(fake)


def test_gguf_of_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ModelLoadError, match=f"{path}.*'gpt2'.*only 'llama'"):
        load_gguf(path)


def test_gguf_with_unsupported_tensor_type_is_rejected(tmp_path):
    path = tmp_path / "int8.gguf"
    write_gguf(path, "llama", {"token_embd.weight": np.zeros((4, 32), np.int8)})
    with pytest.raises(ModelLoadError, match=f"{path}.*token_embd.weight is I8.*not supported"):
        load_gguf(path)


def test_model_path_of_another_kind_is_rejected(tmp_path):
    other = tmp_path / "weights.npz"
    shutil.copy(__file__, other)
    with pytest.raises(ModelLoadError, match=f"{other}.*expected a .gguf file"):
        load_model(other)
