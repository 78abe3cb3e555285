"""How much does `--report` slow training? The `fast` preset with and without diagnostics,
side by side in one process, in alternating order (off/on, then on/off, ...) so that drift
in machine load hits both alike.

"on" is exactly what `bnfold train --report DIR` does: a ``Diagnostics`` observer recording
every ``steps // 100`` steps, ~10 periodic dev-loss evaluations, then (after training) the
dead-unit census over the train set and the report files. The budget (issue 6) is 5% of
the training time; report writing happens once after training and is shown separately.

    .venv/bin/python benchmarks/diagnostics_overhead.py            # full fast preset
    .venv/bin/python benchmarks/diagnostics_overhead.py --steps 2000 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bnfold.mlp.data import load_dataset  # noqa: E402
from bnfold.mlp.model import ModelConfig  # noqa: E402
from bnfold.mlp.train import TrainConfig, train  # noqa: E402
from bnfold.report.diagnostics import attach_diagnostics, write_training_report  # noqa: E402


class Timed:
    """Wraps the observer and accounts, inside the same run, for the time spent in its
    hooks and in the periodic dev evaluations it asked for (the loop calls ``on_eval``
    right after ``split_loss``, so that is the time since the step's ``after_update``)."""

    def __init__(self, inner):
        self.inner, self.hooks, self.evals, self._mark = inner, 0.0, 0.0, 0.0

    def _call(self, name, *args):
        t = time.perf_counter()
        getattr(self.inner, name)(*args)
        self.hooks += time.perf_counter() - t

    def on_start(self, model, x_train):
        self._call("on_start", model, x_train)

    def on_batch(self, step, x_batch):
        self._call("on_batch", step, x_batch)

    def before_step(self, step, model):
        self._call("before_step", step, model)

    def after_backward(self, step, model, loss):
        self._call("after_backward", step, model, loss)

    def after_update(self, step, model, lr):
        self._call("after_update", step, model, lr)
        self._mark = time.perf_counter()

    def on_eval(self, step, split, loss):
        if step < self.steps:  # the final evaluation happens with or without --report
            self.evals += time.perf_counter() - self._mark
        self._call("on_eval", step, split, loss)


def run(data, model_config, cfg, with_report: bool, out: Path) -> dict:
    observer = diagnostics = None
    if with_report:
        diagnostics, observer, cfg = attach_diagnostics(cfg)
        observer = Timed(observer)
        observer.steps = cfg.steps
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(data, model_config, cfg, observer=observer, progress=False)
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
    t_report = c_report = 0.0
    if with_report:
        t1, c1 = time.perf_counter(), time.process_time()
        write_training_report(diagnostics, result.model, data, out)
        t_report, c_report = time.perf_counter() - t1, time.process_time() - c1
    return {
        "train": t_train,
        "train_cpu": c_train,
        "report": t_report,
        "report_cpu": c_report,
        "dev_loss": result.metrics["dev_loss"],
        "hooks": observer.hooks if observer else 0.0,
        "evals": observer.evals if observer else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "data" / "names.txt")
    ap.add_argument("--steps", type=int, default=None, help="default: the fast preset's")
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (order alternates)")
    args = ap.parse_args()

    data = load_dataset(args.data)
    model_config = ModelConfig(vocab_size=data.vocab.size)
    cfg = TrainConfig.from_preset("fast", steps=args.steps)
    on_diag, _, on_cfg = attach_diagnostics(cfg)
    print(
        f"fast preset, {cfg.steps} steps, batch {cfg.batch_size}; report on: record every"
        f" {on_diag.interval} steps, dev eval every {on_cfg.eval_interval} steps"
    )
    times: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            for with_report in order:
                t = run(data, model_config, cfg, with_report, Path(tmp) / f"report{r}")
                times[with_report].append(t)
                label = "on " if with_report else "off"
                extra = (
                    f"  + report files {t['report']:.2f} s (cpu {t['report_cpu']:.2f} s)"
                    if with_report
                    else ""
                )
                print(
                    f"  run {r + 1} report {label}: train {t['train']:7.2f} s"
                    f" (cpu {t['train_cpu']:7.2f} s){extra}  dev {t['dev_loss']:.4f}",
                    flush=True,
                )
                if with_report:
                    base = t["train"] - t["hooks"] - t["evals"]
                    print(
                        f"      inside this run: observer hooks {t['hooks']:.2f} s + periodic"
                        f" dev evals {t['evals']:.2f} s = "
                        f"{100 * (t['hooks'] + t['evals']) / base:.2f}% of the rest of training",
                        flush=True,
                    )
    # Training runs on one thread (TrainConfig.threads), so process CPU time measures the
    # work done and is far less sensitive than wall time to other jobs on shared cores.
    for key, what in (("train_cpu", "CPU time"), ("train", "wall time")):
        off = statistics.median(t[key] for t in times[False])
        on = statistics.median(t[key] for t in times[True])
        rep = statistics.median(t[key.replace("train", "report")] for t in times[True])
        print(
            f"{what}: median training off {off:.2f} s, on {on:.2f} s ->"
            f" overhead {on / off:.4f}x ({100 * (on / off - 1):+.2f}%);"
            f" with report files ({rep:.2f} s) {(on + rep) / off:.4f}x"
        )


if __name__ == "__main__":
    main()
