"""The verifier's test matrix: correct folds must PASS, real fold errors must FAIL.

Trains 21 BatchNorm MLPs (vocabularies of 27, 63 and 88 characters; block sizes 3-5;
widths 64-512; depths 2-6; 300 to 20,000 training steps) with the project's own
``train_to_checkpoint``, then judges, in one walk over each model's input domain
(``bnfold.verify.domain.compare_over_domain``), against the BN network:

* two correct candidates: bnfold's fold and torch's ``fuse_linear_bn_eval``;
* the seven real errors of ``bnfold.verify.cases.FAULTS``;

under the three ways ``bnfold.verify.rounding`` judges: ``float64`` with the BN network as truth
(``fold``, ``train-fold``, ``export``, ``verify`` given a BN ``.pt`` or ``bn.onnx``), the
same with bnfold's folded network's own parameters as truth (``verify`` of two folded
files), and ``magnitude`` (networks with no float64 evaluation at all). Every candidate
gets the parameter test through its float64 twin (``bnfold.runtime.twins``).

Prints and saves ``benchmarks/results/verify_matrix.txt``: one line per model with each
candidate's error/bound, then the safety margins: the largest error/bound among correct
folds and the smallest among the errors (want <= 0.1 and >= 10).

    .venv/bin/python benchmarks/verify_matrix.py [--quick] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bnfold.fold.modules import fold_batchnorm  # noqa: E402
from bnfold.mlp.checkpoint import load_checkpoint  # noqa: E402
from bnfold.mlp.data import read_words  # noqa: E402
from bnfold.pipeline.train_fold import train_to_checkpoint  # noqa: E402
from bnfold.runtime.twins import TorchTwin, float32_spacing  # noqa: E402
from bnfold.verify.cases import FAULTS, faulty_networks, torch_fused, wider_alphabet  # noqa: E402
from bnfold.verify.domain import compare_over_domain, plan_domain  # noqa: E402
from bnfold.verify.verdict import Float64Model  # noqa: E402

MAX_EXHAUSTIVE = 100_000  # check every context up to this; else a seeded sample
SAMPLE = 30_000

# (alphabet level, block size, width, depth, steps, batch size)
MATRIX = [
    (0, 3, 64, 2, 300, 256),
    (0, 3, 100, 5, 1_200, 2048),
    (0, 4, 128, 3, 2_000, 256),
    (0, 5, 64, 2, 20_000, 32),
    (0, 3, 256, 4, 3_000, 256),
    (0, 3, 512, 2, 1_000, 256),
    (0, 4, 96, 6, 1_500, 256),
    (1, 3, 64, 2, 300, 256),
    (1, 3, 128, 4, 2_000, 256),
    (1, 4, 256, 3, 1_000, 256),
    (1, 5, 64, 5, 800, 256),
    (1, 3, 512, 3, 600, 512),
    (1, 3, 100, 6, 20_000, 32),
    (1, 4, 64, 2, 5_000, 128),
    (2, 3, 64, 2, 300, 256),
    (2, 3, 100, 5, 1_200, 2048),
    (2, 4, 128, 4, 2_000, 256),
    (2, 5, 256, 2, 1_000, 256),
    (2, 3, 512, 4, 800, 256),
    (2, 3, 64, 3, 20_000, 64),
    (2, 4, 96, 6, 3_000, 128),
]
QUICK = [MATRIX[0], MATRIX[7], MATRIX[14]]
CORRECT = ("bnfold fold", "torch fuse_linear_bn_eval")


class Net:
    """A torch module behind the ``logits(contexts)`` interface of the comparator."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @torch.inference_mode()
    def logits(self, contexts):
        return self.model(torch.from_numpy(contexts)).numpy()

    def float64_twin(self) -> TorchTwin:
        return TorchTwin(self.model)


def word_files(tmp: Path) -> dict[int, Path]:
    words = read_words(REPO / "data" / "names.txt")
    files = {0: REPO / "data" / "names.txt"}
    for level in (1, 2):
        files[level] = tmp / f"names_level{level}.txt"
        files[level].write_text("\n".join(wider_alphabet(words, level)) + "\n", encoding="utf-8")
    return files


