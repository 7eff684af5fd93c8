"""Activation predictors: they learn, they round-trip, they refuse the wrong model, and the
engine that uses them reads the predicted set and reports what it missed and read extra."""
import numpy as np
import pytest
import torch

from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import to_torch
from ripple.tuning.predictor import (Predictor, PredictorError, TrainConfig, check_predictor, cost,
                                     fit_layer, load_predictor, logits, predict, save_predictor,
                                     to_torch as predictor_to_torch, train_predictor, true_masks)
from ripple.tuning.profile import load_profile, run_profile, save_profile


def planted(n_tokens, d=32, n=64, seed=0):
    """Neuron j fires when a rank-4 projection of x crosses a per-neuron offset."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(d, 4)), rng.normal(size=(4, n))
    x = rng.normal(size=(n_tokens, d)).astype(np.float32)
    return x, (x @ u @ v) > rng.normal(size=n)


def tiny_predictor(seed=0, layers=2, d=32, n=64, source_hash="abc") -> Predictor:
    x, y = planted(1200, d, n, seed)
    xs = np.stack([x] * layers).astype(np.float16)
    ys = np.stack([y] * layers)
    cfg = TrainConfig(rank=8, epochs=3, batch=64, lr=1e-2, recall=0.95, seed=seed)
    return train_predictor(xs, ys, cfg, score_thresholds=np.zeros(layers), sparsity=0.5,
                           criterion="coef", source_hash=source_hash, activation="swiglu")


def test_training_reduces_loss_on_a_planted_rule():
    x, y = planted(3000)
    fit = fit_layer(x[:2500], y[:2500], x[2500:], y[2500:], TrainConfig(rank=8, epochs=8, batch=64, lr=1e-2))
    rate = y.mean()
    base = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))   # BCE of the base rate
    assert fit.train_loss[-1] < fit.train_loss[0]
    assert min(fit.val_loss) < 0.5 * base
    # The folded fp16 weights predict held-out tokens well above chance.
    tp = predictor_to_torch(Predictor(fit.a[None], fit.a_bias[None], fit.b[None], fit.b_bias[None],
                                      np.zeros(1, np.float32), np.zeros(1, np.float32), 0.5, "coef",
                                      0.9, "h", "swiglu"))
    acc = (predict(tp, 0, torch.from_numpy(x[2500:])).numpy() == y[2500:]).mean()
    assert acc > 0.9


@pytest.fixture(scope="module")
def tiny():
    return tiny_predictor()


def test_thresholds_meet_the_recall_target_on_held_back_tokens(tiny):
    p = tiny
    for s in p.meta["layers"]:
        assert s["val_recall"] >= 0.95


def test_saved_predictor_reloads_to_identical_outputs(tiny, tmp_path):
    p = tiny
    path = save_predictor(p, tmp_path / "pred.npz")
    q = load_predictor(path)
    h = torch.randn(7, p.d_model)
    a, b = predictor_to_torch(p), predictor_to_torch(q)
    for layer in range(p.n_layers):
        assert torch.equal(logits(a, layer, h), logits(b, layer, h))
        assert torch.equal(predict(a, layer, h), predict(b, layer, h))
    assert (q.sparsity, q.rank, q.source_hash) == (p.sparsity, p.rank, p.source_hash)


def test_int8_predictor_holds_half_the_bytes_and_predicts_nearly_the_same_sets(tiny):
    from ripple.runtime_py.resident import predictor_bytes
    from ripple.tuning.predictor import lowrank_sets
    h = torch.randn(64, tiny.d_model)
    fp16, int8 = predictor_to_torch(tiny), predictor_to_torch(tiny, "int8")
    for layer in range(tiny.n_layers):
        want, got = logits(fp16, layer, h), logits(int8, layer, h)
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        assert (predict(int8, layer, h) == predict(fp16, layer, h)).float().mean() > 0.95
    # A byte less per matrix value, four more per column's scale.
    values = sum(a.size + b.size for a, b in zip(tiny.a, tiny.b))
    columns = sum(a.shape[1] + b.shape[1] for a, b in zip(tiny.a, tiny.b))
    assert predictor_bytes(lowrank_sets(fp16)) - predictor_bytes(lowrank_sets(int8)) == values - 4 * columns


def test_predictor_in_a_layout_folder_is_found_by_folder(tiny, tmp_path):
    p = tiny
    save_predictor(p, tmp_path)
    assert (tmp_path / "predictor.npz").is_file()
    assert load_predictor(tmp_path).rank == p.rank


@pytest.mark.parametrize("kwargs, needle", [
    ({"source_hash": "other"}, "checkpoint hash"),
    ({"n_layers": 3}, "layers 2 vs 3"),
    ({"d_ffn": 65}, "d_ffn 64 vs 65"),
])
def test_predictor_for_another_model_is_refused(tiny, kwargs, needle):
    p = tiny
    want = dict(source_hash="abc", n_layers=2, d_model=32, d_ffn=64)
    want.update(kwargs)
    with pytest.raises(PredictorError, match=needle):
        check_predictor(p, **want)


def test_predicted_masks_of_recorded_inputs_are_the_per_token_predictions(tiny):
    from ripple.tuning.predictor import predicted_masks
    h = np.random.default_rng(1).normal(size=(tiny.n_layers, 9, tiny.d_model)).astype(np.float16)
    m = predicted_masks(tiny, h, chunk=4)
    tp = predictor_to_torch(tiny)
    for layer in range(tiny.n_layers):
        want = predict(tp, layer, torch.from_numpy(h[layer].astype(np.float32))).numpy()
        np.testing.assert_array_equal(m[layer], want)


def test_corrupt_predictor_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "predictor.npz"
    bad.write_bytes(b"no zip")
    with pytest.raises(PredictorError, match="unreadable predictor"):
        load_predictor(bad)


def test_cost_counts_two_matmuls_against_three_for_swiglu(tiny):
    p = tiny
    c = cost(p)
    assert c.flops_per_token == 2 * 8 * (32 + 64) + 2 * 8 + 2 * 64
    assert c.ffn_flops_per_token == 2 * 3 * 32 * 64
    assert c.dram_bytes == 2 * (32 * 8 + 8 + 8 * 64 + 64) * 2 + 2 * 4


def test_profile_records_ffn_inputs_only_when_asked(random_llama_dir, recorded_llama_profile, tmp_path):
    tm, p = recorded_llama_profile
    assert p.inputs("calib").shape == (tm.desc.n_layers, 8 * 48, tm.desc.d_model)
    assert p.inputs("calib").dtype == np.float16
    save_profile(p, tmp_path / "p.npz")
    np.testing.assert_array_equal(load_profile(tmp_path / "p.npz").inputs("heldout"), p.inputs("heldout"))
    seqs = [np.arange(20) % 128]
    plain = run_profile(tm, seqs, seqs, "coef", sparsity=0.5, grid=(0.0, 0.5))
    assert plain.inputs_calib is None and [len(s) for s in plain.sequences("heldout")] == [20]


def test_recorded_inputs_reproduce_the_recorded_masks(recorded_llama_profile):
    tm, p = recorded_llama_profile
    mask = true_masks(tm, p.inputs("calib"), p.thresholds, p.criterion)
    # fp16 storage of h flips only pairs whose score sits at the threshold.
    for layer in range(tm.desc.n_layers):
        assert (mask(layer) != p.masks("calib")[layer]).mean() < 0.01


# ------------------------------------------------------------------ the engine's set policy

from ripple.android_host.interface import set_policy  # noqa: E402
from ripple.runtime_py.engine import IOStats, flash_ffn, generate, report  # noqa: E402
from ripple.runtime_py.reader import FlashReader  # noqa: E402
from ripple.tuning.predictor import lowrank_sets, train_from_profile  # noqa: E402

from test_engine import pack  # noqa: E402


@pytest.fixture(scope="module")
def llama_layout(random_llama_dir, tmp_path_factory):
    desc = load_model(random_llama_dir)
    return desc, pack(desc, tmp_path_factory.mktemp("llama-layout"), seed=3)


def run_layer(tm, layout, thr, sets, h):
    stats = IOStats()
    with FlashReader(layout.path) as reader:
        y = flash_ffn(tm, layout, reader, thr, "coef", stats, sets)(0, h)
    return y, stats


def test_engine_reading_every_neuron_keeps_exactly_the_oracle_neurons(llama_layout):
    desc, layout = llama_layout
    tm = to_torch(desc)
    h = torch.randn(3, desc.d_model)
    _, s = __import__("ripple.tuning.sparsity", fromlist=["scores"]).scores(tm, 0, h, "coef")
    thr = np.full(desc.n_layers, float(s.median()))
    y_oracle, st_oracle = run_layer(tm, layout, thr, None, h)
    y_all, st_all = run_layer(tm, layout, thr, lambda layer, x: torch.ones(x.shape[0], desc.d_ffn, dtype=torch.bool), h)
    # The true threshold applied to what was read recovers the oracle's output.
    np.testing.assert_allclose(y_all.numpy(), y_oracle.numpy(), atol=2e-3, rtol=0)
    assert st_all.missed == 0
    assert st_all.extra_bytes == (desc.d_ffn - st_oracle.active) * layout.bundle_bytes
    assert st_all.bytes_needed == desc.d_ffn * layout.bundle_bytes


def test_engine_counts_every_oracle_neuron_a_policy_did_not_predict_as_missed(llama_layout):
    desc, layout = llama_layout
    tm = to_torch(desc)
    h = torch.randn(1, desc.d_model)
    thr = np.zeros(desc.n_layers)
    _, st_oracle = run_layer(tm, layout, thr, None, h)
    y, st = run_layer(tm, layout, thr, lambda layer, x: torch.zeros(x.shape[0], desc.d_ffn, dtype=torch.bool), h)
    assert st.missed == st_oracle.active > 0
    assert st.extra_bytes == 0 and st.bytes_read == 0
    assert float(y.abs().max()) == 0.0


def test_generation_with_a_trained_predictor_reports_misses_and_extra_bytes(llama_layout, recorded_llama_profile):
    desc, layout = llama_layout
    tm, prof = recorded_llama_profile
    pred = train_from_profile(prof, tm, TrainConfig(rank=8, epochs=2, batch=64, recall=0.9))
    with FlashReader(layout.path) as reader:
        gen = generate(tm, layout, reader, prof.thresholds, "coef", [1, 2, 3], 4,
                       sets=lowrank_sets(predictor_to_torch(pred)))
        rep = report(gen, reader, desc.n_layers * desc.d_ffn, "predicted")
    io = rep["io"]
    assert io["sets"] == "predicted"
    assert len(io["missed_per_token"]) == len(io["extra_bytes_per_token"]) == len(gen.steps) == 4
    assert all(x % layout.bundle_bytes == 0 for x in io["extra_bytes_per_token"])


def test_layout_predictor_is_the_default_and_the_oracle_stays_selectable(llama_layout, recorded_llama_profile):
    desc, layout = llama_layout
    tm, prof = recorded_llama_profile
    assert set_policy(layout, desc, prof.sparsity, None, None)[0] == "oracle"
    pred = train_from_profile(prof, tm, TrainConfig(rank=4, epochs=1, batch=64))
    where = save_predictor(pred, layout.path.parent)
    try:
        assert set_policy(layout, desc, prof.sparsity, None, None)[0] == "predicted"
        assert set_policy(layout, desc, prof.sparsity, "oracle", None) == ("oracle", None)
        with pytest.raises(PredictorError, match="sparsity 0.5, not 0.8"):
            set_policy(layout, desc, 0.8, None, None)
    finally:
        where.unlink()


def test_layout_predictor_of_another_model_is_refused(llama_layout, tmp_path):
    desc, layout = llama_layout
    p = tiny_predictor(d=desc.d_model, n=desc.d_ffn, source_hash="another")
    save_predictor(p, tmp_path / "p.npz")
    with pytest.raises(PredictorError, match="trained for another model"):
        set_policy(layout, desc, 0.5, "predicted", str(tmp_path / "p.npz"))


def test_train_predictor_without_recorded_inputs_is_one_line(capsys, random_llama_dir, tmp_path):
    import sys
    from ripple.android_host.cli import main
    tm = to_torch(load_model(random_llama_dir))
    seqs = [np.arange(32) % 128]
    save_profile(run_profile(tm, seqs, seqs, grid=(0.0, 0.5)), tmp_path / "p.npz")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sys.exit(main(["train-predictor", "--profile", str(tmp_path / "p.npz"), "--model", str(random_llama_dir),
                       "--out", str(tmp_path / "pred.npz")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--record-inputs" in err[0]
    assert not (tmp_path / "pred.npz").exists()


def test_static_hot_set_reaches_its_recall_on_the_masks_it_was_built_from():
    from ripple.android_host.bench_predictor import static_sets
    rng = np.random.default_rng(0)
    masks = [rng.random((200, 50)) < np.linspace(0.05, 0.9, 50) for _ in range(2)]
    sets, sizes = static_sets(masks, 0.9)
    for layer, m in enumerate(masks):
        keep = sets(layer, torch.zeros(1, 8))[0].numpy()
        assert m[:, keep].sum() >= 0.9 * m.sum()
        assert keep.sum() == sizes[layer] < 50
        # Only the most frequent neurons are kept.
        assert m.sum(0)[keep].min() >= m.sum(0)[~keep].max()


def test_bench_predictor_writes_the_documented_shape(random_llama_dir, recorded_llama_profile, tmp_path):
    from ripple.android_host.cli import main
    _, prof = recorded_llama_profile
    save_profile(prof, tmp_path / "p.npz")
    out = tmp_path / "bench.json"
    assert main(["bench", "predictor", "--profile", str(tmp_path / "p.npz"), "--model", str(random_llama_dir),
                 "--sparsities", "0.5", "0.8", "--rank", "4", "--epochs", "1", "--recall", "0.9",
                 "--sweep", "0.99", "--json", str(out)]) == 0
    import json
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    keys = {"sparsity", "recall", "precision", "size_ratio", "ppl_dense", "ppl_oracle", "ppl_predicted",
            "predictor_flops_frac", "extra_bytes_frac", "layers"}
    assert [r["sparsity"] for r in res["results"]] == [0.5, 0.8]
    for r in res["results"]:
        assert keys <= set(r) and len(r["layers"]) == 2
        assert set(r["strategies"]) == {"lowrank", "xgb_count", "static"}
        # Predicted sets can only drop true neurons: recall and precision are shares.
        assert 0 < r["recall"] <= 1 and 0 < r["precision"] <= 1


def test_training_at_another_profiled_sparsity_reruns_the_model_at_it(recorded_llama_profile):
    from ripple.tuning.predictor import training_data
    tm, prof = recorded_llama_profile
    same, other = training_data(prof, tm), training_data(prof, tm, 0.8)
    assert same.sparsity == 0.5 and other.sparsity == 0.8
    assert other.inputs.shape == same.inputs.shape
    # Different sparsity, different FFN inputs from layer 1 on (layer 0's input precedes any FFN).
    np.testing.assert_array_equal(other.inputs[0], same.inputs[0])
    assert not np.array_equal(other.inputs[1], same.inputs[1])
    assert abs(other.masks(1).mean() - 0.2) < 0.1
