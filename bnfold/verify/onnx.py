"""Check that two ONNX models with the same inputs and outputs compute the same function.

Both run in ONNX Runtime with graph optimisations *disabled*, so ORT's own fusions cannot
hide (or cause) a difference. Inputs are, in order of preference: the user's ``.npz``; the
whole input domain of a bnfold character model (its vocabulary metadata makes it finite);
seeded random inputs from the declared shapes and dtypes, dynamic dims set small. Where the
reference can be evaluated in float64 (ORT on a float64 copy, else the onnx reference
evaluator), every output is judged by :func:`bnfold.verify.rounding.judge_outputs` against that
truth: a difference passes only if float32 rounding explains it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import BnfoldError
from bnfold.io.npz import read_npz
from bnfold.runtime.onnx_runtime import INPUT_NAME, parse_metadata
from bnfold.runtime.twins import double_graph
from bnfold.verify.domain import all_contexts
from bnfold.verify.rounding import RoundingVerdict, judge_outputs

DYNAMIC_DIM = 2  # size given to every dynamic dimension of a random input
SAMPLE_ROWS = 65_536  # contexts sampled when a bnfold model's domain is too large


def session(model: onnx.ModelProto):
    """An ORT CPU session with every graph optimisation off (one thread: reproducible)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    # fatal only: every error ORT raises reaches the user as one BnfoldError line (from
    # run()), so its own log lines (errors included) would only say it twice, in colour;
    # the default logger is the one that writes while a model loads, before any session
    so.log_severity_level = 4
    ort.set_default_logger_severity(4)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


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
    """The user's inputs, one array per graph input name, read with a bound
    (:func:`bnfold.io.npz.read_npz`) and checked by :func:`feeds_problem`."""
    feeds = read_npz(path)
    want = [name for name, _, _ in signature(model)[0]]
    if sorted(feeds) != sorted(want):
        raise BnfoldError(f"{path}: has arrays {sorted(feeds)}, the model's inputs are {want}")
    problem = feeds_problem(feeds, model)
    if problem:
        raise BnfoldError(f"{path}: {problem}")
    return feeds


def feeds_problem(feeds: dict[str, np.ndarray], model: onnx.ModelProto) -> str | None:
    """Why ``feeds`` cannot be evidence that two models agree, or ``None``: every array
    must have its input's dtype, rank and fixed sizes, hold at least one value, and (for
    floats) only finite values (a NaN or infinite input makes every output NaN or
    infinite, and non-finite outputs are not compared)."""
    for name, elem, dims in signature(model)[0]:
        x = feeds[name]
        want = helper.tensor_dtype_to_np_dtype(elem)
        if x.dtype != want:
            return f"array {name!r} is {x.dtype}, the model's input {name!r} is {want}"
        if dims is not None:
            fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
            if x.ndim != len(dims) or any(
                f is not None and f != n for f, n in zip(fixed, x.shape, strict=True)
            ):
                shown = [d if d is not None else "?" for d in fixed]
                return f"array {name!r} has shape {list(x.shape)}, the model's input is {shown}"
        if x.size == 0:
            return f"array {name!r} holds no values (shape {list(x.shape)}): nothing to compare"
        if x.dtype.kind in "fc" and not np.isfinite(x).all():
            bad = int(x.size - np.isfinite(x).sum())
            return (
                f"array {name!r} holds {bad:,} NaN or infinite value(s) of {x.size:,}: give"
                " finite inputs"
            )
    return None


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


