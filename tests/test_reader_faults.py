"""Faults injected at the reader's read calls (os.preadv for the thread engine, the AIO
results and system calls for the aio engine): EINTR and short reads are retried (a bounded
number of times) and give the exact bytes; EIO and end of file are a ReadError naming the
file and the offset, and no buffer is returned."""
import ctypes
import errno
import os
import threading
import time

import numpy as np
import pytest

from ripple.runtime_py import reader as reader_mod
from ripple.runtime_py.reader import FlashReader, ReadError

BLOCKS = 64


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, BLOCKS * 4096, dtype=np.uint8)
    path = tmp_path / "blob.rflash"
    path.write_bytes(data.tobytes())
    return path, data


EXTENTS = np.array([[0, 8192], [16384, 4096], [65536, 32768], [200704, 12288]])


def _check(res, data):
    for (off, n), s in zip(EXTENTS.tolist(), res.starts.tolist()):
        assert (res.buffer[s:s + n] == data[off:off + n]).all()


def _fake_preadv(monkeypatch, fault):
    """os.preadv whose call k (0-based) first asks fault(k, fd, bufs, offset): None to read
    for real, or an int (bytes to read, a short read) or an exception to raise."""
    real = os.preadv
    calls = []
    lock = threading.Lock()

    def preadv(fd, bufs, offset):
        with lock:
            k = len(calls)
            calls.append(offset)
        f = fault(k, offset, sum(len(b) for b in bufs))
        if isinstance(f, BaseException):
            raise f
        if f is not None:
            return real(fd, [memoryview(bufs[0])[:f]], offset)
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    return calls


def _eintr():
    return InterruptedError(errno.EINTR, os.strerror(errno.EINTR))


# --- thread engine --------------------------------------------------------------------------------

@pytest.mark.parametrize("queue_depth", [1, 4])
def test_eintr_at_the_read_call_is_retried(data_file, monkeypatch, queue_depth):
    path, data = data_file
    with FlashReader(path, queue_depth, engine="threads") as r:
        calls = _fake_preadv(monkeypatch, lambda k, off, n: _eintr() if k % 2 == 0 else None)
        _check(r.read(EXTENTS), data)
    assert len(calls) == 2 * len(EXTENTS)


def test_eintr_that_never_stops_is_an_error_not_a_spin(data_file, monkeypatch):
    path, _ = data_file
    with FlashReader(path, 1, engine="threads") as r:
        calls = _fake_preadv(monkeypatch, lambda k, off, n: _eintr())
        with pytest.raises(ReadError, match=rf"{path.name}: read of 8192 bytes at offset 0 interrupted 9 times"):
            r.read(EXTENTS)
    assert len(calls) == 9


@pytest.mark.parametrize("queue_depth", [1, 4])
def test_short_reads_continue_where_they_stopped(data_file, monkeypatch, queue_depth):
    path, data = data_file
    with FlashReader(path, queue_depth, engine="threads") as r:
        # Every request gets a 4 KiB piece (an O_DIRECT short read stays block aligned).
        calls = _fake_preadv(monkeypatch, lambda k, off, n: 4096 if n > 4096 else None)
        _check(r.read(EXTENTS), data)
    assert len(calls) == int(EXTENTS[:, 1].sum()) // 4096


@pytest.mark.parametrize("queue_depth", [1, 4])
def test_eio_names_the_file_and_the_offset(data_file, monkeypatch, queue_depth):
    path, _ = data_file
    with FlashReader(path, queue_depth, engine="threads") as r:
        _fake_preadv(monkeypatch, lambda k, off, n: OSError(errno.EIO, os.strerror(errno.EIO))
                     if off == 65536 + 8192 else (8192 if off == 65536 else None))
        with pytest.raises(ReadError, match=rf"{path}: read of 24576 bytes at offset 73728 failed: "
                                            r"Input/output error") as e:
            r.read(EXTENTS)
    assert e.value.errno == errno.EIO


def test_a_read_that_stops_returning_bytes_is_an_error(data_file, monkeypatch):
    path, _ = data_file
    with FlashReader(path, 1, engine="threads") as r:
        calls = _fake_preadv(monkeypatch, lambda k, off, n: 0 if off >= 65536 else None)
        with pytest.raises(ReadError, match=r"short read at offset 65536 \(0 of 32768 bytes\)"):
            r.read(EXTENTS)
    assert len(calls) == 2 + 4                              # two good extents, 1 + 3 retries


def test_a_failed_read_waits_for_every_thread_and_the_next_read_is_exact(data_file, monkeypatch):
    """No thread of a failed read may still write into the buffer the next read returns."""
    path, data = data_file
    busy = []

    def fault(k, off, n):
        if off == 16384:
            return OSError(errno.EIO, os.strerror(errno.EIO))
        busy.append(1)
        time.sleep(0.05)
        busy.pop()
        return None

    with FlashReader(path, 4, engine="threads") as r:
        _fake_preadv(monkeypatch, fault)
        with pytest.raises(ReadError, match="offset 16384"):
            r.read(EXTENTS)
        assert busy == []
        monkeypatch.undo()
        _check(r.read(EXTENTS), data)


