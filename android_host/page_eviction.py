"""Page-cache eviction of a file's byte ranges, checked with mincore: how `ripple bench e2e`
makes llama.cpp read its weights from disk before every token, as on a phone whose DRAM
cannot hold them.

llama.cpp maps the GGUF itself. A page that a process still maps is skipped by
posix_fadvise(POSIX_FADV_DONTNEED), so eviction first drops this process's own mappings of
the ranges (madvise(MADV_DONTNEED): the page-table entries go; a later access refaults
from the page cache, or from disk once the cache has dropped the page), then asks the
kernel to drop the cached pages of the file. The check maps the same file privately and
asks mincore which pages of the ranges are still in the page cache. mincore reports page-
cache state only for files the caller owns or may write (Linux >= 5.0; otherwise every page
reads as resident), so a check that cannot see says "not verified" rather than "evicted".

Ranges are (n, 2) int64 arrays of (offset, length) bytes, like the planner's extents;
they are widened to whole pages, since the page cache holds nothing smaller.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
MADV_DONTNEED = 4
POSIX_FADV_DONTNEED = 4
PROT_READ, MAP_SHARED = 1, 1
# The FFN weights of a GGUF block (SwiGLU and ReLU): what ripple keeps on flash. Norms,
# attention and embeddings are what both sides keep in DRAM.
FFN_TENSOR = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.weight$")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))


class EvictionError(OSError):
    """The kernel refused an eviction or residency call; the message says which and why."""


@dataclass
class Eviction:
    """One eviction: bytes asked for (whole pages), this process's mapped bytes dropped, and
    what mincore saw in those ranges right after."""
    bytes_evicted: int
    mapped_bytes_dropped: int
    resident_after: int            # bytes of the ranges still in the page cache
    verified: bool                 # mincore could see, and saw none resident
    note: str = ""


def page_ranges(ranges: np.ndarray, file_size: int) -> np.ndarray:
    """Ranges widened to whole pages, clipped to the file (rounded up to a page), sorted and
    merged where they touch."""
    r = np.asarray(ranges, np.int64).reshape(-1, 2)
    if not len(r):
        return r
    end_cap = -(-file_size // PAGE) * PAGE
    lo = (r[:, 0] // PAGE) * PAGE
    hi = np.minimum(-(-(r[:, 0] + r[:, 1]) // PAGE) * PAGE, end_cap)
    order = np.argsort(lo, kind="stable")
    out = []
    for a, b in zip(lo[order].tolist(), hi[order].tolist()):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return np.array([(a, b - a) for a, b in out], np.int64).reshape(-1, 2)


def whole_file(path: str | os.PathLike) -> np.ndarray:
    return np.array([[0, os.path.getsize(path)]], np.int64)


def gguf_tensor_ranges(path: str | os.PathLike, pattern: re.Pattern = FFN_TENSOR) -> np.ndarray:
    """(offset, length) in the file of every tensor whose name matches `pattern`."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    try:
        rows = [(int(t.data_offset), int(t.n_bytes)) for t in reader.tensors if pattern.match(t.name)]
    finally:
        mm = getattr(reader.data, "_mmap", None)   # GGUFReader holds an np.memmap of the file
        del reader
        if mm is not None:
            mm.close()
    if not rows:
        raise EvictionError(f"{path}: no tensor matches {pattern.pattern}; is this a GGUF of a "
                            "transformer with an FFN?")
    return np.array(rows, np.int64)


