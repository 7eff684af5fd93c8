"""q4d8 bundles: q4's gate/up (a Q4_1 GGUF's blocks carried in unchanged), the down column in
8 bits with a float16 scale per 32 values, within half a stored scale of the source."""
import numpy as np
import pytest

from ripple.layout import BundleSpec, decode_bundles, encode_bundles, open_layout, write_layout
from ripple.layout import q4, q8
from ripple.layout.bundle import bundles_from_q4_parts
from ripple.layout.header import HEADER_BYTES, decode_header
from ripple.layout.quantization import VERBATIM, QuantizationReport, encode_layer
from ripple.tuning.load_gguf import dequantize, ffn_q4_1_rows, gguf_tensors

from conftest import embedded_gguf
from test_bundle_q4 import q4_bound

D, N = 64, 40


def q8_bound(raw_down, d_model):
    """Per value: half the block's stored scale (q rounds against the stored float16 scale),
    plus float32 arithmetic."""
    return np.repeat(q8.steps(raw_down, d_model) / 2 * (1 + 1e-6) + 1e-9, q8.BLOCK, axis=1)


def _weights(spec, seed=0):
    rng = np.random.default_rng(seed)
    w = {"up": rng.standard_normal((N, D)).astype(np.float32) * 0.05,
         "down_t": rng.standard_normal((N, D)).astype(np.float32) * 3}
    w["down_t"][0, :32] = 0.0                                            # a zero block: scale 0
    if spec.activation == "swiglu":
        w["gate"] = rng.standard_normal((N, D)).astype(np.float32) + 2
    if spec.has_up_bias:
        w["up_bias"] = rng.standard_normal(N).astype(np.float32)
    return w


