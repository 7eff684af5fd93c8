"""The native flash reader (compile/native) on a device, driven from the host.

`open_reader(session, target)` builds the reader library for the device's target, uploads it
into the RPC server's work folder and loads it there (`remote.load_module`); with no session
it loads the host build into this process, which is how it is compared with the Python
reader. Every call goes through the session's watchdog (android_host.rpc).

Files the reader reads must be on the device: `put` uploads one into the server's work
folder (the phone's app cache, on its flash); `device_path` names one there.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..compile import native_reader as nr
from .rpc import RemoteError, Session


@dataclass
class DeviceReader:
    session: Session | None        # None: this process
    module: object                 # tvm.runtime.Module of the reader library
    target: str
    library: str                   # file name (remote) or path (local) it was loaded from

    @property
    def where(self) -> str:
        return self.session.label if self.session else "this process"

    functions: dict = field(default_factory=dict)

    def _call(self, what: str, fn_name: str, *args, timeout: float | None = None):
        if self.session is None:
            return self.module[fn_name](*args)
        if fn_name not in self.functions:    # a remote lookup: bounded like any call
            self.functions[fn_name] = self.session.call(f"lookup {fn_name}", self.module.__getitem__, fn_name)
        return self.session.call(what, self.functions[fn_name], *args, timeout=timeout)

    def _tensor(self, a: np.ndarray):
        import tvm
        return tvm.runtime.tensor(a) if self.session is None else self.session.tensor(a)

    def device_path(self, name: str) -> str:
        """Where a file of this name lives on the device (the server's work folder)."""
        return name if self.session is None else self.session.workpath(name)

    def put(self, local: str | Path, name: str | None = None) -> str:
        """Upload a file to the device; returns its path there (locally: the file itself)."""
        if self.session is None:
            return str(local)
        return self.device_path(self.session.upload(local, name))

    def prepare(self, path: str, nbytes: int) -> int:
        """A test file of at least nbytes random bytes at `path` on the device (kept if present)."""
        return int(self._call(f"prepare {path}", nr.PREPARE, path, int(nbytes),
                              timeout=None if self.session is None else
                              self.session.timeout + nbytes / 50e6))

    def probe_cell(self, path: str, size: int, queue_depth: int, seconds: float,
                   sequential: bool = False, seed: int = 0) -> float:
        """Mean latency (us) of one `size`-byte O_DIRECT read with queue_depth in flight."""
        return float(self._call(f"probe {size}B qd{queue_depth}", nr.PROBE, path, int(size),
                                int(queue_depth), float(seconds), int(sequential), int(seed)))

    def read_extents(self, path: str, extents: np.ndarray, queue_depth: int,
                     fetch: bool = False) -> tuple[float, np.ndarray | None]:
        """(seconds the reads took on the device, the bytes back to back if fetch)."""
        ext = np.ascontiguousarray(np.asarray(extents, np.int64).reshape(-1, 2))
        total = int(ext[:, 1].sum())
        out = self._tensor(np.zeros(max(total, 1), np.uint8)) if fetch else None
        sec = float(self._call(f"read of {len(ext)} extents", nr.READ_EXTENTS, path,
                               self._tensor(ext), out, int(queue_depth)))
        if not fetch:
            return sec, None
        data = out.numpy() if self.session is None else self.session.call("download bytes", out.numpy)
        return sec, data[:total]


    def bind(self, path: str, layout, queue_depth: int = 32) -> None:
        """Point the device's flash hook (ripple.flash.read, which compile.graph's Relax graph
        calls) at the flash file `path` there, laid out as `layout` (layout.reader.Layout)."""
        self._call(f"bind {path}", nr.BIND, path,
                   self._tensor(np.ascontiguousarray(layout.region_offsets, np.int64)),
                   self._tensor(np.ascontiguousarray(layout.slot_of, np.int64)),
                   int(layout.bundle_bytes), int(layout.alignment), int(queue_depth))

    def hook_read(self, layer: int, ids: np.ndarray, out) -> None:
        """What the graph does through ripple.flash.read: out (k, cols) <- bundles of ids."""
        self._call(f"flash read layer {layer}", nr.HOOK, int(layer),
                   self._tensor(np.ascontiguousarray(ids, np.int64)), out)

    def hook_stats(self) -> dict:
        """The hook's totals since bind: read seconds, bytes read, requests, calls."""
        t = self._tensor(np.zeros(4, np.float64))
        self._call("flash stats", nr.STATS, t)
        v = t.numpy() if self.session is None else self.session.call("download stats", t.numpy)
        return {"seconds": float(v[0]), "bytes_read": int(v[1]), "reads": int(v[2]), "calls": int(v[3])}


def open_reader(session: Session | None, target: str = "host") -> DeviceReader:
    lib = nr.build_reader(target)
    if session is None:
        module, name = nr.load_reader(lib), str(lib)
    else:
        # Named by content: a session that loaded an older build does not reuse its name.
        tag = hashlib.blake2b(lib.read_bytes(), digest_size=6).hexdigest()
        name = f"libripple_reader-{tag}.so"
        if name not in session.modules:
            session.upload(lib, name)
        module = session.load_module(name)
    r = DeviceReader(session, module, target, name)
    abi = int(r._call("abi check", nr.ABI_FN))
    if abi != nr.ABI:
        raise RemoteError(f"{r.where}: reader library ABI {abi}, this ripple speaks {nr.ABI}; "
                          f"rebuild (rm -r {nr.BUILD_DIR})")
    return r


def globals_on(session: Session) -> list[str]:
    """The reader's global functions visible on the device (they are registered when the
    library is loaded in a process whose TVM FFI it can find)."""
    have = []
    for g in nr.GLOBALS:
        try:
            session.get_function(g)
            have.append(g)
        except AttributeError:               # TVM's "Module has no function"
            pass
    return have
