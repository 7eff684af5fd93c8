"""Compiling the kernels and the per-layer graph for a named target, with tuned knobs when the
tuning database has them for this machine, the default schedule otherwise."""
from __future__ import annotations

import os

import tvm

from ..layout.bundle import BundleSpec
from .ffn import dense_ffn, sparse_ffn
from .graph import layer_graph
from .schedule import DEFAULT, Knobs, schedule_dense, schedule_sparse
from .targets import make_target
from .tuning_db import tuned_knobs


def knobs_for(spec: BundleSpec, target_name: str, db: str | os.PathLike | None = None) -> tuple[Knobs, bool]:
    """(knobs, tuned): the database's knobs for this workload and machine, else the default."""
    k = tuned_knobs(spec, target_name, db)
    return (k, True) if k is not None else (DEFAULT, False)


def build_sparse(spec: BundleSpec, target_name: str = "host", knobs: Knobs = DEFAULT,
                 keep: str | None = None):
    """The sparse kernel alone: main(x, bundles, y), or main(x, bundles, thr, y) with keep."""
    mod = schedule_sparse(sparse_ffn(spec, keep), spec, knobs)
    return tvm.compile(mod, target=make_target(target_name))


def build_dense(activation: str, d: int, n: int, has_up_bias: bool = False,
                target_name: str = "host", knobs: Knobs = DEFAULT):
    mod = schedule_dense(dense_ffn(activation, d, n, has_up_bias), activation, knobs)
    return tvm.compile(mod, target=make_target(target_name))


def build_graph(spec: BundleSpec, target_name: str = "host", knobs: Knobs = DEFAULT,
                keep: str | None = None):
    """The per-layer Relax graph (flash hook + kernel) as a VM executable; keep: compile.graph."""
    return tvm.compile(layer_graph(spec, knobs, keep), target=make_target(target_name))
