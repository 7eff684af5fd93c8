"""One library function per CLI verb; the CLI parses flags and calls these, tests call them
directly. Each writes its output atomically: a failed verb leaves no half-written file."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ..atomic_file import write_json
from ..layout.bundle import BLOCK_DTYPES, BundleSpec
from ..layout.pack import write_layout
from ..layout.quantization import QuantizationReport, encode_layer
from ..layout.reader import block_checks, check_source, describe, open_layout, verify_layout
from ..layout.whole_copy import (open_whole_copy, remove_whole_copy, verify_whole_copy, whole_checks,
                                 write_whole_copy)
from ..runtime_py.backends import ffn_backend
from ..runtime_py.engine import generate, report
from ..runtime_py.read_ahead import ReadAhead
from ..runtime_py.reader import FlashReader
from ..tuning.calibration import (CALIBRATION_PROMPTS, HELDOUT_PROMPTS, file_sequences,
                                  sample_sequences, split_heldout)
from ..tuning.checkpoint import default_model_path, load_model, load_tokenizer
from ..tuning.forward import quantizable_non_ffn, to_torch, to_torch_quantized
from ..tuning.load_gguf import ffn_q4_1_rows, ffn_tensors
from ..tuning.relu_tiny import SPLIT_TEXT_NOTE, split_sequences
from ..tuning.profile import Profile, ProfileError, load_profile, run_profile, save_profile, thresholds_at
from ..tuning.sparsify import trained_target


def profile_summary(p: Profile) -> dict:
    dens = p.density("heldout")
    return {
        "criterion": p.criterion, "sparsity": p.sparsity, "rule": p.meta.get("sparsity_rule"),
        "ppl_dense": p.meta.get("ppl_dense"),
        "table": [{"sparsity": float(s), "ppl": float(q)} for s, q in zip(p.grid, p.grid_ppl)],
        "heldout_active_fraction_per_layer": [round(float(x), 4) for x in dens],
        **{k: v for k, v in p.meta.items() if k.endswith("tokens") or k == "text"},
    }


def profile_cmd(model: str | None, out: str, text: list[str] | None = None, criterion: str = "coef",
                sparsity: float | None = None, ppl_budget: float = 0.10, calib_tokens: int = 1024,
                heldout_tokens: int = 512, seq_len: int = 128, seed: int = 0,
                record_inputs: bool = False) -> dict:
    path = model or default_model_path()
    desc = load_model(path)
    tok = load_tokenizer(path)
    tm = to_torch(desc)
    own = None if text else split_sequences(path, calib_tokens, heldout_tokens, seq_len)
    if text:
        seqs = file_sequences(tok, text, seq_len)
        calib, held = split_heldout(seqs, heldout_tokens / (calib_tokens + heldout_tokens))
        source = f"files: {', '.join(text)} (last sequences held out)"
    elif own is not None:          # a folder that records text it was not trained on (relu-tiny)
        (calib, held), source = own, SPLIT_TEXT_NOTE
    else:
        calib = sample_sequences(tm, tok, CALIBRATION_PROMPTS, calib_tokens, seq_len, seed, "calibration text")
        held = sample_sequences(tm, tok, HELDOUT_PROMPTS, heldout_tokens, seq_len, seed + 1, "held-out text")
        source = "self-sampled (temperature 0.8, top-50); disjoint prompt lists and seeds"
    meta = {"text": source, "model": str(path)}
    if sparsity is None and (sparsity := trained_target(path)) is not None:
        meta["sparsity_rule"] = "the target `ripple sparsify` trained this model for"
    p = run_profile(tm, calib, held, criterion, sparsity, ppl_budget, meta=meta, record_inputs=record_inputs)
    save_profile(p, out)
    return profile_summary(p)


def pack_cmd(model: str | None, out_dir: str, profile: str | None = None,
             placement: str | None = None, dtype: str = "fp16", whole_copy: bool = False) -> dict:
    """whole_copy: also write the GGUF's own FFN blocks per layer (layout.whole_copy), which
    the engine reads for layers it reads whole; without it an earlier pack's copy is removed."""
    path = model or default_model_path()
    desc = load_model(path)
    if whole_copy:
        whole_layers = ffn_tensors(path, desc.n_layers)      # refused before anything is written
    meta: dict = {"model": desc.name or str(path), "arch": desc.arch}
    if profile:
        p = load_profile(profile)
        if p.source_hash != desc.source_hash:
            raise ProfileError(f"{profile}: profiled on another checkpoint than {path}; "
                               "profile this model first")
        meta.update(sparsity=p.sparsity, criterion=p.criterion, thresholds=p.thresholds.tolist(),
                    grid=p.grid.tolist(), grid_thresholds=p.grid_thresholds.tolist(),
                    grid_ppl=p.grid_ppl.tolist(), ppl_dense=p.meta.get("ppl_dense"))
    perms = load_placement(placement, desc.n_layers, desc.d_ffn) if placement else \
        [np.arange(desc.d_ffn) for _ in range(desc.n_layers)]
    meta["placement"] = placement or "identity"
    spec = BundleSpec(desc.activation, desc.d_model, dtype, desc.layers[0].b_up is not None)
    # q4/q4d8 from a GGUF: its Q4_1 gate/up rows go into the bundles as they are (no second rounding).
    blocks = ffn_q4_1_rows(path, desc.n_layers) if dtype in BLOCK_DTYPES and Path(path).suffix == ".gguf" \
        else [{} for _ in desc.layers]
    report, quantization = QuantizationReport(dtype), {}

    def layers():
        for lw, perm, q4_blocks in zip(desc.layers, perms, blocks):
            yield encode_layer(spec, lw.w_up, lw.w_down, lw.w_gate, lw.b_up, q4_blocks, report), perm
        quantization.update(report.to_dict())

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_layout(out_dir, spec, layers(), meta, str(path), desc.source_hash, arch=desc.arch,
                 quantization=quantization)
    if whole_copy:
        verify_whole_copy(write_whole_copy(out_dir, whole_layers, path, desc.source_hash))
    else:
        remove_whole_copy(out_dir)
    return layout_summary(open_layout(out_dir, verify=True))


