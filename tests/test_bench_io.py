import json

import numpy as np
import pytest

from ripple.android_host import cli
from ripple.android_host.bench_io import bench_io_cmd
from ripple.runtime_py.strategies import StrategyError
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import to_torch
from ripple.tuning.profile import run_profile, save_profile

KEYS = {"per_token_io_ms", "effective_bw_MBps", "reads_per_token", "bytes_read_per_token",
        "bytes_needed_per_token"}


@pytest.fixture(scope="module")
def tiny(random_llama_dir, tmp_path_factory):
    tm = to_torch(load_model(random_llama_dir))
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, 128, 48) for _ in range(4)]
    held = [rng.integers(0, 128, 48) for _ in range(2)]
    p = run_profile(tm, calib, held, "coef", sparsity=0.5, grid=(0.0, 0.5))
    d = tmp_path_factory.mktemp("bench")
    save_profile(p, d / "p.npz")
    return random_llama_dir, d / "p.npz", d


@pytest.fixture(scope="module")
def result(tiny):
    model, prof, d = tiny
    r = bench_io_cmd(model=str(model), profile=str(prof), tokens=6, warmup=3, queue_depth=8,
                     host_profile="pixel8-ufs31", devices=["oneplus12-ufs40"], cache_dir=str(d / "cache"),
                     json_out=str(d / "io.json"), quick_table=True)
    return r, d


def test_json_has_the_design_contract_for_every_strategy(result):
    r, d = result
    on_disk = json.loads((d / "io.json").read_text())
    for k in ("device", "model", "sparsity", "lower_bound_ms", "strategies", "fio_seq_MBps"):
        assert k in on_disk
    assert set(on_disk["strategies"]) == {"dense", "llmflash", "ripple", "ours"}
    for v in on_disk["strategies"].values():
        assert KEYS <= set(v) and v["per_token_io_ms"] > 0
    assert set(on_disk["modelled"]["oneplus12-ufs40"]["strategies"]) == set(on_disk["strategies"])
    assert (d / "io.png").stat().st_size > 0


def test_every_strategy_serves_the_same_active_bundles(result):
    r, _ = result
    needed = {v["bytes_needed_per_token"] for v in r["strategies"].values()}
    assert len(needed) == 1


