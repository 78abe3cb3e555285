"""The held-out full-size set of benchmarks/onnx_zoo.py: generate it, run every tool on it
in a subprocess of its own (wall time and peak RSS), judge every output against a float64
evaluation of the original. See benchmarks/onnx_zoo.py for the commands.

This file is also the tool runner in those subprocesses (``--tool NAME IN OUT``), run by
the AIMET virtualenv's python too: everything it imports there is imported lazily.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
MEMORY_LIMIT = 10 * 2**30  # address space of each tool's process
TIMEOUT = 600.0  # seconds per tool run
NOTHING = "nothing to fold"  # bnfold's refusal of a graph without BatchNormalization

TOOLS = (
    "bnfold",
    "ORT basic",
    "onnxsim",
    "onnxslim",
    "onnxscript rewriter",
    "onnxoptimizer",
    "aimet-onnx",
)


# ---- generating the set ------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    name: str
    build: Callable[[], object]  # -> onnx.ModelProto
    note: str = ""
    external_data: bool = False


def _cases() -> list[HeldOut]:
    sys.path.insert(0, str(REPO / "tests"))
    import onnx_zoo as z
    from onnx import TensorProto
    from torch import nn

    tv = z.torchvision()
    m = tv.models
    image = (1, 3, 224, 224)
    hw = {"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch"}}

    class Out(nn.Module):
        """A segmentation model's dict output as one tensor."""

        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    def legacy(build, shape=image, **kw):
        return lambda: z.export_with(build(), shape, **kw)

    def fp16(build, shape=image):
        return lambda: z.with_dtype(z.export_with(build(), shape), TensorProto.FLOAT16)

    def dynamo(build, shape=(2, 3, 224, 224), opset=18):
        return lambda: z.dynamo_export(build(), shape, opset=opset)

    def tf_style():
        return z.tf_style()

    return [
        HeldOut("resnet50", legacy(lambda: m.resnet50(weights=None))),
        HeldOut(
            "inception_v3 299 (eps 1e-3)",
            legacy(
                lambda: m.inception_v3(weights=None, aux_logits=False, init_weights=False),
                (1, 3, 299, 299),
            ),
        ),
        HeldOut("densenet121 (pre-activation BNs)", legacy(lambda: m.densenet121(weights=None))),
        HeldOut(
            "googlenet (ceil_mode pools)",
            legacy(lambda: m.googlenet(weights=None, aux_logits=False, init_weights=False)),
        ),
        HeldOut(
            "r3d_18 (video)", legacy(lambda: m.video.r3d_18(weights=None), (1, 3, 16, 112, 112))
        ),
        HeldOut(
            "deeplabv3_mobilenet_v3_large 520",
            legacy(
                lambda: Out(
                    m.segmentation.deeplabv3_mobilenet_v3_large(
                        weights=None, weights_backbone=None, aux_loss=False
                    )
                ),
                (1, 3, 520, 520),
            ),
        ),
        HeldOut("convnext_tiny (no BN)", legacy(lambda: m.convnext_tiny(weights=None))),
        HeldOut("resnet50 float16", fp16(lambda: m.resnet50(weights=None))),
        HeldOut("mobilenet_v3_large float16", fp16(lambda: m.mobilenet_v3_large(weights=None))),
        HeldOut("resnet50 dynamo opset 18", dynamo(lambda: m.resnet50(weights=None))),
        HeldOut(
            "mobilenet_v3_large dynamo opset 21",
            dynamo(lambda: m.mobilenet_v3_large(weights=None), opset=21),
        ),
        HeldOut("resnet18 dynamo opset 21", dynamo(lambda: m.resnet18(weights=None), opset=21)),
        HeldOut("resnet18 dynamic H, W", legacy(lambda: m.resnet18(weights=None), dynamic_axes=hw)),
        HeldOut(
            "mobilenet_v2 dynamic H, W",
            legacy(lambda: m.mobilenet_v2(weights=None), dynamic_axes=hw),
        ),
        HeldOut("resnet18 opset 9", legacy(lambda: m.resnet18(weights=None), opset_version=9)),
        HeldOut("resnet18 opset 13", legacy(lambda: m.resnet18(weights=None), opset_version=13)),
        HeldOut(
            "resnet18 BN as local functions",
            legacy(
                lambda: m.resnet18(weights=None),
                export_modules_as_functions={nn.BatchNorm2d},
            ),
        ),
        HeldOut(
            "resnet18 training export opset 13",
            legacy(
                lambda: m.resnet18(weights=None),
                training=z.torch.onnx.TrainingMode.TRAINING,
                opset_version=13,
            ),
            note="BatchNormalization-9 with statistics outputs: training mode, not foldable",
        ),
        HeldOut(
            "resnet18 training export opset 17",
            legacy(
                lambda: m.resnet18(weights=None),
                training=z.torch.onnx.TrainingMode.TRAINING,
            ),
            note="training_mode=1: not foldable",
        ),
        HeldOut("resnet50 external data", legacy(lambda: m.resnet50(weights=None)), "", True),
        HeldOut("TensorFlow-style NHWC, Identity-fed", tf_style),
    ]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def generate(directory: Path, only: list[str] | None = None) -> None:
    import onnx

    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for case in _cases():
        if only and case.name not in only and slug(case.name) not in only:
            continue
        t0 = time.perf_counter()
        model = case.build()
        path = directory / f"{slug(case.name)}.onnx"
        if case.external_data:
            onnx.save(
                model,
                path,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{path.stem}.data",
            )
        else:
            onnx.save(model, path)
        bns = _bn_count(model)
        manifest[case.name] = {"file": path.name, "batchnorms": bns, "note": case.note}
        manifest_path.write_text(json.dumps(manifest, indent=1))
        print(f"{case.name}: {bns} BN, {time.perf_counter() - t0:.0f} s", file=sys.stderr)