def layout_summary(layout) -> dict:
    """What `ripple pack` and `ripple inspect` print: the layout, the bytes a token reads, and
    the encoding's error against the source weights."""
    info = describe(layout)
    dense = layout.n_layers * layout.d_ffn * layout.bundle_bytes
    info["ffn_bytes_per_token"] = {"dense": dense}
    sparsity = layout.manifest.meta.get("sparsity")
    if sparsity is not None:
        # The mean over tokens: each token reads its own active set, (1 - sparsity) of them.
        info["ffn_bytes_per_token"][f"at_sparsity_{sparsity:g}"] = round((1 - sparsity) * dense)
    info["quantization"] = layout.manifest.quantization
    copy = open_whole_copy(layout.path.parent, layout.manifest.source_hash)
    if copy is not None:
        info["whole_copy"] = {"file": str(copy.path), "layer_bytes": copy.layer_bytes,
                              "parts": {p.name: p.kind for p in copy.parts},
                              "bytes_per_token_read_whole": copy.layer_bytes * copy.n_layers}
    return info


def load_placement(path: str, n_layers: int, n: int) -> list[np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            perm = np.asarray(z["perm"])
    except Exception as e:
        raise ValueError(f"{path}: unreadable placement ({e}); write it with `ripple place`") from e
    if perm.shape != (n_layers, n):
        raise ValueError(f"{path}: placement has shape {perm.shape}, model needs ({n_layers}, {n})")
    return list(perm)


def inspect_cmd(path: str, verify: bool = False) -> dict:
    layout = open_layout(path, verify=False)
    if verify:
        verify_layout(layout)
        copy = open_whole_copy(layout.path.parent, layout.manifest.source_hash)
        if copy is not None:
            verify_whole_copy(copy)
    info = layout_summary(layout)
    info["verified"] = verify
    return info


NON_FFN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def generate_cmd(layout_dir: str, model: str | None = None, prompt: str = "What is flash memory?",
                 tokens: int = 16, sparsity: float | None = None, queue_depth: int = 32,
                 chat: bool = True, o_direct: bool = True, json_out: str | None = None,
                 backend: str = "torch", sets: str | None = None, predictor: str | None = None,
                 verify: bool = False, measure_misses: bool = True, non_ffn_dtype: str = "bf16",
                 read_ahead: int = 2, storage: str | None = None, predictor_dtype: str = "fp16",
                 whole_copy: bool = True, pin_mb: float = 0.0) -> dict:
    """sets: "predicted" (default when the layout folder holds predictor.npz, or --predictor is
    given) or "oracle" (true sets computed beside the engine; measurement only).
    verify: check every block read against its CRC (layout.block_crc; costs CPU per byte read).
    measure_misses: with predicted sets, score the oracle beside the engine (missed neurons,
    extra bytes); off, no FFN weight is kept in DRAM. non_ffn_dtype: "bf16" or "fp32" storage
    of attention and embedding/LM-head matrices (tuning.forward.to_torch), or "gguf": the GGUF's
    own Q4_1/Q8_0 blocks, multiplied in place (to_torch_quantized). read_ahead: layers a
    nearly whole layer's region is read early, overlapping compute (runtime_py.read_ahead; 0: off).
    storage: a device profile (`ripple probe storage --out`, or a shipped name): reads are planned
    by ours' cheapest-plan planner on its latency table (access collapse) instead of one read
    per run. predictor_dtype: how the predictor is held in DRAM ("fp16" or "int8").
    whole_copy: layers read ahead are read from the layout's whole copy when it has one
    (`ripple pack --whole-copy`: the GGUF's own blocks, every neuron computed). pin_mb: DRAM
    for whole layers of that copy, read once at start (runtime_py.read_ahead pin_bytes)."""
    if tokens < 1:
        raise ValueError(f"--tokens {tokens}: must be at least 1")
    path = model or default_model_path()
    layout = open_layout(layout_dir)
    desc = load_model(path)
    check_source(layout, desc.source_hash)
    meta = layout.manifest.meta
    if sparsity is None:
        sparsity = float(meta.get("sparsity", 0.0))
    if sparsity == 0.0:
        thresholds = np.full(desc.n_layers, -1.0)
    else:
        if "grid" not in meta:
            raise ValueError(f"{layout_dir}: packed without a profile, so only --sparsity 0 works; "
                             "pack with --profile")
        thresholds = thresholds_at(meta["grid"], meta["grid_thresholds"], sparsity)
    if non_ffn_dtype not in NON_FFN_DTYPES and non_ffn_dtype != "gguf":
        raise ValueError(f"--non-ffn-dtype {non_ffn_dtype}: choose gguf, {', '.join(NON_FFN_DTYPES)}")
    if non_ffn_dtype == "gguf" and not quantizable_non_ffn(desc):
        raise ValueError(f"{path}: --non-ffn-dtype gguf needs a GGUF whose attention and embedding "
                         "matrices are Q4_1 or Q8_0; use bf16")
    planner = None
    if storage is not None:
        from ..runtime_py.strategies import STRATEGIES, layer_planner
        from .devices import load_device
        planner = layer_planner(STRATEGIES["ours"], load_device(storage).storage, queue_depth, desc.d_ffn)
    label, policy = set_policy(layout, desc, sparsity, sets, predictor, predictor_dtype)
    tok = load_tokenizer(path)
    ffn = label == "oracle" or measure_misses
    tm = to_torch_quantized(desc, ffn=ffn) if non_ffn_dtype == "gguf" else \
        to_torch(desc, NON_FFN_DTYPES[non_ffn_dtype], ffn=ffn)
    n_neurons = desc.n_layers * desc.d_ffn
    del desc             # tm holds what the engine needs; the float32 arrays of the rest go
    if chat and getattr(tok, "chat_template", None):
        ids = list(tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False))
    else:
        ids = list(tok(prompt)["input_ids"])
    checks = block_checks(layout) if verify else None
    copy = open_whole_copy(layout.path.parent, layout.manifest.source_hash) if whole_copy and read_ahead else None
    if pin_mb and copy is None:
        raise ValueError(f"--pin-mb {pin_mb:g}: pins whole layers of a whole copy, and {layout_dir} has none "
                         "(or --no-whole-copy / --read-ahead 0 is given); pack with --whole-copy")
    with _torch_threads(1 if backend == "tvm" else None), \
            FlashReader(layout.path, queue_depth, o_direct, checks=checks) as reader, \
            (ReadAhead(layout, queue_depth, read_ahead, o_direct=o_direct,
                       checks=whole_checks(copy) if copy is not None and verify else checks, whole_copy=copy,
                       pin_bytes=int(pin_mb * (1 << 20)))
             if read_ahead else contextlib.nullcontext()) as ahead:
        gen = generate(tm, layout, reader, thresholds, meta.get("criterion", "coef"), ids, tokens, tok,
                       ffn_backend(backend), policy, planner=planner, measure_misses=measure_misses, ahead=ahead)
        rep = report(gen, reader, n_neurons, label)
    out = {"engine": "python", "model": str(path), "layout": str(layout.path), "sparsity": sparsity,
           "prompt": prompt, "prompt_ids": ids, "text": gen.text, "tokens": gen.tokens, **rep}
    if json_out:
        write_json(json_out, out)
    return out


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Torch on n threads inside (None: as it is). With the TVM backend the heavy work runs in
    TVM's own pool; a second OpenMP pool spinning beside it on the same cores made a token 3-5x
    slower (bench e2e), so torch's small per-token ops run on one."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_predictor_cmd(profile: str, out: str, model: str | None = None, sparsity: float | None = None,
                        rank: int = 48, recall: float = 0.999, epochs: int = 20, seed: int = 0,
                        lookahead: int = 0) -> dict:
    """Train per-layer activation predictors from a profile with recorded FFN inputs; `out` is
    a layout folder (written as DIR/predictor.npz, refused if packed from another checkpoint)
    or a .npz file. lookahead J > 0: also layer l+j's set from layer l's input for j = 1..J
    (tuning.lookahead, written beside it as lookahead.npz), with each distance's held-out
    recall and bytes predicted for nothing beside the same-layer predictor's."""
    from ..tuning.predictor import TrainConfig, cost, save_predictor, train_from_profile
    path = model or default_model_path()
    desc = load_model(path)
    p = load_profile(profile)
    p.inputs("calib")
    if p.source_hash != desc.source_hash:
        raise ProfileError(f"{profile}: profiled on another checkpoint than {path}; "
                           "profile this model first")
    if lookahead and sparsity is not None and not np.isclose(sparsity, p.sparsity):
        raise ProfileError(f"--lookahead trains at the profile's sparsity ({p.sparsity:g}), not {sparsity:g}; "
                           f"profile at {sparsity:g} (`ripple profile --sparsity`)")
    if Path(out).is_dir():
        check_source(open_layout(out), desc.source_hash)
    cfg = TrainConfig(rank=rank, recall=recall, epochs=epochs, seed=seed)
    pred = train_from_profile(p, to_torch(desc), cfg, sparsity)
    dest = save_predictor(pred, out)
    c = cost(pred)
    layers = pred.meta["layers"]
    res = {"predictor": str(dest), "sparsity": pred.sparsity, "rank": pred.rank, "recall_target": recall,
           "train_tokens": pred.meta["train_tokens"], "val_tokens": pred.meta["val_tokens"],
           "dram_bytes": c.dram_bytes, "flops_per_token_per_layer": c.flops_per_token,
           "flops_frac_of_dense_ffn": c.flops_frac,
           "val_recall_per_layer": [round(x["val_recall"], 4) for x in layers],
           "val_precision_per_layer": [round(x["val_precision"], 4) for x in layers]}
    if lookahead:
        res["lookahead"] = _train_lookahead(p, pred, cfg, lookahead, dest)
    return res


