"""Lookahead predictors (tuning.lookahead): layer l+j's set from layer l's FFN input, trained
and measured on a profile's recorded inputs; the CLI writes them beside the predictor and
reports each distance's held-out recall."""
import json

import numpy as np
import pytest

from ripple.android_host.cli import main
from ripple.tuning.lookahead import heldout_rows, load_lookahead, predicted, save_lookahead, train_lookahead
from ripple.tuning.predictor import PredictorError, TrainConfig
from ripple.tuning.profile import save_profile

CFG = TrainConfig(rank=8, epochs=3, batch=64, recall=0.95)


def test_a_lookahead_predictor_reads_the_source_layer_and_predicts_the_target(recorded_llama_profile):
    _, prof = recorded_llama_profile
    L = prof.masks_calib.shape[0]          # 2 layers: one distance, one target layer
    la = train_lookahead(prof, [1], CFG)
    # target t has a predictor only from t - j >= 0
    assert np.isinf(la.thresholds[0, 0]) and np.isfinite(la.thresholds[0, 1:]).all()
    # On the calibration tokens the recall target holds on the held-back part it was set on.
    x, truth = prof.inputs("calib"), prof.masks("calib")
    n_val = la.meta["val_tokens"]
    for k, j in enumerate(la.distances):
        for t in range(j, L):
            p = predicted(la, k, t, x[t - j][-n_val:])
            y = truth[t][-n_val:]
            assert (p & y).sum() >= CFG.recall * y.sum() - 1
    rows = heldout_rows(la, prof)
    assert [r.distance for r in rows] == [1]
    for r in rows:
        assert np.isnan(r.recall[:r.distance]).all() and (r.recall[r.distance:] > 0).all()
        assert (r.recall[r.distance:] <= 1).all() and (r.extra[r.distance:] >= 0).all()


def test_lookahead_files_round_trip_and_refuse_other_files(recorded_llama_profile, tmp_path):
    _, prof = recorded_llama_profile
    la = train_lookahead(prof, [1], CFG)
    save_lookahead(la, tmp_path / "la.npz")
    back = load_lookahead(tmp_path / "la.npz")
    assert back.distances == [1] and np.array_equal(back.thresholds, la.thresholds)
    assert np.array_equal(back.b, la.b) and back.source_hash == prof.source_hash
    save_profile(prof, tmp_path / "prof.npz")
    with pytest.raises(PredictorError, match="not a ripple lookahead predictor"):
        load_lookahead(tmp_path / "prof.npz")
    for bad in ([0], [2]):
        with pytest.raises(PredictorError, match=r"must lie in 1\.\.1"):
            train_lookahead(prof, bad, CFG)


def test_train_predictor_lookahead_writes_the_file_and_the_heldout_table(random_llama_dir, recorded_llama_profile,
                                                                         tmp_path, capsys):
    _, prof = recorded_llama_profile
    save_profile(prof, tmp_path / "prof.npz")
    out = tmp_path / "pred.npz"
    assert main(["train-predictor", "--profile", str(tmp_path / "prof.npz"), "--out", str(out), "--model",
                 str(random_llama_dir), "--rank", "8", "--epochs", "2", "--recall", "0.95", "--lookahead", "1",
                 "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())["lookahead"]
    assert load_lookahead(s["file"]).distances == [1] and s["file"].endswith("pred-lookahead.npz")
    assert [r["distance"] for r in s["heldout"]] == [0, 1]
    for r in s["heldout"]:
        assert 0 < r["recall_min"] <= r["recall_mean"] <= 1
        assert r["recall_per_layer"][:r["distance"]] == [None] * r["distance"]
    assert "distance" in capsys.readouterr().out
