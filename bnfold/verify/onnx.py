"""Check that two ONNX models with the same inputs and outputs compute the same function.

Both run in ONNX Runtime with graph optimisations *disabled*, so ORT's own fusions cannot
hide (or cause) a difference. Inputs are, in order of preference: the user's ``.npz``; the
whole input domain of a bnfold character model (its vocabulary metadata makes it finite);
seeded random inputs from the declared shapes and dtypes (``--shape``, else dynamic dims
guessed as a real input's: batch 2, images 224 x 224). The
reference is evaluated in float64 by :mod:`bnfold.runtime.float64_eval` (numpy float64
kernels over the graph, built once per comparison), and every output is judged by
:func:`bnfold.verify.rounding.judge_outputs` against that truth: a difference passes only if
float32 rounding explains it. When there is no truth (an operator the evaluator cannot run,
a shape it disagrees with ONNX Runtime on), the verdict falls back to the coarser magnitude
criterion and says so, with the reason, in its text and JSON (``float64_problem``).
"""

from __future__ import annotations

import math
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import BnfoldError
from bnfold.io.npz import read_npz
from bnfold.io.onnx_files import is_stub
from bnfold.runtime.onnx_runtime import INPUT_NAME, parse_metadata
from bnfold.runtime.ort_session import cpu_session
from bnfold.verify.domain import all_contexts
from bnfold.verify.rounding import RoundingVerdict, judge_outputs

Say = Callable[[str], None]  # one progress line (stage) to the user, or a no-op

DYNAMIC_DIM = 2  # size given to a batch-like dynamic dimension of a random input
IMAGE_SIDE = 224  # dynamic H and W of an NCHW input: the size image models are run at
VIDEO_DIMS = (16, 112, 112)  # dynamic T, H, W of an NCTHW input (video models' clips)
SEQUENCE_LENGTH = 64  # a dynamic length of an (N, C, L) input
SPATIAL_TRIES = 3  # guessed spatial dims are tried at 1x, 2x and 4x before giving up
# Random inputs are bounded by this many elements in all (64 MiB of float32): a small file
# may declare any shape, and a random input of 20,000,000 rows is not a check, it is an
# allocation. Beyond it the user passes --inputs or a --shape.
MAX_RANDOM_ELEMENTS = 1 << 24
SAMPLE_ROWS = 65_536  # contexts sampled when a bnfold model's domain is too large
PROGRESS_SECONDS = 0.1  # how often a wait for the float64 walk reports its progress


def session(model: onnx.ModelProto | bytes, weights: dict | None = None):
    """An ORT CPU session with every graph optimisation off (one thread: reproducible), of a
    model or its serialised bytes (a caller that writes the model serialises it once);
    ``weights``: the initializers held apart (:class:`ModelApart`), of which the model has
    stubs."""
    return cpu_session(_serialised(model, weights), optimize=False, weights=weights)


def _serialised(model: onnx.ModelProto | bytes, weights: dict | None) -> bytes:
    """``model``'s bytes, once every stub it has is checked to be among ``weights``: a
    stub without its array would send ONNX Runtime looking for a file of that name (a
    bug, not bad input: raised as it is)."""
    if isinstance(model, bytes):
        return model
    given = weights or {}
    missing = [t.name for t in model.graph.initializer if is_stub(t) and t.name not in given]
    if missing:
        raise ValueError(f"weights held apart but not given to the session: {missing[:3]}")
    return model.SerializeToString()


def run(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    what: str = "model",
    weights: dict | None = None,
) -> dict:
    """Every output of ``model`` (``weights``: those it holds apart) on ``feeds``;
    ``BnfoldError`` naming ``what`` if ORT cannot load or run it."""
    sess = checked_session(_serialised(model, weights), what, weights)
    return _run_session(sess, feeds, what)


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


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1x3x224x224"`` as ``("x", (1, 3, 224, 224))`` (the ``--shape`` option)."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise BnfoldError(
            f"--shape {text!r}: expected NAME=D1xD2x... with positive sizes, e.g. x=1x3x224x224"
        )
    return name, shape


