"""relu-tiny: a small ReLU (OPT-architecture) model trained on this machine, as a workload.

Ripple's gains live in ReLU models where a few percent of FFN neurons fire per token; our
embedded SmolLM2 is SwiGLU (24-50% active) and the synthetic ReLU generator's structure is
ours. relu-tiny gives real activations with the co-activation structure training produces,
at small width. `bench/relu_model.py` trains it; this module says where it lives and which
text it was trained, calibrated and evaluated on, so a benchmark can profile on the
calibration text and measure on the held-out text, never on training text.

The text is fixed and documented rather than whatever the machine has: the `.py` files of
the running interpreter's standard library (sources and docstrings), sorted by relative
path, split by file on a hash of that path (so the split of a file never depends on which
other files a machine has). Distributions ship different parts of the standard library
(some leave out `test/`), so the folder records the file count and a digest of the text.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Nothing heavy at top (no numpy, no torch): the benchmark modules name this workload's folder
# when the CLI builds its parser.

NAME = "relu-tiny"
LABEL = ("relu-tiny: small ReLU OPT trained here on Python stdlib source "
         "(real activations, small width; not OPT-6.7B)")
SHORT_LABEL = "small ReLU model trained here; not OPT-6.7B"     # for plot titles
# Our records sit in a subfolder: checkpoint_hash covers the folder's top-level files, and
# rewriting a report must not change the identity that profiles and layouts record.
RECORDS = "ripple"
SPLIT_FILE = f"{RECORDS}/text_split.json"
SPLIT_FORMAT = "ripple-text-split-1"
CALIBRATION_TEXT = f"{RECORDS}/calibration.txt"
HELDOUT_TEXT = f"{RECORDS}/heldout.txt"
# Per mille of files on each side; 5% + 5% is ~1.7 MB each, far more than a profile needs.
HELDOUT_PER_MILLE = 50
CALIBRATION_PER_MILLE = 50
SPLITS = ("train", "calibration", "heldout")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}


@dataclass(frozen=True)
class TextSplit:
    """The text a model folder records: paths of its calibration and held-out text files."""
    calibration: Path
    heldout: Path
    label: str
    record: dict           # the whole text_split.json


def cache_root() -> Path:
    return Path(os.environ.get("RIPPLE_CACHE") or Path.home() / ".cache" / "ripple-flash")


def default_folder() -> Path:
    return cache_root() / NAME


def require_folder(folder: str | os.PathLike | None = None) -> Path:
    """The trained folder, or a one-line error saying how to make it."""
    from .model import ModelLoadError

    folder = default_folder() if folder is None else Path(folder)
    if not (folder / "config.json").is_file() or not (folder / SPLIT_FILE).is_file():
        raise ModelLoadError(f"{folder}: {NAME} is not trained yet; run `make relu-model` "
                             f"(about 30 minutes on 2 cores)")
    return folder


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths (posix) of the standard library's .py files, sorted."""
    root = stdlib_root() if root is None else root
    found = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not _SKIP_DIRS.intersection(rel.parts) and p.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def split_of(relpath: str) -> str:
    """Which side a file is on, from a hash of its relative path alone."""
    h = int.from_bytes(hashlib.blake2b(relpath.encode(), digest_size=8).digest(), "little") % 1000
    if h < HELDOUT_PER_MILLE:
        return "heldout"
    if h < HELDOUT_PER_MILLE + CALIBRATION_PER_MILLE:
        return "calibration"
    return "train"


