"""Fold BatchNormalization nodes of any ONNX model into their neighbouring layers, verify
the result in ONNX Runtime, and write it only when verification passes.

``graph`` reads a model (the one loader :func:`load_model`), ``rules`` holds one rule per
fold variant, ``folder`` applies them, ``compare`` checks two models against each other.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import KEEP_BN_EXPORT, BnfoldError
from bnfold.fold.onnx.folder import OnnxFoldReport, fold_apart, fold_onnx
from bnfold.fold.onnx.graph import Graph, load_model
from bnfold.io.files import BackgroundWrite, check_output_file
from bnfold.io.onnx_files import ModelApart, first_line, weightless_copy, weights_apart
from bnfold.verify.domain import DEFAULT_MAX_EXHAUSTIVE
from bnfold.verify.onnx import (
    DYNAMIC_DIM,
    Comparison,
    Float64Truth,
    checked_session,
    compare,
    domain_feeds,
    npz_feeds,
    random_feeds,
    session,
)

__all__ = [
    "Comparison",
    "fold_apart",
    "OnnxFoldReport",
    "default_output",
    "fold_onnx",
    "fold_onnx_file",
    "generic_onnx_pair",
    "is_bnfold_onnx",
    "is_onnx",
    "load_model",
    "verify_onnx_files",
]


def check_has_batchnorm(model: onnx.ModelProto, path: Path) -> None:
    """Refuse, before any check or walk, a model with no BatchNormalization node (in its
    graph or its local functions): there is nothing to fold, and most likely the exporter
    folded them already."""
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    if not any(n.op_type == "BatchNormalization" for n in nodes):
        raise BnfoldError(
            f"{path}: no BatchNormalization node: nothing to fold (nothing written)",
            hint="torch.onnx.export folds BatchNorms into the convolutions by default; to"
            f" keep them: {KEEP_BN_EXPORT}",
        )


def is_onnx(path: Path) -> bool:
    """The file suffix picks the path: ``.onnx`` is any ONNX model, anything else bnfold's."""
    return Path(path).suffix.lower() == ".onnx"


def generic_onnx_pair(reference: Path, candidate: Path) -> bool:
    """Whether ``bnfold verify`` compares two ONNX models generically (same inputs, same
    outputs) rather than as bnfold character models over their context domain."""
    return (
        is_onnx(reference)
        and is_onnx(candidate)
        and not (is_bnfold_onnx(reference) and is_bnfold_onnx(candidate))
    )


