"""Calibration and held-out text as token sequences.

Default: text the model samples itself (no data set download), from two disjoint prompt
lists with different seeds, so held-out tokens never come from the calibration prompts.
Or: the user's text files, cut into sequences (the last `heldout_frac` of the tokens held out).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .forward import TorchModel, forward, new_cache

CALIBRATION_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle for a school report.",
    "Give advice to someone starting to learn the piano.",
    "Write a recipe for a vegetable soup.",
    "Explain what a database index is.",
    "Describe a walk through a busy market.",
    "What is photosynthesis?",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain the rules of chess briefly.",
    "How do vaccines work?",
    "Summarise the history of the printing press.",
    "Write a poem about autumn rain.",
    "Explain compound interest with an example.",
    "Describe how to plant a tree.",
]
HELDOUT_PROMPTS = [
    "Tell me about the planets of the solar system.",
    "Write a short dialogue between a baker and a customer.",
    "Explain why the sky is blue.",
    "What should I pack for a week of camping?",
    "Describe how a train timetable is made.",
    "Write a fable about a fox and a crow.",
    "Explain how email gets delivered.",
    "What makes a good team leader?",
]


class CalibrationError(ValueError):
    pass


def _chat(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
            return_dict=False))
    return list(tokenizer(prompt)["input_ids"])


def sample_sequences(tm: TorchModel, tokenizer, prompts: list[str], n_tokens: int,
                     seq_len: int, seed: int, desc: str = "sampling") -> list[np.ndarray]:
    """Sample until n_tokens tokens in sequences of up to seq_len (prompt included)."""
    gen = torch.Generator().manual_seed(seed)
    eos = set(tm.desc.eos_token_ids)
    out, total, i = [], 0, 0
    with tqdm(total=n_tokens, desc=desc, unit="tok") as bar:
        while total < n_tokens:
            ids = _chat(tokenizer, prompts[i % len(prompts)])[: seq_len // 2]
            i += 1
            cache = new_cache(tm, 1, seq_len)
            logits = forward(tm, torch.tensor([ids]), cache, last_only=True)
            while len(ids) < seq_len:
                probs = torch.softmax(logits[0, -1] / 0.8, -1)
                top = torch.topk(probs, 50)
                nxt = int(top.indices[torch.multinomial(top.values, 1, generator=gen)])
                ids.append(nxt)
                if nxt in eos:
                    break
                logits = forward(tm, torch.tensor([[nxt]]), cache)
            seq = np.array(ids, dtype=np.int64)
            out.append(seq)
            total += len(seq)
            bar.update(len(seq))
    return out


def file_sequences(tokenizer, files: list[str], seq_len: int) -> list[np.ndarray]:
    ids: list[int] = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise CalibrationError(f"{f}: no such text file; pass --text with readable files")
        ids += list(tokenizer(p.read_text(errors="replace"))["input_ids"])
    if len(ids) < 2 * seq_len:
        raise CalibrationError(f"{', '.join(files)}: only {len(ids)} tokens; "
                               f"need at least {2 * seq_len} (more text, or a smaller --seq-len)")
    arr = np.array(ids, dtype=np.int64)
    return [arr[i:i + seq_len] for i in range(0, len(arr) - seq_len + 1, seq_len)]


def split_heldout(seqs: list[np.ndarray], heldout_frac: float) -> tuple[list, list]:
    k = max(1, int(round(len(seqs) * heldout_frac)))
    return seqs[:-k], seqs[-k:]
