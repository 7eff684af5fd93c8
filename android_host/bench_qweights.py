"""`ripple bench qweights`: the non-FFN weights as GGUF blocks (compiled GEMVs) against bf16.

Side by side, in one run, at the same thread count (TVM's pool size; run with
OMP_NUM_THREADS=1 for one thread) (issue 11: keep the non-FFN weights in DRAM in their
quantized form):
  per matrix shape (layer 0's attention, the LM head): forward.linear on one token, the
    QuantizedMatrix (compile.qgemv) against the bf16 tensor (torch.mv), calls interleaved,
    warm (the same matrix every call);
  per decode token: the whole forward pass (dense FFN in fp32 from DRAM in both) with the
    quantized non-FFN weights against bf16 ones, on the same tokens, interleaved token by token;
  the non-FFN bytes each holds (runtime_py.resident).
Writes the JSON and a PNG beside it.
"""
from __future__ import annotations

import os
import time

import numpy as np

MATRICES = (("attention q/o", 0, "wq"), ("attention k/v", 0, "wk"), ("LM head", None, "lm_head"))


def register(bench_sub) -> None:
    p = bench_sub.add_parser("qweights", help="non-FFN weights as GGUF blocks (TVM GEMVs) vs bf16 (torch): "
                             "per-matrix and per-token time, bytes held")
    p.add_argument("--model", help="Q4_1/Q8_0 GGUF file (default: the embedded SmolLM2-135M GGUF)")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens timed per variant")
    p.add_argument("--repeat", type=int, default=15, help="timed batches per matrix (median)")
    p.add_argument("--json", required=True, help="results (a PNG is written beside it)")
    p.set_defaults(run=_run)


def _run(args) -> None:
    from ..atomic_file import write_result
    res = bench_qweights(args.model, args.tokens, args.repeat)
    write_result(args.json, res, plot)
    for m in res["matrices"]:
        print(f"{m['matrix']:14s} {m['shape'][0]:>6d}x{m['shape'][1]} {m['kind']}: tvm {m['tvm_us']:8.1f} us, "
              f"torch bf16 {m['torch_bf16_us']:8.1f} us  (x{m['ratio']:.2f})")
    for key, label in (("forward", "dense FFN"), ("forward_without_ffn", "FFN skipped")):
        f = res[key]
        print(f"per token, {label}: quantized {f['quantized_ms']:.2f} ms, bf16 {f['bf16_ms']:.2f} ms "
              f"(x{f['ratio']:.2f})")
    print(f"non-FFN bytes held {res['resident']['quantized']['non_ffn'] / 1e6:.1f} MB vs "
          f"{res['resident']['bf16']['non_ffn'] / 1e6:.1f} MB (x{res['resident']['ratio']:.3f})")
    print(f"wrote {args.json} and {res['png']}")


