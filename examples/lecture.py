"""The makemore lecture's BatchNorm MLP, step by step, with bnfold's Python API.

    python examples/lecture.py [--out lecture] [--preset lecture] [--steps N]

Karpathy's "Building makemore Part 3: Activations & Gradients, BatchNorm" trains a
character-level MLP with a BatchNorm after every hidden Linear layer, looks at the
activation and gradient statistics, and ends by noting that at inference the BatchNorm can
be folded into the Linear before it. This script walks the same steps and then does that
fold, proves it, exports both networks and samples names:

1. the data: the packaged names.txt (32,033 names), 27 tokens, contexts of 3 characters;
2. training (``--preset lecture``: the lecture's 200,000 SGD steps; ``fast`` by default);
3. the health report: tanh saturation, update:data ratios, dead neurons;
4. folding every BatchNorm into its Linear layer;
5. verification over all 27^3 = 19,683 possible contexts, against a float64 evaluation;
6. ONNX export of the BatchNorm and the folded network, checked in ONNX Runtime;
7. sampling names, each labelled train/dev/test/new.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bnfold
from bnfold.api import DEFAULT_WORDS


def section(title: str) -> None:
    print(f"\n== {title}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("lecture"), help="output folder")
    ap.add_argument("--preset", choices=["fast", "lecture"], default="fast")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    args = ap.parse_args(argv)

    section("1. data")
    words = DEFAULT_WORDS.read_text(encoding="utf-8").split()
    print(f"{len(words):,} names from {DEFAULT_WORDS.name}, e.g. {', '.join(words[:5])}")
    print(f"{len(set(''.join(words))) + 1} tokens (26 letters and the end token '.')")

    section(f"2. training ({args.preset} preset)")
    config = bnfold.TrainConfig.from_preset(args.preset, steps=args.steps)
    print(f"{config.steps:,} steps of {config.optimizer}, batch {config.batch_size}")
    run = bnfold.train(
        out=args.out, preset=args.preset, steps=args.steps, report=args.out / "report"
    )
    print(run)

    section("3. activations and gradients")
    print(bnfold.report(args.out / "report"))

    section("4. fold every BatchNorm into the Linear before it")
    folded = bnfold.fold(run.path)
    print(folded)
    if not folded.passed:
        return 1

    section("5. verify the folded network against the BatchNorm network")
    verdict = bnfold.verify(run.path, folded.path)
    print(verdict)

    section("6. export both networks to ONNX")
    exported = bnfold.export(run.path)
    print(exported)

    section("7. sample names from the folded ONNX network")
    names = bnfold.sample(exported.paths["folded"], count=10, seed=42)
    for s in names:
        print(f"{s.name:<12} {s.label or '-':<5} {s.logprob:8.3f}")
    return 0 if verdict.passed and exported.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
