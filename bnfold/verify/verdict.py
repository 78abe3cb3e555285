"""Prove that a candidate model (e.g. the folded checkpoint, later its ONNX export) computes
the same function as a reference (the BatchNorm checkpoint) in eval mode.

The input domain of a character MLP is finite: every context is one of
``vocab_size ** block_size`` id tuples (19,683 for the default 27^3). Whenever that is at
most ``max_exhaustive`` (default 4 million), *every* context is checked, so the verdict is
a proof over the whole domain, not a sample. Above that, a large seeded uniform sample plus
every dev/test context (when given) is checked, and the report says so.

Both models are reached through :class:`~bnfold.runtime.infer.Predictor` (``.pt`` via torch,
``.onnx`` via ONNX Runtime). Optionally a float64 evaluation of the *unfolded* BatchNorm
network is the ground truth, so the report shows each model's own error against exact
arithmetic: whether folding added anything beyond float32 rounding. The float64 reference
comes from, in order: an explicit ``float64_reference`` BN checkpoint; whichever side is
itself a BN ``.pt`` checkpoint; the ``folded_from`` source recorded in a folded
checkpoint's metadata (if that file still exists with the same sha256); whichever side is
an unfolded ``.onnx`` (``bn.onnx``), its graph run in double by ONNX Runtime
(:mod:`bnfold.runtime.twins`); and last, for two folded networks, the *reference's own* parameters
in double (then the candidate must compute what the reference's parameters define). Only a
network with no double evaluation (an ONNX operator without a double kernel) leaves none,
and the report says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.io.files import file_sha256
from bnfold.mlp.checkpoint import Checkpoint, load_checkpoint
from bnfold.mlp.data import Vocab, dataset_from_words, read_words_and_sha256
from bnfold.mlp.threads import torch_threads
from bnfold.runtime.infer import Predictor, TorchPredictor, load_predictor
from bnfold.runtime.twins import Float64Twin, TorchTwin
from bnfold.verify.domain import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_EXHAUSTIVE,
    DEFAULT_SAMPLE_SIZE,
    DomainPlan,
    PairStats,
    compare_over_domain,
    plan_domain,
)
from bnfold.verify.rounding import TWIN_MULTIPLE

DEFAULT_REL_FLOOR = 1.0


CRITERION_TEXT = {
    "float64": (
        "float64 truth: error within a small multiple of the reference's own float32 error;"
        " its float64 twin off the truth by at most 3 re-roundings of its parameters"
    ),
    "magnitude": "no float64 truth: difference within a bound from the logits' magnitude",
    "absolute": "explicit --tolerance on |logit difference|",
}


@dataclass(frozen=True)
class Float64Model:
    """The float64 truth: a network's float32 parameters evaluated in float64 (its twin),
    with where it came from. Usually the unfolded BatchNorm network (a checkpoint's, or an
    exported ``bn.onnx``'s); see :func:`resolve_float64`."""

    source: str
    vocab: Vocab
    block_size: int
    twin: Float64Twin

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, source: str) -> Float64Model:
        """The unfolded BatchNorm checkpoint ``ckpt`` (read from ``source``) in float64."""
        if not ckpt.config.batchnorm:
            raise BnfoldError(
                f"{source}: the float64 reference must be the unfolded BatchNorm checkpoint"
                " (this one is already folded)"
            )
        return cls(source, ckpt.vocab, ckpt.config.block_size, TorchTwin(ckpt.model))

    @classmethod
    def from_predictor(cls, p: Predictor, *, folded: bool = False) -> Float64Model | None:
        """The float64 truth from a predictor of any backend through its twin (``None``
        without one). Only an unfolded network unless ``folded``: a folded one's twin is
        the truth only of its own parameters (see :func:`resolve_float64`)."""
        twin = None if (p.folded and not folded) else p.float64_twin()
        if twin is None:
            return None
        source = _label(p)
        if p.folded:
            source += " (folded: its own parameters; no BatchNorm network given)"
        return cls(source, p.vocab, p.block_size, twin)

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        return self.twin.logits(contexts)


