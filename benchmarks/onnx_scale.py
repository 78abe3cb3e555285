"""Fold + verify of full-size torchvision models against ONNX Runtime's basic optimizer,
side by side in one run (alternating, several rounds), with wall time and peak RSS.

    flock /work/tmp/heavy.lock .venv/bin/python benchmarks/onnx_scale.py \
        [--models resnet50,inception_v3,...] [--rounds 3] [--cache DIR]

Every model is exported once (torch.onnx TorchScript exporter, BatchNorm nodes kept:
``training=PRESERVE``, no constant folding, static input shape) with randomised BN
statistics (``tests/onnx_zoo.py``), cached in ``--cache``. Each measurement is a fresh
process: ``python -m bnfold fold MODEL --json`` (fold, check, verify against the float64
truth, write) and a process that builds an ORT session with ``ORT_ENABLE_BASIC`` and
``optimized_model_filepath`` (ORT's BN fusion, written to disk). Wall time is measured
around each process, peak RSS is the child's ``ru_maxrss``. Results go to
``benchmarks/results/onnx_scale.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

RESULTS = REPO / "benchmarks" / "results" / "onnx_scale.txt"
DEFAULT_MODELS = (
    "resnet50",
    "inception_v3",
    "googlenet",
    "densenet121",
    "deeplabv3_mobilenet_v3_large",
    "convnext_tiny",
)


def _builders() -> dict[str, tuple[Callable, tuple[int, ...]]]:
    import onnx_zoo
    from torch import nn

    tv = onnx_zoo.torchvision().models

    class Segmentation(nn.Module):
        """torchvision's segmentation models return a dict; export its "out"."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["out"]

    return {
        "resnet50": (lambda: tv.resnet50(weights=None), (1, 3, 224, 224)),
        "inception_v3": (
            lambda: tv.inception_v3(weights=None, aux_logits=False, init_weights=False),
            (1, 3, 299, 299),
        ),
        "googlenet": (
            lambda: tv.googlenet(weights=None, aux_logits=False, init_weights=False),
            (1, 3, 224, 224),
        ),
        "densenet121": (lambda: tv.densenet121(weights=None), (1, 3, 224, 224)),
        "r3d_18": (lambda: tv.video.r3d_18(weights=None), (1, 3, 16, 112, 112)),
        "deeplabv3_mobilenet_v3_large": (
            lambda: Segmentation(
                tv.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)
            ),
            (1, 3, 520, 520),
        ),
        "convnext_tiny": (lambda: tv.convnext_tiny(weights=None), (1, 3, 224, 224)),
    }


def export_model(name: str, path: Path) -> None:
    """Export torchvision ``name`` with its BNs kept and randomised statistics to ``path``."""
    import onnx_zoo

    build, shape = _builders()[name]
    # the zoo's export at a static input size (dynamic_axes=None): BNs kept, statistics
    # randomised with seed 0
    model = onnx_zoo.export_with(build(), shape, seed=0, dynamic_axes=None)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)


ORT_CHILD = """
import sys, onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
so.optimized_model_filepath = sys.argv[2]
so.log_severity_level = 3
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
"""