def _train_lookahead(p, pred, cfg, lookahead: int, dest: Path) -> dict:
    from ..tuning.lookahead import beside, heldout_rows, same_layer_row, save_lookahead, train_lookahead
    la = train_lookahead(p, list(range(1, lookahead + 1)), cfg)
    file = beside(dest)
    save_lookahead(la, file)
    rows = [same_layer_row(pred, p)] + heldout_rows(la, p)
    density = p.density("heldout")

    def per_layer(v) -> list:
        return [None if np.isnan(x) else round(float(x), 4) for x in v]
    return {"file": str(file), "distances": la.distances, "heldout_tokens": int(p.masks_heldout.shape[1]),
            "true_active_per_layer": per_layer(density),
            "heldout": [{"distance": r.distance,
                         "recall_mean": round(float(np.nanmean(r.recall)), 4),
                         "recall_min": round(float(np.nanmin(r.recall)), 4),
                         "extra_over_active_mean": round(float(np.nanmean(r.extra)), 4),
                         "predicted_share_mean": round(float(np.nanmean(r.predicted)), 4),
                         "recall_per_layer": per_layer(r.recall), "extra_per_layer": per_layer(r.extra),
                         "predicted_share_per_layer": per_layer(r.predicted)} for r in rows]}


def set_policy(layout, desc, sparsity: float, sets: str | None, predictor: str | None,
               predictor_dram: str = "fp16"):
    """(label, policy): ("oracle", None), or ("predicted", the low-rank predictor's set policy),
    the predictor checked against the model and the sparsity it was trained for and held in
    DRAM as predictor_dram (tuning.predictor.to_torch)."""
    from ..tuning.predictor import (PREDICTOR_FILE, PredictorError, check_predictor, load_predictor,
                                    lowrank_sets, to_torch as predictor_to_torch)
    if sets is None:
        sets = "predicted" if predictor or (layout.path.parent / PREDICTOR_FILE).is_file() else "oracle"
    if sets == "oracle":
        return "oracle", None
    where = predictor or layout.path.parent / PREDICTOR_FILE
    pred = load_predictor(where)
    check_predictor(pred, desc.source_hash, desc.n_layers, desc.d_model, desc.d_ffn, str(where))
    if not np.isclose(pred.sparsity, sparsity):
        raise PredictorError(f"{where} was trained for sparsity {pred.sparsity:g}, not {sparsity:g}; pass "
                             f"--sparsity {pred.sparsity:g} or --sets oracle, or train one with "
                             f"`ripple train-predictor --sparsity {sparsity:g}`")
    criterion = layout.manifest.meta.get("criterion", "coef")
    if pred.criterion != criterion:
        raise PredictorError(f"{where} predicts {pred.criterion!r} sets, the layout was packed for "
                             f"{criterion!r}; train it from a {criterion!r} profile")
    return "predicted", lowrank_sets(predictor_to_torch(pred, predictor_dram))


