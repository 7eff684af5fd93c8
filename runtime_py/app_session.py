"""An APP folder (`ripple compile`, compile.app_files) loaded into this process: the same
library and native flash runtime an app and `ripple-run` run, driven from Python.

Python sets up (the runtime library, its config, the VM, params, the KV cache), calls
`prefill` once and `decode` per token, and measures; between layers it is not there: the
Relax VM runs the whole step and calls the runtime's packed functions itself. Per-token I/O
comes from the runtime's own counters (ripple.rt.stats), diffed around each call. A token's
time outside the library (`outside_ms`) is its whole loop iteration (argmax, the logits'
copy out, counters, the call's argument conversion) minus the decode call itself.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..compile.app_files import AppError, load_app_json
from ..compile.app_params import read_params

# ripple.rt.stats slots (compile/native/flash_runtime.c).
STATS = 24
IO_WAIT, READ_S, BYTES_READ, BYTES_NEEDED, READS, ACTIVE, CACHE_HITS, FETCHES, WHOLES, PINNED, BUFFERS, O_DIRECT = range(12)
PREFETCHES, PF_BYTES, PF_USED, PF_UNUSED, MISSES, QD_MAX, QD_SUM, QD_SAMPLES, PF_WAIT = range(15, 24)


@dataclass
class StepIO:
    """What one call (a decode token, or the prefill) read, from the runtime's counters."""
    io_wait_s: float
    read_s: float
    bytes_read: int
    bytes_needed: int
    reads: int
    active: int
    cache_hits: int
    # lookahead (ripple.rt.prefetch): bytes its reads took, bundles of the layers' own sets read
    # on demand; requests in flight as each one started
    prefetched_bytes: int = 0
    misses: int = 0
    queue_depth_mean: float = 0.0
    queue_depth_max: int = 0          # since the runtime opened

    @property
    def unused_bytes(self) -> int:
        """Bytes read for no neuron the step used: a prefetch's false positives, gaps collapsed
        into a read, alignment (bytes needed less the hits served from DRAM, as read)."""
        per = self.bytes_needed / self.active if self.active else 0.0
        return int(round(self.bytes_read - (self.active - self.cache_hits) * per))

    @classmethod
    def between(cls, a: np.ndarray, b: np.ndarray) -> "StepIO":
        d = b - a
        return cls(float(d[IO_WAIT]), float(d[READ_S]), int(d[BYTES_READ]), int(d[BYTES_NEEDED]),
                   int(d[READS]), int(d[ACTIVE]), int(d[CACHE_HITS]), int(d[PF_BYTES]), int(d[MISSES]),
                   float(d[QD_SUM] / d[QD_SAMPLES]) if d[QD_SAMPLES] else 0.0,
                   int(b[QD_MAX]))


@dataclass
class AppGeneration:
    prompt_ids: list[int]
    ids: list[int]
    prefill_ms: float
    prefill_io: StepIO
    token_ms: list[float] = field(default_factory=list)
    steps: list[StepIO] = field(default_factory=list)
    outside_ms: list[float] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)


