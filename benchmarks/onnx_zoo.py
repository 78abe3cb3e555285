"""BatchNorm folding on the ONNX zoo (tests/onnx_zoo.py): bnfold against the onnxscript
rewriter, ONNX Runtime's own graph optimiser (basic and extended level, written out with
``SessionOptions.optimized_model_filepath``), onnxslim, onnxsim and onnxoptimizer; on the
held-out full-size set also AIMET's ``aimet-onnx`` (from a virtualenv of its own: it pulls
a CUDA build of torch).

    .venv/bin/pip install -e '.[dev,bench]'
    .venv/bin/python benchmarks/onnx_zoo.py            # small zoo -> results/onnx_zoo.txt
    .venv/bin/python benchmarks/onnx_zoo.py --generate /work/zoo   # held-out set (~2 GB)
    .venv/bin/python benchmarks/onnx_zoo.py --full /work/zoo [--aimet PYTHON]

The held-out set (full-size torchvision models at their usual input sizes, float16 copies,
dynamo exports, dynamic dims, opsets 9-21, training-mode exports, external data) is not in
the repository: ``--generate`` writes it. ``--full`` runs every tool on every file in a
subprocess of its own (wall time and peak RSS from ``wait4``; 10 GB address-space limit,
600 s timeout) and judges each output against one float64 evaluation of the original per
case. bnfold is timed as the user runs it: ``bnfold fold`` (fold + verify); the other tools
fold only. Results go to their own section of results/onnx_zoo.txt.

For every case and tool: BatchNormalization nodes left, and whether the tool's output still
computes the original function (ONNX Runtime, optimisations off, seeded random inputs at
batch 2 and 3, judged against a float64 evaluation by bnfold.verify.rounding).
A case is *handled fully*
when the output is right and every BN that can be folded exactly is gone. "BN folded"
counts BatchNormalization nodes removed, in correct outputs only.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import onnx_zoo  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))

from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.pipeline.onnx_fold import fold_onnx  # noqa: E402
from bnfold.verify.onnx import compare, random_feeds  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "onnx_zoo.txt"


def bnfold_tool(m: onnx.ModelProto) -> onnx.ModelProto:
    return fold_onnx(m)[0]


def onnxscript_tool(m: onnx.ModelProto) -> onnx.ModelProto:
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    rules = [
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    ]
    return rewriter.rewrite(m, pattern_rewrite_rules=rules)


def ort_tool(level: str) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    def run(m: onnx.ModelProto) -> onnx.ModelProto:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.log_severity_level = 3
        with tempfile.TemporaryDirectory() as d:
            so.optimized_model_filepath = str(Path(d) / "opt.onnx")
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return onnx.load(so.optimized_model_filepath)

    return run


def onnxslim_tool(m: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(m)


def onnxsim_tool(m: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    out, _ = onnxsim.simplify(m)
    return out


def onnxoptimizer_tool(m: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(m, onnxoptimizer.get_fuse_and_elimination_passes())


TOOLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "bnfold": bnfold_tool,
    "onnxscript rewriter": onnxscript_tool,
    "ORT basic": ort_tool("ORT_ENABLE_BASIC"),
    "ORT extended": ort_tool("ORT_ENABLE_EXTENDED"),
    "onnxslim": onnxslim_tool,
    "onnxsim": onnxsim_tool,
    "onnxoptimizer": onnxoptimizer_tool,
}


def bn_count(m: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def copy_of(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def evaluate(case: onnx_zoo.ZooCase, model: onnx.ModelProto, tool) -> tuple[str, int, bool]:
    """(cell text, BNs folded if right else 0, handled fully)."""
    try:
        out = tool(copy_of(model))
    except Exception as e:
        return f"error: {type(e).__name__}", 0, False
    left = bn_count(out)
    try:
        feeds = [random_feeds(model, dynamic=2), random_feeds(model, seed=1, dynamic=3)]
        result = compare(model, out, feeds, "zoo")
    except BnfoldError as e:
        return f"error: {str(e)[:40]}", 0, False
    if not result.passed:
        return f"WRONG ({left} left)", 0, False
    folded = case.batchnorms - left
    full = left <= case.batchnorms - case.foldable
    return f"{folded}/{case.foldable}" + ("" if full else " partial"), folded, full


def main_small() -> None:
    load = os.getloadavg()
    t0 = time.perf_counter()
    cases = [(c, c.build()) for c in onnx_zoo.CASES]
    rows, totals = [], {t: [0, 0, 0] for t in TOOLS}  # folded, full, wrong
    for case, model in cases:
        cells = []
        for name, tool in TOOLS.items():
            try:
                text, folded, full = evaluate(case, model, tool)
            except Exception:  # keep the table going; the trace goes to stderr
                traceback.print_exc()
                text, folded, full = "error", 0, False
            totals[name][0] += folded
            totals[name][1] += full
            totals[name][2] += text.startswith("WRONG")
            cells.append(text)
        rows.append((f"{case.name} ({case.batchnorms} BN)", cells))
        print(case.name, cells, file=sys.stderr)
    total_bn = sum(c.batchnorms for c, _ in cases)
    total_foldable = sum(c.foldable for c, _ in cases)
    import onnxoptimizer
    import onnxruntime
    import onnxscript
    import onnxsim
    import onnxslim

    lines = [
        f"# benchmarks/onnx_zoo.py  {time.strftime('%Y-%m-%d %H:%M:%S')}  python"
        f" {platform.python_version()}  loadavg {load[0]:.2f}  took"
        f" {time.perf_counter() - t0:.0f} s",
        f"# onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, onnxscript"
        f" {onnxscript.__version__}, onnxslim {onnxslim.__version__}, onnxsim"
        f" {onnxsim.__version__}, onnxoptimizer {onnxoptimizer.__version__}",
        f"# {len(cases)} cases, {total_bn} BatchNormalization nodes, {total_foldable} of them"
        " foldable exactly; cell = BNs folded / foldable, WRONG = output changed",
        "",
        "| tool | cases handled fully | BN folded | wrong results |",
        "| --- | --- | --- | --- |",
    ]
    for name, (folded, full, wrong) in totals.items():
        lines.append(f"| {name} | {full}/{len(cases)} | {folded}/{total_foldable} | {wrong} |")
    lines += ["", "| case | " + " | ".join(TOOLS) + " |", "|---" * (len(TOOLS) + 1) + "|"]
    lines += [f"| {case} | " + " | ".join(cells) + " |" for case, cells in rows]
    text = "\n".join(lines) + "\n"
    write_section(SMALL_SECTION, text)
    print(text)


SMALL_SECTION = "## small zoo (tests/onnx_zoo.py)"
FULL_SECTION = "## held-out full-size set"


def write_section(title: str, text: str) -> None:
    """Replace one ``## `` section of the results file, keep the others."""
    sections: dict[str, str] = {}
    if RESULTS.exists():
        current = None
        for line in RESULTS.read_text().splitlines(keepends=True):
            if line.startswith("## "):
                current = line.strip()
                sections[current] = ""
            elif current is not None:
                sections[current] += line
    sections[title] = "\n" + text
    order = [SMALL_SECTION, FULL_SECTION] + [t for t in sections if t not in (SMALL, FULL)]
    RESULTS.write_text("".join(f"{t}\n{sections[t]}" for t in order if t in sections))


SMALL, FULL = SMALL_SECTION, FULL_SECTION


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate", type=Path, help="write the held-out set into DIR")
    parser.add_argument("--full", type=Path, help="run the held-out set in DIR")
    parser.add_argument("--aimet", help="python of a virtualenv with aimet-onnx")
    parser.add_argument("--only", nargs="*", help="case names (held-out set)")
    args = parser.parse_args()
    import onnx_heldout  # noqa: E402  (benchmarks/onnx_heldout.py)

    if args.generate:
        onnx_heldout.generate(args.generate, args.only)
    elif args.full:
        text = onnx_heldout.run_all(
            args.full, args.aimet, args.only, lambda t: write_section(FULL_SECTION, t)
        )
        write_section(FULL_SECTION, text)
        print(text)
    else:
        main_small()
