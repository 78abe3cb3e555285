"""How the ONNX fold's time grows with the number of BatchNorm nodes: a chain of N
``Gemm -> BatchNormalization -> Relu`` blocks (width 8), folded by ``fold_onnx`` (the
folding alone, no verification), for each N, by this checkout and, side by side in the
same run, by another one (``--before``, e.g. a checkout of the previous version).

    flock /work/tmp/heavy.lock .venv/bin/python benchmarks/onnx_fold_scaling.py \\
        --before /path/to/old/checkout          # writes benchmarks/results/onnx_fold_scaling.txt

Each measurement runs in its own subprocess whose ``PYTHONPATH`` is the checkout measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "onnx_fold_scaling.txt"
WIDTH = 8


def chain_model(blocks: int, width: int = WIDTH):
    """``blocks`` Gemm -> BN -> Relu blocks on a (batch, width) float input."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(blocks):
        w = rng.standard_normal((width, width)).astype(np.float32)
        params = {
            f"w{i}": w,
            f"b{i}": rng.standard_normal(width).astype(np.float32),
            f"g{i}": rng.uniform(0.5, 1.5, width).astype(np.float32),
            f"beta{i}": rng.standard_normal(width).astype(np.float32),
            f"mu{i}": rng.standard_normal(width).astype(np.float32),
            f"var{i}": rng.uniform(0.5, 1.5, width).astype(np.float32),
        }
        inits += [numpy_helper.from_array(v, k) for k, v in params.items()]
        nodes += [
            helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"], name=f"gemm{i}"),
            helper.make_node(
                "BatchNormalization",
                [f"h{i}", f"g{i}", f"beta{i}", f"mu{i}", f"var{i}"],
                [f"n{i}"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def worker(blocks: int) -> None:
    """Fold a chain of ``blocks`` blocks with whatever ``bnfold`` is on the path; print JSON."""
    import bnfold
    from bnfold.fold.onnx.folder import fold_onnx

    model = chain_model(blocks)
    t0 = time.perf_counter()
    _, report = fold_onnx(model)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "blocks": blocks,
                "bytes": model.ByteSize(),
                "folded": len(report.folded),
                "seconds": seconds,
                "bnfold": str(Path(bnfold.__file__).parent.parent),
            }
        )
    )


def measure(checkout: Path, blocks: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    r = subprocess.run(
        [sys.executable, __file__, "--worker", str(blocks)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def git_head(checkout: Path) -> str:
    r = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    return r.stdout.strip()[:72] or "(not a git checkout)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[500, 3000])
    p.add_argument("--before", type=Path, help="another checkout to measure side by side")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    checkouts = [("after (this checkout)", REPO)]
    if args.before:
        checkouts.insert(0, ("before", args.before.resolve()))
    load0 = os.getloadavg()[0]
    rows = []
    for blocks in args.blocks:
        row = {"blocks": blocks}
        for label, checkout in checkouts:
            m = measure(checkout, blocks)
            assert m["folded"] == blocks, m
            row[label] = m["seconds"]
            row["bytes"] = m["bytes"]
        rows.append(row)
        print(row, file=sys.stderr)
    load1 = os.getloadavg()[0]
    lines = [
        f"# {' '.join(['benchmarks/onnx_fold_scaling.py', *sys.argv[1:]])}",
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  python {platform.python_version()}"
        f"  {platform.machine()} {os.cpu_count()} cpus  loadavg {load0:.2f} -> {load1:.2f}",
        *(f"# {label}: {c} ({git_head(c)})" for label, c in checkouts),
        f"# fold_onnx alone (no verification) on N Gemm -> BN -> Relu blocks, width {WIDTH}",
        "",
        "| blocks | file bytes | " + " | ".join(f"{label} s" for label, _ in checkouts) + " |",
        "|---|---|" + "---|" * len(checkouts),
    ]
    for row in rows:
        cells = " | ".join(f"{row[label]:.2f}" for label, _ in checkouts)
        lines.append(f"| {row['blocks']:,} | {row['bytes']:,} | {cells} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        growth = b["blocks"] / a["blocks"]
        for label, _ in checkouts:
            lines.append(
                f"# {label}: {growth:g}x the blocks took {b[label] / a[label]:.1f}x the time"
            )
    if args.before:
        for row in rows:
            ratio = row["before"] / row["after (this checkout)"]
            lines.append(f"# {row['blocks']:,} blocks: after is {ratio:.1f}x faster than before")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