# ---- one tool in its own process ------------------------------------------------------------


def run_tool(name: str, src: str, dst: str) -> None:
    """Fold ``src`` with tool ``name`` and save to ``dst`` (runs in the subprocess)."""
    import onnx

    if name == "ORT basic":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.log_severity_level = 3
        so.optimized_model_filepath = dst
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        return
    model = onnx.load(src)
    if name == "onnxsim":
        import onnxsim

        model, _ = onnxsim.simplify(model)
    elif name == "onnxslim":
        import onnxslim

        model = onnxslim.slim(model)
    elif name == "onnxscript rewriter":
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
        model = rewriter.rewrite(model, pattern_rewrite_rules=rules)
    elif name == "onnxoptimizer":
        import onnxoptimizer

        model = onnxoptimizer.optimize(model, onnxoptimizer.get_fuse_and_elimination_passes())
    elif name == "aimet-onnx":
        from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

        fold_all_batch_norms_to_weight(model)
    else:
        raise SystemExit(f"unknown tool {name}")
    onnx.save(model, dst)


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its exit code, wall seconds, peak RSS (GB, from ``wait4`` on that
    process alone), stdout and the end of stderr."""
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=_limit, env=env)
        timer = threading.Timer(TIMEOUT, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "rc": proc.returncode,
            "timeout": seconds >= TIMEOUT,
            "seconds": seconds,
            "peak_gb": usage.ru_maxrss / 2**20,  # Linux: kilobytes
            "stdout": out.read(),
            "stderr": err.read()[-2000:],
        }


# ---- judging -------------------------------------------------------------------------------


def _bn_count(model) -> int:
    """BatchNormalization nodes the model runs: local functions count once per call."""
    import onnx.inliner

    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def truth_main(src: str, feeds_path: str, dst: str) -> None:
    """(subprocess) float64 outputs of ``src`` on the saved feeds."""
    import numpy as np

    from bnfold.fold.onnx.graph import load_model
    from bnfold.verify.onnx import float64_outputs

    model = load_model(src)
    with np.load(feeds_path) as f:
        feeds = {k: f[k] for k in f.files}
    truth, how = float64_outputs(model, feeds)
    if truth is None:
        raise SystemExit(how)
    np.savez(dst, **truth)
    print(how)


def run_all(
    directory: Path,
    aimet_python: str | None,
    only: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> str:
    import tempfile

    import numpy as np
    import onnx

    from bnfold.fold.onnx.graph import load_model
    from bnfold.verify.onnx import random_feeds, run
    from bnfold.verify.rounding import judge_outputs

    manifest = json.loads((directory / "manifest.json").read_text())
    load = os.getloadavg()
    t_start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    tools = [t for t in TOOLS if t != "aimet-onnx" or aimet_python]
    results: dict[str, dict[str, dict]] = {}
    truths: dict[str, str] = {}
    for name, info in manifest.items():
        if only and name not in only:
            continue
        src = directory / info["file"]
        original = load_model(src)
        feeds = random_feeds(original, seed=0, dynamic=2)
        reference = run(original, feeds, "original")
        results[name] = {}
        with tempfile.TemporaryDirectory() as tmp:
            feeds_path, truth_path = Path(tmp) / "feeds.npz", Path(tmp) / "truth.npz"
            np.savez(feeds_path, **feeds)
            cmd = [sys.executable, str(HERE), "--truth", str(src), str(feeds_path)]
            r = measured([*cmd, str(truth_path)], env)
            if r["rc"] == 0:
                with np.load(truth_path) as f:
                    truth = {k: f[k] for k in f.files}
                truths[name] = f"{r['stdout'].strip()}, {r['seconds']:.0f} s"
            else:
                truth = None
                why = "timeout" if r["timeout"] else (r["stderr"].strip().splitlines() or ["?"])[-1]
                truths[name] = f"none ({why[:80]}): magnitude criterion"
            for tool in tools:
                dst = Path(tmp) / f"{slug(tool)}.onnx"
                if tool == "bnfold":
                    cmd = [sys.executable, "-m", "bnfold", "fold", str(src), "--out", str(dst)]
                    cmd.append("--json")
                else:
                    python = aimet_python if tool == "aimet-onnx" else sys.executable
                    cmd = [python, str(HERE), "--tool", tool, str(src), str(dst)]
                r = measured(cmd, env)
                cell = {"seconds": r["seconds"], "peak_gb": r["peak_gb"]}
                if r["timeout"]:
                    cell["status"] = "timeout"
                elif r["rc"] and r["rc"] < 0:
                    cell["status"] = f"killed (signal {-r['rc']})"
                elif not dst.exists():
                    last = (r["stderr"].strip().splitlines() or ["no output"])[-1]
                    if tool == "bnfold" and r["rc"] == 1:
                        last = "verification failed: nothing written"
                    cell["status"] = "error"
                    cell["why"] = last[:160]
                else:
                    cell.update(_judge(original, dst, feeds, reference, truth, run, judge_outputs))
                if tool == "bnfold" and r["stdout"].strip().startswith("{"):
                    d = json.loads(r["stdout"])
                    if "error" in d:  # refused: one line, no stages
                        cell["why"] = d["error"][:160]
                        if "no BatchNormalization node" in d["error"]:
                            cell["status"] = NOTHING  # said at once, as it should
                        results[name][tool] = cell
                        continue
                    cell["fold_s"] = d["fold"]["seconds"]
                    cell["verify_s"] = d["verification"]["seconds"]
                results[name][tool] = cell
                print(name, tool, {k: v for k, v in cell.items()}, file=sys.stderr, flush=True)
        del original
        if progress is not None:  # the table so far: a cut-short run still leaves its rows
            progress(
                _format(results, manifest, truths, tools, load, time.perf_counter() - t_start, onnx)
            )
    return _format(results, manifest, truths, tools, load, time.perf_counter() - t_start, onnx)


def _judge(original, dst, feeds, reference, truth, run, judge_outputs) -> dict:
    import onnx

    try:
        out = onnx.load(str(dst))
        got = run(out, feeds, "output")
    except Exception as e:  # an output that does not load or run is that tool's error
        return {"status": "error", "why": f"output does not run: {str(e)[:120]}"}
    left = _bn_count(out)
    removed = _bn_count(original) - left
    passed, criterion = True, "magnitude" if truth is None else "float64"
    margin = 0.0
    for k, r in reference.items():
        c = got.get(k)
        if c is None or c.shape != r.shape:
            return {"status": "WRONG", "left": left, "why": f"output {k} missing or reshaped"}
        v = judge_outputs(r, c, None if truth is None else truth[k])
        passed &= v.passed
        margin = max(margin, v.margin)
    return {
        "status": "ok" if passed else "WRONG",
        "left": left,
        "removed": removed,
        "margin": margin,
        "criterion": criterion,
    }


def _format(results, manifest, truths, tools, load, seconds, onnx) -> str:
    import platform

    best = {
        case: max(
            (c.get("removed", 0) for c in cells.values() if c.get("status") == "ok"), default=0
        )
        for case, cells in results.items()
    }
    total_bn = sum(manifest[c]["batchnorms"] for c in results)
    lines = [
        f"# benchmarks/onnx_zoo.py --full  {time.strftime('%Y-%m-%d %H:%M:%S')}  python"
        f" {platform.python_version()}  {os.cpu_count()} cores  loadavg at start"
        f" {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at end"
        f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}  took {seconds:.0f} s",
        f"# {len(results)} cases, {total_bn} BatchNormalization nodes; one run per tool and"
        " case, each in its own process (wall time incl. interpreter start and imports, peak"
        " RSS); bnfold = `bnfold fold` (fold + verify), the others fold only",
        "# judged on seeded random inputs (batch 2) against a float64 evaluation of the"
        " original; 'foldable' = the most BNs any tool removed with a right result",
        "",
        "| tool | cases handled fully | BNs removed (right results) | wrong results |"
        " errors / refusals | total time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for tool in tools:
        cells = [(case, results[case][tool]) for case in results if tool in results[case]]
        full = sum(
            c.get("status") in ("ok", NOTHING) and c.get("removed", 0) >= best[k] for k, c in cells
        )
        removed = sum(c.get("removed", 0) for _, c in cells if c.get("status") == "ok")
        wrong = sum(c.get("status") == "WRONG" for _, c in cells)
        errors = sum(c.get("status") not in ("ok", "WRONG", NOTHING) for _, c in cells)
        total = sum(c["seconds"] for _, c in cells)
        lines.append(
            f"| {tool} | {full}/{len(cells)} | {removed}/{sum(best.values())} | {wrong} |"
            f" {errors} | {total:.0f} s |"
        )
    lines += ["", "| case (BNs) | " + " | ".join(tools) + " |", "|---" * (len(tools) + 1) + "|"]
    for case, cells in results.items():
        row = []
        for tool in tools:
            c = cells.get(tool, {})
            status = c.get("status", "-")
            if status == "ok":
                text = f"{c['removed']} removed"
            elif status == "WRONG":
                text = f"**WRONG** ({c.get('left', '?')} left)"
            else:
                text = status
            text += f", {c.get('seconds', 0):.1f} s, {c.get('peak_gb', 0):.2f} GB"
            row.append(text)
        lines.append(f"| {case} ({manifest[case]['batchnorms']}) | " + " | ".join(row) + " |")
    lines += ["", "Errors, refusals and the float64 truth per case:"]
    for case, cells in results.items():
        lines.append(f"- {case}: truth {truths[case]}")
        for tool, c in cells.items():
            if "why" in c:
                lines.append(f"  - {tool}: {c['why']}")
            if tool == "bnfold" and "fold_s" in c:
                lines.append(f"  - bnfold: fold {c['fold_s']:.2f} s, verify {c['verify_s']:.2f} s")
    lines.append(f"# onnx {onnx.__version__}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1] == "--tool":
        run_tool(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "--truth":
        truth_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit("usage: onnx_heldout.py --tool NAME IN OUT | --truth IN FEEDS OUT")
