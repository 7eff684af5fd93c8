"""The android-arm64 build: an aarch64 shared object that loads without glibc (Android has
bionic), linked with Debian's cross gcc, or with the NDK when ANDROID_NDK_HOME is set."""
import os
import re
import shutil
import stat
import subprocess

import pytest

from ripple.compile.build import build_graph
from ripple.compile.elf import read_elf
from ripple.compile.errors import ToolchainError
from ripple.compile.targets import CROSS_GCC, NDK_CLANG, export_library, linker_for
from ripple.layout import BundleSpec

SPEC = BundleSpec("swiglu", 64, "int8")
# What bionic's libc/libm export and what the TVM runtime an app links provides.
ALLOWED_UNDEFINED = re.compile(r"^(memcpy|memset|memmove|expf|TVMFFI\w+|TVMBackend\w+)$")


@pytest.fixture(scope="module")
def android_so(tmp_path_factory):
    path = tmp_path_factory.mktemp("a64") / "ffn_kernels.so"
    export_library(build_graph(SPEC, "android-arm64"), path, "android-arm64")
    return path


def test_android_kernels_are_an_aarch64_shared_object(android_so):
    out = subprocess.run(["file", "-b", str(android_so)], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ELF 64-bit LSB shared object, ARM aarch64"), out
    assert read_elf(android_so).machine == "aarch64"


def test_android_kernels_need_no_glibc(android_so):
    dyn = subprocess.run(["readelf", "-d", "-W", str(android_so)], capture_output=True, text=True,
                         check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)
    assert "libc.so.6" not in dyn and set(needed) <= {"libc.so", "libm.so"}, needed
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", str(android_so)], capture_output=True,
                          text=True, check=True).stdout
    undefined = [ln.split()[-1] for ln in syms.splitlines()
                 if " UND " in ln and ln.split()[-1] != "UND" and "GLOBAL" in ln]
    assert undefined and all(ALLOWED_UNDEFINED.match(s) for s in undefined), undefined


def test_the_ndk_links_when_android_ndk_home_is_set(tmp_path, monkeypatch):
    """A stand-in NDK whose clang++ logs its call and links with the cross gcc."""
    clang = tmp_path / "ndk" / NDK_CLANG
    clang.parent.mkdir(parents=True)
    log = tmp_path / "calls.log"
    gcc = shutil.which(CROSS_GCC)
    clang.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                     f'exec {gcc} -nostdlib $(echo "$@" | sed "s/ -lm//")\n')
    clang.chmod(clang.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path / "ndk"))
    assert linker_for("android-arm64").via == "ndk"
    out = tmp_path / "k.so"
    export_library(build_graph(SPEC, "android-arm64"), out, "android-arm64")
    assert "-shared" in log.read_text() and read_elf(out).machine == "aarch64"
    assert os.environ.get("TVM_NDK_CC") != str(clang)            # put back after the link


def test_a_missing_cross_compiler_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainError, match="make sysdeps"):
        linker_for("android-arm64")


def test_an_ndk_home_without_clang_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path))
    with pytest.raises(ToolchainError, match="ANDROID_NDK_HOME"):
        linker_for("android-arm64")
