"""ripple sparsify: fine-tune a SwiGLU model so that most of its FFN neurons can be skipped.

Method (mask distillation): the model keeps its architecture, and is trained end to end to
reproduce the original's next-token distributions (KL to the original's logits) while its
FFN runs under the mask the engine applies: a neuron is dropped when its coefficient
|silu(gate)*up| is at or below the layer's threshold (sparsity.py's `coef` criterion). The
threshold is the batch's quantile at a sparsity that rises from 0 to the target over the
first `ramp` of the budget (ProSparse's progressive regularisation, as a schedule on the
mask instead of an L1 weight), then holds while the learning rate decays. Gradients pass
through the kept neurons only.

Why this and not the alternatives the issue listed:
- a ReLU-gated FFN (ReLU or dReLU swap) is a new activation for every stage after this one
  (bundle format, TVM kernels, engine, native runtime); a SwiGLU model that thresholds well
  is read by all of them as it is;
- per-layer (local) distillation on recorded FFN inputs overfit 10k tokens and its errors
  compound over layers (the issue's probe); end to end, every token gives a whole
  distribution to match, and the loss is what the held-out perplexity measures.

The output is a Hugging Face folder (save_hf) with the original's tokenizer, the text the
evaluation used (so `ripple profile --model OUT` measures on the original's held-out text,
not on the fine-tuned model's own samples) and `ripple/sparsify.json`. Work happens in
OUT.partial, checkpointed every few minutes: running the same command again resumes there,
and OUT appears only when the model is complete.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .forward import FFN, TorchModel, forward_with_grad, to_torch
from .model import ModelDesc
from .profile import active_fraction, frontier
from .save_hf import save_hf

# The frontier is measured at these calibration sparsities (and the target), for the original
# thresholded and for the sparsified model, on the same held-out text; held-out text is
# a little denser than calibration text at the same thresholds (SmolLM2 at 0.85: 83.9%
# inactive), hence the points just above 0.85.
GRID = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.86, 0.87, 0.88, 0.9)
FORMAT = "ripple-sparsify-1"
STATE = "state.pt"
TEXT = "text.npz"
CHECKPOINT_SECONDS = 300.0
RECORDS = "ripple"
REPORT = f"{RECORDS}/sparsify.json"


class SparsifyError(ValueError):
    """Input sparsify cannot take; the message names it and the fix."""


@dataclass(frozen=True)
class Settings:
    target: float = 0.85          # fraction of FFN neurons inactive per token
    minutes: float = 30.0         # training budget (sampling text and evaluating come on top)
    lr: float = 1e-4
    batch: int = 4                # windows per step
    seq_len: int = 256            # training window, tokens
    ramp: float = 0.5             # share of the budget over which the mask's sparsity rises
    seed: int = 0

    def resumable_with(self, other: "Settings") -> bool:
        """A longer or shorter budget continues the same run; anything else is another run."""
        return dataclasses.replace(self, minutes=0) == dataclasses.replace(other, minutes=0)


@dataclass
class Text:
    """Token sequences: training windows' source, calibration (sets thresholds) and held-out
    (perplexity), the last two never trained on when they come from their own prompts."""
    train: list[np.ndarray]
    calib: list[np.ndarray]
    heldout: list[np.ndarray]
    source: str


@dataclass
class Progress:
    step: int = 0
    seconds: float = 0.0          # training time spent, over every resumed run
    tokens: int = 0
    losses: list = field(default_factory=list)     # (step, sparsity, loss) every few steps


def check(desc: ModelDesc, settings: Settings) -> None:
    if desc.activation != "swiglu":
        raise SparsifyError(f"{desc.name or desc.source}: a {desc.activation} FFN is already exactly "
                            f"sparse; sparsify takes SwiGLU (Llama-family) models")
    if not 0.0 < settings.target < 1.0:
        raise SparsifyError(f"target sparsity {settings.target} is outside (0, 1); pass e.g. "
                            f"--target-sparsity 0.85")
    if settings.minutes <= 0 or settings.lr <= 0 or settings.batch < 1 or settings.seq_len < 2:
        raise SparsifyError("--minutes, --lr, --batch must be positive and --seq-len at least 2")
    if not 0.0 <= settings.ramp <= 1.0:
        raise SparsifyError(f"ramp {settings.ramp} is outside [0, 1]")


def trained_target(folder: str | os.PathLike) -> float | None:
    """The sparsity a folder written by sparsify was trained for; None for any other model.
    Profiling takes it as the default instead of the usual rule (highest sparsity within 10%
    of dense), which can stop short of it: the user chose the target, and its cost against
    the original is what sparsify's report gives."""
    report = Path(folder) / REPORT
    if not report.is_file():
        return None
    return float(json.loads(report.read_text())["settings"]["target"])


