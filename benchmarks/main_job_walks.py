"""How often does the main job walk the input domain, and what does its post-training phase
cost? ``train-fold`` after training (fold, verify, export, the four-network table, the
model card: ``bnfold.pipeline.train_fold._fold_verify_export``) on one fixed ``bn.pt``, for this
checkout and, with ``--compare DIR``, another one (e.g. ``git archive`` of the previous
main), side by side: each checkout in its own fresh process, in alternating order, so
drift in machine load hits both alike.

Per checkout it prints the contexts each (reference, candidate) pair was compared on and
the contexts the float64 BN network evaluated (both counted by wrapping
``bnfold.verify.domain.PairStats.add`` and
``bnfold.verify.verdict.Float64Model.logits``), and the wall
and CPU seconds of the phase (median over every repeat), with the load average before each
process. The report figures' second process is not part of the phase.

``--full N`` also runs the whole ``bnfold train-fold --out TMP`` N times per checkout
(alternating), timed from spawn to exit, with the fold/verify/export rows' own times and
the post-training phase timed inside the process.

    .venv/bin/python benchmarks/main_job_walks.py --compare /tmp/oldmain --full 3
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("fold", "verify", "export")  # the stage rows whose times are reported


def worker(repeats: int, bn: Path) -> None:
    """In a process whose ``bnfold`` is the checkout under test: count, then time."""
    import bnfold.pipeline.train_fold as pipeline
    from bnfold.mlp.checkpoint import load_checkpoint
    from bnfold.verify.domain import PairStats
    from bnfold.verify.verdict import Float64Model

    pairs: Counter = Counter()
    truth: Counter = Counter()
    add, logits = PairStats.add, Float64Model.logits

    def counting_add(self, ctx, a, b, z):
        pairs[f"{self.reference} / {self.candidate}"] += len(ctx)
        return add(self, ctx, a, b, z)

    def counting_logits(self, contexts):
        truth["contexts"] += len(contexts)
        return logits(self, contexts)

    summary = dict(load_checkpoint(bn).metrics)
    names = REPO / "data" / "names.txt"
    train_args = {"data_path": names}
    # this checkout stages its outputs; an older one wrote into the output folder directly;
    # a newer one takes the trained run in memory (the checkpoint is not read back)
    parameters = inspect.signature(pipeline._fold_verify_export).parameters
    staged, in_memory = "stage" in parameters, "run" in parameters
    seconds = []
    for i in range(repeats + 1):  # the first call, counted, warms up too
        work = Path(tempfile.mkdtemp(prefix="main-job-walks-"))
        out = work / "models"
        if staged:
            from bnfold.io.files import StagedOutputs

            where = StagedOutputs(out)
            args = (where, where.root / "bn.pt")
        else:
            out.mkdir()
            args = (out, out / "bn.pt")
        shutil.copy(bn, args[1])
        if i == 0:
            PairStats.add, Float64Model.logits = counting_add, counting_logits
        wall, cpu = time.perf_counter(), time.process_time()
        if in_memory:
            from bnfold.mlp.data import load_dataset

            ckpt = load_checkpoint(args[1])
            data = load_dataset(names, ckpt.config.block_size)
            run = pipeline.TrainedRun(ckpt, summary, data, None)
            result, _ = pipeline._fold_verify_export(where, run, summary, None, None, "bench")
        else:
            result = pipeline._fold_verify_export(*args, summary, None, None, "bench", train_args)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        PairStats.add, Float64Model.logits = add, logits
        assert result.passed, "the main job failed"
        if i:
            seconds.append((wall, cpu))
        shutil.rmtree(work)
    print(json.dumps({"pairs": pairs, "float64": truth["contexts"], "seconds": seconds}))


def full_worker(out: Path) -> None:
    """``bnfold train-fold --out OUT`` of the checkout under test, its post-training phase
    timed (printed last, to stderr)."""
    import runpy

    import bnfold.pipeline.train_fold as pipeline

    inner = pipeline._fold_verify_export

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            print(f"PHASE {time.perf_counter() - t0:.3f}", file=sys.stderr)

    pipeline._fold_verify_export = timed
    sys.argv = ["bnfold", "train-fold", "--out", str(out)]
    runpy.run_path(str(Path(pipeline.__file__).parent.parent / "cli.py"), run_name="__main__")


def run_full(repo: Path, out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, __file__, "--full-worker", out]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{repo}: {done.stderr.strip().splitlines()[-1:]}")
    rows = {ln.split()[0]: ln.split() for ln in done.stdout.splitlines() if ln.split()}
    times = [next(w for w in reversed(rows[s]) if w.replace(".", "").isdigit()) for s in STAGES]
    phase = done.stderr.strip().splitlines()[-1].split()[1]
    return (
        f"{wall:.2f} s spawn to exit; fold/verify/export rows {' / '.join(times)} s;"
        f" post-training phase {phase} s"
    )


def run(repo: Path, repeats: int, bn: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, __file__, "--worker", "--repeats", str(repeats), "--checkpoint", bn]
    out = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{repo}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", type=Path, help="another checkout to measure alongside")
    ap.add_argument("--checkpoint", type=Path, help="bn.pt to use (default: train one)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per checkout")
    ap.add_argument("--full", type=int, default=0, help="whole train-fold runs per checkout")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--full-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.repeats, args.checkpoint)
    if args.full_worker:
        return full_worker(args.full_worker)
    sys.path.insert(0, str(REPO))
    from bnfold.pipeline.train_fold import train_to_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        bn = args.checkpoint
        if bn is None:
            bn, _ = train_to_checkpoint(REPO / "data" / "names.txt", tmp, progress=False)
        checkouts = {"this": REPO, **({"compare": args.compare} if args.compare else {})}
        found: dict[str, list] = {k: [] for k in checkouts}
        for r in range(args.rounds):
            order = list(checkouts) if r % 2 == 0 else list(checkouts)[::-1]
            for name in order:
                load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                found[name].append(run(checkouts[name], args.repeats, bn))
                print(f"round {r + 1} {name}: load average {load}", flush=True)
    medians = {}
    for name, runs in found.items():
        first = runs[0]
        domain = max(first["pairs"].values())
        print(f"\n{name} ({checkouts[name]}):")
        for pair, n in first["pairs"].items():
            print(f"  {pair:42s} {n:>9,} contexts")
        total = sum(first["pairs"].values())
        print(
            f"  pair comparisons: {total:,} contexts = {total / domain:.0f} x the domain;"
            f" float64 truth: {first['float64']:,} = {first['float64'] / domain:.0f} x"
        )
        wall = statistics.median(w for r in runs for w, _ in r["seconds"])
        cpu = statistics.median(c for r in runs for _, c in r["seconds"])
        medians[name] = wall
        n = sum(len(r["seconds"]) for r in runs)
        print(f"  post-training phase: median {wall:.3f} s wall, {cpu:.3f} s CPU ({n} calls)")
    if len(medians) == 2:
        print(f"\nthis / compare, median wall: {medians['this'] / medians['compare']:.2f}")
    if args.full:
        print("\nwhole `bnfold train-fold` runs:")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.full):
            for name in list(checkouts) if r % 2 == 0 else list(checkouts)[::-1]:
                load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                found = run_full(checkouts[name], Path(tmp) / name)
                print(f"  run {r + 1} {name:7s} load average {load}: {found}", flush=True)


if __name__ == "__main__":
    main()
