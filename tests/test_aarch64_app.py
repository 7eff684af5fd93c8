"""An APP built for linux-arm64 runs: its aarch64 kernels, flash runtime and runner, on the TVM
runtime cross-built from the wheel's sources (compile.tvm_runtime_build), execute under
qemu-aarch64 and decode the ids the host APP decodes from the same layout and prompt.

The first run builds the aarch64 TVM runtime (minutes, at nice 19) and needs the seven headers
the wheel omits (compile.tvm_runtime_build: RIPPLE_TVM_SOURCE or build/tvm-source); it is cached
under build/native/linux-arm64/, so later runs only compile the APP and decode."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import profile_random_llama
from ripple.android_host.app_build import build_app
from ripple.android_host.interface import pack_cmd
from ripple.compile.elf import read_elf
from ripple.compile.errors import ToolchainError
from ripple.tuning.profile import save_profile

SYSROOT = Path("/usr/aarch64-linux-gnu")
PROMPT = [2, 17, 59]      # in both vocabularies (the GGUF has 96 ids)
TOKENS = 8


def _missing() -> str | None:
    for tool, package in (("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
                          ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
                          ("qemu-aarch64", "qemu-user")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install {package})"
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        return f"{SYSROOT}: no aarch64 glibc (apt-get install libc6-dev-arm64-cross)"
    from ripple.compile.tvm_runtime_build import tvm_source
    try:
        tvm_source()
    except ToolchainError as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(scope="module", params=["opt", "llama-gguf"])
def apps(request, random_opt_dir, tmp_path_factory):
    """One layout compiled for the host and for linux-arm64: a random OPT (ReLU, fp16 bundles,
    sparse layers), or a small random Llama GGUF (SwiGLU, Q4_1 blocks, every layer read whole
    from its whole copy)."""
    tmp = tmp_path_factory.mktemp(f"arm-app-{request.param}")
    if request.param == "opt":
        _, prof = profile_random_llama(random_opt_dir, 6, sparsity=0.5, grid=(0.0, 0.5))
        save_profile(prof, tmp / "profile.npz")
        pack_cmd(str(random_opt_dir), str(tmp / "layout"), str(tmp / "profile.npz"), dtype="fp16")
        model = str(random_opt_dir)
    else:
        from gguf_cases import write_llama_gguf
        model = str(write_llama_gguf(tmp / "tiny.gguf"))
        pack_cmd(model, str(tmp / "layout"), dtype="q4", whole_copy=True)
    out = {}
    for target in ("host", "linux-arm64"):
        out[target] = tmp / target
        build_app(str(tmp / "layout"), str(out[target]), model=model, target=target)
    return out


def _run(prefix: list[str], app: Path, out: Path) -> tuple[dict, np.ndarray]:
    """ripple-run's JSON and its logits, one row per decoded token."""
    logits = out.with_suffix(".logits")
    r = subprocess.run([*prefix, str(app / "ripple-run"), "--app", str(app),
                        "--prompt-ids", ",".join(map(str, PROMPT)), "--tokens", str(TOKENS),
                        "--json", str(out), "--dump-logits", str(logits)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads(out.read_text())
    return run, np.fromfile(logits, np.float32).reshape(len(run["ids"]), -1)


def test_the_linux_arm64_app_holds_aarch64_code_only(apps):
    app = apps["linux-arm64"]
    assert json.loads((app / "app.json").read_text())["target"] == "linux-arm64"
    for f in ("ripple-run", "model.so", "libripple_runtime.so", "libtvm_runtime.so", "libtvm_ffi.so"):
        assert read_elf(app / f).machine == "aarch64", f


def test_the_aarch64_runner_decodes_under_qemu_what_the_host_runner_decodes(apps, tmp_path):
    host, host_logits = _run([], apps["host"], tmp_path / "host.json")
    arm, arm_logits = _run(["qemu-aarch64", "-L", str(SYSROOT)], apps["linux-arm64"], tmp_path / "arm.json")
    assert arm["prompt_ids"] == host["prompt_ids"] == PROMPT
    assert len(arm["ids"]) == TOKENS and arm["ids"] == host["ids"]
    print(f"ids host {host['ids']} qemu {arm['ids']}; ms/token host "
          f"{sum(host['token_ms']) / len(host['token_ms']):.2f} qemu {sum(arm['token_ms']) / len(arm['token_ms']):.2f}")
    info = json.loads((apps["host"] / "app.json").read_text())
    if not info["layers"]["whole"]:
        assert arm["bytes_read"] == host["bytes_read"]
    else:
        # Whole layers are read ahead, and a read counts for the token in which it finishes:
        # qemu's slower compute moves reads across token boundaries. In all, they differ by at
        # most the layers in flight at the end.
        from ripple.compile.runtime_config import read_runtime_config
        layer = read_runtime_config(apps["host"] / "runtime.bin").whole_layer_bytes
        assert abs(sum(arm["bytes_read"]) - sum(host["bytes_read"])) <= info["io"]["read_ahead"] * layer
    # Not bit-identical: LLVM fuses and vectorizes differently for NEON than for AVX2.
    np.testing.assert_allclose(arm_logits, host_logits, rtol=0, atol=1e-4)
    print(f"max |logit difference| {np.abs(arm_logits - host_logits).max():.2e}")
