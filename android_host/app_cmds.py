"""`ripple compile` and `ripple generate` on the compiled engine: one function per verb.

compile_cmd: a layout folder (or a checkpoint, through the offline steps `make demo` runs, with
their defaults) -> APP/ (app_build). generate_app_cmd: an APP folder loaded here
(runtime_py.app_session), a prompt tokenized, greedy ids decoded by the library and the
native runtime, per-token figures and the time spent outside the library reported.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..atomic_file import write_json
from ..compile.app_files import AppError
from .app_build import REQUEST_BYTES, build_app

STEPS = ("profile", "place", "pack", "train-predictor")


def _say(msg: str) -> None:
    print(f"ripple compile: {msg}", file=sys.stderr, flush=True)


def storage_rule(storage: str | None, queue_depth: int, layout: str) -> tuple[int, int, str | None]:
    """(collapse gap, longest request, profile file) from a device profile: a gap is read
    through when that costs less than one more request at this queue depth; requests are cut
    where the table stops rewarding size, or for a layout with a whole copy, at the size that
    reads a layer's extent fastest (runtime_py.storage_model). Without a profile, runs are
    read as they are, in requests of REQUEST_BYTES."""
    if storage is None:
        return 0, REQUEST_BYTES, None
    from ..layout.reader import open_layout
    from ..layout.whole_copy import open_whole_copy
    from ..runtime_py.storage_model import extent_request_bytes, gap_threshold_bytes, split_bytes
    from .devices import DEVICES_DIR, load_device
    p = load_device(storage).storage
    path = Path(storage) if Path(storage).is_file() else DEVICES_DIR / f"{storage}.json"
    lay = open_layout(layout)
    copy = open_whole_copy(lay.path.parent, lay.manifest.source_hash)
    request = extent_request_bytes(p, copy.layer_bytes, queue_depth) if copy is not None else \
        max(split_bytes(p, queue_depth), 4096)
    return int(gap_threshold_bytes(p, queue_depth)), int(request), str(path)


def offline_steps(model: str, work: Path, dtype: str = "q4d8") -> Path:
    """profile (with FFN inputs) -> place -> pack (with the whole copy for a GGUF) ->
    train-predictor, each with its defaults, into `work`; returns the layout folder. A step
    whose output is already there is not run again (the folder is a cache of this model)."""
    from tqdm import tqdm

    from ..tuning.placement import place_cmd
    from .interface import pack_cmd, profile_cmd, train_predictor_cmd
    work.mkdir(parents=True, exist_ok=True)
    profile, placement, layout = work / "profile.npz", work / "placement.npz", work / "layout"
    gguf = Path(model).suffix == ".gguf"
    with tqdm(total=len(STEPS), desc="offline steps", unit="step", file=sys.stderr) as bar:
        for step in STEPS:
            bar.set_postfix_str(step)
            if step == "profile" and not profile.is_file():
                profile_cmd(model, str(profile), record_inputs=True)
            elif step == "place" and not placement.is_file():
                place_cmd(str(profile), "ours", str(placement))
            elif step == "pack" and not (layout / "manifest.json").is_file():
                pack_cmd(model, str(layout), str(profile), str(placement), dtype if gguf else "int8",
                         whole_copy=gguf)
            elif step == "train-predictor" and not (layout / "predictor.npz").is_file():
                train_predictor_cmd(str(profile), str(layout), model=model)
            bar.update()
    return layout


def compile_cmd(out: str, layout: str | None = None, model: str | None = None, target: str = "host",
                work: str | None = None, kv_dtype: str = "float16", queue_depth: int = 32,
                read_ahead: int = 2, budget_mb: float = 0.0, storage: str | None = None,
                whole_layers: str = "auto", sets: str | None = None, o_direct: bool = True,
                verify: bool = False, lookahead: int = 0, profile: str | None = None,
                pinned_share: float | None = None) -> dict:
    """`ripple compile`: APP/ from --layout, or from --model through the offline steps (into
    --work, default build/work/<model name>)."""
    if (layout is None) == (model is None):
        raise AppError("give --layout DIR (a packed layout) or --model M (a checkpoint to run the "
                       "offline steps on), not both")
    if layout is None:
        folder = Path(work) if work else Path("build") / "work" / Path(model).stem
        _say(f"running the offline steps for {model} in {folder}")
        layout = str(offline_steps(model, folder))
    gap, request, storage_file = storage_rule(storage, queue_depth, layout)
    info = build_app(layout, out, model=model, target=target, kv_dtype=kv_dtype, queue_depth=queue_depth,
                     read_ahead=read_ahead, budget_mb=budget_mb, collapse_gap_bytes=gap,
                     max_request_bytes=request, storage_file=storage_file, whole_layers=whole_layers,
                     sets=sets, o_direct=o_direct, verify=verify, lookahead=lookahead,
                     profile=profile, pinned_share=pinned_share, progress=_say)
    return {"out": out, "target": target, "layers": info["layers"], "sets": info["sets"],
            "total_bytes": info["total_bytes"], "compile_seconds": info["compile_seconds"],
            "files": {k: v["bytes"] for k, v in info["files"].items()}, "runner": info["runner"]}


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    """The prompt as token ids, in the chat template when the tokenizer has one and chat is on."""
    if chat and getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False))
    return list(tok(prompt)["input_ids"])


def generate_app_cmd(app: str, prompt: str, tokens: int, chat: bool = True, json_out: str | None = None,
                     threads: int | None = None) -> dict:
    """`ripple generate --app APP`: greedy decoding by the compiled library and native runtime."""
    from ..runtime_py.app_session import AppSession
    from ..tuning.checkpoint import load_tokenizer
    with AppSession(app, threads) as s:
        tok = load_tokenizer(s.info["model"]["source"])
        ids = prompt_ids(tok, prompt, chat)
        gen = s.generate(ids, tokens)
        kv_bytes = int(np.prod([s.info["kv"]["shape"][0], 2, len(ids) + tokens, s.info["kv"]["shape"][3]])) * \
            np.dtype(s.info["kv"]["dtype"]).itemsize
        dram = s.dram_bytes(kv_bytes)
        o_direct = s.o_direct
    med = lambda xs: float(np.median(xs)) if len(xs) else 0.0  # noqa: E731
    out = {
        "engine": "compiled", "app": str(app), "prompt": prompt, "prompt_ids": ids, "ids": gen.ids,
        "text": tok.decode(gen.ids, skip_special_tokens=True), "o_direct": o_direct,
        "prefill_ms": gen.prefill_ms, "prefill_tokens_per_s": len(ids) / (gen.prefill_ms / 1e3),
        "token_ms": gen.token_ms, "outside_ms": gen.outside_ms,
        "io_wait_ms": [st.io_wait_s * 1e3 for st in gen.steps],
        "read_ms": [st.read_s * 1e3 for st in gen.steps],
        "bytes_read": [st.bytes_read for st in gen.steps], "reads": [st.reads for st in gen.steps],
        "active_neurons": [st.active for st in gen.steps],
        "summary": {"tokens": len(gen.token_ms), "token_ms_median": med(gen.token_ms),
                    "outside_ms_median": med(gen.outside_ms),
                    "io_wait_ms_median": med([st.io_wait_s * 1e3 for st in gen.steps]),
                    "bytes_read_median": med([st.bytes_read for st in gen.steps])},
        "dram_bytes": dram, "threads": threads or os.cpu_count(),
    }
    if json_out:
        write_json(json_out, out)
    return out


def print_app_generation(r: dict) -> None:
    s = r["summary"]
    print(r["text"])
    print()
    print(f"compiled engine ({r['app']}), O_DIRECT {'on' if r['o_direct'] else 'OFF'}: prefill "
          f"{len(r['prompt_ids'])} tokens in {r['prefill_ms']:.1f} ms ({r['prefill_tokens_per_s']:.0f} tokens/s)")
    print(f"median per token: {s['token_ms_median']:.2f} ms in the library ({s['io_wait_ms_median']:.2f} ms "
          f"waiting for reads), {s['outside_ms_median']:.3f} ms outside it; {s['bytes_read_median'] / 1e6:.2f} MB read")
    d = r["dram_bytes"]
    print(f"DRAM: {d['params'] / 1e6:.1f} MB params, {d['kv'] / 1e6:.1f} MB KV, {d['runtime_pinned'] / 1e6:.1f} MB "
          f"pinned FFN, {d['runtime_buffers'] / 1e6:.1f} MB runtime buffers")
