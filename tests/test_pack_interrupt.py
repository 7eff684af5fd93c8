"""A pack that dies (SIGKILL mid-write, a full disk, a file size limit) leaves nothing under
the final names but what was there before, says so in one line, and the next pack works."""
import errno
import os
import resource
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from ripple.layout import (BundleSpec, LayoutError, LayoutWriteError, encode_bundles, open_layout,
                           verify_layout, write_layout)

D, N = 64, 256
SPEC = BundleSpec("swiglu", D, "fp16", False)
FINAL = {"model.rflash", "manifest.json"}

# Packs N x 384-byte bundles per layer; stops after `pause_at` layers (if given) and waits,
# so the parent can kill it with the temporary file half written.
WRITER = """
import sys, time
import numpy as np
from ripple.layout import BundleSpec, encode_bundles, write_layout
spec = BundleSpec("swiglu", {D}, "fp16", False)
n_layers, pause_at = int(sys.argv[2]), int(sys.argv[3])
def layers():
    rng = np.random.default_rng(0)
    for l in range(n_layers):
        if l == pause_at:
            print("paused", flush=True)
            time.sleep(600)
        yield encode_bundles(spec, *(rng.standard_normal(({N}, {D}), dtype=np.float32) for _ in range(3))), \\
            rng.permutation({N})
write_layout(sys.argv[1], spec, layers(), {{}}, "/ckpt", "cd" * 16)
print("done", flush=True)
""".format(D=D, N=N)


def _layers(n_layers=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(encode_bundles(SPEC, *(rng.standard_normal((N, D), dtype=np.float32) for _ in range(3))),
             rng.permutation(N)) for _ in range(n_layers)]


def _pack(out, n_layers=3, seed=0):
    return write_layout(out, SPEC, _layers(n_layers, seed), {"seed": seed}, "/ckpt", "ab" * 16)


def _writer(out, n_layers, pause_at=-1):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(n_layers), str(pause_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _kill_when_paused(proc):
    assert proc.stdout.readline().strip() == "paused"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_pack_killed_mid_write_leaves_no_final_file_and_the_next_pack_succeeds(tmp_path):
    proc = _writer(tmp_path, 6, pause_at=3)
    _kill_when_paused(proc)
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & FINAL
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".model.rflash.")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0      # really killed mid-write
    with pytest.raises(LayoutError, match="ripple pack"):
        open_layout(tmp_path)
    _pack(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == FINAL     # the dead pack's temp is gone too
    verify_layout(open_layout(tmp_path))


def test_repack_killed_mid_write_keeps_the_previous_layout(tmp_path):
    _pack(tmp_path, seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _kill_when_paused(_writer(tmp_path, 6, pause_at=2))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in FINAL} == before
    lay = open_layout(tmp_path, verify=True)
    assert lay.manifest.meta == {"seed": 1}


def test_a_live_packs_temporary_files_are_not_removed_by_another_pack(tmp_path):
    proc = _writer(tmp_path / "a", 6, pause_at=2)
    try:
        assert proc.stdout.readline().strip() == "paused"
        _pack(tmp_path / "a")
        assert any(p.name.startswith(".model.rflash.") for p in (tmp_path / "a").iterdir())
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_pack_killed_at_random_moments_is_never_half_visible(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        out = tmp_path / str(i)
        proc = _writer(out, 40)                # ~4 MB: a second or so of writing and fsync
        time.sleep(rng.uniform(0.3, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        final = {p.name for p in out.iterdir()} & FINAL if out.exists() else set()
        if final == FINAL:
            open_layout(out, verify=True)       # it finished: whole and valid
        elif final:
            # Killed between the two renames: the model file without its manifest.
            with pytest.raises(LayoutError, match="ripple pack"):
                open_layout(out)
        _pack(out)
        assert {p.name for p in out.iterdir()} == FINAL


# --- disk full -------------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (root only; a pack of 3 layers needs ~300 KiB)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", f"ripple-test-{uuid.uuid4().hex[:6]}",
                        str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the RLIMIT_FSIZE test covers it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_gives_a_clear_error_and_leaves_nothing(small_tmpfs):
    out = small_tmpfs / "layout"
    with pytest.raises(LayoutWriteError, match=r"No space left on device.*free space.*nothing was left"):
        _pack(out)
    assert list(out.iterdir()) == []


def test_disk_full_on_repack_keeps_the_previous_layout(small_tmpfs):
    out = small_tmpfs / "layout"
    _pack(out, n_layers=1, seed=1)                          # ~100 KiB fits, 3 layers more do not
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LayoutWriteError, match="No space left"):
        _pack(out, n_layers=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    open_layout(out, verify=True)


def test_disk_full_while_writing_the_manifest_leaves_nothing(tmp_path, monkeypatch):
    import ripple.layout.pack as pack
    real = pack._create

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pack, "_create", lambda p: Full(real(p)) if "manifest" in p.name else real(p))
    with pytest.raises(LayoutWriteError, match="No space left"):
        _pack(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # write() then fails with EFBIG


def test_cli_pack_past_a_file_size_limit_prints_one_line_and_leaves_nothing(tmp_path, random_llama_dir):
    out = tmp_path / "layout"
    r = subprocess.run([sys.executable, "-m", "ripple.android_host.cli", "pack", "--model", str(random_llama_dir),
                        "--out", str(out)], capture_output=True, text=True, preexec_fn=_limit_file_size,
                       timeout=600)
    lines = [l for l in r.stderr.splitlines() if l.startswith("ripple:") or "Traceback" in l]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "File too large" in lines[0] and str(out) in lines[0]
    assert list(out.iterdir()) == []
