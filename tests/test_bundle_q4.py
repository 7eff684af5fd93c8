"""q4 and q4d8 bundles: GGUF Q4_1 blocks of 32 along the hidden dimension; a Q4_1 GGUF's
gate/up blocks are carried in unchanged; the down column is quantized again, within Q4_1's own
error bound (q4) or in 8 bits with a float16 scale per 32 values, within half a stored scale of
the source (q4d8)."""
import gguf
import numpy as np
import pytest

from ripple.layout import BundleSpec, decode_bundles, encode_bundles
from ripple.layout import q4, q8
from ripple.layout.bundle import bundles_from_q4_parts
from ripple.layout.quantization import VERBATIM, QuantizationReport, encode_layer
from ripple.tuning.load_gguf import dequantize, ffn_q4_1_rows, gguf_tensors

from bundle_cases import D, N, encode_with, header_dtype, random_weights, write_random_layout
from conftest import embedded_gguf

FP16_EPS = 2.0 ** -11        # float16's relative rounding error (round to nearest)
SPECS = [BundleSpec(a, D, dtype, bias) for dtype in ("q4", "q4d8") for a, bias in (("swiglu", False), ("relu", True))]


def q4_bound(raw_part, d_model):
    """Per value: half the block's stored step (rounding to the nearest of 16 levels), plus
    what rounding the step and the minimum to float16 adds (Q4_1 quantizes with the float32
    step and minimum, then stores them as float16): 15 steps and one minimum, each off by at
    most FP16_EPS relative; plus float32 arithmetic."""
    step, lo = q4.steps(raw_part, d_model)
    b = step / 2 + FP16_EPS * (15 * step + np.abs(lo)) * 1.01 + 1e-7
    return np.repeat(b, q4.BLOCK, axis=1)


def q8_bound(raw_down, d_model):
    """Per value: half the block's stored scale (q rounds against the stored float16 scale),
    plus float32 arithmetic."""
    return np.repeat(q8.steps(raw_down, d_model) / 2 * (1 + 1e-6) + 1e-9, q8.BLOCK, axis=1)


def test_q4_blocks_are_byte_equal_to_gguf_q4_1_quantization():
    w = np.random.default_rng(0).standard_normal((50, 576)).astype(np.float32) * 0.05
    w[3, :32] = 0.25                                       # a constant block: step 0
    np.testing.assert_array_equal(q4.quantize_rows(w), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.dtype}-{s.activation}{'+bias' * s.has_up_bias}")
def test_round_trip_is_within_half_a_step_of_each_block(spec):
    w = random_weights(spec)
    raw = encode_bundles(spec, **w)
    got = decode_bundles(spec, raw)
    for name, at, size in zip(spec.parts, spec.part_offsets, spec.part_sizes):
        key = "down_t" if name == "down" else name
        bound = q8_bound if (name, spec.dtype) == ("down", "q4d8") else q4_bound
        assert (np.abs(getattr(got, key) - w[key]) <= bound(raw[:, at:at + size], D)).all(), name
    assert (got.down_t[0, :32] == 0).all()
    if spec.has_up_bias:
        np.testing.assert_array_equal(got.up_bias, w["up_bias"])     # stored as float32


def test_q4_bundle_is_q4_1_parts_then_float32_bias():
    spec = BundleSpec("relu", D, "q4", True)
    assert spec.part_bytes == D // 32 * 20 and spec.bundle_bytes == 2 * spec.part_bytes + 4
    w = random_weights(spec, seed=1)
    raw = encode_bundles(spec, **w)
    pb = spec.part_bytes
    np.testing.assert_array_equal(raw[:, :pb], q4.quantize_rows(w["up"]))
    np.testing.assert_array_equal(raw[:, pb:2 * pb], q4.quantize_rows(w["down_t"]))
    np.testing.assert_array_equal(np.ascontiguousarray(raw[:, 2 * pb:]).view("<f4")[:, 0], w["up_bias"])


