"""ripple sparsify on a tiny random Llama: the whole path (train, resume, evaluate, write a
folder every verb loads), in seconds. Whether it reaches the goal on SmolLM2 is a benchmark
(docs/results.md), not a test."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from ripple.android_host.cli import main
from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import forward, to_torch
from ripple.tuning.save_hf import save_hf
from ripple.tuning.sparsify import (REPORT, STATE, Settings, SparsifyError, Text, learning_rate,
                                    mask_sparsity, masked_ffn, sparsify, trained_target)

SETTINGS = Settings(target=0.7, minutes=0.04, lr=3e-4, batch=2, seq_len=24, ramp=0.0)


@pytest.fixture(scope="module")
def ffn_heavy(random_llama_dir):
    """The random Llama with its FFN scaled up, so that masking it changes the logits enough
    for training to have something to recover (at init the FFN barely moves the residual)."""
    desc = load_model(random_llama_dir)
    return dataclasses.replace(desc, layers=[dataclasses.replace(lw, w_gate=lw.w_gate * 4, w_up=lw.w_up * 4,
                                                                  w_down=lw.w_down * 8) for lw in desc.layers])


def _text(seed=0):
    rng = np.random.default_rng(seed)
    seqs = lambda n: [rng.integers(0, 128, 48) for _ in range(n)]  # noqa: E731
    return Text(seqs(16), seqs(4), seqs(3), "random tokens")


def test_save_hf_round_trips_and_transformers_agrees(random_llama_dir, tmp_path):
    desc = load_model(random_llama_dir)
    save_hf(desc, tmp_path / "copy")
    back = load_model(tmp_path / "copy")
    for a, b in zip(desc.layers, back.layers):
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "attn_norm", "ffn_norm"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(desc.lm_head, back.lm_head)
    from transformers import LlamaForCausalLM
    tokens = torch.arange(20)[None] % 128
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "copy").eval()
    with torch.no_grad():
        want = hf(tokens).logits
    got = forward(to_torch(back), tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_masked_ffn_drops_the_asked_share_of_the_batch(random_llama_dir):
    tm = to_torch(load_model(random_llama_dir))
    h = torch.randn(2, 16, tm.desc.d_model)
    kept = []
    tm_w = tm.layers[0]
    coef = torch.nn.functional.silu(h @ tm_w["w_gate"].T) * (h @ tm_w["w_up"].T)
    for s in (0.0, 0.5, 0.9):
        out = masked_ffn(tm, s)(0, h)
        # the same output as the down projection of the kept coefficients
        thr = coef.abs().reshape(-1).kthvalue(max(1, int(coef.numel() * s))).values if s else -1.0
        keep = coef.abs() > thr
        torch.testing.assert_close(out, (coef * keep) @ tm_w["w_down"].T)
        kept.append(float(keep.float().mean()))
    assert kept[0] == 1.0 and abs(kept[1] - 0.5) < 0.01 and abs(kept[2] - 0.1) < 0.01


def test_schedule_ramps_the_mask_then_decays_the_rate():
    s = Settings(target=0.8, ramp=0.5, lr=1e-4)
    assert [mask_sparsity(s, p) for p in (0.0, 0.25, 0.5, 0.9)] == [0.0, 0.4, 0.8, 0.8]
    assert learning_rate(s, 0.3) == 1e-4
    assert learning_rate(s, 1.0) == pytest.approx(1e-5)
    assert learning_rate(s, 0.75) < 1e-4


def test_sparsify_writes_a_folder_every_verb_loads(ffn_heavy, tmp_path):
    desc = ffn_heavy
    out = tmp_path / "sparse"
    r = sparsify(desc, _text, SETTINGS, out)
    assert not (tmp_path / "sparse.partial").exists()
    again = load_model(out)
    assert (again.n_layers, again.d_ffn, again.d_model) == (desc.n_layers, desc.d_ffn, desc.d_model)
    assert not np.array_equal(again.layers[0].w_up, desc.layers[0].w_up)      # it trained
    np.testing.assert_array_equal(again.embed, desc.embed)                   # the embedding stays
    on_disk = json.loads((out / REPORT).read_text())
    assert on_disk["steps"] == r["steps"] > 0
    # thresholds from calibration text, measured on held-out text: near the target
    assert abs(r["inactive_fraction"] - SETTINGS.target) < 0.1
    f = r["frontier"]
    assert f["sparsity"][0] == 0.0 and f["original_thresholded_ppl_ratio"][0] == 1.0
    i = f["sparsity"].index(SETTINGS.target)
    assert r["ppl_ratio"] == f["sparsified_ppl_ratio"][i] > 0
    assert f["sparsified_heldout_inactive"][i] == pytest.approx(r["inactive_fraction"], abs=1e-4)
    assert f["original_heldout_inactive"][0] == 0.0 and f["sparsified_heldout_inactive"][0] == 0.0
    from ripple.android_host.interface import plot_sparsify
    plot_sparsify(r, str(tmp_path / "frontier.png"))
    assert (tmp_path / "frontier.png").stat().st_size > 0


def _char_tokenizer(folder):
    """A character-level tokenizer within the random Llama's 128 ids: profiling text files needs one."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {chr(32 + i): i for i in range(95)} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))


