"""Lookahead in the compiled decode step (`ripple compile --lookahead J`): each sparse layer's
set predicted layers early and its reads queued by ripple.rt.prefetch; its fetch takes what
they read and reads the rest of its own set on demand, so the APP decodes what the same-layer
APP decodes, and the runtime's counters say what the prefetches read, used and missed."""
import json
import shutil
import subprocess

import numpy as np
import pytest

from ripple.android_host.app_cmds import compile_cmd
from ripple.android_host.cli import main
from ripple.android_host.interface import pack_cmd, train_predictor_cmd
from ripple.compile.app_files import APP_FILE
from ripple.compile.runtime_config import read_runtime_config
from ripple.runtime_py.app_session import (ACTIVE, BYTES_READ, CACHE_HITS, FETCHES, MISSES, PF_BYTES, PF_USED,
                                           PREFETCHES, QD_MAX, QD_SAMPLES, QD_SUM, AppSession)
from ripple.tuning.profile import save_profile


@pytest.fixture(scope="module")
def layouts(random_llama_dir, recorded_llama_profile, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lookahead")
    _, prof = recorded_llama_profile
    save_profile(prof, tmp / "profile.npz")
    pack_cmd(str(random_llama_dir), str(tmp / "layout"), str(tmp / "profile.npz"), dtype="int8")
    train_predictor_cmd(str(tmp / "profile.npz"), str(tmp / "layout"), model=str(random_llama_dir),
                        rank=8, epochs=4, recall=0.8, lookahead=1)
    apps = {}
    for j in (0, 1):
        apps[j] = tmp / f"app{j}"
        compile_cmd(str(apps[j]), layout=str(tmp / "layout"), lookahead=j)
    return tmp, apps


def _run(app, prompt, tokens):
    with AppSession(app) as s:
        gen = s.generate(prompt, tokens, keep_logits=True, stepwise_prompt=True)
        stats = s.stats()
    return gen, stats


def test_lookahead_decodes_what_the_same_layer_app_decodes(layouts):
    _, apps = layouts
    prompt = [5, 9, 13]
    same, st0 = _run(apps[0], prompt, 8)
    ahead, st1 = _run(apps[1], prompt, 8)
    assert ahead.ids == same.ids
    np.testing.assert_allclose(np.stack(ahead.logits), np.stack(same.logits), rtol=0, atol=1e-4)
    # the same neurons computed: each fetch returned the same-layer predictor's set
    assert [s.active for s in ahead.steps] == [s.active for s in same.steps]
    info = json.loads((apps[1] / APP_FILE).read_text())
    assert info["lookahead"] == [0, 1]          # layer 1 read from layer 0's input; layer 0 has none before it
    cfg = read_runtime_config(apps[1] / info["runtime_config"])
    assert cfg.lookahead == 1 and np.isinf(cfg.la_thresholds[0]) and np.isfinite(cfg.la_thresholds[1])
    # one prefetch a step, for layer 1: half the fetches (both layers are sparse)
    assert st1[PREFETCHES] == st1[FETCHES] / 2 > 0 and st0[PREFETCHES] == 0
    # layer 1's own set came from the prefetch or was read on demand, nothing else (no pinned)
    assert st1[CACHE_HITS] == 0
    assert st1[PF_BYTES] > 0 and st1[PF_USED] > 0
    assert st1[PF_BYTES] <= st1[BYTES_READ]
    assert 1 <= st1[QD_MAX] <= info["io"]["queue_depth"] and st1[QD_SUM] >= st1[QD_SAMPLES] > 0
    # every active bundle of layer 1 either prefetched or a miss: layer 0's are the rest
    layer0 = st0[ACTIVE] - (st1[PF_USED] + st1[MISSES])
    assert 0 < layer0 < st0[ACTIVE]
    assert st1[ACTIVE] == st0[ACTIVE]


def test_compile_lookahead_without_the_predictors_is_one_line(layouts, tmp_path, capsys):
    tmp, _ = layouts
    bare = tmp_path / "layout"
    shutil.copytree(tmp / "layout", bare)
    (bare / "lookahead.npz").unlink()
    code = main(["compile", "--layout", str(bare), "--out", str(tmp_path / "app"), "--lookahead", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lookahead.npz" in err[0] and "--lookahead 1" in err[0]
    assert not (tmp_path / "app").exists()


def test_a_dram_budget_pins_the_hottest_bundles_of_sparse_layers(layouts):
    tmp, apps = layouts
    prompt = [5, 9, 13]
    same, _ = _run(apps[0], prompt, 6)
    info = json.loads((apps[0] / APP_FILE).read_text())
    bb, n, L = info["bundle"], info["model"]["d_ffn"], info["model"]["layers"]
    from ripple.layout.reader import open_layout
    bundle_bytes = open_layout(tmp / "layout").bundle_bytes
    # Every bundle fits: the FFN is in DRAM, nothing is read, the same ids come out.
    dram = tmp / "app-dram"
    compile_cmd(str(dram), layout=str(tmp / "layout"), budget_mb=L * n * bundle_bytes / (1 << 20), lookahead=1)
    got, st = _run(dram, prompt, 6)
    assert got.ids == same.ids and all(s.bytes_read == 0 for s in got.steps)
    assert st[PF_BYTES] == 0 and st[MISSES] == 0 and st[CACHE_HITS] == st[ACTIVE] > 0
    # A quarter of them: the profile's most frequent, hits counted, the same ids.
    part = tmp / "app-part"
    budget = L * n * bundle_bytes / 4 / (1 << 20)
    with pytest.raises(Exception, match="--profile"):
        compile_cmd(str(part), layout=str(tmp / "layout"), budget_mb=budget)
    compile_cmd(str(part), layout=str(tmp / "layout"), budget_mb=budget, profile=str(tmp / "profile.npz"),
                pinned_share=1.0)
    layers = json.loads((part / APP_FILE).read_text())["layers"]
    assert sum(layers["pinned_bundles"]) == L * n // 4 and layers["lru_bundles_per_sparse_layer"] == 0 and bb
    got, st = _run(part, prompt, 6)
    assert got.ids == same.ids and 0 < st[CACHE_HITS] < st[ACTIVE]
    # None pinned: an LRU of what each layer read, with the lookahead (prefetches skip what it holds).
    lru = tmp / "app-lru"
    compile_cmd(str(lru), layout=str(tmp / "layout"), budget_mb=budget, pinned_share=0.0, lookahead=1)
    layers = json.loads((lru / APP_FILE).read_text())["layers"]
    assert sum(layers["pinned_bundles"]) == 0 and layers["lru_bundles_per_sparse_layer"] == n // 4
    got, st = _run(lru, prompt, 6)
    assert got.ids == same.ids and 0 < st[CACHE_HITS] < st[ACTIVE]
    np.testing.assert_allclose(np.stack(got.logits), np.stack(same.logits), rtol=0, atol=1e-4)
    # Chosen by the storage model when a device profile is given.
    auto = tmp / "app-auto"
    compile_cmd(str(auto), layout=str(tmp / "layout"), budget_mb=budget, profile=str(tmp / "profile.npz"),
                storage="pixel8-ufs31")
    layers = json.loads((auto / APP_FILE).read_text())["layers"]
    assert "storage model" in layers["pinned_share_source"] and 0 <= layers["pinned_share"] <= 1


def test_the_native_runner_runs_a_lookahead_app(layouts, tmp_path):
    _, apps = layouts
    prompt = [5, 9, 13]
    with AppSession(apps[1]) as s:
        gen = s.generate(prompt, 6)
    out = tmp_path / "run.json"
    r = subprocess.run([str(apps[1] / "ripple-run"), "--prompt-ids", ",".join(map(str, prompt)), "--tokens", "6",
                        "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["ids"] == gen.ids


def test_verify_checks_what_the_prefetches_read(layouts, tmp_path):
    from ripple.layout.reader import open_layout
    tmp, _ = layouts
    app = tmp_path / "app"
    compile_cmd(str(app), layout=str(tmp / "layout"), lookahead=1, verify=True)
    with AppSession(app) as s:
        s.generate([5, 9], 3)                         # clean: every read passes its check
    lay = open_layout(tmp / "layout")
    start = int(lay.region_offsets[1])
    end = start + lay.perm.shape[1] * lay.bundle_bytes
    with open(app / "model.rflash", "r+b") as f:      # one byte of every block of layer 1's region
        for at in range(start + 7, end, lay.alignment):
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0xFF]))
    with AppSession(app) as s, pytest.raises(Exception, match=r"\(prefetched\): .*does not match its checksum"):
        s.generate([5, 9], 3)
