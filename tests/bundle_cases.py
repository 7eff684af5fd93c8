"""Float FFN weights for bundle tests of any dtype, and a small layout written from them."""
import numpy as np

from ripple.layout import encode_bundles, open_layout, write_layout
from ripple.layout.header import HEADER_BYTES, decode_header
from ripple.layout.quantization import encode_layer

D, N = 64, 40


def random_weights(spec, seed=0):
    """Bundle parts as encode_bundles takes them, with the awkward blocks quantizers meet: an
    all-positive gate (minimum far from zero) and an all-zero down block (step and scale 0)."""
    rng = np.random.default_rng(seed)
    w = {"up": rng.standard_normal((N, spec.d_model)).astype(np.float32) * 0.05,
         "down_t": rng.standard_normal((N, spec.d_model)).astype(np.float32) * 3}
    w["down_t"][0, :32] = 0.0
    if spec.activation == "swiglu":
        w["gate"] = rng.standard_normal((N, spec.d_model)).astype(np.float32) + 2
    if spec.has_up_bias:
        w["up_bias"] = rng.standard_normal(N).astype(np.float32)
    return w


def encode_with(spec, part, at, value, seed=0):
    """Random weights encoded with one value replaced (a NaN, an infinity)."""
    w = random_weights(spec, seed)
    w[part][at] = value
    return encode_bundles(spec, **w)


def write_random_layout(path, spec, report=None, n_layers=2):
    """A layout of n_layers random layers in identity placement, opened with its CRCs checked;
    report (a QuantizationReport) accumulates the encoding error into the manifest."""
    quant = {}

    def layers():
        for seed in range(n_layers):
            w = random_weights(spec, seed)
            yield encode_layer(spec, w["up"], w["down_t"].T, w.get("gate"), w.get("up_bias"),
                               report=report), np.arange(N)
        if report is not None:
            quant.update(report.to_dict())
    write_layout(path, spec, layers(), {}, "mem", "00" * 16, quantization=quant)
    return open_layout(path, verify=True)


def header_dtype(layout):
    with open(layout.path, "rb") as f:
        return decode_header(f.read(HEADER_BYTES), "t").dtype
