"""`ripple export`: the APP folder an app ships, written whole or not at all, and checked on the
way back (files, machine, links, checksums; on the host, two tokens decoded)."""
import json

import pytest

from ripple.android_host.cli import main
from ripple.android_host.export import ExportError, export_cmd, validate_export
from ripple.android_host.interface import pack_cmd
from ripple.compile.app_files import APP_FILE
from ripple.layout import LayoutChecksumError
from ripple.layout.whole_copy import WHOLE_FILE, WHOLE_MANIFEST

APP_FILES = [APP_FILE, "libripple_runtime.so", "manifest.json", "model.rflash", "model.so", "params.bin",
             "runtime.bin"]
HOST_FILES = ["libtvm_ffi.so", "libtvm_runtime.so", "ripple-run"]


@pytest.fixture(scope="module")
def layouts(random_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    for dtype in ("fp16", "int8"):
        pack_cmd(str(random_llama_dir), str(root / dtype), dtype=dtype)
    return root


def test_android_export_links_no_glibc_and_validates(layouts, tmp_path):
    res = export_cmd("android-arm64", str(layouts / "fp16"), str(tmp_path / "app"))
    assert sorted(res["files"] + [APP_FILE]) == sorted(APP_FILES)
    assert res["machine"] == "aarch64" and "libc.so.6" not in res["needed"] and res["layout_verified"]
    info = json.loads((tmp_path / "app" / APP_FILE).read_text())
    assert info["runner"] is None and info["files"]["libripple_runtime.so"]["machine"] == "aarch64"
    assert validate_export(tmp_path / "app")["machine"] == "aarch64"


def test_host_export_decodes_two_tokens_on_the_way_back(layouts, tmp_path):
    res = export_cmd("host", str(layouts / "int8"), str(tmp_path / "app"))
    assert sorted(res["files"] + [APP_FILE]) == sorted(APP_FILES + HOST_FILES)
    assert len(res["decoded_ids"]) == 2


def test_export_refuses_a_non_empty_out_and_leaves_it_alone(layouts, tmp_path):
    out = tmp_path / "app"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
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


def test_a_tampered_library_fails_validation(layouts, tmp_path):
    export_cmd("android-arm64", str(layouts / "fp16"), str(tmp_path / "app"))
    so = tmp_path / "app" / "model.so"
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
def test_a_whole_copy_ships_and_its_layers_are_read_whole(whole_layout, tmp_path, target):
    res = export_cmd(target, str(whole_layout), str(tmp_path / "app"))
    assert {WHOLE_FILE, WHOLE_MANIFEST} <= set(res["files"]) and res["whole_copy_verified"]
    assert res["layers"]["sparse"] == [] and len(res["layers"]["whole"]) > 0


def test_a_tampered_whole_copy_fails_validation(whole_layout, tmp_path):
    export_cmd("host", str(whole_layout), str(tmp_path / "app"))
    f = tmp_path / "app" / WHOLE_FILE
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(LayoutChecksumError, match="does not match its checksum"):
        validate_export(tmp_path / "app")
