"""The compiled decode step (`ripple compile` -> APP/): the library and the native flash runtime
decode what the torch reference decodes given the same FFN sets, in this process (AppSession)
and in the native runner (ripple-run, no Python) alike; what the APP holds and says."""
import json
import subprocess

import gguf
import numpy as np
import pytest
import torch

from conftest import embedded_gguf, profile_random_llama
from ripple.android_host.app_cmds import compile_cmd
from ripple.android_host.cli import main
from ripple.android_host.interface import pack_cmd, train_predictor_cmd
from ripple.compile import decode_kernels as K
from ripple.compile.app import APP_FILE, AppError, build_app
from ripple.compile.elf import read_elf
from ripple.compile.targets import make_target
from ripple.layout.bundle import decode_bundles
from ripple.layout.reader import open_layout
from ripple.layout.whole_copy import open_whole_copy
from ripple.runtime_py.app_session import AppSession
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import forward, new_cache, to_torch
from ripple.tuning.profile import save_profile, thresholds_at
from ripple.tuning.sparsity import sparse_ffn

TOL = 2e-3          # of the largest |logit|: fp32 sums in another order, nothing else


def q8(w: np.ndarray) -> torch.Tensor:
    """w as the APP holds a Hugging Face folder's matrices: Q8_0 blocks, dequantized."""
    t = gguf.GGMLQuantizationType.Q8_0
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w, np.float32), t), t)
                            .reshape(w.shape).astype(np.float32))


def reference(model_dir, layout_dir):
    """The torch model with what the APP multiplies: non-FFN matrices as Q8_0, the FFN weights
    as the layout's bundles decode (un-permuted)."""
    desc = load_model(model_dir)
    tm = to_torch(desc)
    layout = open_layout(layout_dir)
    tm.embed = q8(desc.embed)
    tm.lm_head = tm.embed if desc.lm_head is desc.embed else q8(desc.lm_head)
    raw = np.fromfile(layout.path, np.uint8)
    for i, lw in enumerate(desc.layers):
        for name in ("wq", "wk", "wv", "wo"):
            tm.layers[i][name] = q8(getattr(lw, name))
        at = int(layout.region_offsets[i])
        rows = raw[at:at + layout.d_ffn * layout.bundle_bytes].reshape(layout.d_ffn, -1)[layout.slot_of[i]]
        b = decode_bundles(layout.spec, rows)
        tm.layers[i]["w_up"] = torch.from_numpy(b.up.astype(np.float32))
        tm.layers[i]["w_down"] = torch.from_numpy(np.ascontiguousarray(b.down_t.T, np.float32))
        if b.gate is not None:
            tm.layers[i]["w_gate"] = torch.from_numpy(b.gate.astype(np.float32))
        if b.up_bias is not None:
            tm.layers[i]["b_up"] = torch.from_numpy(b.up_bias.astype(np.float32))
    return tm, layout


def teacher_forced(tm, ffn, prompt, ids, kv_dtype=torch.float16):
    """The reference's logits at each step of the engine's own ids (prefill's last, then each
    decode), so one near tie cannot make the rest of the comparison meaningless."""
    cache = new_cache(tm, 1, len(prompt) + len(ids), kv_dtype)
    out = [forward(tm, torch.tensor([prompt]), cache, ffn, last_only=True)[0, -1].numpy()]
    for t in ids[:-1]:
        out.append(forward(tm, torch.tensor([[t]]), cache, ffn)[0, -1].numpy())
    return np.stack(out)


def check_against(ref: np.ndarray, gen) -> None:
    got = np.stack(gen.logits)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= TOL * scale
    # Greedy ids agree wherever the reference's top two are further apart than the tolerance.
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * TOL * scale
    assert (np.asarray(gen.ids)[clear] == ref.argmax(1)[clear]).all()


