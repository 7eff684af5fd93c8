"""Train relu-tiny (a small ReLU OPT model) on this machine and report its FFN density.

    python bench/relu_model.py              # train, or reuse the cached folder; print the density table
    python bench/relu_model.py --report     # only the density table of the existing folder
    python bench/relu_model.py --force      # train again

The folder (`${RIPPLE_CACHE:-~/.cache/ripple-flash}/relu-tiny` unless --out) is a plain
Hugging Face OPT folder: config.json, model.safetensors, tokenizer files; our records
(text split, training log, density table) sit in its `ripple/` subfolder. Everything that
reads it goes through the same loader as any user's OPT folder.

Why these settings: the lazy-neuron effect of ReLU transformers (Li et al. 2023, "The Lazy
Neuron Phenomenon") shows within minutes: the issue's check on a 2-core machine (~7,600
tokens/s with bf16 autocast) saw layers past the first at ~10% active neurons after 10 minutes
and 6-13% after 35. The FFN is 4x the width, as in OPT. Training checkpoints every 100 steps
and resumes where it stopped, with the same result as one uninterrupted run.

CPUs differ by 100x in what this costs. bf16 autocast is timed against fp32 on a copy of the
model before training (`--autocast auto`): where the CPU has no bf16 instructions torch emulates
them (an AVX2-only AMD EPYC ran 64 tokens/s against 1,600 for fp32). And where the schedule
would not fit the time budget (`--minutes`, default 30 for the whole run), the first steps are
timed and the run trains the most whole hundreds of steps that fit, with the cosine decay
fitted to them; the log records the steps and the autocast, so a run is reproducible for the
same settings, steps and autocast.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ripple.tuning import relu_tiny
from ripple.tuning.checkpoint import load_model, load_tokenizer
from ripple.tuning.forward import ffn_parts, ffn_output, forward, to_torch
from ripple.tuning.model import ModelLoadError

TRAINING_LOG = f"{relu_tiny.RECORDS}/training.json"
DENSITY_JSON = f"{relu_tiny.RECORDS}/density.json"
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]     # ids 0, 1, 2; "</s>" separates files in training


@dataclass(frozen=True)
class Shape:
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    d_ffn: int = 1024          # 4x d_model, as OPT
    vocab: int = 8192
    seq_len: int = 256


@dataclass(frozen=True)
class Schedule:
    # 2,600 steps x 16 x 256 = 10.6M tokens: ~23 minutes at ~7,600 tokens/s on 2 idle cores.
    steps: int = 2600
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 150
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    train_bytes: int = 0       # 0: all training files; else the first files up to this many bytes


class TrainError(ValueError):
    """Settings that cannot train a model; the message names the fix."""


AUTOCASTS = ("auto", "bf16", "fp32")
STEP_UNIT = 100        # a budget cuts the schedule to whole hundreds of steps: few distinct models
TIMED_STEPS = (2, 12)  # the steps (inside the warmup, which the total does not change) timed for the budget


# ---------------------------------------------------------------- text and tokenizer

def train_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE (GPT-2/OPT style) on the training text only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """All texts tokenized, each followed by "</s>", as one uint16 array."""
    eos = tok.token_to_id("</s>")
    parts = []
    batch = 64
    for i in tqdm(range(0, len(texts), batch), desc="tokenizing training text", unit="batch"):
        for enc in tok.encode_batch(texts[i:i + batch]):
            parts.append(np.array(enc.ids + [eos], dtype=np.uint16))
    return np.concatenate(parts)


def hf_tokenizer(tok, shape: Shape):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=shape.seq_len)


def opt_config(shape: Shape, tok):
    from transformers import OPTConfig
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return OPTConfig(vocab_size=shape.vocab, hidden_size=shape.d_model, num_hidden_layers=shape.n_layers,
                     num_attention_heads=shape.n_heads, ffn_dim=shape.d_ffn,
                     max_position_embeddings=shape.seq_len, word_embed_proj_dim=shape.d_model,
                     do_layer_norm_before=True, activation_function="relu", dropout=0.0,
                     attention_dropout=0.0, layerdrop=0.0, enable_bias=True,
                     pad_token_id=ids["<pad>"], bos_token_id=ids["</s>"], eos_token_id=ids["</s>"],
                     tie_word_embeddings=True)


# ---------------------------------------------------------------- training

def lr_at(step: int, s: Schedule) -> float:
    """Linear warmup, then cosine decay to min_lr_frac of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def fitted_steps(requested: int, sec_per_step: float, seconds_left: float, least: int) -> int:
    """The schedule's steps if they fit `seconds_left`, else the most whole STEP_UNITs that do,
    but never fewer than `least` (a run shorter than that trains nothing worth measuring)."""
    if requested * sec_per_step <= seconds_left:
        return requested
    fit = int(seconds_left / sec_per_step) // STEP_UNIT * STEP_UNIT
    return min(requested, max(least, fit))


