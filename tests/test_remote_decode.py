"""`ripple bench e2e --rpc`: an APP decoded on a device over TVM RPC (the loopback stand-in
server here), each call timed there by ripple.rt.step; the same ids as this machine's
ripple-run and as this process; a server killed mid-run keeps the tokens done."""
import json
import time

import numpy as np
import pytest
from conftest import profile_random_llama
from rpc_stand_in import start_server, wait_listening

from ripple.android_host.app_build import build_app
from ripple.android_host.cli import main
from ripple.android_host.interface import pack_cmd
from ripple.android_host.remote_decode import bench_e2e_remote_cmd
from ripple.android_host.rpc import Endpoint
from ripple.runtime_py.app_session import AppSession
from ripple.tuning.profile import save_profile

PROMPT = [2, 17, 99, 5, 63]


@pytest.fixture(scope="module")
def servers():
    procs = {"phone": start_server(), "doomed": start_server()}
    try:
        for p in procs.values():
            wait_listening(p)
        yield procs
    finally:
        for p in procs.values():
            p.kill()


@pytest.fixture(scope="module")
def app(random_opt_dir, tmp_path_factory):
    """A random OPT, fp16 bundles, every layer's bundles fetched by the runtime (sets all)."""
    tmp = tmp_path_factory.mktemp("rpc-app")
    _, prof = profile_random_llama(random_opt_dir, 6, sparsity=0.5, grid=(0.0, 0.5))
    save_profile(prof, tmp / "profile.npz")
    pack_cmd(str(random_opt_dir), str(tmp / "layout"), str(tmp / "profile.npz"), dtype="fp16")
    build_app(str(tmp / "layout"), str(tmp / "app"), model=str(random_opt_dir), kv_dtype="float16")
    return tmp / "app"


def test_the_device_decodes_the_ids_this_machine_decodes(servers, app, tmp_path):
    out = tmp_path / "e2e-rpc.json"
    r = bench_e2e_remote_cmd(Endpoint(rpc=servers["phone"].addr), str(app), json_out=str(out),
                             prompt_ids=PROMPT, tokens=12, compare_local=True, threads=2, timeout=30)
    with AppSession(app) as s:
        here = s.generate(PROMPT, 13).ids
    saved = json.loads(out.read_text())
    assert saved["complete"], saved["error"]
    assert saved["tokens_done"] == len(saved["remote"]["token_ms"]) == 12
    assert saved["remote"]["ids"] == saved["local"]["ids"] == here and saved["ids_identical"]
    for side in ("remote", "local"):
        v = saved[side]
        assert v["per_token_ms_median"] > 0 and v["bytes_read_per_token"] > 0
        assert v["dram_bytes"]["total"] == sum(x for k, x in v["dram_bytes"].items() if k != "total")
    # The device read what this machine reads: the same runtime, plan and file.
    assert saved["remote"]["bytes_read_per_token"] == saved["local"]["bytes_read_per_token"]
    assert saved["remote_over_local"] == pytest.approx(
        saved["remote"]["per_token_ms_median"] / saved["local"]["per_token_ms_median"], abs=1e-3)
    assert out.with_suffix(".png").is_file() and r["o_direct"] is not None


def test_killing_the_server_mid_decode_keeps_the_tokens_so_far(servers, app, tmp_path):
    server, out, killed = servers["doomed"], tmp_path / "cut.json", []

    def kill_at_fourth(k):
        if k == 4:
            killed.append(time.monotonic())
            server.kill()
    r = bench_e2e_remote_cmd(Endpoint(rpc=server.addr), str(app), json_out=str(out), prompt_ids=PROMPT,
                             tokens=12, timeout=10, on_token=kill_at_fourth)
    assert killed and time.monotonic() - killed[0] < 15
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(r)) and saved["complete"] is False
    assert saved["tokens_done"] == 3 and len(saved["remote"]["ids"]) == 4
    assert server.addr in saved["error"] and "local" not in saved


def test_the_cli_without_a_server_is_one_line_and_writes_nothing(app, tmp_path, capsys):
    out = tmp_path / "none.json"
    from rpc_stand_in import free_port
    assert main(["bench", "e2e", "--rpc", f"127.0.0.1:{free_port()}", "--app", str(app), "--json", str(out),
                 "--rpc-timeout", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot connect" in err[0] and not out.exists()


def test_app_without_rpc_is_refused_in_one_line(app, tmp_path, capsys):
    assert main(["bench", "e2e", "--app", str(app), "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rpc" in err[0]


def test_step_refuses_a_function_that_is_not_the_vm_module(app):
    import tvm
    with AppSession(app):
        step = tvm.get_global_func("ripple.rt.step")
        out = tvm.runtime.tensor(np.zeros(18))
        with pytest.raises(Exception, match="Relax VM module"):
            step(1, "decode", tvm.runtime.tensor(np.zeros(1, np.int32)), out, 0, 0, out)
