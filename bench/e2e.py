"""llama.cpp against the flash-backed engine on one GGUF, side by side; same as `ripple bench e2e`.

    make bench-deps                                   # llama-cpp-python, built without AMX
    python bench/e2e.py --json build/bench/e2e.json

Writes the JSON (per configuration: per-token ms median and p90, I/O and compute ms, bytes
read per token, model bytes resident in DRAM, process RSS, held-out perplexity, whether the
eviction was verified; the disk's fio figures) and a PNG beside it.
"""
import sys

from ripple.android_host.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "e2e", *sys.argv[1:]]))
