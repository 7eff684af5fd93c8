"""The tuning database: per target, the best schedule knobs found for each kernel workload.

One JSON file per target (default build/tuning/kernels-<target>.json):
  {"target": "host", "target_json": {...}, "workloads": {KEY: record}}
A record is kept for the target dict it was measured on: a host database tuned on another
CPU (another mcpu) is not used, since its timings say nothing about this one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic_file import write_json
from ..layout.bundle import BundleSpec
from .schedule import Knobs, valid
from .targets import target_dict

DB_DIR = Path("build") / "tuning"


class TuningDBError(ValueError):
    """A tuning database that cannot be read; the message names the file and the fix."""


def default_db_path(target_name: str) -> Path:
    return DB_DIR / f"kernels-{target_name}.json"


def workload_key(spec: BundleSpec) -> str:
    bias = "-bias" if spec.has_up_bias else ""
    return f"sparse-{spec.activation}-{spec.dtype}-d{spec.d_model}{bias}"


def load_db(path: str | os.PathLike) -> dict:
    """The database at `path`; an empty one when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return {"workloads": {}}
    try:
        db = json.loads(path.read_text())
        if not isinstance(db, dict) or not isinstance(db.get("workloads"), dict):
            raise ValueError("no 'workloads' object")
    except (ValueError, OSError) as e:
        raise TuningDBError(f"{path}: not a tuning database ({e}); delete it and re-run "
                            f"`ripple tune kernels`") from None
    return db


def save_record(path: str | os.PathLike, target_name: str, record: dict) -> None:
    """Add (or replace) one workload's record; the file is replaced atomically."""
    path = Path(path)
    db = load_db(path)
    db["target"] = target_name
    db["target_json"] = target_dict(target_name)
    db["workloads"][record["key"]] = {**record, "target_json": target_dict(target_name)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, db)


def tuned_knobs(spec: BundleSpec, target_name: str, path: str | os.PathLike | None = None) -> Knobs | None:
    """The tuned knobs for `spec` on `target_name`, or None when there are none for this machine."""
    path = default_db_path(target_name) if path is None else Path(path)
    db = load_db(path)
    rec = db["workloads"].get(workload_key(spec))
    if rec is None or rec.get("target_json") != target_dict(target_name):
        return None
    try:
        knobs = Knobs.from_dict(rec["knobs"])
    except (KeyError, TypeError, ValueError) as e:
        raise TuningDBError(f"{path}: record {workload_key(spec)} is damaged ({e}); re-run "
                            f"`ripple tune kernels`") from None
    return knobs if valid(knobs, spec.d_model) else None
