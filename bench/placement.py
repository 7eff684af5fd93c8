"""Placement strategies side by side: reads per held-out token; same as `ripple bench placement`.

    python bench/placement.py --json build/bench/placement.json
    python bench/placement.py --json build/bench/placement-opt.json --model PATH/TO/HF_FOLDER --workloads

Workloads: the embedded SmolLM2 at its default sparsity and at 0.8 (real masks, profiled on
self-sampled calibration text, measured on held-out text; cached under build/cache) and
relu-synthetic (labelled synthetic); plus a 7B-shaped (32 x 11008) search-time run. Writes
the JSON and a PNG beside it.
"""
import sys

from ripple.android_host.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "placement", *sys.argv[1:]]))