def float64_outputs(model: onnx.ModelProto, feeds: dict) -> tuple[dict | None, str]:
    """The model's outputs computed in float64, and how (or ``None`` and why not)."""
    m64 = double_graph(model)
    feeds64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    try:
        return run(m64, feeds64), "onnxruntime on a float64 copy"
    except Exception:  # ORT lacks float64 kernels for e.g. Conv: use the reference evaluator
        pass
    try:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(m64)
        names = [o.name for o in m64.graph.output]
        return dict(zip(names, ref.run(names, feeds64), strict=True)), (
            "onnx reference evaluator on a float64 copy"
        )
    except Exception as e:
        return None, f"no float64 evaluation ({type(e).__name__}: {str(e)[:120]})"


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

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.verdict.passed for o in self.outputs)

    def to_dict(self) -> dict:
        return {
            "inputs": self.inputs,
            "float64": self.float64,
            "outputs": [o.to_dict() for o in self.outputs],
            "seconds": self.seconds,
            "passed": self.passed,
        }

    def format(self) -> str:
        lines = [
            f"verification {'PASSED' if self.passed else 'FAILED'} ({self.inputs};"
            f" float64 truth: {self.float64})"
        ]
        for o in self.outputs:
            v = o.verdict
            lines.append(
                f"  {o.name} {o.shape}: max |diff| {v.max_abs_error:.3g}, margin"
                f" {v.margin:.3g} ({v.criterion}); {v.reason}"
            )
        lines.append(f"  took {self.seconds:.2f} s")
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


def finite_examples(*outputs: np.ndarray | None) -> int:
    """Examples (indices along axis 0) where every given output is finite throughout:
    those a verdict can rest on (the verdict leaves out rows whose reference or truth is
    NaN or infinite)."""
    rows = None
    for a in (np.asarray(o) for o in outputs if o is not None):
        if a.dtype.kind not in "fc":
            ok = np.ones(len(a) if a.ndim else 1, dtype=bool)
        elif a.ndim >= 2:
            ok = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        else:
            ok = np.isfinite(a.reshape(-1))
        rows = ok if rows is None or rows.shape != ok.shape else rows & ok
    return 0 if rows is None else int(rows.sum())


def _needs_evidence(
    verdict: RoundingVerdict, reference: np.ndarray, truth: np.ndarray | None
) -> RoundingVerdict:
    """``verdict``, or a failed one when no example of the output was compared: empty
    outputs, or outputs NaN or infinite everywhere (all-NaN, infinite or 3e38 inputs) pass
    every comparison vacuously and prove nothing."""
    if not verdict.passed or finite_examples(reference, truth) > 0:
        return verdict
    why = (
        "the output is empty"
        if np.asarray(reference).size == 0
        else "the reference's output is NaN or infinite for every example"
    )
    return replace(
        verdict,
        passed=False,
        reason=f"nothing compared ({why} on these inputs): the comparison proves nothing",
    )


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: dict | list[dict],
    inputs: str,
    tolerance: float | None = None,
    class_axis: int | None = None,
) -> Comparison:
    """Run both models on ``feeds`` (one input set or several) and judge every output
    (float32-rounding-aware); ``class_axis``: the outputs are class scores along it (top-1
    flips are checked)."""
    t0 = time.perf_counter()
    problem = same_signature_problem(reference, candidate)
    if problem:
        raise BnfoldError(problem)
    result = Comparison(inputs=inputs, float64="")
    hows = []
    for one in [feeds] if isinstance(feeds, dict) else feeds:
        ref, cand = run(reference, one, "reference"), run(candidate, one, "candidate")
        truth, how = float64_outputs(reference, one) if tolerance is None else (None, "not used")
        hows.append(how)
        for name, r in ref.items():
            c = cand[name]
            if r.shape != c.shape or r.dtype.kind != "f":
                verdict = _exact_verdict(r, c)
            else:
                t = None if truth is None else truth[name]
                verdict = judge_outputs(r, c, t, tolerance=tolerance, class_axis=class_axis)
            verdict = _needs_evidence(verdict, r, None if truth is None else truth.get(name))
            result.outputs.append(OutputVerdict(name, list(r.shape), verdict))
    result.float64 = "; ".join(dict.fromkeys(hows))
    result.seconds = round(time.perf_counter() - t0, 3)
    return result
