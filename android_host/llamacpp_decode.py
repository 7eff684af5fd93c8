"""llama.cpp (llama-cpp-python) decoding a GGUF token by token, its weights in DRAM or
evicted from the page cache before every token (android_host.page_eviction): the baseline
`ripple bench e2e` puts beside the flash-backed engine.

llama.cpp maps the GGUF and computes from the mapping, so a page evicted before a token is
read back from disk by a page fault when the token needs it. It does not time its I/O apart
from its compute; the bytes it reads per token come from /proc/self/io (read_bytes counts
every block read the process caused, page-fault read-around included).

`make bench-deps` builds llama-cpp-python without AMX: the default native build crashes on
Intel hosts with AMX (multi-token batches segfault inside libggml-cpu); `check_batches` is
the smoke test it ends with.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .bench_io import BenchError
from .page_eviction import evict, gguf_tensor_ranges, resident_bytes, whole_file

EVICTIONS = ("none", "file", "ffn")
INSTALL_HINT = ("llama-cpp-python is not installed; `make bench-deps` builds it "
                "(from source, without AMX, ~4 min)")


class LlamaCppMissing(BenchError):
    """llama-cpp-python is not importable."""


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppMissing(INSTALL_HINT) from e
    return llama_cpp


def open_llama(path: str, n_ctx: int, threads: int, logits_all: bool = False):
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                           n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                           use_mmap=True, use_mlock=False, verbose=False)


def process_read_bytes() -> int:
    """Bytes this process (all threads) has caused to be read from storage."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise BenchError("/proc/self/io has no read_bytes (kernel without task I/O accounting)")


@dataclass
class LlamaDecode:
    """Per generated token: wall ms (eviction excluded), bytes read from storage, and the
    model file's bytes in the page cache when the token started."""
    tokens: list[int] = field(default_factory=list)
    token_ms: list[float] = field(default_factory=list)
    bytes_read: list[int] = field(default_factory=list)
    resident_before: list[int] = field(default_factory=list)
    evicted_verified: bool | None = None       # None: nothing was evicted
    eviction_notes: list[str] = field(default_factory=list)
    evicted_bytes: int = 0
    kv_bytes: int = 0
    n_ctx: int = 0


def kv_bytes(path: str, n_tokens: int, bytes_per_value: int = 2) -> int:
    """K and V of every layer for n_tokens, at llama.cpp's default f16 cache type."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")

    def field_int(key):
        f = r.fields.get(f"{arch}.{key}")
        return None if f is None else int(f.parts[-1][0])
    layers, d, heads = field_int("block_count"), field_int("embedding_length"), field_int("attention.head_count")
    kv_heads = field_int("attention.head_count_kv") or heads
    return 2 * layers * n_tokens * kv_heads * (d // heads) * bytes_per_value


def last_logits(llm) -> np.ndarray:
    """The logits of the last token evaluated. `llm.scores` holds them only with logits_all:
    without it, llama-cpp-python 0.3.36 leaves the row zero, and argmax then says token 0."""
    import llama_cpp
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))


def decode(path: str, prompt_ids: list[int], n_tokens: int, threads: int, eviction: str = "none",
           progress=None) -> LlamaDecode:
    """Greedy decoding of n_tokens after the prompt (EOS does not stop it: every
    configuration times the same number of steps). eviction: none | file (the whole GGUF)
    | ffn (the FFN tensors' byte ranges only) before every token."""
    if eviction not in EVICTIONS:
        raise BenchError(f"eviction {eviction!r}: one of {', '.join(EVICTIONS)}")
    ranges = {"none": None, "file": whole_file(path), "ffn": gguf_tensor_ranges(path)}[eviction]
    n_ctx = len(prompt_ids) + n_tokens + 1
    out = LlamaDecode(n_ctx=n_ctx, kv_bytes=kv_bytes(path, n_ctx))
    llm = open_llama(path, n_ctx, threads)
    try:
        llm.eval(list(prompt_ids))
        verified = []
        for _ in range(n_tokens):
            nxt = int(np.argmax(last_logits(llm)))
            out.tokens.append(nxt)
            if ranges is not None:
                ev = evict(path, ranges)
                verified.append(ev.verified)
                out.evicted_bytes = ev.bytes_evicted
                if ev.note and ev.note not in out.eviction_notes:
                    out.eviction_notes.append(ev.note)
            out.resident_before.append(resident_bytes(path)[0])
            r0 = process_read_bytes()
            t0 = time.perf_counter()
            llm.eval([nxt])
            out.token_ms.append((time.perf_counter() - t0) * 1e3)
            out.bytes_read.append(process_read_bytes() - r0)
            if progress is not None:
                progress()
        out.evicted_verified = all(verified) if ranges is not None else None
    finally:
        llm.close()
    return out


def perplexity(path: str, seqs: list[np.ndarray], threads: int) -> float:
    """exp(mean NLL) of each sequence's tokens after the first, from llama.cpp's own logits
    (logits_all), each sequence from an empty context."""
    n_ctx = max(len(s) for s in seqs)
    llm = open_llama(path, n_ctx, threads, logits_all=True)
    nll, count = 0.0, 0
    try:
        for seq in seqs:
            ids = [int(t) for t in seq]
            llm.reset()
            llm.eval(ids[:-1])
            logits = np.asarray(llm.scores[:len(ids) - 1], np.float64)
            m = logits.max(1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(logits - m).sum(1)))
            nll += float((lse - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
            count += len(ids) - 1
    finally:
        llm.close()
    return math.exp(nll / max(count, 1))


def check_batches(path: str | None = None, n: int = 64, threads: int | None = None) -> None:
    """A multi-token batch and a logits_all batch through llama.cpp: the calls that segfault
    in an AMX build. Prints one line; a crash ends the process (that is the failure)."""
    from ..tuning.checkpoint import default_model_path
    llama_cpp = require_llama_cpp()
    path = str(path or default_model_path())
    threads = threads or os.cpu_count() or 1
    ids = [int(i) for i in (np.arange(n) * 37 + 11) % 1000]
    llm = open_llama(path, n + 1, threads)
    llm.eval(ids)
    if not np.isfinite(llm.scores[n - 1]).all():
        raise BenchError("llama.cpp returned non-finite logits for a multi-token batch")
    llm.close()
    ppl = perplexity(path, [np.array(ids)], threads)
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    amx = "AMX" in info and any(f"{k} = 1" in info for k in ("AMX_INT8", "AMX_BF16", "AMX"))
    print(f"llama.cpp {getattr(llama_cpp, '__version__', '?')}: {n}-token batch and logits_all ok "
          f"(ppl {ppl:.1f} on a synthetic id sequence); AMX {'ON' if amx else 'off'}")
