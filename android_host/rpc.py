"""Sessions with a device over TVM RPC: straight to its server (`--rpc HOST:PORT`) or through a
tracker that hands out free devices by key (`--tracker HOST:PORT --key KEY`), as a device farm
runs many phones behind one tracker.

Every remote call runs under a watchdog: a call that gets no reply within the session's
timeout has its connection shut down (which makes TVM's blocked receive return), and what
reaches the caller is a RemoteError: one line naming the device's address and what to do. A
server that dies mid-call gives the same error at once. After that the session is dead;
callers keep what they measured so far (the remote benchmarks write it, marked incomplete).

TVM's own client cannot be used as is for the tracker part: `connect_tracker` retries a
closed port for a minute and `request` waits forever for a key no server has; here both are
bounded. TVM 0.27's tracker needs `tornado` (a dependency of this package).
"""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TIMEOUT = 60.0
SERVER_HINT = "`python -m tvm.exec.rpc_server --host 0.0.0.0 --port PORT`, or the TVM RPC app on the phone"
# Messages TVM gives when the connection is gone rather than when the remote function failed.
_LOST = ("kShutdown", "code == RPCCode::kReturn", "Socket", "socket", "onnection", "Broken pipe",
         "RPCSessionTimeoutError")
_REMOTE_FAILED = "Error caught from RPC call"


class RemoteError(RuntimeError):
    """A device that cannot be reached or stopped answering; names the address and the fix."""


def parse_addr(text: str, flag: str = "--rpc") -> tuple[str, int]:
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RemoteError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