def mask_sparsity(settings: Settings, p: float) -> float:
    """The mask's sparsity at fraction p of the budget."""
    return settings.target if settings.ramp == 0 else settings.target * min(1.0, p / settings.ramp)


def learning_rate(settings: Settings, p: float) -> float:
    """Constant while the mask tightens, then a cosine to a tenth."""
    if p <= settings.ramp:
        return settings.lr
    q = min(1.0, (p - settings.ramp) / max(1e-9, 1.0 - settings.ramp))
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * q)))


def masked_ffn(tm: TorchModel, sparsity: float) -> FFN:
    """The SwiGLU FFN with the batch's smallest |coefficients| dropped, a fraction `sparsity`
    of (token, neuron) pairs per layer: the engine's threshold, taken on the batch."""
    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        w = tm.layers[layer]
        coef = F.silu(F.linear(h, w["w_gate"])) * F.linear(h, w["w_up"])
        if sparsity > 0:
            a = coef.detach().abs().reshape(-1).float()
            k = max(1, int(a.numel() * sparsity))
            coef = coef * (coef.detach().abs() > a.kthvalue(k).values)
        return F.linear(coef, w["w_down"])
    return ffn


def windows(train: list[np.ndarray], seq_len: int) -> np.ndarray:
    """(n, seq_len) int64: the training sequences back to back, cut into whole windows (a
    window may span two sequences: the original sees the same context, so the target holds)."""
    stream = np.concatenate(train)
    n = len(stream) // seq_len
    if n < 1:
        raise SparsifyError(f"only {len(stream)} training tokens; need at least one window of "
                            f"{seq_len} (more --train-tokens, or a smaller --seq-len)")
    return stream[: n * seq_len].reshape(n, seq_len).astype(np.int64)


def batch_windows(step: int, settings: Settings, n: int) -> np.ndarray:
    """Indices of step's windows: epochs of one seeded permutation each, so a resumed run
    takes the windows the uninterrupted one would have."""
    i = np.arange(step * settings.batch, (step + 1) * settings.batch)
    epochs = i // n
    return np.array([np.random.default_rng((settings.seed, int(e))).permutation(n)[j]
                     for e, j in zip(epochs, i % n)])


def _trainable(tm: TorchModel) -> list[torch.Tensor]:
    """Every per-layer tensor (attention, norms, FFN): the embedding and LM head stay, as
    they hold a third of the model and the mask is inside the layers."""
    return [w for layer in tm.layers for w in layer.values() if w is not None]


def student_of(desc: ModelDesc, device: str) -> TorchModel:
    """The model to train: fp32 tensors of its own (never views of desc's arrays)."""
    tm = to_torch(desc)
    for layer in tm.layers:
        for k, w in layer.items():
            if w is not None:
                layer[k] = w.detach().clone().to(device).requires_grad_(True)
    return _to(tm, device)


def _to(tm: TorchModel, device: str) -> TorchModel:
    if device == "cpu":
        return tm
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dataclasses.replace(tm, embed=move(tm.embed), lm_head=move(tm.lm_head),
                               final_norm=move(tm.final_norm), inv_freq=move(tm.inv_freq),
                               layers=[{k: move(v) for k, v in d.items()} for d in tm.layers])


def weights_back(tm: TorchModel, desc: ModelDesc) -> ModelDesc:
    """desc with the trained per-layer tensors of tm (a new ModelDesc; desc is not changed)."""
    layers = [dataclasses.replace(lw, **{k: w.detach().float().cpu().numpy().copy()
                                         for k, w in d.items() if w is not None})
              for lw, d in zip(desc.layers, tm.layers)]
    return dataclasses.replace(desc, layers=layers)


