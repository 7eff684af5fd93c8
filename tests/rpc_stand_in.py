"""The stand-in phone of the RPC tests: TVM's own tracker and RPC server processes
(`python -m tvm.exec.rpc_tracker`, `python -m tvm.exec.rpc_server`) on 127.0.0.1, on free
ports, each in its own process group so that a test can kill a server with its session
workers, and teardown leaves nothing behind. Every wait is bounded."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

START_S = 60.0     # python + tvm import on a busy 2-core machine takes a few seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    popen: subprocess.Popen
    port: int

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, sig) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _spawn(args: list[str], port: int) -> Proc:
    p = subprocess.Popen([sys.executable, "-m", *args], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Proc(p, port)


def wait_listening(proc: Proc, timeout: float = START_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.popen.args} exited with {proc.popen.returncode}")
        try:
            socket.create_connection(("127.0.0.1", proc.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {proc.addr} after {timeout} s")


def start_tracker() -> Proc:
    port = free_port()
    return _spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                   "--port-end", str(port + 1)], port)


def start_server(tracker: Proc | None = None, key: str = "", load_library: str | None = None) -> Proc:
    """A server (on its own when tracker is None). Start a tracker's servers once it listens:
    a server that finds no tracker retries only every 5 s."""
    port = free_port()
    args = ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    if tracker is not None:
        args += ["--tracker", tracker.addr, "--key", key]
    if load_library:
        args += ["--load-library", load_library]
    return _spawn(args, port)


def wait_key(tracker: Proc, key: str, free: int = 1, timeout: float = START_S) -> None:
    from ripple.android_host.rpc import RemoteError, tracker_summary
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if tracker_summary(tracker.addr, 2).get("keys", {}).get(key, {}).get("free", 0) >= free:
                return
        except RemoteError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no free {key!r} server at tracker {tracker.addr} after {timeout} s")
