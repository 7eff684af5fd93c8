"""relu-tiny: the training script's folder is a plain OPT folder our loader and transformers
agree on; its text split is disjoint; the density report measures what it says."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ripple.tuning import relu_tiny
from ripple.tuning.checkpoint import load_model, load_tokenizer
from ripple.tuning.forward import forward, to_torch
from ripple.tuning.model import ModelLoadError

_spec = importlib.util.spec_from_file_location(
    "relu_model", Path(__file__).resolve().parents[1] / "bench" / "relu_model.py")
relu_model = importlib.util.module_from_spec(_spec)
sys.modules["relu_model"] = relu_model     # dataclasses look their module up there
_spec.loader.exec_module(relu_model)

# seq_len 128: the profilers' default sequence length must fit the model's positions.
TINY_SHAPE = relu_model.Shape(d_model=32, n_layers=2, n_heads=2, d_ffn=128, vocab=320, seq_len=128)
TINY_SCHEDULE = relu_model.Schedule(steps=4, batch=2, warmup=2, train_bytes=60_000)


def build_tiny(out: Path, **kw):
    # fp32 named: on a tiny model bf16 and fp32 time alike, and a choice that flipped between
    # two builds would make them differ.
    return relu_model.build(out, TINY_SHAPE, kw.pop("schedule", TINY_SCHEDULE), threads=1,
                            report_tokens=256, autocast=kw.pop("autocast", "fp32"), **kw)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder, reused = build_tiny(tmp_path_factory.mktemp("relu") / "relu-tiny")
    assert not reused
    return folder


def test_trained_folder_loads_through_the_hf_loader_and_matches_transformers(tiny_folder):
    from transformers import AutoTokenizer, OPTForCausalLM
    desc = load_model(tiny_folder)
    assert (desc.arch, desc.d_model, desc.n_layers, desc.d_ffn) == ("opt", 32, 2, 128)
    assert AutoTokenizer.from_pretrained(str(tiny_folder)).vocab_size == load_tokenizer(tiny_folder).vocab_size
    split = relu_tiny.read_text_split(tiny_folder)
    seq = relu_tiny.text_sequences(load_tokenizer(tiny_folder), split.heldout, 32, 32)[0]
    ours = forward(to_torch(desc), torch.from_numpy(seq)[None])[0].numpy()
    with torch.no_grad():
        theirs = OPTForCausalLM.from_pretrained(str(tiny_folder)).eval()(
            torch.from_numpy(seq)[None]).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_tokenizer_round_trips_python_source(tiny_folder):
    tok = load_tokenizer(tiny_folder)
    text = "def f(x):\n    return x  # é\n"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_text_split_is_disjoint_and_recorded_in_the_folder(tiny_folder):
    record = relu_tiny.read_text_split(tiny_folder).record
    sides = [set(record[f"{s}_files"]) for s in relu_tiny.SPLITS]
    assert sides[1] and sides[2] and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    for f in record["heldout_files"]:
        assert relu_tiny.split_of(f) == "heldout"
    root = relu_tiny.stdlib_root()
    expect = "\n\n".join(relu_tiny.read_text(root, record["heldout_files"]))
    assert (tiny_folder / relu_tiny.HELDOUT_TEXT).read_text() == expect


def test_split_of_a_file_depends_on_its_path_only():
    files = relu_tiny.stdlib_files()
    full = relu_tiny.split_files(files)
    half = relu_tiny.split_files(files[::2])
    for side in relu_tiny.SPLITS:
        assert set(half[side]) == set(full[side]) & set(files[::2])


def test_second_build_reuses_the_folder(tiny_folder):
    before = (tiny_folder / "model.safetensors").stat().st_mtime_ns
    folder, reused = build_tiny(tiny_folder)
    assert reused and (tiny_folder / "model.safetensors").stat().st_mtime_ns == before


def test_build_with_other_settings_refuses_without_force(tiny_folder):
    with pytest.raises(relu_model.TrainError, match="--force"):
        build_tiny(tiny_folder, schedule=relu_model.Schedule(steps=5, batch=2, warmup=2, train_bytes=60_000))


def test_training_is_deterministic(tiny_folder, tmp_path):
    again, _ = build_tiny(tmp_path / "again")
    a, b = load_file(tiny_folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (again / "tokenizer.json").read_text() == (tiny_folder / "tokenizer.json").read_text()


def test_interrupted_training_resumes_to_the_same_model(tiny_folder, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    lr_at = relu_model.lr_at

    def stop_at_step_3(step, s):
        if step == 3:
            raise Stop
        return lr_at(step, s)

    monkeypatch.setattr(relu_model, "lr_at", stop_at_step_3)
    with pytest.raises(Stop):
        build_tiny(tmp_path / "resumed", checkpoint_every=2)
    assert (tmp_path / ".resumed.partial" / "checkpoint.pt").is_file()
    monkeypatch.setattr(relu_model, "lr_at", lr_at)
    folder, _ = build_tiny(tmp_path / "resumed", checkpoint_every=2)
    a, b = load_file(tiny_folder / "model.safetensors"), load_file(folder / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".resumed.partial").exists()


def test_fitted_steps_cut_to_whole_hundreds_within_the_budget():
    fit = relu_model.fitted_steps
    assert fit(2600, 0.5, 1400.0, least=300) == 2600            # 1,300 s: fits as asked
    assert fit(2600, 2.68, 1600.0, least=300) == 500            # 597 steps fit: 500
    assert fit(2600, 2.68, 100.0, least=300) == 300             # never fewer than `least`
    assert fit(200, 10.0, 100.0, least=300) == 200              # nor more than asked


def test_a_budget_cut_run_is_the_run_of_the_cut_schedule(tmp_path):
    """Steps are cut inside the warmup, whose learning rates do not depend on the total, so a
    run cut by its budget trains the same model as one asked for that many steps."""
    long = relu_model.Schedule(steps=400, batch=2, warmup=20, train_bytes=60_000)
    cut, _ = build_tiny(tmp_path / "cut", schedule=long, minutes=1e-4)
    log = json.loads((cut / relu_model.TRAINING_LOG).read_text())
    assert (log["steps"], log["steps_requested"], log["autocast"]) == (40, 400, "fp32")
    asked, _ = build_tiny(tmp_path / "asked", schedule=relu_model.Schedule(
        steps=40, batch=2, warmup=20, train_bytes=60_000))
    a, b = load_file(cut / "model.safetensors"), load_file(asked / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_autocast_trial_leaves_the_model_untouched_and_picks_by_time(monkeypatch):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=16,
                                     word_embed_proj_dim=16, dropout=0.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (2, 16))
    name, times = relu_model.choose_autocast(model, x)
    assert name in ("bf16", "fp32") and set(times) == {"bf16", "fp32"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # The rule: bf16 only when clearly faster.
    clock = iter(np.cumsum([0, 1.0, 0, 1.0, 0, 1.0, 0, 0.5, 0, 0.5, 0, 0.5]))
    monkeypatch.setattr(relu_model, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    assert relu_model.choose_autocast(model, x)[0] == "bf16"
    clock = iter(np.cumsum([0, 1.0, 0, 1.0, 0, 1.0, 0, 0.9, 0, 0.9, 0, 0.9]))
    assert relu_model.choose_autocast(model, x)[0] == "fp32"
    clock = iter(np.cumsum([0, 1.0, 0, 1.0, 0, 1.0, 0, 30.0]))    # emulated: one step tells
    assert relu_model.choose_autocast(model, x) == ("fp32", {"fp32": 1.0, "bf16": 30.0})


def test_bad_autocast_or_budget_is_refused(tmp_path):
    with pytest.raises(relu_model.TrainError, match="autocast"):
        build_tiny(tmp_path / "a", autocast="fp8")
    with pytest.raises(relu_model.TrainError, match="minutes"):
        build_tiny(tmp_path / "b", minutes=-1)


def test_density_report_is_written_with_every_layer(tiny_folder):
    report = json.loads((tiny_folder / relu_model.DENSITY_JSON).read_text())
    assert report["tokens"] == 256 and len(report["layers"]) == 2
    for layer in report["layers"]:
        assert 0 < layer["active_fraction"] < 1 and 0.1 <= layer["top10_share"] <= 1


def test_layer_density_counts_runs_and_top_neurons():
    mask = np.zeros((2, 20), bool)
    mask[0, [0, 1, 2, 5, 19]] = True      # runs: [0-2], [5], [19]
    mask[1, [1, 2, 10]] = True            # runs: [1-2], [10]
    d = relu_model.layer_density(mask)
    assert d["active_fraction"] == pytest.approx(8 / 40)
    assert d["runs_per_token"] == pytest.approx(5 / 2)
    assert d["runs_per_active"] == pytest.approx(5 / 8)
    assert d["top10_share"] == pytest.approx(4 / 8)   # top 2 of 20 neurons: ids 1 and 2, twice each
    assert d["never_active_fraction"] == pytest.approx(14 / 20)


def test_report_cli_prints_and_rewrites_the_table(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_folder, folder)
    assert relu_model.main(["--report", "--out", str(folder), "--report-tokens", "128",
                            "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "not OPT-6.7B" in out and "top10% share" in out
    assert json.loads((folder / relu_model.DENSITY_JSON).read_text())["tokens"] == 128


def test_report_on_a_missing_folder_says_how_to_train(tmp_path, capsys):
    assert relu_model.main(["--report", "--out", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "make relu-model" in err and len(err.strip().splitlines()) == 1


def test_plain_hf_folder_has_no_text_split(random_opt_dir):
    assert relu_tiny.read_text_split(random_opt_dir) is None
    with pytest.raises(ModelLoadError, match="make relu-model"):
        relu_tiny.require_folder(random_opt_dir)


def test_profile_of_a_folder_with_a_text_split_reads_its_own_files(tiny_folder, tmp_path):
    from ripple.android_host.interface import profile_cmd
    from ripple.tuning.profile import load_profile
    profile_cmd(str(tiny_folder), str(tmp_path / "p.npz"), calib_tokens=128, heldout_tokens=64, seq_len=32)
    p = load_profile(tmp_path / "p.npz")
    assert p.meta["text"] == relu_tiny.SPLIT_TEXT_NOTE
    assert (p.meta["calib_tokens"], p.meta["heldout_tokens"]) == (128, 64)


def random_opt_with_tokenizer(tokenizer_from: Path, out: Path) -> Path:
    """A small random OPT from a config, with a tokenizer (sampling text needs one)."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(3)
    cfg = OPTConfig(vocab_size=TINY_SHAPE.vocab, hidden_size=64, num_hidden_layers=2, ffn_dim=256,
                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                    do_layer_norm_before=True, activation_function="relu", bos_token_id=1, eos_token_id=1,
                    pad_token_id=0)
    OPTForCausalLM(cfg).eval().save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, out / f)
    return out


