"""The `ripple` command: parses flags and calls one function of `interface` per verb.

Errors a user can act on come out as one line, `ripple: error: ...`, and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .flag_types import check_flags, check_paths, new_output_dir, output_dir, output_file
from .flag_types import fraction as _fraction, fraction_or_one as _fraction_or_one, share as _share
from .flag_types import count as _count, nonneg_float as _nonneg_float, positive as _positive
from .flag_types import positive_float as _positive_float


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not argparse's usage block
        sys.stderr.write(f"ripple: error: {self.prog}: {message} (see --help)\n")
        sys.exit(2)


def _bench_registrars() -> list:
    """`register(bench_sub)` of each benchmark module; these modules import nothing heavy at top."""
    from . import bench_match, bench_placement, bench_predictor, bench_qweights, remote_decode, remote_kernels, \
        remote_replay
    # bench io and bench kernels come with the flags that run them on a device (remote_*).
    return [remote_replay.register, bench_predictor.register, remote_kernels.register, bench_placement.register,
            remote_decode.register, bench_qweights.register, bench_match.register]


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ripple", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    model_help = "GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M GGUF)"

    p = sub.add_parser("profile", help="record which FFN neurons fire on calibration text")
    p.add_argument("--model", help=model_help)
    p.add_argument("--out", required=True, type=output_file, help="profile file to write (.npz)")
    p.add_argument("--text", nargs="+", help="calibration text files (default: text the model samples itself)")
    p.add_argument("--criterion", choices=["coef", "gate"], default="coef",
                   help="coef: |silu(gate)*up| (default); gate: |silu(gate)| (CATS)")
    p.add_argument("--sparsity", type=_fraction, help="fixed sparsity (default: highest within --ppl-budget; "
                   "for a folder `ripple sparsify` wrote, the sparsity it was trained for)")
    p.add_argument("--ppl-budget", type=_nonneg_float, default=0.10,
                   help="allowed held-out perplexity rise over dense (default 0.10)")
    p.add_argument("--calib-tokens", type=_positive, default=1024)
    p.add_argument("--heldout-tokens", type=_positive, default=512)
    p.add_argument("--seq-len", type=_positive, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record-inputs", action="store_true",
                   help="also store each layer's FFN input (fp16), which `ripple train-predictor` needs")
    p.add_argument("--json", help="also write the summary here")
    p.set_defaults(run=_run_profile)

    p = sub.add_parser("sparsify", help="fine-tune a SwiGLU model so that most FFN neurons can be skipped "
                                        "(writes an HF folder every other verb takes as --model)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--out", required=True, type=new_output_dir, help="model folder to write (must not exist; "
                   "work goes to OUT.partial, and the same command resumes it)")
    p.add_argument("--target-sparsity", type=_fraction, default=0.85,
                   help="fraction of FFN neurons inactive per token to train for (default 0.85)")
    p.add_argument("--minutes", type=_positive_float, default=30.0,
                   help="training budget (default 30); sampling text and the evaluation come on top")
    p.add_argument("--train-tokens", type=_positive, default=65536,
                   help="tokens of training text the original samples (default 65536; ~190 tok/s on 2 cores)")
    p.add_argument("--text", nargs="+", help="text files to train and evaluate on instead (last part held out)")
    p.add_argument("--lr", type=_positive_float, default=1e-4)
    p.add_argument("--batch", type=_positive, default=4, help="windows per step (default 4)")
    p.add_argument("--seq-len", type=_positive, default=256, help="training window, tokens (default 256)")
    p.add_argument("--calib-tokens", type=_positive, default=1024, help="calibration text (sets thresholds)")
    p.add_argument("--heldout-tokens", type=_positive, default=2048, help="held-out text (perplexity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive, help="torch threads (default: torch's)")
    p.add_argument("--json", help="also write the report here, and the frontier plot beside it (.png)")
    p.set_defaults(run=_run_sparsify)

    p = sub.add_parser("train-predictor", help="train activation predictors (h -> active neurons) from a profile")
    p.add_argument("--profile", required=True, help="profile with FFN inputs (`ripple profile --record-inputs`)")
    p.add_argument("--out", required=True, help="layout folder (writes DIR/predictor.npz) or a .npz file")
    p.add_argument("--model", help=model_help)
    p.add_argument("--sparsity", type=_fraction, help="a profiled sparsity (default: the profile's)")
    p.add_argument("--rank", type=_positive, default=48, help="hidden rank (default 48: 3.8%% of SmolLM2's FFN FLOPs)")
    p.add_argument("--recall", type=_fraction_or_one, default=0.999,
                   help="share of truly active neurons to predict, per layer (default 0.999)")
    p.add_argument("--epochs", type=_positive, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lookahead", type=_positive, metavar="J",
                   help="also predict layer l+j's set from layer l's input, j = 1..J (lookahead.npz beside the "
                        "predictor), and report each distance's held-out recall")
    p.add_argument("--json", help="also write the summary here")
    p.set_defaults(run=_run_train_predictor)

    p = sub.add_parser("pack", help="write the FFN weights as a flash file of neuron bundles")
    p.add_argument("--model", help=model_help)
    p.add_argument("--out", required=True, type=output_dir, help="output folder (model.rflash + manifest.json)")
    p.add_argument("--profile", help="profile from `ripple profile` (records sparsity and thresholds)")
    p.add_argument("--placement", help="placement file (.npz with perm[L, n]); default identity")
    p.add_argument("--dtype", choices=["fp16", "int8", "q4", "q4d8"], default="fp16",
                   help="bundle encoding: fp16, int8 with a float32 scale per part of each bundle, "
                        "q4 (GGUF Q4_1 blocks of 32; a Q4_1 GGUF's gate/up blocks are copied), "
                        "or q4d8 (q4's gate/up, the down column 8-bit with a float16 scale per 32)")
    p.add_argument("--whole-copy", action="store_true",
                   help="also write the GGUF's own gate/up/down blocks per layer (whole.rflash): "
                        "layers read whole are read from there, fewer bytes and no requantized down")
    p.set_defaults(run=_run_pack)

    p = sub.add_parser("place", help="order each layer's neurons so that co-firing ones sit together")
    p.add_argument("--profile", required=True, help="profile from `ripple profile` (fits on its calibration masks)")
    p.add_argument("--strategy", choices=["identity", "frequency", "ripple", "ours"], default="ours",
                   help="ripple: the paper's greedy Hamiltonian path on 1-P(i,j); ours (default): "
                        "fewest reads per token (mismatch distance, then 2-opt/Or-opt)")
    p.add_argument("--out", required=True, type=output_file,
                   help="placement file to write (.npz, for `ripple pack --placement`)")
    p.add_argument("--k", type=_positive, default=32, help="candidate neighbours per neuron (default 32)")
    p.set_defaults(run=_run_place)

    p = sub.add_parser("inspect", help="validate and summarise a flash file")
    p.add_argument("path", help="layout folder or its model.rflash")
    p.add_argument("--verify", action="store_true", help="check every region's checksum")
    p.set_defaults(run=_run_inspect)

    p = sub.add_parser("compile", help="compile the whole decode step, the native flash runtime and runner into APP/")
    p.add_argument("--layout", help="folder written by `ripple pack` (with predictor.npz for predicted sets)")
    p.add_argument("--model", help="or a checkpoint (GGUF file or HF folder): the offline steps run first "
                                   "(profile, place, pack, train-predictor) with their defaults")
    p.add_argument("--out", required=True, type=output_dir, help="APP folder to write (new or empty)")
    p.add_argument("--target", default="host", help="named target (default host)")
    p.add_argument("--work", help="--model: folder for the offline steps' files (default build/work/NAME)")
    p.add_argument("--kv-dtype", choices=["float16", "float32"], default="float16",
                   help="KV cache storage (default float16, as llama.cpp's)")
    p.add_argument("--queue-depth", type=_positive, default=32)
    p.add_argument("--read-ahead", type=_count, default=2, help="layers a whole layer is read early (default 2)")
    p.add_argument("--budget-mb", type=_nonneg_float, default=0.0,
                   help="DRAM for whole layers of the whole copy, read once at start (default 0)")
    p.add_argument("--storage", help="device profile (`ripple probe storage --out F`, or a shipped name): "
                                     "its latency table sets the access-collapse gap")
    p.add_argument("--whole-layers", choices=["auto", "all", "none"], default="auto",
                   help="layers read whole from the whole copy: auto (all when the layout has one), all, none")
    p.add_argument("--sets", choices=["predicted", "all"],
                   help="sparse layers: predicted (default with predictor.npz) or all (every bundle read)")
    p.add_argument("--buffered", action="store_true", help="read through the page cache (not flash timing)")
    p.add_argument("--verify", action="store_true",
                   help="the runtime checks every block it reads against its CRC from `ripple pack` (CPU per byte read)")
    p.add_argument("--profile",
                   help="the profile the layout was packed from: --budget-mb pins the bundles of sparse layers "
                        "that fire most often on its calibration text")
    p.add_argument("--pinned-share", type=_share,
                   help="of --budget-mb's part for sparse layers, the share pinned (the rest an LRU of what "
                        "they read); default: the one the storage model finds fastest on --profile with --storage")
    p.add_argument("--lookahead", type=_count, default=0, metavar="J",
                   help="issue each sparse layer's reads J layers early, predicted by lookahead.npz beside the "
                        "predictor (`ripple train-predictor --lookahead J`); its own set's misses read on demand")
    p.set_defaults(run=_run_compile)

    p = sub.add_parser("generate", help="generate text with every FFN weight read from flash")
    p.add_argument("--app", help="APP folder from `ripple compile`: decode with the compiled library and "
                                 "the native runtime (the engine an app runs)")
    p.add_argument("--threads", type=_positive, help="--app: compute threads (default all cores)")
    p.add_argument("--layout", help="folder written by `ripple pack`: the Python engine (reference)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--prompt", default="What is flash memory? Answer in two sentences.")
    p.add_argument("--tokens", type=_positive, default=16)
    p.add_argument("--sparsity", type=_fraction, help="default: the one recorded by `ripple pack --profile`")
    p.add_argument("--queue-depth", type=_positive, default=32)
    p.add_argument("--read-ahead", type=_count, default=2,
                   help="layers ahead that a nearly whole layer is read, overlapping compute (0: off)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--buffered", action="store_true", help="read through the page cache (not flash timing)")
    p.add_argument("--backend", choices=["torch", "tvm"], default="torch",
                   help="FFN compute: torch matmuls, or the compiled TVM graph with the flash-read hook")
    p.add_argument("--sets", choices=["oracle", "predicted"],
                   help="active sets: predicted (default when the layout has predictor.npz) or oracle "
                        "(true sets computed beside the engine, for measurement)")
    p.add_argument("--predictor", help="predictor file (default: the layout's predictor.npz)")
    p.add_argument("--json", help="write text and per-token metrics here")
    p.add_argument("--verify", action="store_true",
                   help="check every block read against its CRC from `ripple pack` (costs CPU per byte read)")
    p.add_argument("--no-measure-misses", action="store_true",
                   help="predicted sets: do not score the oracle beside the engine (no missed/extra "
                        "figures), so no FFN weight is held in DRAM")
    p.add_argument("--non-ffn-dtype", choices=["bf16", "fp32", "gguf"], default="bf16",
                   help="storage of attention and embedding/LM-head weights (default bf16; gguf: the "
                        "GGUF's own Q4_1/Q8_0 blocks, multiplied in place)")
    p.add_argument("--storage", help="device profile (`ripple probe storage --out F`, or a shipped name): "
                                     "plan reads by its latency table (access collapse); default one read per run")
    p.add_argument("--predictor-dtype", choices=["fp16", "int8"], default="fp16",
                   help="how the predictor is held in DRAM")
    p.add_argument("--no-whole-copy", action="store_true",
                   help="read layers read whole as bundles even when the layout has a whole copy")
    p.add_argument("--pin-mb", type=_nonneg_float, default=0.0,
                   help="DRAM for whole layers of the layout's whole copy, read once at start and never "
                        "again (default 0)")
    p.set_defaults(run=_run_generate)

    p = sub.add_parser("probe", help="measure a device (storage latency table) into a device profile")
    probe_sub = p.add_subparsers(dest="what", required=True, parser_class=_Parser)
    p = probe_sub.add_parser("storage", help="read latency by request size and queue depth, O_DIRECT, checked against fio")
    p.add_argument("--path", default=".", help="folder on the disk to probe (a test file is kept there)")
    p.add_argument("--out", help="device profile to write (e.g. devices/NAME.json)")
    p.add_argument("--name", default="this-machine", help="device name recorded in the profile")
    p.add_argument("--quick", action="store_true", help="few cells, small file (seconds; for tests)")
    p.add_argument("--engine", choices=["native", "auto", "aio", "threads"], default="native",
                   help="reader: native (the flash runtime's, default) or runtime_py's Python reader (auto, aio, threads)")
    p.add_argument("--no-fio", action="store_true", help="skip the comparison with fio")
    from .rpc import add_remote_args
    add_remote_args(p, "the probe (the device's native reader; --path: where --compare-local probes here)")
    p.set_defaults(run=_run_probe_storage)

    p = sub.add_parser("devices", help="list device profiles, and the devices an RPC tracker has")
    p.add_argument("--tracker", metavar="HOST:PORT", help="also list this tracker's device keys")
    p.add_argument("--json", help="also write the listing here")
    p.set_defaults(run=_run_devices)

    p = sub.add_parser("tune", help="tune compiled parts for a target")
    tune_sub = p.add_subparsers(dest="what", required=True, parser_class=_Parser)
    p = tune_sub.add_parser("kernels", help="search the sparse FFN kernels' schedule (XGBoost cost model)")
    p.add_argument("--target", default="host", help="named target (default host)")
    p.add_argument("--trials", type=_positive, default=32, help="measured settings per workload")
    p.add_argument("--db", help="tuning database (default build/tuning/kernels-TARGET.json)")
    p.add_argument("--layout", help="tune for this layout's shape (default: the model's)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--dtype", nargs="+", choices=["fp16", "int8", "q4", "q4d8"], default=["fp16", "int8"])
    p.add_argument("--json", help="also write the summary here")
    p.set_defaults(run=_run_tune_kernels)

    p = sub.add_parser("export", help="write the APP folder an app ships for a target and check it loads back")
    p.add_argument("--target", required=True, help="named target, e.g. android-arm64 or host")
    p.add_argument("--layout", required=True, help="folder written by `ripple pack`")
    p.add_argument("--out", required=True, type=output_dir, help="new folder to write")
    p.add_argument("--storage", help="device profile whose latency table sets the reads' collapse rule")
    p.add_argument("--budget-mb", type=_nonneg_float, default=0.0,
                   help="DRAM for whole layers of the whole copy, read once at start (default 0)")
    p.set_defaults(run=_run_export)

    # `ripple bench WHAT`: side-by-side benchmarks that write JSON and a PNG.
    bench = sub.add_parser("bench", help="side-by-side benchmarks (JSON + PNG)")
    bench_sub = bench.add_subparsers(dest="what", required=True, parser_class=_Parser)
    # Each benchmark module adds its parser: bench_sub.add_parser(NAME).set_defaults(run=...).
    for register in _bench_registrars():
        register(bench_sub)
    check_flags(ap)    # flags by name: numbers in range, input files that exist (flag_types)
    return ap


def _print_profile(s: dict) -> None:
    print(f"criterion {s['criterion']}; held-out perplexity by sparsity (dense {s['ppl_dense']:.3f}):")
    for row in s["table"]:
        rise = row["ppl"] / s["ppl_dense"] - 1
        mark = "  <- chosen" if abs(row["sparsity"] - s["sparsity"]) < 1e-9 else ""
        print(f"  s={row['sparsity']:.2f}  ppl={row['ppl']:8.3f}  ({rise:+.1%}){mark}")
    print(f"chosen sparsity {s['sparsity']} ({s['rule']})")


def _print_generation(r: dict) -> None:
    io, s = r["io"], r["summary"]
    print(r["text"])
    print()
    print(f"FFN from flash ({io['sets']} sets, sparsity {r['sparsity']}, O_DIRECT "
          f"{'on' if io['o_direct'] else 'OFF: ' + io['fallback_reason']}, queue depth {io['queue_depth']})")
    print(f"{'tok':>4} {'io ms':>8} {'MB read':>8} {'MB needed':>9} {'reads':>6} {'eff MB/s':>9} {'active':>7}")
    for i, (ms, br, bn, rd, bw, af) in enumerate(zip(io["per_token_ms"], io["bytes_read_per_token"],
                                                    io["bytes_needed_per_token"], io["reads_per_token"],
                                                    io["effective_bw_MBps"], io["active_fraction_per_token"])):
        print(f"{i:>4} {ms:8.1f} {br / 1e6:8.2f} {bn / 1e6:9.2f} {rd:6d} {bw:9.0f} {af:7.1%}")
    print(f"median per token: {s['token_ms_median']:.1f} ms ({s['io_ms_median']:.1f} ms I/O waited, "
          f"{s['io_hidden_ms_median']:.1f} ms read ahead behind compute, "
          f"{s['compute_ms_median']:.1f} ms compute); {s['bytes_read_median'] / 1e6:.2f} MB read, "
          f"{s['bytes_needed_median'] / 1e6:.2f} MB needed, {s['reads_median']:.0f} reads")
    res = r.get("resident")
    if res:
        print(f"DRAM held by the engine: {res['total'] / 1e6:.1f} MB ({res['non_ffn_weights'] / 1e6:.1f} non-FFN "
              f"weights, {res['ffn_weights_dram_copy'] / 1e6:.1f} FFN copy, {res['predictor'] / 1e6:.1f} "
              f"predictor, {res['ffn_cache'] / 1e6:.1f} cache, {res['kv_cache'] / 1e6:.1f} KV)")
    if io["sets"] == "predicted" and io.get("misses_measured", True):
        print(f"vs the oracle set (computed beside, for measurement): {s['missed_per_token_mean']:.0f} "
              f"neurons missed and {s['extra_bytes_per_token_mean'] / 1e6:.2f} MB read extra per token")


# Verb handlers import lazily so that `ripple --help` and flag errors are instant.
def _run_profile(args) -> None:
    from . import interface as api
    s = api.profile_cmd(args.model, args.out, args.text, args.criterion, args.sparsity,
                        args.ppl_budget, args.calib_tokens, args.heldout_tokens, args.seq_len, args.seed,
                        record_inputs=args.record_inputs)
    if args.json:
        api.write_json(args.json, s)
    _print_profile(s)


def _run_sparsify(args) -> None:
    from . import interface as api
    r = api.sparsify_cmd(args.model, args.out, args.target_sparsity, args.minutes, args.train_tokens,
                         args.text, args.lr, args.batch, args.seq_len, args.calib_tokens,
                         args.heldout_tokens, args.seed, args.threads)
    if args.json:
        api.write_json(args.json, r)
        api.plot_sparsify(r, str(Path(args.json).with_suffix(".png")))
    f = r["frontier"]
    print(f"calibration sparsity: held-out inactive and held-out ppl over the dense original "
          f"({r['ppl_dense_original']:.3f})")
    print(f"{'':>6} {'original thresholded':>24} {'sparsified':>19}")
    for s, ia, a, ib, b in zip(f["sparsity"], f["original_heldout_inactive"], f["original_thresholded_ppl_ratio"],
                               f["sparsified_heldout_inactive"], f["sparsified_ppl_ratio"]):
        print(f"{s:6.2f} {ia:12.1%} {a - 1:+11.1%} {ib:10.1%} {b - 1:+8.1%}")
    print(f"wrote {args.out}: {r['inactive_fraction']:.1%} of FFN neurons inactive on held-out text at "
          f"{r['ppl_ratio'] - 1:+.1%} perplexity; {r['steps']} steps, {r['tokens_seen']} tokens in "
          f"{r['train_seconds'] / 60:.1f} min ({r['device']}), peak RSS {r['peak_rss_bytes'] / 1e9:.1f} GB")


def _run_train_predictor(args) -> None:
    from . import interface as api
    s = api.train_predictor_cmd(args.profile, args.out, args.model, args.sparsity, args.rank,
                                args.recall, args.epochs, args.seed, args.lookahead or 0)
    if args.json:
        api.write_json(args.json, s)
    print(f"wrote {s['predictor']}: sparsity {s['sparsity']}, rank {s['rank']}, "
          f"{s['dram_bytes'] / 1e6:.1f} MB, {s['flops_frac_of_dense_ffn']:.1%} of the dense FFN's FLOPs")
    print(f"held-back calibration tokens: recall {min(s['val_recall_per_layer']):.3f}.."
          f"{max(s['val_recall_per_layer']):.3f}, precision {min(s['val_precision_per_layer']):.3f}.."
          f"{max(s['val_precision_per_layer']):.3f} over layers")
    if "lookahead" in s:
        la = s["lookahead"]
        print(f"wrote {la['file']}; held-out ({la['heldout_tokens']} tokens), mean over target layers:")
        print(f"{'distance':>9} {'recall':>8} {'min':>7} {'extra/active':>13} {'predicted':>10}")
        for r in la["heldout"]:
            print(f"{r['distance']:>9} {r['recall_mean']:8.4f} {r['recall_min']:7.4f} "
                  f"{r['extra_over_active_mean']:13.3f} {r['predicted_share_mean']:10.4f}")


def _run_pack(args) -> None:
    from . import interface as api
    print(json.dumps(api.pack_cmd(args.model, args.out, args.profile, args.placement, args.dtype,
                                  args.whole_copy), indent=1))


def _run_place(args) -> None:
    from ..tuning.placement import place_cmd
    print(json.dumps(place_cmd(args.profile, args.strategy, args.out, args.k), indent=1))


def _run_inspect(args) -> None:
    from . import interface as api
    print(json.dumps(api.inspect_cmd(args.path, args.verify), indent=1))


def _run_compile(args) -> None:
    from .app_cmds import compile_cmd
    print(json.dumps(compile_cmd(args.out, args.layout, args.model, args.target, args.work, args.kv_dtype,
                                 args.queue_depth, args.read_ahead, args.budget_mb, args.storage,
                                 args.whole_layers, args.sets, not args.buffered, args.verify, args.lookahead,
                                 args.profile, args.pinned_share),
                     indent=1))


def _run_generate(args) -> None:
    if (args.app is None) == (args.layout is None):
        from .flag_types import FlagError
        raise FlagError("give --app APP (the compiled engine) or --layout DIR (the Python engine)")
    if args.app is not None:
        from .app_cmds import generate_app_cmd, print_app_generation
        return print_app_generation(generate_app_cmd(args.app, args.prompt, args.tokens, not args.no_chat,
                                                     args.json, args.threads))
    from . import interface as api
    _print_generation(api.generate_cmd(args.layout, args.model, args.prompt, args.tokens, args.sparsity,
                                       args.queue_depth, not args.no_chat, not args.buffered, args.json,
                                       args.backend, args.sets, args.predictor, args.verify,
                                       not args.no_measure_misses, args.non_ffn_dtype, args.read_ahead,
                                       args.storage, args.predictor_dtype, not args.no_whole_copy,
                                       args.pin_mb))


def _run_devices(args) -> None:
    from .rpc import devices_cmd, print_devices
    d = devices_cmd(args.tracker)
    if args.json:
        from ..atomic_file import write_json
        write_json(args.json, d)
    print_devices(d)


def _run_probe_storage(args) -> None:
    from .probe import print_probe, probe_cmd
    from .rpc import remote_endpoint
    if remote_endpoint(args):
        from .remote_probe import probe_remote_cmd
        name = args.device_name or (args.name if args.name != "this-machine" else None)
        from .remote_probe import print_remote_probe
        return print_remote_probe(probe_remote_cmd(
            remote_endpoint(args), args.target, args.out, name, args.quick, args.rpc_timeout,
            compare_local=args.path if args.compare_local else None))
    print_probe(probe_cmd(args.path, args.out, args.name, args.quick, args.engine, not args.no_fio))


def _run_tune_kernels(args) -> None:
    from ..tuning.kernels import tune_kernels_cmd
    s = tune_kernels_cmd(args.target, args.trials, args.db, args.layout, args.model, tuple(args.dtype))
    if args.json:
        from ..atomic_file import write_json
        write_json(args.json, s)
    for w in s["workloads"]:
        print(f"{w['key']}: {w['default_us']:.1f} us -> {w['us']:.1f} us ({w['speedup']:.2f}x) "
              f"in {w['trials']} trials, {w['tune_seconds']:.0f} s; knobs {w['knobs']}")
    print(f"database: {s['db']}")


def _run_export(args) -> None:
    from .export import export_cmd
    print(json.dumps(export_cmd(args.target, args.layout, args.out, args.storage, args.budget_mb), indent=1))


def run(args) -> int:
    """Run a parsed verb; errors a user can act on become one line and exit code 2."""
    from .errors import USER_ERRORS
    try:
        check_paths(args)
        args.run(args)
    except USER_ERRORS as e:
        sys.stderr.write(f"ripple: error: {e}\n")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
