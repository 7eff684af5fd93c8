"""Native builds (the flash runtime library, the runner) cached by what they are built from:
one folder per hash of the sources and the command line, filled once, under a temporary name
renamed into place, so a build killed part way leaves nothing a later run would take as done."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from .errors import ToolchainError


def cached_build(folder: Path, name: str, command: Callable[[Path, Path], list[str]], what: str) -> Path:
    """folder/name, built by running command(output path, scratch folder) when it is missing;
    `what` names the build in errors (the compiler's first 400 characters follow)."""
    out = folder / name
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp_out = Path(tmp) / name
        r = subprocess.run(command(tmp_out, Path(tmp)), capture_output=True, text=True)
        if r.returncode != 0:
            raise ToolchainError(f"building {what} failed: {' '.join(r.stderr.split())[:400]}")
        os.replace(tmp_out, out)
    return out
