"""Check that two ONNX models with the same inputs and outputs compute the same function.

Both run in ONNX Runtime with graph optimisations *disabled*, so ORT's own fusions cannot
hide (or cause) a difference. Inputs are, in order of preference: the user's ``.npz``; the
whole input domain of a bnfold character model (its vocabulary metadata makes it finite);
seeded random inputs from the declared shapes and dtypes, dynamic dims set small. The
reference is evaluated in float64 by :mod:`bnfold.runtime.float64_eval` (torch float64
kernels over the graph, built once per comparison), and every output is judged by
:func:`bnfold.verify.rounding.judge_outputs` against that truth: a difference passes only if
float32 rounding explains it. When there is no truth (an operator the evaluator cannot run,
a shape it disagrees with ONNX Runtime on), the verdict falls back to the coarser magnitude
criterion and says so, with the reason, in its text and JSON (``float64_problem``).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import BnfoldError
from bnfold.runtime.onnx_runtime import INPUT_NAME, parse_metadata
from bnfold.runtime.ort_session import cpu_session
from bnfold.verify.domain import all_contexts
from bnfold.verify.rounding import RoundingVerdict, judge_outputs

Say = Callable[[str], None]  # one progress line (stage) to the user, or a no-op

DYNAMIC_DIM = 2  # size given to every dynamic dimension of a random input
SAMPLE_ROWS = 65_536  # contexts sampled when a bnfold model's domain is too large


def session(model: onnx.ModelProto):
    """An ORT CPU session with every graph optimisation off (one thread: reproducible)."""
    return cpu_session(model.SerializeToString(), optimize=False)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], what: str = "model") -> dict:
    """Every output of ``model`` on ``feeds``; ``BnfoldError`` naming ``what`` if ORT
    cannot load or run it."""
    try:
        sess = session(model)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds), strict=True))
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        raise BnfoldError(f"{what}: ONNX Runtime cannot run it: {reason[:300]}") from None


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def signature(model: onnx.ModelProto) -> tuple[list, list]:
    """Input and output (name, elem_type, dims) of a model; dims are ints or names."""

    def describe(vi: onnx.ValueInfoProto):
        t = vi.type.tensor_type
        dims = (
            [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            if t.HasField("shape")
            else None
        )
        return (vi.name, t.elem_type, dims)

    return [describe(i) for i in _real_inputs(model)], [describe(o) for o in model.graph.output]


def random_feeds(model: onnx.ModelProto, seed: int = 0, dynamic: int = DYNAMIC_DIM) -> dict:
    """Seeded inputs from the declared shapes and dtypes; dynamic dims become ``dynamic``.
    Floats are standard normal, integers lie in [0, 2) (safe as indices), bools random."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, elem, dims in signature(model)[0]:
        if dims is None:
            raise BnfoldError(f"input {name!r} has no declared shape: pass --inputs FILE.npz")
        shape = [d if isinstance(d, int) and d > 0 else dynamic for d in dims]
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise BnfoldError(f"input {name!r} has dtype {dtype}: pass --inputs FILE.npz")
    return feeds