def split_files(files: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for f in files:
        out[split_of(f)].append(f)
    return out


def read_text(root: Path, files: list[str]) -> list[str]:
    # errors="replace": a few test files are deliberately mis-encoded; the same bytes give the
    # same text on every machine.
    return [(root / f).read_text(encoding="utf-8", errors="replace") for f in files]


def text_digest(texts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def write_text_split(folder: Path, root: Path, split: dict[str, list[str]], meta: dict) -> dict:
    """Write calibration.txt, heldout.txt and text_split.json under `folder` (being built, so
    not atomic per file: the whole folder is renamed into place by its writer)."""
    record = {"label": LABEL, "source": "python-stdlib",
              "source_root": "the running interpreter's standard library (sysconfig 'stdlib')",
              "split_rule": (f"blake2b-64 of the relative path mod 1000: < {HELDOUT_PER_MILLE} held-out, "
                             f"< {HELDOUT_PER_MILLE + CALIBRATION_PER_MILLE} calibration, else train"),
              **meta, **{f"{side}_files": split[side] for side in SPLITS}}
    return write_split_texts(folder, "\n\n".join(read_text(root, split["calibration"])),
                             "\n\n".join(read_text(root, split["heldout"])), record)


def write_split_texts(folder: Path, calibration: str, heldout: str, record: dict) -> dict:
    """A folder's text split from the two texts (any model folder: relu-tiny's stdlib files,
    sparsify's text sampled from the original model); record: label and provenance."""
    (folder / RECORDS).mkdir(exist_ok=True)
    record = {"format": SPLIT_FORMAT, "calibration_text": CALIBRATION_TEXT,
              "heldout_text": HELDOUT_TEXT, **record}
    for name, text, side in ((CALIBRATION_TEXT, calibration, "calibration"), (HELDOUT_TEXT, heldout, "heldout")):
        (folder / name).write_text(text, encoding="utf-8")
        record[f"{side}_bytes"] = len(text.encode("utf-8"))
    (folder / SPLIT_FILE).write_text(json.dumps(record, indent=1))
    return record


def read_text_split(folder: str | os.PathLike) -> TextSplit | None:
    """The folder's text split, or None for a folder that has none (any other HF model)."""
    from .model import ModelLoadError

    folder = Path(folder)
    path = folder / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e}); train the model again") from e
    if record.get("format") != SPLIT_FORMAT:
        raise ModelLoadError(f"{path}: not a ripple text split (format {record.get('format')!r})")
    split = TextSplit(folder / record["calibration_text"], folder / record["heldout_text"],
                      record.get("label", folder.name), record)
    for p in (split.calibration, split.heldout):
        if not p.is_file():
            raise ModelLoadError(f"{p}: named by {SPLIT_FILE} but missing; train the model again")
    return split


def text_sequences(tokenizer, path: Path, n_tokens: int, seq_len: int) -> list:
    """The first n_tokens tokens of a text file, cut into (seq_len,) int64 arrays (whole ones only)."""
    import numpy as np

    from .model import ModelLoadError

    ids: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        # Chunks of lines, so a 2 MB file is not tokenized whole for a few thousand tokens.
        while len(ids) < n_tokens:
            chunk = "".join(f.readline() for _ in range(400))
            if not chunk:
                break
            ids += list(tokenizer(chunk, verbose=False)["input_ids"])
    n = min(n_tokens, len(ids)) // seq_len * seq_len
    if n == 0:
        raise ModelLoadError(f"{path}: only {len(ids)} tokens, fewer than one sequence of "
                             f"{seq_len}; use a smaller sequence length")
    arr = np.array(ids[:n], dtype=np.int64)
    return [arr[i:i + seq_len] for i in range(0, n, seq_len)]


def split_sequences(folder: str | os.PathLike, calib_tokens: int, heldout_tokens: int,
                    seq_len: int) -> tuple[list, list] | None:
    """(calibration, held-out) sequences from the folder's own text split, or None for a
    folder without one (then callers fall back to their usual text)."""
    folder = Path(folder)
    split = read_text_split(folder) if folder.is_dir() else None
    if split is None:
        return None
    from .checkpoint import load_tokenizer

    tok = load_tokenizer(folder)
    return (text_sequences(tok, split.calibration, calib_tokens, seq_len),
            text_sequences(tok, split.heldout, heldout_tokens, seq_len))


SPLIT_TEXT_NOTE = f"the folder's own calibration / held-out files ({SPLIT_FILE}; disjoint, not trained on)"
