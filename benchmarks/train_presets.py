"""Train presets side by side and report wall time, final dev loss and time-to-dev-loss.

    .venv/bin/python benchmarks/train_presets.py --presets fast,lecture --seeds 42,1337

Each preset is trained with the ordinary ``bnfold.train.train``. A cheap dev evaluation runs
every ``steps / --evals`` steps through the observer's ``on_eval`` hook; its time is
measured and subtracted, so "train s" and the time-to-threshold columns are training time
only. Periodic evaluations use BatchNorm's running statistics as they stand at that step;
the final dev loss is the one ``train`` reports (after BN calibration when the preset asks
for it), and counts as the last point of the curve. Run one benchmark at a time: the
timings are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bnfold.data import load_dataset  # noqa: E402
from bnfold.model import ModelConfig  # noqa: E402
from bnfold.train import PRESETS, TrainConfig, train  # noqa: E402


class EvalClock:
    """Observer that records (step, training seconds, dev loss) for every periodic eval.

    ``train`` calls ``on_eval`` right after ``after_update`` of the same step, so the time
    between the two is evaluation time, which is kept out of the training clock.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last_update = self.start
        self.eval_seconds = 0.0
        self.curve: list[tuple[int, float, float]] = []

    def before_step(self, step, model) -> None:
        if step == 0:  # the clock starts with the first step, after setup
            self.start = self.last_update = time.perf_counter()

    def after_backward(self, step, model, loss) -> None:
        pass

    def after_update(self, step, model, lr) -> None:
        self.last_update = time.perf_counter()

    def on_eval(self, step, split, loss) -> None:
        now = time.perf_counter()
        self.eval_seconds += now - self.last_update
        self.curve.append((step, self.last_update - self.start - self.eval_seconds, loss))
        self.last_update = now


def time_to(curve: list[tuple[int, float, float]], threshold: float) -> tuple[int, float] | None:
    for step, seconds, loss in curve:
        if loss <= threshold:
            return step, seconds
    return None


def run(data, preset: str, seed: int, steps: int | None, evals: int, thresholds) -> dict:
    total = steps or PRESETS[preset]["steps"]
    interval = max(1, total // evals) if evals else 0
    cfg = TrainConfig.from_preset(preset, seed=seed, steps=steps, eval_interval=interval)
    clock = EvalClock()
    result = train(data, ModelConfig(block_size=3), cfg, observer=clock, progress=False)
    train_seconds = result.seconds - clock.eval_seconds
    # The last on_eval is train's own final evaluation, outside its timed region.
    curve = [*clock.curve[:-1], (result.steps_done, train_seconds, result.metrics["dev_loss"])]
    reached = {}
    for t in thresholds:
        hit = time_to(curve, t)
        reached[f"{t:g}"] = None if hit is None else {"step": hit[0], "seconds": round(hit[1], 2)}
    return {
        "preset": preset,
        "seed": seed,
        "steps": result.steps_done,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(clock.eval_seconds, 2),
        "dev_loss": result.metrics["dev_loss"],
        "train_loss": result.metrics["train_loss"],
        "time_to": reached,
        "curve": [(s, round(sec, 2), round(loss, 4)) for s, sec, loss in curve],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", default="fast,lecture", help="comma-separated preset names")
    ap.add_argument("--seeds", default="42", help="comma-separated seeds (default 42)")
    ap.add_argument("--data", default=str(ROOT / "data" / "names.txt"))
    ap.add_argument("--lecture-steps", type=int, default=None, help="shorten the lecture run")
    ap.add_argument("--evals", type=int, default=20, help="periodic dev evals per run (0: none)")
    ap.add_argument("--thresholds", default="2.15,2.10,2.08", help="dev-loss thresholds")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for p in presets:
        if p not in PRESETS:
            ap.error(f"unknown preset {p!r} (choose {', '.join(PRESETS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    data = load_dataset(args.data, block_size=3)

    results = []
    for preset in presets:
        steps = args.lecture_steps if preset == "lecture" else None
        for seed in seeds:
            results.append(run(data, preset, seed, steps, args.evals, thresholds))
            if not args.json:
                print_row(results[-1], thresholds, header=len(results) == 1)
    if args.json:
        print(json.dumps(results, indent=2))


def print_row(r: dict, thresholds, header: bool) -> None:
    cols = "".join(f"  {'<=' + format(t, 'g'):>14}" for t in thresholds)
    if header:
        print(
            f"{'preset':<8} {'seed':>5} {'steps':>7} {'train s':>8} {'eval s':>7} {'dev':>7}{cols}"
        )
    hits = ""
    for t in thresholds:
        hit = r["time_to"][f"{t:g}"]
        cell = "-" if hit is None else f"{hit['seconds']:.1f}s @{hit['step']}"
        hits += f"  {cell:>14}"
    print(
        f"{r['preset']:<8} {r['seed']:>5} {r['steps']:>7} {r['train_seconds']:>8.2f} "
        f"{r['eval_seconds']:>7.2f} {r['dev_loss']:>7.4f}{hits}",
        flush=True,
    )


if __name__ == "__main__":
    main()
