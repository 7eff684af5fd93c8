"""Files that appear whole or not at all.

Everything the tool writes (profiles, placements, predictors, JSON results, plots, caches) goes
through `atomic_write`: the bytes go to a temporary name in the same folder, are flushed to the
disk, and only then take the final name, so a run killed part way (or a full disk) leaves the
old file or none, never a truncated one that a later run would read as plausible data.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """A file object for `path` (mode "wb" or "w"); renamed into place when the block ends
    without an exception, removed otherwise."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib figure as PNG at `path`; the figure is closed either way."""
    import matplotlib.pyplot as plt
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def write_result(json_out: str | os.PathLike, result: dict, plot=None) -> None:
    """A benchmark's JSON, with its plot beside it (`plot(result, png_path)`) named in it."""
    if plot is not None:
        png = str(Path(json_out).with_suffix(".png"))
        plot(result, png)
        result["png"] = png
    write_json(json_out, result)