def _per_call_s(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _decode_ms(models: dict, ids, ffn) -> dict:
    """Per decode token ms of each model on the same tokens (8 of prompt, then one at a time),
    interleaved token by token; and how often their next-token choices agree."""
    from ..tuning.forward import forward, new_cache
    tokens = ids.shape[1] - 8
    caches = {k: new_cache(tm, 1, ids.shape[1]) for k, tm in models.items()}
    per_token = {k: [] for k in models}
    agree = []
    for k, tm in models.items():
        forward(tm, ids[:, :8], caches[k], ffn=ffn, last_only=True)
    for i in range(8, 8 + tokens):
        top = []
        for k, tm in models.items():
            t0 = time.perf_counter()
            logits = forward(tm, ids[:, i:i + 1], caches[k], ffn=ffn, last_only=True)
            per_token[k].append((time.perf_counter() - t0) * 1e3)
            top.append(int(logits[0, -1].argmax()))
        agree.append(len(set(top)) == 1)
    ms = {k: float(np.median(v)) for k, v in per_token.items()}
    return {"tokens": tokens, "quantized_ms": ms["quantized"], "bf16_ms": ms["bf16"],
            "ratio": ms["quantized"] / ms["bf16"], "per_token_ms": per_token,
            "top1_agreement": float(np.mean(agree))}


def bench_qweights(model: str | None = None, tokens: int = 32, repeat: int = 15) -> dict:
    import torch
    import tvm

    from ..compile.qgemv import bytes_moved
    from ..runtime_py.resident import weight_bytes
    from ..tuning.checkpoint import default_model_path, load_model
    from ..tuning.forward import linear, to_torch, to_torch_quantized

    if tokens < 3 or repeat < 3:
        raise ValueError(f"--tokens {tokens} --repeat {repeat}: use at least 3 of each")
    path = model or default_model_path()
    desc = load_model(path)
    # torch at TVM's pool size (TVM_NUM_THREADS, else OMP_NUM_THREADS, else half the cores
    # on x86): both at the same count, one thread when run as the README says.
    threads = int(tvm.get_global_func("runtime.NumThreads")())
    own_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        quant = to_torch_quantized(desc, ffn=True)        # ValueError names a tensor of another type
        bf16 = to_torch(desc, torch.bfloat16, ffn=True)   # FFN fp32 from DRAM in both
        load = [os.getloadavg()[0]]
        rng = np.random.default_rng(0)
        matrices = []
        with torch.inference_mode():
            for label, layer, name in MATRICES:
                q = getattr(quant, name) if layer is None else quant.layers[layer][name]
                b = getattr(bf16, name) if layer is None else bf16.layers[layer][name]
                x = torch.from_numpy(rng.standard_normal((1, 1, q.shape[1])).astype(np.float32))
                linear(x, q)                                # builds the kernel
                linear(x, b)
                calls = max(3, int(0.02 / max(_per_call_s(lambda: linear(x, b), 3), 1e-6)))
                tq, tb = [], []
                for _ in range(repeat):                    # interleaved: both see the same load
                    tq.append(_per_call_s(lambda: linear(x, q), calls))
                    tb.append(_per_call_s(lambda: linear(x, b), calls))
                us_q, us_b = float(np.median(tq)) * 1e6, float(np.median(tb)) * 1e6
                matrices.append({"matrix": label, "shape": list(q.shape), "kind": q.kind,
                                 "tvm_us": us_q, "torch_bf16_us": us_b, "ratio": us_q / us_b,
                                 "tvm_bytes": bytes_moved(q.kind, *q.shape),
                                 "bf16_bytes": int(b.numel() * 2), "calls_per_batch": calls})

            ids = torch.from_numpy(rng.integers(0, desc.vocab_size, 8 + tokens))[None]
            models = {"quantized": quant, "bf16": bf16}
            dense = _decode_ms(models, ids, None)
            # FFN skipped: the part of a token the non-FFN weights cost, undiluted by the FFN
            attn = _decode_ms(models, ids, lambda layer, h: torch.zeros_like(h))
        load.append(os.getloadavg()[0])
        held = {k: weight_bytes(tm) for k, tm in models.items()}
    finally:
        torch.set_num_threads(own_threads)
    return {
        "model": desc.name or str(path), "threads": threads,
        "load_average": load, "matrices": matrices,
        "forward": {**dense, "note": "dense FFN in fp32 from DRAM in both; only the non-FFN weights differ"},
        "forward_without_ffn": {**attn, "note": "the FFN skipped (adds zero): embedding, attention, LM head"},
        "resident": {k: {"non_ffn": v["non_ffn"], "non_ffn_dtypes": v["non_ffn_dtypes"]} for k, v in held.items()}
        | {"ratio": held["quantized"]["non_ffn"] / held["bf16"]["non_ffn"]},
    }


def plot(res: dict, png) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic_file import save_figure
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4))
    labels = [f"{m['matrix']}\n{m['shape'][0]}x{m['shape'][1]} {m['kind']}" for m in res["matrices"]]
    xs = np.arange(len(labels))
    a.bar(xs - 0.2, [m["tvm_us"] for m in res["matrices"]], 0.4, label="GGUF blocks, TVM GEMV")
    a.bar(xs + 0.2, [m["torch_bf16_us"] for m in res["matrices"]], 0.4, label="bf16, torch.mv")
    a.set_xticks(xs, labels, fontsize=8)
    a.set_yscale("log")
    a.set_ylabel(f"us per call (one token, {res['threads']} thread(s), warm)")
    a.legend(fontsize=8)
    groups = (("forward", "dense FFN (fp32)"), ("forward_without_ffn", "FFN skipped"))
    gx = np.arange(len(groups))
    b.bar(gx - 0.2, [res[k]["quantized_ms"] for k, _ in groups], 0.4, label="GGUF blocks")
    b.bar(gx + 0.2, [res[k]["bf16_ms"] for k, _ in groups], 0.4, label="bf16")
    b.set_xticks(gx, [g for _, g in groups])
    b.set_ylabel(f"ms per decode token (median of {res['forward']['tokens']})")
    b.legend(fontsize=8)
    f = res["forward_without_ffn"]
    r = res["resident"]
    c.bar([0, 1], [r["quantized"]["non_ffn"] / 1e6, r["bf16"]["non_ffn"] / 1e6], color=["C0", "C1"])
    c.set_xticks([0, 1], ["GGUF blocks", "bf16"])
    c.set_ylabel("non-FFN weight MB held in DRAM")
    fig.suptitle(f"{res['model']}: non-FFN weights as GGUF blocks vs bf16 (x{r['ratio']:.2f} bytes, "
                 f"x{f['ratio']:.2f} non-FFN time per token)")
    fig.tight_layout()
    save_figure(fig, png)
