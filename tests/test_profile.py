import numpy as np
import pytest

from ripple.tuning.checkpoint import load_model
from ripple.tuning.forward import to_torch
from ripple.tuning.profile import ProfileError, load_profile, run_profile, save_profile, thresholds_at

from conftest import profile_random_llama


@pytest.fixture(scope="module")
def llama_profile(random_llama_dir):
    return profile_random_llama(random_llama_dir, 4, ppl_budget=0.05, grid=(0.0, 0.3, 0.5, 0.7, 0.9))


def test_thresholds_rise_with_sparsity(llama_profile):
    _, p = llama_profile
    assert (np.diff(p.grid_thresholds, axis=0) >= 0).all()


def test_chosen_sparsity_is_the_highest_within_budget(llama_profile):
    _, p = llama_profile
    dense = p.grid_ppl[0]
    within = [s for s, q in zip(p.grid, p.grid_ppl) if q <= dense * 1.05]
    assert p.sparsity == max(within)


def test_masks_have_one_bit_per_neuron_per_token(llama_profile):
    tm, p = llama_profile
    m = p.masks("calib")
    assert m.shape == (tm.desc.n_layers, 4 * 48, tm.desc.d_ffn) and m.dtype == bool
    assert p.masks("heldout").shape[1] == 2 * 48


def test_fixed_sparsity_drops_about_that_share_of_neurons(random_llama_dir):
    tm = to_torch(load_model(random_llama_dir))
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 128, 64) for _ in range(3)]
    p = run_profile(tm, seqs, seqs[:1], "coef", sparsity=0.5, grid=(0.0, 0.5))
    # Pass 2 runs the sparse model, so hidden states shift a little: not exactly 0.5.
    assert abs(p.density("calib").mean() - 0.5) < 0.1


def test_profile_round_trips_through_a_file(llama_profile, tmp_path):
    _, p = llama_profile
    save_profile(p, tmp_path / "p.npz")
    q = load_profile(tmp_path / "p.npz")
    assert q.sparsity == p.sparsity and q.criterion == p.criterion
    np.testing.assert_array_equal(q.masks_heldout, p.masks_heldout)
    np.testing.assert_array_equal(q.grid_thresholds, p.grid_thresholds)


def test_corrupt_profile_is_a_clear_error(tmp_path):
    (tmp_path / "p.npz").write_bytes(b"not a zip file")
    with pytest.raises(ProfileError, match="unreadable profile"):
        load_profile(tmp_path / "p.npz")


def test_unprofiled_sparsity_is_refused(llama_profile):
    _, p = llama_profile
    with pytest.raises(ProfileError, match="not profiled"):
        thresholds_at(p.grid, p.grid_thresholds, 0.42)


def test_gate_criterion_needs_a_gated_ffn(random_opt_dir):
    tm = to_torch(load_model(random_opt_dir))
    seqs = [np.arange(32) % 128]
    with pytest.raises(ValueError, match="SwiGLU"):
        run_profile(tm, seqs, seqs, "gate", grid=(0.0, 0.5))
