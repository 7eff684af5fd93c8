"""`ripple probe storage --rpc/--tracker`: the storage probe run on the device by its native
reader: the same grid of request sizes and queue depths as android_host.probe, the same
Little's-law latency, the same sequential figure (1 MiB requests, 8 in flight), written as a
device profile. fio is not on phones, so there is no fio check; with --compare-local (a
server on this machine: the stand-in phone) each cell is measured here too, right after the
device, by the same reader loaded in this process.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
from tqdm import tqdm

from ..runtime_py.storage_model import StorageProfile
from .probe import FULL, PROBE_FILE, QUICK, SEQ_QD, SEQ_REQUEST
from .remote_reader import DeviceReader, open_reader
from .rpc import Endpoint, open_session


def probe_device(reader: DeviceReader, quick: bool = False, cell_s: float | None = None,
                 path: str | None = None, progress: bool = True,
                 alongside: tuple[DeviceReader, str] | None = None) -> tuple[StorageProfile, dict]:
    """(storage profile, details) measured by `reader` on its device. `alongside` = (a reader
    in this process, a folder here): every cell is also measured here, right after the
    remote one, into details["local_latency_us"] (the stand-in phone's agreement check)."""
    cfg = dict(QUICK if quick else FULL)
    if cell_s is not None:
        cfg["cell_s"] = cell_s
    t0 = time.perf_counter()
    path = path or reader.device_path(PROBE_FILE)
    file_bytes = reader.prepare(path, cfg["file_bytes"])
    sizes, qds = cfg["sizes"], cfg["qds"]
    lat = np.zeros((len(sizes), len(qds)))
    cells = [(i, j) for i in range(len(sizes)) for j in range(len(qds))]
    here = None
    if alongside:
        here = (alongside[0], os.path.join(alongside[1], PROBE_FILE))
        here[0].prepare(here[1], cfg["file_bytes"])
    local = np.zeros_like(lat)
    for n, (i, j) in enumerate(tqdm(cells, desc=f"probe on {reader.session.name if reader.session else 'here'}", unit="cell",
                                    file=sys.stderr, disable=not progress)):
        lat[i, j] = reader.probe_cell(path, sizes[i], qds[j], cfg["cell_s"], seed=n)
        if here:
            local[i, j] = here[0].probe_cell(here[1], sizes[i], qds[j], cfg["cell_s"], seed=n)
    seq_lat = reader.probe_cell(path, SEQ_REQUEST, SEQ_QD, cfg["cell_s"] * 3, sequential=True)
    seq = SEQ_REQUEST * SEQ_QD / seq_lat                       # bytes/us = MB/s
    best = float((np.array(sizes)[:, None] * np.array(qds)[None, :] / lat).max())
    storage = StorageProfile(np.array(sizes), np.array(qds), lat, max(seq, best))
    details = {"engine": "native pthreads (compile/native)", "file": path,
               "file_bytes": int(file_bytes), "seconds": round(time.perf_counter() - t0, 1),
               "via": reader.where, "target": reader.target}
    if here:
        details["local_latency_us"] = np.round(local, 3).tolist()
        details["local_file"] = here[1]
        details["remote_over_local_geomean"] = round(float(np.exp(np.log(lat / local).mean())), 3)
    return storage, details


def probe_remote_cmd(endpoint: Endpoint, target: str = "android-arm64", out: str | None = None,
                     name: str | None = None, quick: bool = False, timeout: float = 60.0,
                     dram_budget_bytes: int = 1 << 30, compare_local: str | None = None) -> dict:
    """Probe the device's storage through RPC; write the device profile to `out`.
    compare_local: a folder here to probe alongside, cell by cell (see probe_device)."""
    from pathlib import Path

    from .devices import Device, save_device
    from .probe import ProbeError

    if out and not Path(out).resolve().parent.is_dir():
        raise ProbeError(f"{out}: folder {Path(out).parent} does not exist")
    if compare_local and not Path(compare_local).is_dir():
        raise ProbeError(f"{compare_local}: no such folder; pass --path DIR on the disk to probe here")
    with open_session(endpoint, timeout, name) as s:
        reader = open_reader(s, target)
        here = (open_reader(None, "host"), compare_local) if compare_local else None
        storage, details = probe_device(reader, quick, alongside=here)
    from ..compile.targets import make_target
    dev = Device(s.name, "measured", storage, 0, dram_budget_bytes, str(make_target(target)),
                 {**details, "probe": "ripple probe storage " + ("--quick " if quick else "") + endpoint.label,
                  "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "dram_bytes": "unknown (not measured over RPC)", "fio_note": "no fio on the device",
                  "fio": [], "host_load_average": os.getloadavg()[0]})
    if out:
        save_device(out, dev)
    return dev.to_json()


def print_remote_probe(d: dict) -> None:
    from .probe import print_probe
    print_probe(d)
    det = d["details"]
    if "local_latency_us" in det:
        print(f"the same cells probed here ({det['local_file']}), each right after the remote one (us):")
        st = d["storage"]
        for s, row, loc in zip(st["sizes"], st["latency_us"], det["local_latency_us"]):
            label = f"{s >> 10}K" if s < 1 << 20 else f"{s >> 20}M"
            print(f"{label:>8} " + " ".join(f"{r:8.1f}/{l:<8.1f}" for r, l in zip(row, loc)))
        print(f"remote / local latency, geometric mean over cells: {det['remote_over_local_geomean']:.3f}")