# --- aio engine -------------------------------------------------------------------------------------

def _fake_aio_results(monkeypatch, reader, change):
    """The AIO batch runs for real; change(res, extents) then edits the per-request results."""
    real = reader._aio.read

    def read(fd, base, extents, starts):
        res = real(fd, base, extents, starts)
        change(res, extents)
        return res

    monkeypatch.setattr(reader._aio, "read", read)


def test_aio_eio_names_the_file_and_the_offset(data_file, monkeypatch):
    path, _ = data_file
    with FlashReader(path, 8, engine="aio") as r:
        assert r.engine == "aio"
        _fake_aio_results(monkeypatch, r, lambda res, ext: res.__setitem__(2, -errno.EIO))
        with pytest.raises(ReadError, match=rf"{path}: read of 32768 bytes at offset 65536 failed: "
                                            r"Input/output error"):
            r.read(EXTENTS)


@pytest.mark.parametrize("code", [errno.EINTR, errno.EAGAIN])
def test_aio_interrupted_requests_are_finished_synchronously(data_file, monkeypatch, code):
    path, data = data_file
    with FlashReader(path, 8, engine="aio") as r:
        _fake_aio_results(monkeypatch, r, lambda res, ext: res.__setitem__(slice(1, 3), -code))
        _check(r.read(EXTENTS), data)


def test_aio_short_reads_are_finished_synchronously(data_file, monkeypatch):
    path, data = data_file
    with FlashReader(path, 8, engine="aio") as r:
        def halve(res, ext):
            res[:] = ext[:, 1] // 2 // 4096 * 4096     # as if each request stopped half way
        _fake_aio_results(monkeypatch, r, halve)
        _check(r.read(EXTENTS), data)


def test_aio_short_read_at_the_end_of_the_file_is_an_error(data_file):
    path, _ = data_file
    size = BLOCKS * 4096
    with FlashReader(path, 8, engine="aio") as r:
        with pytest.raises(ReadError, match=rf"short read at offset {size} \(4096 of 8192 bytes\)"):
            r.read(np.array([[0, 4096], [size - 4096, 8192]]))


def _fake_syscall(monkeypatch, reader, which, times):
    """The AIO system call `which` ("getevents" or "submit") fails with EINTR `times` times."""
    aio = reader._aio
    real, num = aio._sys, getattr(aio, f"_{which}")
    count = [0]

    def sys_call(n, *args):
        if n == num and count[0] < times:
            count[0] += 1
            ctypes.set_errno(errno.EINTR)
            return -1
        return real(n, *args)

    monkeypatch.setattr(aio, "_sys", sys_call)
    return count


@pytest.mark.parametrize("which", ["getevents", "submit"])
def test_aio_eintr_in_the_system_calls_is_retried(data_file, monkeypatch, which):
    path, data = data_file
    with FlashReader(path, 8, engine="aio") as r:
        count = _fake_syscall(monkeypatch, r, which, 3)
        _check(r.read(EXTENTS), data)
    assert count[0] == 3


@pytest.mark.parametrize("which", ["getevents", "submit"])
def test_aio_eintr_that_never_stops_is_an_error_not_a_spin(data_file, monkeypatch, which):
    path, data = data_file
    with FlashReader(path, 8, engine="aio") as r:
        count = _fake_syscall(monkeypatch, r, which, 10**9)
        with pytest.raises(ReadError, match=rf"{path}: io_{which}: Interrupted system call"):
            r.read(EXTENTS)
        assert count[0] == reader_mod._RETRIES + 1
        monkeypatch.undo()
        # Requests the failed batch left in flight must not complete into the next one.
        _check(r.read(EXTENTS), data)


# --- the engine never computes with what a failed read left ------------------------------------------

def test_generation_stops_at_a_failed_read(tmp_path, random_llama_dir, monkeypatch):
    from ripple.android_host.interface import pack_cmd
    from ripple.layout import open_layout
    from ripple.runtime_py.engine import generate
    from ripple.tuning.checkpoint import load_model
    from ripple.tuning.forward import to_torch
    pack_cmd(str(random_llama_dir), str(tmp_path))
    lay = open_layout(tmp_path)
    desc = load_model(random_llama_dir)
    tm = to_torch(desc)
    region1 = int(lay.region_offsets[1])
    with FlashReader(lay.path, 4, engine="threads") as r:
        _fake_preadv(monkeypatch, lambda k, off, n: OSError(errno.EIO, os.strerror(errno.EIO))
                     if off >= region1 else None)
        with pytest.raises(ReadError, match=rf"model.rflash: read of \d+ bytes at offset {region1}"):
            generate(tm, lay, r, np.full(desc.n_layers, -1.0), "coef", [1, 2, 3], 2)