@dataclass
class VerifyReport:
    reference: str
    candidate: str
    domain_size: int  # vocab_size ** block_size
    contexts_checked: int
    exhaustive: bool
    coverage: str  # human description of what was checked
    max_abs_logit_error: float
    mean_abs_logit_error: float
    max_rel_logit_error: float  # |diff| / max(|reference|, rel_floor)
    rel_floor: float
    max_abs_prob_error: float
    argmax_agreement: float  # fraction of contexts with the same top-1 token
    argmax_disagreements: int
    near_ties: int  # disagreements inside the rounding bound (allowed)
    flips: int  # disagreements outside it (fail)
    min_top2_gap: float  # smallest top-1 minus top-2 logit of the reference
    min_top2_gap_context: list[int]
    worst_context: list[int]  # a context with the largest logit error
    float64_reference: str | None  # where the float64 ground truth came from
    reference_vs_float64: float | None  # max |logit - float64 logit|
    candidate_vs_float64: float | None
    nonfinite: int  # contexts where either model produced NaN/inf
    tolerance: float | None  # explicit absolute override, or None (rounding criterion)
    criterion: str  # "float64", "magnitude" or "absolute" (see bnfold.verify.rounding)
    bound: float  # the largest allowed |logit error| that applied
    margin: float  # error / bound (<= 1 passes)
    reason: str  # one line: why it passed or failed
    passed: bool
    seconds: float
    # the parameter test (bnfold.runtime.twins): rms(twin - truth) / rms(re-rounded twin - twin)
    parameter_ratio: float | None = None  # None: not run (no truth or no float64 twin)
    parameter_bound: float | None = None
    parameter_contexts: int = 0

    def to_dict(self) -> dict:
        """JSON-ready: non-finite numbers (from NaN/inf outputs) become ``None``."""
        return {
            k: (None if isinstance(v, float) and not np.isfinite(v) else v)
            for k, v in asdict(self).items()
        }

    def format(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"verification {verdict}: {self.candidate} vs {self.reference}",
            f"  checked    {self.coverage}",
            f"  verdict    {self.reason}",
            f"  criterion  {CRITERION_TEXT[self.criterion]}",
            f"  logits     max |diff| {self.max_abs_logit_error:.3g}"
            f"  mean {self.mean_abs_logit_error:.3g}  max rel"
            f" {self.max_rel_logit_error:.3g} (floor {self.rel_floor:g})",
            f"  probs      max |diff| {self.max_abs_prob_error:.3g}",
            f"  argmax     {self.argmax_agreement:.6%} agree"
            f" ({self.argmax_disagreements:,} disagreements: {self.near_ties:,} near-ties,"
            f" {self.flips:,} flips); smallest top-1/top-2 gap"
            f" {self.min_top2_gap:.3g}",
        ]
        if self.float64_reference is not None:
            lines.append(
                f"  vs float64 reference {self.reference_vs_float64:.3g}, candidate"
                f" {self.candidate_vs_float64:.3g}  (float64 truth: {self.float64_reference})"
            )
        else:
            lines.append(
                "  vs float64 not available (give the BatchNorm checkpoint as --float64-reference)"
            )
        if self.parameter_ratio is not None:
            lines.append(
                f"  parameters float64 twin off the truth by {self.parameter_ratio:.3g}x what one"
                f" more float32 rounding of every parameter moves it (bound"
                f" {self.parameter_bound:g}; {self.parameter_contexts:,} contexts)"
            )
        if self.nonfinite:
            lines.append(f"  NON-FINITE outputs on {self.nonfinite:,} contexts")
        lines.append(f"  took {self.seconds:.2f} s")
        return "\n".join(lines)


def _as_predictor(x: Predictor | str | Path) -> Predictor:
    return x if isinstance(x, Predictor) else load_predictor(x)


def _label(p: Predictor) -> str:
    return str(p.path)


