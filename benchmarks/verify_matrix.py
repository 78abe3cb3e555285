"""The verifier's test matrix: correct folds must PASS, real fold errors must FAIL.

Trains 21 BatchNorm MLPs (vocabularies of 27, 63 and 88 characters; block sizes 3-5;
widths 64-512; depths 2-6; 300 to 20,000 training steps) with the project's own
``train_to_checkpoint``, then judges, in one walk over each model's input domain
(``bnfold.domain.compare_over_domain``), against the BN network:

* two correct candidates: bnfold's fold and torch's ``fuse_linear_bn_eval``;
* the seven real errors of ``bnfold.verify_cases.FAULTS``;

under both criteria of ``bnfold.rounding``: ``float64`` (what ``fold`` and ``train-fold``
use) and ``magnitude`` (what ``verify a.onnx b.onnx`` uses without a float64 source).

Prints and saves ``benchmarks/results/verify_matrix.txt``: one line per model with each
candidate's error/bound, then the safety margins: the largest error/bound among correct
folds and the smallest among the errors (want <= 0.1 and >= 10).

    .venv/bin/python benchmarks/verify_matrix.py [--quick]
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

import torch  # noqa: E402

from bnfold.checkpoint import load_checkpoint  # noqa: E402
from bnfold.data import read_words  # noqa: E402
from bnfold.domain import compare_over_domain, plan_domain  # noqa: E402
from bnfold.fold import fold_batchnorm  # noqa: E402
from bnfold.pipeline import train_to_checkpoint  # noqa: E402
from bnfold.verify import Float64Model  # noqa: E402
from bnfold.verify_cases import FAULTS, faulty_networks, torch_fused, wider_alphabet  # noqa: E402

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


def word_files(tmp: Path) -> dict[int, Path]:
    words = read_words(REPO / "data" / "names.txt")
    files = {0: REPO / "data" / "names.txt"}
    for level in (1, 2):
        files[level] = tmp / f"names_level{level}.txt"
        files[level].write_text("\n".join(wider_alphabet(words, level)) + "\n", encoding="utf-8")
    return files


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
    truth = Float64Model(ckpt, str(bn_path))
    by_truth = compare_over_domain(nets, pairs, plan, float64_logits=truth.logits)
    by_magnitude = compare_over_domain(nets, pairs, plan)
    return {
        "vocab": cfg.vocab_size,
        "coverage": plan.coverage,
        "float64": {k: by_truth.pairs[("BN", k)].verdict() for k in cands},
        "magnitude": {k: by_magnitude.pairs[("BN", k)].verdict() for k in cands},
        "dev_loss": ckpt.metrics.get("dev_loss"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="three small models only")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/verify_matrix.txt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    matrix = QUICK if args.quick else MATRIX
    lines: list[str] = []

    def emit(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    emit(f"# bnfold verify matrix: {len(matrix)} models; load average {os.getloadavg()}")
    emit("# columns: error/bound of each candidate (<= 1 passes); f64 = float64 criterion,")
    emit("# mag = magnitude criterion (no float64 truth); faults: smallest error/bound")
    faults = list(FAULTS)
    head = (
        f"{'V':>3} {'T':>2} {'width':>5} {'depth':>5} {'steps':>6} {'batch':>5} {'dev':>6}"
        f" {'ref err':>8} {'bound':>8} {'fold f64':>8} {'fuse f64':>8} {'fold mag':>8}"
        f" {'fuse mag':>8} {'flt f64':>8} {'flt mag':>8}  coverage"
    )
    emit(head)
    worst_ok = {"float64": 0.0, "magnitude": 0.0}
    best_bad = {"float64": float("inf"), "magnitude": float("inf")}
    missed: list[str] = []
    per_fault = {c: {f: float("inf") for f in faults} for c in worst_ok}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfold-matrix-") as tmp:
        files = word_files(Path(tmp))
        for i, (level, T, width, depth, steps, batch) in enumerate(matrix):
            out = Path(tmp) / f"m{i}"
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
            f64, mag = r["float64"], r["magnitude"]
            for crit, verdicts in (("float64", f64), ("magnitude", mag)):
                for k, v in verdicts.items():
                    if k in CORRECT:
                        worst_ok[crit] = max(worst_ok[crit], v.margin)
                        if not v.passed:
                            missed.append(f"model {i} {crit}: correct '{k}' REJECTED: {v.reason}")
                    else:
                        best_bad[crit] = min(best_bad[crit], v.margin)
                        per_fault[crit][k] = min(per_fault[crit][k], v.margin)
                        if v.passed:
                            missed.append(f"model {i} {crit}: fault '{k}' ACCEPTED: {v.reason}")
            ff = min(v.margin for k, v in f64.items() if k not in CORRECT)
            fm = min(v.margin for k, v in mag.items() if k not in CORRECT)
            fold = f64[CORRECT[0]]
            emit(
                f"{r['vocab']:>3} {T:>2} {width:>5} {depth:>5} {steps:>6} {batch:>5}"
                f" {r['dev_loss']:6.3f} {fold.reference_error:8.1e} {fold.bound:8.1e}"
                f" {fold.margin:8.3f} {f64[CORRECT[1]].margin:8.3f}"
                f" {mag[CORRECT[0]].margin:8.3f} {mag[CORRECT[1]].margin:8.3f}"
                f" {ff:8.1f} {fm:8.1f}  {r['coverage']}"
            )
    emit()
    emit("# smallest error/bound per fault over all models (>= 1 means caught everywhere)")
    emit(f"{'fault':24s} {'float64':>10} {'magnitude':>10}")
    for f in faults:
        emit(f"{f:24s} {per_fault['float64'][f]:10.1f} {per_fault['magnitude'][f]:10.1f}")
    emit()
    emit("# safety margins (largest error/bound of a correct fold; smallest of a real error)")
    for crit in ("float64", "magnitude"):
        emit(
            f"{crit:9s}: correct folds <= {worst_ok[crit]:.3f} (margin"
            f" {1 / worst_ok[crit] if worst_ok[crit] else float('inf'):.1f}x);"
            f" errors >= {best_bad[crit]:.1f} (margin {best_bad[crit]:.1f}x)"
        )
    emit(f"# verdicts wrong: {len(missed)}")
    for m in missed:
        emit(f"#   {m}")
    emit(f"# took {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()}")
    emit(
        "# command: .venv/bin/python benchmarks/verify_matrix.py"
        + (" --quick" if args.quick else "")
    )
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
