"""`ripple bench e2e`: without llama-cpp-python it says in one line how to get it; the JSON
has the issue's shape and targets; the compiled engine's configurations run real APP folders
built from a tiny model's bench layout (profile, predictor, ours placement, flash file): in a
Python process (`ours`, `ours-dense`) and by ripple-run (`native`), cached by what they are
built from."""
import json
import sys

import numpy as np
import pytest

from ripple.android_host import bench_app, bench_e2e
from ripple.android_host.bench_e2e import (APP_CONFIGS, CONFIG_KEYS, CONFIGS, EXTRA_KEYS, TARGETS, assemble,
                                           median_rounds, prepare_ours, python_ppl_worker, targets)
from ripple.android_host.cli import main
from ripple.android_host.devices import load_device, published_table

TOP_KEYS = {"model", "prompt_tokens", "threads", "fio", "configs"}
ROW_KEYS = CONFIG_KEYS + EXTRA_KEYS


def test_without_llama_cpp_it_says_make_bench_deps_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)        # import llama_cpp -> ImportError
    out = tmp_path / "e2e.json"
    rc = main(["bench", "e2e", "--json", str(out), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc != 0
    assert len(err.strip().splitlines()) == 1 and "make bench-deps" in err
    assert not out.exists()


@pytest.mark.parametrize("extra, says", [
    (["--configs", "llamacpp-warm"], "give the original's GGUF as --llamacpp-model"),
    (["--llamacpp-model", "NOTES"], "not a GGUF file; pass the original model's .gguf"),
])
def test_a_folder_takes_llama_cpp_only_with_a_gguf_beside_it(random_llama_dir, tmp_path, capsys, extra, says):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    out = tmp_path / "e2e.json"
    rc = main(["bench", "e2e", "--model", str(random_llama_dir), "--json", str(out), "--cache-dir",
               str(tmp_path / "cache")] + [str(notes) if a == "NOTES" else a for a in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and says in err[0], err
    assert not out.exists() and not (tmp_path / "cache").exists()


def _llama_raw(ms, verified, resident):
    return {"token_ms": ms, "bytes_read": [0 if verified is None else 1 << 20] * len(ms),
            "resident_before": [resident] * len(ms), "kv_bytes": 1000, "evicted_verified": verified,
            "eviction_notes": [], "evicted_bytes": 0, "rss_bytes": 50 << 20, "peak_rss_bytes": 60 << 20,
            "prefill_ms": 100.0, "prefill_tokens": 12, "ppl": 10.0, "tokens": [3] * len(ms)}


def _app_raw(ms, io, outside=0.25, ppl=10.1, peak=40 << 20):
    return {"token_ms": ms, "io_ms": io, "bytes_read": [4096] * len(ms), "outside_ms": outside and [outside] * len(ms),
            "prefill_ms": 50.0, "prefill_tokens": 12, "ids": [4] * (len(ms) + 1), "tokens": [4] * (len(ms) + 1),
            "rss_bytes": 35 << 20, "peak_rss_bytes": peak, "o_direct": True, "fallback_reason": "",
            "resident": {"params": 3 << 20, "kv": 1 << 20, "runtime_pinned": 512 << 10, "runtime_buffers": 512 << 10,
                         "total": 5 << 20},
            "ppl": ppl, "ppl_source": "the APP's own logits" if ppl else "not measured"}


def _raw(ms, shift=0.0, verified=True):
    ms = [m + shift for m in ms]
    return {"llamacpp-warm": _llama_raw(ms, None, 9 << 20),
            "llamacpp-cold": _llama_raw([m + 5 for m in ms], verified, 0),
            "llamacpp-ffn-cold": _llama_raw([m + 3 for m in ms], False, 4 << 20),
            "ours": _app_raw(ms, [2.0 + shift] * len(ms)), "ours-dense": _app_raw(ms, [8.0] * len(ms)),
            "native": _app_raw([m - 1 for m in ms], [2.0] * len(ms), outside=None, ppl=None)}


def test_assembled_json_has_the_issue_shape_and_derives_llama_io_from_warm():
    ms = list(np.linspace(10, 20, 33))
    r = assemble("m", 12, 2, {"seq_MBps": 100.0}, _raw(ms))
    assert set(r) == TOP_KEYS and list(r["configs"]) == list(bench_e2e.DEFAULT_CONFIGS["gguf"])
    for row in r["configs"].values():
        assert tuple(row) == ROW_KEYS
    json.dumps(r)                                                # plain JSON values only
    c = r["configs"]
    assert c["llamacpp-warm"]["per_token_ms_median"] == pytest.approx(15.0)
    assert c["llamacpp-cold"]["io_ms"] == pytest.approx(5.0)
    assert c["llamacpp-cold"]["compute_ms"] == pytest.approx(15.0)
    assert c["llamacpp-warm"]["model_bytes_resident"] == (9 << 20) + 1000
    assert c["llamacpp-ffn-cold"]["evicted_verified"] is False
    assert c["llamacpp-warm"]["prefill_tokens_per_s"] == pytest.approx(120.0)
    assert c["ours"]["model_bytes_resident"] == 5 << 20                    # what the APP holds
    assert c["ours"]["io_ms"] == 2.0 and c["ours"]["compute_ms"] == pytest.approx(13.0)
    assert c["ours"]["evicted_verified"] is True and c["ours"]["outside_ms_median"] == 0.25
    assert c["ours"]["prefill_tokens_per_s"] == pytest.approx(240.0) and c["ours"]["peak_rss_bytes"] == 40 << 20
    assert c["native"]["ppl"] is None and c["native"]["outside_ms_median"] is None
    assert c["native"]["ppl_source"] == "not measured"


def test_targets_are_ratios_against_their_limits_and_none_without_a_side():
    ms = list(np.linspace(10, 20, 33))
    c = assemble("m", 12, 2, {}, _raw(ms))["configs"]
    t = targets(c, ppl_python=10.0)
    assert set(t) == set(TARGETS)
    assert t["ours_over_llamacpp_warm"]["ratio"] == pytest.approx(1.0) and t["ours_over_llamacpp_warm"]["met"]
    assert t["ours_over_llamacpp_cold"]["ratio"] == pytest.approx(15 / 20)
    assert t["ours_over_llamacpp_cold"]["met"] is False
    assert t["dram_over_llamacpp_warm"]["ratio"] == pytest.approx((5 << 20) / ((9 << 20) + 1000), abs=1e-4)
    assert t["native_peak_rss_over_llamacpp_rss"]["ratio"] == pytest.approx(40 / 50)
    assert t["ppl_over_python_engine"]["ratio"] == pytest.approx(1.01) and t["ppl_over_python_engine"]["met"]
    assert targets(c)["ppl_over_python_engine"]["met"] is None          # the Python engine not measured
    del c["native"]
    assert targets(c)["native_peak_rss_over_llamacpp_rss"] == {
        "ratio": None, "target": 1.0, "met": None, "of": "native.peak_rss_bytes / llamacpp-warm.rss_bytes"}


def test_rounds_report_each_figure_as_its_median_over_the_rounds():
    ms = list(np.linspace(10, 20, 33))
    rows = []
    for shift, verified in ((0.0, True), (30.0, True), (6.0, False)):    # a slow middle round
        raw = _raw(ms, shift, verified)
        if shift:
            for r in raw.values():
                r["ppl"] = None                  # measured in the first round only
        rows.append(assemble("m", 12, 2, {}, raw)["configs"])
    c = median_rounds(rows)
    assert c["ours"]["per_token_ms_median"] == pytest.approx(15.0 + 6.0)
    assert c["ours"]["io_ms"] == pytest.approx(8.0)
    assert c["llamacpp-cold"]["io_ms"] == pytest.approx(5.0)
    assert c["ours"]["ppl"] == rows[0]["ours"]["ppl"] is not None
    assert c["ours"]["ids"] == rows[0]["ours"]["ids"] and c["ours"]["ppl_source"] == rows[0]["ours"]["ppl_source"]
    assert c["llamacpp-cold"]["evicted_verified"] is False               # not verified in every round
    assert tuple(c["ours"]) == ROW_KEYS


@pytest.fixture(scope="module")
def tiny(random_llama_dir, tmp_path_factory):
    """The bench's preparation on a tiny random Llama (no GGUF: no whole copy, so ours reads
    predicted sets and ours-dense every bundle), and its APPs built into the cache folder."""
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
    setup = prepare_ours(random_llama_dir, desc, d, "int8", None, 0.1, 4, storage, str(d / "p.npz"), lookahead=1)
    storage_file = bench_app.save_storage(storage, d, setup.budget_bytes, {"probe": "published figures"})
    ffn = desc.n_layers * desc.d_ffn * bench_e2e._bundle_bytes(setup.layout_dir)
    wanted = bench_app.recipes(setup.layout_dir, setup.whole_copy, setup.budget_bytes, storage_file,
                               bench_e2e.KV_DTYPE, CONFIGS, setup.profile, 1, ffn)
    apps = bench_app.prepare_apps(str(random_llama_dir), d, wanted, desc.source_hash, setup.predictor, 4,
                                  bench_e2e.READ_AHEAD)
    return setup, [h.tolist() for h in held], d, wanted, apps, desc.source_hash


def test_the_measured_storage_is_saved_as_the_device_profile_the_apps_plan_with(tiny):
    setup, _, d, wanted, apps, _ = tiny
    files = list(d.glob("storage-*.json"))
    assert len(files) == 1 and wanted["ours"].storage_file == str(files[0])
    assert load_device(files[0]).storage.to_json() == setup.storage.to_json()
    info = json.loads((d / apps["ours"] / "app.json").read_text())
    assert info["io"]["storage_profile"] == "storage.json" and info["io"]["collapse_gap_bytes"] > 0
    assert info["io"]["budget_bytes"] == int(setup.budget_bytes)


def test_ours_and_native_run_one_app_and_dense_another(tiny):
    _, _, _, wanted, apps, _ = tiny
    assert apps["ours"] == apps["native"] != apps["ours-dense"]
    assert set(wanted) == set(APP_CONFIGS)
    dense = json.loads((bench_app.Path(apps["ours-dense"]) / "app.json").read_text())
    assert dense["sets"] == "all" and dense["io"]["budget_bytes"] == 0


def test_the_app_configurations_decode_the_same_ids_and_count_what_they_hold(tiny):
    setup, seqs, _, _, apps, _ = tiny
    prompt = [1, 5, 9, 13]
    raw = {"ours": bench_app.app_worker(apps["ours"], prompt, 4, 1, seqs),
           "ours-dense": bench_app.app_worker(apps["ours-dense"], prompt, 4, 1, None),
           "native": bench_app.native_worker(apps["native"], prompt, 4, 1)}
    c = assemble("tiny", len(prompt), 1, {}, raw)["configs"]
    for row in c.values():
        assert tuple(row) == ROW_KEYS and len(row["ids"]) == 5    # the prefill's id, then 4 timed decodes
    assert c["native"]["ids"] == c["ours"]["ids"]
    # Dense reads every bundle of every layer each token; ours needs its predicted sets (on this
    # disk's table a gap this small is read through, so it may read as much).
    n_layers, n, bb = 2, 192, bench_e2e._bundle_bytes(setup.layout_dir)
    assert c["ours-dense"]["bytes_read_per_token"] >= n_layers * n * bb
    assert 0 < c["ours"]["bytes_read_per_token"] <= c["ours-dense"]["bytes_read_per_token"]
    assert all(0 < a < n_layers * n for a in raw["ours"]["active"])
    assert all(a == n_layers * n for a in raw["ours-dense"]["active"])
    assert c["native"]["bytes_read_per_token"] == c["ours"]["bytes_read_per_token"]
    held = raw["ours"]["resident"]
    assert held["params"] > 0 and held["kv"] > 0 and c["ours"]["model_bytes_resident"] == held["total"]
    # The same APP holds the same; AppSession counts params.bin with its alignment padding.
    assert {k: v for k, v in raw["native"]["resident"].items() if k not in ("params", "total")} == \
        {k: v for k, v in held.items() if k not in ("params", "total")}
    assert raw["native"]["resident"]["params"] == pytest.approx(held["params"], rel=0.01)
    assert 0 < c["native"]["peak_rss_bytes"] < c["ours"]["peak_rss_bytes"]         # no Python in it
    assert c["ours"]["outside_ms_median"] >= 0 and c["ours"]["prefill_tokens_per_s"] > 0
    assert np.isfinite(c["ours"]["ppl"]) and c["ours-dense"]["ppl"] is None and c["native"]["ppl"] is None


def test_lookahead_and_the_ffn_in_dram_decode_what_ours_decodes(tiny):
    setup, seqs, _, _, apps, _ = tiny
    prompt = [1, 5, 9, 13]
    raw = {k: bench_app.app_worker(apps[k], prompt, 4, 1, seqs) for k in ("ours", "lookahead", "ours-dram")}
    c = assemble("tiny", len(prompt), 1, {}, raw)["configs"]
    assert c["lookahead"]["ids"] == c["ours"]["ids"] == c["ours-dram"]["ids"]
    assert c["lookahead"]["ppl"] == pytest.approx(c["ours"]["ppl"], rel=1e-4)
    assert raw["lookahead"]["active"] == raw["ours"]["active"]       # the same-layer predictor's sets
    # the FFN in DRAM: nothing read, nothing prefetched
    assert c["ours-dram"]["bytes_read_per_token"] == 0 and c["ours-dram"]["prefetched_bytes_per_token"] == 0
    # layer 1 read ahead from layer 0's input; misses and unused bytes counted; the queue seen
    row = c["lookahead"]
    assert 0 < row["prefetched_bytes_per_token"] <= row["bytes_read_per_token"]
    assert row["misses_per_token"] >= 0 and row["unused_bytes_per_token"] >= 0 and row["queue_depth_max"] >= 1
    assert c["ours"]["prefetched_bytes_per_token"] == 0
    t = targets(c)
    assert t["lookahead_ppl_over_ours"]["ratio"] == pytest.approx(1.0, abs=1e-4)
    assert t["lookahead_over_ours_dram"]["of"] == "lookahead.per_token_ms_median / ours-dram.per_token_ms_median"


def test_the_compiled_engines_perplexity_is_the_python_engines(tiny):
    setup, seqs, _, _, apps, _ = tiny
    ours = bench_app.app_worker(apps["ours"], [1, 5], 1, 1, seqs)["ppl"]
    ref = python_ppl_worker(setup, seqs, 1, 4)
    assert ours == pytest.approx(ref, rel=0.02)


def test_an_app_is_reused_until_what_it_is_built_from_changes_and_stale_ones_go(tiny, tmp_path):
    setup, _, d, wanted, apps, source_hash = tiny
    mtime = (bench_app.Path(apps["ours"]) / "app.json").stat().st_mtime_ns
    again = bench_app.prepare_apps(setup.model, d, wanted, source_hash, setup.predictor, 4, bench_e2e.READ_AHEAD)
    assert again == apps and (bench_app.Path(apps["ours"]) / "app.json").stat().st_mtime_ns == mtime
    r = wanted["ours"]
    for changed in (bench_app.AppRecipe(r.layout_dir, r.budget_mb + 1, r.storage_file, r.kv_dtype,
                                        r.whole_layers, r.sets),
                    bench_app.AppRecipe(r.layout_dir, r.budget_mb, r.storage_file, "float32", r.whole_layers, r.sets)):
        assert bench_app.app_path(d, changed) != bench_app.app_path(d, r)
    other = tmp_path / "storage.json"
    other.write_text(bench_app.Path(r.storage_file).read_text() + " ")
    assert bench_app.app_path(d, bench_app.AppRecipe(r.layout_dir, r.budget_mb, str(other), r.kv_dtype,
                                                     r.whole_layers, r.sets)) != bench_app.app_path(d, r)
    # An APP of this checkpoint no configuration asks for any more, and a build that died.
    stale, dead = d / "app-layout-old", d / ".app-layout-x.tmp-1"
    stale.mkdir()
    (stale / "app.json").write_text(json.dumps({"format": 1, "model": {"source_hash": source_hash}}))
    dead.mkdir()
    bench_app.prepare_apps(setup.model, d, wanted, source_hash, setup.predictor, 4, bench_e2e.READ_AHEAD)
    assert not stale.exists() and not dead.exists()
    assert all(bench_app.Path(a).is_dir() for a in apps.values())
