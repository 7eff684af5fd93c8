"""Phones over TVM RPC, with a real tracker and real RPC servers on 127.0.0.1 as the device
farm (tests/rpc_stand_in.py): sessions and their failures (one clear line, bounded time);
remote kernel timing, the remote storage probe and a remote I/O replay, each agreeing with the
same work done here (same bytes; times within noise, measured alternately); and a server killed
mid-run, whose results so far are kept, marked incomplete."""
import json
import signal
import time

import numpy as np
import pytest
import tvm
from rpc_stand_in import start_server, start_tracker, wait_key, wait_listening

from ripple.android_host import cli
from ripple.android_host.rpc import Endpoint, RemoteError, open_session

KEY = "stand-in-phone"


@pytest.fixture(scope="module")
def farm():
    """All started at once (each takes seconds to import TVM); the tracker's server finds the
    tracker up by the time it looks for it."""
    from ripple.compile.native_reader import build_reader
    tracker = start_tracker()
    procs = {"tracker": tracker, "phone": start_server(tracker, KEY),
             "direct": start_server(),        # on its own: a tracker's server serves only via it
             "hangs": start_server(), "doomed-kernels": start_server(), "doomed-replay": start_server(),
             "preloaded": start_server(load_library=str(build_reader("host").resolve()))}
    try:
        for p in procs.values():
            wait_listening(p)
        wait_key(tracker, KEY)
        yield procs
    finally:
        for p in procs.values():
            p.kill()


