"""The `ripple` command: parses flags and calls one function of `interface` per verb.

Errors a user can act on come out as one line, `ripple: error: ...`, and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not argparse's usage block
        sys.stderr.write(f"ripple: error: {self.prog}: {message} (see --help)\n")
        sys.exit(2)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"{v} is outside [0, 1)")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must not be negative")
    return v


def _bench_registrars() -> list:
    """`register(bench_sub)` of each benchmark module; these modules import nothing heavy at top."""
    return []


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ripple", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    model_help = "GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M GGUF)"

    p = sub.add_parser("profile", help="record which FFN neurons fire on calibration text")
    p.add_argument("--model", help=model_help)
    p.add_argument("--out", required=True, help="profile file to write (.npz)")
    p.add_argument("--text", nargs="+", help="calibration text files (default: text the model samples itself)")
    p.add_argument("--criterion", choices=["coef", "gate"], default="coef",
                   help="coef: |silu(gate)*up| (default); gate: |silu(gate)| (CATS)")
    p.add_argument("--sparsity", type=_fraction, help="fixed sparsity (default: highest within --ppl-budget)")
    p.add_argument("--ppl-budget", type=_nonneg_float, default=0.10,
                   help="allowed held-out perplexity rise over dense (default 0.10)")
    p.add_argument("--calib-tokens", type=_positive, default=1024)
    p.add_argument("--heldout-tokens", type=_positive, default=512)
    p.add_argument("--seq-len", type=_positive, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the summary here")
    p.set_defaults(run=_run_profile)

    p = sub.add_parser("pack", help="write the FFN weights as a flash file of neuron bundles")
    p.add_argument("--model", help=model_help)
    p.add_argument("--out", required=True, help="output folder (model.rflash + manifest.json)")
    p.add_argument("--profile", help="profile from `ripple profile` (records sparsity and thresholds)")
    p.add_argument("--placement", help="placement file (.npz with perm[L, n]); default identity")
    p.add_argument("--dtype", choices=["fp16"], default="fp16")
    p.set_defaults(run=_run_pack)

    p = sub.add_parser("inspect", help="validate and summarise a flash file")
    p.add_argument("path", help="layout folder or its model.rflash")
    p.add_argument("--verify", action="store_true", help="check every region's checksum")
    p.set_defaults(run=_run_inspect)

    p = sub.add_parser("generate", help="generate text with every FFN weight read from flash")
    p.add_argument("--layout", required=True, help="folder written by `ripple pack`")
    p.add_argument("--model", help=model_help)
    p.add_argument("--prompt", default="What is flash memory? Answer in two sentences.")
    p.add_argument("--tokens", type=_positive, default=16)
    p.add_argument("--sparsity", type=_fraction, help="default: the one recorded by `ripple pack --profile`")
    p.add_argument("--queue-depth", type=_positive, default=32)
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--buffered", action="store_true", help="read through the page cache (not flash timing)")
    p.add_argument("--json", help="write text and per-token metrics here")
    p.set_defaults(run=_run_generate)

    # `ripple bench WHAT`: side-by-side benchmarks that write JSON and a PNG.
    bench = sub.add_parser("bench", help="side-by-side benchmarks (JSON + PNG)")
    bench_sub = bench.add_subparsers(dest="what", required=True, parser_class=_Parser)
    # Each benchmark module adds its parser: bench_sub.add_parser(NAME).set_defaults(run=...).
    for register in _bench_registrars():
        register(bench_sub)
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
    print(f"median per token: {s['token_ms_median']:.1f} ms ({s['io_ms_median']:.1f} ms I/O, "
          f"{s['compute_ms_median']:.1f} ms compute); {s['bytes_read_median'] / 1e6:.2f} MB read, "
          f"{s['bytes_needed_median'] / 1e6:.2f} MB needed, {s['reads_median']:.0f} reads")


# Verb handlers import lazily so that `ripple --help` and flag errors are instant.
def _run_profile(args) -> None:
    from . import interface as api
    s = api.profile_cmd(args.model, args.out, args.text, args.criterion, args.sparsity,
                        args.ppl_budget, args.calib_tokens, args.heldout_tokens, args.seq_len, args.seed)
    if args.json:
        api.write_json(args.json, s)
    _print_profile(s)


def _run_pack(args) -> None:
    from . import interface as api
    print(json.dumps(api.pack_cmd(args.model, args.out, args.profile, args.placement, args.dtype), indent=1))


def _run_inspect(args) -> None:
    from . import interface as api
    print(json.dumps(api.inspect_cmd(args.path, args.verify), indent=1))


def _run_generate(args) -> None:
    from . import interface as api
    _print_generation(api.generate_cmd(args.layout, args.model, args.prompt, args.tokens, args.sparsity,
                                       args.queue_depth, not args.no_chat, not args.buffered, args.json))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import USER_ERRORS
    try:
        args.run(args)
    except USER_ERRORS as e:
        sys.stderr.write(f"ripple: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