def test_dense_reads_every_bundle_of_every_layer(result):
    r, _ = result
    region = -(-r["neurons"] * r["bundle_bytes"] // 4096) * 4096
    assert r["strategies"]["dense"]["bytes_read_per_token"] == r["layers"] * region


def test_lower_bound_is_missed_bytes_over_sequential_bandwidth(result):
    r, _ = result
    missed = min(v["bytes_missed_per_token"] for v in r["strategies"].values())
    # The JSON keeps microseconds (3 decimals of ms): allow that rounding on tiny workloads.
    assert r["lower_bound_ms"] == pytest.approx(missed / (r["seq_MBps"] * 1e6) * 1e3, rel=1e-2, abs=5e-4)
    for v in r["strategies"].values():
        assert v["bytes_read_per_token"] >= v["bytes_missed_per_token"]


def test_flash_files_are_reused_across_runs(result, tiny):
    r, d = result
    layouts = sorted((d / "cache").glob("layout-*/model.rflash"))
    before = [p.stat().st_mtime_ns for p in layouts]
    model, prof, _ = tiny
    bench_io_cmd(model=str(model), profile=str(prof), tokens=2, warmup=1, queue_depth=8,
                 host_profile="pixel8-ufs31", cache_dir=str(d / "cache"), strategies=["dense", "ours"],
                 quick_table=True)
    assert [p.stat().st_mtime_ns for p in layouts] == before


@pytest.mark.parametrize("flags, says", [(["--tokens", "500"], "held-out tokens"), (["--rounds", "0"], "--rounds")])
def test_bad_counts_are_one_line_and_no_json(tiny, capsys, flags, says):
    model, prof, d = tiny
    out = d / "bad.json"
    code = cli.main(["bench", "io", "--model", str(model), "--profile", str(prof), *flags,
                     "--host-profile", "pixel8-ufs31", "--cache-dir", str(d / "cache"), "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_rounds_time_the_same_reads_again_and_report_each_round(tiny):
    model, prof, d = tiny
    r = bench_io_cmd(model=str(model), profile=str(prof), tokens=4, warmup=2, queue_depth=8, rounds=3,
                     host_profile="pixel8-ufs31", cache_dir=str(d / "cache"), quick_table=True,
                     json_out=str(d / "rounds.json"))
    assert r["rounds"] == 3 and len(r["ratios"]["per_round"]) == 3
    assert (d / "rounds.png").stat().st_size > 0 and json.loads((d / "rounds.json").read_text())["rounds"] == 3
    for v in r["strategies"].values():
        rounds = v["per_round_io_ms"]
        assert len(rounds) == 3 and min(rounds) > 0
        assert v["per_token_io_ms"] == pytest.approx(np.mean(rounds), rel=1e-2, abs=2e-3)
        assert len(v["per_token_ms"]) == 4
    for i, rr in enumerate(r["ratios"]["per_round"]):
        s = r["strategies"]
        best = rr["best_baseline"]
        assert rr["best_baseline_over_ours"] == pytest.approx(
            s[best]["per_round_io_ms"][i] / s["ours"]["per_round_io_ms"][i], rel=2e-3, abs=2e-3)


def test_unknown_strategy_is_refused_before_any_work(tiny):
    model, prof, d = tiny
    with pytest.raises(StrategyError, match="dense"):
        bench_io_cmd(model=str(model), profile=str(prof), strategies=["fastest"], cache_dir=str(d / "c2"),
                     host_profile="pixel8-ufs31")


def test_stale_variants_of_a_layout_this_run_wrote_are_removed_and_nothing_else(tmp_path):
    """`ours` pins by the probe's figures, so another run may lay out its file anew: the
    variant it replaces goes; other kinds, workloads and checkpoints stay."""
    from types import SimpleNamespace

    from ripple.android_host.bench_io import prune_layouts

    def fake(name, kind, workload="relu-tiny", source="abc"):
        d = tmp_path / name
        d.mkdir()
        (d / "model.rflash").write_bytes(b"x" * 4096)
        (d / "manifest.json").write_text(json.dumps(
            {"meta": {"bench": "io", "workload": workload, "layout": kind}, "source": {"hash": source}}))
        return d
    now, stale = fake("layout-1", "ours+pinned"), fake("layout-2", "ours+pinned")
    ripple = fake("layout-3", "ripple")
    others = [fake("layout-4", "ours+pinned", workload="real"), fake("layout-5", "ours+pinned", source="def")]
    prune_layouts(tmp_path, {"ours+pinned": now}, SimpleNamespace(name="relu-tiny", source_hash="abc"))
    assert not stale.exists()
    assert now.exists() and ripple.exists() and all(d.exists() for d in others)


def test_predicted_sets_report_the_bytes_each_strategy_reads_beyond_the_true_sets(random_llama_dir, tmp_path,
                                                                                  recorded_llama_profile):
    """--sets predicted replays the predictor's sets and prices their false positives in bytes
    actually read: against the same strategy planned on the true sets, which is exactly what
    a run with the true sets reads; dense reads everything either way."""
    from ripple.tuning.predictor import TrainConfig, save_predictor, train_from_profile
    tm, prof = recorded_llama_profile
    save_profile(prof, tmp_path / "p.npz")
    pred = save_predictor(train_from_profile(prof, tm, TrainConfig(rank=4, epochs=1, batch=64)), tmp_path / "pr.npz")
    common = dict(model=str(random_llama_dir), profile=str(tmp_path / "p.npz"), tokens=6, warmup=3,
                  queue_depth=8, host_profile="pixel8-ufs31", cache_dir=str(tmp_path / "cache"), quick_table=True)
    true = bench_io_cmd(**common)
    got = bench_io_cmd(**common, sets="predicted", predictor=str(pred))
    assert got["workload_meta"]["sets"] == "predicted"
    for name, v in got["strategies"].items():
        assert v["bytes_read_per_token_true_sets"] == true["strategies"][name]["bytes_read_per_token"]
        assert v["extra_bytes_read_frac"] == pytest.approx(
            v["bytes_read_per_token"] / v["bytes_read_per_token_true_sets"] - 1, abs=1e-4)
    assert got["strategies"]["dense"]["extra_bytes_read_frac"] == 0
    assert "extra_bytes_read_frac" not in true["strategies"]["ours"]
