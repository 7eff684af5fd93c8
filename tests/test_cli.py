"""Bad input gets one line naming the thing and the fix, exit code 2, and no half-written output."""
import subprocess
import sys

import pytest

from ripple.android_host.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        sys.exit(main(list(argv)))
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err


@pytest.mark.parametrize("argv, needle", [
    (["profile", "--out", "p.npz", "--sparsity", "1.5"], "outside [0, 1)"),
    (["profile", "--out", "p.npz", "--ppl-budget", "-1"], "must not be negative"),
    (["generate", "--layout", "x", "--tokens", "0"], "at least 1"),
    (["generate", "--layout", "x", "--queue-depth", "many"], "not a whole number"),
    (["pack", "--out", "o", "--dtype", "fp64"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_give_one_line_and_exit_2(capsys, argv, needle):
    code, err = run(capsys, *argv)
    assert code == 2 and len(err) == 1 and needle in err[0]


def test_missing_layout_names_it(capsys, tmp_path):
    code, err = run(capsys, "generate", "--layout", str(tmp_path / "nowhere"))
    assert code == 2 and len(err) == 1 and "nowhere" in err[0] and "ripple pack" in err[0]


def test_inspect_of_a_directory_without_layout(capsys, tmp_path):
    code, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and len(err) == 1 and str(tmp_path) in err[0]


def test_wrong_model_dir_names_it_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "layout"
    code, err = run(capsys, "pack", "--model", str(tmp_path / "no-model"), "--out", str(out))
    assert code == 2 and len(err) == 1 and "no-model" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_profile_of_another_model_is_refused_by_pack(capsys, tmp_path, random_opt_dir, random_llama_dir):
    import numpy as np
    from ripple.tuning.checkpoint import load_model
    from ripple.tuning.forward import to_torch
    from ripple.tuning.profile import run_profile, save_profile
    tm = to_torch(load_model(random_llama_dir))
    seqs = [np.arange(32) % 128]
    save_profile(run_profile(tm, seqs, seqs, grid=(0.0, 0.5)), tmp_path / "p.npz")
    out = tmp_path / "layout"
    code, err = run(capsys, "pack", "--model", str(random_opt_dir), "--profile", str(tmp_path / "p.npz"),
                    "--out", str(out))
    assert code == 2 and "another checkpoint" in err[-1]
    assert not (out / "model.rflash").exists()


def test_truncated_layout_is_refused_by_inspect(capsys, tmp_path, random_opt_dir):
    out = tmp_path / "layout"
    assert main(["pack", "--model", str(random_opt_dir), "--out", str(out)]) == 0
    f = out / "model.rflash"
    f.write_bytes(f.read_bytes()[:-8192])
    capsys.readouterr()   # the pack's progress bar
    code, err = run(capsys, "inspect", str(out))
    assert code == 2 and len(err) == 1 and "truncated" in err[0]


def test_console_script_exits_2_on_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ripple.android_host.cli", "inspect", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("ripple: error:")