def _autocast(name: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16")


def choose_autocast(model, x: torch.Tensor) -> tuple[str, dict]:
    """bf16 autocast if this CPU runs a training step clearly faster with it than in fp32,
    timed on a copy of the model (forward and backward of one small batch, best of two after
    a first one). Without bf16 instructions it is emulated and ~100x slower: one step is then
    enough to tell."""
    import copy
    trial = copy.deepcopy(model).train()
    best = {}
    for name in ("fp32", "bf16"):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            with _autocast(name):
                loss = trial(input_ids=x, labels=x).loss
            loss.backward()
            trial.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            if name == "bf16" and times[0] > 20 * best["fp32"]:
                break
        best[name] = min(times[1:] or times)
    return ("bf16" if best["bf16"] < 0.8 * best["fp32"] else "fp32"), \
        {k: round(v, 4) for k, v in best.items()}


def train_model(model, stream: np.ndarray, shape: Shape, s: Schedule, checkpoint: Path,
                checkpoint_every: int = 100, autocast: str = "auto", deadline: float | None = None,
                reserve_s: float = 0.0) -> dict:
    """AdamW on random whole windows of the stream (a fresh permutation each epoch), under the
    autocast `choose_autocast` picks (or the one given).

    With a `deadline` (a time.perf_counter() value), steps TIMED_STEPS are timed and the
    schedule shortened to what fits before it, `reserve_s` kept for the work after training.
    Every `checkpoint_every` steps the whole state (weights, optimizer, data order, generator,
    autocast and steps) goes to `checkpoint`, and a run that finds one continues from it: on a
    shared machine the training can be stopped and resumed with the same result as one
    uninterrupted run."""
    n_windows = len(stream) // shape.seq_len
    if n_windows < s.batch:
        raise TrainError(f"only {len(stream)} training tokens, fewer than one batch of "
                         f"{s.batch} x {shape.seq_len}; use more text or a smaller --batch/--seq-len")
    windows = stream[: n_windows * shape.seq_len].reshape(n_windows, shape.seq_len)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]   # biases and LayerNorm: no decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.lr, betas=(s.beta1, s.beta2))
    rng = np.random.default_rng(s.seed)
    state = {"step": 0, "order": rng.permutation(n_windows), "pos": 0, "curve": [], "seconds": 0.0}
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        rng.bit_generator.state = saved["rng"]
        state = saved["state"]
        print(f"resuming from step {state['step']} of {state.get('steps', s.steps)} ({checkpoint})",
              file=sys.stderr)
    if "autocast" not in state:
        trial = torch.from_numpy(windows[:2].astype(np.int64))
        state["autocast"], state["autocast_trial_s"] = (choose_autocast(model, trial) if autocast == "auto"
                                                        else (autocast, {}))
        print(f"autocast: {state['autocast']} (one step on a batch of 2, seconds: "
              f"{state['autocast_trial_s'] or 'not timed, as asked'})", file=sys.stderr)
    state.setdefault("steps", s.steps)
    state.setdefault("fitted", deadline is None)
    model.train()
    t0 = time.perf_counter() - state["seconds"]
    run_t0, first = time.perf_counter(), state["step"]
    timed_from = None
    bar = tqdm(total=state["steps"], initial=state["step"], desc="training relu-tiny", unit="step")
    step = state["step"]
    while step < state["steps"]:
        if state["pos"] + s.batch > n_windows:
            state["order"], state["pos"] = rng.permutation(n_windows), 0
        x = torch.from_numpy(windows[state["order"][state["pos"]:state["pos"] + s.batch]].astype(np.int64))
        state["pos"] += s.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, replace(s, steps=state["steps"]))
        with _autocast(state["autocast"]):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        if step == first + TIMED_STEPS[0]:
            timed_from = time.perf_counter()
        # Fitting changes the cosine decay only: it is done inside the warmup, before it starts.
        if not state["fitted"] and timed_from is not None and step == first + TIMED_STEPS[1] \
                and step < s.warmup:
            per_step = (time.perf_counter() - timed_from) / (TIMED_STEPS[1] - TIMED_STEPS[0])
            steps = fitted_steps(s.steps, per_step, deadline - time.perf_counter() - reserve_s
                                 + (step + 1) * per_step, least=min(s.steps, 2 * s.warmup))
            if steps < s.steps:
                print(f"\n{s.steps} steps take ~{s.steps * per_step / 60:.0f} min on this CPU "
                      f"({per_step:.2f} s a step with {state['autocast']}); training {steps}, what the "
                      f"time budget fits", file=sys.stderr)
                bar.total = steps
            state.update(steps=steps, fitted=True, seconds_per_step=round(per_step, 4))
        if step % 25 == 0 or step == state["steps"] - 1:
            state["curve"].append({"step": step, "loss": round(loss.item(), 4), "seconds": round(elapsed, 1)})
            rate = (step + 1 - first) * s.batch * shape.seq_len / (time.perf_counter() - run_t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
        bar.update()
        step += 1
        if step % checkpoint_every == 0 and step < state["steps"]:
            state.update(step=step, seconds=elapsed)
            tmp = checkpoint.with_name(checkpoint.name + ".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "rng": rng.bit_generator.state, "state": state}, tmp)
            os.replace(tmp, checkpoint)
    bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    tokens = state["steps"] * s.batch * shape.seq_len
    return {"seconds": round(seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "epochs": round(tokens / (n_windows * shape.seq_len), 3), "train_tokens": int(len(stream)),
            "steps": state["steps"], "steps_requested": s.steps, "autocast": state["autocast"],
            "autocast_trial_s": state["autocast_trial_s"], "loss_curve": state["curve"]}


@torch.no_grad()
def heldout_loss(model, seqs: list[np.ndarray]) -> float:
    nll = [float(model(input_ids=torch.from_numpy(q)[None], labels=torch.from_numpy(q)[None]).loss)
           for q in seqs]
    return float(np.mean(nll))


def forward_check(folder: Path, seq: np.ndarray) -> float:
    """Max |logit difference| between our forward and transformers' on the saved folder."""
    from transformers import AutoModelForCausalLM
    ours = forward(to_torch(load_model(folder)), torch.from_numpy(seq)[None])[0]
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(seq)[None]).logits[0]
    return float((ours - theirs).abs().max())


def settings(shape: Shape, schedule: Schedule) -> dict:
    return {"shape": asdict(shape), "schedule": asdict(schedule)}


def build(out: Path, shape: Shape = Shape(), schedule: Schedule = Schedule(), threads: int = 2,
          force: bool = False, report_tokens: int = 16384, checkpoint_every: int = 100,
          autocast: str = "auto", minutes: float | None = None) -> tuple[Path, bool]:
    """Train into `out` unless a folder trained with the same settings is there (whatever
    steps and autocast its run took). `minutes`: the whole run's time budget, which may cut
    the schedule's steps (train_model). Returns (folder, reused). The folder appears whole or
    not at all: it is built in a `.NAME.partial` folder beside it (which also holds the
    checkpoint to resume from) and renamed."""
    out = Path(out)
    if autocast not in AUTOCASTS:
        raise TrainError(f"--autocast {autocast}: use one of {', '.join(AUTOCASTS)}")
    if minutes is not None and not minutes > 0:
        raise TrainError(f"--minutes {minutes}: give a positive time budget, or 0 for none")
    wanted = settings(shape, schedule)
    if (out / TRAINING_LOG).is_file() and not force:
        done = json.loads((out / TRAINING_LOG).read_text())
        if done.get("settings") != wanted:
            raise TrainError(f"{out}: trained with other settings ({done.get('settings')}); pass "
                             f"--force to train again, or --out for another folder")
        return out, True
    if shape.d_model % shape.n_heads:
        raise TrainError(f"d_model {shape.d_model} is not a multiple of n_heads {shape.n_heads}")
    if not 260 <= shape.vocab <= 65536:        # 256 bytes + 3 special tokens; ids are kept as uint16
        raise TrainError(f"vocab {shape.vocab}: use 260 to 65536")
    torch.set_num_threads(threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))   # the tokenizers trainer's pool
    root = relu_tiny.stdlib_root()
    files = relu_tiny.stdlib_files(root)
    split = relu_tiny.split_files(files)
    train_files = split["train"]
    if schedule.train_bytes:
        sizes = np.cumsum([(root / f).stat().st_size for f in train_files])
        train_files = train_files[: max(1, int(np.searchsorted(sizes, schedule.train_bytes)) + 1)]
    texts = relu_tiny.read_text(root, train_files)
    if not texts:
        raise TrainError(f"{root}: no standard-library .py files found to train on")

    work = out.with_name(f".{out.name}.partial")
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainError(f"{work}: another run is training this model; wait for it") from None
        if _read_json(work / "settings.json") != wanted:       # a partial run of other settings
            for f in work.iterdir():
                if f.name != "lock":
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
            (work / "settings.json").write_text(json.dumps(wanted))
        t_start = time.perf_counter()
        deadline = None if minutes is None else t_start + 60 * minutes
        _train_into(work, texts, root, dict(split, train=train_files), len(files), shape, schedule,
                    threads, report_tokens, checkpoint_every, autocast, deadline)
        for f in ("lock", "settings.json", "checkpoint.pt", "tokenizer.partial.json"):
            (work / f).unlink(missing_ok=True)
        log = json.loads((work / TRAINING_LOG).read_text())
        log["total_seconds_this_run"] = round(time.perf_counter() - t_start, 1)
        (work / TRAINING_LOG).write_text(json.dumps(log, indent=1))
        if out.exists():                       # only with force: the old folder goes once the new is whole
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old)
        os.replace(work, out)
    return out, False


