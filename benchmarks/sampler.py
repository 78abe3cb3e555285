"""The batched sampler (issue 4): names/s, reproducibility across batch sizes, BN vs folded.

    .venv/bin/python benchmarks/sampler.py [MODELS_DIR]        # default models/
    .venv/bin/python benchmarks/sampler.py DIR --names 100000 --batches 1024,4096,8192

MODELS_DIR holds ``bn.onnx`` and ``folded.onnx`` (from ``bnfold export``). On one ONNX
Runtime thread it prints:

* names/s of ``sample_names`` on ``folded.onnx`` for each batch size (names in flight), next to
  the forward-pass ceiling (rows/s at that batch / forward steps per name) measured in the
  same process, alternating runs so that drift in machine load hits both alike, and CPU
  time as well as wall time (the CPU figure is the robust one on a busy machine);
* how many of ``--repro`` names change between batch sizes 1, 1,000 and 100,000
  (kernel rounding of the logits is the only thing that could move a draw);
* how many of ``--repro`` names ``bn.onnx`` and ``folded.onnx`` agree on (target >= 99.9%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnfold.onnx_runtime import OnnxPredictor  # noqa: E402
from bnfold.sample import SampleOptions, sample_names  # noqa: E402


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def forward_rows_per_s(p: OnnxPredictor, batch: int, rows: int) -> tuple[float, float]:
    x = np.random.default_rng(0).integers(0, p.vocab.size, (batch, p.block_size))
    p.logits(x)
    reps = max(1, rows // batch)

    def run():
        for _ in range(reps):
            p.logits(x)

    _, wall, cpu = timed(run)
    return reps * batch / wall, reps * batch / cpu


def speed(p: OnnxPredictor, n: int, batches: list[int], rounds: int) -> None:
    print(f"names/s, {n:,} names, folded.onnx, 1 ORT thread (best of {rounds}):")
    sample_names(p, SampleOptions(count=2000, seed=1))  # warm-up
    for b in batches:
        best = {"wall": 0.0, "cpu": 0.0, "fwd_wall": 0.0, "fwd_cpu": 0.0}
        steps = 0.0
        for _ in range(rounds):  # alternate sampler and forward-only runs
            got, wall, cpu = timed(
                lambda b=b: sample_names(p, SampleOptions(count=n), batch_size=b)
            )
            steps = sum(len(s.name) + 1 for s in got) / n
            fw, fc = forward_rows_per_s(p, min(b, n), int(n * steps))
            best = {
                "wall": max(best["wall"], n / wall),
                "cpu": max(best["cpu"], n / cpu),
                "fwd_wall": max(best["fwd_wall"], fw),
                "fwd_cpu": max(best["fwd_cpu"], fc),
            }
        of_wall = best["wall"] / best["fwd_wall"] * steps
        of_cpu = best["cpu"] / best["fwd_cpu"] * steps
        print(
            f"  batch {b:6,d}: {best['wall']:9,.0f} names/s wall ({best['cpu']:9,.0f} CPU)"
            f"  | forward {best['fwd_wall'] / 1e6:.2f} M rows/s -> ceiling"
            f" {best['fwd_wall'] / steps:9,.0f} names/s ({of_wall:.0%}; CPU {of_cpu:.0%})"
            f"  steps/name {steps:.2f}"
        )


def differing(a, b) -> int:
    return sum(x.name != y.name for x, y in zip(a, b, strict=True))


def repro(bn: OnnxPredictor, folded: OnnxPredictor, n: int) -> None:
    opts = SampleOptions(count=n, seed=1234)
    runs = {b: sample_names(folded, opts, batch_size=b) for b in (1, 1000, 100_000)}
    print(f"reproducibility across batch sizes, {n:,} names of folded.onnx (seed 1234):")
    for b in (1000, 100_000):
        d = differing(runs[1], runs[b])
        print(f"  batch 1 vs {b:,}: {d} names differ ({d / n:.4%})")
    lp = max(abs(x.logprob - y.logprob) for x, y in zip(runs[1], runs[100_000], strict=True))
    print(f"  max |logprob difference| batch 1 vs 100,000: {lp:.2e}")
    for opts in (SampleOptions(count=n, seed=1234), SampleOptions(count=n, seed=7)):
        a = sample_names(bn, opts, batch_size=4096)
        b = sample_names(folded, opts, batch_size=4096)
        d = differing(a, b)
        print(
            f"bn.onnx vs folded.onnx, {n:,} names, seed {opts.seed}: {n - d:,} identical"
            f" ({(n - d) / n:.4%}); {d} differ"
        )
        for x, y in [(x, y) for x, y in zip(a, b, strict=True) if x.name != y.name][:3]:
            print(f"    #{x.index}: {x.name!r} vs {y.name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="?", default="models", type=Path)
    ap.add_argument("--names", type=int, default=100_000)
    ap.add_argument("--batches", default="1024,2048,4096,8192")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repro", type=int, default=10_000)
    args = ap.parse_args()
    folded = OnnxPredictor(args.models / "folded.onnx")
    bn = OnnxPredictor(args.models / "bn.onnx")
    speed(folded, args.names, [int(b) for b in args.batches.split(",")], args.rounds)
    repro(bn, folded, args.repro)


if __name__ == "__main__":
    main()
