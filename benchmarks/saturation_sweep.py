"""What tanh saturation costs this model: dev loss and gradient flow over a sweep.

    .venv/bin/python benchmarks/saturation_sweep.py --decays 0,0.1,0.2,0.3,1 --seeds 42,1337

Trains the default (``fast``) preset with decoupled weight decay on the hidden BatchNorms'
gains (``TrainConfig.bn_gain_decay``), the knob that moves saturation most without changing
anything else, and records for each run:

- saturation per layer over the whole training set (share of ``|tanh| > 0.97``, eval mode,
  the census the training report uses) and dead units (saturated on every example);
- gradient flow: the std of the loss gradient at each Tanh output, averaged over the
  recorded steps of the run (the lecture's "gradient distribution" plot), and the ratio
  between the first and the last layer (1 = no vanishing);
- the final dev loss.

Results: benchmarks/results/saturation_sweep.txt; the verdict of `bnfold report` cites them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bnfold.mlp.data import load_dataset  # noqa: E402
from bnfold.mlp.model import ModelConfig  # noqa: E402
from bnfold.mlp.train import TrainConfig, train  # noqa: E402
from bnfold.report.diagnostics import Diagnostics, saturation_census  # noqa: E402


def run(data, decay: float, seed: int) -> dict:
    cfg = TrainConfig.from_preset("fast", seed=seed, threads=1)
    cfg = replace(cfg, bn_gain_decay=decay)
    diag = Diagnostics(interval=max(1, cfg.steps // 50))
    result = train(data, ModelConfig(), cfg, observer=diag, progress=False)
    census = saturation_census(result.model, data.splits["train"][0])
    grad = [
        statistics.fmean(g for g in layer["grad_std"] if g is not None) for layer in diag.layers
    ]
    return {
        "decay": decay,
        "seed": seed,
        "dev": result.metrics["dev_loss"],
        "saturation": [lay["saturation"] for lay in census["layers"]],
        "dead": sum(len(lay["dead"]) for lay in census["layers"]),
        "grad_std": grad,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--decays", default="0,0.1,0.2,0.3,1")
    ap.add_argument("--seeds", default="42,1337")
    ap.add_argument("--data", default=str(ROOT / "data" / "names.txt"))
    args = ap.parse_args(argv)
    data = load_dataset(args.data, block_size=3)
    print(f"load average at start: {os.getloadavg()}")
    print(
        f"{'decay':>6} {'seed':>5} {'dev':>7} {'worst sat':>9}  {'saturation per layer %':<31}"
        f" {'dead':>4}  grad std at tanh output per layer (x1e-5), first/last"
    )
    for decay in (float(d) for d in args.decays.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(data, decay, seed)
            sat = " ".join(f"{100 * s:5.1f}" for s in r["saturation"])
            grad = " ".join(f"{1e5 * g:5.2f}" for g in r["grad_std"])
            print(
                f"{decay:>6g} {seed:>5} {r['dev']:>7.4f} {100 * max(r['saturation']):>8.1f}%"
                f"  {sat:<31} {r['dead']:>4}  {grad}  {r['grad_std'][0] / r['grad_std'][-1]:.2f}",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