def run_child(cmd: list[str]) -> tuple[float, float, str, int]:
    """(wall seconds, the child's own peak RSS in MB from ``wait4``, stdout, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.stdout.close()
    return wall, usage.ru_maxrss / 1024, out, os.waitstatus_to_exitcode(status)


def bnfold_fold(path: Path, out: Path) -> dict:
    wall, rss, text, code = run_child(
        [sys.executable, "-m", "bnfold", "fold", str(path), "--out", str(out), "--json"]
    )
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        d = {"error": text.strip()[-200:]}
    v = d.get("verification", {})
    return {
        "wall": wall,
        "rss": rss,
        "code": code,
        "verify": v.get("seconds"),
        "float64": v.get("float64"),
        "problem": v.get("float64_problem"),
        "folded": len(d.get("fold", {}).get("folded", [])),
        "batchnorms": d.get("fold", {}).get("batchnorms"),
        "margin": max((o["verdict"]["margin"] for o in v.get("outputs", [])), default=None),
        "criterion": ",".join(sorted({o["verdict"]["criterion"] for o in v.get("outputs", [])})),
    }


def ort_basic(path: Path, out: Path) -> dict:
    wall, rss, _, code = run_child([sys.executable, "-c", ORT_CHILD, str(path), str(out)])
    return {"wall": wall, "rss": rss, "code": code}


def breakdown(path: Path, out: Path) -> list[tuple[str, float]]:
    """Seconds per stage of one in-process ``bnfold fold`` (what the total is made of)."""
    stages: list[tuple[str, float]] = []
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        stages.append((name, now - t0))
        t0 = now

    from bnfold.pipeline import onnx_fold

    lap("import bnfold.pipeline.onnx_fold (onnx, onnxruntime)")
    loaded = onnx_fold.load_model(path)
    lap("load_model (bounded read, parse, every tensor checked)")
    original = onnx_fold.check_input_model(loaded, path)
    model = original.structure
    del loaded
    lap("check_input_model (onnx.checker, the weights read apart)")
    feeds, _, _ = onnx_fold.choose_inputs(model, None, 4_000_000)
    from bnfold.verify.onnx import Float64Truth, _run_session, session

    truth = Float64Truth(model, feeds, original.arrays)  # waited for at once: stages apart
    truth.outputs(0)
    lap("float64 truth (a thread beside the stages below in a real fold)")
    reference = onnx_fold.check_runs(original.structure_bytes(), path, original.arrays)
    lap("the reference's ORT session (optimisations off)")
    folded, _ = onnx_fold.fold_apart(original)
    lap("fold_apart")
    onnx_fold.check_contract(model, folded.structure)
    lap("check_contract (onnx.checker full_check)")
    candidate = session(folded.structure_bytes(), folded.arrays)
    lap("the candidate's ORT session (optimisations off)")
    for sess, what in ((reference, "reference"), (candidate, "candidate")):
        _run_session(sess, feeds[0], what)
    lap("two float32 runs")
    from bnfold.io.files import atomic_write

    atomic_write(out, folded.save)
    lap("serialise and write the folded model (a thread beside verification in a real fold)")
    return stages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bnfold_scale")
    p.add_argument("--export-only", action="store_true")
    p.add_argument("--breakdown", metavar="MODEL", help="time the stages of one fold")
    args = p.parse_args()
    if args.breakdown:
        with tempfile.TemporaryDirectory() as tmp:
            load = os.getloadavg()[0]
            rows = breakdown(args.cache / f"{args.breakdown}.onnx", Path(tmp) / "out.onnx")
        print(f"# stages of one fold of {args.breakdown} (in-process, load average {load:.2f})")
        for name, seconds in rows:
            print(f"#   {seconds:5.2f} s  {name}")
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    for name in names:
        path = args.cache / f"{name}.onnx"
        if not path.exists():
            t0 = time.perf_counter()
            export_model(name, path)
            print(f"exported {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.export_only:
        return
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = args.cache / f"{name}.onnx"
            ours, theirs = [], []
            for r in range(args.rounds):  # alternate: the same load for both, round by round
                ours.append(bnfold_fold(path, Path(tmp) / f"{name}.folded.onnx"))
                theirs.append(ort_basic(path, Path(tmp) / f"{name}.ort.onnx"))
                print(name, r, ours[-1], theirs[-1], file=sys.stderr)
            rows.append((name, ours, theirs, os.getloadavg()[0]))
    load_after = os.getloadavg()
    lines = [
        f"# {' '.join(['benchmarks/onnx_scale.py', *sys.argv[1:]])}",
        f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {platform.machine()}, {os.cpu_count()} cores,"
        f" python {platform.python_version()}; load average {load_before[0]:.2f} before,"
        f" {load_after[0]:.2f} after; took {time.perf_counter() - t_start:.0f} s",
        "# bnfold = `python -m bnfold fold MODEL --json` (load, fold, onnx.checker, verify"
        " against the float64 truth, write); ORT = a session with ORT_ENABLE_BASIC writing"
        " optimized_model_filepath; both fresh processes, alternating, min / max of the rounds",
        "",
        "| model | BNs folded | bnfold fold (s) | of which verify (s) | bnfold peak RSS (MB)"
        " | ORT basic (s) | ORT peak RSS (MB) | ratio (min/min) | verdict | margin | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ours, theirs, load in rows:

        def span(xs):
            xs = [x for x in xs if x is not None]
            if not xs:  # refused before any verification (nothing to fold)
                return "-"
            return f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

        last = ours[-1]
        ok = all(o["code"] == 0 for o in ours)
        verdict = ("PASSED" if ok else "FAILED") + f" ({last['criterion']})"
        if last["problem"]:
            verdict += f", no float64 truth: {last['problem']}"
        if last["folded"] == 0 and last["verify"] is None:  # refused at once: no BN
            verdict = "refused: no BatchNormalization node (exit 2)"
        margin = "-" if last["margin"] is None else f"{last['margin']:.3g}"
        lines.append(
            f"| {name} | {last['folded']}/{last['batchnorms'] or 0}"
            f" | {span([o['wall'] for o in ours])} | {span([o['verify'] for o in ours])}"
            f" | {max(o['rss'] for o in ours):.0f} | {span([t['wall'] for t in theirs])}"
            f" | {max(t['rss'] for t in theirs):.0f}"
            f" | {min(o['wall'] for o in ours) / min(t['wall'] for t in theirs):.2f}"
            f" | {verdict} | {margin} | {load:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
