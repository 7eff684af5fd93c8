"""The FFN from flash through the compiled TVM graph: the `--backend tvm` of the engine.

Same signature and same active sets as engine.flash_ffn; what differs is who reads and who
computes. Per layer and decode token, the Relax graph calls the packed function
`ripple.flash.read` (registered here): active ids -> slots -> planner -> O_DIRECT reader ->
gathered straight into the buffer the VM allocated; then the sparse kernel runs on those
bytes as they lie in the file. I/O time is the reader's, as in the torch backend.

A prompt step (several tokens) reads the union of its tokens' sets once, through the same
hook, then runs the kernel per token on that token's own rows.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import tvm
from tvm import relax

from ..compile.build import build_graph, knobs_for
from ..compile.ffn import VIEW_DTYPE, buffer_cols
from ..compile.graph import FLASH_READ
from ..compile.schedule import Knobs
from ..layout.bundle import BundleSpec
from ..layout.reader import Layout
from ..tuning.forward import FFN, TorchModel
from ..tuning.sparsity import scores
from .engine import IOStats, gather
from .planner import plan_reads
from .reader import FlashReader

TARGET = "host"


class FlashHook:
    """The packed function behind FLASH_READ. The VM looks it up once, when it is created,
    so one hook object stays registered and `bind` points it at the current layout."""

    def __init__(self):
        self.layout: Layout | None = None
        self.reader: FlashReader | None = None
        self.stats: IOStats | None = None

    def bind(self, layout: Layout, reader: FlashReader, stats: IOStats) -> None:
        self.layout, self.reader, self.stats = layout, reader, stats

    def __call__(self, layer, ids, out) -> None:
        self.read(int(layer), np.from_dlpack(ids), np.from_dlpack(out))

    def read(self, layer: int, ids: np.ndarray, out: np.ndarray) -> None:
        """Fill out (k, cols) with the bundles of neurons `ids`, rows in slot order."""
        lay, st = self.layout, self.stats
        if lay is None:
            raise RuntimeError(f"{FLASH_READ} called before a layout was bound")
        bb = lay.bundle_bytes
        slots = np.sort(lay.slot_of[layer][ids])
        region = int(lay.region_offsets[layer])
        plan = plan_reads(slots, region, bb, lay.alignment)
        res = self.reader.read(plan.extents)
        gather(res, plan, region, bb, out=out.view(np.uint8).reshape(len(slots), bb))
        st.seconds += res.seconds
        st.bytes_read += res.bytes_read
        st.reads += res.reads
        st.bytes_needed += len(slots) * bb
        st.active += len(slots)


HOOK = FlashHook()
tvm.register_global_func(FLASH_READ, HOOK, override=True)


@functools.lru_cache(maxsize=8)
def layer_vm(spec: BundleSpec, knobs: Knobs) -> relax.VirtualMachine:
    """The compiled graph for one bundle spec (compiled once per process, ~0.2 s)."""
    return relax.VirtualMachine(build_graph(spec, TARGET, knobs), tvm.cpu())


def tvm_ffn(tm: TorchModel, layout: Layout, reader: FlashReader, thresholds: np.ndarray,
            criterion: str, stats: IOStats, sets=None) -> FFN:
    """engine.flash_ffn's signature; sets: only None (oracle) so far. Predicted sets need the
    kernel to re-check each read neuron's score against the threshold, which it does not yet."""
    if sets is not None:
        raise ValueError("the tvm backend runs oracle sets only; use --backend torch for predicted sets")
    spec = layout.spec
    vm = layer_vm(spec, knobs_for(spec, TARGET)[0])
    main, per_token = vm["main"], vm["ffn_bundles"]
    HOOK.bind(layout, reader, stats)
    cols, view = buffer_cols(spec), np.dtype(VIEW_DTYPE[spec.dtype])

    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        hf = h.reshape(-1, shape[-1])
        _, score = scores(tm, layer, hf, criterion)          # the oracle, as in flash_ffn
        mask = (score > float(thresholds[layer])).numpy()    # (tokens, n)
        slots = np.sort(layout.slot_of[layer][np.flatnonzero(mask.any(0))])
        ids = layout.perm[layer][slots]                      # rows come back in this order
        x = hf.numpy().astype(np.float32)
        if len(x) == 1:
            y = main(layer, tvm.runtime.tensor(ids), tvm.runtime.tensor(x[0])).numpy()[None]
        else:
            buf = np.empty((len(ids), cols), dtype=view)
            HOOK.read(layer, ids, buf)
            y = np.zeros_like(x)
            for t in range(len(x)):
                rows = np.flatnonzero(mask[t, ids])
                if len(rows):
                    y[t] = per_token(tvm.runtime.tensor(x[t]),
                                     tvm.runtime.tensor(buf[rows])).numpy()
        out = torch.from_numpy(y)
        b_down = tm.layers[layer]["b_down"]
        if b_down is not None:
            out = out + b_down
        return out.reshape(shape)
    return ffn