def _shape_hint(name: str, dims) -> str:
    """What ``--shape`` would look like for this input (its dynamic dims as letters)."""
    return f"--shape {name}=" + "x".join(
        str(d) if isinstance(d, int) and d > 0 else "N" for d in (dims or ["N"])
    )


def _guess(rank: int, axis: int, spatial_scale: int, batch: int) -> int:
    """The size of a dynamic dim a real input would have. Axis 0 and 1 are batch-like
    (``batch``: the first dims of a matrix or sequence input vary with the batch); the
    trailing dims of an image (NCHW: 224 x 224) or a video clip (NCTHW: 16 x 112 x 112)
    get the sizes those models are run at, so a stem of valid-padded convolutions and
    pools has room. ``spatial_scale`` doubles them when the model still cannot run."""
    if rank < 3 or axis < 2:
        return batch
    if rank == 4:
        return IMAGE_SIDE * spatial_scale
    if rank == 5:
        return VIDEO_DIMS[axis - 2] * spatial_scale
    return SEQUENCE_LENGTH * spatial_scale


def input_shapes(
    model: onnx.ModelProto,
    batch: int = DYNAMIC_DIM,
    shapes: dict[str, tuple[int, ...]] | None = None,
    spatial_scale: int = 1,
) -> dict[str, list[int]]:
    """The shape of each random input: the user's ``--shape``, else the declared one with
    each dynamic dim guessed (:func:`_guess`; a dim name used twice gets one size).
    Refuses shapes that contradict the declaration or exceed ``MAX_RANDOM_ELEMENTS``."""
    shapes = dict(shapes or {})
    declared = signature(model)[0]
    unknown = sorted(set(shapes) - {n for n, _, _ in declared})
    if unknown:
        names = [n for n, _, _ in declared]
        raise BnfoldError(f"--shape names {unknown}, but the model's inputs are {names}")
    named: dict[str, int] = {}
    out: dict[str, list[int]] = {}
    for name, _, dims in declared:
        if name in shapes:
            shape = list(shapes[name])
            if dims is not None and (
                len(dims) != len(shape)
                or any(
                    isinstance(d, int) and d > 0 and d != s
                    for d, s in zip(dims, shape, strict=True)
                )
            ):
                raise BnfoldError(
                    f"--shape {name}={'x'.join(map(str, shape))} does not match the declared"
                    f" shape {dims} of input {name!r}"
                )
        elif dims is None:
            raise BnfoldError(
                f"input {name!r} has no declared shape: pass --shape {name}=D1xD2x... or"
                " --inputs FILE.npz"
            )
        else:
            shape = []
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                    continue
                size = named.get(d) if isinstance(d, str) and d else None
                if size is None:
                    size = _guess(len(dims), axis, spatial_scale, batch)
                    if isinstance(d, str) and d:
                        named[d] = size
                shape.append(size)
        out[name] = shape
    total = sum(math.prod(s) for s in out.values())
    if total > MAX_RANDOM_ELEMENTS:
        big = max(out, key=lambda n: math.prod(out[n]))
        dims = {n: d for n, _, d in declared}[big]
        dynamic = dims is None or any(not (isinstance(d, int) and d > 0) for d in dims)
        smaller = f" or a smaller {_shape_hint(big, dims)}" if dynamic else ""
        raise BnfoldError(
            f"random inputs of {total:,} elements (input {big!r} {out[big]}) exceed the limit"
            f" of {MAX_RANDOM_ELEMENTS:,}: pass --inputs FILE.npz{smaller}"
        )
    return out


def _has_guessed_spatial_dims(model: onnx.ModelProto, shapes: dict | None) -> bool:
    """Whether a dynamic dim beyond axis 1 of a rank >= 3 input was guessed."""
    return any(
        name not in (shapes or {})
        and dims is not None
        and len(dims) >= 3
        and any(not (isinstance(d, int) and d > 0) for d in dims[2:])
        for name, _, dims in signature(model)[0]
    )


