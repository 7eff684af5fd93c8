"""`ripple bench match`: does the compiled engine decode what the torch reference decodes, given
the same FFN sets? The same prompt through the APP in this process (runtime_py.app_session, as
`ripple generate --app`), through APP/ripple-run (no Python), and through the torch forward
(tuning.forward) holding what the APP multiplies: the non-FFN matrices as the APP's blocks, each
layer's FFN as the APP reads it (a whole layer: the GGUF's own blocks, every neuron; a sparse
layer: its bundles as packed, the neurons the APP's sets keep).

The reference is teacher-forced on the engine's ids, so one near tie cannot make the rest of the
comparison meaningless; ids are compared where the reference's top two logits are further apart
than the tolerance. With predicted sets the prompt goes in one token per call on both sides: a
prompt step reads the union of its tokens' sets, which no per-token reference reproduces.
This module imports nothing heavy at top (the CLI builds its parser).
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

TOL = 2e-3          # of the largest |logit|: fp32 sums in another order, nothing else
DEFAULT_PROMPT = "What is flash memory? Answer in two sentences."


def register(bench_sub) -> None:
    p = bench_sub.add_parser("match", help="the compiled engine, ripple-run and the torch reference on one "
                                           "prompt: ids and logits given the same FFN sets (JSON)")
    p.add_argument("--app", required=True, help="APP folder from `ripple compile` (host)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="wrapped in the chat template when the model has one")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", required=True, help="results")
    p.set_defaults(run=_run)


def _run(args) -> None:
    ids = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    r = match_cmd(args.app, args.tokens, args.json, prompt=args.prompt, prompt_ids=ids)
    for name in ("engine", "runner"):
        print(f"{name}: {r[name]['tokens']} ids, max |logit - reference| {r[name]['max_rel_logit_diff']:.2e} "
              f"of the largest |logit|; ids agree with the reference where it is decided: "
              f"{r[name]['ids_agree_where_decided']} ({r['decided_steps']} of {r['steps']} steps)")
    print(f"engine and runner ids identical: {r['engine_runner_ids_identical']}; tolerance {TOL:g}")


def reference_model(info: dict, app: Path):
    """(the torch model holding what the APP multiplies, its ModelDesc)."""
    import gguf
    import numpy as np
    import torch

    from ..layout.bundle import decode_bundles
    from ..layout.reader import open_layout
    from ..tuning.checkpoint import load_model
    from ..tuning.forward import to_torch

    desc = load_model(info["model"]["source"])
    tm = to_torch(desc)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def as_q8(w):
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w, np.float32), q8),
                                                       q8).reshape(w.shape).astype(np.float32))
    if not info["model"]["gguf_blocks"]:      # an HF folder's matrices were quantized to Q8_0
        tm.embed = as_q8(desc.embed)
        tm.lm_head = tm.embed if desc.lm_head is desc.embed else as_q8(desc.lm_head)
        for i, lw in enumerate(desc.layers):
            for name in ("wq", "wk", "wv", "wo"):
                tm.layers[i][name] = as_q8(getattr(lw, name))
    sparse = info["layers"]["sparse"]
    layout = open_layout(app) if sparse else None      # no bundles file without a sparse layer
    raw = np.fromfile(layout.path, np.uint8) if sparse else None
    for i in sparse:
        at = int(layout.region_offsets[i])
        rows = raw[at:at + layout.d_ffn * layout.bundle_bytes].reshape(layout.d_ffn, -1)[layout.slot_of[i]]
        b = decode_bundles(layout.spec, rows)
        tm.layers[i]["w_up"] = torch.from_numpy(b.up.astype(np.float32))
        tm.layers[i]["w_down"] = torch.from_numpy(np.ascontiguousarray(b.down_t.T, np.float32))
        if b.gate is not None:
            tm.layers[i]["w_gate"] = torch.from_numpy(b.gate.astype(np.float32))
        if b.up_bias is not None:
            tm.layers[i]["b_up"] = torch.from_numpy(b.up_bias.astype(np.float32))
    return tm, desc


def reference_ffn(tm, info: dict, app: Path):
    """The FFN the APP computes: whole layers dense; sparse layers keep, of the neurons their
    sets read (all, or the predictor's from the APP's own params and logit thresholds), those
    whose score clears the layer's threshold."""
    import numpy as np
    import torch

    from ..compile.app_params import read_params
    from ..compile.runtime_config import read_runtime_config
    from ..tuning.forward import ffn_coefficients, ffn_output
    from ..tuning.sparsity import scores

    sparse = set(info["layers"]["sparse"])
    thr = info["score_thresholds"]
    crit = info["criterion"]
    pred = None
    if info["sets"] == "predicted":
        names = [t["name"] for t in info["params"]["tensors"]]
        params = dict(zip(names, read_params(app, info["params"])))
        logit_thr = read_runtime_config(app / info["runtime_config"]).logit_thresholds
        f32 = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
        pred = {i: [f32(params[f"l{i}.pred_{k}"]) for k in ("a", "a_bias", "b", "b_bias")] + [float(logit_thr[i])]
                for i in sparse}

    def ffn(layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer not in sparse:
            return ffn_output(tm, layer, ffn_coefficients(tm, layer, h))
        coef, score = scores(tm, layer, h, crit)
        keep = score > float(thr[layer])
        if pred is not None:
            a, ab, b, bb, t = pred[layer]
            keep &= (torch.relu(h @ a + ab) @ b + bb) > t
        return ffn_output(tm, layer, coef * keep)
    return ffn


def teacher_forced(tm, ffn, prompt: list[int], ids: list[int], kv_dtype, stepwise: bool):
    """The reference's logits at each step of the engine's ids: prefill's last, then each decode's."""
    import numpy as np
    import torch

    from ..tuning.forward import forward, new_cache
    cache = new_cache(tm, 1, len(prompt) + len(ids), kv_dtype)
    if stepwise:
        for t in prompt:
            last = forward(tm, torch.tensor([[t]]), cache, ffn)[0, -1]
    else:
        last = forward(tm, torch.tensor([prompt]), cache, ffn, last_only=True)[0, -1]
    out = [last.numpy()]
    for t in ids[:-1]:
        out.append(forward(tm, torch.tensor([[t]]), cache, ffn)[0, -1].numpy())
    return np.stack(out)


def compare(ref, ids: list[int], logits) -> dict:
    import numpy as np
    logits = np.asarray(logits)
    scale = float(np.abs(ref).max())
    diff = np.abs(logits - ref).max(1) / scale
    top2 = np.sort(ref, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * TOL * scale
    agree = np.asarray(ids) == ref.argmax(1)
    return {"tokens": len(ids), "max_rel_logit_diff": float(diff.max()), "within_tolerance": bool(diff.max() <= TOL),
            "ids_agree_where_decided": bool(agree[decided].all()), "ids_agree_all": bool(agree.all()),
            "rel_logit_diff_per_step": [round(float(x), 8) for x in diff]}


def match_cmd(app: str, tokens: int, json_out: str | None, prompt: str = DEFAULT_PROMPT,
              prompt_ids: list[int] | None = None) -> dict:
    import numpy as np
    import torch

    from ..atomic_file import write_json
    from ..compile.app_files import AppError
    from ..runtime_py.app_session import AppSession
    from .app_cmds import prompt_ids as tokenize

    folder = Path(app).resolve()
    with AppSession(folder) as s:
        info = s.info
        if info["runner"] is None:
            raise AppError(f"{folder}: no ripple-run (compiled for {info['target']}); compile for host")
        if prompt_ids is None:
            from ..tuning.checkpoint import load_tokenizer
            prompt_ids = tokenize(load_tokenizer(info["model"]["source"]), prompt, True)
        stepwise = info["sets"] == "predicted" and bool(info["layers"]["sparse"])
        gen = s.generate(prompt_ids, tokens, keep_logits=True, stepwise_prompt=stepwise)
    with tempfile.TemporaryDirectory() as tmp:
        out, dump = Path(tmp) / "run.json", Path(tmp) / "logits.f32"
        cmd = [str(folder / info["runner"]), "--prompt-ids", ",".join(map(str, prompt_ids)), "--tokens", str(tokens),
               "--json", str(out), "--dump-logits", str(dump)] + (["--stepwise-prompt"] if stepwise else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise AppError(f"{folder / info['runner']} failed: {r.stderr.strip()}")
        run = json.loads(out.read_text())
        run_logits = np.fromfile(dump, "<f4").reshape(len(run["ids"]), -1)
    tm, _ = reference_model(info, folder)
    kv = torch.float16 if info["kv_dtype"] == "float16" else torch.float32
    ref = teacher_forced(tm, reference_ffn(tm, info, folder), prompt_ids, gen.ids, kv, stepwise)
    res = {"app": str(folder), "model": info["model"]["source"], "sets": info["sets"], "layers": info["layers"],
           "prompt_ids": prompt_ids, "stepwise_prompt": stepwise, "tolerance": TOL, "steps": len(gen.ids),
           "engine": {"ids": gen.ids, **compare(ref, gen.ids, gen.logits)},
           "runner": {"ids": run["ids"], **compare(ref[:len(run["ids"])], run["ids"], run_logits)},
           "reference_argmax": [int(i) for i in ref.argmax(1)]}
    top2 = np.sort(ref, axis=1)[:, -2:]
    res["decided_steps"] = int((top2[:, 1] - top2[:, 0] > 2 * TOL * np.abs(ref).max()).sum())
    res["engine_runner_ids_identical"] = gen.ids == run["ids"]
    if json_out:
        write_json(json_out, res)
    return res