def sparsify_cmd(model: str | None, out: str, target: float = 0.85, minutes: float = 30.0,
                 train_tokens: int = 65536, text: list[str] | None = None, lr: float = 1e-4,
                 batch: int = 4, seq_len: int = 256, calib_tokens: int = 1024,
                 heldout_tokens: int = 2048, seed: int = 0, threads: int | None = None) -> dict:
    """`ripple sparsify`: OUT, an HF folder of the model fine-tuned to run at `target` sparsity
    (tuning.sparsify). Text: sampled by the original model (training from TRAINING_PROMPTS;
    calibration and held-out exactly as `ripple profile` samples them, so the frontier's
    original side is `ripple profile --calib-tokens C --heldout-tokens H` of the original),
    or the user's files (last sequences held out)."""
    from ..tuning.calibration import TRAINING_PROMPTS
    from ..tuning.relu_tiny import write_split_texts
    from ..tuning.sparsify import Settings, SparsifyError, Text, check, sparsify

    if Path(out).exists():
        raise SparsifyError(f"{out} exists; pass a new --out (or remove it)")
    path = model or default_model_path()
    desc = load_model(path)
    settings = Settings(target, minutes, lr, batch, seq_len, seed=seed)
    check(desc, settings)
    tok = load_tokenizer(path)

    def make_text() -> Text:
        if text:
            seqs = file_sequences(tok, text, seq_len)
            train, held = split_heldout(seqs, heldout_tokens / max(1, sum(map(len, seqs))))
            return Text(train, train[: max(1, calib_tokens // seq_len)], held,
                        f"files: {', '.join(text)} (last sequences held out, never trained on)")
        tm = to_torch(desc)
        calib = sample_sequences(tm, tok, CALIBRATION_PROMPTS, calib_tokens, 128, seed, "calibration text")
        held = sample_sequences(tm, tok, HELDOUT_PROMPTS, heldout_tokens, 128, seed + 1, "held-out text")
        # bf16 and 32 rows at a time: the training text is the slow part to sample (~190 tok/s
        # on 2 cores), and its exact tokens matter less than its amount.
        fast = to_torch(desc, dtype=torch.bfloat16)
        train = sample_sequences(fast, tok, TRAINING_PROMPTS, train_tokens, seq_len, seed + 2,
                                 "training text", batch=32)
        return Text(train, calib, held, "self-sampled by the original (temperature 0.8, top-50): "
                    "training, calibration and held-out from disjoint seeds, held-out prompts never trained on")

    def split_text(folder: Path, t: Text) -> None:
        joined = lambda seqs: "\n\n".join(tok.decode(q.tolist()) for q in seqs)  # noqa: E731
        write_split_texts(folder, joined(t.calib), joined(t.heldout),
                          {"label": f"{desc.name or path}, sparsified: the original's text", "source": t.source})

    with _torch_threads(threads):
        return sparsify(desc, make_text, settings, out, tokenizer=tok, extra_files=split_text)


def plot_sparsify(report: dict, png: str) -> None:
    """Held-out perplexity rise against inactive fraction: the original thresholded and the
    sparsified model, with the goal marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = report["frontier"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, label in (("original", "original, thresholded (coef)"),
                        ("sparsified", f"sparsified ({report['steps']} steps, "
                                       f"{report['train_seconds'] / 60:.0f} min)")):
        ratio = f["original_thresholded_ppl_ratio" if side == "original" else "sparsified_ppl_ratio"]
        ax.plot(f[f"{side}_heldout_inactive"], [100 * (r - 1) for r in ratio], marker="o", label=label)
    ax.plot([0.85], [15], marker="*", markersize=14, linestyle="", color="k", label="goal: 85% at +15%")
    ax.set_xlabel("FFN neurons inactive per held-out token (thresholds from calibration text)")
    ax.set_ylabel("held-out perplexity rise over dense original (%)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_title(f"ripple sparsify: {report['model']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