def _train_into(work: Path, texts: list[str], root: Path, split: dict, files_total: int, shape: Shape,
                schedule: Schedule, threads: int, report_tokens: int, checkpoint_every: int,
                autocast: str, deadline: float | None) -> None:
    from tokenizers import Tokenizer
    from transformers import OPTForCausalLM

    t = time.perf_counter()
    saved_tok = work / "tokenizer.partial.json"
    if saved_tok.is_file():
        tok = Tokenizer.from_file(str(saved_tok))
    else:
        tok = train_tokenizer(texts, shape.vocab)
        tok.save(str(saved_tok))
    tokenizer_s = time.perf_counter() - t
    stream = token_stream(tok, texts)
    torch.manual_seed(schedule.seed)
    model = OPTForCausalLM(opt_config(shape, tok))
    n_params = sum(p.numel() for p in model.parameters())
    # Kept for what follows training (saving, held-out loss, forward check, density table):
    # forward passes only, well under a minute at the default shape.
    reserve_s = 90.0
    log = train_model(model, stream, shape, schedule, work / "checkpoint.pt", checkpoint_every,
                      autocast, deadline, reserve_s)
    model.save_pretrained(str(work))
    hf_tokenizer(tok, shape).save_pretrained(str(work))
    record = relu_tiny.write_text_split(work, root, split, {
        "files_total": files_total, "python": sys.version.split()[0],
        "train_digest": relu_tiny.text_digest(texts),
        "train_bytes": sum(len(x.encode("utf-8")) for x in texts)})
    tokenizer = load_tokenizer(work)
    held = relu_tiny.text_sequences(tokenizer, work / relu_tiny.HELDOUT_TEXT, 16 * shape.seq_len,
                                    shape.seq_len)
    loss = heldout_loss(model, held)
    log.update(settings=settings(shape, schedule), threads=threads, params=n_params,
               tokenizer_seconds=round(tokenizer_s, 1), heldout_loss=round(loss, 4),
               heldout_ppl=round(math.exp(loss), 3), heldout_eval_tokens=int(sum(map(len, held))),
               forward_max_abs_diff=forward_check(work, held[0]),
               torch=torch.__version__,
               text={k: len(v) for k, v in split.items()}, label=record["label"])
    (work / TRAINING_LOG).write_text(json.dumps(log, indent=1))
    write_density(work, density_report(work, report_tokens, shape.seq_len))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- density