def resolve_float64(
    reference: Predictor,
    candidate: Predictor,
    float64_reference: Checkpoint | str | Path | None,
) -> Float64Model | None:
    """Find the unfolded BN network for the float64 ground truth (see module docstring)."""
    if isinstance(float64_reference, Checkpoint):
        return Float64Model.from_checkpoint(float64_reference, "<in memory>")
    if float64_reference is not None:
        ckpt = load_checkpoint(float64_reference)
        return Float64Model.from_checkpoint(ckpt, str(float64_reference))
    sides = [p for p in (reference, candidate) if isinstance(p, TorchPredictor)]
    for p in sides:
        if p.checkpoint.config.batchnorm:
            return Float64Model.from_checkpoint(p.checkpoint, _label(p))
    for p in sides:
        src = p.checkpoint.meta.get("folded_from") or {}
        path = Path(src.get("path", ""))
        if src.get("path") and path.is_file() and file_sha256(path) == src.get("sha256"):
            return Float64Model.from_checkpoint(load_checkpoint(path), str(path))
    for p in (reference, candidate):  # e.g. bn.onnx: its graph run in double
        found = Float64Model.from_predictor(p)
        if found is not None:
            return found
    # Two folded networks: the reference's own parameters in float64 are the function it
    # stands for, so the candidate is judged against them (its parameters may differ from
    # the reference's by a re-rounding or two: a correct fold's twin ratio stays below 3).
    return Float64Model.from_predictor(reference, folded=True)


def split_contexts(
    data_path: str | Path, block_size: int, expected_sha256: str | None = None
) -> np.ndarray | None:
    """Every dev and test context of a words file, or ``None`` when the file is missing or
    is not the one the model was trained on (sha256 differs)."""
    p = Path(data_path)
    if not p.is_file():
        return None
    words, sha256 = read_words_and_sha256(p)  # one read: the words and the file's hash
    if expected_sha256 and sha256 != expected_sha256:
        return None
    data = dataset_from_words(words, sha256, p, block_size)
    return np.concatenate([data.splits["dev"][0].numpy(), data.splits["test"][0].numpy()])


def dev_test_contexts(
    vocab_size: int,
    block_size: int,
    data_path: str | Path | None,
    max_exhaustive: int,
    expected_sha256: str | None,
) -> np.ndarray | None:
    """Every dev/test context of ``data_path`` when the domain (``vocab_size **
    block_size``) is too large to check exhaustively and the file is the one the model was
    trained on (``expected_sha256``, when recorded), else ``None``: what joins the random
    sample of a verdict."""
    if data_path is None or vocab_size**block_size <= max_exhaustive:
        return None
    return split_contexts(data_path, block_size, expected_sha256)


def _check_same_family(ref: Predictor, cand: Predictor, f64: Float64Model | None) -> None:
    for other, label in [(cand, _label(cand))] + ([(f64, f64.source)] if f64 else []):
        if other.vocab.chars != ref.vocab.chars or other.block_size != ref.block_size:
            raise BnfoldError(
                f"{label} and {_label(ref)} are not comparable: different vocabulary or"
                " block size (they were not trained on the same data/config)"
            )


def verify(
    reference: Predictor | str | Path,
    candidate: Predictor | str | Path,
    *,
    tolerance: float | None = None,
    rel_floor: float = DEFAULT_REL_FLOOR,
    max_exhaustive: int = DEFAULT_MAX_EXHAUSTIVE,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    extra_contexts: np.ndarray | None = None,
    extra_label: str = "dev/test",
    float64_reference: Checkpoint | str | Path | None = None,
    use_float64: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    threads: int | None = 1,
    progress: bool = False,
) -> VerifyReport:
    """Compare ``candidate`` with ``reference`` over the whole input domain (or a sample).

    The verdict is :mod:`bnfold.verify.rounding`'s: with a float64 truth, the candidate may be off
    the truth by at most what the reference's own float32 error explains; without one, by
    a bound derived from the logits' magnitude.

    Args:
        reference, candidate: predictors or paths (``.pt`` / ``.onnx``).
        tolerance: explicit absolute override: largest allowed |logit difference|
            (criterion "absolute"); ``None`` (default) uses the float32 rounding criterion.
        rel_floor: relative error is ``|diff| / max(|reference logit|, rel_floor)``.
        max_exhaustive: check every context when the domain has at most this many.
        sample_size, seed: otherwise check this many uniform random contexts (seeded)...
        extra_contexts: ...plus these (e.g. every dev/test context), shape (n, block_size).
        float64_reference: the BN checkpoint (or its path) for the float64 ground truth;
            by default found automatically (see module docstring).
        use_float64: set False to skip the float64 comparison altogether.
        chunk_size: contexts per forward pass (bounds memory).
        threads: torch intra-op threads while verifying (restored afterwards). One thread
            is the default: on a shared 2-core CPU it is ~2x faster than two and makes the
            torch side's float32 reduction order fixed. ``None`` leaves the setting alone.
        progress: print progress and the time left to stderr on long (sampled) runs.
    """
    if tolerance is not None and not tolerance >= 0:
        raise BnfoldError(f"tolerance must be >= 0, got {tolerance}")
    if not rel_floor > 0:
        raise BnfoldError(f"rel_floor must be > 0, got {rel_floor}")
    ref, cand = _as_predictor(reference), _as_predictor(candidate)
    f64 = resolve_float64(ref, cand, float64_reference) if use_float64 else None
    _check_same_family(ref, cand, f64)
    plan = plan_domain(
        ref.vocab.size,
        ref.block_size,
        max_exhaustive=max_exhaustive,
        sample_size=sample_size,
        seed=seed,
        extra=extra_contexts,
        extra_label=extra_label,
    )
    with torch_threads(threads):
        comparison = compare_over_domain(
            {"reference": ref, "candidate": cand},
            [("reference", "candidate")],
            plan,
            float64_logits=f64.logits if f64 else None,
            tolerance=tolerance,
            rel_floor=rel_floor,
            chunk_size=chunk_size,
            progress=progress,
            label="verify",
        )
    return report_from_pair(
        comparison.pairs[("reference", "candidate")],
        plan,
        reference=_label(ref),
        candidate=_label(cand),
        float64_source=f64.source if f64 else None,
        seconds=comparison.seconds,
    )


