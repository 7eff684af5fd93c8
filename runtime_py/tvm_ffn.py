"""The FFN from flash through the compiled TVM graph: the `--backend tvm` of the engine.

Same signature, same active sets (oracle or predicted) and the same I/O policy (planner,
cache) as engine.flash_ffn; what differs is who computes. Per layer and decode token, the
Relax graph calls the packed function `ripple.flash.read` (registered here), which runs
engine.fetch: cache hits, then active ids -> slots -> planner -> O_DIRECT reader, gathered
straight into the buffer the VM allocated; then the sparse kernel runs on those bytes as they
lie in the file. With predicted sets the kernel is the thresholded one (compile.ffn keep=):
a read neuron counts only if its own score clears the layer's threshold, as in flash_ffn.
I/O time is the reader's, as in the torch backend.

A prompt step (several tokens) reads the union of its tokens' sets once, through the same
fetch, then runs the kernel per token on that token's own rows.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import tvm
from tvm import relax

from ..compile.build import build_graph, build_sparse, knobs_for
from ..compile.ffn import VIEW_DTYPE, buffer_cols
from ..compile.graph import FLASH_READ
from ..compile.schedule import Knobs
from ..layout.bundle import BundleSpec
from ..layout.reader import Layout
from ..tuning.forward import FFN, TorchModel
from .engine import IOStats, copy_ffn, count_read, fetch, set_chooser
from .reader import FlashReader

TARGET = "host"


class FlashHook:
    """The packed function behind FLASH_READ. The VM looks it up once, when it is created,
    so one hook object stays registered and `bind` points it at the current layout."""

    def __init__(self):
        self.layout: Layout | None = None
        self.reader: FlashReader | None = None
        self.stats: IOStats | None = None
        self.planner = self.store = self.ahead = None

    def bind(self, layout: Layout, reader: FlashReader, stats: IOStats, planner=None, store=None,
             ahead=None) -> None:
        """planner, store, ahead: the I/O policy, as engine.fetch takes it."""
        self.layout, self.reader, self.stats = layout, reader, stats
        self.planner, self.store, self.ahead = planner, store, ahead

    def __call__(self, layer, ids, out) -> None:
        self.read(int(layer), np.from_dlpack(ids), np.from_dlpack(out))

    def read(self, layer: int, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Fill out (k, cols) with the bundles of neurons `ids` (unique); returns the ids in
        the order of the rows (the kernel sums over rows, so any order serves)."""
        lay = self.layout
        if lay is None:
            raise RuntimeError(f"{FLASH_READ} called before a layout was bound")
        raw = out.view(np.uint8).reshape(len(ids), lay.bundle_bytes)
        return fetch(lay, self.reader, layer, ids, self.stats, self.planner, self.store, out=raw,
                     ahead=self.ahead)[1]


HOOK = FlashHook()
tvm.register_global_func(FLASH_READ, HOOK, override=True)


@functools.lru_cache(maxsize=8)
def kernel(spec: BundleSpec, knobs: Knobs, keep: str) -> tvm.runtime.Function:
    """The thresholded kernel alone, main(x, bundles, thr, y): a whole layer read ahead calls it
    directly into a reused output, without the graph's allocation and VM call per layer."""
    return build_sparse(spec, TARGET, knobs, keep)["main"]


@functools.lru_cache(maxsize=8)
def layer_vm(spec: BundleSpec, knobs: Knobs, keep: str | None = None) -> relax.VirtualMachine:
    """The compiled graph for one bundle spec (compiled once per process, ~0.2 s)."""
    return relax.VirtualMachine(build_graph(spec, TARGET, knobs, keep), tvm.cpu())


def tvm_ffn(tm: TorchModel, layout: Layout, reader: FlashReader, thresholds: np.ndarray,
            criterion: str, stats: IOStats, sets=None, planner=None, store=None,
            measure_misses: bool = True, ahead=None) -> FFN:
    """engine.flash_ffn's signature and policies, computed by the compiled graph.

    A layer read whole ahead (runtime_py.read_ahead) skips the set policy: every bundle is in
    hand, so the thresholded kernel runs on the region as read (no gather) and finds each
    token's own set, the neurons whose score clears the layer's threshold, among all of them:
    the oracle's set at the cost of the predictor's, with no neuron missed."""
    spec, bb, n = layout.spec, layout.bundle_bytes, tm.desc.d_ffn
    knobs = knobs_for(spec, TARGET)[0]
    vm = layer_vm(spec, knobs, criterion)
    main, per_token = vm["main"], vm["ffn_bundles"]
    direct = kernel(spec, knobs, criterion) if ahead is not None and ahead.copy is None else None
    y_whole = tvm.runtime.tensor(np.zeros(spec.d_model, np.float32))
    HOOK.bind(layout, reader, stats, planner, store, ahead)
    cols, view = buffer_cols(spec), np.dtype(VIEW_DTYPE[spec.dtype])
    choose = set_chooser(tm, thresholds, criterion, stats, bb, sets, measure_misses)

    # Oracle sets read exactly the neurons that clear it: the kernel keeps all it is given.
    by_score = [tvm.runtime.tensor(np.array([t], np.float32)) for t in thresholds]
    keep_all = tvm.runtime.tensor(np.array([-1.0], np.float32))

    def threshold(layer: int, kept_by_score: bool) -> tvm.runtime.Tensor:
        return by_score[layer] if kept_by_score else keep_all

    def whole(layer: int, x: np.ndarray, got) -> np.ndarray:
        count_read(stats, *got, n * bb, n)          # the set is found among all n: all needed
        rows = tvm.runtime.from_dlpack(ahead.region(got[0], layer).view(view).reshape(n, cols))
        thr, out = threshold(layer, True), np.empty_like(x)
        for t, xt in enumerate(x):
            direct(tvm.runtime.tensor(xt), rows, thr, y_whole)
            out[t] = y_whole.numpy()
        return out

    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        hf = h.reshape(-1, shape[-1])
        x = hf.numpy().astype(np.float32)
        got = ahead.take(layer) if ahead is not None else None
        if got is not None and ahead.copy is not None:
            y = copy_ffn(ahead, layer, got, hf, stats, n).numpy()
        elif got is not None:
            y = whole(layer, x, got)
        else:
            want = choose(layer, hf).numpy()                     # (tokens, n)
            wanted = np.flatnonzero(want.any(0))
            thr = threshold(layer, sets is not None)
            if len(x) == 1:
                y = main(layer, tvm.runtime.tensor(wanted), tvm.runtime.tensor(x[0]), thr).numpy()[None]
            else:
                buf = np.empty((len(wanted), cols), dtype=view)
                ids = HOOK.read(layer, wanted, buf)
                y = np.zeros_like(x)
                for t in range(len(x)):
                    rows = np.flatnonzero(want[t, ids])
                    if len(rows):
                        y[t] = per_token(tvm.runtime.tensor(x[t]), tvm.runtime.tensor(buf[rows]), thr).numpy()
        out = torch.from_numpy(y)
        b_down = tm.layers[layer]["b_down"]
        if b_down is not None:
            out = out + b_down
        return out.reshape(shape)
    return ffn