def test_profiling_a_sparsified_folder_defaults_to_the_target_it_was_trained_for(ffn_heavy, random_llama_dir,
                                                                                 tmp_path):
    from ripple.android_host.interface import profile_cmd
    from ripple.tuning.profile import load_profile
    out = tmp_path / "sparse"
    sparsify(ffn_heavy, _text, SETTINGS, out)
    _char_tokenizer(out)
    words = tmp_path / "words.txt"
    words.write_text(" ".join(f"line {i}: some text to profile on." for i in range(200)))
    kw = dict(text=[str(words)], calib_tokens=256, heldout_tokens=64, seq_len=32)
    profile_cmd(str(out), str(tmp_path / "p.npz"), **kw)
    p = load_profile(tmp_path / "p.npz")
    assert p.sparsity == SETTINGS.target and "ripple sparsify" in p.meta["sparsity_rule"]
    profile_cmd(str(out), str(tmp_path / "q.npz"), sparsity=0.5, **kw)       # asked for: as asked
    q = load_profile(tmp_path / "q.npz")
    assert q.sparsity == 0.5 and q.meta["sparsity_rule"] == "fixed"
    assert trained_target(random_llama_dir) is None                             # any other model


def test_training_lowers_the_distillation_loss(ffn_heavy, tmp_path):
    r = sparsify(ffn_heavy, _text, SETTINGS, tmp_path / "sparse")
    losses = [loss for _, _, loss in r["loss_curve"]]
    assert len(losses) >= 6
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


def test_a_stopped_run_resumes_with_its_text_and_steps(ffn_heavy, tmp_path):
    desc = ffn_heavy
    out = tmp_path / "sparse"

    def crash(folder, text):
        raise KeyboardInterrupt      # stopped after training, before the folder is in place

    with pytest.raises(KeyboardInterrupt):
        sparsify(desc, _text, SETTINGS, out, extra_files=crash)
    assert (tmp_path / "sparse.partial" / STATE).is_file() and not out.exists()
    first = torch.load(tmp_path / "sparse.partial" / STATE, weights_only=False)["progress"]

    def no_new_text():
        raise AssertionError("a resumed run samples no new text")

    longer = Settings(**{**SETTINGS.__dict__, "minutes": SETTINGS.minutes * 2})
    r = sparsify(desc, no_new_text, longer, out)
    assert r["steps"] > first["step"]
    assert r["train_seconds"] >= longer.minutes * 60


def test_other_settings_do_not_resume(ffn_heavy, tmp_path):
    desc = ffn_heavy
    with pytest.raises(KeyboardInterrupt):
        sparsify(desc, _text, SETTINGS, tmp_path / "sparse",
                 extra_files=lambda f, t: (_ for _ in ()).throw(KeyboardInterrupt))
    other = Settings(**{**SETTINGS.__dict__, "lr": 1e-5})
    with pytest.raises(SparsifyError, match="other settings"):
        sparsify(desc, _text, other, tmp_path / "sparse")


def test_relu_models_are_refused_in_one_line(random_opt_dir, tmp_path, capsys):
    code = main(["sparsify", "--model", str(random_opt_dir), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already exactly sparse" in err[0]
    assert not list(tmp_path.iterdir())