def test_q4d8_bundle_is_q4_1_gate_up_then_int8_down_then_its_scales():
    spec = BundleSpec("swiglu", D, "q4d8")
    assert spec.part_sizes == (40, 40, D + D // 32 * 2) and spec.bundle_bytes == 80 + 68
    assert BundleSpec("swiglu", 576, "q4d8").bundle_bytes == 2 * 360 + 576 + 36
    w = _weights(spec)
    raw = encode_bundles(spec, **w)
    np.testing.assert_array_equal(raw[:, :40], q4.quantize_rows(w["gate"]))
    np.testing.assert_array_equal(raw[:, 40:80], q4.quantize_rows(w["up"]))
    np.testing.assert_array_equal(raw[:, 80:], q8.quantize_rows(w["down_t"]))
    scales = raw[:, 80 + D:].copy().view("<f2").astype(np.float32)
    want = (np.abs(w["down_t"]).reshape(N, -1, 32).max(-1) / 127).astype(np.float16)
    np.testing.assert_array_equal(scales, want.astype(np.float32))


@pytest.mark.parametrize("spec", [BundleSpec("swiglu", D, "q4d8"), BundleSpec("relu", D, "q4d8", True)],
                         ids=["swiglu", "relu+bias"])
def test_q4d8_round_trip_is_within_half_a_step_per_part(spec):
    w = _weights(spec)
    raw = encode_bundles(spec, **w)
    got = decode_bundles(spec, raw)
    for name, at, size in zip(spec.parts, spec.part_offsets, spec.part_sizes):
        key = "down_t" if name == "down" else name
        bound = (q8_bound if name == "down" else q4_bound)(raw[:, at:at + size], D)
        assert (np.abs(getattr(got, key) - w[key]) <= bound).all(), name
    assert (got.down_t[0, :32] == 0).all()
    if spec.has_up_bias:
        np.testing.assert_array_equal(got.up_bias, w["up_bias"])


def test_q8_refuses_values_beyond_float16_scales_and_nan():
    with pytest.raises(ValueError, match="float16"):
        q8.quantize_rows(np.full((1, 32), 1e7, np.float32))
    spec = BundleSpec("swiglu", D, "q4d8")
    w = _weights(spec, seed=1)
    w["down_t"][2, 5] = np.inf
    with pytest.raises(ValueError, match="^down:"):
        encode_bundles(spec, **w)


def test_q4d8_down_parts_of_the_wrong_size_are_refused_by_name():
    spec = BundleSpec("swiglu", D, "q4d8")
    parts = {"gate": np.zeros((N, 40), np.uint8), "up": np.zeros((N, 40), np.uint8),
             "down": np.zeros((N, 40), np.uint8)}                       # Q4_1-sized, not 8-bit
    with pytest.raises(ValueError, match="down must be 8-bit blocks"):
        bundles_from_q4_parts(spec, parts)


def test_q4d8_layout_records_its_dtype_in_header_and_manifest(tmp_path):
    spec = BundleSpec("swiglu", D, "q4d8")
    report, quant = QuantizationReport("q4d8"), {}

    def layers():
        for seed in range(2):
            w = _weights(spec, seed)
            yield encode_layer(spec, w["up"], w["down_t"].T, w["gate"], report=report), np.arange(N)
        quant.update(report.to_dict())
    write_layout(tmp_path, spec, layers(), {}, "mem", "00" * 16, quantization=quant)
    layout = open_layout(tmp_path, verify=True)
    assert layout.spec == spec and layout.bundle_bytes == spec.bundle_bytes
    with open(layout.path, "rb") as f:
        assert decode_header(f.read(HEADER_BYTES), "t").dtype == "q4d8"
    q = layout.manifest.quantization
    assert q["dtype"] == "q4d8"
    assert 0 < q["parts"]["down"]["rel_rms_err"] < 0.01 and q["parts"]["down"]["max_err_over_half_step"] <= 1


@pytest.fixture(scope="module")
def gguf_layer0():
    path = embedded_gguf()
    t = gguf_tensors(path)
    w = {p: dequantize(t[f"blk.0.ffn_{p}.weight"]) for p in ("gate", "up", "down")}
    return w, ffn_q4_1_rows(path, 1)[0]


def test_gguf_gate_up_blocks_are_copied_and_down_is_8_bit_within_half_a_scale(gguf_layer0):
    w, blocks = gguf_layer0
    spec = BundleSpec("swiglu", w["up"].shape[1], "q4d8")
    report = QuantizationReport("q4d8")
    raw = encode_layer(spec, w["up"], w["down"], w["gate"], q4_blocks=blocks, report=report)
    pb = spec.part_bytes
    np.testing.assert_array_equal(raw[:, :pb], blocks["gate"])
    np.testing.assert_array_equal(raw[:, pb:2 * pb], blocks["up"])
    got = decode_bundles(spec, raw)
    np.testing.assert_array_equal(got.gate, w["gate"])
    np.testing.assert_array_equal(got.up, w["up"])
    down = raw[:, 2 * pb:]
    err = np.abs(got.down_t - w["down"].T)
    assert (err <= q8_bound(down, spec.d_model)).all()
    assert report.gate_up_verbatim and report.parts["gate"].source == VERBATIM
    d = report.parts["down"]
    assert d.max_abs == pytest.approx(err.max()) and 0 < d.max_over_half_step <= 1
    # The point of q4d8: its down error is a small fraction of q4's on the same weights.
    q4_raw = encode_layer(BundleSpec("swiglu", spec.d_model, "q4"), w["up"], w["down"], w["gate"],
                          q4_blocks=blocks)
    q4_err = decode_bundles(BundleSpec("swiglu", spec.d_model, "q4"), q4_raw).down_t - w["down"].T
    assert np.sqrt((err ** 2).mean()) < 0.2 * np.sqrt((q4_err ** 2).mean())


def test_q4d8_refuses_q4_1_blocks_for_its_down_column(gguf_layer0):
    w, blocks = gguf_layer0
    spec = BundleSpec("swiglu", w["up"].shape[1], "q4d8")
    with pytest.raises(ValueError, match="gate/up only"):
        encode_layer(spec, w["up"], w["down"], w["gate"],
                     q4_blocks={**blocks, "down": q4.quantize_rows(np.ascontiguousarray(w["down"].T))})
