"""Activation predictors on held-out text: recall, precision, set size, cost, perplexity.

    python bench/predictor.py --profile P.npz --json build/bench/predictor.json [--sparsities 0.5 0.8]

The same benchmark as `ripple bench predictor` (android_host/bench_predictor.py), which
writes the JSON and a PNG beside it. The profile must hold FFN inputs:
`ripple profile --record-inputs --sparsity 0.8 --calib-tokens 12288 --heldout-tokens 3072`.
"""
import sys

from ripple.android_host.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "predictor", *sys.argv[1:]]))
