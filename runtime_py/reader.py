"""Parallel O_DIRECT reader: extents -> one aligned buffer, with bytes and time counted.

O_DIRECT bypasses the page cache, so what we time is the device, not DRAM. When the file
system refuses O_DIRECT (tmpfs, some overlay mounts) the reader falls back to buffered reads
and says so: `o_direct` is False, `fallback_reason` says why, and a warning goes to stderr.

Two engines keep `queue_depth` requests in flight; all extents of one read() call (one
layer) are issued together:
- "aio": Linux native AIO (io_submit / io_getevents system calls). The request blocks are
  built for the whole call at once with numpy, so Python costs a few microseconds per batch
  of completions, not per request; on a 2-core machine this is what reaches fio's small-
  request throughput (a thread per request in flight spends its time on the GIL).
- "threads": `queue_depth` threads calling os.preadv, which releases the GIL. Used where
  AIO is not available (other architectures, buffered reads) or when asked for.
`engine="auto"` picks aio when it works on this file, else threads; `engine` says which ran.

Faults: an interrupted call (EINTR, EAGAIN) is retried a bounded number of times, a short
read continues where it stopped; anything else (EIO, end of file) is a ReadError naming the
file and the offset, and read() returns nothing: a partly filled buffer never reaches the
weights. With `checks` (layout.block_checks) every block read is compared with its CRC.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..layout.block_crc import BlockChecks, check_extents

ALIGN = 4096
HUGE = 2 << 20            # buffers grow in huge-page steps
ENGINES = ("auto", "aio", "threads")
# Retries of one request after EINTR/EAGAIN, and after a read that returned 0 bytes before
# its end. A signal storm or a file cut short ends in a ReadError, not a spin.
_RETRIES = 8
_EMPTY_RETRIES = 3


class ReadError(OSError):
    """A read that failed or came back short; names the file and the offset."""

    def __str__(self):          # the message alone: it already names what failed
        return self.strerror or super().__str__()


@dataclass
class ReadResult:
    buffer: np.ndarray        # uint8, extents back to back; valid until the next read()
    starts: np.ndarray        # (m,) position of each extent in buffer
    seconds: float
    bytes_read: int
    reads: int


# Linux AIO ABI (include/uapi/linux/aio_abi.h), little-endian 64-bit.
_AIO_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}  # setup, destroy, getevents, submit
_IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"),
                  ("reqprio", "<i2"), ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"),
                  ("offset", "<i8"), ("reserved2", "<u8"), ("flags", "<u4"), ("resfd", "<u4")])
_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
_IOCB_CMD_PREAD = 0


class _Aio:
    """An AIO context of `depth` slots; read() keeps up to `depth` requests in flight."""

    def __init__(self, depth: int):
        nums = _AIO_SYSCALLS.get(platform.machine())
        if nums is None or not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS, f"no Linux AIO table for {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = nums
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._sys = self._libc.syscall
        self._sys.restype = ctypes.c_long
        self.depth = depth
        self._open()

    def _open(self) -> None:
        self.ctx = ctypes.c_ulong(0)
        if self._sys(self._setup, ctypes.c_long(self.depth), ctypes.byref(self.ctx)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_setup: {os.strerror(e)}")

    def close(self) -> None:
        if self.ctx.value:
            self._sys(self._destroy, self.ctx)
            self.ctx = ctypes.c_ulong(0)

    def read(self, fd: int, base: int, extents: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Issue every extent; returns the (n,) bytes each request got (negative: -errno)."""
        n = len(extents)
        cb = np.zeros(n, _IOCB)
        cb["data"] = np.arange(n)
        cb["opcode"] = _IOCB_CMD_PREAD
        cb["fildes"] = fd
        cb["buf"] = base + starts
        cb["nbytes"] = extents[:, 1]
        cb["offset"] = extents[:, 0]
        ptrs = (cb.ctypes.data + _IOCB.itemsize * np.arange(n, dtype=np.uint64)).astype(np.uint64)
        events = np.zeros(n, _EVENT)
        pp, ep, size = ptrs.ctypes.data, events.ctypes.data, _EVENT.itemsize
        submitted = done = interrupted = 0
        try:
            while done < n:
                want = min(self.depth - (submitted - done), n - submitted)
                if want > 0:
                    got = self._sys(self._submit, self.ctx, ctypes.c_long(want), ctypes.c_void_p(pp + 8 * submitted))
                    if got < 0:
                        e = ctypes.get_errno()
                        interrupted += 1
                        if e not in (errno.EAGAIN, errno.EINTR) or interrupted > _RETRIES:
                            raise OSError(e, f"io_submit: {os.strerror(e)}")
                        if submitted == done:
                            continue
                    else:
                        submitted += got
                got = self._sys(self._getevents, self.ctx, ctypes.c_long(1), ctypes.c_long(submitted - done),
                                ctypes.c_void_p(ep + size * done), None)
                if got < 0:
                    e = ctypes.get_errno()
                    interrupted += 1
                    if e != errno.EINTR or interrupted > _RETRIES:
                        raise OSError(e, f"io_getevents: {os.strerror(e)}")
                    continue
                done += got
                interrupted = 0
        except OSError:
            # Requests still in flight would complete into this buffer, and their events would
            # be taken for the next batch's: io_destroy waits for them, a new context starts clean.
            if submitted > done:
                self.close()
                self._open()
            raise
        res = np.empty(n, np.int64)
        res[events["data"].astype(np.int64)] = events["res"]
        return res


