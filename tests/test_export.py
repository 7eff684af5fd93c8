"""`ripple export`: what an app ships, written whole or not at all, and checked on the way back."""
import json

import pytest

from ripple.android_host.cli import main
from ripple.android_host.export import (EXPORT_FILE, KERNELS_FILE, WHOLE_KERNELS_FILE, ExportError,
                                        export_cmd, validate_export)
from ripple.android_host.interface import pack_cmd
from ripple.layout import LayoutChecksumError
from ripple.layout.whole_copy import WHOLE_FILE, WHOLE_MANIFEST

APP_FILES = ["README.md", EXPORT_FILE, KERNELS_FILE, "manifest.json", "model.rflash"]


@pytest.fixture(scope="module")
def layouts(random_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    for dtype in ("fp16", "int8"):
        pack_cmd(str(random_llama_dir), str(root / dtype), dtype=dtype)
    return root


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_android_export_loads_back_and_validates(layouts, tmp_path, dtype):
    res = export_cmd("android-arm64", str(layouts / dtype), str(tmp_path / "app"))
    assert res["files"] == APP_FILES and res["machine"] == "aarch64"
    assert "libc.so.6" not in res["needed"] and res["layout_verified"]
    again = validate_export(tmp_path / "app")
    assert again["machine"] == "aarch64"
    info = json.loads((tmp_path / "app" / EXPORT_FILE).read_text())
    assert info["predictor"] is None and info["bundle"]["dtype"] == dtype
    assert info["hook"]["name"] == "ripple.flash.read"
    assert "Predictor weights: none" in (tmp_path / "app" / "README.md").read_text()


def test_host_export_runs_its_kernel_against_numpy(layouts, tmp_path):
    res = export_cmd("host", str(layouts / "int8"), str(tmp_path / "app"))
    assert res["kernel_max_rel_err"] < 1e-4


def test_export_refuses_a_non_empty_out_and_leaves_it_alone(layouts, tmp_path):
    out = tmp_path / "app"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_cmd("android-arm64", str(layouts / "fp16"), str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_corrupt_layout_is_refused_before_anything_is_written(layouts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.rflash", "manifest.json"):
        (bad / name).write_bytes((layouts / "fp16" / name).read_bytes())
    with open(bad / "model.rflash", "r+b") as f:
        f.seek(4096 + 10)
        f.write(b"\xff\xfe")
    with pytest.raises(LayoutChecksumError):
        export_cmd("android-arm64", str(bad), str(tmp_path / "app"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_tampered_kernel_library_fails_validation(layouts, tmp_path):
    export_cmd("android-arm64", str(layouts / "fp16"), str(tmp_path / "app"))
    so = tmp_path / "app" / KERNELS_FILE
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256"):
        validate_export(tmp_path / "app")


def test_cli_export_with_an_unknown_target_is_one_line_exit_2(layouts, tmp_path, capsys):
    assert main(["export", "--target", "ios", "--layout", str(layouts / "fp16"),
                 "--out", str(tmp_path / "app")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown target 'ios'" in err
    assert not (tmp_path / "app").exists()


@pytest.fixture(scope="module")
def whole_layout(tmp_path_factory):
    from gguf_cases import write_llama_gguf
    root = tmp_path_factory.mktemp("whole")
    pack_cmd(str(write_llama_gguf(root / "tiny.gguf")), str(root / "lay"), dtype="q4", whole_copy=True)
    return root / "lay"


@pytest.mark.parametrize("target", ["host", "android-arm64"])
def test_a_whole_copy_ships_with_its_gemvs_and_validates(whole_layout, tmp_path, target):
    res = export_cmd(target, str(whole_layout), str(tmp_path / "app"))
    assert res["files"] == sorted(APP_FILES + [WHOLE_FILE, WHOLE_MANIFEST, WHOLE_KERNELS_FILE])
    assert res["whole_copy_verified"]
    if target == "host":
        assert res["whole_kernel_max_rel_err"] < 1e-4
    info = json.loads((tmp_path / "app" / EXPORT_FILE).read_text())
    assert {p["function"] for p in info["whole_copy"]["parts"].values()} == {"gemv_q4_1_128x64", "gemv_q4_1_64x128"}
    assert WHOLE_FILE in (tmp_path / "app" / "README.md").read_text()


def test_a_tampered_whole_copy_fails_validation(whole_layout, tmp_path):
    export_cmd("host", str(whole_layout), str(tmp_path / "app"))
    f = tmp_path / "app" / WHOLE_FILE
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(LayoutChecksumError, match="does not match its checksum"):
        validate_export(tmp_path / "app")
