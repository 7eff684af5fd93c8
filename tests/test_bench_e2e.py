"""`ripple bench e2e`: without llama-cpp-python it says in one line how to get it; the JSON
has the issue's shape; the `ours` and `ours-dense` workers run the real engine on a tiny
model (profile, predictor, ours placement and cache, flash file) and report what it holds."""
import json
import sys

import numpy as np
import pytest

from ripple.android_host import bench_e2e
from ripple.android_host.bench_e2e import CONFIG_KEYS, CONFIGS, assemble, ours_worker, prepare_ours
from ripple.android_host.cli import main
from ripple.android_host.devices import published_table

TOP_KEYS = {"model", "prompt_tokens", "threads", "fio", "configs"}


def test_without_llama_cpp_it_says_make_bench_deps_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)        # import llama_cpp -> ImportError
    out = tmp_path / "e2e.json"
    rc = main(["bench", "e2e", "--json", str(out), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc != 0
    assert len(err.strip().splitlines()) == 1 and "make bench-deps" in err
    assert not out.exists()


def _llama_raw(ms, verified, resident):
    return {"token_ms": ms, "bytes_read": [0 if verified is None else 1 << 20] * len(ms),
            "resident_before": [resident] * len(ms), "kv_bytes": 1000, "evicted_verified": verified,
            "eviction_notes": [], "evicted_bytes": 0, "rss_bytes": 5 << 20, "ppl": 10.0, "tokens": []}


def _ours_raw(ms, io):
    return {"token_ms": ms, "io_ms": io, "bytes_read": [4096] * len(ms), "bytes_needed": [4096] * len(ms),
            "summary": {"compute_ms_median": float(np.median(np.subtract(ms, io)))}, "o_direct": True,
            "fallback_reason": "", "sets": "predicted", "rss_bytes": 7 << 20, "ppl": 10.5, "tokens": [],
            "resident": {"non_ffn_weights": 100, "ffn_weights_dram_copy": 0, "ffn_cache": 30,
                         "predictor": 20, "kv_cache": 50, "total": 200}}


def test_assembled_json_has_the_issue_shape_and_derives_llama_io_from_warm():
    ms = list(np.linspace(10, 20, 33))
    raw = {"llamacpp-warm": _llama_raw(ms, None, 9 << 20),
           "llamacpp-cold": _llama_raw([m + 5 for m in ms], True, 0),
           "llamacpp-ffn-cold": _llama_raw([m + 3 for m in ms], False, 4 << 20),
           "ours": _ours_raw(ms, [2.0] * 33), "ours-dense": _ours_raw(ms, [8.0] * 33)}
    r = assemble("m", 12, 2, {"seq_MBps": 100.0}, raw)
    assert set(r) == TOP_KEYS and list(r["configs"]) == list(CONFIGS)
    for row in r["configs"].values():
        assert tuple(row) == CONFIG_KEYS
    json.dumps(r)                                                # plain JSON values only
    c = r["configs"]
    assert c["llamacpp-warm"]["per_token_ms_median"] == pytest.approx(15.0)
    assert c["llamacpp-cold"]["io_ms"] == pytest.approx(5.0)
    assert c["llamacpp-cold"]["compute_ms"] == pytest.approx(15.0)
    assert c["llamacpp-warm"]["model_bytes_resident"] == (9 << 20) + 1000
    assert c["llamacpp-ffn-cold"]["evicted_verified"] is False
    assert c["ours"]["model_bytes_resident"] == 100 + 0 + 30 + 20 + 50     # the engine's own total
    assert c["ours"]["io_ms"] == 2.0 and c["ours"]["evicted_verified"] is True


def test_rounds_report_each_figure_as_its_median_over_the_rounds():
    from ripple.android_host.bench_e2e import median_rounds
    ms = list(np.linspace(10, 20, 33))
    rows = []
    for shift, verified in ((0.0, True), (30.0, True), (6.0, False)):    # a slow middle round
        raw = {"llamacpp-warm": _llama_raw([m + shift for m in ms], None, 9 << 20),
               "llamacpp-cold": _llama_raw([m + shift + 5 for m in ms], verified, 0),
               "ours": _ours_raw([m + shift for m in ms], [2.0 + shift] * 33)}
        if shift:
            for r in raw.values():
                r["ppl"] = None                  # measured in the first round only
        rows.append(assemble("m", 12, 2, {}, raw)["configs"])
    c = median_rounds(rows)
    assert c["ours"]["per_token_ms_median"] == pytest.approx(15.0 + 6.0)
    assert c["ours"]["io_ms"] == pytest.approx(8.0)
    assert c["llamacpp-cold"]["io_ms"] == pytest.approx(5.0)
    assert c["ours"]["ppl"] == rows[0]["ours"]["ppl"] is not None
    assert c["llamacpp-cold"]["evicted_verified"] is False               # not verified in every round
    assert tuple(c["ours"]) == CONFIG_KEYS


@pytest.fixture(scope="module")
def tiny_setup(random_llama_dir, tmp_path_factory):
    from ripple.tuning.checkpoint import load_model
    from ripple.tuning.forward import to_torch
    from ripple.tuning.profile import run_profile, save_profile
    d = tmp_path_factory.mktemp("e2e")
    desc = load_model(random_llama_dir)
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, 128, 32) for _ in range(12)]     # the predictor needs > 282
    held = [rng.integers(0, 128, 32) for _ in range(2)]
    save_profile(run_profile(to_torch(desc), calib, held, "coef", sparsity=0.5, grid=(0.0, 0.5),
                             record_inputs=True), d / "p.npz")
    storage = published_table(100.0, 20_000, 2000, [4096 << i for i in range(11)], [1, 2, 4, 8, 16, 32])
    setup = prepare_ours(random_llama_dir, desc, d, "int8", None, 0.1, 4, storage, str(d / "p.npz"))
    return setup, [h.tolist() for h in held]


def test_ours_workers_run_the_engine_and_count_what_it_holds(tiny_setup):
    setup, seqs = tiny_setup
    assert setup.predictor is not None and setup.strategy.name == "ours"
    prompt = [1, 5, 9, 13]
    raw = {"ours": ours_worker(setup, prompt, 4, 1, False, seqs, 4),
           "ours-dense": ours_worker(setup, prompt, 4, 1, True, seqs, 4)}
    assert raw["ours"]["sets"] == "predicted"
    r = assemble("tiny", len(prompt), 1, {}, raw)
    ours, dense = r["configs"]["ours"], r["configs"]["ours-dense"]
    assert tuple(ours) == CONFIG_KEYS
    # Dense reads every bundle of every layer each token; ours its sets' misses, or a whole
    # region read ahead where its last plan read nearly all of it (runtime_py.read_ahead).
    n_layers, n, bb = 2, 192, bench_e2e._bundle_bytes(setup.layout_dir)
    assert dense["bytes_read_per_token"] >= n_layers * n * bb
    assert 0 < ours["bytes_read_per_token"] <= dense["bytes_read_per_token"]
    held = raw["ours"]["resident"]
    assert held["ffn_cache"] <= setup.budget_bytes and held["predictor"] > 0
    assert held["ffn_weights_dram_copy"] == raw["ours-dense"]["resident"]["ffn_weights_dram_copy"] == 0
    assert ours["model_bytes_resident"] == held["total"] > held["non_ffn_weights"] > 0
    assert np.isfinite(ours["ppl"]) and np.isfinite(dense["ppl"])