def test_bench_placement_takes_any_opt_folder(tiny_folder, tmp_path):
    from ripple.android_host.cli import main
    model = random_opt_with_tokenizer(tiny_folder, tmp_path / "opt")
    out = tmp_path / "placement.json"
    assert main(["bench", "placement", "--model", str(model), "--json", str(out), "--workloads",
                 "--no-timing", "--calib-tokens", "256", "--heldout-tokens", "128",
                 "--cache", str(tmp_path / "cache")]) == 0
    w = json.loads(out.read_text())["workloads"]["opt"]
    assert (w["layers"], w["neurons"]) == (2, 256)
    assert set(w["strategies"]) == {"identity", "frequency", "ripple", "ours"}
    assert out.with_suffix(".png").is_file()


def test_bench_placement_profiles_a_split_folder_on_its_own_text(tiny_folder, tmp_path):
    from ripple.android_host.cli import main
    out = tmp_path / "placement.json"
    assert main(["bench", "placement", "--model", str(tiny_folder), "--json", str(out), "--workloads",
                 "--no-timing", "--calib-tokens", "256", "--heldout-tokens", "128",
                 "--cache", str(tmp_path / "cache")]) == 0
    w = json.loads(out.read_text())["workloads"]["relu-tiny"]
    assert w["meta"]["text"] == relu_tiny.SPLIT_TEXT_NOTE
    assert (w["calib_tokens"], w["heldout_tokens"]) == (256, 128)


