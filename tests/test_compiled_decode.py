"""The compiled decode step (`ripple compile` -> APP/): the library and the native flash runtime
decode what the torch reference decodes given the same FFN sets, in this process (AppSession)
and in the native runner (ripple-run, no Python) alike; what the APP holds and says."""
import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import embedded_gguf, profile_random_llama
from ripple.android_host.app_build import build_app
from ripple.android_host.app_cmds import compile_cmd
from ripple.android_host.bench_match import compare, match_cmd, reference_ffn, reference_model, teacher_forced
from ripple.android_host.cli import main
from ripple.android_host.interface import pack_cmd, train_predictor_cmd
from ripple.compile import decode_kernels as K
from ripple.compile.app_files import APP_FILE, AppError
from ripple.compile.elf import read_elf
from ripple.compile.targets import make_target
from ripple.layout.reader import open_layout
from ripple.layout.whole_copy import open_whole_copy
from ripple.runtime_py.app_session import BYTES_NEEDED, BYTES_READ, AppSession
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import to_torch
from ripple.tuning.profile import save_profile, thresholds_at

def check_against(ref: np.ndarray, gen) -> None:
    res = compare(ref, gen.ids, gen.logits)
    assert res["within_tolerance"] and res["ids_agree_where_decided"], res


def reference_logits(app, prompt, gen, stepwise=False):
    info = json.loads((app / APP_FILE).read_text())
    tm, _ = reference_model(info, app)
    kv = torch.float16 if info["kv_dtype"] == "float16" else torch.float32
    return teacher_forced(tm, reference_ffn(tm, info, app), prompt, gen.ids, kv, stepwise)


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
    prompt = [2, 17, 99, 5, 63]
    with AppSession(app) as s:
        gen = s.generate(prompt, 12, keep_logits=True)
    check_against(reference_logits(app, prompt, gen), gen)
    # The reference is not the APP's own description of itself: the thresholds it applies are
    # the layout's, from the profile.
    meta = open_layout(layout_dir).manifest.meta
    thr = thresholds_at(meta["grid"], meta["grid_thresholds"], meta["sparsity"])
    assert json.loads((app / APP_FILE).read_text())["score_thresholds"] == pytest.approx(list(thr))
    # Sets all: every bundle of both layers read, each token's reads counted.
    assert all(st.bytes_read > 0 and st.active == 2 * 256 for st in gen.steps)


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


def test_predicted_sets_read_fewer_bundles_and_match_the_reference(random_llama_dir, recorded_llama_profile, tmp_path):
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
        gen = s.generate(prompt, 8, keep_logits=True, stepwise_prompt=True)
    n = info["model"]["d_ffn"] * info["model"]["layers"]
    assert all(0 < st.active < n for st in gen.steps)        # the predictor's sets, not every neuron
    check_against(reference_logits(app, prompt, gen, stepwise=True), gen)
    res = match_cmd(str(app), 8, str(tmp_path / "match.json"), prompt_ids=prompt)
    assert res["stepwise_prompt"] and res["engine_runner_ids_identical"]
    assert res["runner"]["within_tolerance"] and res["engine"]["ids"] == gen.ids


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
        total = s.stats()
    ref = teacher_forced(tm, None, prompt, gen.ids, torch.float32, stepwise=False)  # the plain dense model
    check_against(ref, gen)
    assert gen.ids == list(ref.argmax(1))
    copy = open_whole_copy(tmp_path / "layout", info["model"]["source_hash"])
    assert all(st.bytes_needed == 30 * copy.layer_bytes for st in gen.steps)
    # Every layer's extent read once per step: reads are counted when they finish, on the
    # runtime's thread, up to read_ahead (2) layers ahead of the layer computed.
    assert abs(total[BYTES_READ] - total[BYTES_NEEDED]) <= 2 * copy.layer_bytes


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