@pytest.fixture(scope="module")
def opt_app(random_opt_dir, tmp_path_factory):
    """A random OPT (ReLU, biases, learned positions) profiled at sparsity 0.5, fp16 bundles,
    compiled with every bundle read (sets all: the kernel keeps what clears the threshold)."""
    tmp = tmp_path_factory.mktemp("opt-app")
    _, prof = profile_random_llama(random_opt_dir, 6, sparsity=0.5, grid=(0.0, 0.5))
    save_profile(prof, tmp / "profile.npz")
    pack_cmd(str(random_opt_dir), str(tmp / "layout"), str(tmp / "profile.npz"), dtype="fp16")
    app = tmp / "app"
    build_app(str(tmp / "layout"), str(app), model=str(random_opt_dir), kv_dtype="float16")
    return random_opt_dir, tmp / "layout", app


def test_compiled_opt_decodes_what_torch_decodes_with_the_same_sets(opt_app):
    model_dir, layout_dir, app = opt_app
    tm, layout = reference(model_dir, layout_dir)
    meta = layout.manifest.meta
    thr = thresholds_at(meta["grid"], meta["grid_thresholds"], meta["sparsity"])
    prompt = [2, 17, 99, 5, 63]
    with AppSession(app) as s:
        gen = s.generate(prompt, 12, keep_logits=True)
    check_against(teacher_forced(tm, sparse_ffn(tm, thr, "coef"), prompt, gen.ids), gen)
    # Sparse layers: every bundle read, fewer neurons needed than read is not the point here,
    # but each token's reads are counted.
    assert all(st.bytes_read > 0 and st.active == 2 * layout.d_ffn for st in gen.steps)


