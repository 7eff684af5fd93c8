"""What a number or a path given on the command line must be, checked before a verb starts:
a typo fails in a second with one line, not after minutes of profiling or packing.

`number(...)` makes every numeric check; `FLAG_CHECKS` says, by flag name, what a flag means
in every verb that has it (the bench verbs register their own flags), and `check_flags`
applies it to flags that carry no check of their own: numbers as the parser's types, paths
by `check_paths` once parsing is done (so a missing file is the verb's error, exit 2 from
`run`, like every other missing file).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def number(kind: type = float, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False):
    """An argparse type: `kind` (int or float), finite, within [lo, hi] (ends open if asked)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and hi is not None:
            inside = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
            if not inside:
                raise argparse.ArgumentTypeError(
                    f"{v} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
        elif lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(
                f"{v} must not be negative" if lo == 0 and not lo_open else
                f"{v} must be {'above' if lo_open else 'at least'} {lo:g}")
        return v
    parse.__name__ = kind.__name__       # argparse names the type in its own messages
    return parse


fraction = number(float, 0, 1, hi_open=True)            # a sparsity: [0, 1)
fraction_or_one = number(float, 0, 1, lo_open=True)     # a recall, an active fraction: (0, 1]
share = number(float, 0, 1)                             # a budget share: [0, 1]
positive = number(int, 1)
count = number(int, 0)
nonneg_float = number(float, 0)
positive_float = number(float, 0, lo_open=True)


def made_by(verb: str | None):
    """An argparse type: a readable file; when missing, the message names the verb that writes it."""
    def input_file(text: str) -> str:
        p = Path(text)
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
        if not p.exists():
            raise argparse.ArgumentTypeError(f"{text}: no such file" + (f"; `{verb}` writes one" if verb else ""))
        if not os.access(p, os.R_OK):
            raise argparse.ArgumentTypeError(f"{text}: not readable (permissions)")
        return text
    input_file.__name__ = "file"
    return input_file


input_file = made_by(None)


def input_path(text: str) -> str:
    """A file or a folder (a model: a GGUF file or a Hugging Face folder)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def output_path(text: str) -> str:
    """Somewhere a file or folder can be created: no file stands where a folder must be."""
    for parent in Path(text).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a folder")
            break
    return text


def output_dir(text: str) -> str:
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder to write into")
    return output_path(text)


def new_output_dir(text: str) -> str:
    """A folder that a verb creates whole (it must not exist yet)."""
    if Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} exists; pass a new --out (or remove it)")
    return output_path(text)


def output_file(text: str) -> str:
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name in it")
    return output_path(text)


# By flag name (argparse dest). Paths are checked only where the flag has no default.
FLAG_CHECKS = {
    "sparsity": fraction, "sparsities": fraction, "budget": share, "ppl_budget": nonneg_float,
    "recall": fraction_or_one, "sweep": fraction_or_one, "fractions": fraction_or_one,
    "timing_density": fraction_or_one,
    "tokens": positive, "repeat": positive, "queue_depth": positive, "rank": positive,
    "epochs": positive, "k": positive, "calib_tokens": positive, "heldout_tokens": positive,
    "seq_len": positive, "trials": positive, "synthetic_layers": positive,
    "synthetic_neurons": positive, "timing_layers": positive, "timing_neurons": positive,
    "warmup": count, "layer": count, "read_ahead": count, "rpc_timeout": positive_float,
    "profile": made_by("ripple profile"), "placement": made_by("ripple place"),
    "predictor": made_by("ripple train-predictor"), "text": input_file, "model": input_path,
    "json": output_file, "out": output_path,
}
_PATHS = {input_path, output_file, output_path} | {FLAG_CHECKS[k] for k in ("profile", "placement",
                                                                            "predictor", "text")}


class FlagError(ValueError):
    """A flag naming a path that is missing or of the wrong kind."""


def check_paths(args: argparse.Namespace) -> None:
    """Run the path checks check_flags recorded for the parsed verb; FlagError on the first
    that fails."""
    for option, dest, check in getattr(args, "_path_checks", ()):
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            try:
                check(v)
            except argparse.ArgumentTypeError as e:
                raise FlagError(f"argument {option}: {e}") from None


def check_flags(parser: argparse.ArgumentParser) -> None:
    """Give every flag of `parser` and its sub-commands named in FLAG_CHECKS that check, unless
    it has a check (a type other than int/float) or choices of its own."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                check_flags(sub)
            continue
        check = FLAG_CHECKS.get(action.dest)
        if check is None or action.choices or action.nargs == 0 \
                or action.type not in (None, int, float, str):
            continue
        if check in _PATHS:
            if action.default is None and action.type in (None, str):
                paths.append(("/".join(action.option_strings) or action.dest, action.dest, check))
            continue
        if action.type is None and action.default is not None \
                and not isinstance(action.default, (int, float)):
            continue
        action.type = check
    if paths:
        parser.set_defaults(_path_checks=paths)
