"""What every sparse-FFN kernel test checks, for any bundle dtype: the kernel's output against a
float64 numpy FFN on the decoded bundles, for random active sets and under other schedules, and
that its graph cross-compiles for android-arm64 against bionic only."""
import re
import subprocess

import numpy as np
import tvm

from ripple.compile.build import build_graph, build_sparse
from ripple.compile.targets import export_library
from ripple.layout import decode_bundles
from ripple.tuning.kernels import kernel_view, random_bundles

N = 48


def reference(spec, raw, x, keep=None, thr=None):
    """keep/thr: only neurons whose |coef| (or |silu(gate)|) exceeds thr count."""
    b = decode_bundles(spec, raw)
    u = b.up.astype(np.float64) @ x + (b.up_bias if b.up_bias is not None else 0)
    if spec.activation == "swiglu":
        g = b.gate.astype(np.float64) @ x
        sg = g / (1 + np.exp(-g))
        a = sg * u
    else:
        sg, a = None, np.maximum(u, 0)
    if keep is not None:
        a = np.where(np.abs(sg if keep == "gate" else a) > thr, a, 0.0)
    return a @ b.down_t


def run_kernel(lib, spec, raw, x, thr=None):
    y = tvm.runtime.tensor(np.full(spec.d_model, np.nan, np.float32))   # k=0 must write zeros
    extra = [] if thr is None else [tvm.runtime.tensor(np.array([thr], np.float32))]
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(kernel_view(spec, raw)), *extra, y)
    return y.numpy()


def assert_close(got, want):
    # float32 sums in another order (q4: step applied per block, minimum via block sums of x).
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(np.abs(want).max(), 1.0))


def check_random_active_sets(spec, ks):
    """One compiled kernel, active sets of each size in ks drawn from N bundles."""
    lib = build_sparse(spec)
    raw_all = random_bundles(spec, N, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(spec.d_model).astype(np.float32)
    for k in ks:
        raw = raw_all[np.sort(rng.choice(N, k, replace=False))]
        got = run_kernel(lib, spec, raw, x)
        if k == 0:
            np.testing.assert_array_equal(got, np.zeros(spec.d_model, np.float32))
        else:
            assert_close(got, reference(spec, raw, x))


def check_keep_threshold(spec, keep):
    """The thresholded kernel drops exactly the neurons whose own score does not clear thr:
    thr at the median score of the rows keeps about half of them."""
    lib = build_sparse(spec, keep=keep)
    raw = random_bundles(spec, N, seed=5)
    x = np.random.default_rng(6).standard_normal(spec.d_model).astype(np.float32)
    b = decode_bundles(spec, raw)
    u = b.up.astype(np.float64) @ x + (b.up_bias if b.up_bias is not None else 0)
    if spec.activation == "swiglu":
        g = b.gate.astype(np.float64) @ x
        sg = g / (1 + np.exp(-g))
        score = np.abs(sg if keep == "gate" else sg * u)
    else:
        score = np.maximum(u, 0)
    thr = float(np.median(score))
    want = reference(spec, raw, x, keep, thr)
    assert_close(run_kernel(lib, spec, raw, x, thr), want)
    assert np.abs(want - reference(spec, raw, x)).max() > 1e-3       # the threshold did drop some
    assert_close(run_kernel(lib, spec, raw, x, -1.0), reference(spec, raw, x))


def check_schedule(spec, knobs):
    lib = build_sparse(spec, knobs=knobs)
    raw = random_bundles(spec, N, seed=3)[:29]        # k not a multiple of any split
    x = np.random.default_rng(4).standard_normal(spec.d_model).astype(np.float32)
    assert_close(run_kernel(lib, spec, raw, x), reference(spec, raw, x))


def check_android_cross_compile(spec, so):
    export_library(build_graph(spec, "android-arm64"), so, "android-arm64")
    out = subprocess.run(["file", "-b", str(so)], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ELF 64-bit LSB shared object, ARM aarch64"), out
    dyn = subprocess.run(["readelf", "-d", "-W", str(so)], capture_output=True, text=True, check=True).stdout
    assert set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)) <= {"libc.so", "libm.so"}