class FlashReader:
    def __init__(self, path: str, queue_depth: int = 32, o_direct: bool = True, engine: str = "auto",
                 checks: BlockChecks | None = None):
        """checks: the layout's per-block CRCs (layout.block_checks); every block read is
        compared with its CRC, a mismatch is a LayoutChecksumError (`--verify`)."""
        if engine not in ENGINES:
            raise ValueError(f"reader engine {engine!r} is not one of {', '.join(ENGINES)}")
        self.path = str(path)
        self.checks = checks
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
        self._aio = None
        self.engine = "threads"
        self.engine_note = ""
        if engine in ("auto", "aio") and self.o_direct:
            try:
                self._aio = _Aio(max(self.queue_depth, 1))
                self.engine = "aio"
            except OSError as e:
                self.engine_note = f"Linux AIO unavailable ({e.strerror}); threads used"
                if engine == "aio":
                    os.close(self.fd)
                    raise ReadError(e.errno, f"{self.path}: engine aio: {e.strerror}") from e
        elif engine == "aio":
            os.close(self.fd)
            raise ReadError(errno.EINVAL, f"{self.path}: engine aio needs O_DIRECT ({self.fallback_reason})")
        self._pool = ThreadPoolExecutor(self.queue_depth) \
            if self.engine == "threads" and self.queue_depth > 1 else None
        self._buf = mmap.mmap(-1, ALIGN)   # page-aligned, grown on demand
        self._buf_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))

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
        if self._aio:
            self._aio.close()
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_group(self, view: memoryview, extents: np.ndarray, starts: np.ndarray) -> None:
        for (off, n), s in zip(extents.tolist(), starts.tolist()):
            self._read_extent(view, off, n, s)

    def _read_extent(self, view: memoryview, off: int, n: int, s: int, got: int = 0) -> None:
        """Bytes [got, n) of the extent at file offset `off` into view[s:s + n]."""
        empty, interrupted = 0, 0
        while got < n:
            try:
                k = os.preadv(self.fd, [view[s + got:s + n]], off + got)
            except (InterruptedError, BlockingIOError) as e:
                interrupted += 1
                if interrupted <= _RETRIES:
                    continue
                raise ReadError(e.errno, f"{self.path}: read of {n - got} bytes at offset "
                                         f"{off + got} interrupted {interrupted} times "
                                         f"({e.strerror}); giving up") from e
            except OSError as e:
                raise ReadError(e.errno, f"{self.path}: read of {n - got} bytes at offset "
                                         f"{off + got} failed: {e.strerror}") from e
            if k == 0:
                empty += 1
                if empty > _EMPTY_RETRIES:
                    raise ReadError(errno.EIO, f"{self.path}: short read at offset {off + got} "
                                               f"({got} of {n} bytes); is the file truncated?")
            got += k

    def _buffer(self, total: int) -> memoryview:
        if total > len(self._buf):
            # Not closed: arrays handed out by earlier reads may still view it. Backed by huge
            # pages where the kernel gives them: every O_DIRECT request pins its buffer pages,
            # and 4 KiB pages cost ~30% of the throughput of 64 KiB-1 MiB reads here (measured
            # against fio at QD 4-8: 1251 vs 1775 MB/s with huge pages, fio 1644). Touched
            # now, so that first-touch page faults are not timed as I/O.
            size = -(-total // HUGE) * HUGE
            self._buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(self._buf, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
                self._buf.madvise(mmap.MADV_HUGEPAGE)
            np.frombuffer(self._buf, np.uint8)[::ALIGN] = 0
            self._buf_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        return memoryview(self._buf)

    def _read_aio(self, view: memoryview, extents: np.ndarray, starts: np.ndarray) -> None:
        try:
            res = self._aio.read(self.fd, self._buf_addr, extents, starts)
        except OSError as e:
            raise ReadError(e.errno, f"{self.path}: {e.strerror}") from e
        bad = np.flatnonzero(res != extents[:, 1])
        if len(bad) == 0:
            return
        for i in bad.tolist():
            off, n = (int(x) for x in extents[i])
            if res[i] < 0 and -int(res[i]) not in (errno.EINTR, errno.EAGAIN):
                raise ReadError(-int(res[i]), f"{self.path}: read of {n} bytes at offset {off} "
                                              f"failed: {os.strerror(-int(res[i]))}")
        # Short or interrupted requests: finish them synchronously (rare; at the end of the
        # file it turns into _read_group's truncation error).
        for i in bad.tolist():
            self._read_extent(view, int(extents[i, 0]), int(extents[i, 1]), int(starts[i]),
                              int(max(res[i], 0)))

    def read(self, extents: np.ndarray, room: int = 0) -> ReadResult:
        """The extents, back to back in one buffer of at least `room` bytes (what lies past
        the bytes read is stale: a caller that asks for room fills it, e.g. read_ahead)."""
        extents = np.asarray(extents, dtype=np.int64).reshape(-1, 2)
        sizes = extents[:, 1]
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        total = int(sizes.sum())
        view = self._buffer(max(total, int(room)))
        t0 = time.perf_counter()
        if len(extents) == 0:
            pass
        elif self._aio is not None:
            self._read_aio(view, extents, starts)
        elif self._pool is None or len(extents) < 2:
            self._read_group(view, extents, starts)
        else:
            # Strided groups keep every thread busy with a mix of offsets.
            q = min(self.queue_depth, len(extents))
            futures = [self._pool.submit(self._read_group, view, extents[i::q], starts[i::q])
                       for i in range(q)]
            # Every thread is done before a failure is raised: none may still be writing into
            # the buffer the next read() hands out.
            errors = [f.exception() for f in futures]
            for e in errors:
                if e is not None:
                    raise e
        seconds = time.perf_counter() - t0
        buf = np.frombuffer(self._buf, dtype=np.uint8, count=max(total, int(room)))
        if self.checks is not None:
            check_extents(self.checks, buf, starts, extents)
        return ReadResult(buf, starts, seconds, total, len(extents))