def is_bnfold_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX file written by ``bnfold export`` (its own metadata)."""
    from bnfold.runtime.onnx_runtime import FORMAT

    meta = {p.key: p.value for p in load_model(path).metadata_props}
    return meta.get("format") == FORMAT


def default_output(path: Path) -> Path:
    """``model.onnx`` -> ``model.folded.onnx`` next to it."""
    return path.with_name(f"{path.stem}.folded.onnx")


def choose_inputs(
    model: onnx.ModelProto,
    inputs: Path | None,
    max_exhaustive: int,
    seed: int = 0,
    shapes: dict[str, tuple[int, ...]] | None = None,
    weights: dict | None = None,
) -> tuple[list[dict], str, int | None]:
    """The verification input sets, a description and the outputs' class axis (a bnfold
    model's logits: -1; otherwise unknown): the user's ``.npz``, the whole domain of a
    bnfold character model, or seeded random inputs of the ``shapes`` given (``--shape``)
    or else the declared shapes, with the batch-like dynamic dims at 2 and again at 3 (the
    result must run at other batch sizes too) and spatial ones at a real input's size
    (tried in ONNX Runtime: ``weights``, those the model holds apart)."""
    if inputs is not None:
        if shapes:
            raise BnfoldError("--shape applies to random inputs: not with --inputs")
        return [npz_feeds(inputs, model)], f"inputs from {inputs}", None
    feeds = domain_feeds(model, max_exhaustive, seed)
    if feeds is not None:
        (x,) = feeds.values()
        return [feeds], f"{len(x):,} contexts of the model's input domain", -1
    sets = [
        random_feeds(model, seed, dynamic=d, shapes=shapes, weights=weights)
        for d in (DYNAMIC_DIM, DYNAMIC_DIM + 1)
    ]
    if all(a.shape == b.shape for a, b in zip(sets[0].values(), sets[1].values(), strict=True)):
        sets = sets[:1]  # no dynamic dims
    shapes = " and ".join(
        ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items()) for feeds in sets
    )
    return sets, f"seeded random inputs (seed {seed}: {shapes})", None


def check_fold_output(source: Path, target: Path) -> Path:
    """``target`` if the folded model can be written there: not a folder, in a folder that
    can be made and written, and not the input file itself (verification reads it)."""
    check_output_file(target)
    same = Path(target).resolve() == Path(source).resolve()
    if not same and Path(target).exists() and Path(source).exists():
        same = Path(target).samefile(source)  # a hard link to the input
    if same:
        raise BnfoldError(f"{target}: is the input model; give another --out")
    return Path(target)


def full_check(model: onnx.ModelProto) -> None:
    """The full onnx checker (structure, then strict shape inference) on the model's
    structure: its weights' own sizes and values were checked when the file was read,
    and the folded ones are made by :meth:`Graph.materialize` from those."""
    onnx.checker.check_model(weightless_copy(model), full_check=True)


def check_input_model(model: onnx.ModelProto, path: Path) -> ModelApart:
    """The model to fold passes the full onnx checker and holds no NaN or infinite BN
    parameter (the input's fault, said in one line naming it, before any folding).
    Returns it with its weights apart (:func:`weights_apart`: ONNX Runtime's sessions, the
    fold and the float64 evaluation share the arrays)."""
    try:
        full_check(model)
    except Exception as e:  # ValidationError, InferenceError, ...
        raise BnfoldError(f"{path}: not a valid ONNX model: {first_line(e, 300)}") from None
    check_batchnorm_parameters(model, path)
    return weights_apart(model)


def check_batchnorm_parameters(model: onnx.ModelProto, path: Path) -> None:
    """No BatchNormalization's constant parameters hold NaN or infinity (initializers are
    checked when the file is read; this covers parameters from Constant nodes and
    constant expressions): such a model computes NaN, and nothing verifies it."""
    graph = Graph(model)
    for node in graph.nodes:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        for name in (i for i in node.input[1:5] if i):
            try:
                value, _ = graph.constant(name)
            except RecursionError:  # constant expressions chained deeper than the stack
                raise BnfoldError(f"{path}: constants are chained too deeply to evaluate") from None
            if value is None or value.dtype.kind != "f":
                continue
            with np.errstate(invalid="ignore", over="ignore"):
                finite = bool(np.isfinite(value.astype(np.float64)).all())
            if not finite:
                raise BnfoldError(
                    f"{path}: BatchNormalization {node.name or node.output[0]!r}: its"
                    f" parameter {name!r} holds NaN or infinite values"
                )


def check_runs(model: onnx.ModelProto | bytes, path: Path, weights: dict | None = None):
    """ONNX Runtime's session of ``model`` (read from ``path``; a model or its serialised
    bytes, without the ``weights`` given apart), or one line naming the file (unknown
    ops, a cycle, an opset without kernels)."""
    try:
        return session(model, weights)
    except Exception as e:  # ORT's own exception types
        raise BnfoldError(f"{path}: ONNX Runtime cannot load it: {first_line(e, 300)}") from None


def check_contract(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """The folded model passes the full onnx checker and keeps the graph's interface."""
    try:
        full_check(folded)
    except Exception as e:  # a bug in a rule, not a user error: say which check failed
        raise BnfoldError(f"the folded model fails onnx.checker: {first_line(e, 300)}") from None
    for what in ("input", "output"):
        if [v.SerializeToString() for v in getattr(original.graph, what)] != [
            v.SerializeToString() for v in getattr(folded.graph, what)
        ]:
            raise BnfoldError(f"folding changed the graph's {what}s")


class StageProgress:
    """Progress on stderr, never stdout (``--json`` stays clean): one quiet line per stage
    with the time since the start, and the float64 walk's node count updated in place
    (on a terminal) or reported once it ends (elsewhere). ``enabled=None``: only when
    stderr is a terminal, like training's progress bar."""

    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = tty if enabled is None else enabled
        self.tty = tty
        self.t0 = time.perf_counter()
        self._walk_shown = -1

    def say(self, text: str) -> None:
        if self.enabled:
            self._end_walk()
            print(f"[{time.perf_counter() - self.t0:5.1f} s] {text}", file=self.stream, flush=True)

    def walk(self, done: int, total: int) -> None:
        """After node ``done`` of ``total`` of the float64 evaluation."""
        if not self.enabled:
            return
        percent = done * 100 // total
        if self.tty and percent != self._walk_shown:
            self._walk_shown = percent
            print(
                f"\r[{time.perf_counter() - self.t0:5.1f} s]   {done}/{total} nodes ({percent}%)",
                end="",
                file=self.stream,
                flush=True,
            )
        if done == total:
            self._end_walk(done, total)

    def _end_walk(self, done: int = 0, total: int = 0) -> None:
        if self._walk_shown >= 0:
            print(file=self.stream, flush=True)  # end the line updated in place
            self._walk_shown = -1
        elif done and not self.tty:
            self.say(f"verify: float64 evaluation done ({total} nodes)")