def layer_density(mask: np.ndarray) -> dict:
    """mask (tokens, n) bool: active fraction, share of activations carried by the 10% most
    often active neurons, contiguous runs of active ids per token in original order."""
    tokens, n = mask.shape
    counts = mask.sum(0)
    total = int(counts.sum())
    top = np.sort(counts)[::-1][: max(1, math.ceil(0.1 * n))]
    starts = mask[:, 0].sum() + (mask[:, 1:] & ~mask[:, :-1]).sum()
    return {"active_fraction": float(total / (tokens * n)),
            "top10_share": float(top.sum() / total) if total else 0.0,
            "runs_per_token": float(starts / tokens),
            "runs_per_active": float(starts / total) if total else 0.0,
            "never_active_fraction": float((counts == 0).mean())}


def activation_masks(folder: Path, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """Per layer, (tokens, n) bool: relu(up) > 0, the model's own sparsity (no threshold)."""
    tm = to_torch(load_model(folder))
    if tm.desc.activation != "relu":
        raise ModelLoadError(f"{folder}: a {tm.desc.activation} model; the density report is for "
                             f"ReLU models, whose zeros are exact")
    masks: list[list[np.ndarray]] = [[] for _ in range(tm.desc.n_layers)]

    def ffn(layer, h):
        coef, _ = ffn_parts(tm, layer, h)
        masks[layer].append((coef > 0).reshape(-1, coef.shape[-1]).numpy())
        return ffn_output(tm, layer, coef)

    for q in tqdm(seqs, desc="density on held-out text", unit="seq"):
        forward(tm, torch.from_numpy(q)[None], ffn=ffn)
    return [np.concatenate(m) for m in masks]


def density_report(folder: Path, n_tokens: int = 16384, seq_len: int = 256) -> dict:
    split = relu_tiny.read_text_split(folder)
    if split is None:
        raise ModelLoadError(f"{folder}: no {relu_tiny.SPLIT_FILE}; the density report needs the "
                             f"held-out text of a folder written by bench/relu_model.py")
    tok = load_tokenizer(folder)
    seqs = relu_tiny.text_sequences(tok, split.heldout, n_tokens, seq_len)
    layers = [layer_density(m) for m in activation_masks(folder, seqs)]
    return {"model": str(folder), "label": split.label, "text": "held-out files (ripple/heldout.txt)",
            "tokens": int(sum(map(len, seqs))), "seq_len": seq_len, "active": "relu(up) > 0",
            "layers": layers,
            "mean_layers_1_on": {k: float(np.mean([l[k] for l in layers[1:]]))
                                 for k in layers[0]} if len(layers) > 1 else {}}


def write_density(folder: Path, report: dict) -> None:
    path = folder / DENSITY_JSON
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def print_density(report: dict) -> None:
    print(f"{report['label']}")
    print(f"FFN density on {report['tokens']} held-out tokens ({report['active']}):")
    print(f"{'layer':>5} {'active':>8} {'top10% share':>13} {'runs/token':>11} {'runs/active':>12} {'never':>7}")
    for i, l in enumerate(report["layers"]):
        print(f"{i:>5} {l['active_fraction']:8.1%} {l['top10_share']:13.1%} {l['runs_per_token']:11.1f} "
              f"{l['runs_per_active']:12.2f} {l['never_active_fraction']:7.1%}")


_AUTOCAST_SAID = {"bf16": "bf16 autocast", "fp32": "fp32"}


def print_training(folder: Path) -> None:
    log = json.loads((folder / TRAINING_LOG).read_text())
    steps = log.get("steps")
    cut = f", {steps} of {log['steps_requested']} steps: the time budget" \
        if steps and steps < log["steps_requested"] else ""
    print(f"trained {log['params'] / 1e6:.1f}M parameters on {log['tokens'] / 1e6:.1f}M tokens "
          f"({log['epochs']} epochs{cut}) in {log['seconds'] / 60:.1f} min ({log['tokens_per_s']:,.0f} tokens/s, "
          f"{log['threads']} threads, {_AUTOCAST_SAID[log.get('autocast', 'bf16')]}); held-out loss {log['heldout_loss']} (ppl {log['heldout_ppl']}); "
          f"our forward vs transformers: max |logit diff| {log['forward_max_abs_diff']:.2e}")


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    d_shape, d_sched = Shape(), Schedule()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="model folder (default: the cache's relu-tiny)")
    ap.add_argument("--report", action="store_true", help="only recompute and print the density table")
    ap.add_argument("--force", action="store_true", help="train again even if the folder exists")
    ap.add_argument("--report-tokens", type=int, default=16384, help="held-out tokens for the density table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--autocast", choices=AUTOCASTS, default="auto",
                    help="auto (default): bf16 where this CPU runs it clearly faster than fp32, timed first")
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="time budget of the whole run (default 30; 0: none): past it the schedule "
                         "is cut to the whole hundreds of steps that fit")
    for name, default in asdict(d_shape).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    for name, default in asdict(d_sched).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args(argv)
    out = args.out or relu_tiny.default_folder()
    try:
        if args.report:
            folder = relu_tiny.require_folder(out)
            torch.set_num_threads(args.threads)
            report = density_report(folder, args.report_tokens, json.loads(
                (folder / "config.json").read_text())["max_position_embeddings"])
            write_density(folder, report)
        else:
            shape = Shape(**{k: getattr(args, k) for k in asdict(d_shape)})
            sched = Schedule(**{k: getattr(args, k) for k in asdict(d_sched)})
            folder, reused = build(out, shape, sched, args.threads, args.force, args.report_tokens,
                                   autocast=args.autocast, minutes=args.minutes or None)
            if reused:
                print(f"reusing {folder} (already trained with these settings; --force trains again)")
            report = json.loads((folder / DENSITY_JSON).read_text())
            print_training(folder)
        print_density(report)
        print(f"model folder: {folder}")
    except (TrainError, ModelLoadError) as e:
        sys.stderr.write(f"relu_model: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
