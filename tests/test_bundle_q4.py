"""q4 bundles: GGUF Q4_1 blocks of 32 along the hidden dimension; a Q4_1 GGUF's gate/up blocks
are carried in unchanged, down columns are quantized again within Q4_1's own error bound."""
import gguf
import numpy as np
import pytest

from ripple.layout import BundleSpec, decode_bundles, encode_bundles, open_layout, write_layout
from ripple.layout import q4
from ripple.layout.bundle import bundles_from_q4_parts
from ripple.layout.header import HEADER_BYTES, decode_header
from ripple.layout.quantization import VERBATIM, QuantizationReport, encode_layer
from ripple.tuning.load_gguf import dequantize, ffn_q4_1_rows, gguf_tensors

from conftest import embedded_gguf

D, N = 64, 40
FP16_EPS = 2.0 ** -11        # float16's relative rounding error (round to nearest)


def q4_bound(raw_part, d_model):
    """Per value: half the block's stored step (rounding to the nearest of 16 levels), plus
    what rounding the step and the minimum to float16 adds (Q4_1 quantizes with the float32
    step and minimum, then stores them as float16): 15 steps and one minimum, each off by at
    most FP16_EPS relative; plus float32 arithmetic."""
    step, lo = q4.steps(raw_part, d_model)
    b = step / 2 + FP16_EPS * (15 * step + np.abs(lo)) * 1.01 + 1e-7
    return np.repeat(b, q4.BLOCK, axis=1)


def _weights(spec, seed=0):
    rng = np.random.default_rng(seed)
    w = {"up": rng.standard_normal((N, D)).astype(np.float32) * 0.05,
         "down_t": rng.standard_normal((N, D)).astype(np.float32) * 3}
    if spec.activation == "swiglu":
        w["gate"] = rng.standard_normal((N, D)).astype(np.float32) + 2   # all-positive blocks too
    if spec.has_up_bias:
        w["up_bias"] = rng.standard_normal(N).astype(np.float32)
    return w


def test_q4_blocks_are_byte_equal_to_gguf_q4_1_quantization():
    w = np.random.default_rng(0).standard_normal((50, 576)).astype(np.float32) * 0.05
    w[3, :32] = 0.25                                       # a constant block: step 0
    np.testing.assert_array_equal(q4.quantize_rows(w), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1))


@pytest.mark.parametrize("spec", [BundleSpec("swiglu", D, "q4"), BundleSpec("relu", D, "q4", True)],
                         ids=["swiglu", "relu+bias"])
def test_q4_round_trip_is_within_half_a_step_of_each_block(spec):
    w = _weights(spec)
    raw = encode_bundles(spec, **w)
    got = decode_bundles(spec, raw)
    pb = spec.part_bytes
    for i, name in enumerate(spec.parts):
        want = w["down_t" if name == "down" else name]
        err = np.abs(getattr(got, "down_t" if name == "down" else name) - want)
        assert (err <= q4_bound(raw[:, i * pb:(i + 1) * pb], D)).all(), name
    if spec.has_up_bias:
        np.testing.assert_array_equal(got.up_bias, w["up_bias"])     # stored as float32


def test_q4_bundle_is_q4_1_parts_then_float32_bias():
    spec = BundleSpec("relu", D, "q4", True)
    assert spec.part_bytes == D // 32 * 20 and spec.bundle_bytes == 2 * spec.part_bytes + 4
    w = _weights(spec, seed=1)
    raw = encode_bundles(spec, **w)
    pb = spec.part_bytes
    np.testing.assert_array_equal(raw[:, :pb], q4.quantize_rows(w["up"]))
    np.testing.assert_array_equal(raw[:, pb:2 * pb], q4.quantize_rows(w["down_t"]))
    np.testing.assert_array_equal(np.ascontiguousarray(raw[:, 2 * pb:]).view("<f4")[:, 0], w["up_bias"])


def test_q4_refuses_a_hidden_size_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        BundleSpec("swiglu", 48, "q4")