def test_the_native_runner_decodes_the_same_ids_as_this_process(opt_app, tmp_path):
    _, _, app = opt_app
    prompt = [2, 17, 99, 5, 63]
    with AppSession(app) as s:
        gen = s.generate(prompt, 10, keep_logits=True)
    out = tmp_path / "run.json"
    logits = tmp_path / "logits.bin"
    r = subprocess.run([str(app / "ripple-run"), "--prompt-ids", ",".join(map(str, prompt)), "--tokens", "10",
                        "--json", str(out), "--dump-logits", str(logits)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run = json.loads(out.read_text())
    assert run["prompt_ids"] == prompt and run["ids"] == gen.ids
    assert len(run["token_ms"]) == len(gen.ids) - 1
    assert run["bytes_read"] == [st.bytes_read for st in gen.steps]
    native = np.fromfile(logits, np.float32).reshape(len(gen.ids), -1)
    np.testing.assert_allclose(native, np.stack(gen.logits), rtol=0, atol=1e-5)
    assert run["peak_rss_bytes"] > 0 and run["o_direct"] is True


def test_the_app_folder_says_what_it_holds_and_links_no_python(opt_app):
    _, _, app = opt_app
    info = json.loads((app / APP_FILE).read_text())
    for f in ("model.so", "libripple_runtime.so", "runtime.bin", "params.bin", "model.rflash",
              "manifest.json", "ripple-run", "libtvm_runtime.so", "libtvm_ffi.so"):
        assert (app / f).is_file(), f
        assert info["files"][f]["bytes"] == (app / f).stat().st_size
    assert info["layers"]["sparse"] == [0, 1] and info["sets"] == "all"
    for f in ("ripple-run", "model.so", "libripple_runtime.so"):
        assert not any("python" in n for n in read_elf(app / f).needed), f
    assert info["total_bytes"] == sum(p.stat().st_size for p in app.iterdir() if p.name in info["files"])


def test_predicted_sets_read_fewer_bundles_and_both_engines_agree(random_llama_dir, recorded_llama_profile, tmp_path):
    _, prof = recorded_llama_profile
    save_profile(prof, tmp_path / "profile.npz")
    pack_cmd(str(random_llama_dir), str(tmp_path / "layout"), str(tmp_path / "profile.npz"), dtype="int8")
    train_predictor_cmd(str(tmp_path / "profile.npz"), str(tmp_path / "layout"), model=str(random_llama_dir),
                        rank=8, epochs=4, recall=0.8)
    app = tmp_path / "app"
    compile_cmd(str(app), layout=str(tmp_path / "layout"))
    info = json.loads((app / APP_FILE).read_text())
    assert info["sets"] == "predicted"
    prompt = [5, 9, 13]
    with AppSession(app) as s:
        gen = s.generate(prompt, 8)
    n = info["model"]["d_ffn"] * info["model"]["layers"]
    assert all(0 < st.active < n for st in gen.steps)        # the predictor's sets, not every neuron
    out = tmp_path / "run.json"
    r = subprocess.run([str(app / "ripple-run"), "--prompt-ids", "5,9,13", "--tokens", "8", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["ids"] == gen.ids


def test_predictor_kernel_matches_numpy():
    import tvm
    rng = np.random.default_rng(0)
    d, r, n = 64, 8, 96
    a, ab = rng.standard_normal((d, r)).astype(np.float16), rng.standard_normal(r).astype(np.float16)
    b, bb = rng.standard_normal((r, n)).astype(np.float16), rng.standard_normal(n).astype(np.float16)
    h = rng.standard_normal((3, d)).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"main": K.schedule_predictor(K.predictor_logits(d, r, n))}), target=make_target("host"))
    z = tvm.runtime.tensor(np.zeros((3, n), np.float32))
    lib["main"](*(tvm.runtime.tensor(x) for x in (h, a, ab, b, bb)), z)
    ref = np.maximum(h @ a.astype(np.float32) + ab.astype(np.float32), 0) @ b.astype(np.float32) + bb.astype(np.float32)
    np.testing.assert_allclose(z.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_compiled_smollm2_decodes_the_torch_reference_ids(tmp_path):
    """The embedded GGUF, every layer read whole from its whole copy (the GGUF's own blocks):
    the same greedy ids as the torch forward on the dequantized GGUF, 16 tokens."""
    model = embedded_gguf()
    pack_cmd(model, str(tmp_path / "layout"), dtype="q4d8", whole_copy=True)
    app = tmp_path / "app"
    info = build_app(str(tmp_path / "layout"), str(app), model=model, kv_dtype="float32")
    assert info["layers"]["whole"] == list(range(30)) and info["layers"]["sparse"] == []
    tm = to_torch(load_model(model))
    prompt = [1, 504, 3458, 282, 4372, 30, 216]
    with AppSession(app) as s:
        gen = s.generate(prompt, 16, keep_logits=True)
    ref = teacher_forced(tm, None, prompt, gen.ids, torch.float32)
    check_against(ref, gen)
    assert gen.ids == list(ref.argmax(1))
    copy = open_whole_copy(tmp_path / "layout", info["model"]["source_hash"])
    assert all(st.bytes_needed == 30 * copy.layer_bytes for st in gen.steps)
    # Reads are counted when they finish, and run up to read_ahead (2) layers ahead of the step.
    read = sum(st.bytes_read for st in gen.steps) / copy.layer_bytes
    assert abs(read - 30 * len(gen.steps)) <= 2


def test_compile_refuses_a_folder_that_is_not_empty(opt_app, tmp_path):
    _, layout, _ = opt_app
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "x").write_text("x")
    with pytest.raises(AppError, match="not an empty folder"):
        build_app(str(layout), str(tmp_path / "app"))
    assert (tmp_path / "app" / "x").read_text() == "x"


def test_compile_cli_takes_a_layout_or_a_model_not_both(capsys, tmp_path):
    rc = main(["compile", "--out", str(tmp_path / "app")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--layout" in err and "--model" in err
    assert not (tmp_path / "app").exists()


def test_generate_with_an_app_missing_its_json_is_one_line(capsys, tmp_path):
    (tmp_path / "app").mkdir()
    rc = main(["generate", "--app", str(tmp_path / "app")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "app.json" in err


def test_compile_verify_makes_the_runtime_refuse_a_changed_flash_file(opt_app, tmp_path):
    _, layout, _ = opt_app
    app = tmp_path / "app"
    build_app(str(layout), str(app), verify=True)
    assert json.loads((app / APP_FILE).read_text())["io"]["verify"] is True
    with AppSession(app) as s:
        s.generate([2, 3], 3)                     # clean: reads pass their checks
    with open(app / "model.rflash", "r+b") as f:
        f.seek(4096 + 100)
        b = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    with AppSession(app) as s, pytest.raises(Exception, match="does not match its checksum"):
        s.generate([2, 3], 3)