def train(student: TorchModel, teacher: TorchModel, wins: np.ndarray, settings: Settings,
          work: Path, progress: Progress, opt_state: dict | None) -> Progress:
    """Train until settings.minutes of training time have been spent (over every resumed run),
    checkpointing into work every CHECKPOINT_SECONDS."""
    params = _trainable(student)
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    budget = settings.minutes * 60.0
    device = params[0].device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    last_save = time.monotonic()
    bar = tqdm(total=round(budget), initial=min(round(progress.seconds), round(budget)),
               desc="sparsify: training", unit="s")
    while progress.seconds < budget:
        t0 = time.monotonic()
        p = progress.seconds / budget
        s = mask_sparsity(settings, p)
        for g in opt.param_groups:
            g["lr"] = learning_rate(settings, p)
        tokens = torch.from_numpy(wins[batch_windows(progress.step, settings, len(wins))]).to(device)
        with autocast:
            with torch.no_grad():       # not inference_mode: the loss keeps the target for backward
                target = F.log_softmax(forward_with_grad(teacher, tokens).float(), -1)
            logits = forward_with_grad(student, tokens, ffn=masked_ffn(student, s))
            loss = F.kl_div(F.log_softmax(logits.float(), -1), target, log_target=True,
                            reduction="sum") / tokens.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress.step += 1
        progress.tokens += tokens.numel()
        spent = time.monotonic() - t0
        progress.seconds += spent
        value = float(loss.detach())
        if progress.step % 5 == 1:
            progress.losses.append((progress.step, round(s, 4), round(value, 5)))
        bar.set_postfix(loss=f"{value:.4f}", sparsity=f"{s:.3f}", tok_s=f"{tokens.numel() / spent:.0f}",
                        refresh=False)
        bar.update(min(round(progress.seconds), round(budget)) - bar.n)
        if time.monotonic() - last_save > CHECKPOINT_SECONDS:
            save_state(work, student, opt, progress, settings)
            last_save = time.monotonic()
    bar.close()
    save_state(work, student, opt, progress, settings)
    return progress


def save_state(work: Path, tm: TorchModel, opt: torch.optim.Optimizer | None,
               progress: Progress, settings: Settings) -> None:
    state = {"format": FORMAT, "settings": dataclasses.asdict(settings),
             "progress": dataclasses.asdict(progress),
             "weights": [{k: w.detach().cpu() for k, w in d.items() if w is not None} for d in tm.layers],
             "optimizer": None if opt is None else opt.state_dict()}
    tmp = work / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, work / STATE)


def load_state(work: Path, tm: TorchModel, settings: Settings) -> tuple[Progress, dict | None]:
    """Progress and optimizer state of an earlier run in work (loading its weights into tm),
    or a fresh start."""
    path = work / STATE
    if not path.is_file():
        return Progress(), None
    state = torch.load(path, weights_only=False)
    earlier = Settings(**state["settings"])
    if state.get("format") != FORMAT or not earlier.resumable_with(settings):
        raise SparsifyError(f"{work}: an earlier run with other settings ({earlier}); pass its "
                            f"settings again to resume, or remove {work} to start over")
    with torch.no_grad():
        for d, saved in zip(tm.layers, state["weights"]):
            for k, w in saved.items():
                d[k].copy_(w)
    return Progress(**state["progress"]), state["optimizer"]


def save_text(work: Path, text: Text) -> None:
    arrays = {}
    for side in ("train", "calib", "heldout"):
        seqs = getattr(text, side)
        arrays[f"{side}_tokens"] = np.concatenate(seqs).astype(np.int32)
        arrays[f"{side}_lens"] = np.array([len(q) for q in seqs], dtype=np.int64)
    tmp = work / ("tmp-" + TEXT)
    np.savez(tmp, source=np.array(text.source), **arrays)
    os.replace(tmp, work / TEXT)


def load_text(work: Path) -> Text | None:
    path = work / TEXT
    if not path.is_file():
        return None
    z = np.load(path)
    split = {side: [a.astype(np.int64) for a in np.split(z[f"{side}_tokens"], np.cumsum(z[f"{side}_lens"])[:-1])]
             for side in ("train", "calib", "heldout")}
    return Text(**split, source=str(z["source"]))