def test_q4_encode_refuses_nan_naming_the_part():
    spec = BundleSpec("swiglu", D, "q4")
    w = _weights(spec, seed=2)
    w["up"][1, 2] = np.nan
    with pytest.raises(ValueError, match="^up:"):
        encode_bundles(spec, **w)


def test_q4_layout_records_its_dtype_in_header_and_manifest(tmp_path):
    spec = BundleSpec("swiglu", D, "q4")
    report, quant = QuantizationReport("q4"), {}

    def layers():
        for seed in range(2):
            w = _weights(spec, seed)
            yield encode_layer(spec, w["up"], w["down_t"].T, w["gate"], report=report), np.arange(N)
        quant.update(report.to_dict())
    write_layout(tmp_path, spec, layers(), {}, "mem", "00" * 16, quantization=quant)
    layout = open_layout(tmp_path, verify=True)
    assert layout.spec == spec and layout.bundle_bytes == 3 * 40
    with open(layout.path, "rb") as f:
        assert decode_header(f.read(HEADER_BYTES), "t").dtype == "q4"
    q = layout.manifest.quantization
    assert q["dtype"] == "q4" and q["gate_up_verbatim"] is False
    assert 0 < q["parts"]["down"]["rel_rms_err"] < 0.2 and q["parts"]["down"]["max_err_over_half_step"] <= 1.05


@pytest.fixture(scope="module")
def gguf_layer0():
    """Layer 0 of the embedded Q4_1 GGUF: its FFN blocks and their dequantization."""
    path = embedded_gguf()
    t = gguf_tensors(path)
    w = {p: dequantize(t[f"blk.0.ffn_{p}.weight"]) for p in ("gate", "up", "down")}
    return w, ffn_q4_1_rows(path, 1)[0]


def test_gguf_gate_up_blocks_are_carried_unchanged_and_decode_exactly(gguf_layer0):
    w, blocks = gguf_layer0
    assert set(blocks) == {"gate", "up"}
    spec = BundleSpec("swiglu", w["up"].shape[1], "q4")
    report = QuantizationReport("q4")
    raw = encode_layer(spec, w["up"], w["down"], w["gate"], q4_blocks=blocks, report=report)
    pb = spec.part_bytes
    np.testing.assert_array_equal(raw[:, :pb], blocks["gate"])
    np.testing.assert_array_equal(raw[:, pb:2 * pb], blocks["up"])
    got = decode_bundles(spec, raw)
    np.testing.assert_array_equal(got.gate, w["gate"])     # the GGUF's own dequantization
    np.testing.assert_array_equal(got.up, w["up"])
    assert report.gate_up_verbatim and report.parts["gate"].source == VERBATIM
    assert report.parts["up"].max_abs == 0.0


def test_gguf_down_columns_are_requantized_within_q4_1s_bound(gguf_layer0):
    w, blocks = gguf_layer0
    spec = BundleSpec("swiglu", w["up"].shape[1], "q4")
    report = QuantizationReport("q4")
    raw = encode_layer(spec, w["up"], w["down"], w["gate"], q4_blocks=blocks, report=report)
    pb = spec.part_bytes
    down = raw[:, 2 * pb:]
    err = np.abs(decode_bundles(spec, raw).down_t - w["down"].T)
    assert (err <= q4_bound(down, spec.d_model)).all()
    np.testing.assert_array_equal(down, q4.quantize_rows(np.ascontiguousarray(w["down"].T)))
    d = report.parts["down"]
    assert d.max_abs == pytest.approx(err.max()) and d.max_abs > 0


def test_q4_parts_of_the_wrong_shape_are_refused_by_name():
    spec = BundleSpec("swiglu", D, "q4")
    parts = {p: np.zeros((N, spec.part_bytes), np.uint8) for p in spec.parts}
    parts["down"] = np.zeros((N, spec.part_bytes + 1), np.uint8)
    with pytest.raises(ValueError, match="down must be Q4_1 blocks"):
        bundles_from_q4_parts(spec, parts)
