"""Time to dev loss for training presets, side by side in one run, each run a fresh process.

    .venv/bin/python benchmarks/train_presets.py --presets fast-old,fast,lecture --seeds 42,1337,7

Every (preset, seed) runs as its own subprocess (``--child``), so the clock starts when the
process is spawned and includes interpreter start, imports and data loading, as a user's
``bnfold train`` would. The child trains with the ordinary ``bnfold.mlp.train.train`` and an
observer that evaluates the dev loss every ``--eval-every`` steps (fast presets) or
``--lecture-eval-every`` steps (lecture); each evaluation's own time is measured and
subtracted, so "time to dev <= X" is what a run stopped at that step would have cost.
The final dev loss is the one ``train`` reports (its own final evaluation is included).

``fast-old`` is the ``fast`` preset as it was before issue #14 (kept here, not in the
CLI, only to be compared): one thread, 1,200 AdamW steps at batch 2048.

With ``--cli``, each fast preset's seed is also timed as a plain ``bnfold train`` (no
periodic evaluations, the checkpoint written), from spawn to exit.

The machine may be shared: the load average is printed before and after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "names.txt"

# The `fast` preset before issue #14 (commit e4c39fa), field by field.
FAST_OLD = dict(
    steps=1_200,
    batch_size=2048,
    optimizer="adamw",
    lr=4e-2,
    adam_beta2=0.99,
    schedule="cosine",
    warmup_steps=200,
    min_lr_frac=0.01,
    sampling="epoch",
    bn_momentum=0.01,
    threads=1,
    distinct_rows=False,  # the default before the fast preset turned it on
)


def child(preset: str, seed: int, data_path: str, eval_every: int, spawn: float) -> None:
    """Runs in the subprocess: train and print one JSON line per dev evaluation."""
    sys.path.insert(0, str(ROOT))
    from bnfold.mlp.data import load_dataset
    from bnfold.mlp.model import ModelConfig
    from bnfold.mlp.train import TrainConfig, split_loss, train

    data = load_dataset(data_path, block_size=3)
    if preset == "fast-old":
        cfg = TrainConfig(preset="fast", seed=seed, **FAST_OLD)
    else:
        cfg = TrainConfig.from_preset(preset, seed=seed)
    xdev, ydev = data.splits["dev"]
    eval_seconds = 0.0

    class Clock:
        def before_step(self, step, model):
            pass

        def after_backward(self, step, model, loss):
            pass

        def after_update(self, step, model, lr):
            nonlocal eval_seconds
            if (step + 1) % eval_every:
                return
            t = time.monotonic()
            dev = split_loss(model, xdev, ydev)
            done = time.monotonic()
            # The point is stamped before the evaluation: a run stopped here ends now.
            emit({"step": step + 1, "seconds": t - spawn - eval_seconds, "dev": dev})
            eval_seconds += done - t

        def on_eval(self, step, split, loss):
            pass

    result = train(data, ModelConfig(block_size=3), cfg, observer=Clock(), progress=False)
    end = time.monotonic()
    emit(
        {
            "final": True,
            "step": result.steps_done,
            "seconds": end - spawn - eval_seconds,
            "dev": result.metrics["dev_loss"],
            "train_seconds": result.seconds,
            "eval_seconds": eval_seconds,
            "threads": result.summary().get("threads"),
        }
    )


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def run_child(preset: str, seed: int, args) -> dict:
    every = args.lecture_eval_every if preset == "lecture" else args.eval_every
    load_before = os.getloadavg()
    cpu_before = children_cpu()
    spawn = time.monotonic()
    cmd = [sys.executable, __file__, "--child", preset, "--seeds", str(seed)]
    cmd += ["--data", args.data, "--eval-every", str(every), "--spawn", repr(spawn)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - spawn
    cpu = children_cpu() - cpu_before
    points = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    final = points[-1]
    curve = [(p["step"], p["seconds"], p["dev"]) for p in points]
    return {
        "preset": preset,
        "seed": seed,
        "steps": final["step"],
        "dev_loss": final["dev"],
        "seconds": round(final["seconds"], 2),  # spawn to trained and evaluated, no evals
        "process_wall": round(wall, 2),
        "process_cpu": round(cpu, 2),  # user + sys of the whole process, evals included
        "eval_seconds": round(final["eval_seconds"], 2),
        "threads": final.get("threads"),
        "time_to": {f"{t:g}": time_to(curve, t) for t in args.thresholds},
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "curve": [(s, round(sec, 2), round(d, 4)) for s, sec, d in curve],
    }


def children_cpu() -> float:
    """User + system CPU seconds of every finished child so far: on a shared machine a
    one-thread run's CPU time is steadier than its wall time."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cli(preset: str, seed: int, args) -> dict:
    """``bnfold train`` as a user runs it: spawn to exit, checkpoint written."""
    load_before = os.getloadavg()
    cpu_before = children_cpu()
    with tempfile.TemporaryDirectory() as out:
        spawn = time.monotonic()
        cmd = [sys.executable, "-m", "bnfold", "train", "--preset", preset, "--seed", str(seed)]
        cmd += ["--data", args.data, "--out", out, "--json"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        wall = time.monotonic() - spawn
    cpu = children_cpu() - cpu_before
    summary = json.loads(res.stdout)
    return {
        "preset": preset,
        "seed": seed,
        "wall": round(wall, 2),
        "cpu": round(cpu, 2),
        "threads": summary.get("threads"),
        "dev_loss": summary["dev_loss"],
        "load_before": [round(x, 2) for x in load_before],
    }


def time_to(curve, threshold: float) -> dict | None:
    for step, seconds, dev in curve:
        if dev <= threshold:
            return {"step": step, "seconds": round(seconds, 2)}
    return None


def fmt_hit(hit: dict | None) -> str:
    return "-" if hit is None else f"{hit['seconds']:.1f}s @{hit['step']}"


def print_row(r: dict, thresholds, header: bool) -> None:
    cols = "".join(f"  {'<=' + format(t, 'g'):>14}" for t in thresholds)
    if header:
        print(
            f"{'preset':<9} {'seed':>5} {'steps':>7} {'thr':>3} {'total s':>8} {'cpu s':>6}"
            f" {'dev':>7}"
            f"{cols}  load before/after (1 min)"
        )
    hits = "".join(f"  {fmt_hit(r['time_to'][f'{t:g}']):>14}" for t in thresholds)
    print(
        f"{r['preset']:<9} {r['seed']:>5} {r['steps']:>7} {r['threads'] or '-':>3}"
        f" {r['seconds']:>8.2f} {r['process_cpu']:>6.2f} {r['dev_loss']:>7.4f}{hits}"
        f"  {r['load_before'][0]:.2f}/{r['load_after'][0]:.2f}",
        flush=True,
    )


def print_summary(results: list[dict], thresholds) -> None:
    print("\nmedian over seeds (seconds from process start; '-' if a seed never got there)")
    print(
        f"{'preset':<9} {'seeds':>5} {'total s':>8} {'cpu s':>6} {'dev':>7}"
        + "".join(f"  {'<=' + format(t, 'g'):>8}" for t in thresholds)
    )
    for preset in dict.fromkeys(r["preset"] for r in results):
        rs = [r for r in results if r["preset"] == preset]
        cells = ""
        for t in thresholds:
            hits = [r["time_to"][f"{t:g}"] for r in rs]
            ok = [h["seconds"] for h in hits if h]
            all_hit = len(ok) == len(hits)
            cell = f"{statistics.median(ok):.1f}" if all_hit else f"{len(ok)}/{len(hits)}"
            cells += f"  {cell:>8}"
        print(
            f"{preset:<9} {len(rs):>5} {statistics.median(r['seconds'] for r in rs):>8.2f}"
            f" {statistics.median(r['process_cpu'] for r in rs):>6.2f}"
            f" {statistics.median(r['dev_loss'] for r in rs):>7.4f}{cells}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", default="fast-old,fast,lecture", help="comma-separated")
    ap.add_argument("--seeds", default="42,1337,7", help="comma-separated seeds")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--eval-every", type=int, default=20, help="fast presets: steps per eval")
    ap.add_argument("--lecture-eval-every", type=int, default=1000)
    ap.add_argument("--thresholds", default="2.10,2.08", help="dev-loss thresholds")
    ap.add_argument("--cli", action="store_true", help="also time plain `bnfold train` runs")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spawn", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.child:
        child(args.child, seeds[0], args.data, args.eval_every, args.spawn)
        return
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    print(f"load average at start: {os.getloadavg()}, cpus {os.cpu_count()}", flush=True)
    results, cli = [], []
    # Seeds outermost: every preset sees the same stretch of machine load for a seed.
    for seed in seeds:
        for preset in presets:
            results.append(run_child(preset, seed, args))
            if not args.json:
                print_row(results[-1], args.thresholds, header=len(results) == 1)
            if args.cli and preset == "fast":
                cli.append(run_cli(preset, seed, args))
    if args.json:
        print(json.dumps({"runs": results, "cli": cli}, indent=2))
        return
    print_summary(results, args.thresholds)
    for c in cli:
        print(
            f"bnfold train --preset {c['preset']} --seed {c['seed']}: {c['wall']:.2f} s spawn"
            f" to exit ({c['cpu']:.2f} s CPU, {c['threads']} thread(s)), dev {c['dev_loss']:.4f}"
            f" (load {c['load_before'][0]:.2f})"
        )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
