"""bnfold's folding vs torch's ``fuse_linear_bn_eval`` on a trained default model, checked
over every context of the input domain (27^3 = 19,683 for the default).

    .venv/bin/python benchmarks/fold_vs_torch.py [BN_CHECKPOINT]   # default models/bn.pt

For each folded network (bnfold, torch) it prints the max |logit error| against a float64
evaluation of the unfolded BatchNorm network, the max difference from the float32 BN network
and the number of argmax changes; then the time of bnfold's fold + exhaustive verification
(in process, first call and warm) and of the ``bnfold fold`` command end to end.
"""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_linear_bn_eval

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bnfold.fold.modules import fold_batchnorm  # noqa: E402
from bnfold.mlp.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from bnfold.mlp.model import MLP  # noqa: E402
from bnfold.runtime.infer import TorchPredictor  # noqa: E402
from bnfold.verify.domain import all_contexts  # noqa: E402
from bnfold.verify.verdict import verify  # noqa: E402


def torch_fused(model: MLP) -> MLP:
    """Fold with torch.nn.utils.fusion.fuse_linear_bn_eval, pair by pair."""
    layers, mods = [], list(copy.deepcopy(model).eval().net)
    i = 0
    while i < len(mods):
        if isinstance(mods[i], nn.Linear) and isinstance(mods[i + 1], nn.BatchNorm1d):
            layers.append(fuse_linear_bn_eval(mods[i], mods[i + 1]))
            i += 2
        else:
            layers.append(mods[i])
            i += 1
    out = MLP(replace(model.config, batchnorm=False))
    out.tok_emb.load_state_dict(model.tok_emb.state_dict())
    out.net = nn.Sequential(*layers)
    return out.eval()


@torch.inference_mode()
def logits(model: nn.Module, ctx: torch.Tensor) -> np.ndarray:
    return model(ctx).double().numpy()


def main(path: Path) -> None:
    torch.set_num_threads(1)
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    ctx = torch.from_numpy(all_contexts(cfg.vocab_size, cfg.block_size))
    print(f"{path}: {cfg.n_layers} hidden layers x {cfg.n_hidden}, {len(ctx):,} contexts")

    t0 = time.perf_counter()
    ours, _ = fold_batchnorm(ckpt.model)
    t_ours_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = torch_fused(ckpt.model)
    t_theirs = time.perf_counter() - t0

    exact = logits(copy.deepcopy(ckpt.model).double(), ctx)
    bn32 = logits(ckpt.model, ctx)
    print(f"\n{'network':<28}{'max|err| vs f64':>16}{'max|diff| vs BN32':>19}{'argmax chg':>12}")
    for name, m in [
        ("BN network, float32", ckpt.model),
        ("bnfold fold", ours),
        ("torch fuse", theirs),
    ]:
        z = logits(m, ctx)
        chg = int((z.argmax(1) != bn32.argmax(1)).sum())
        err, diff = np.abs(z - exact).max(), np.abs(z - bn32).max()
        print(f"{name:<28}{err:>16.3e}{diff:>19.3e}{chg:>12}")
    print(
        f"\nfold time: bnfold {t_ours_cold * 1e3:.0f} ms (first call),"
        f" torch {t_theirs * 1e3:.1f} ms"
    )

    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        folded, _ = fold_batchnorm(ckpt.model)
        r = verify(TorchPredictor(ckpt), TorchPredictor(Checkpoint(folded, ckpt.vocab)))
        times.append(time.perf_counter() - t0)
    print(
        f"bnfold fold + exhaustive verify (warm, in process): median"
        f" {statistics.median(times):.3f} s, min {min(times):.3f} s  ->"
        f" {'PASSED' if r.passed else 'FAILED'}, max |dlogit| {r.max_abs_logit_error:.2e}"
    )
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(REPO / "cli.py"), "fold", str(path), "--out", f"{d}/f.pt"],
            check=True,
            capture_output=True,
        )
        print(
            f"`bnfold fold` end to end (new process, incl. imports):"
            f" {time.perf_counter() - t0:.2f} s"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "models" / "bn.pt")