def npz_feeds(path: str | Path, model: onnx.ModelProto) -> dict:
    """The user's inputs, one array per graph input name."""
    try:
        with np.load(path, allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise BnfoldError(f"{path}: not a readable .npz file: {e}") from None
    want = [name for name, _, _ in signature(model)[0]]
    if sorted(feeds) != sorted(want):
        raise BnfoldError(f"{path}: has arrays {sorted(feeds)}, the model's inputs are {want}")
    return feeds


def domain_feeds(model: onnx.ModelProto, max_exhaustive: int, seed: int = 0) -> dict | None:
    """For a bnfold character model (vocabulary metadata): every context of its finite
    domain, or a seeded sample when there are more than ``max_exhaustive``; else ``None``."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        info = parse_metadata(meta, "model")
    except BnfoldError:
        return None
    v, b = info["vocab"].size, info["block_size"]
    if v**b <= max_exhaustive:
        return {INPUT_NAME: np.asarray(all_contexts(v, b), dtype=np.int64)}
    rng = np.random.default_rng(seed)
    return {INPUT_NAME: rng.integers(0, v, size=(SAMPLE_ROWS, b), dtype=np.int64)}


TRUTH_HOW = "bnfold float64 evaluator (torch float64 kernels)"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class Float64Truth:
    """The reference model's float64 outputs, from one evaluator built once (parameters
    converted to double once) and run on every input set; ``problem`` says why there is
    no truth when there is none (the evaluator could not be built, or a run failed)."""

    def __init__(self, model: onnx.ModelProto):
        from bnfold.runtime.float64_eval import Float64Evaluator

        self.problem: str | None = None
        self.evaluator = None
        try:
            self.evaluator = Float64Evaluator(model)
        except Exception as e:  # onnx.reference raises many types for ops it lacks
            self.problem = f"the float64 evaluator cannot build the graph: {_short(e)}"

    def outputs(self, feeds: dict, expected: dict | None = None, progress=None) -> dict | None:
        """Float64 outputs on ``feeds`` (``None`` and :attr:`problem` set on failure);
        ``expected``: ONNX Runtime's outputs, whose shapes the truth must have."""
        if self.evaluator is None:
            return None
        try:
            truth = self.evaluator.run(feeds, progress)
        except Exception as e:  # a kernel's own error: the verdict reports it
            self.problem = f"the float64 evaluation failed: {_short(e)}"
            return None
        for name, value in (expected or {}).items():
            got = truth.get(name)
            if got is None or got.shape != value.shape:
                shape = None if got is None else list(got.shape)
                self.problem = (
                    f"the float64 evaluation gives {name!r} shape {shape}, ONNX Runtime"
                    f" {list(value.shape)}"
                )
                return None
        return truth


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def float64_outputs(model: onnx.ModelProto, feeds: dict) -> tuple[dict | None, str]:
    """The model's outputs computed in float64, and how (or ``None`` and why not)."""
    truth = Float64Truth(model)
    out = truth.outputs(feeds)
    return (out, TRUTH_HOW) if out is not None else (None, f"none: {truth.problem}")


@dataclass
class OutputVerdict:
    name: str
    shape: list[int]
    verdict: RoundingVerdict

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": self.shape, "verdict": self.verdict.to_dict()}


@dataclass
class Comparison:
    inputs: str  # what was fed
    float64: str  # how the float64 truth was obtained, or why there is none
    outputs: list[OutputVerdict] = field(default_factory=list)
    seconds: float = 0.0
    float64_problem: str | None = None  # why a float64 truth was wanted but is missing
    peak_rss_mb: float = 0.0  # the process's peak resident memory when the check ended

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.verdict.passed for o in self.outputs)

    def to_dict(self) -> dict:
        return {
            "inputs": self.inputs,
            "float64": self.float64,
            "float64_problem": self.float64_problem,
            "outputs": [o.to_dict() for o in self.outputs],
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "passed": self.passed,
        }

    def format(self) -> str:
        lines = [
            f"verification {'PASSED' if self.passed else 'FAILED'} ({self.inputs};"
            f" float64 truth: {self.float64})"
        ]
        if self.float64_problem:
            lines.append(
                f"  warning: no float64 truth ({self.float64_problem}): judged by the"
                " magnitude criterion, which cannot see errors smaller than a few hundred"
                " float32 rounding steps"
            )
        for o in self.outputs:
            v = o.verdict
            lines.append(
                f"  {o.name} {o.shape}: max |diff| {v.max_abs_error:.3g}, margin"
                f" {v.margin:.3g} ({v.criterion}); {v.reason}"
            )
        lines.append(f"  took {self.seconds:.2f} s, peak memory {self.peak_rss_mb:,.0f} MB")
        return "\n".join(lines)


def _static(dims) -> list | None:
    """Dims with every symbolic or unknown one as ``None`` (those may differ)."""
    return None if dims is None else [d if isinstance(d, int) and d > 0 else None for d in dims]


def same_signature_problem(a: onnx.ModelProto, b: onnx.ModelProto) -> str | None:
    """Why two models cannot be compared (different input/output names, dtypes, ranks or
    fixed sizes), or ``None``."""
    sa, sb = signature(a), signature(b)
    for what, xa, xb in (("inputs", sa[0], sb[0]), ("outputs", sa[1], sb[1])):
        da = [(n, t, _static(d)) for n, t, d in xa]
        db = [(n, t, _static(d)) for n, t, d in xb]
        if da != db:
            return f"the models have different {what}: {xa} vs {xb}"
    return None


