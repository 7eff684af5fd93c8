"""`ripple generate --backend tvm`: the compiled graph with the flash-read hook gives the tokens
the torch backend gives, on the embedded model, with per-token time split into I/O and compute."""
import numpy as np
import pytest
import torch

from ripple.android_host.cli import build_parser
from ripple.layout import BundleSpec, encode_bundles, open_layout, write_layout
from ripple.runtime_py.engine import generate, report
from ripple.runtime_py.reader import FlashReader
from ripple.tuning.checkpoint import default_model_path, load_model, load_tokenizer
from ripple.tuning.forward import dense_ffn, forward, to_torch
from ripple.tuning.sparsity import scores, thresholds_for

SPARSITY = 0.7
PROMPT = "Flash memory keeps data without power because"


@pytest.fixture(scope="module")
def model():
    # One torch thread: on a loaded 2-core machine two OpenMP threads run ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = default_model_path()
    desc = load_model(path)
    yield desc, to_torch(desc), load_tokenizer(path)(PROMPT)["input_ids"]
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sparse_layout(model, tmp_path_factory):
    """The embedded model packed as is; thresholds for SPARSITY from the prompt's own scores
    (a profile in miniature: `ripple profile` takes a minute)."""
    desc, tm, ids = model
    seen = {}
    dense = dense_ffn(tm)

    def record(layer, h):
        seen[layer] = scores(tm, layer, h.reshape(-1, h.shape[-1]), "coef")[1].numpy()
        return dense(layer, h)
    forward(tm, torch.tensor([ids]), ffn=record)
    thr = np.array([thresholds_for(seen[layer], SPARSITY) for layer in range(desc.n_layers)])
    spec = BundleSpec(desc.activation, desc.d_model, "fp16", False)
    out = tmp_path_factory.mktemp("smollm2")
    layers = ((encode_bundles(spec, lw.w_up, lw.w_down.T, lw.w_gate), np.arange(desc.d_ffn))
              for lw in desc.layers)
    write_layout(out, spec, layers, {}, desc.source, desc.source_hash)
    return open_layout(out), thr


def test_tvm_backend_generates_the_same_tokens_as_torch(model, sparse_layout):
    desc, tm, ids = model
    layout, thr = sparse_layout
    runs = {}
    for backend in ("torch", "tvm"):
        with FlashReader(layout.path, 8) as reader:
            gen = generate(tm, layout, reader, thr, "coef", ids, 4, backend=backend)
            runs[backend] = (gen, report(gen, reader, desc.n_layers * desc.d_ffn))
    assert runs["tvm"][0].tokens == runs["torch"][0].tokens and len(runs["tvm"][0].tokens) == 4
    io, s = runs["tvm"][1]["io"], runs["tvm"][1]["summary"]
    assert io["bytes_needed_per_token"] == runs["torch"][1]["io"]["bytes_needed_per_token"]
    assert 0 < np.mean(io["active_fraction_per_token"]) < 0.9
    assert s["io_ms_median"] > 0 and s["compute_ms_median"] > 0


def test_generate_takes_the_backend_flag():
    args = build_parser().parse_args(["generate", "--layout", "L", "--backend", "tvm"])
    assert args.backend == "tvm"
    assert build_parser().parse_args(["generate", "--layout", "L"]).backend == "torch"
