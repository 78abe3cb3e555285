"""BatchNorm folding on the ONNX zoo (tests/onnx_zoo.py): bnfold against the onnxscript
rewriter, ONNX Runtime's own graph optimiser (basic and extended level, written out with
``SessionOptions.optimized_model_filepath``), onnxslim, onnxsim and onnxoptimizer.

    .venv/bin/pip install -e '.[dev,bench]'
    .venv/bin/python benchmarks/onnx_zoo.py            # writes benchmarks/results/onnx_zoo.txt

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


def main() -> None:
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
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