def random_feeds(
    model: onnx.ModelProto,
    seed: int = 0,
    dynamic: int = DYNAMIC_DIM,
    shapes: dict[str, tuple[int, ...]] | None = None,
    weights: dict | None = None,
) -> dict:
    """Seeded inputs of the shapes :func:`input_shapes` gives (batch-like dynamic dims
    ``dynamic``). When spatial dims were guessed, the model (``weights``: those it holds
    apart) is first run once in ONNX Runtime: if it cannot run (a stem needing larger
    images), they are doubled, up to ``SPATIAL_TRIES`` times, and the error says what
    ``--shape`` to pass.
    Floats are standard normal, integers lie in [0, 2) (safe as indices), bools random."""
    shape_of = input_shapes(model, dynamic, shapes)
    if _has_guessed_spatial_dims(model, shapes):
        failure = ""
        for k in range(SPATIAL_TRIES):
            shape_of = input_shapes(model, dynamic, shapes, spatial_scale=2**k)
            try:
                run(model, _random_arrays(model, shape_of, seed), "model", weights)
                break
            except BnfoldError as e:
                failure = str(e)
        else:
            name, _, dims = next(
                (n, t, d) for n, t, d in signature(model)[0] if n not in (shapes or {})
            )
            raise BnfoldError(
                f"cannot guess the dynamic dims of input {name!r} {dims} (tried up to"
                f" {shape_of[name]}; {failure}): pass {_shape_hint(name, dims)} with the"
                " sizes a real input has, or --inputs FILE.npz"
            )
    return _random_arrays(model, shape_of, seed)


def _random_arrays(model: onnx.ModelProto, shape_of: dict[str, list[int]], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, elem, _ in signature(model)[0]:
        shape = shape_of[name]
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if _floating(dtype):
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


TRUTH_HOW = "bnfold float64 evaluator (numpy float64 kernels)"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class _Stopped(Exception):
    """Raised inside the float64 walk when its result is no longer wanted."""


class Float64Truth:
    """The reference model's float64 outputs on every input set, computed in a thread
    that starts at construction: the walk needs only the reference model and the inputs,
    so it runs beside whatever the caller does before it compares (folding, the onnx
    checker, ONNX Runtime's sessions and float32 runs). One evaluator, built once
    (parameters read once, or shared: ``arrays``), runs every set. ``problem`` says why
    there is no truth when there is none (the evaluator could not be built, or a run
    failed)."""

    def __init__(self, model: onnx.ModelProto, sets: list[dict], arrays: dict | None = None):
        self.problem: str | None = None
        self._sets = sets
        self._results: list[dict | None] = [None] * len(sets)
        self._ready = [threading.Event() for _ in sets]
        self._walked = (0, 0)  # (nodes done, nodes in all) of the set being walked
        self._nodes = 0  # nodes of the graph, once the evaluator is built
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._walk_all, args=(model, arrays), name="bnfold-float64", daemon=True
        )
        self._thread.start()

    def _walk_all(self, model: onnx.ModelProto, arrays: dict | None) -> None:
        from bnfold.runtime.float64_eval import Float64Evaluator

        try:
            try:
                evaluator = Float64Evaluator(model, arrays)
            except Exception as e:  # onnx.reference raises many types for ops it lacks
                self.problem = f"the float64 evaluator cannot build the graph: {_short(e)}"
                return
            self._nodes = len(evaluator.nodes)
            for k, feeds in enumerate(self._sets):
                self._results[k] = evaluator.run(feeds, self._step)
                self._ready[k].set()
        except _Stopped:
            pass
        except Exception as e:  # a kernel's own error: the verdict reports it
            self.problem = f"the float64 evaluation failed: {_short(e)}"
        finally:
            for ready in self._ready:  # nothing more comes: no waiter waits for ever
                ready.set()

    def _step(self, done: int, total: int) -> None:
        if self._stop.is_set():
            raise _Stopped
        self._walked = (done, total)

    def stop(self) -> None:
        """The result is not wanted: the walk ends after its current node."""
        self._stop.set()

    def outputs(self, k: int, expected: dict | None = None, progress=None) -> dict | None:
        """Float64 outputs on input set ``k``, once computed (``progress(done, total)`` is
        called from this thread while waiting). ``None`` and :attr:`problem` set on
        failure; ``expected``: ONNX Runtime's outputs, whose shapes the truth must have."""
        shown = None
        while not self._ready[k].wait(PROGRESS_SECONDS):
            if progress is not None and self._walked != shown and self._walked[1]:
                shown = self._walked
                progress(*shown)
        truth = self._results[k]
        if truth is None:
            return None
        if progress is not None:
            progress(self._nodes, self._nodes)  # this set's walk is complete
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


