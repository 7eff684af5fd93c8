"""The tool's own data files (profiles, predictors): numpy arrays in an .npz beside a JSON
header that names the file's format, so that a file of another kind or version is refused
with one line instead of failing somewhere later on a missing array."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .atomic_file import atomic_write


def save_headed(path: str | os.PathLike, fmt: str, header: dict, arrays: dict,
                compressed: bool = False) -> None:
    save = np.savez_compressed if compressed else np.savez
    with atomic_write(path) as f:
        save(f, header=np.array(json.dumps(dict(header, format=fmt))), **arrays)


def load_headed(path: str | os.PathLike, fmt: str, build, error: type[Exception], what: str,
                writer: str):
    """build(header, arrays) of a file written by save_headed with format `fmt`; any problem,
    a missing header field or array included, is `error` naming the file and `writer`, the
    command that makes a good one."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}; run `{writer} --out {path}` first")
    try:
        with np.load(path, allow_pickle=False) as z:
            h = json.loads(str(z["header"]))
            if h.get("format") != fmt:
                raise error(f"{path}: not a ripple {what} (format {h.get('format')!r})")
            return build(h, {k: z[k] for k in z.files if k != "header"})
    except error:
        raise
    except Exception as e:   # zip, npy, JSON and missing-field errors all mean one thing to the user
        raise error(f"{path}: unreadable {what} ({type(e).__name__}: {e}); run `{writer}` again") from e
