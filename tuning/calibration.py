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
# What `ripple sparsify` trains on: the calibration prompts and more of the same kind, so
# that a few hundred thousand sampled tokens are not sixteen topics; never the held-out ones.
TRAINING_PROMPTS = CALIBRATION_PROMPTS + [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a robot learning to paint.",
    "What are the benefits of regular exercise?",
    "Describe the life cycle of a butterfly.",
    "Give tips for writing a good cover letter.",
    "Explain how the internet routes a message.",
    "Write a product description for a rain jacket.",
    "What was the significance of the Silk Road?",
    "Explain the difference between weather and climate.",
    "Write a speech for a school graduation.",
    "How does a bank decide whether to give a loan?",
    "Describe how bread rises.",
    "Explain recursion to a new programmer.",
    "Write a diary entry of a sailor in a storm.",
    "What are the stages of grief?",
    "Explain how an electric motor works.",
    "Give a plan for learning a new language in six months.",
    "Describe the architecture of a medieval castle.",
    "Explain supply and demand with an example.",
    "Write a limerick about a cat.",
    "How do bees make honey?",
    "Summarise the plot of a mystery novel you invent.",
    "Explain what a neural network is.",
    "Describe a day in the life of a nurse.",
    "What are good habits for getting enough sleep?",
    "Explain how tides are caused by the moon.",
    "Write instructions for changing a flat tyre.",
    "Compare renting and buying a home.",
    "Explain how a camera lens focuses light.",
    "Write a thank-you note to a teacher.",
    "What causes earthquakes?",
    "Describe how to organise a small community event.",
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
                     seq_len: int, seed: int, desc: str = "sampling", batch: int = 8) -> list[np.ndarray]:
    """Sample until n_tokens tokens in sequences of up to seq_len (prompt included).

    Prompts are sampled `batch` at a time, left-padded: a decode step costs about the same
    for 8 rows as for 1 on a small model, so this is several times faster than one by one."""
    gen = torch.Generator().manual_seed(seed)
    eos = set(tm.desc.eos_token_ids)
    out, total, i = [], 0, 0
    with tqdm(total=n_tokens, desc=desc, unit="tok") as bar:
        while total < n_tokens:
            rows = [_chat(tokenizer, prompts[(i + j) % len(prompts)])[: seq_len // 2] for j in range(batch)]
            i += batch
            width = max(map(len, rows))
            pad = torch.tensor([width - len(r) for r in rows])
            tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows])
            cache = new_cache(tm, batch, width + seq_len)
            logits = forward(tm, tokens, cache, last_only=True, pad=pad)
            done = [False] * batch
            while not all(done) and max(map(len, rows)) < seq_len:
                probs = torch.softmax(logits[:, -1] / 0.8, -1)
                top = torch.topk(probs, 50)
                pick = top.indices.gather(1, torch.multinomial(top.values, 1, generator=gen))[:, 0]
                for j, t in enumerate(pick.tolist()):
                    if not done[j]:
                        rows[j].append(t)
                        done[j] = t in eos or len(rows[j]) >= seq_len
                logits = forward(tm, pick[:, None], cache, pad=pad)
            for r in rows:
                if total >= n_tokens:
                    break
                out.append(np.array(r, dtype=np.int64))
                total += len(r)
                bar.update(len(r))
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