class AppSession:
    """One APP folder loaded: runtime opened, VM made, params in DRAM. State is the point here
    (the runtime's buffers and read-ahead threads, the VM)."""

    def __init__(self, app_dir: str | os.PathLike, threads: int | None = None):
        import tvm
        from tvm import relax
        self.dir = Path(app_dir).resolve()
        self.info = load_app_json(self.dir)
        if threads:
            os.environ["TVM_NUM_THREADS"] = str(threads)     # read when TVM's pool first starts
        from ..compile.native_reader import load_reader
        lib = self.dir / self.info["runtime_library"]
        if not lib.is_file():
            raise AppError(f"{lib}: missing; compile the APP again")
        self._runtime = load_reader(lib)              # its constructor registers ripple.rt.*
        self._rt = {name: tvm.get_global_func(f"ripple.rt.{name}") for name in ("open", "stats", "close")}
        self._rt["open"](str(self.dir / self.info["runtime_config"]))
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in read_params(self.dir, self.info["params"])]
        exe = tvm.runtime.load_module(str(self.dir / self.info["library"]))
        self.vm = relax.VirtualMachine(exe, tvm.cpu())
        self._prefill, self._decode = self.vm["prefill"], self.vm["decode"]
        self._stats = tvm.runtime.tensor(np.zeros(STATS, np.float64))
        self.o_direct = bool(self.stats()[O_DIRECT])

    def stats(self) -> np.ndarray:
        self._rt["stats"](self._stats)
        return self._stats.numpy().copy()

    def dram_bytes(self, kv_bytes: int) -> dict:
        """What decoding holds in DRAM, by kind (model bytes: params, KV, runtime)."""
        s = self.stats()
        return {"params": int(self.info["params"]["bytes"]), "kv": kv_bytes,
                "runtime_pinned": int(s[PINNED]), "runtime_buffers": int(s[BUFFERS])}

    def new_kv(self, max_len: int):
        import tvm
        L, two, _, kvd = self.info["kv"]["shape"]
        if max_len > self.info["max_positions"]:
            raise AppError(f"{max_len} tokens exceed the model's {self.info['max_positions']} positions; use fewer")
        return tvm.runtime.tensor(np.zeros((L, two, max_len, kvd), self.info["kv"]["dtype"]))

    def generate(self, prompt_ids: list[int], n_tokens: int, keep_logits: bool = False,
                 stepwise_prompt: bool = False) -> AppGeneration:
        """Greedy: prefill the prompt, then decode until n_tokens ids or an end-of-sequence id;
        the first id comes from the prefill's logits (as ripple-run). stepwise_prompt: the
        prompt one token per call (a prompt step of a sparse layer reads the union of its
        tokens' predicted sets; a token alone reads its own), as ripple-run --stepwise-prompt."""
        import tvm
        if not prompt_ids:
            raise AppError("an empty prompt: give at least one token id")
        vocab = self.info["vocab"]
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise AppError(f"prompt ids must lie in [0, {vocab})")
        kv = self.new_kv(len(prompt_ids) + n_tokens)
        eos = set(self.info["eos_token_ids"])
        s0 = self.stats()
        t0 = time.perf_counter()
        first = 1 if stepwise_prompt else len(prompt_ids)
        out = self._prefill(tvm.runtime.tensor(np.asarray(prompt_ids[:first], np.int32)), kv,
                            tvm.runtime.ShapeTuple([0]), self.params)
        for i in range(first, len(prompt_ids)):
            out = self._decode(tvm.runtime.tensor(np.asarray(prompt_ids[i:i + 1], np.int32)), kv,
                               tvm.runtime.ShapeTuple([i]), self.params)
        logits = out.numpy()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        s1 = self.stats()
        gen = AppGeneration(list(prompt_ids), [], prefill_ms, StepIO.between(s0, s1))
        pos = len(prompt_ids)
        token = tvm.runtime.tensor(np.zeros(1, np.int32))
        shape = tvm.runtime.ShapeTuple
        start = None
        while True:
            if keep_logits:
                gen.logits.append(logits[0].copy())
            nxt = int(logits[0].argmax())
            gen.ids.append(nxt)
            if start is not None:        # the iteration that ends here, minus its call
                gen.outside_ms.append((time.perf_counter() - start) * 1e3 - gen.token_ms[-1])
            if nxt in eos or len(gen.ids) >= n_tokens:
                break
            start = time.perf_counter()
            token.copyfrom(np.array([nxt], np.int32))
            a = self.stats()
            t0 = time.perf_counter()
            out = self._decode(token, kv, shape([pos]), self.params)
            gen.token_ms.append((time.perf_counter() - t0) * 1e3)
            gen.steps.append(StepIO.between(a, self.stats()))
            logits = out.numpy()
            pos += 1
        return gen

    def close(self) -> None:
        if self._rt is not None:
            self._rt["close"]()
            self._rt = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