def report_from_pair(
    s: PairStats,
    plan: DomainPlan,
    *,
    reference: str,
    candidate: str,
    float64_source: str | None,
    seconds: float,
) -> VerifyReport:
    """The :class:`VerifyReport` of one pair a :func:`compare_over_domain` walk judged."""
    v = s.verdict()
    n, V = s.n, plan.vocab_size
    return VerifyReport(
        reference=reference,
        candidate=candidate,
        domain_size=plan.domain_size,
        contexts_checked=n,
        exhaustive=plan.exhaustive,
        coverage=plan.coverage,
        max_abs_logit_error=s.max_abs,
        mean_abs_logit_error=s.sum_abs / (n * V) if n else 0.0,
        max_rel_logit_error=s.max_rel,
        rel_floor=s.rel_floor,
        max_abs_prob_error=s.max_prob,
        argmax_agreement=1 - s.disagree / n if n else 1.0,
        argmax_disagreements=s.disagree,
        near_ties=v.near_ties,
        flips=v.flips,
        min_top2_gap=float(s.min_gap),
        min_top2_gap_context=s.gap_ctx,
        worst_context=s.worst_ctx,
        float64_reference=float64_source,
        reference_vs_float64=v.reference_error if float64_source else None,
        candidate_vs_float64=v.candidate_error if float64_source else None,
        nonfinite=s.nonfinite,
        tolerance=s.rounding.tolerance,
        criterion=v.criterion,
        bound=v.bound,
        margin=v.margin,
        reason=v.reason,
        passed=v.passed,
        seconds=seconds,
        parameter_ratio=v.twin_ratio,
        parameter_bound=TWIN_MULTIPLE if v.twin_ratio is not None else None,
        parameter_contexts=v.twin_contexts,
    )


def verify_paths(
    reference: str | Path,
    candidate: str | Path,
    *,
    data_path: str | Path | None = None,
    **options,
) -> VerifyReport:
    """:func:`verify` on two files (``.pt``/``.onnx``). When the domain is too large for
    an exhaustive check, every dev/test context of ``data_path`` joins the random sample,
    provided the file is the one a checkpoint side records (sha256) or no side records one.
    """
    ref, cand = load_predictor(reference), load_predictor(candidate)
    shas = [
        p.checkpoint.meta.get("data_sha256")
        for p in (ref, cand)
        if isinstance(p, TorchPredictor) and p.checkpoint.meta.get("data_sha256")
    ]
    limit = options.get("max_exhaustive", DEFAULT_MAX_EXHAUSTIVE)
    extra = dev_test_contexts(
        ref.vocab.size, ref.block_size, data_path, limit, shas[0] if shas else None
    )
    if extra is not None:
        options.setdefault("extra_contexts", extra)
        options.setdefault("extra_label", f"dev/test ({Path(data_path).name})")
    return verify(ref, cand, **options)
