"""Parallel O_DIRECT reader: extents -> one aligned buffer, with bytes and time counted.

O_DIRECT bypasses the page cache, so what we time is the device, not DRAM. When the file
system refuses O_DIRECT (tmpfs, some overlay mounts) the reader falls back to buffered reads
and says so: `o_direct` is False, `fallback_reason` says why, and a warning goes to stderr.
Reads are split over `queue_depth` threads; os.preadv releases the GIL, so the device sees
up to that many requests in flight.
"""
from __future__ import annotations

import errno
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

ALIGN = 4096


class ReadError(OSError):
    """A read that failed or came back short; names the file and the offset."""


@dataclass
class ReadResult:
    buffer: np.ndarray        # uint8, extents back to back; valid until the next read()
    starts: np.ndarray        # (m,) position of each extent in buffer
    seconds: float
    bytes_read: int
    reads: int


class FlashReader:
    def __init__(self, path: str, queue_depth: int = 32, o_direct: bool = True):
        self.path = str(path)
        self.queue_depth = max(1, int(queue_depth))
        self.fallback_reason = ""
        self.o_direct = False
        if o_direct:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.o_direct = self._probe_direct()
                if not self.o_direct:
                    os.close(self.fd)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise ReadError(e.errno, f"{self.path}: no such file; run `ripple pack` first")
                self.fallback_reason = f"open with O_DIRECT failed: {e.strerror}"
        else:
            self.fallback_reason = "O_DIRECT disabled by the caller"
        if not self.o_direct:
            self.fd = os.open(self.path, os.O_RDONLY)
            print(f"WARNING: {self.path}: reading through the page cache ({self.fallback_reason}); "
                  "I/O times below measure DRAM, not flash", file=sys.stderr)
        self._pool = ThreadPoolExecutor(self.queue_depth) if self.queue_depth > 1 else None
        self._buf = mmap.mmap(-1, ALIGN)   # page-aligned, grown on demand

    def _probe_direct(self) -> bool:
        buf = mmap.mmap(-1, ALIGN)
        try:
            os.preadv(self.fd, [buf], 0)
            return True
        except OSError as e:
            self.fallback_reason = f"O_DIRECT read failed: {e.strerror}"
            return False
        finally:
            buf.close()

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown()
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_group(self, view: memoryview, extents: np.ndarray, starts: np.ndarray) -> None:
        for (off, n), s in zip(extents.tolist(), starts.tolist()):
            got, tries = 0, 0
            while got < n:
                try:
                    k = os.preadv(self.fd, [view[s + got:s + n]], off + got)
                except InterruptedError:
                    continue
                except OSError as e:
                    raise ReadError(e.errno, f"{self.path}: read of {n} bytes at offset {off} "
                                             f"failed: {e.strerror}") from e
                if k == 0:
                    tries += 1
                    if tries > 3:
                        raise ReadError(errno.EIO, f"{self.path}: short read at offset {off + got} "
                                                   f"({got} of {n} bytes); is the file truncated?")
                got += k

    def read(self, extents: np.ndarray) -> ReadResult:
        extents = np.asarray(extents, dtype=np.int64).reshape(-1, 2)
        sizes = extents[:, 1]
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        total = int(sizes.sum())
        if total > len(self._buf):
            # Not closed: arrays handed out by earlier reads may still view it.
            self._buf = mmap.mmap(-1, -(-total // ALIGN) * ALIGN)
        view = memoryview(self._buf)
        t0 = time.perf_counter()
        if self._pool is None or len(extents) < 2:
            self._read_group(view, extents, starts)
        else:
            # Strided groups keep every thread busy with a mix of offsets.
            q = min(self.queue_depth, len(extents))
            futures = [self._pool.submit(self._read_group, view, extents[i::q], starts[i::q])
                       for i in range(q)]
            for f in futures:
                f.result()
        seconds = time.perf_counter() - t0
        buf = np.frombuffer(self._buf, dtype=np.uint8, count=total)
        return ReadResult(buf, starts, seconds, total, len(extents))
