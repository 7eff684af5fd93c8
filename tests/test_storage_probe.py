import os
import shutil

import numpy as np

from ripple.android_host import cli, probe
from ripple.android_host.devices import load_device
from ripple.android_host.probe import QUICK, fio_iomem, probe_cmd


def test_quick_probe_writes_a_device_profile_with_a_full_table(tmp_path):
    out = tmp_path / "here.json"
    d = probe_cmd(str(tmp_path), str(out), name="here", quick=True)
    dev = load_device(out)
    assert dev.source == "measured" and dev.name == "here"
    st = dev.storage
    assert st.latency_us.shape == (len(QUICK["sizes"]), len(QUICK["qds"]))
    assert (st.latency_us > 0).all() and np.isfinite(st.latency_us).all() and st.seq_MBps > 0
    # the flash runtime's own reader by default; the Python reader on request
    assert d["details"]["engine"] == "native"
    assert probe_cmd(str(tmp_path), None, quick=True, engine="threads", with_fio=False)["details"]["engine"] == "threads"


def test_quick_probe_compares_itself_with_fio_in_the_same_run(tmp_path):
    d = probe_cmd(str(tmp_path), None, quick=True)
    checks = d["details"]["fio"]
    if shutil.which("fio") is None:
        assert "fio not installed" in d["details"]["fio_note"] and not checks
    else:
        assert {(c["size"], c["qd"]) for c in checks} >= {(4096, 8), (1 << 20, 8)}
        for c in checks:
            assert c["fio_MBps"] > 0 and abs(c["ratio"] - c["probe_MBps"] / c["fio_MBps"]) < 0.01
            assert c["fio_iomem"] in ("shmhuge", "malloc")
            assert len(c["round_ratios"]) == QUICK["rounds"] and min(c["round_ratios"]) > 0
        assert d["details"]["fio_seq_MBps"] > 0
        # fio on 4 KiB pages splits large requests: never left unsaid
        small = [c for c in checks if c["fio_iomem"] == "malloc" and c["size"] > 64 << 10]
        assert bool(small) == ("4 KiB-page buffers" in d["details"]["fio_note"])


def test_fio_gets_huge_page_buffers_only_when_enough_are_free(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("HugePages_Free:       3\nHugepagesize:       2048 kB\n")
    assert fio_iomem(1 << 20, 4, meminfo) == "shmhuge"       # 2 pages of buffers + 1 of slack
    assert fio_iomem(1 << 20, 8, meminfo) == "malloc"
    meminfo.write_text("MemTotal: 1 kB\n")              # no hugetlb support at all
    assert fio_iomem(4096, 1, meminfo) == "malloc"


def test_probe_of_a_missing_folder_is_one_line(tmp_path, capsys):
    code = cli.main(["probe", "storage", "--path", str(tmp_path / "nope"), "--quick", "--no-fio"])
    err = capsys.readouterr().err
    assert code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1


def test_probe_out_into_a_missing_folder_writes_nothing(tmp_path, capsys):
    code = cli.main(["probe", "storage", "--path", str(tmp_path), "--quick", "--no-fio",
                     "--out", str(tmp_path / "no" / "d.json")])
    assert code == 2 and not (tmp_path / "no").exists()
    assert not list(tmp_path.glob("*.json"))


def test_fio_refused_huge_pages_runs_on_small_ones_and_says_so(tmp_path, monkeypatch):
    # A stand-in fio that refuses hugetlb shm, as for a user outside vm.hugetlb_shm_group.
    fake = tmp_path / "fio"
    fake.write_text('#!/bin/sh\ncase "$*" in *--iomem=shmhuge*) echo "fio: shmget failed" >&2; exit 1;; esac\n'
                    'echo \'{"jobs": [{"job_runtime": 300, "read": {"bw_bytes": 5000000}}]}\'\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(probe, "fio_iomem", lambda size, qd: "shmhuge")
    data = tmp_path / "f.bin"
    data.write_bytes(b"\0" * 8192)
    assert probe._fio(data, 4096, 1, 0.3) == (5.0, "malloc")
