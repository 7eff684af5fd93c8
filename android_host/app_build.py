"""`ripple compile`: a layout folder -> APP/ (compile.app_files), everything an app needs to
decode with the FFN in flash: the decode step compiled (compile.model_graph), its params
(GGUF blocks, norms, the predictor), the runtime's config, the flash files, the native
runtime and runner, the tokenizer and app.json. The folder is built under a temporary name
and renamed when complete.

Here the model home (tuning: the checkpoint, the predictor, the profile's thresholds) meets
the compiler; compile/ itself knows dimensions and arrays only.

Which layers are read whole is decided here, once, for the graph and the runtime alike
(`whole_layers`): "auto" reads every layer whole when the layout has a whole copy (`ripple
pack --whole-copy`, written for weakly sparse models whose predicted sets cover nearly every
block of a layer: SmolLM2 at sparsity 0.6, ~90%), and none otherwise.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..atomic_file import write_json
from ..compile.app_files import (APP_FILE, CONFIG_FILE, FORMAT, LIBRARY, RUNNER, RUNTIME_LIBRARY, STORAGE_FILE,
                                 TOKENIZER_FILE, AppError)
from ..compile.app_params import write_params
from ..compile.build import knobs_for
from ..compile.elf import read_elf
from ..compile.ffn import VIEW_DTYPE
from ..compile.model_graph import (FETCH, FUNCTIONS, LAYER_SPARSE, LAYER_WHOLE, PREFETCH, WHOLE, DecodeSpec,
                                   WholeParts, decode_module)
from ..compile.runtime_config import RuntimeConfig, block_crc_tables, write_runtime_config
from ..compile.targets import export_library, make_target, target_dict
from ..layout.header import MODEL_FILE
from ..layout.manifest import MANIFEST_FILE
from ..layout.reader import open_layout
from ..layout.whole_copy import WHOLE_FILE, WHOLE_MANIFEST, open_whole_copy
from .model_params import matrix_kinds, model_params

WHOLE_LAYERS = ("auto", "all", "none")
KV_DTYPES = ("float16", "float32")
REQUEST_BYTES = 1 << 20          # whole extents go out in requests of this size (runtime_py.read_ahead)


def build_app(layout_dir: str, out_dir: str, model: str | None = None, target: str = "host",
              kv_dtype: str = "float16", queue_depth: int = 32, read_ahead: int = 2,
              budget_mb: float = 0.0, collapse_gap_bytes: int = 0, max_request_bytes: int = REQUEST_BYTES,
              storage_file: str | None = None, whole_layers: str = "auto",
              sets: str | None = None, sparsity: float | None = None, o_direct: bool = True,
              verify: bool = False, lookahead: int = 0, profile: str | None = None,
              pinned_share: float | None = None, progress=None) -> dict:
    """Write APP/ (see the module) for `target`; returns app.json's contents.
    budget_mb: DRAM for whole layers of the whole copy, read once at open (spread over the
    layers read whole), and what is left of it for the bundles of sparse layers that fire most
    often on the calibration text of `profile` (a `ripple profile` file of this checkpoint;
    not needed when every sparse bundle fits): `pinned_share` of it pinned, the rest an LRU of
    what each sparse layer read (None: the share the storage model finds fastest on the
    profile's calibration masks, with storage_file's latency table; 1 without one);
    collapse_gap_bytes, max_request_bytes: the planner's rule, from the device
    profile storage_file (copied into the APP; android_host.interface derives both from its
    latency table); sets:
    "predicted" (default when the layout has predictor.npz) or "all" (every bundle of a
    sparse layer read, the kernel keeping the neurons whose score clears the threshold);
    lookahead J > 0: each sparse layer t's reads issued at layer t - min(J, t)'s FFN input, by
    the lookahead predictors beside the predictor (`ripple train-predictor --lookahead`)."""
    from ..tuning.checkpoint import load_model
    from ..layout.reader import check_source
    target_dict(target)
    if whole_layers not in WHOLE_LAYERS:
        raise AppError(f"--whole-layers {whole_layers}: choose one of {', '.join(WHOLE_LAYERS)}")
    if kv_dtype not in KV_DTYPES:
        raise AppError(f"--kv-dtype {kv_dtype}: choose one of {', '.join(KV_DTYPES)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AppError(f"{out}: exists and is not an empty folder; choose a new --out")
    step = progress or (lambda msg: None)
    layout = open_layout(layout_dir, verify=True)
    path = model or layout.manifest.source
    if not Path(path).exists():
        raise AppError(f"{path}: the checkpoint {layout_dir} was packed from is not there; pass --model")
    desc = load_model(path)
    check_source(layout, desc.source_hash)
    copy = open_whole_copy(layout.path.parent, layout.manifest.source_hash)
    L = desc.n_layers
    if whole_layers == "all" and copy is None:
        raise AppError(f"--whole-layers all: {layout_dir} has no whole copy; pack with --whole-copy")
    mode = np.full(L, LAYER_WHOLE if copy is not None and whole_layers != "none" else LAYER_SPARSE, np.int8)
    meta = layout.manifest.meta
    thresholds = _thresholds(meta, L, sparsity, layout_dir)
    predictor = _predictor(layout, desc, sets, thresholds, meta) if (mode == LAYER_SPARSE).any() else None
    la, distance = _lookahead(layout, predictor, mode, lookahead)
    kinds = matrix_kinds(desc)
    knobs, tuned = knobs_for(layout.spec, target)
    if (mode == LAYER_SPARSE).any() and not tuned:
        step(f"no tuned knobs for the {layout.spec.dtype} sparse kernel on {target}: the default schedule "
             f"(`ripple tune kernels --target {target} --dtype {layout.spec.dtype}` tunes it)")
    spec = DecodeSpec(
        arch=desc.arch, d_model=desc.d_model, n_layers=L, n_heads=desc.n_heads, n_kv_heads=desc.n_kv_heads,
        head_dim=desc.head_dim, d_ffn=desc.d_ffn, vocab=desc.vocab_size,
        norm="rms" if desc.arch == "llama" else "layer", norm_eps=float(desc.norm_eps),
        rope=desc.pos_embed is None, activation=desc.activation, kv_dtype=kv_dtype,
        embed_kind=kinds["embed"], lm_head_kind=None if desc.lm_head is desc.embed else (kinds["lm_head"] or "q8_0"),
        qkv_kind=kinds["qkv"], o_kind=kinds["o"], bias=desc.layers[0].bq is not None,
        pos_rows=0 if desc.pos_embed is None else int(desc.pos_embed.shape[0]),
        pos_offset=_pos_offset(desc), layer_mode=tuple(int(m) for m in mode),
        whole=None if copy is None else WholeParts(copy.layer_bytes, tuple(
            (p.name, p.kind, p.shape[0], p.shape[1], p.at) for p in copy.parts)),
        bundle=layout.spec, knobs=knobs, keep=meta.get("criterion", "coef"),
        score_thresholds=tuple(float(t) for t in thresholds),
        predictor_rank=0 if predictor is None else int(predictor.rank),
        lookahead=tuple(int(j) for j in distance) if la is not None else (),
        lookahead_rank=int(la.a.shape[-1]) if la is not None else 0)

    # what the DRAM budget holds, refused before minutes of compiling when it cannot be chosen
    pinned = _pinned_layers(mode, copy, budget_mb)
    left = int(budget_mb * (1 << 20)) - int(pinned.sum()) * (copy.layer_bytes if copy is not None else 0)
    share, share_source = _pinned_share(pinned_share, mode, left, layout, profile, storage_file, queue_depth)
    pinned_ids = _pinned_bundles(mode, int(left * share), layout.bundle_bytes, desc.d_ffn, profile,
                                 desc.source_hash)
    n_sparse, n_pinned = int((mode == LAYER_SPARSE).sum()), sum(map(len, pinned_ids))
    # the rest an LRU per sparse layer, unless every bundle is pinned already
    lru = 0 if n_pinned == n_sparse * desc.d_ffn else \
        min(desc.d_ffn, max(left - n_pinned * layout.bundle_bytes, 0) // (n_sparse * layout.bundle_bytes))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o755)
    try:
        import tvm
        step("compiling the decode step")
        t0 = time.perf_counter()
        linker = export_library(tvm.compile(decode_module(spec), target=make_target(target)), tmp / LIBRARY, target)
        compile_s = time.perf_counter() - t0
        step("writing params")
        params = write_params(tmp, spec, model_params(desc, spec, predictor, la))
        step("copying the flash files")
        # The bundles go only where a layer reads them: with every layer read whole, the
        # runtime never opens model.rflash (61 MB of SmolLM2's 163 MB APP). The manifest stays:
        # it names the checkpoint, the dims and the placement the APP was built from.
        reads_bundles = bool((mode == LAYER_SPARSE).any())
        if reads_bundles:
            _place(layout.path, tmp / MODEL_FILE)
        _place(layout.manifest_path, tmp / MANIFEST_FILE)
        if copy is not None:
            _place(copy.path, tmp / WHOLE_FILE)
            _place(copy.path.with_name(WHOLE_MANIFEST), tmp / WHOLE_MANIFEST)
        gap, request = int(collapse_gap_bytes), int(max_request_bytes)
        cfg = RuntimeConfig(
            bundles_file=MODEL_FILE if reads_bundles else None,
            whole_file=WHOLE_FILE if copy is not None else None, n_layers=L, n=desc.d_ffn,
            bundle_bytes=layout.bundle_bytes, alignment=layout.alignment,
            view_dtype=VIEW_DTYPE[layout.spec.dtype], region_offsets=np.asarray(layout.region_offsets, np.int64),
            slot_of=np.asarray(layout.slot_of, np.int32),
            whole_offsets=np.asarray(copy.offsets if copy is not None else np.zeros(L), np.int64),
            whole_layer_bytes=copy.layer_bytes if copy is not None else 0, layer_mode=mode,
            logit_thresholds=np.asarray(predictor.thresholds if predictor is not None else np.zeros(L), np.float32),
            pinned_layers=pinned, pinned_bundles=pinned_ids,
            sets_all=predictor is None, queue_depth=queue_depth, read_ahead=read_ahead,
            collapse_gap_bytes=gap, max_request_bytes=request, o_direct=o_direct,
            lookahead=int(distance.max()) if la is not None else 0,
            la_thresholds=_la_thresholds(la, distance) if la is not None else None, lru_per_layer=int(lru))
        if verify:
            cfg.verify = True
            cfg.bundle_crc32, cfg.whole_crc32 = block_crc_tables(layout, copy)
            if not reads_bundles:
                cfg.bundle_crc32 = np.zeros(0, np.uint32)
        write_runtime_config(tmp / CONFIG_FILE, cfg)
        step("building the native runtime and runner")
        files = _natives(target, tmp)
        tok = _tokenizer(path, tmp, step)
        if storage_file is not None:
            shutil.copyfile(storage_file, tmp / STORAGE_FILE)
        info = {
            "format": FORMAT, "target": target, "target_json": target_dict(target), "linked_with": linker.via,
            "library": LIBRARY, "runtime_library": RUNTIME_LIBRARY, "runtime_config": CONFIG_FILE,
            "params": params, "tokenizer": tok, "runner": files.get("runner"),
            "model": {"source": str(path), "source_hash": desc.source_hash, "arch": desc.arch,
                      "name": desc.name, "layers": L, "d_model": desc.d_model, "d_ffn": desc.d_ffn,
                      # the non-FFN matrices are the GGUF's own blocks (else quantized to Q8_0 here)
                      "gguf_blocks": kinds["gguf_blocks"]},
            "vocab": desc.vocab_size, "max_positions": int(desc.max_positions),
            "eos_token_ids": [int(t) for t in desc.eos_token_ids],
            "kv": {"shape": [L, 2, None, spec.kv_dim], "dtype": kv_dtype},
            "functions": {f: {"name": f, "args": [
                "tokens: (n,) int32" if f == "prefill" else "token: (1,) int32",
                f"kv: ({L}, 2, max_len, {spec.kv_dim}) {kv_dtype}, updated in place",
                "pos: Shape [p], the position of the first token", "params: tuple (app.json params)"],
                "returns": f"logits: (1, {desc.vocab_size}) float32, the last token's"} for f in FUNCTIONS},
            "flash_runtime": {
                "calls": {WHOLE: "(layer) -> the layer's whole-copy extent, uint8, read ahead",
                          FETCH: "(layer, logits (n, d_ffn) f32) -> the predicted neurons' bundles (k, cols)",
                          PREFETCH: "(layer, lookahead logits (n, d_ffn) f32) -> requests queued"},
                "open": "ripple.rt.open(runtime.bin path)", "stats": "ripple.rt.stats(out float64 (24,))",
                "close": "ripple.rt.close()"},
            "layers": {"whole": [int(i) for i in np.flatnonzero(mode == LAYER_WHOLE)],
                       "sparse": [int(i) for i in np.flatnonzero(mode == LAYER_SPARSE)],
                       "pinned_whole": [int(i) for i in np.flatnonzero(pinned)],
                       "pinned_bundles": [len(p) for p in pinned_ids], "lru_bundles_per_sparse_layer": int(lru),
                       "pinned_share": share, "pinned_share_source": share_source},
            # none: no sparse layer, every layer read whole from the whole copy
            # layer t's reads issued at layer t - lookahead[t]'s FFN input (0: at its own)
            "lookahead": [int(j) for j in distance] if la is not None else None,
            "sets": "none" if not (mode == LAYER_SPARSE).any() else "all" if predictor is None else "predicted",
            "sparsity": float(meta.get("sparsity", 0.0)), "criterion": spec.keep,
            "score_thresholds": list(spec.score_thresholds),
            "bundle": asdict(layout.spec), "knobs": spec.knobs.to_dict(), "knobs_tuned": tuned,
            "kv_dtype": kv_dtype,
            "io": {"queue_depth": queue_depth, "read_ahead": read_ahead, "collapse_gap_bytes": gap,
                   "max_request_bytes": request, "o_direct": o_direct, "verify": verify,
                   "storage_profile": STORAGE_FILE if storage_file is not None else None,
                   "budget_bytes": int(budget_mb * (1 << 20)),
                   "pinned_bytes": int(pinned.sum()) * (copy.layer_bytes if copy is not None else 0)
                   + (n_pinned + lru * n_sparse) * layout.bundle_bytes},
            "compile_seconds": round(compile_s, 2),
            "files": {}, "tvm": tvm.__version__,
        }
        for p in sorted(tmp.iterdir()):
            info["files"][p.name] = {"bytes": p.stat().st_size}
            if p.suffix == ".so" or p.name == RUNNER:
                elf = read_elf(p)
                info["files"][p.name].update(machine=elf.machine, needed=list(elf.needed))
        info["files"][LIBRARY]["sha256"] = hashlib.sha256((tmp / LIBRARY).read_bytes()).hexdigest()
        info["total_bytes"] = sum(f["bytes"] for f in info["files"].values())
        write_json(tmp / APP_FILE, info)
        if out.exists():
            out.rmdir()                       # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _thresholds(meta: dict, L: int, sparsity: float | None, layout_dir: str) -> np.ndarray:
    from ..tuning.profile import thresholds_at
    s = float(meta.get("sparsity", 0.0)) if sparsity is None else sparsity
    if s == 0.0:
        return np.full(L, -1.0)
    if "grid" not in meta:
        raise AppError(f"{layout_dir}: packed without a profile, so only sparsity 0 compiles; pack with --profile")
    return np.asarray(thresholds_at(meta["grid"], meta["grid_thresholds"], s), np.float64)


def _predictor(layout, desc, sets: str | None, thresholds: np.ndarray, meta: dict):
    """The layout's predictor for predicted sets, or None (every bundle read: sets "all")."""
    from ..tuning.predictor import PREDICTOR_FILE, check_predictor, load_predictor
    where = layout.path.parent / PREDICTOR_FILE
    if sets is None:
        sets = "predicted" if where.is_file() else "all"
    if sets == "all":
        return None
    if sets != "predicted":
        raise AppError(f"--sets {sets}: choose predicted or all")
    if not where.is_file():
        raise AppError(f"{where}: no predictor; run `ripple train-predictor --out {layout.path.parent}` "
                       f"or compile with --sets all")
    pred = load_predictor(where)
    check_predictor(pred, desc.source_hash, desc.n_layers, desc.d_model, desc.d_ffn, str(where))
    if not np.allclose(pred.score_thresholds, thresholds.astype(np.float32), rtol=1e-5, atol=1e-6):
        raise AppError(f"{where} was trained for sparsity {pred.sparsity:g}, the layout compiles at "
                       f"{meta.get('sparsity')}; train it again or pass --sparsity {pred.sparsity:g}")
    return pred


