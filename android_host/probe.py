"""`ripple probe storage`: measure a disk's read latency table with the reader the runtime uses.

The reader is the native one by default (engine "native": compile/native/ripple_reader.c,
loaded into this process), the pthreads reader on huge-page buffers that the flash runtime
and a phone run; engines "aio" / "threads" probe with runtime_py/reader.py instead.

For every request size (4 KiB ... 4 MiB) and queue depth (1 ... 32), random aligned O_DIRECT
reads of a test file keep `qd` requests in flight for a short while; the mean latency of
one request is elapsed * qd / requests (Little's law). Sequential bandwidth is read the same
way with consecutive offsets. The result is a device profile (android_host.devices).

The same run measures a few of those cells with fio (Debian's), alternating probe and fio
seven times so that both see the same background load, fio on huge-page buffers like the
reader's (fio_iomem); their ratio says whether the probe
(and so the runtime's reader) gets what the device gives.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic_file import atomic_write
from ..runtime_py.reader import FlashReader
from ..runtime_py.storage_model import StorageProfile

PROBE_FILE = "ripple-probe.bin"
KiB, MiB = 1 << 10, 1 << 20
# fio and the probe alternate in short turns: this disk's rate moves by 2x within seconds.
FULL = dict(sizes=[4 * KiB << i for i in range(11)], qds=[1, 2, 4, 8, 16, 32],
            file_bytes=1 << 30, cell_s=0.30, fio_s=0.4, rounds=7)
QUICK = dict(sizes=[4 * KiB, 64 * KiB, 1 * MiB], qds=[1, 8], file_bytes=64 * MiB, cell_s=0.05,
             fio_s=0.3, rounds=1)
# Cells checked against fio: small random (IOPS-bound), medium, large (bandwidth-bound).
FIO_CELLS = [(4 * KiB, 1), (4 * KiB, 32), (64 * KiB, 8), (1 * MiB, 4)]
FIO_CELLS_QUICK = [(4 * KiB, 8), (1 * MiB, 8)]
SEQ_REQUEST, SEQ_QD = 1 * MiB, 8


ENGINES = ("native", "auto", "aio", "threads")


class ProbeError(RuntimeError):
    """The probe cannot measure here (no O_DIRECT, no room for its test file)."""


class NativeCells:
    """The native reader at one queue depth, in this process: each cell is one call of
    ripple.storage.probe (its threads keep `queue_depth` reads in flight until the time is
    up, Little's law gives the mean latency). The reader the runtime and phones use."""
    engine = "native"
    fallback_reason = ""

    def __init__(self, path: Path, queue_depth: int):
        from .remote_reader import open_reader
        self.path, self.queue_depth = str(path), queue_depth
        self.reader = open_reader(None, "host")
        try:                                  # it refuses a file without O_DIRECT
            self.reader.probe_cell(self.path, 4096, 1, 0.005)
        except Exception as e:                # TVM's error of the native call
            raise ProbeError(f"{path}: the native reader cannot read it with O_DIRECT "
                             f"({' '.join(str(e).split())[-160:]}); probe a folder on a real disk") from None
        self.o_direct = True

    def cell(self, size: int, seconds: float, sequential: bool, seed: int) -> tuple[float, int]:
        lat_us = self.reader.probe_cell(self.path, size, self.queue_depth, seconds, sequential, seed)
        return seconds, max(int(round(seconds * self.queue_depth / (lat_us * 1e-6))), 1)

    def close(self) -> None:
        pass


def make_reader(path: Path, queue_depth: int, engine: str):
    if engine not in ENGINES:
        raise ProbeError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    return NativeCells(path, queue_depth) if engine == "native" else FlashReader(path, queue_depth, engine=engine)


@dataclass
class ProbeResult:
    storage: StorageProfile
    file: str
    file_bytes: int
    engine: str
    seconds: float
    fio: list[dict]            # per checked cell: probe and fio MB/s, ratio
    fio_seq_MBps: float | None
    fio_note: str


def probe_file(dir_: str | os.PathLike, nbytes: int) -> Path:
    """A test file of random bytes (reused when it already has the size), fsynced."""
    d = Path(dir_)
    if not d.is_dir():
        raise ProbeError(f"{d}: no such folder; pass --path DIR on the disk to probe")
    path = d / PROBE_FILE
    if path.is_file() and path.stat().st_size >= nbytes:
        return path
    free = shutil.disk_usage(d).free
    if free < nbytes * 1.1:
        raise ProbeError(f"{d}: {free >> 20} MiB free, the probe needs {nbytes >> 20} MiB; "
                         "free some space or pass --quick")
    rng = np.random.default_rng(0)
    with atomic_write(path) as f:
        chunk = rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
        for _ in tqdm(range(-(-nbytes // len(chunk))), desc="probe: test file", unit="8MiB",
                      file=sys.stderr, leave=False):
            f.write(chunk)
    return path


def _offsets(rng: np.random.Generator, file_bytes: int, size: int, n: int, sequential: bool,
             start: int = 0) -> np.ndarray:
    slots = file_bytes // size
    if sequential:
        return ((start + np.arange(n)) % slots) * size
    return rng.integers(0, slots, n) * size


def measure_cell(reader: FlashReader, file_bytes: int, size: int, seconds: float,
                 rng: np.random.Generator, sequential: bool = False) -> tuple[float, int]:
    """(elapsed s, requests) reading `size`-byte requests at the reader's queue depth for
    about `seconds`. Batches are at most 64 MiB (or one request per slot of the queue)."""
    if isinstance(reader, NativeCells):
        return reader.cell(size, seconds, sequential, int(rng.integers(1 << 31)))
    qd = reader.queue_depth
    batch = max(qd * 2, min(4096, (64 * MiB) // size))
    reader.read(np.stack([_offsets(rng, file_bytes, size, qd, sequential), np.full(qd, size)], 1))
    elapsed, n, pos = 0.0, 0, 0
    while elapsed < seconds:
        offs = _offsets(rng, file_bytes, size, batch, sequential, pos)
        pos += batch
        res = reader.read(np.stack([offs, np.full(batch, size)], 1))
        elapsed += res.seconds
        n += batch
    return elapsed, n


def fio_iomem(size: int, qd: int, meminfo: str = "/proc/meminfo") -> str:
    """fio's buffer memory for `qd` requests of `size`: hugetlb pages when enough are free.

    The reader's buffers sit on 2 MiB pages. fio's default (malloc) gets 4 KiB pages, so a
    1 MiB request is 256 scatter-gather segments; a virtio disk takes at most ~254 per
    request, and the kernel splits it in two. Measured here: fio at 1 MiB QD4 gave 550-914
    MB/s with malloc, 1,913 MB/s with shmhuge, on the same file. Comparing the reader with
    fio on other memory would measure the buffers, not the reader."""
    try:
        info = dict(line.split(":", 1) for line in Path(meminfo).read_text().splitlines())
        free = int(info["HugePages_Free"].split()[0])
        page = int(info["Hugepagesize"].split()[0]) << 10
    except (OSError, KeyError, ValueError):
        return "malloc"
    return "shmhuge" if free >= -(-size * qd // page) + 1 else "malloc"


def _fio(path: Path, size: int, qd: int, seconds: float, sequential: bool = False) -> tuple[float, str]:
    """fio's MB/s (1e6) for the same file, request size and queue depth (libaio, O_DIRECT),
    and the buffer memory it ran with (fio_iomem)."""
    return _fio_run(path, size, qd, seconds, sequential, fio_iomem(size, qd))


def _fio_run(path: Path, size: int, qd: int, seconds: float, sequential: bool, iomem: str) -> tuple[float, str]:
    cmd = ["fio", "--name=ripple-probe", f"--filename={path}", f"--rw={'read' if sequential else 'randread'}",
           f"--bs={size}", "--direct=1", "--ioengine=libaio", f"--iodepth={qd}", f"--iomem={iomem}",
           f"--size={path.stat().st_size}", f"--runtime={max(1, round(seconds * 1000))}ms", "--time_based",
           "--output-format=json", "--norandommap", "--randrepeat=0"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 and iomem != "malloc":
        # hugetlb shm can be refused to this user (vm.hugetlb_shm_group): the caller's note
        # then says fio ran on 4 KiB pages.
        return _fio_run(path, size, qd, seconds, sequential, "malloc")
    if out.returncode != 0:
        raise ProbeError(f"fio failed on {path}: {out.stderr.strip().splitlines()[-1:]}")
    job = json.loads(out.stdout)["jobs"][0]
    # fio takes a bad option with a message and reads the whole file instead: refuse that.
    if job["job_runtime"] > seconds * 1000 * 2 + 200:
        raise ProbeError(f"fio on {path} ran {job['job_runtime']} ms, not {seconds} s: {out.stderr.strip()[:200]}")
    return job["read"]["bw_bytes"] / 1e6, iomem


# Said whenever fio had to run on 4 KiB pages: its large-request figures are then low.
FIO_SMALL_PAGES = ("fio ran on 4 KiB-page buffers for {cells} (too few free hugetlb pages; "
                   "`make sysdeps` reserves them, or `sysctl vm.nr_hugepages=64`): the kernel "
                   "splits its large requests, so those ratios are not the reader's")


def probe_storage(path: str | os.PathLike = ".", quick: bool = False, engine: str = "native",
                  with_fio: bool = True, cell_s: float | None = None, progress: bool = True) -> ProbeResult:
    cfg = dict(QUICK if quick else FULL)
    if cell_s is not None:
        cfg["cell_s"] = cell_s
    t_start = time.perf_counter()
    f = probe_file(path, cfg["file_bytes"])
    fb = f.stat().st_size
    rng = np.random.default_rng(1)
    sizes, qds = cfg["sizes"], cfg["qds"]
    lat = np.zeros((len(sizes), len(qds)))
    readers = {}
    try:
        for q in qds + [SEQ_QD]:
            if q not in readers:
                readers[q] = make_reader(f, q, engine)
        r0 = readers[qds[0]]
        if not r0.o_direct:
            raise ProbeError(f"{f}: O_DIRECT is refused here ({r0.fallback_reason}); probe a "
                             "folder on a real disk (not tmpfs)")
        cells = [(i, j) for i in range(len(sizes)) for j in range(len(qds))]
        for i, j in tqdm(cells, desc="probe: latency table", unit="cell", file=sys.stderr, disable=not progress):
            el, n = measure_cell(readers[qds[j]], fb, sizes[i], cfg["cell_s"], rng)
            lat[i, j] = el * qds[j] / n * 1e6
        el, n = measure_cell(readers[SEQ_QD], fb, SEQ_REQUEST, cfg["cell_s"] * 3, rng, sequential=True)
        seq = n * SEQ_REQUEST / el / 1e6
        best = float((np.array(sizes)[:, None] * np.array(qds)[None, :] / lat).max())  # bytes/us = MB/s
        storage = StorageProfile(np.array(sizes), np.array(qds), lat, max(seq, best))
        checks, fio_seq, note = [], None, ""
        if with_fio and shutil.which("fio") is None:
            note = "fio not installed (run `make sysdeps`); no comparison"
        elif with_fio:
            cells = FIO_CELLS_QUICK if quick else FIO_CELLS
            for size, q in tqdm(cells + [(SEQ_REQUEST, -SEQ_QD)], desc="probe: fio comparison",
                                unit="cell", file=sys.stderr):
                sequential = q < 0
                q = abs(q)
                if q not in readers:
                    readers[q] = make_reader(f, q, engine)
                ours, theirs = [], []
                for _ in range(cfg["rounds"]):   # alternate, so both see the same load
                    el, n = measure_cell(readers[q], fb, size, cfg["fio_s"], rng, sequential)
                    ours.append(n * size / el / 1e6)
                    mbps, iomem = _fio(f, size, q, cfg["fio_s"], sequential)
                    theirs.append(mbps)
                o, t = float(np.median(ours)), float(np.median(theirs))
                if sequential:
                    fio_seq = t
                checks.append({"size": size, "qd": q, "sequential": sequential,
                               "probe_MBps": round(o, 1), "fio_MBps": round(t, 1),
                               "ratio": round(o / t, 3), "fio_iomem": iomem,
                               # this disk moves within seconds: the spread says how much
                               "round_ratios": [round(a / b, 3) for a, b in zip(ours, theirs)]})
            small = [f"{c['size'] >> 10}K qd{c['qd']}" for c in checks
                     if c["fio_iomem"] == "malloc" and c["size"] > 64 * KiB]
            if small:
                note = FIO_SMALL_PAGES.format(cells=", ".join(small))
                print(f"warning: {note}", file=sys.stderr)
        return ProbeResult(storage, str(f), fb, r0.engine, time.perf_counter() - t_start, checks,
                           fio_seq, note)
    finally:
        for r in readers.values():
            r.close()


def probe_cmd(path: str = ".", out: str | None = None, name: str = "this-machine", quick: bool = False,
              engine: str = "native", with_fio: bool = True, dram_budget_bytes: int = 1 << 30) -> dict:
    """`ripple probe storage`: probe, compare with fio, write the device profile."""
    from .devices import Device, host_cpu_target, host_dram_bytes, save_device

    if out and not Path(out).resolve().parent.is_dir():
        raise ProbeError(f"{out}: folder {Path(out).parent} does not exist")
    r = probe_storage(path, quick, engine, with_fio)
    dev = Device(name, "measured", r.storage, host_dram_bytes(), dram_budget_bytes, host_cpu_target(),
                 {"probe": "ripple probe storage" + (" --quick" if quick else ""), "engine": r.engine,
                  "file_bytes": r.file_bytes, "seconds": round(r.seconds, 1),
                  "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "kernel": platform_release(),
                  "fio": r.fio, "fio_seq_MBps": r.fio_seq_MBps, "fio_note": r.fio_note,
                  "load_average": os.getloadavg()[0]})
    if out:
        save_device(out, dev)
    return dev.to_json()


def platform_release() -> str:
    return os.uname().release


def print_probe(d: dict) -> None:
    st, det = d["storage"], d["details"]
    sizes, qds = st["sizes"], st["queue_depths"]
    print(f"{d['name']}: read latency (us) by request size and queue depth; engine {det['engine']}, "
          f"{det['seconds']} s")
    print(f"{'size':>8} " + " ".join(f"{'qd' + str(q):>9}" for q in qds) + f" {'MB/s@qd' + str(qds[-1]):>11}")
    for s, row in zip(sizes, st["latency_us"]):
        label = f"{s >> 10}K" if s < 1 << 20 else f"{s >> 20}M"
        print(f"{label:>8} " + " ".join(f"{x:9.1f}" for x in row) + f" {s * qds[-1] / row[-1]:11.0f}")
    print(f"sequential {st['seq_MBps']:.0f} MB/s")
    for c in det["fio"]:
        kind = "seq" if c["sequential"] else "rand"
        print(f"fio check {kind} {c['size'] >> 10}K qd{c['qd']}: probe {c['probe_MBps']:.0f} MB/s, "
              f"fio {c['fio_MBps']:.0f} MB/s ({c.get('fio_iomem', 'malloc')}), ratio {c['ratio']:.2f}"
              + (f" (rounds {min(c['round_ratios']):.2f}-{max(c['round_ratios']):.2f})" if c.get("round_ratios") else ""))
    if det["fio_note"]:
        print(det["fio_note"])


class InterleavedTable:
    """A latency table measured a few cells at a time between other work (`step`), so that
    it sees the load that work saw: a benchmark checks its storage model with it."""

    def __init__(self, path: str | os.PathLike, engine: str = "native", cell_s: float = 0.03,
                 sizes=None, qds=None, file_bytes: int = FULL["file_bytes"]):
        self.file = probe_file(path, file_bytes)
        self.file_bytes = self.file.stat().st_size
        self.sizes, self.qds = list(sizes or FULL["sizes"]), list(qds or FULL["qds"])
        self.cells = [(i, j) for i in range(len(self.sizes)) for j in range(len(self.qds))] + [("seq", SEQ_QD)]
        self.elapsed = {c: 0.0 for c in self.cells}
        self.requests = {c: 0 for c in self.cells}
        self.cell_s = cell_s
        self.readers = {q: make_reader(self.file, q, engine) for q in set(self.qds) | {SEQ_QD}}
        self.rng = np.random.default_rng(2)
        self.next = 0

    def step(self, k: int = 1) -> None:
        for _ in range(k):
            c = self.cells[self.next % len(self.cells)]
            self.next += 1
            if c[0] == "seq":
                el, n = measure_cell(self.readers[SEQ_QD], self.file_bytes, SEQ_REQUEST, self.cell_s * 3,
                                     self.rng, sequential=True)
            else:
                i, j = c
                el, n = measure_cell(self.readers[self.qds[j]], self.file_bytes, self.sizes[i], self.cell_s, self.rng)
            self.elapsed[c] += el
            self.requests[c] += n

    @property
    def rounds(self) -> float:
        return self.next / len(self.cells)

    def profile(self) -> StorageProfile:
        if self.next < len(self.cells):
            self.step(len(self.cells) - self.next)
        lat = np.zeros((len(self.sizes), len(self.qds)))
        for (i, j) in self.cells[:-1]:
            lat[i, j] = self.elapsed[(i, j)] * self.qds[j] / self.requests[(i, j)] * 1e6
        c = self.cells[-1]
        seq = self.requests[c] * SEQ_REQUEST / self.elapsed[c] / 1e6
        best = float((np.array(self.sizes)[:, None] * np.array(self.qds)[None, :] / lat).max())
        return StorageProfile(np.array(self.sizes), np.array(self.qds), lat, max(seq, best))

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