def file_mappings(path: str | os.PathLike) -> list[tuple[int, int, int]]:
    """(address, length, file offset) of this process's mappings of `path` (/proc/self/maps)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[5].rstrip("\n") != real:
                continue
            dev_major, dev_minor = (int(x, 16) for x in parts[3].split(":"))
            if int(parts[4]) != st.st_ino or os.makedev(dev_major, dev_minor) != st.st_dev:
                continue
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.append((a, b - a, int(parts[2], 16)))
    return out


def drop_mapped(path: str | os.PathLike, ranges: np.ndarray) -> int:
    """madvise(MADV_DONTNEED) where this process maps `ranges` of `path`; bytes dropped."""
    dropped = 0
    for addr, length, off in file_mappings(path):
        for o, n in np.asarray(ranges, np.int64).tolist():
            lo, hi = max(o, off), min(o + n, off + length)
            if hi <= lo:
                continue
            if _libc.madvise(ctypes.c_void_p(addr + lo - off), hi - lo, MADV_DONTNEED) != 0:
                e = ctypes.get_errno()
                raise EvictionError(e, f"madvise(MADV_DONTNEED) on {path} [{lo}, {hi}): {os.strerror(e)}")
            dropped += hi - lo
    return dropped


def resident_bytes(path: str | os.PathLike, ranges: np.ndarray | None = None) -> tuple[int, bool]:
    """(bytes of `ranges` in the page cache, whether mincore can see this file's cache).
    Maps the file read-only without touching it."""
    size = os.path.getsize(path)
    ranges = page_ranges(whole_file(path) if ranges is None else ranges, size)
    if size == 0 or not len(ranges):
        return 0, True
    st = os.stat(path)
    visible = os.geteuid() in (0, st.st_uid) or os.access(path, os.W_OK)
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = -(-size // PAGE) * PAGE
        addr = _libc.mmap(None, mapped, PROT_READ, MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            e = ctypes.get_errno()
            raise EvictionError(e, f"mmap of {path} for mincore: {os.strerror(e)}")
        try:
            resident = 0
            for o, n in ranges.tolist():
                vec = (ctypes.c_ubyte * (n // PAGE))()
                if _libc.mincore(ctypes.c_void_p(addr + o), n, vec) != 0:
                    e = ctypes.get_errno()
                    raise EvictionError(e, f"mincore on {path}: {os.strerror(e)}")
                resident += int((np.frombuffer(vec, np.uint8) & 1).sum()) * PAGE
        finally:
            _libc.munmap(ctypes.c_void_p(addr), mapped)
    finally:
        os.close(fd)
    return min(resident, int(ranges[:, 1].sum())), visible


def complement(ranges: np.ndarray, file_size: int) -> np.ndarray:
    """The (offset, length) pieces of the file outside page-widened `ranges`."""
    r = page_ranges(ranges, file_size)
    edges = [0] + [x for o, n in r.tolist() for x in (o, o + n)] + [file_size]
    out = [(a, b - a) for a, b in zip(edges[::2], edges[1::2]) if b > a]
    return np.array(out, np.int64).reshape(-1, 2)


def reread(path: str | os.PathLike, ranges: np.ndarray, chunk: int = 1 << 20) -> None:
    """Read `ranges` into the page cache with readahead off (POSIX_FADV_RANDOM: the kernel
    reads what is asked, in order-0 folios, and nothing around it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for o, n in np.asarray(ranges, np.int64).tolist():
            for p in range(o, o + n, chunk):
                os.pread(fd, min(chunk, o + n - p), p)
    finally:
        os.close(fd)


def evict(path: str | os.PathLike, ranges: np.ndarray | None = None) -> Eviction:
    """Drop `ranges` of `path` (default: all of it) from this process's mappings and from the
    page cache, then check with mincore."""
    size = os.path.getsize(path)
    ranges = page_ranges(whole_file(path) if ranges is None else ranges, size)
    dropped = drop_mapped(path, ranges)
    fd = os.open(path, os.O_RDONLY)
    try:
        for o, n in ranges.tolist():
            os.posix_fadvise(fd, o, n, POSIX_FADV_DONTNEED)
        left, visible = resident_bytes(path, ranges)
        if left and visible:
            # Dirty pages (a file written moments ago) only start their writeback on
            # DONTNEED and stay cached; once written they can go.
            os.fdatasync(fd)
            for o, n in ranges.tolist():
                os.posix_fadvise(fd, o, n, POSIX_FADV_DONTNEED)
            left, visible = resident_bytes(path, ranges)
        resplit = bool(left and visible and len(ranges) and ranges[:, 1].sum() < size)
        if resplit:
            # A large folio (Linux >= 6.x readahead and writes cache files in folios of up to
            # MBs) that straddles a range's edge cannot be dropped in part. Drop the whole
            # file, then read back what lies outside the ranges with readahead off: order-0
            # folios that never straddle again, so later evictions of the ranges succeed.
            drop_mapped(path, whole_file(path))
            os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
            reread(path, complement(ranges, size))
            left, visible = resident_bytes(path, ranges)
    finally:
        os.close(fd)
    note = "" if visible else (f"mincore cannot see the page cache of {Path(path).name} (not its owner "
                               "and no write access): eviction not verified")
    if visible and left:
        note = (f"{left} bytes still in the page cache after eviction (another process maps "
                "them, or they are dirty or locked)")
    elif resplit:
        note = ("large folios straddled the ranges: the whole file was evicted once and the "
                "bytes outside the ranges read back")
    return Eviction(int(ranges[:, 1].sum()), dropped, left, visible and left == 0, note)