def largest_change_in_ulps(folded: torch.nn.Module, other: torch.nn.Module) -> float:
    """The largest |other - folded| over every weight matrix, in float32 spacings of folded's
    weights (biases are left out: ``(b - mean) * s + beta`` cancels to near 0, where any
    absolute rounding is many spacings)."""
    worst = 0.0
    for a, b in zip(folded.parameters(), other.parameters(), strict=True):
        if a.ndim != 2:
            continue
        a64, b64 = a.detach().double().numpy(), b.detach().double().numpy()
        worst = max(worst, float((np.abs(b64 - a64) / float32_spacing(a64)).max()))
    return worst


def judge_model(bn_path: Path, batch_size: int, seed: int) -> dict:
    ckpt = load_checkpoint(bn_path)
    bn = ckpt.model.eval()
    folded, report = fold_batchnorm(bn)
    if not report.complete:
        raise SystemExit(f"{bn_path}: fold incomplete")
    nets = {"BN": Net(bn), CORRECT[0]: Net(folded), CORRECT[1]: Net(torch_fused(bn))}
    nets |= {k: Net(m) for k, m in faulty_networks(bn, folded, seed, batch_size).items()}
    cands = [k for k in nets if k != "BN"]
    pairs = [("BN", k) for k in cands]
    cfg = ckpt.config
    plan = plan_domain(
        cfg.vocab_size, cfg.block_size, max_exhaustive=MAX_EXHAUSTIVE, sample_size=SAMPLE
    )
    truth = Float64Model.from_checkpoint(ckpt, str(bn_path))
    twins = {k: nets[k].float64_twin() for k in cands}
    by_truth = compare_over_domain(nets, pairs, plan, float64_logits=truth.logits, twins=twins)
    by_magnitude = compare_over_domain(nets, pairs, plan)
    # no BatchNorm network at all (two folded files): bnfold's fold is the reference, its
    # own parameters in float64 the truth
    folded_cands = [k for k in cands if k != CORRECT[0]]
    by_folded = compare_over_domain(
        nets,
        [(CORRECT[0], k) for k in folded_cands],
        plan,
        float64_logits=twins[CORRECT[0]].logits,
        twins=twins,
    )
    return {
        "vocab": cfg.vocab_size,
        "coverage": plan.coverage,
        "float64": {k: by_truth.pairs[("BN", k)].verdict() for k in cands},
        "magnitude": {k: by_magnitude.pairs[("BN", k)].verdict() for k in cands},
        "folded": {k: by_folded.pairs[(CORRECT[0], k)].verdict() for k in folded_cands},
        "dev_loss": ckpt.metrics.get("dev_loss"),
        "eps_ulps": largest_change_in_ulps(folded, nets["eps 1e-3 in one layer"].model),
        "fuse_ulps": largest_change_in_ulps(folded, nets[CORRECT[1]].model),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="three small models only")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/verify_matrix.txt")
    ap.add_argument(
        "--cache", type=Path, help="keep the trained models here and reuse them on the next run"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    matrix = QUICK if args.quick else MATRIX
    lines: list[str] = []

    def emit(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    emit(f"# bnfold verify matrix: {len(matrix)} models; load average {os.getloadavg()}")
    emit("# error/bound of each candidate (<= 1 passes; faults: the smallest of the seven)")
    emit("# under three criteria: f64 = float64 truth from the BN network (fold, train-fold,")
    emit("# export, verify with bn.onnx); nobn = no BN network, bnfold's folded network's own")
    emit("# parameters in float64 are the truth (verify folded.onnx other.onnx); mag = no")
    emit("# float64 at all (magnitude bound). P = parameter test: float64 twin's distance from")
    emit("# the truth / one re-rounding's (bound 3). eps ulps = the wrong-eps fault's largest")
    emit("# weight change in float32 spacings, next to torch fuse's (a correct fold's).")
    faults = list(FAULTS)
    criteria = ("float64", "folded", "magnitude")
    emit(
        f"{'V':>3} {'T':>2} {'width':>5} {'depth':>5} {'steps':>6} {'batch':>5} {'dev':>6}"
        f" | {'f64 fold':>8} {'fuse':>6} {'faults':>7} | {'nobn fuse':>9} {'faults':>7}"
        f" | {'mag fold':>8} {'fuse':>6} {'faults':>7} | {'P fold':>6} {'fuse':>5} {'eps':>5}"
        f" | {'eps ulps':>8} {'fuse':>5}  coverage"
    )
    worst_ok = dict.fromkeys(criteria, 0.0)
    best_bad = dict.fromkeys(criteria, float("inf"))
    missed: list[str] = []
    per_fault = {c: dict.fromkeys(faults, float("inf")) for c in criteria}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfold-matrix-") as tmp:
        files = word_files(Path(tmp))
        models = args.cache or Path(tmp)
        for i, (level, T, width, depth, steps, batch) in enumerate(matrix):
            out = models / f"V{level}-T{T}-w{width}-d{depth}-s{steps}-b{batch}-seed{i}"
            bn_path = out / "bn.pt"
            if not bn_path.exists():
                bn_path, _ = train_to_checkpoint(
                    files[level],
                    out,
                    steps=steps,
                    batch_size=batch,
                    n_hidden=width,
                    n_layers=depth,
                    block_size=T,
                    seed=i,
                    progress=False,
                )
            r = judge_model(bn_path, batch, seed=i)
            worst_fault = {}
            for crit in criteria:
                worst_fault[crit] = float("inf")
                for k, v in r[crit].items():
                    if k in CORRECT:
                        worst_ok[crit] = max(worst_ok[crit], v.margin)
                        if not v.passed:
                            missed.append(f"model {i} {crit}: correct '{k}' REJECTED: {v.reason}")
                        continue
                    best_bad[crit] = min(best_bad[crit], v.margin)
                    per_fault[crit][k] = min(per_fault[crit][k], v.margin)
                    worst_fault[crit] = min(worst_fault[crit], v.margin)
                    if v.passed:
                        missed.append(f"model {i} {crit}: fault '{k}' ACCEPTED: {v.reason}")
            f64, nobn, mag = (r[c] for c in criteria)
            fold, fuse = f64[CORRECT[0]], f64[CORRECT[1]]
            emit(
                f"{r['vocab']:>3} {T:>2} {width:>5} {depth:>5} {steps:>6} {batch:>5}"
                f" {r['dev_loss']:6.3f} | {fold.margin:8.3f} {fuse.margin:6.3f}"
                f" {worst_fault['float64']:7.1f} | {nobn[CORRECT[1]].margin:9.3f}"
                f" {worst_fault['folded']:7.1f} | {mag[CORRECT[0]].margin:8.3f}"
                f" {mag[CORRECT[1]].margin:6.3f} {worst_fault['magnitude']:7.1f}"
                f" | {fold.twin_ratio:6.2f} {fuse.twin_ratio:5.2f}"
                f" {f64['eps 1e-3 in one layer'].twin_ratio:5.2f}"
                f" | {r['eps_ulps']:8.1f} {r['fuse_ulps']:5.1f}  {r['coverage']}"
            )
    emit()
    emit("# smallest error/bound per fault over all models (>= 1 means caught everywhere)")
    emit(f"{'fault':24s} {'float64':>10} {'no BN':>10} {'magnitude':>10}")
    for f in faults:
        emit(f"{f:24s} " + " ".join(f"{per_fault[c][f]:10.1f}" for c in criteria))
    emit()
    emit("# safety margins (largest error/bound of a correct fold; smallest of a real error)")
    for crit in criteria:
        emit(
            f"{crit:9s}: correct folds <= {worst_ok[crit]:.3f} (margin"
            f" {1 / worst_ok[crit] if worst_ok[crit] else float('inf'):.1f}x);"
            f" errors >= {best_bad[crit]:.1f} (margin {best_bad[crit]:.1f}x)"
        )
    emit(f"# verdicts wrong: {len(missed)}")
    for m in missed:
        emit(f"#   {m}")
    emit(f"# took {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()}")
    emit("# command: .venv/bin/python benchmarks/verify_matrix.py " + " ".join(sys.argv[1:]))
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
