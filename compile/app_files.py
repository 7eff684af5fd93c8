"""The files of an APP folder (`ripple compile`, android_host.app_build) and app.json, read
back: what the native runner, the Python session (runtime_py.app_session) and an app agree on.

APP/
  model.so               the whole decode step (compile.model_graph): prefill / decode
  libripple_runtime.so   the native flash runtime the model calls (compile/native)
  runtime.bin            its config (compile.runtime_config)
  params.bin             the non-FFN weights (GGUF blocks), norms, the predictor (compile.app_params)
  [model.rflash,] manifest.json [, whole.rflash, whole.json]   the flash files, as packed
                         (model.rflash only when a layer is sparse: nothing else reads it)
  tokenizer.json         the tokenizer (an app brings a tokenizer library to use it)
  storage.json           the device profile the reads were planned with, when one was given
  ripple-run             the native runner (host), with the TVM runtime libraries beside it
  app.json               what is where and what to call
"""
from __future__ import annotations

import json
import os
from pathlib import Path

APP_FILE, LIBRARY, RUNTIME_LIBRARY, CONFIG_FILE = "app.json", "model.so", "libripple_runtime.so", "runtime.bin"
TOKENIZER_FILE, STORAGE_FILE, RUNNER = "tokenizer.json", "storage.json", "ripple-run"
FORMAT = 1


class AppError(ValueError):
    """An APP folder that cannot be built or loaded; the message names the thing and the fix."""


def load_app_json(app_dir: str | os.PathLike) -> dict:
    """app.json of an APP folder, checked for the format this ripple writes."""
    p = Path(app_dir) / APP_FILE
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise AppError(f"{p}: unreadable ({e}); build the folder with `ripple compile`") from None
    if info.get("format") != FORMAT:
        raise AppError(f"{p}: APP format {info.get('format')}, this ripple reads {FORMAT}; compile again")
    return info