@dataclass(frozen=True)
class Endpoint:
    """Where a device is: `rpc` (its server) or `tracker` + `key`."""
    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None

    def __post_init__(self):
        if bool(self.rpc) == bool(self.tracker):
            raise RemoteError("give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
        if self.tracker and not self.key:
            raise RemoteError(f"--tracker {self.tracker}: also give --key (see `ripple devices "
                              f"--tracker {self.tracker}` for the keys it has)")
        parse_addr(self.rpc or self.tracker, "--rpc" if self.rpc else "--tracker")

    @property
    def label(self) -> str:
        return f"rpc {self.rpc}" if self.rpc else f"tracker {self.tracker} key {self.key}"

    @property
    def default_name(self) -> str:
        return self.key or self.rpc


def endpoint_from_args(rpc: str | None, tracker: str | None, key: str | None) -> Endpoint | None:
    """None when neither --rpc nor --tracker was given (run here)."""
    if not rpc and not tracker:
        if key:
            raise RemoteError("--key needs --tracker HOST:PORT")
        return None
    return Endpoint(rpc, tracker, key)


# ---------------------------------------------------------------- the tracker protocol

def _tracker_socket(addr: str, timeout: float) -> socket.socket:
    from tvm.rpc import base
    host, port = parse_addr(addr, "--tracker")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise RemoteError(f"tracker {addr}: cannot connect ({e.strerror or e}); start it with "
                          f"`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}`") from None
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except (OSError, RuntimeError) as e:
        sock.close()
        raise RemoteError(f"tracker {addr}: no handshake ({e}); is it a TVM RPC tracker?") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise RemoteError(f"{addr} answered, but is not a TVM RPC tracker")
    return sock


def _tracker_call(sock: socket.socket, msg: list, addr: str, timeout: float, what: str):
    from tvm.rpc import base
    sock.settimeout(timeout)
    try:
        base.sendjson(sock, msg)
        value = base.recvjson(sock)
    except socket.timeout:
        raise RemoteError(f"tracker {addr}: no answer to {what} within {timeout:g} s") from None
    except (OSError, RuntimeError, ValueError) as e:
        raise RemoteError(f"tracker {addr}: {what} failed ({e}); restart the tracker") from None
    if value[0] != base.TrackerCode.SUCCESS:
        raise RemoteError(f"tracker {addr}: {what} refused ({value})")
    return value[1] if len(value) > 1 else None


def tracker_summary(addr: str, timeout: float = 10.0) -> dict:
    """{"keys": {KEY: {"total", "free", "pending"}}, "servers": [{"key", "addr"}]}."""
    from tvm.rpc import base
    with contextlib.closing(_tracker_socket(addr, timeout)) as sock:
        s = _tracker_call(sock, [base.TrackerCode.SUMMARY], addr, timeout, "summary")
    servers = [{"key": i["key"].split(":", 1)[-1], "addr": f"{i['addr'][0]}:{i['addr'][1]}"}
               for i in s.get("server_info", [])]
    keys = {}
    for k, q in s.get("queue_info", {}).items():
        total = sum(1 for v in servers if v["key"] == k)
        if total or q.get("pending"):
            keys[k] = {"total": total, "free": q.get("free", 0), "pending": q.get("pending", 0)}
    return {"tracker": addr, "keys": keys, "servers": servers}


def _request(addr: str, key: str, timeout: float, priority: int = 1) -> tuple[str, int, str]:
    """(host, port, match key) of a free server with `key`, within `timeout`."""
    from tvm.rpc import base
    summary = tracker_summary(addr, timeout)
    if key not in summary["keys"] or not summary["keys"][key]["total"]:
        have = ", ".join(f"{k} ({v['free']} free)" for k, v in summary["keys"].items()) or "none"
        raise RemoteError(f"tracker {addr}: no device with key {key!r} (keys: {have}); start its "
                          f"RPC server with --tracker {addr} --key {key}")
    with contextlib.closing(_tracker_socket(addr, timeout)) as sock:
        try:
            url, port, match = _tracker_call(sock, [base.TrackerCode.REQUEST, key, "", priority],
                                             addr, timeout, f"a free {key!r} device")
        except RemoteError as e:
            raise RemoteError(f"{e} (all {summary['keys'][key]['total']} busy?); retry later or "
                              f"raise --rpc-timeout") from None
    return url, int(port), match


# ---------------------------------------------------------------- sessions

def _connections_to(port: int) -> set[int]:
    """File descriptors of this process's TCP connections to a remote `port`."""
    import psutil
    return {c.fd for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.fd >= 0}


@dataclass
class Session:
    """One RPC session with one device; all remote work goes through `call` (or the helpers
    built on it), which bounds it by `timeout` seconds."""
    endpoint: Endpoint
    server: tuple[str, int]
    name: str
    timeout: float
    remote: object = None                  # tvm.rpc.RPCSession
    alive: bool = True
    modules: dict = field(default_factory=dict)
    _dev: object = None
    _before: set = field(default_factory=set)
    _cut_done: bool = False

    @property
    def label(self) -> str:
        addr = f"{self.server[0]}:{self.server[1]}"
        via = "" if self.endpoint.rpc else f" via {self.endpoint.label}"
        return addr + via if self.name == addr else f"{self.name} ({addr}{via})"

    def _cut(self) -> None:
        """Shut down our connections to the server: TVM's blocked receive then returns."""
        self._cut_done = True
        for fd in _connections_to(self.server[1]) - self._before:
            with contextlib.suppress(OSError):
                s = socket.socket(fileno=os.dup(fd))
                s.shutdown(socket.SHUT_RDWR)
                s.close()

    @contextlib.contextmanager
    def guard(self, what: str, timeout: float | None = None):
        if not self.alive:
            raise RemoteError(f"{self.label}: the session was lost earlier; reconnect")
        t = self.timeout if timeout is None else timeout
        self._cut_done = False
        timer = threading.Timer(t, self._cut)
        timer.daemon = True
        timer.start()
        try:
            yield
        except RemoteError:
            raise
        except Exception as e:               # TVM raises its own error classes
            msg = " ".join(str(e).split())
            if self._cut_done:
                self.alive = False
                raise RemoteError(f"{self.label}: no reply to {what} within {t:.3g} s; the device "
                                  f"or its RPC server hangs: restart it ({SERVER_HINT})") from None
            if _REMOTE_FAILED in msg:
                msg = msg.split(_REMOTE_FAILED, 1)[1].lstrip(": ")
                raise RemoteError(f"{self.label}: {what} failed on the device: {msg[:300]}") from None
            if any(s in msg for s in _LOST):
                self.alive = False
                raise RemoteError(f"{self.label}: connection lost during {what} ({msg[:120]}); is "
                                  f"the RPC server still running? restart it ({SERVER_HINT})") from None
            raise
        finally:
            timer.cancel()

    def call(self, what: str, fn, *args, timeout: float | None = None):
        with self.guard(what, timeout):
            return fn(*args)

    # Helpers over tvm.rpc.RPCSession, each bounded.
    def cpu(self):
        if self._dev is None:
            self._dev = self.call("cpu()", self.remote.cpu)
        return self._dev

    def tensor(self, array, what: str = "copy to device"):
        import tvm
        dev = self.cpu()
        return self.call(what, tvm.runtime.tensor, array, dev,
                         timeout=self.timeout + getattr(array, "nbytes", 0) / 2e6)

    def upload(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Copy a file into the server's work folder; returns its name there. Bounded by the
        timeout plus 2 MB/s of its size (USB and Wi-Fi links are faster than that)."""
        p = Path(path)
        name = name or p.name
        self.call(f"upload {name}", self.remote.upload, str(p), name,
                  timeout=self.timeout + p.stat().st_size / 2e6)
        return name

    def load_module(self, name: str):
        """A library in the work folder, loaded once per session (TVM's loader hands back the
        same handle for a path it has loaded; see remote_kernels.remote_module on names)."""
        if name not in self.modules:
            self.modules[name] = self.call(f"load_module {name}", self.remote.load_module, name)
        return self.modules[name]

    def get_function(self, name: str):
        return self.call(f"get_function {name}", self.remote.get_function, name)

    def workpath(self, name: str) -> str:
        """The server-side path of a file name in its work folder."""
        return self.call("workpath", self.get_function("tvm.rpc.server.workpath"), name)

    def close(self) -> None:
        """Dropping the last reference ends the session; the server's worker then exits."""
        self.remote = None
        self.modules = {}
        self._dev = None
        self.alive = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_session(endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT, name: str | None = None,
                 session_timeout: float = 0) -> Session:
    """Connect to the device: `timeout` bounds the connection and every later call;
    `session_timeout` (seconds, 0: none) asks the server to end the session after that long."""
    from tvm import rpc
    if not timeout > 0:
        raise RemoteError(f"--rpc-timeout {timeout}: must be positive")
    if endpoint.rpc:
        host, port = parse_addr(endpoint.rpc)
        match = ""
    else:
        host, port, match = _request(endpoint.tracker, endpoint.key, timeout)
    s = Session(endpoint, (host, port), name or endpoint.default_name, timeout)
    s._before = _connections_to(port)
    try:
        with s.guard("connect"):
            s.remote = rpc.connect(host, port, match, session_timeout)
    except RemoteError as e:
        if "no reply" in str(e):
            raise
        raise RemoteError(f"{s.label}: cannot connect; start the RPC server there "
                          f"({SERVER_HINT})") from None
    except Exception as e:                   # TVM's "Connect to HOST:PORT failed"
        raise RemoteError(f"{s.label}: cannot connect ({' '.join(str(e).split())[-80:]}); start "
                          f"the RPC server there ({SERVER_HINT})") from None
    s.alive = True
    return s


def devices_cmd(tracker: str | None = None, timeout: float = 10.0) -> dict:
    """`ripple devices`: the device profiles shipped in devices/, and a tracker's keys."""
    from .devices import DEVICES_DIR, list_devices, load_device
    out = {"profiles": []}
    for n in list_devices():
        d = load_device(n)
        out["profiles"].append({"name": d.name, "source": d.source, "seq_MBps": d.storage.seq_MBps,
                                "dram_bytes": d.dram_bytes, "cpu_target": d.cpu_target,
                                "file": str(DEVICES_DIR / f"{n}.json")})
    if tracker:
        out["tracker"] = tracker_summary(tracker, timeout)
    return out


def print_devices(d: dict) -> None:
    print("device profiles (devices/*.json):")
    for p in d["profiles"]:
        print(f"  {p['name']:<22} {p['source']:<18} seq {p['seq_MBps']:7.0f} MB/s  "
              f"DRAM {p['dram_bytes'] / 2**30:5.1f} GiB  {p['cpu_target']}")
    if "tracker" in d:
        t = d["tracker"]
        print(f"tracker {t['tracker']}: " + ("no devices" if not t["keys"] else ""))
        for k, v in sorted(t["keys"].items()):
            addrs = ", ".join(s["addr"] for s in t["servers"] if s["key"] == k)
            print(f"  key {k:<20} {v['total']} device(s), {v['free']} free, {v['pending']} "
                  f"waiting  [{addrs}]")



def add_remote_args(p, what: str):
    """The flags that send a verb to a device over RPC (see docs/android.md)."""
    g = p.add_argument_group("on a device over TVM RPC (docs/android.md)")
    g.add_argument("--rpc", metavar="HOST:PORT", help=f"run {what} on the device whose RPC server listens there")
    g.add_argument("--tracker", metavar="HOST:PORT", help=f"run {what} on a free device of --key from this RPC tracker")
    g.add_argument("--key", help="the device's key at the tracker (`ripple devices --tracker HOST:PORT` lists them)")
    g.add_argument("--target", default="android-arm64",
                   help="compile target of the device's CPU (default android-arm64; host for a server on this machine)")
    g.add_argument("--rpc-timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds one remote call may take before the device counts as lost (default {DEFAULT_TIMEOUT:g})")
    g.add_argument("--device-name", help="the name results carry (default: the key, or HOST:PORT)")
    g.add_argument("--compare-local", action="store_true",
                   help="with a server on this machine (a stand-in phone): also do the same work here, "
                        "alternately, and report remote/local")
    return g


def remote_endpoint(args) -> Endpoint | None:
    """The device the parsed flags name, or None to run here."""
    return endpoint_from_args(args.rpc, args.tracker, args.key)