def _lookahead(layout, predictor, mode: np.ndarray, J: int):
    """(tuning.lookahead.Lookahead, (L,) distance a sparse layer is prefetched from), or (None,
    None) with J 0. Layer t goes min(J, t) layers ahead: layer 0 has no layer before it."""
    if not J:
        return None, None
    from ..tuning.lookahead import LOOKAHEAD_FILE, load_lookahead
    where = layout.path.parent / LOOKAHEAD_FILE
    if predictor is None:
        raise AppError("--lookahead needs predicted sets of sparse layers: a layout with predictor.npz, "
                       "--sets predicted and a layer read sparse (--whole-layers none)")
    if not where.is_file():
        raise AppError(f"{where}: no lookahead predictors; run `ripple train-predictor --out "
                       f"{layout.path.parent} --lookahead {J}`")
    la = load_lookahead(where)
    if la.source_hash != predictor.source_hash or not np.isclose(la.sparsity, predictor.sparsity):
        raise AppError(f"{where} was trained on another profile than predictor.npz (checkpoint or sparsity); "
                       f"train both again with `ripple train-predictor --lookahead {J}`")
    L = len(mode)
    distance = np.array([min(J, t) if mode[t] == LAYER_SPARSE else 0 for t in range(L)], np.int64)
    missing = sorted(set(distance[distance > 0].tolist()) - set(la.distances))
    if missing:
        raise AppError(f"{where} predicts {la.distances} layers ahead, --lookahead {J} needs {missing}; "
                       f"train it with `ripple train-predictor --lookahead {J}`")
    return la, distance


