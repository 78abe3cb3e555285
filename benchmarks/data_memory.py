"""Memory per character of turning a words file into training contexts, side by side:
the lecture's loop of Python lists against ``bnfold.mlp.data.build_contexts`` (vectorised).

    .venv/bin/python benchmarks/data_memory.py [--copies 10] [--long 1000000]

Each measurement runs in a fresh process (peak RSS only grows): it reads the words, notes
the peak RSS, builds the contexts (block_size 3) and reports the growth of the peak per
character. Inputs: ``data/names.txt`` repeated ``--copies`` times, and one word of
``--long`` characters (the "very long line" case; bnfold now refuses lines over
``MAX_WORD_CHARS``, so that file goes through ``build_contexts`` directly).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def lecture_lists(words, vocab, block_size):
    """The lecture's context builder: one Python list per context."""
    import torch

    xs, ys = [], []
    for w in words:
        context = [0] * block_size
        for ix in [*vocab.encode(w), 0]:
            xs.append(context)
            ys.append(ix)
            context = [*context[1:], ix]
    return torch.tensor(xs).reshape(len(xs), block_size), torch.tensor(ys)


def measure(builder: str, path: str) -> None:
    """Child process: print chars, contexts and bytes of peak RSS growth per character."""
    import torch  # noqa: F401  (imported before the baseline)

    from bnfold.mlp.data import Vocab, build_contexts

    words = [w.strip() for w in Path(path).read_text(encoding="utf-8").split("\n") if w.strip()]
    vocab = Vocab.from_words(words)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    build = build_contexts if builder == "vectorised" else lecture_lists
    x, _ = build(words, vocab, 3)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    chars = sum(map(len, words))
    print(chars, len(x), (after - before) / chars)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--long", type=int, default=1_000_000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return measure(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        names = (REPO / "data" / "names.txt").read_text(encoding="utf-8")
        files = {
            f"names.txt x{args.copies}": Path(tmp) / "names.txt",
            f"one word of {args.long:,} chars": Path(tmp) / "long.txt",
        }
        files[f"names.txt x{args.copies}"].write_text(names * args.copies, encoding="utf-8")
        files[f"one word of {args.long:,} chars"].write_text("ab" * (args.long // 2) + "\n")
        print(f"load average {os.getloadavg()[0]:.1f}; peak RSS growth per character")
        print(f"{'input':28s} {'builder':11s} {'chars':>11s} {'contexts':>11s} {'bytes/char':>10s}")
        for label, path in files.items():
            for builder in ("lists", "vectorised"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", builder, str(path)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                chars, contexts, per_char = int(out[0]), int(out[1]), float(out[2])
                print(f"{label:28s} {builder:11s} {chars:11,} {contexts:11,} {per_char:10.0f}")


if __name__ == "__main__":
    main()