def test_bench_io_relu_tiny_workload_reads_the_cached_folder(tiny_folder, tmp_path, monkeypatch):
    from ripple.android_host.bench_io import bench_io_cmd
    monkeypatch.setenv("RIPPLE_CACHE", str(tiny_folder.parent))
    r = bench_io_cmd(workload="relu-tiny", tokens=4, warmup=2, queue_depth=4, host_profile="pixel8-ufs31",
                     cache_dir=str(tmp_path / "cache"), json_out=str(tmp_path / "io.json"))
    saved = json.loads((tmp_path / "io.json").read_text())
    assert saved["workload"] == "relu-tiny" and "not OPT-6.7B" in saved["model"]
    assert saved["workload_meta"]["label"] == relu_tiny.LABEL
    assert saved["workload_meta"]["text"] == relu_tiny.SPLIT_TEXT_NOTE
    assert set(r["strategies"]) >= {"dense", "llmflash", "ripple", "ours"}


def test_bench_io_relu_tiny_without_the_folder_says_how_to_train(tmp_path, monkeypatch):
    from ripple.android_host.bench_io import bench_io_cmd
    monkeypatch.setenv("RIPPLE_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="make relu-model"):
        bench_io_cmd(workload="relu-tiny", host_profile="pixel8-ufs31", cache_dir=str(tmp_path / "c"))


def test_bench_placement_relu_tiny_without_the_folder_says_how_to_train(tmp_path, monkeypatch, capsys):
    from ripple.android_host import bench_placement
    from ripple.android_host.cli import main
    monkeypatch.setitem(bench_placement.MODEL_WORKLOADS, "relu-tiny", (str(tmp_path / "relu-tiny"), None))
    assert main(["bench", "placement", "--workloads", "relu-tiny", "--json", str(tmp_path / "p.json"),
                 "--no-timing"]) == 2
    assert "make relu-model" in capsys.readouterr().err and not (tmp_path / "p.json").exists()