def _la_thresholds(la, distance: np.ndarray) -> np.ndarray:
    out = np.full(len(distance), np.inf, np.float32)
    for t, j in enumerate(distance):
        if j:
            out[t] = la.thresholds[la.distances.index(int(j)), t]
    return out


def _pos_offset(desc) -> int:
    from ..tuning.model import OPT_POSITION_OFFSET
    return OPT_POSITION_OFFSET if desc.pos_embed is not None else 0


def _pinned_layers(mode: np.ndarray, copy, budget_mb: float) -> np.ndarray:
    """The whole layers whose copies fit the DRAM budget, spread evenly over the whole layers
    (the last one pinned only when nearly all are). The runtime reads `read_ahead` layers
    early; while a pinned layer computes, the disk works off that lead. The last k layers
    pinned together (as before) made one long stretch, with the LM head, in which the lead ran
    out and the disk idled:
    ripple-run on SmolLM2 with 3 layers pinned took ~1 ms a token less with them at 7, 15, 22
    than at 27, 28, 29 (runs alternating both, in the disk's fast phases; docs/results.md)."""
    pinned = np.zeros(len(mode), bool)
    if copy is None:
        return pinned
    whole = np.flatnonzero(mode == LAYER_WHOLE)
    k = min(int(budget_mb * (1 << 20)) // copy.layer_bytes, len(whole))
    pinned[whole[(np.arange(k) + 1) * len(whole) // (k + 1)]] = True
    return pinned


def _pinned_share(share: float | None, mode: np.ndarray, budget_bytes: int, layout, profile: str | None,
                  storage_file: str | None, queue_depth: int) -> tuple[float, str]:
    """The share of the sparse layers' DRAM budget pinned (the rest LRU), and where it came
    from: given, or the one of strategies.PINNED_SHARES whose modelled per-token I/O is least
    on the profile's calibration masks (runtime_py.strategies.tune, the hybrid cache pinning
    by frequency, planned with access collapse as the runtime reads)."""
    if share is not None:
        if not 0.0 <= share <= 1.0:
            raise AppError(f"--pinned-share {share}: a fraction in [0, 1]")
        return float(share), "given"
    n_sparse = int((mode == LAYER_SPARSE).sum())
    if not n_sparse or budget_bytes < n_sparse * layout.bundle_bytes \
            or budget_bytes >= n_sparse * layout.perm.shape[1] * layout.bundle_bytes:
        return 1.0, "nothing to share (no budget for the sparse layers, or all of them fit)"
    if profile is None or storage_file is None:
        return 1.0, "default: choosing it needs --profile and --storage"
    from ..runtime_py.strategies import Strategy, tune
    from .devices import load_device
    sparse = np.flatnonzero(mode == LAYER_SPARSE)
    calib = _own_profile(profile, layout.manifest.source_hash).masks("calib")[sparse]
    s = Strategy("compiled", "ours", "collapse", "hybrid", pinned_share=None, pin_by="frequency")
    best, notes = tune(s, calib, layout.perm[sparse], layout.bundle_bytes, budget_bytes,
                       load_device(storage_file).storage, queue_depth)
    return float(best.pinned_share), f"storage model on the profile's calibration masks: {notes.get('modelled_ms')}"


def _own_profile(profile: str, source_hash: str):
    from ..tuning.profile import load_profile
    p = load_profile(profile)
    if p.source_hash != source_hash:
        raise AppError(f"{profile}: profiled on another checkpoint than the layout's; give its own profile")
    return p


def _pinned_bundles(mode: np.ndarray, budget_bytes: int, bundle_bytes: int, n: int, profile: str | None,
                    source_hash: str) -> list[np.ndarray]:
    """Per layer, the neuron ids of sparse layers held in DRAM (read once at open): every one
    when they all fit `budget_bytes`, else the ones active most often on the profile's
    calibration tokens, over all sparse layers at once (a hot neuron of one layer beats a
    lukewarm one of another: each costs one bundle of DRAM and saves its reads)."""
    L = len(mode)
    sparse = np.flatnonzero(mode == LAYER_SPARSE)
    k = max(budget_bytes, 0) // bundle_bytes
    out = [np.zeros(0, np.int32) for _ in range(L)]
    if k == 0 or len(sparse) == 0:
        return out
    if k >= len(sparse) * n:
        for l in sparse:
            out[l] = np.arange(n, dtype=np.int32)
        return out
    if profile is None:
        raise AppError(f"--budget-mb holds {k} of the {len(sparse) * n} bundles of sparse layers: give the "
                       "profile (--profile, as packed) to choose the ones that fire most often")
    p = _own_profile(profile, source_hash)
    freq = np.stack([np.unpackbits(p.masks_calib[l], axis=-1, count=n).mean(axis=0) for l in sparse])  # (S, n)
    top = np.argsort(-freq, axis=None, kind="stable")[:k]
    rows, ids = np.unravel_index(top, freq.shape)
    for r, l in enumerate(sparse):
        out[l] = np.sort(ids[rows == r]).astype(np.int32)
    return out


def _place(src: Path, dest: Path) -> None:
    """A flash file into the APP: a copy of its own (a hard link would let a change to the APP's
    file, e.g. an app's installer, reach the layout it came from)."""
    shutil.copyfile(src, dest)


def _natives(target: str, tmp: Path) -> dict:
    """The flash runtime for target, and on the host the runner with the TVM runtime beside it."""
    from ..compile.native_reader import build_reader
    shutil.copyfile(build_reader(target), tmp / RUNTIME_LIBRARY)
    files = {"runtime": RUNTIME_LIBRARY}
    if target in ("host", "linux-arm64"):
        from ..compile.runner import build_runner, runtime_libraries
        shutil.copy2(build_runner(target), tmp / RUNNER)
        for lib in runtime_libraries(target):
            shutil.copyfile(lib, tmp / lib.name)
        files["runner"] = RUNNER
    return files


def _tokenizer(path: str, tmp: Path, step) -> str | None:
    """tokenizer.json of the model's (fast) tokenizer; None, said through `step`, when the
    checkpoint has none (the APP still decodes token ids; app.json says "tokenizer": null)."""
    from ..tuning.checkpoint import load_tokenizer
    from ..tuning.model import ModelLoadError
    try:
        tok = load_tokenizer(path)
    except ModelLoadError as e:
        step(f"no tokenizer.json in the APP: {e}")
        return None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        step(f"no tokenizer.json in the APP: {path}'s tokenizer is not a fast (tokenizers) one")
        return None
    backend.save(str(tmp / TOKENIZER_FILE))
    return TOKENIZER_FILE