def _exact_verdict(r: np.ndarray, c: np.ndarray) -> RoundingVerdict:
    """Outputs rounding cannot explain a difference in (shapes, integers, bools)."""
    same = r.shape == c.shape and bool(np.array_equal(r, c))
    if r.shape != c.shape:
        reason = f"shapes differ: {list(r.shape)} vs {list(c.shape)}"
    else:
        reason = "identical" if same else f"{r.dtype} outputs differ"
    bad = 0.0 if same else float("inf")
    return RoundingVerdict(same, "exact", 0.0, bad, bad, 0, 0, reason, elements=int(r.size))


def _sessions(reference: onnx.ModelProto, candidate: onnx.ModelProto):
    """One ORT session per model (built once, run on every input set)."""
    out = []
    for model, what in ((reference, "reference"), (candidate, "candidate")):
        try:
            out.append((session(model), what))
        except Exception as e:  # ORT raises its own exception types
            raise BnfoldError(f"{what}: ONNX Runtime cannot run it: {_ort_reason(e)}") from None
    return out


def _ort_reason(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _run_session(sess, feeds: dict, what: str) -> dict:
    try:
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds), strict=True))
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        raise BnfoldError(f"{what}: ONNX Runtime cannot run it: {_ort_reason(e)}") from None


def _quiet(_: str) -> None:
    """No progress output."""


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: dict | list[dict],
    inputs: str,
    tolerance: float | None = None,
    class_axis: int | None = None,
    *,
    identical: bool = False,
    say: Say | None = None,
    walk=None,
) -> Comparison:
    """Run both models on ``feeds`` (one input set or several) and judge every output
    (float32-rounding-aware); ``class_axis``: the outputs are class scores along it (top-1
    flips are checked).

    ``identical``: the candidate must compute exactly what the reference does (nothing was
    folded, so the graphs run the same kernels): outputs are compared bit for bit and no
    float64 truth is computed. ``say`` gets one line per stage; ``walk(done, total)`` is
    called after every node of the float64 evaluation (progress)."""
    t0 = time.perf_counter()
    say = say or _quiet
    problem = same_signature_problem(reference, candidate)
    if problem:
        raise BnfoldError(problem)
    sets = [feeds] if isinstance(feeds, dict) else feeds
    if identical:
        how = "not needed: nothing was folded, so the outputs must be identical"
    elif tolerance is not None:
        how = "not used"
    else:
        how = TRUTH_HOW
    result = Comparison(inputs=inputs, float64=how)
    say("verify: loading both models into ONNX Runtime")
    (ref_sess, _), (cand_sess, _) = _sessions(reference, candidate)
    truth_source = None
    if not identical and tolerance is None:
        say("verify: preparing the float64 evaluation of the reference")
        truth_source = Float64Truth(reference)
    for k, one in enumerate(sets, 1):
        of = f" (input set {k} of {len(sets)})" if len(sets) > 1 else ""
        say(f"verify: running both models in float32{of}")
        ref = _run_session(ref_sess, one, "reference")
        cand = _run_session(cand_sess, one, "candidate")
        truth = None
        if truth_source is not None:
            say(f"verify: float64 truth{of}")
            truth = truth_source.outputs(one, ref, walk)
        for name, r in ref.items():
            c = cand[name]
            if identical or r.shape != c.shape or r.dtype.kind != "f":
                verdict = _exact_verdict(r, c)
            else:
                t = None if truth is None else truth[name]
                verdict = judge_outputs(r, c, t, tolerance=tolerance, class_axis=class_axis)
            result.outputs.append(OutputVerdict(name, list(r.shape), verdict))
    if truth_source is not None and truth_source.problem:
        result.float64_problem = truth_source.problem
        result.float64 = "none"  # the reason is in float64_problem (and the warning line)
    result.seconds = round(time.perf_counter() - t0, 3)
    result.peak_rss_mb = peak_rss_mb()
    return result
