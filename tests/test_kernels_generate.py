"""`ripple generate --backend tvm`: the compiled graph with the flash-read hook gives the tokens
the torch backend gives, on the embedded model, with per-token time split into I/O and compute."""
import numpy as np
import pytest
import torch

from ripple.android_host.cli import build_parser
from ripple.layout import BundleSpec, encode_bundles, open_layout, write_layout
from ripple.runtime_py.backends import ffn_backend
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
            gen = generate(tm, layout, reader, thr, "coef", ids, 4, make_ffn=ffn_backend(backend))
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


def test_generate_plans_by_a_device_profile_and_holds_gguf_blocks(tmp_path, random_llama_dir, capsys):
    """`ripple generate --storage D` plans its reads by D's latency table (ours' planner): the
    same tokens, from the requests that planner makes; --non-ffn-dtype gguf holds the GGUF's own
    blocks (the embedded model: its non-FFN bytes), and for a model that is not such a GGUF says
    so in one line."""
    import gguf
    from ripple.android_host.cli import main
    from ripple.android_host.devices import load_device
    from ripple.android_host.interface import generate_cmd, pack_cmd
    from ripple.runtime_py.strategies import STRATEGIES, layer_planner
    gguf_path = default_model_path()
    pack_cmd(str(gguf_path), str(tmp_path / "lay"), dtype="q4d8")
    run = dict(layout_dir=str(tmp_path / "lay"), tokens=1, read_ahead=0, backend="tvm", non_ffn_dtype="gguf")
    plain = generate_cmd(**run)
    planned = generate_cmd(**run, storage="oneplus12-ufs40")
    assert planned["tokens"] == plain["tokens"]
    # Packed without a profile every neuron is active: one run per layer, which ours' planner
    # cuts where the device's cost per byte flattens.
    lay = open_layout(tmp_path / "lay")
    L, n = lay.perm.shape
    plan = layer_planner(STRATEGIES["ours"], load_device("oneplus12-ufs40").storage, 32, n)
    want = sum(len(plan(np.arange(n), int(lay.region_offsets[l]), lay.bundle_bytes, lay.alignment).extents)
               for l in range(L))
    assert plain["io"]["reads_per_token"] == [L] and planned["io"]["reads_per_token"] == [want]
    blocks = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(gguf_path)).tensors
                 if "ffn_" not in t.name and t.tensor_type.name in ("Q4_1", "Q8_0"))
    held = planned["resident"]["non_ffn_dtypes"]
    assert held["q4_1"] + held["q8_0"] == blocks and set(held) <= {"q4_1", "q8_0", "float32"}
    pack_cmd(str(random_llama_dir), str(tmp_path / "other"))
    capsys.readouterr()
    code = main(["generate", "--layout", str(tmp_path / "other"), "--model", str(random_llama_dir),
                 "--non-ffn-dtype", "gguf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs a GGUF" in err[0]
    code = main(["generate", "--layout", str(tmp_path / "other"), "--model", str(random_llama_dir),
                 "--storage", str(tmp_path / "nowhere.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no such device profile" in err[0]


def test_generate_reads_layers_whole_from_the_copy_and_pins_what_fits(tmp_path, capsys):
    """With a whole copy, every layer read whole comes from it (its extent's bytes a token), and
    --pin-mb holds as many whole layers as fit in DRAM, never read again; asking to pin with
    no copy is one line."""
    from ripple.android_host.cli import main
    from ripple.android_host.interface import generate_cmd, pack_cmd
    from ripple.layout.whole_copy import open_whole_copy
    gguf_path = default_model_path()
    pack_cmd(str(gguf_path), str(tmp_path / "lay"), dtype="q4d8", whole_copy=True)
    copy = open_whole_copy(tmp_path / "lay", open_layout(tmp_path / "lay").manifest.source_hash)
    out = generate_cmd(str(tmp_path / "lay"), tokens=3, backend="tvm", non_ffn_dtype="gguf",
                       pin_mb=2 * copy.layer_bytes / (1 << 20))
    L = copy.n_layers
    assert out["io"]["bytes_read_per_token"][1:] == [(L - 2) * copy.layer_bytes] * (len(out["tokens"]) - 1)
    assert out["resident"]["ffn_cache"] == 2 * copy.layer_bytes
    capsys.readouterr()
    code = main(["generate", "--layout", str(tmp_path / "lay"), "--no-whole-copy", "--pin-mb", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pack with --whole-copy" in err[0]
