"""The per-layer Relax graph: read the active bundles through the flash hook, run the kernel.

    main(layer, ids (k,) int64, x (d,) f32) -> y (d,) f32
        bundles = call_dps_packed("ripple.flash.read", layer, ids)   # (k, cols), VM-allocated
        y       = sparse_ffn(x, bundles)
    ffn_bundles(x, bundles) -> y                                       # the kernel alone

keep="coef"|"gate" (compile.ffn.sparse_ffn) appends an input thr (1,) f32 to both: the graph
for predicted sets, which keeps only the read neurons whose own score clears thr.

The hook is a packed function the runtime registers under FLASH_READ; it fills the buffer
the VM allocated with the bytes of the bundles of `ids` (the rows in slot order), exactly as
they lie in model.rflash. On a phone the app registers a native function under that name
(MLC-LLM's apps register their own packed functions the same way).
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..layout.bundle import BundleSpec
from .ffn import VIEW_DTYPE, buffer_cols, sparse_ffn
from .schedule import DEFAULT, Knobs, schedule_sparse

FLASH_READ = "ripple.flash.read"
KERNEL = "sparse_ffn"


def layer_graph(spec: BundleSpec, knobs: Knobs = DEFAULT, keep: str | None = None) -> tvm.IRModule:
    kernel = schedule_sparse(sparse_ffn(spec, keep), spec, knobs)["main"].without_attr("global_symbol")
    d, cols, vdt = spec.d_model, buffer_cols(spec), VIEW_DTYPE[spec.dtype]
    bb = relax.BlockBuilder()
    gv = bb.add_func(kernel, KERNEL)
    y_ty = relax.TensorType([d], "float32")

    k = tirx.Var("k", "int64")
    layer = relax.Var("layer", tvm.ir.PrimType("int64"))
    ids = relax.Var("ids", relax.TensorType([k], "int64"))
    x = relax.Var("x", relax.TensorType([d], "float32"))

    def thr():
        return [] if keep is None else [relax.Var("thr", relax.TensorType([1], "float32"))]

    t = thr()
    with bb.function("main", [layer, ids, x, *t]):
        with bb.dataflow():
            buf = bb.emit(relax.call_dps_packed(FLASH_READ, relax.Tuple([layer, ids]),
                                                out_ty=relax.TensorType([k, cols], vdt)))
            y = bb.emit_output(relax.call_tir(gv, relax.Tuple([x, buf, *t]), out_ty=y_ty))
        bb.emit_func_output(y)

    kb = tirx.Var("k", "int64")
    xb = relax.Var("x", relax.TensorType([d], "float32"))
    bundles = relax.Var("bundles", relax.TensorType([kb, cols], vdt))
    t = thr()
    with bb.function("ffn_bundles", [xb, bundles, *t]):
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(gv, relax.Tuple([xb, bundles, *t]), out_ty=y_ty))
        bb.emit_func_output(y)
    return bb.get()
