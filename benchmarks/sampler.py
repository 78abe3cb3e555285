"""The sampler (issues 4, 11, 12, 13): engines side by side, ORT call cost, reproducibility,
and the CLI's memory while streaming.

    .venv/bin/python benchmarks/sampler.py [MODELS_DIR]        # default models/
    .venv/bin/python benchmarks/sampler.py DIR --names 1000000 --rounds 3 --cli-names 10000000

MODELS_DIR holds ``bn.onnx`` and ``folded.onnx`` (from ``bnfold export``). On one thread, in
one run, it prints (with the load average, since the machine is shared):

* names/s of the table engine (warm: startup excluded; and cold, with its table build),
  the network engine, and a plain batched ONNX Runtime sampling loop
  (:func:`bnfold.pipeline.bench.plain_ort_sampler`), alternating rounds, best of each, wall and
  CPU time (CPU time is the robust figure on a busy machine), and their ratios;
* the cost of ORT's public ``InferenceSession.run`` (what ``OnnxPredictor`` calls) against
  the private ``_sess.run`` it used before and I/O binding, at batch 1 and 4,096;
* how many of ``--repro`` names change between batch sizes, between the engines, and
  between ``bn.onnx`` and ``folded.onnx``;
* the peak memory (max RSS) of ``bnfold sample -n N`` and ``-n N/5 --json`` (``--cli-names``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bnfold.pipeline.bench import engine_side_by_side  # noqa: E402
from bnfold.runtime.onnx_runtime import OnnxPredictor  # noqa: E402
from bnfold.sampling.sample import SampleOptions, sample_names  # noqa: E402


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def speed(folded: OnnxPredictor, n: int, rounds: int) -> None:
    r = engine_side_by_side(folded, n, rounds)
    print(f"names/s on folded.onnx, 1 thread, best of {rounds} alternating rounds ({load()}):")
    print(f"  {'':16s} {'wall':>11s} {'CPU':>11s}  names    steps/name  cold (with table build)")
    for k in ("table", "network", "plain ORT loop"):
        v = r[k]
        cold = f"{v['cold_names_per_s']:,}" if "cold_names_per_s" in v else "-"
        print(
            f"  {k:16s} {v['names_per_s']:11,d} {v['names_per_cpu_s']:11,d}  {v['names']:,}"
            f"  {v['steps_per_name']:.2f}  {cold}"
        )
    t = r["table_vs_plain_ort"]
    print(
        f"  table engine / plain ORT loop: {t['wall']}x wall, {t['cpu']}x CPU;"
        f" network engine / plain ORT loop: {r['network_vs_plain_ort_cpu']}x CPU;"
        f" table: {r['table']['table_mib']} MiB"
    )


def ort_call_cost(p: OnnxPredictor, repeats: int = 3000) -> None:
    """Public run (prebuilt names and options) vs the private _sess.run vs I/O binding."""
    sess = p.session
    names, opts = ["logits"], p._run_options
    print(f"ONNX Runtime call cost, folded.onnx, median of {repeats:,} calls ({load()}):")
    for batch in (1, 4096):
        x = np.zeros((batch, p.block_size), dtype=np.int64)
        binding = sess.io_binding()
        binding.bind_cpu_input("contexts", x)
        binding.bind_output("logits")
        calls = {
            "session.run (public, bnfold)": lambda x=x: sess.run(names, {"contexts": x}, opts),
            "session._sess.run (private)": lambda x=x: sess._sess.run(names, {"contexts": x}, opts),
            "run_with_iobinding (public)": lambda b=binding: sess.run_with_iobinding(b, opts),
        }
        reps = repeats if batch == 1 else max(20, repeats // 100)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(reps):  # interleaved, so load drift hits every variant alike
            for k, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        base = float(np.median(times["session._sess.run (private)"]))
        for k, ts in times.items():
            med = float(np.median(ts))
            print(f"  batch {batch:5d}  {k:30s} {med * 1e6:9.2f} us  ({med / base:.3f}x private)")


def differing(a, b) -> int:
    return sum(x.name != y.name for x, y in zip(a, b, strict=True))


def repro(bn: OnnxPredictor, folded: OnnxPredictor, n: int) -> None:
    opts = SampleOptions(count=n, seed=1234)
    runs = {b: sample_names(folded, opts, batch_size=b) for b in (1, 1000, 100_000)}
    print(f"reproducibility, {n:,} names of folded.onnx (seed 1234):")
    for b in (1000, 100_000):
        d = differing(runs[1], runs[b])
        print(f"  table engine, batch 1 vs {b:,}: {d} names differ ({d / n:.4%})")
    lp = max(abs(x.logprob - y.logprob) for x, y in zip(runs[1], runs[100_000], strict=True))
    print(f"  max |logprob difference| batch 1 vs 100,000: {lp:.2e}")
    for o in (opts, SampleOptions(count=n, seed=5, temperature=0.7, top_p=0.9, prefix="ma")):
        net = sample_names(folded, o, engine="network")
        tab = sample_names(folded, o, engine="table")
        lp = max(abs(x.logprob - y.logprob) for x, y in zip(net, tab, strict=True))
        print(
            f"  table vs network engine, seed {o.seed}, temperature {o.temperature},"
            f" top-p {o.top_p}, prefix {o.prefix!r}: {differing(net, tab)} names differ,"
            f" max |logprob difference| {lp:.2e}"
        )
    for o in (SampleOptions(count=n, seed=1234), SampleOptions(count=n, seed=7)):
        a = sample_names(bn, o)
        b = sample_names(folded, o)
        d = differing(a, b)
        print(f"  bn.onnx vs folded.onnx, seed {o.seed}: {n - d:,} of {n:,} identical")


def cli_memory(model: Path, n: int) -> None:
    print(f"peak memory of the CLI (max RSS of each run, in a fresh parent; {load()}):")
    probe = (
        "import resource, subprocess, sys;"
        " subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True);"
        " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    for args in (["-n", str(n)], ["-n", str(n // 5), "--json"]):
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "bnfold", "sample", str(model), *args]
        out = subprocess.run(
            [sys.executable, "-c", probe, *cmd],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        rss_mib = int(out.stdout.split()[-1]) / 1024
        print(
            f"  bnfold sample {' '.join(args)} > /dev/null: {rss_mib:,.0f} MiB,"
            f" {time.perf_counter() - t0:.1f} s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="?", default="models", type=Path)
    ap.add_argument("--names", type=int, default=1_000_000, help="names for the table engine")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repro", type=int, default=10_000)
    ap.add_argument("--cli-names", type=int, default=0, help="0: skip the CLI memory check")
    args = ap.parse_args()
    folded = OnnxPredictor(args.models / "folded.onnx")
    bn = OnnxPredictor(args.models / "bn.onnx")
    speed(folded, args.names, args.rounds)
    ort_call_cost(folded)
    repro(bn, folded, args.repro)
    if args.cli_names:
        cli_memory(args.models / "folded.onnx", args.cli_names)


if __name__ == "__main__":
    main()
