"""The four networks (torch BN, torch folded, ONNX BN, ONNX folded) against each other.

A thin wrapper around ``bnfold bench`` (bnfold/bench.py), so the benchmark can be run from
a checkout without installing the command:

    .venv/bin/python benchmarks/bench.py                 # models/ (trains a quick model if empty)
    .venv/bin/python benchmarks/bench.py --models DIR --json
    .venv/bin/python benchmarks/bench.py --repeats 5000 --names 5000   # quicker

Measures, in one run on one thread: p50/p99 single-example latency of each network,
rows/s at batch 1024, names/s of the lecture's one-at-a-time loop (torch BN) and of the
batched sampler on each network, and the ratios between them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnfold.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]], prog_name="bnfold")
