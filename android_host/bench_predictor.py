"""`ripple bench predictor`: how well activation predictors know the active set, what they
cost, and what their mistakes cost, on held-out text, side by side in one run.

Per sparsity: perplexity with the dense FFN, the oracle set and each predicted set (the
engine's policy: read the predicted set, keep what clears the true threshold); per layer and
overall recall, precision, predicted/true set size, and the extra bundle bytes read for false
positives as a share of the true set's bytes; predictor FLOPs against the dense FFN's.

Strategies, all through one set policy `(layer, h) -> predicted mask`:
- `lowrank`: tuning.predictor (the engine's default);
- `xgb_count`: an xgboost regressor per layer predicts the token's active count k from h,
  and the top c·k neurons by the low-rank logits are read (c fitted for the same recall);
- `static`: per layer the most often active neurons of the calibration tokens, as many as
  reach the same recall there (no per-token work at all: the floor a predictor must beat).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..atomic_file import save_figure

# torch is imported inside the functions that use it: `register` runs whenever the CLI
# builds its parser, and `ripple --help` must not wait for torch.
STRATEGIES = ("lowrank", "xgb_count", "static")


def register(bench_sub) -> None:
    p = bench_sub.add_parser("predictor", help="activation predictors: recall, precision, cost, perplexity")
    p.add_argument("--profile", required=True,
                   help="profile with FFN inputs (`ripple profile --record-inputs`)")
    p.add_argument("--model", help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M GGUF)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8],
                   help="profiled sparsities to train and measure at (default 0.5 0.8)")
    p.add_argument("--rank", type=int, default=48)
    p.add_argument("--recall", type=float, default=0.999, help="per-layer recall target (default 0.999)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--sweep", type=float, nargs="*", default=[],
                   help="also measure the low-rank predictor at these recall targets (of its trained grid)")
    p.add_argument("--predictors-dir", help="folder where trained low-rank predictors are kept, and reused "
                                            "when one of the same sparsity, rank and recall is there")
    p.add_argument("--json", required=True, help="results (a PNG is written beside it)")
    p.set_defaults(run=_run)


def _run(args) -> None:
    from ..atomic_file import write_json
    res = bench_predictor(args.profile, args.model, args.sparsities, args.rank, args.recall,
                          args.epochs, args.strategies, args.predictors_dir, args.sweep)
    write_json(args.json, res)
    png = plot(res, Path(args.json).with_suffix(".png"))
    print_table(res)
    print(f"wrote {args.json} and {png}")


# ------------------------------------------------------------------ strategies

def static_sets(masks_calib: np.ndarray, recall: float):
    """Per layer the most frequently active neurons, as few as reach `recall` of the
    calibration pairs."""
    import torch
    sets = []
    for m in masks_calib:                              # (tokens, n) per layer
        freq = m.sum(0)
        order = np.argsort(-freq, kind="stable")
        k = int(np.searchsorted(np.cumsum(freq[order]), recall * freq.sum()) + 1)
        keep = np.zeros(m.shape[1], bool)
        keep[order[:min(k, m.shape[1])]] = True
        sets.append(torch.from_numpy(keep))
    return (lambda layer, h: sets[layer].expand(h.shape[0], -1)), [int(s.sum()) for s in sets]


def _topk_mask(lg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    import torch
    ranks = torch.empty_like(lg, dtype=torch.long)
    ranks.scatter_(1, lg.argsort(1, descending=True), torch.arange(lg.shape[1]).expand_as(lg))
    return ranks < k[:, None]


def xgb_count_sets(tp, inputs: np.ndarray, mask_of, recall: float, val_frac: float = 0.1,
                   trees: int = 100, depth: int = 4):
    """Per layer, xgboost predicts the active count from h; the top c*count by low-rank logits
    are read, c the smallest of a grid reaching `recall` on the held-back tokens."""
    import torch
    import xgboost as xgb
    from tqdm import tqdm
    from ..tuning.predictor import logits
    L, N, _ = inputs.shape
    n_val = max(1, int(round(N * val_frac)))
    models, scales, val_err = [], [], []
    for layer in tqdm(range(L), desc="xgb_count", unit="layer"):
        x = np.asarray(inputs[layer], dtype=np.float32)
        y = np.asarray(mask_of(layer), dtype=bool)
        count = y.sum(1).astype(np.float32)
        m = xgb.train({"max_depth": depth, "eta": 0.1, "tree_method": "hist", "nthread": 1, "seed": 0},
                      xgb.DMatrix(x[:-n_val], label=count[:-n_val]), num_boost_round=trees)
        k_hat = torch.from_numpy(np.maximum(m.predict(xgb.DMatrix(x[-n_val:])), 1.0))
        val_err.append(float(np.mean(np.abs(k_hat.numpy() - count[-n_val:]) / np.maximum(count[-n_val:], 1))))
        lg = logits(tp, layer, torch.from_numpy(x[-n_val:]))
        truth = torch.from_numpy(y[-n_val:])
        order_ranks = torch.empty_like(lg, dtype=torch.long)
        order_ranks.scatter_(1, lg.argsort(1, descending=True), torch.arange(lg.shape[1]).expand_as(lg))
        c_best = None
        for c in np.arange(1.0, 6.01, 0.05):
            pred = order_ranks < torch.ceil(k_hat * c)[:, None]
            if int((pred & truth).sum()) >= recall * int(truth.sum()):
                c_best = float(c)
                break
        models.append(m)
        scales.append(c_best if c_best is not None else float(y.shape[1]))

    def sets(layer: int, h: torch.Tensor) -> torch.Tensor:
        k = np.maximum(models[layer].predict(xgb.DMatrix(h.numpy())), 1.0) * scales[layer]
        return _topk_mask(logits(tp, layer, h), torch.from_numpy(np.ceil(k)).long())
    return sets, {"count_rel_err": val_err, "scale": scales, "trees": trees, "depth": depth}


# ------------------------------------------------------------------ measurement

def _layer_rows(counts) -> list[dict]:
    return [{"layer": l, **{k: round(v, 5) for k, v in counts.summary(l).items()}}
            for l in range(len(counts.true))]


def bench_predictor(profile_path: str, model: str | None, sparsities: list[float], rank: int = 48,
                    recall: float = 0.999, epochs: int = 20, strategies=STRATEGIES,
                    save_dir: str | None = None, sweep: list[float] = ()) -> dict:
    from ..tuning.checkpoint import default_model_path, load_model
    from ..tuning.forward import to_torch
    from ..tuning.predictor import (PredictorError, SetCounts, TrainConfig, cost, lowrank_sets,
                                    load_predictor, predicted_ffn, save_predictor, to_torch as pred_to_torch,
                                    train_from_profile, training_data, with_recall)
    from ..tuning.profile import load_profile, thresholds_at
    from ..tuning.sparsity import perplexity, sparse_ffn

    prof = load_profile(profile_path)
    prof.inputs("calib")                     # refuse early when the inputs were not recorded
    path = model or default_model_path()
    desc = load_model(path)
    tm = to_torch(desc)
    if prof.source_hash != desc.source_hash:
        raise PredictorError(f"{profile_path}: profiled on another checkpoint than {path}")
    for s in sparsities:
        thresholds_at(prof.grid, prof.grid_thresholds, s)      # refuse unprofiled ones now
    held = prof.sequences("heldout")
    n_held = int(sum(len(q) - 1 for q in held))
    t0 = time.perf_counter()
    ppl_dense = perplexity(tm, held)
    ffn_bytes = desc.n_layers * desc.d_ffn * (3 if desc.activation == "swiglu" else 2) * desc.d_model * 2
    results = []
    for s in sparsities:
        thr = thresholds_at(prof.grid, prof.grid_thresholds, s)
        cfg = TrainConfig(rank=rank, recall=recall, epochs=epochs)
        kept = Path(save_dir) / f"predictor-s{s:g}.npz" if save_dir else None
        data = training_data(prof, tm, s)
        pred = load_predictor(kept) if kept and kept.is_file() else None
        if pred is not None and (pred.rank, pred.source_hash, pred.meta["train_tokens"],
                                 pred.meta.get("inputs_sparsity")) != \
                (rank, desc.source_hash, data.inputs.shape[1] - pred.meta["val_tokens"], s):
            pred = None
        elif pred is not None:
            pred = with_recall(pred, recall)     # training does not depend on the recall target
        if pred is None:
            pred = train_from_profile(prof, tm, cfg, s, data)
            if kept:
                kept.parent.mkdir(parents=True, exist_ok=True)
                save_predictor(pred, kept)
        else:
            print(f"bench predictor: reusing {kept} (same sparsity, rank, tokens)")
        tp = pred_to_torch(pred)
        c = cost(pred)
        ppl_oracle = perplexity(tm, held, sparse_ffn(tm, thr, prof.criterion))
        mask_of = data.masks
        runs = {}
        for name in strategies:
            extra = {}
            if name == "lowrank":
                sets, flops = lowrank_sets(tp), c.flops_per_token
            elif name == "static":
                sets, sizes = static_sets([mask_of(l) for l in range(desc.n_layers)], recall)
                flops, extra = 0, {"set_size_per_layer": sizes}
            else:
                sets, extra = xgb_count_sets(tp, data.inputs, mask_of, recall)
                # Low-rank logits, then one comparison per tree level, then a top-k selection.
                flops = c.flops_per_token + extra["trees"] * extra["depth"] + \
                    int(desc.d_ffn * np.log2(desc.d_ffn))
            counts = SetCounts.zeros(desc.n_layers)
            ppl = perplexity(tm, held, predicted_ffn(tm, sets, thr, prof.criterion, counts))
            tot = counts.summary()
            runs[name] = {"ppl": ppl, "recall": tot["recall"], "precision": tot["precision"],
                          "size_ratio": tot["size_ratio"], "extra_bytes_frac": tot["extra_frac"],
                          "missed_frac": tot["missed_frac"],
                          "predictor_flops_frac": flops / c.ffn_flops_per_token,
                          "layers": _layer_rows(counts), **extra}
        points = []
        for r in sweep:
            counts = SetCounts.zeros(desc.n_layers)
            sets = lowrank_sets(pred_to_torch(with_recall(pred, r)))
            ppl = perplexity(tm, held, predicted_ffn(tm, sets, thr, prof.criterion, counts))
            tot = counts.summary()
            points.append({"recall_target": r, "recall": tot["recall"], "precision": tot["precision"],
                           "size_ratio": tot["size_ratio"], "extra_bytes_frac": tot["extra_frac"],
                           "ppl": ppl, "ppl_vs_oracle": ppl / ppl_oracle - 1})
        main = runs.get("lowrank") or next(iter(runs.values()))
        results.append({
            "sparsity": s, "recall": main["recall"], "precision": main["precision"],
            "size_ratio": main["size_ratio"], "ppl_dense": ppl_dense, "ppl_oracle": ppl_oracle,
            "ppl_predicted": main["ppl"], "ppl_predicted_vs_oracle": main["ppl"] / ppl_oracle - 1,
            "predictor_flops_frac": main["predictor_flops_frac"],
            "extra_bytes_frac": main["extra_bytes_frac"], "missed_frac": main["missed_frac"],
            "predictor_flops_per_token_per_layer": c.flops_per_token,
            "ffn_flops_per_token_per_layer": c.ffn_flops_per_token,
            "predictor_dram_bytes": c.dram_bytes, "ffn_bytes_fp16": ffn_bytes,
            "rank": rank, "recall_target": recall,
            "train": {k: pred.meta[k] for k in ("train_tokens", "val_tokens")},
            "layers": main["layers"], "recall_sweep": points,
            "strategies": {k: {kk: vv for kk, vv in v.items() if kk != "layers"} | {"layers": v["layers"]}
                           for k, v in runs.items()},
        })
    return {"model": str(path), "profile": str(profile_path), "heldout_tokens": n_held,
            "heldout_text": prof.meta.get("text"), "criterion": prof.criterion,
            "policy": "read the predicted set; keep the neurons whose true score clears the threshold",
            "seconds": time.perf_counter() - t0, "results": results}


# ------------------------------------------------------------------ output

def print_table(res: dict) -> None:
    print(f"held-out tokens {res['heldout_tokens']}; policy: {res['policy']}")
    print(f"{'s':>4} {'strategy':>10} {'recall':>7} {'prec':>6} {'size':>6} {'extra':>6} "
          f"{'flops':>6} {'ppl':>8} {'vs oracle':>9}")
    for r in res["results"]:
        print(f"{r['sparsity']:4.2f} {'dense':>10} {'':>7} {'':>6} {'':>6} {'':>6} {'':>6} {r['ppl_dense']:8.3f}")
        print(f"{r['sparsity']:4.2f} {'oracle':>10} {1:7.3f} {1:6.3f} {1:6.2f} {0:6.1%} {'':>6} {r['ppl_oracle']:8.3f}")
        for name, v in r["strategies"].items():
            print(f"{r['sparsity']:4.2f} {name:>10} {v['recall']:7.3f} {v['precision']:6.3f} "
                  f"{v['size_ratio']:6.2f} {v['extra_bytes_frac']:6.1%} {v['predictor_flops_frac']:6.1%} "
                  f"{v['ppl']:8.3f} {v['ppl'] / r['ppl_oracle'] - 1:+9.1%}")
        for q in r.get("recall_sweep", []):
            print(f"{r['sparsity']:4.2f} {'r=' + format(q['recall_target'], 'g'):>10} {q['recall']:7.3f} "
                  f"{q['precision']:6.3f} {q['size_ratio']:6.2f} {q['extra_bytes_frac']:6.1%} {'':>6} "
                  f"{q['ppl']:8.3f} {q['ppl_vs_oracle']:+9.1%}")


def plot(res: dict, png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rs = res["results"]
    fig, ax = plt.subplots(1, 4, figsize=(21, 4.5))
    for r in rs:
        layers = [x["layer"] for x in r["layers"]]
        ax[0].plot(layers, [x["recall"] for x in r["layers"]], "o-", ms=3, label=f"recall s={r['sparsity']:g}")
        ax[0].plot(layers, [x["precision"] for x in r["layers"]], "s--", ms=3, label=f"precision s={r['sparsity']:g}")
        ax[1].plot(layers, [x["extra_frac"] for x in r["layers"]], "o-", ms=3, label=f"s={r['sparsity']:g}")
    ax[0].set(xlabel="layer", ylabel="share", title="low-rank predictor, held-out tokens")
    ax[0].legend(fontsize=7)
    ax[1].axhline(0.15, color="grey", ls=":", label="target 15%")
    ax[1].set(xlabel="layer", ylabel="extra bytes / true-set bytes", title="false-positive reads")
    ax[1].legend(fontsize=7)
    names = ["dense", "oracle"] + list(rs[0]["strategies"]) if rs else []
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [r["ppl_dense"] if name == "dense" else r["ppl_oracle"] if name == "oracle"
                else r["strategies"][name]["ppl"] for r in rs]
        ax[2].bar(np.arange(len(rs)) + i * width, vals, width, label=name)
    ax[2].set_xticks(np.arange(len(rs)) + width * (len(names) - 1) / 2, [f"s={r['sparsity']:g}" for r in rs])
    ax[2].set(ylabel="held-out perplexity", title="perplexity by active set")
    ax[2].legend(fontsize=7)
    for r in rs:
        main = {"recall_target": r["recall_target"], "extra_bytes_frac": r["extra_bytes_frac"],
                "ppl_vs_oracle": r["ppl_predicted_vs_oracle"]}
        pts = sorted(r.get("recall_sweep", []) + [main], key=lambda q: q["extra_bytes_frac"])
        if pts:
            ax[3].plot([q["extra_bytes_frac"] for q in pts], [1 + q["ppl_vs_oracle"] for q in pts], "o-",
                       label=f"s={r['sparsity']:g}")
            for q in pts:
                ax[3].annotate(f"{q['recall_target']:g}", (q["extra_bytes_frac"], 1 + q["ppl_vs_oracle"]), fontsize=6)
    ax[3].axhline(1.03, color="grey", ls=":", label="targets: +3%, 15%")
    ax[3].axvline(0.15, color="grey", ls=":")
    ax[3].set_yscale("log")
    ax[3].set(xlabel="extra bytes / true-set bytes", ylabel="perplexity / oracle's (log)",
              title="low-rank predictor by recall target")
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png)
    return png
