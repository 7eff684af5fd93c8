"""I/O strategies side by side on real O_DIRECT reads of this disk; same as `ripple bench io`.

    python bench/io.py --json build/bench/io-smollm2.json --device oneplus12-ufs40
    python bench/io.py --workload relu-synthetic --json build/bench/io-relu.json --device oneplus12-ufs40

Writes the JSON (per strategy: per-token I/O ms, effective bandwidth, reads, bytes read,
needed and missed per token, storage-model prediction and its error) and a PNG beside it.
"""
import sys

from ripple.android_host.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "io", *sys.argv[1:]]))
