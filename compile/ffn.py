"""The FFN as TVM tensor expressions over the gathered bundle buffer, as it lies in the file.

Sparse kernel: main(x (d,) f32, bundles, y (d,) f32) with k, the number of active bundles, a
symbolic dimension: one compiled kernel serves every k. `bundles` is the reader's buffer of
k bundles, viewed as
  fp16: (k, elems) float16  - gate row | up row | down column   (SwiGLU)
                               up row | down column [| up bias]  (ReLU)
  int8: (k, bundle_bytes) int8 - the same parts as int8, then float32 side data (a scale per
        part, then the up bias) read from the last bytes of each row.
y = W_down[:, active] @ act(active rows of W_up/W_gate @ x), without b_down (the engine adds it).

Dense kernel (the baseline it is compared with): the whole FFN from matrices in their usual
layout (W_gate, W_up (n, d), W_down (d, n)), fp16, n fixed at compile time.

Stage names ("gu", "act", "y") are what compile.schedule schedules.
"""
from __future__ import annotations

from tvm import te, tirx

from ..layout.bundle import BundleSpec

_I64 = "int64"
# Which storage dtype a bundle's values are read as, per layout dtype.
VIEW_DTYPE = {"fp16": "float16", "int8": "int8"}


def _i64(v: int):
    return tirx.IntImm(_I64, int(v))


def buffer_cols(spec: BundleSpec) -> int:
    """Columns of the (k, cols) view of a gathered buffer the kernel takes."""
    return spec.elems if spec.dtype == "fp16" else spec.bundle_bytes


def gemv_parts(spec: BundleSpec) -> int:
    """Rows of a bundle multiplied with x: gate and up (SwiGLU) or up (ReLU)."""
    return len(spec.parts) - 1


def _side_f32(W, i, byte: int):
    """The float32 at byte offset `byte` of int8 row i (little-endian), read in place."""
    b = [W[i, byte + t].astype("uint8").astype("uint32") for t in range(4)]
    bits = b[0] | (b[1] << tirx.const(8, "uint32")) | (b[2] << tirx.const(16, "uint32")) \
        | (b[3] << tirx.const(24, "uint32"))
    return tirx.reinterpret("float32", bits)


def sparse_ffn(spec: BundleSpec) -> tirx.PrimFunc:
    """The sparse FFN over a gathered buffer of k bundles (k symbolic)."""
    if spec.dtype not in VIEW_DTYPE:
        raise ValueError(f"no kernel for bundle dtype {spec.dtype!r}; kernels exist for "
                         f"{sorted(VIEW_DTYPE)}")
    d, P = spec.d_model, gemv_parts(spec)
    k = te.var("k", dtype=_I64)
    D = _i64(d)
    x = te.placeholder((D,), "float32", name="x")
    W = te.placeholder((k, _i64(buffer_cols(spec))), VIEW_DTYPE[spec.dtype], name="bundles")
    rj = te.reduce_axis((0, D), name="rj")
    gu = te.compute((k, _i64(P)), lambda i, p: te.sum(
        W[i, p * D + rj].astype("float32") * x[rj], axis=rj), name="gu")

    if spec.dtype == "fp16":
        def scale(i, part):
            return None

        def bias(i):
            return W[i, _i64(2 * d)].astype("float32")
    else:
        side = len(spec.parts) * d

        def scale(i, part):
            return _side_f32(W, i, side + 4 * part)

        def bias(i):
            return _side_f32(W, i, side + 4 * len(spec.parts))

    def scaled(v, i, part):
        s = scale(i, part)
        return v if s is None else v * s

    def act_fn(i):
        if spec.activation == "swiglu":
            g = scaled(gu[i, 0], i, 0)
            a = g * te.sigmoid(g) * scaled(gu[i, 1], i, 1)
        else:
            u = scaled(gu[i, 0], i, 0)
            if spec.has_up_bias:
                u = u + bias(i)
            a = te.max(u, tirx.const(0.0, "float32"))
        # The down column's scale is folded into the coefficient: one multiply per neuron,
        # not one per (neuron, output).
        return scaled(a, i, P)

    act = te.compute((k,), act_fn, name="act")
    ri = te.reduce_axis((0, k), name="ri")
    y = te.compute((D,), lambda j: te.sum(
        W[ri, _i64(P * d) + j].astype("float32") * act[ri], axis=ri), name="y")
    return te.create_prim_func([x, W, y]).with_attr("global_symbol", "main")


def dense_ffn(activation: str, d: int, n: int, has_up_bias: bool = False) -> tirx.PrimFunc:
    """main(x, w_gate?, w_up, b_up?, w_down, y): the dense fp16 FFN, n fixed."""
    D, N = _i64(d), _i64(n)
    x = te.placeholder((D,), "float32", name="x")
    names = ["w_gate", "w_up"] if activation == "swiglu" else ["w_up"]
    rows = [te.placeholder((N, D), "float16", name=nm) for nm in names]
    b_up = te.placeholder((N,), "float16", name="b_up") if has_up_bias else None
    w_down = te.placeholder((D, N), "float16", name="w_down")
    def gemv(Wr, name):
        rj = te.reduce_axis((0, D), name="rj_" + name)
        return te.compute((N,), lambda i: te.sum(Wr[i, rj].astype("float32") * x[rj], axis=rj),
                          name=name)

    outs = [gemv(Wr, nm) for nm, Wr in zip(["g", "u"] if len(rows) == 2 else ["u"], rows)]
    if activation == "swiglu":
        g, u = outs
        act = te.compute((N,), lambda i: g[i] * te.sigmoid(g[i]) * u[i], name="act")
    else:
        (u,) = outs
        act = te.compute((N,), lambda i: te.max(
            u[i] + (b_up[i].astype("float32") if b_up is not None else tirx.const(0.0, "float32")),
            tirx.const(0.0, "float32")), name="act")
    ri = te.reduce_axis((0, N), name="ri")
    y = te.compute((D,), lambda j: te.sum(w_down[j, ri].astype("float32") * act[ri], axis=ri),
                   name="y")
    params = [x, *rows] + ([b_up] if b_up is not None else []) + [w_down, y]
    return te.create_prim_func(params).with_attr("global_symbol", "main")


def bundle_bytes_moved(spec: BundleSpec, k: int) -> int:
    """Bytes a sparse kernel call reads and writes: k bundles, x and y."""
    return k * spec.bundle_bytes + 2 * 4 * spec.d_model


def dense_bytes_moved(activation: str, d: int, n: int, has_up_bias: bool = False) -> int:
    mats = 3 if activation == "swiglu" else 2
    return 2 * (mats * n * d + int(has_up_bias) * n) + 2 * 4 * d