def test_devices_lists_the_profiles_and_the_trackers_keys(farm, tmp_path, capsys):
    out = tmp_path / "devices.json"
    assert cli.main(["devices", "--tracker", farm["tracker"].addr, "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["tracker"]["keys"][KEY]["total"] == 1
    assert {p["name"] for p in d["profiles"]} >= {"pixel8-ufs31"}
    assert KEY in capsys.readouterr().out


def test_a_tracker_session_and_a_direct_one_both_reach_a_device(farm):
    with open_session(Endpoint(tracker=farm["tracker"].addr, key=KEY), timeout=20) as s:
        assert s.name == KEY and str(s.cpu()).startswith("remote")
    with open_session(Endpoint(rpc=farm["direct"].addr), timeout=20, name="bench-phone") as s:
        assert s.name == "bench-phone" and str(s.cpu()).startswith("remote")


@pytest.mark.parametrize("endpoint, says", [
    (lambda f, port: Endpoint(rpc=f"127.0.0.1:{port}"), "cannot connect"),
    (lambda f, port: Endpoint(tracker=f"127.0.0.1:{port}", key=KEY), "cannot connect"),
    (lambda f, port: Endpoint(tracker=f["tracker"].addr, key="no-such-phone"), "no device with key 'no-such-phone'"),
])
def test_an_unreachable_device_fails_in_one_line_at_once(farm, endpoint, says):
    from rpc_stand_in import free_port
    port = free_port()
    ep = endpoint(farm, port)
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=says) as e:
        open_session(ep, timeout=5)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and ("127.0.0.1:" in msg)


def test_the_cli_reports_a_missing_server_as_one_line_and_writes_nothing(tmp_path, capsys):
    from rpc_stand_in import free_port
    out = tmp_path / "k.json"
    code = cli.main(["bench", "kernels", "--rpc", f"127.0.0.1:{free_port()}", "--target", "host",
                     "--json", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.startswith("ripple: error: ") and "cannot connect" in err and err.count("\n") == 0


def test_a_hung_server_gives_an_error_within_the_timeout(farm):
    server = farm["hangs"]
    with open_session(Endpoint(rpc=server.addr), timeout=2) as s:
        s.cpu()
        server.signal(signal.SIGSTOP)          # alive, but answers nothing
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"no reply to .* within 2 s") as e:
            s.tensor(np.zeros(4))
        assert time.monotonic() - t0 < 5
        assert server.addr in str(e.value)
        with pytest.raises(RemoteError, match="lost earlier"):
            s.tensor(np.zeros(4))


def test_a_server_started_with_the_reader_as_load_library_has_its_globals(farm, tmp_path):
    from ripple.android_host.remote_reader import globals_on
    from ripple.compile.native_reader import GLOBALS
    data = np.random.default_rng(3).integers(0, 256, 1 << 16, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(data.tobytes())
    with open_session(Endpoint(rpc=farm["preloaded"].addr), timeout=20) as s:
        assert globals_on(s) == list(GLOBALS)
        out = s.tensor(np.zeros(8192, np.uint8))
        read = s.get_function("ripple.flash.read_extents")
        s.call("read", read, str(tmp_path / "f.bin"), s.tensor(np.array([[4096, 8192]], np.int64)), out, 2)
        assert np.array_equal(out.numpy(), data[4096:12288])


# ---------------------------------------------------------------- remote work vs local work

@pytest.fixture(scope="module")
def phone(farm):
    with open_session(Endpoint(tracker=farm["tracker"].addr, key=KEY), timeout=30) as s:
        yield s


def _ratio_alternating(local, remote, rounds: int = 5) -> float:
    """median(remote) / median(local), measured alternately so both see the same load."""
    lo, re_ = [], []
    for _ in range(rounds):
        lo.append(local())
        re_.append(remote())
    return float(np.median(re_) / np.median(lo))


def test_remote_kernel_timing_agrees_with_local(phone):
    from ripple.android_host.remote_kernels import remote_module, remote_time
    from ripple.compile.build import build_sparse
    from ripple.compile.timing import time_call
    from ripple.layout.bundle import BundleSpec
    from ripple.tuning.kernels import kernel_view, random_bundles

    spec = BundleSpec("swiglu", 576, "fp16")
    lib = build_sparse(spec, "host")
    raw = random_bundles(spec, 1536)[np.sort(np.random.default_rng(0).choice(1536, 307, replace=False))]
    x = np.random.default_rng(1).standard_normal(576).astype(np.float32)
    host = [tvm.runtime.tensor(a) for a in (x, kernel_view(spec, raw), np.zeros(576, np.float32))]
    dev = [phone.tensor(a) for a in (x, kernel_view(spec, raw), np.zeros(576, np.float32))]
    rmod = remote_module(phone, lib, "host", "sparse.so")
    ratio = _ratio_alternating(lambda: time_call(lib, host, 10), lambda: remote_time(phone, rmod, dev, 10))
    assert np.array_equal(host[2].numpy(), dev[2].numpy())          # same bytes out
    assert 0.5 < ratio < 2.0, ratio


def test_remote_kernel_benchmark_writes_the_local_benchmarks_rows(phone, random_llama_dir):
    from ripple.android_host.remote_kernels import bench_kernels_remote
    res = bench_kernels_remote(phone, "host", str(random_llama_dir), fractions=(0.5,), repeat=3,
                               progress=False, stream_mib=16)
    assert res["complete"] and res["device"] == KEY and res["error"] is None
    assert {r["variant"] for r in res["rows"]} >= {"tvm-sparse-fp16-default", "tvm-sparse-int8-default",
                                                   "tvm-dense-fp16"}
    assert all(r["max_rel_err"] < 1e-2 and r["us"] > 0 and r["roofline_ratio"] > 0 for r in res["rows"])
    assert res["dram_read_GBps"] > 0 and res["ratio_20pct_vs_dense"] is None   # no 20% point asked


def test_remote_probe_agrees_with_the_same_probe_run_here(phone, tmp_path):
    from ripple.android_host.remote_reader import open_reader
    here, there = open_reader(None, "host"), open_reader(phone, "host")
    lp, rp = str(tmp_path / "probe.bin"), there.device_path("probe.bin")
    here.prepare(lp, 64 << 20)
    there.prepare(rp, 64 << 20)
    ratios = [_ratio_alternating(lambda: here.probe_cell(lp, size, qd, 0.1),
                                 lambda: there.probe_cell(rp, size, qd, 0.1))
              for size, qd in ((4096, 1), (4096, 8), (1 << 20, 4))]
    # The median cell: this VM's disk now and then slows several-fold for a second or two
    # (seen: one cell at 6x while the other two agreed within 1.3x), which says nothing of
    # whether the remote probe measures what the local one does.
    # Loose, as for the replay below: it catches the wrong thing timed, not disk weather.
    assert 1 / 3 < float(np.median(ratios)) < 3.0, ratios


def test_the_remote_probe_writes_a_device_profile(farm, tmp_path, capsys):
    from ripple.android_host.devices import load_device
    out = tmp_path / "phone.json"
    assert cli.main(["probe", "storage", "--rpc", farm["direct"].addr, "--device-name", "bench-phone",
                     "--target", "host", "--quick", "--out", str(out)]) == 0
    dev = load_device(out)
    assert dev.name == "bench-phone" and dev.source == "measured" and dev.storage.latency_us.shape == (3, 2)
    assert "native" in dev.details["engine"] and "bench-phone" in capsys.readouterr().out


def tiny_workload(T: int = 40):
    """3 layers x 512 neurons of d=64 SwiGLU bundles, co-firing groups plus noise."""
    from ripple.android_host.bench_io import Workload
    from ripple.layout.bundle import BundleSpec
    L, n = 3, 512
    rng = np.random.default_rng(0)
    spec = BundleSpec("swiglu", 64, "fp16", False)
    base = rng.random((L, 1, n)) < 0.3
    calib = (rng.random((L, 64, n)) < 0.05) | base
    held = (rng.random((L, T, n)) < 0.05) | base

    def bundles(l):
        return np.random.default_rng([7, l]).integers(0, 256, (n, spec.bundle_bytes), dtype=np.uint8)
    return Workload("tiny", "tiny", 0.7, calib, held, spec, bundles, "synthetic", "tiny-rpc-test", "llama")


def test_remote_replay_reads_the_same_bytes_in_the_same_time_as_here(phone, tmp_path):
    from ripple.android_host.remote_reader import open_reader
    from ripple.android_host.remote_replay import replay_on_device
    r = replay_on_device(open_reader(phone, "host"), tiny_workload(), ["dense", "llmflash"], tokens=24,
                         warmup=8, queue_depth=8, cache_dir=tmp_path, compare_local=True, progress=False,
                         quick_probe=True)
    assert r["complete"] and r["tokens_done"] == 24 and r["device"] == KEY
    assert all(c["match"] and c["bytes"] > 0 for c in r["bytes_check"].values()), r["bytes_check"]
    for name, st in r["strategies"].items():
        # Loose: it is there to catch the wrong thing timed (reads through a page cache are
        # several times faster, an RPC round trip per read slower). Runs on one machine gave
        # 0.98 to 1.09; a CI machine once gave 2.34 for dense (3 reads of 196 KiB a token, read
        # locally in 0.5 ms), when the local Python reader still read the native reader's file.
        assert 1 / 3 < st["remote_over_local_native_median"] < 3.0, (name, st)
        assert len(st["per_token_ms"]) == 24 and st["bytes_read_per_token"] > 0
    assert not list(tmp_path.rglob("*.python-reader"))     # the Python reader's copies are gone


def test_the_exported_graph_runs_on_the_device_with_its_native_flash_hook(phone, tmp_path):
    """compile.graph's per-layer graph calls ripple.flash.read; on the device that is the native
    reader's, bound to the uploaded flash file: same y, bit for bit, as here with the Python hook."""
    from tvm import relax

    from ripple.android_host.remote_kernels import remote_module
    from ripple.android_host.remote_reader import open_reader
    from ripple.compile.build import build_graph
    from ripple.layout import BundleSpec
    from ripple.layout.pack import write_layout
    from ripple.layout.reader import open_layout
    from ripple.runtime_py.engine import IOStats
    from ripple.runtime_py.reader import FlashReader
    from ripple.runtime_py.tvm_ffn import HOOK

    spec, n, rng = BundleSpec("swiglu", 64, "fp16"), 300, np.random.default_rng(4)
    write_layout(tmp_path, spec, [((rng.standard_normal((n, 192)) * 0.1).astype(np.float16).view(np.uint8),
                                   rng.permutation(n)) for _ in range(2)], {}, "random", "graph-rpc-test")
    lay = open_layout(tmp_path)
    graph = build_graph(spec, "host")
    x = rng.standard_normal(64).astype(np.float32)
    ids = lay.perm[1][np.sort(lay.slot_of[1][rng.choice(n, 80, replace=False)])]
    with FlashReader(str(lay.path), 8) as fr:
        HOOK.bind(lay, fr, IOStats())
        here = relax.VirtualMachine(graph, tvm.cpu())["main"](1, tvm.runtime.tensor(ids),
                                                              tvm.runtime.tensor(x)).numpy()
    reader = open_reader(phone, "host")
    reader.bind(reader.put(str(lay.path), "graph.rflash"), lay, 8)
    vm = phone.call("create VM", relax.VirtualMachine, remote_module(phone, graph, "host", "graph.so"),
                    phone.cpu())
    there = phone.call("main", vm["main"], 1, phone.tensor(ids), phone.tensor(x))
    assert np.array_equal(phone.call("download y", there.numpy), here)
    assert reader.hook_stats()["calls"] == 1


# ---------------------------------------------------------------- the server dies mid-run

def test_killing_the_server_mid_kernel_benchmark_keeps_the_rows_so_far(farm, tmp_path, random_llama_dir):
    from ripple.android_host.remote_kernels import bench_kernels_remote_cmd
    server, out, killed = farm["doomed-kernels"], tmp_path / "k.json", []

    def kill_after_two(row):
        if len(killed) == 0 and row["fraction"] == 0.5:
            killed.append(time.monotonic())
            server.kill()
    res = bench_kernels_remote_cmd(Endpoint(rpc=server.addr), "host", str(out), str(random_llama_dir),
                                   fractions=(0.25, 0.5, 1.0), repeat=3, timeout=10, stream_mib=8,
                                   on_row=kill_after_two)
    assert killed and time.monotonic() - killed[0] < 10
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and len(saved["rows"]) == 2
    assert server.addr in saved["error"] and "connection lost" in saved["error"]


def test_killing_the_server_mid_replay_keeps_the_tokens_so_far(farm, tmp_path):
    from ripple.android_host.remote_replay import bench_io_remote_cmd
    server, out, killed = farm["doomed-replay"], tmp_path / "io.json", []

    def kill_at_third(t):
        if t == 2:
            killed.append(time.monotonic())
            server.kill()
    bench_io_remote_cmd(Endpoint(rpc=server.addr), "host", str(out), workload=tiny_workload(),
                        tokens=20, warmup=4, queue_depth=8, strategies=["dense", "llmflash"],
                        device_profile="pixel8-ufs31", cache_dir=str(tmp_path), timeout=10,
                        on_token=kill_at_third)
    assert killed and time.monotonic() - killed[0] < 10
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and saved["tokens_done"] == 3
    assert all(len(s["per_token_ms"]) == 3 for s in saved["strategies"].values())
    assert server.addr in saved["error"] and out.with_suffix(".png").is_file()