def _floating(dtype: np.dtype) -> bool:
    """float16/32/64 and ml_dtypes' bfloat16 (numpy does not call that kind "f")."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def float64_outputs(model: onnx.ModelProto, feeds: dict) -> tuple[dict | None, str]:
    """The model's outputs computed in float64, and how (or ``None`` and why not)."""
    truth = Float64Truth(model, [feeds])
    out = truth.outputs(0)
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


def checked_session(model: onnx.ModelProto | bytes, what: str, weights: dict | None = None):
    """:func:`session`, or one line saying ONNX Runtime cannot run ``what``."""
    try:
        return session(model, weights)
    except Exception as e:  # ORT raises its own exception types
        raise BnfoldError(f"{what}: ONNX Runtime cannot run it: {_ort_reason(e)}") from None


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
    *,
    identical: bool = False,
    sessions: tuple = (None, None),
    truth: Float64Truth | None = None,
    say: Say | None = None,
    walk=None,
) -> Comparison:
    """Run both models on ``feeds`` (one input set or several) and judge every output
    (float32-rounding-aware); ``class_axis``: the outputs are class scores along it (top-1
    flips are checked).

    ``identical``: the candidate must compute exactly what the reference does (nothing was
    folded, so the graphs run the same kernels): outputs are compared bit for bit and no
    float64 truth is computed. ``sessions``: ONNX Runtime sessions of the reference and
    the candidate the caller built with :func:`session` already (``None``: built here);
    ``truth``: the reference's :class:`Float64Truth` on these ``feeds``, if the caller
    started it already (else started here, before the sessions, so they overlap).
    ``say`` gets one line per stage; ``walk(done, total)`` is called after every node of
    the float64 evaluation (progress)."""
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
    truth_source = None
    if not identical and tolerance is None:
        if truth is None:
            say("verify: starting the float64 evaluation of the reference")
        truth_source = truth or Float64Truth(reference, sets)
    elif truth is not None:
        truth.stop()
    try:
        _judge_sets(
            result,
            sets,
            sessions,
            reference,
            candidate,
            truth_source,
            class_axis,
            identical=identical,
            tolerance=tolerance,
            say=say,
            walk=walk,
        )
    except BaseException:
        if truth_source is not None:
            truth_source.stop()
        raise
    if truth_source is not None and truth_source.problem:
        result.float64_problem = truth_source.problem
        result.float64 = "none"  # the reason is in float64_problem (and the warning line)
    result.seconds = round(time.perf_counter() - t0, 3)
    result.peak_rss_mb = peak_rss_mb()
    return result


def _judge_sets(
    result: Comparison,
    sets: list[dict],
    sessions: tuple,
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    truth_source: Float64Truth | None,
    class_axis: int | None,
    *,
    identical: bool,
    tolerance: float | None,
    say: Say,
    walk,
) -> None:
    """Run both models on every input set and judge each output into ``result``."""
    say("verify: loading both models into ONNX Runtime")
    ref_sess = sessions[0] or checked_session(reference, "reference")
    cand_sess = sessions[1] or checked_session(candidate, "candidate")
    for k, one in enumerate(sets):
        of = f" (input set {k + 1} of {len(sets)})" if len(sets) > 1 else ""
        say(f"verify: running both models in float32{of}")
        ref = _run_session(ref_sess, one, "reference")
        cand = _run_session(cand_sess, one, "candidate")
        truth = None
        if truth_source is not None:
            say(f"verify: float64 truth{of}")
            truth = truth_source.outputs(k, ref, walk)
        for name, r in ref.items():
            c = cand[name]
            if identical or r.shape != c.shape or r.dtype.kind != "f":
                verdict = _exact_verdict(r, c)
            else:
                t = None if truth is None else truth[name]
                verdict = judge_outputs(r, c, t, tolerance=tolerance, class_axis=class_axis)
            verdict = _needs_evidence(verdict, r, None if truth is None else truth.get(name))
            result.outputs.append(OutputVerdict(name, list(r.shape), verdict))