def test_q4d8_bundle_is_q4_1_gate_up_then_int8_down_then_its_scales():
    spec = BundleSpec("swiglu", D, "q4d8")
    assert spec.part_sizes == (40, 40, D + D // 32 * 2) and spec.bundle_bytes == 80 + 68
    assert BundleSpec("swiglu", 576, "q4d8").bundle_bytes == 2 * 360 + 576 + 36
    w = random_weights(spec)
    raw = encode_bundles(spec, **w)
    np.testing.assert_array_equal(raw[:, :40], q4.quantize_rows(w["gate"]))
    np.testing.assert_array_equal(raw[:, 40:80], q4.quantize_rows(w["up"]))
    np.testing.assert_array_equal(raw[:, 80:], q8.quantize_rows(w["down_t"]))
    scales = raw[:, 80 + D:].copy().view("<f2").astype(np.float32)
    want = (np.abs(w["down_t"]).reshape(N, -1, 32).max(-1) / 127).astype(np.float16)
    np.testing.assert_array_equal(scales, want.astype(np.float32))


def test_q4_refuses_a_hidden_size_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        BundleSpec("swiglu", 48, "q4")


def test_q4_encode_refuses_nan_naming_the_part():
    with pytest.raises(ValueError, match="^up:"):
        encode_with(BundleSpec("swiglu", D, "q4"), "up", (1, 2), np.nan, seed=2)


def test_q8_refuses_values_beyond_float16_scales_and_nan():
    with pytest.raises(ValueError, match="float16"):
        q8.quantize_rows(np.full((1, 32), 1e7, np.float32))
    with pytest.raises(ValueError, match="^down:"):
        encode_with(BundleSpec("swiglu", D, "q4d8"), "down_t", (2, 5), np.inf, seed=1)


@pytest.mark.parametrize("dtype, down_bytes, message", [
    ("q4", 40 + 1, "down must be Q4_1 blocks"),
    ("q4d8", 40, "down must be 8-bit blocks"),                          # Q4_1-sized, not 8-bit
])
def test_down_parts_of_the_wrong_size_are_refused_by_name(dtype, down_bytes, message):
    spec = BundleSpec("swiglu", D, dtype)
    parts = {"gate": np.zeros((N, 40), np.uint8), "up": np.zeros((N, 40), np.uint8),
             "down": np.zeros((N, down_bytes), np.uint8)}
    with pytest.raises(ValueError, match=message):
        bundles_from_q4_parts(spec, parts)


@pytest.mark.parametrize("dtype, bundle_bytes, max_rel_rms, max_over_half_step", [
    ("q4", 3 * 40, 0.2, 1.05),
    ("q4d8", 80 + 68, 0.01, 1),
])
def test_layout_records_its_dtype_in_header_and_manifest(tmp_path, dtype, bundle_bytes, max_rel_rms,
                                                         max_over_half_step):
    spec = BundleSpec("swiglu", D, dtype)
    layout = write_random_layout(tmp_path, spec, QuantizationReport(dtype))
    assert layout.spec == spec and layout.bundle_bytes == bundle_bytes
    assert header_dtype(layout) == dtype
    q = layout.manifest.quantization
    assert q["dtype"] == dtype and q["gate_up_verbatim"] is False
    assert 0 < q["parts"]["down"]["rel_rms_err"] < max_rel_rms
    assert q["parts"]["down"]["max_err_over_half_step"] <= max_over_half_step


@pytest.fixture(scope="module")
def gguf_layer0():
    """Layer 0 of the embedded Q4_1 GGUF: its FFN blocks and their dequantization."""
    path = embedded_gguf()
    t = gguf_tensors(path)
    w = {p: dequantize(t[f"blk.0.ffn_{p}.weight"]) for p in ("gate", "up", "down")}
    return w, ffn_q4_1_rows(path, 1)[0]


def encode_gguf_layer0(gguf_layer0, dtype, report=None):
    w, blocks = gguf_layer0
    spec = BundleSpec("swiglu", w["up"].shape[1], dtype)
    return spec, encode_layer(spec, w["up"], w["down"], w["gate"], q4_blocks=blocks, report=report)


@pytest.mark.parametrize("dtype", ["q4", "q4d8"])
def test_gguf_gate_up_blocks_are_carried_unchanged_and_decode_exactly(gguf_layer0, dtype):
    w, blocks = gguf_layer0
    assert set(blocks) == {"gate", "up"}
    report = QuantizationReport(dtype)
    spec, raw = encode_gguf_layer0(gguf_layer0, dtype, report)
    pb = spec.part_bytes
    np.testing.assert_array_equal(raw[:, :pb], blocks["gate"])
    np.testing.assert_array_equal(raw[:, pb:2 * pb], blocks["up"])
    got = decode_bundles(spec, raw)
    np.testing.assert_array_equal(got.gate, w["gate"])     # the GGUF's own dequantization
    np.testing.assert_array_equal(got.up, w["up"])
    assert report.gate_up_verbatim and report.parts["gate"].source == VERBATIM
    assert report.parts["up"].max_abs == 0.0


def test_gguf_down_columns_are_requantized_within_q4_1s_bound(gguf_layer0):
    w, _ = gguf_layer0
    report = QuantizationReport("q4")
    spec, raw = encode_gguf_layer0(gguf_layer0, "q4", report)
    down = raw[:, 2 * spec.part_bytes:]
    err = np.abs(decode_bundles(spec, raw).down_t - w["down"].T)
    assert (err <= q4_bound(down, spec.d_model)).all()
    np.testing.assert_array_equal(down, q4.quantize_rows(np.ascontiguousarray(w["down"].T)))
    d = report.parts["down"]
    assert d.max_abs == pytest.approx(err.max()) and d.max_abs > 0


def test_gguf_down_is_8_bit_within_half_a_scale_and_a_fraction_of_q4s_error(gguf_layer0):
    w, _ = gguf_layer0
    report = QuantizationReport("q4d8")
    spec, raw = encode_gguf_layer0(gguf_layer0, "q4d8", report)
    err = np.abs(decode_bundles(spec, raw).down_t - w["down"].T)
    assert (err <= q8_bound(raw[:, 2 * spec.part_bytes:], spec.d_model)).all()
    d = report.parts["down"]
    assert d.max_abs == pytest.approx(err.max()) and 0 < d.max_over_half_step <= 1
    # The point of q4d8: its down error is a small fraction of q4's on the same weights.
    q4_spec, q4_raw = encode_gguf_layer0(gguf_layer0, "q4")
    q4_err = decode_bundles(q4_spec, q4_raw).down_t - w["down"].T
    assert np.sqrt((err ** 2).mean()) < 0.2 * np.sqrt((q4_err ** 2).mean())


def test_q4d8_refuses_q4_1_blocks_for_its_down_column(gguf_layer0):
    w, blocks = gguf_layer0
    spec = BundleSpec("swiglu", w["up"].shape[1], "q4d8")
    with pytest.raises(ValueError, match="gate/up only"):
        encode_layer(spec, w["up"], w["down"], w["gate"],
                     q4_blocks={**blocks, "down": q4.quantize_rows(np.ascontiguousarray(w["down"].T))})
