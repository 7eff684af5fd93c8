"""int8 bundles (per-part scales, float32 side data): the encoding the int8 kernels read."""
import numpy as np
import pytest

from ripple.layout import BundleSpec, decode_bundles, encode_bundles
from ripple.layout.header import DTYPE_CODES

from bundle_cases import D, encode_with, header_dtype, random_weights, write_random_layout


@pytest.mark.parametrize("spec", [BundleSpec("swiglu", D, "int8"), BundleSpec("relu", D, "int8", True)],
                         ids=["swiglu", "relu+bias"])
def test_int8_round_trip_is_within_half_a_step_of_each_parts_scale(spec):
    w = random_weights(spec)
    got = decode_bundles(spec, encode_bundles(spec, **w))
    for name, want in w.items():
        if name == "up_bias":
            np.testing.assert_array_equal(got.up_bias, want)     # stored as float32
            continue
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert (np.abs(getattr(got, name) - want) <= step / 2 * 1.0001 + 1e-7).all(), name


def test_int8_bundle_is_int8_parts_then_float32_scales_then_bias():
    spec = BundleSpec("relu", D, "int8", True)
    assert spec.bundle_bytes == 2 * D + 4 * 3
    w = random_weights(spec, seed=1)
    raw = encode_bundles(spec, **w)
    side = np.ascontiguousarray(raw[:, 2 * D:]).view("<f4")
    np.testing.assert_allclose(side[:, 0], np.abs(w["up"]).max(1) / 127, rtol=1e-6)
    np.testing.assert_allclose(side[:, 1], np.abs(w["down_t"]).max(1) / 127, rtol=1e-6)
    np.testing.assert_array_equal(side[:, 2], w["up_bias"])
    assert np.abs(raw[:, :2 * D].view(np.int8)).max() == 127


def test_an_all_zero_row_encodes_without_dividing_by_zero():
    spec = BundleSpec("swiglu", D, "int8")
    w = random_weights(spec, seed=2)
    w["gate"][3] = 0
    got = decode_bundles(spec, encode_bundles(spec, **w))
    assert not got.gate[3].any() and np.isfinite(got.gate).all()


def test_int8_encode_refuses_nan_naming_the_part():
    with pytest.raises(ValueError, match="down"):
        encode_with(BundleSpec("swiglu", D, "int8"), "down_t", (1, 2), np.nan, seed=3)


def test_int8_layout_packs_and_opens_with_its_dtype_in_header_and_manifest(tmp_path):
    spec = BundleSpec("swiglu", D, "int8")
    layout = write_random_layout(tmp_path, spec)
    assert layout.spec == spec and layout.bundle_bytes == 3 * D + 12
    assert header_dtype(layout) == "int8"
    assert DTYPE_CODES["int8"] == 2
