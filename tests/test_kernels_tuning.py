"""Kernel tuning: the XGBoost-guided search, the per-target database, and MetaSchedule's state."""
import json

import numpy as np
import pytest

from ripple.compile.build import knobs_for
from ripple.compile.schedule import DEFAULT, Knobs
from ripple.compile.tuning_db import TuningDBError, load_db, save_record, tuned_knobs, workload_key
from ripple.layout import BundleSpec
from ripple.tuning.kernels import metaschedule_status, tune_kernel
from ripple.tuning.tuner import configs, tune

SPACE = {"a": (1, 2, 4, 8, 16, 32), "b": (1, 2, 4, 8, 16, 32), "mode": ("x", "y", "z")}


def _cost(c):
    """A smooth bowl with its minimum at a=8, b=2, mode=y (what a cost model can learn)."""
    return 1.0 + (np.log2(c["a"]) - 3) ** 2 + (np.log2(c["b"]) - 1) ** 2 + (c["mode"] != "y") * 2.0


def test_model_guided_search_finds_the_optimum_with_a_fraction_of_the_space():
    measured = []
    res = tune(SPACE, lambda c: measured.append(c) or _cost(c), trials=40,
               default={"a": 1, "b": 1, "mode": "x"}, seed=0)
    assert len(configs(SPACE)) == 108 and len(measured) == 40 == len(res.trials)
    assert res.best == {"a": 8, "b": 2, "mode": "y"}
    assert res.default_cost == _cost({"a": 1, "b": 1, "mode": "x"}) and res.speedup > 5


def test_a_setting_that_fails_is_recorded_and_skipped():
    def measure(c):
        if c["mode"] == "z":
            raise RuntimeError("does not build\nsecond line")
        return _cost(c)
    res = tune(SPACE, measure, trials=24, default={"a": 1, "b": 1, "mode": "x"}, seed=1)
    failed = [t for t in res.trials if t.config["mode"] == "z"]
    assert all(t.cost == np.inf and t.error == "RuntimeError: does not build" for t in failed)
    assert res.best["mode"] != "z"


def test_tuning_a_kernel_writes_a_record_that_builds_then_use(tmp_path):
    spec = BundleSpec("swiglu", 64, "fp16")
    db = tmp_path / "kernels-host.json"
    rec = tune_kernel(spec, n=96, trials=4, db_path=db)
    assert rec["trials"] == 4 and rec["us"] <= rec["default_us"]
    assert rec["history"][0]["knobs"] == DEFAULT.to_dict()
    stored = load_db(db)["workloads"][workload_key(spec)]
    assert stored["knobs"] == rec["knobs"]
    assert knobs_for(spec, "host", db) == (Knobs(**rec["knobs"]), True)
    assert knobs_for(BundleSpec("swiglu", 64, "int8"), "host", db) == (DEFAULT, False)


def test_a_record_measured_on_another_cpu_is_not_used(tmp_path):
    spec = BundleSpec("swiglu", 64, "fp16")
    db = tmp_path / "db.json"
    save_record(db, "host", {"key": workload_key(spec), "knobs": Knobs(lanes=32).to_dict()})
    assert tuned_knobs(spec, "host", db) == Knobs(lanes=32)
    doc = json.loads(db.read_text())
    doc["workloads"][workload_key(spec)]["target_json"]["mcpu"] = "some-other-cpu"
    db.write_text(json.dumps(doc))
    assert tuned_knobs(spec, "host", db) is None


def test_a_damaged_database_is_a_one_line_error_naming_it(tmp_path):
    db = tmp_path / "db.json"
    db.write_text("{not json")
    with pytest.raises(TuningDBError, match="db.json: not a tuning database"):
        tuned_knobs(BundleSpec("swiglu", 64, "fp16"), "host", db)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="MetaSchedule's tune_tir segfaults in the apache-tvm 0.27.0.post1 "
                   "wheel (and 0.26); when this passes, MetaSchedule works again: use it in tuning.kernels")
def test_metaschedule_tunes_a_tiny_matmul():
    status = metaschedule_status(timeout=240)
    print(status)
    assert status["works"], status["outcome"]
