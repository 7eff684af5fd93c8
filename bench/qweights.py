"""Non-FFN weights as GGUF blocks (compiled TVM GEMVs) against bf16; same as `ripple bench qweights`.

    python bench/qweights.py --json build/bench/qweights.json

Writes the JSON (per matrix shape: us per one-token call, TVM on the blocks vs torch.mv on
bf16; per decode token: ms of the whole forward with each; non-FFN bytes held by each) and a
PNG beside it.
"""
import sys

from ripple.android_host.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "qweights", *sys.argv[1:]]))