def evaluate(original: TorchModel, student: TorchModel, text: Text, target: float) -> dict:
    """The frontier of both models on the same held-out text, and the issue's two figures at
    the target: inactive_fraction (held-out, mean over layers) and ppl_ratio."""
    grid = tuple(sorted(set(GRID) | {target}))
    thr_orig, ppl_orig = frontier(original, text.calib, text.heldout, grid, desc="original")
    thr, ppl_new = frontier(student, text.calib, text.heldout, grid, desc="sparsified")
    i = grid.index(target)
    inactive = 1.0 - active_fraction(student, text.heldout, "coef", thr[i])
    held = lambda tm, thrs: [round(1.0 - float(active_fraction(tm, text.heldout, "coef", t).mean()), 4)  # noqa: E731
                             for t in thrs]
    dense = float(ppl_orig[0])
    return {
        "inactive_fraction": float(inactive.mean()),
        "inactive_fraction_per_layer": [round(float(x), 4) for x in inactive],
        "ppl_ratio": float(ppl_new[i] / dense),
        "ppl_dense_original": dense,
        "ppl_sparsified_at_target": float(ppl_new[i]),
        "ppl_sparsified_dense": float(ppl_new[0]),
        "thresholds": [float(x) for x in thr[i]],
        "frontier": {"sparsity": list(grid),
                     "original_thresholded_ppl_ratio": [float(q / dense) for q in ppl_orig],
                     "sparsified_ppl_ratio": [float(q / dense) for q in ppl_new],
                     # what the thresholds of each calibration sparsity leave inactive on held-out text
                     "original_heldout_inactive": held(original, thr_orig),
                     "sparsified_heldout_inactive": held(student, thr)},
    }


def sparsify(desc: ModelDesc, make_text: Callable[[], Text], settings: Settings,
             out: str | os.PathLike, tokenizer=None,
             extra_files: Callable[[Path, Text], None] | None = None) -> dict:
    """Train, evaluate and write OUT (an HF folder); the report is also OUT/ripple/sparsify.json.
    make_text() gives the token sequences, called only when OUT.partial has none yet (a
    resumed run keeps the text it began with); extra_files(folder, text) may add files to
    the folder before it is put in place (e.g. the text split)."""
    check(desc, settings)
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    if out.exists():
        raise SparsifyError(f"{out} exists; pass a new --out (or remove it)")
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    torch.manual_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if load_text(work) is None:
        save_text(work, make_text())
    text_seconds = time.monotonic() - started
    text = load_text(work)
    student = student_of(desc, device)
    progress, opt_state = load_state(work, student, settings)
    teacher = _to(to_torch(desc, dtype=torch.bfloat16), device)
    progress = train(student, teacher, windows(text.train, settings.seq_len), settings, work,
                     progress, opt_state)
    del teacher
    trained = weights_back(student, desc)
    del student
    t_eval = time.monotonic()
    report = evaluate(to_torch(desc), to_torch(trained), text, settings.target)
    report.update({
        "format": FORMAT, "method": "mask distillation (KL to the original, progressive coef mask)",
        "model": desc.name or desc.source, "source_hash": desc.source_hash,
        "settings": dataclasses.asdict(settings), "device": device, "text": text.source,
        "train_tokens_available": int(sum(map(len, text.train))),
        "heldout_tokens": int(sum(map(len, text.heldout))),
        "calib_tokens": int(sum(map(len, text.calib))),
        "steps": progress.step, "tokens_seen": progress.tokens,
        "train_seconds": round(progress.seconds, 1),
        "train_tokens_per_second": round(progress.tokens / max(progress.seconds, 1e-9), 1),
        "text_seconds_this_run": round(text_seconds, 1),
        "eval_seconds": round(time.monotonic() - t_eval, 1),
        "this_run_seconds": round(time.monotonic() - started, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss_curve": progress.losses,
    })
    folder = work / "model"
    if folder.exists():
        shutil.rmtree(folder)
    save_hf(trained, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if extra_files is not None:
        extra_files(folder, text)
    (folder / RECORDS).mkdir(exist_ok=True)
    (folder / REPORT).write_text(json.dumps(report, indent=1))
    os.replace(folder, out)
    shutil.rmtree(work)
    return report