def fold_onnx_file(
    path: Path,
    out: Path | None = None,
    *,
    inputs: Path | None = None,
    tolerance: float | None = None,
    max_exhaustive: int = DEFAULT_MAX_EXHAUSTIVE,
    progress: bool | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[Path | None, OnnxFoldReport, Comparison]:
    """Fold ``path``, verify against the original, write ``out`` only if it passed.

    When nothing was folded (no BatchNormalization, or none foldable) the folded graph
    runs the very same kernels as the original: it is checked bit for bit in ONNX
    Runtime, without any float64 evaluation. ``progress``: stage lines on stderr
    (:class:`StageProgress`; ``None``: only on a terminal).

    The output path is checked before any work (a folder, an unwritable folder or the
    input itself is refused), and the input model must pass the onnx checker before it
    is folded, so a broken input is blamed on the input, not on the fold."""
    target = check_fold_output(path, out or default_output(path))
    stages = StageProgress(progress)
    stages.say(f"fold: reading {path}")
    loaded = load_model(path)
    check_has_batchnorm(loaded, path)
    original = check_input_model(loaded, path)
    del loaded  # its parsed weights (resnet50: 100 MB): the arrays hold them now
    model = original.structure
    chosen = choose_inputs(model, inputs, max_exhaustive, shapes=shapes, weights=original.arrays)
    # the float64 truth needs only the original and the inputs: it is computed while the
    # model is loaded into ONNX Runtime, folded, checked, written and run there
    truth = Float64Truth(model, chosen[0], original.arrays) if tolerance is None else None
    pending = None
    try:
        reference_session = check_runs(original.structure_bytes(), path, original.arrays)
        stages.say("fold: folding BatchNormalization nodes")
        try:
            folded, report = fold_apart(original)
        except RecursionError:  # a chain of constant expressions deeper than Python's stack
            raise BnfoldError(f"{path}: constants are chained too deeply to evaluate") from None
        stages.say(f"fold: folded {len(report.folded)} of {report.batchnorms}; checking the graph")
        check_contract(model, folded.structure)
        # written (straight from the arrays) in a thread while it is verified, renamed into
        # place only if the verification passes
        pending = BackgroundWrite(target, folded.save)
        candidate_session = checked_session(folded.structure_bytes(), "candidate", folded.arrays)
        sessions = (reference_session, candidate_session)
        comparison = _verify_fold(
            model, folded.structure, report, sessions, chosen, truth, tolerance, stages
        )
    except BaseException:
        if truth is not None:
            truth.stop()
        if pending is not None:
            pending.discard()
        raise
    if not comparison.passed:
        pending.discard()
        return None, report, comparison
    stages.say(f"fold: writing {target}")
    return pending.commit(), report, comparison


def _verify_fold(
    model: onnx.ModelProto,
    folded: onnx.ModelProto,
    report: OnnxFoldReport,
    sessions: tuple,
    chosen: tuple[list[dict], str, int | None],
    truth: Float64Truth | None,
    tolerance: float | None,
    stages: StageProgress,
) -> Comparison:
    """The folded model against the original on the ``chosen`` inputs (:func:`choose_inputs`),
    in the ONNX Runtime ``sessions`` of both: bit for bit first when nothing was folded
    (the same kernels), else (or if that fails: a kernel changed) the full comparison."""
    feeds, described, class_axis = chosen
    checks = [True, False] if not report.folded and tolerance is None else [False]
    for identical in checks:
        comparison = compare(
            model,
            folded,
            feeds,
            described,
            tolerance,
            class_axis,
            identical=identical,
            sessions=sessions,
            truth=None if identical else truth,
            say=stages.say,
            walk=stages.walk,
        )
        if comparison.passed:
            break
    if truth is not None:
        truth.stop()  # not needed after all when the bit-for-bit check passed
    return comparison


def verify_onnx_files(
    reference: Path,
    candidate: Path,
    *,
    inputs: Path | None = None,
    tolerance: float | None = None,
    max_exhaustive: int = DEFAULT_MAX_EXHAUSTIVE,
    seed: int = 0,
    progress: bool | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Comparison:
    """Compare any two ONNX models with the same inputs and outputs (``progress``: as
    for :func:`fold_onnx_file`)."""
    stages = StageProgress(progress)
    stages.say(f"verify: reading {reference} and {candidate}")
    paths = (reference, candidate)
    models = []
    for path in paths:
        loaded = load_model(path)
        check_batchnorm_parameters(loaded, path)
        models.append(weights_apart(loaded))  # the sessions and the truth share the arrays
        del loaded  # its parsed weights: the arrays hold them now
    sessions = tuple(
        check_runs(m.structure_bytes(), path, m.arrays)
        for m, path in zip(models, paths, strict=True)
    )
    ref, cand = (m.structure for m in models)
    sets, described, class_axis = choose_inputs(
        ref, inputs, max_exhaustive, seed, shapes, models[0].arrays
    )
    truth = Float64Truth(ref, sets, models[0].arrays) if tolerance is None else None
    try:
        return compare(
            ref,
            cand,
            sets,
            described,
            tolerance,
            class_axis,
            sessions=sessions,
            truth=truth,
            say=stages.say,
            walk=stages.walk,
        )
    except BaseException:
        if truth is not None:
            truth.stop()
        raise
