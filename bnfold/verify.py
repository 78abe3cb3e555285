"""Prove that a candidate model (e.g. the folded checkpoint, later its ONNX export) computes
the same function as a reference (the BatchNorm checkpoint) in eval mode.

The input domain of a character MLP is finite: every context is one of
``vocab_size ** block_size`` id tuples (19,683 for the default 27^3). Whenever that is at
most ``max_exhaustive`` (default 4 million), *every* context is checked, so the verdict is
a proof over the whole domain, not a sample. Above that, a large seeded uniform sample plus
every dev/test context (when given) is checked, and the report says so.

Both models are reached through :class:`~bnfold.infer.Predictor` (``.pt`` via torch,
``.onnx`` via ONNX Runtime). Optionally a float64 evaluation of the *unfolded* BatchNorm
network is the ground truth, so the report shows each model's own error against exact
arithmetic: whether folding added anything beyond float32 rounding. The float64 reference
comes from, in order: an explicit ``float64_reference`` BN checkpoint; whichever side is
itself a BN ``.pt`` checkpoint; the ``folded_from`` source recorded in a folded
checkpoint's metadata (if that file still exists with the same sha256). Otherwise the
report says none was available.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bnfold.checkpoint import Checkpoint, load_checkpoint
from bnfold.data import file_sha256
from bnfold.errors import BnfoldError
from bnfold.infer import Predictor, TorchPredictor, load_predictor

DEFAULT_TOLERANCE = 1e-5
DEFAULT_REL_FLOOR = 1.0
DEFAULT_MAX_EXHAUSTIVE = 4_000_000
DEFAULT_SAMPLE_SIZE = 1_000_000
DEFAULT_CHUNK = 32_768


class Float64Model:
    """The unfolded BatchNorm network evaluated in float64, eval mode."""

    def __init__(self, ckpt: Checkpoint, source: str):
        if not ckpt.config.batchnorm:
            raise BnfoldError(
                f"{source}: the float64 reference must be the unfolded BatchNorm checkpoint"
                " (this one is already folded)"
            )
        self.source = source
        self.vocab = ckpt.vocab
        self.block_size = ckpt.config.block_size
        self.model = copy.deepcopy(ckpt.model).double().eval()

    @torch.inference_mode()
    def logits(self, contexts: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(contexts)).numpy()


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
    min_top2_gap: float  # smallest top-1 minus top-2 logit of the reference
    min_top2_gap_context: list[int]
    worst_context: list[int]  # a context with the largest logit error
    float64_reference: str | None  # where the float64 ground truth came from
    reference_vs_float64: float | None  # max |logit - float64 logit|
    candidate_vs_float64: float | None
    nonfinite: int  # contexts where either model produced NaN/inf
    tolerance: float
    passed: bool
    seconds: float

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
            f"  logits     max |diff| {self.max_abs_logit_error:.3g}  (tolerance"
            f" {self.tolerance:.3g})  mean {self.mean_abs_logit_error:.3g}  max rel"
            f" {self.max_rel_logit_error:.3g} (floor {self.rel_floor:g})",
            f"  probs      max |diff| {self.max_abs_prob_error:.3g}",
            f"  argmax     {self.argmax_agreement:.6%} agree"
            f" ({self.argmax_disagreements:,} disagreements); smallest top-1/top-2 gap"
            f" {self.min_top2_gap:.3g}",
        ]
        if self.float64_reference is not None:
            lines.append(
                f"  vs float64 reference {self.reference_vs_float64:.3g}, candidate"
                f" {self.candidate_vs_float64:.3g}  (BN network in float64 from"
                f" {self.float64_reference})"
            )
        else:
            lines.append(
                "  vs float64 not available (give the BatchNorm checkpoint as --float64-reference)"
            )
        if self.nonfinite:
            lines.append(f"  NON-FINITE outputs on {self.nonfinite:,} contexts")
        lines.append(f"  took {self.seconds:.2f} s")
        return "\n".join(lines)


def all_contexts(vocab_size: int, block_size: int, start: int = 0, stop: int | None = None):
    """Contexts number ``start..stop`` of the domain, in lexicographic order, (n, T) int64."""
    total = vocab_size**block_size
    stop = total if stop is None else min(stop, total)
    idx = np.arange(start, stop, dtype=np.int64)
    cols = []
    for _ in range(block_size):
        cols.append(idx % vocab_size)
        idx = idx // vocab_size
    return np.stack(cols[::-1], axis=1) if cols else np.zeros((stop - start, 0), np.int64)


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
        return Float64Model(float64_reference, "<in memory>")
    if float64_reference is not None:
        return Float64Model(load_checkpoint(float64_reference), str(float64_reference))
    sides = [p for p in (reference, candidate) if isinstance(p, TorchPredictor)]
    for p in sides:
        if p.checkpoint.config.batchnorm:
            return Float64Model(p.checkpoint, _label(p))
    for p in sides:
        src = p.checkpoint.meta.get("folded_from") or {}
        path = Path(src.get("path", ""))
        if src.get("path") and path.is_file() and file_sha256(path) == src.get("sha256"):
            return Float64Model(load_checkpoint(path), str(path))
    return None


def _softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _nanmax_abs(d: np.ndarray) -> float:
    return float(np.nan_to_num(np.abs(d), nan=np.inf).max())


def split_contexts(
    data_path: str | Path, block_size: int, expected_sha256: str | None = None
) -> np.ndarray | None:
    """Every dev and test context of a words file, or ``None`` when the file is missing or
    is not the one the model was trained on (sha256 differs)."""
    from bnfold.data import load_dataset

    p = Path(data_path)
    if not p.is_file() or (expected_sha256 and file_sha256(p) != expected_sha256):
        return None
    data = load_dataset(p, block_size)
    return np.concatenate([data.splits["dev"][0].numpy(), data.splits["test"][0].numpy()])


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
    tolerance: float = DEFAULT_TOLERANCE,
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
) -> VerifyReport:
    """Compare ``candidate`` with ``reference`` over the whole input domain (or a sample).

    Args:
        reference, candidate: predictors or paths (``.pt`` / ``.onnx``).
        tolerance: largest allowed absolute logit difference (the verdict).
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
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _verify(
            reference,
            candidate,
            tolerance=tolerance,
            rel_floor=rel_floor,
            max_exhaustive=max_exhaustive,
            sample_size=sample_size,
            seed=seed,
            extra_contexts=extra_contexts,
            extra_label=extra_label,
            float64_reference=float64_reference,
            use_float64=use_float64,
            chunk_size=chunk_size,
        )
    finally:
        torch.set_num_threads(before)


def _verify(
    reference,
    candidate,
    *,
    tolerance,
    rel_floor,
    max_exhaustive,
    sample_size,
    seed,
    extra_contexts,
    extra_label,
    float64_reference,
    use_float64,
    chunk_size,
) -> VerifyReport:
    if not tolerance >= 0:
        raise BnfoldError(f"tolerance must be >= 0, got {tolerance}")
    if not rel_floor > 0:
        raise BnfoldError(f"rel_floor must be > 0, got {rel_floor}")
    t0 = time.perf_counter()
    ref, cand = _as_predictor(reference), _as_predictor(candidate)
    f64 = resolve_float64(ref, cand, float64_reference) if use_float64 else None
    _check_same_family(ref, cand, f64)
    V, T = ref.vocab.size, ref.block_size
    domain = V**T
    exhaustive = domain <= max_exhaustive
    if exhaustive:
        n_total = domain
        coverage = f"all {V}^{T} = {domain:,} contexts (exhaustive)"

        def chunks():
            for s in range(0, domain, chunk_size):
                yield all_contexts(V, T, s, s + chunk_size)
    else:
        rng = np.random.default_rng(seed)
        extra = (
            np.zeros((0, T), np.int64)
            if extra_contexts is None
            else np.asarray(extra_contexts, dtype=np.int64).reshape(-1, T)
        )
        n_total = sample_size + len(extra)
        coverage = (
            f"{sample_size:,} uniform random contexts (seed {seed}) of {domain:,}"
            + (f" + all {len(extra):,} {extra_label} contexts" if len(extra) else "")
            + " (sampled, not exhaustive)"
        )

        def chunks():
            for s in range(0, sample_size, chunk_size):
                yield rng.integers(0, V, size=(min(chunk_size, sample_size - s), T))
            for s in range(0, len(extra), chunk_size):
                yield extra[s : s + chunk_size]

    max_abs = sum_abs = max_rel = max_prob = 0.0
    disagree = nonfinite = n = 0
    min_gap, gap_ctx, worst_ctx = np.inf, [], []
    ref64_err = cand64_err = 0.0
    for ctx in chunks():
        if len(ctx) == 0:
            continue
        a = np.asarray(ref.logits(ctx), dtype=np.float32)
        b = np.asarray(cand.logits(ctx), dtype=np.float32)
        if a.shape != (len(ctx), V) or b.shape != a.shape:
            raise BnfoldError(
                f"model output shapes {a.shape} and {b.shape} differ from ({len(ctx)}, {V})"
            )
        bad = ~(np.isfinite(a).all(1) & np.isfinite(b).all(1))
        nonfinite += int(bad.sum())
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        diff[bad] = np.inf
        row_max = diff.max(1)
        i = int(row_max.argmax())
        if row_max[i] > max_abs or not worst_ctx:
            max_abs, worst_ctx = float(row_max[i]), ctx[i].tolist()
        sum_abs += float(diff.sum())
        max_rel = max(max_rel, float((diff / np.maximum(np.abs(a), rel_floor)).max()))
        with np.errstate(invalid="ignore", over="ignore"):
            pdiff = np.abs(_softmax64(a) - _softmax64(b))
        max_prob = max(max_prob, float(np.nan_to_num(pdiff, nan=np.inf).max()))
        disagree += int((a.argmax(1) != b.argmax(1)).sum())
        top2 = np.partition(a, V - 2, axis=1)[:, V - 2 :]
        gaps = top2[:, 1].astype(np.float64) - top2[:, 0]
        j = int(gaps.argmin())
        if gaps[j] < min_gap:
            min_gap, gap_ctx = float(gaps[j]), ctx[j].tolist()
        if f64 is not None:
            z = f64.logits(ctx)
            ref64_err = max(ref64_err, _nanmax_abs(a - z))
            cand64_err = max(cand64_err, _nanmax_abs(b - z))
        n += len(ctx)
    if n != n_total:  # defensive: the chunking above must cover everything it claims
        raise BnfoldError(f"internal error: checked {n} contexts, expected {n_total}")
    passed = bool(nonfinite == 0 and max_abs <= tolerance)
    return VerifyReport(
        reference=_label(ref),
        candidate=_label(cand),
        domain_size=domain,
        contexts_checked=n,
        exhaustive=exhaustive,
        coverage=coverage,
        max_abs_logit_error=max_abs,
        mean_abs_logit_error=sum_abs / (n * V) if n else 0.0,
        max_rel_logit_error=max_rel,
        rel_floor=rel_floor,
        max_abs_prob_error=max_prob,
        argmax_agreement=1 - disagree / n if n else 1.0,
        argmax_disagreements=disagree,
        min_top2_gap=float(min_gap),
        min_top2_gap_context=gap_ctx,
        worst_context=worst_ctx,
        float64_reference=f64.source if f64 else None,
        reference_vs_float64=ref64_err if f64 else None,
        candidate_vs_float64=cand64_err if f64 else None,
        nonfinite=nonfinite,
        tolerance=tolerance,
        passed=passed,
        seconds=round(time.perf_counter() - t0, 4),
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
    domain = ref.vocab.size**ref.block_size
    if data_path is not None and domain > options.get("max_exhaustive", DEFAULT_MAX_EXHAUSTIVE):
        shas = [
            p.checkpoint.meta.get("data_sha256")
            for p in (ref, cand)
            if isinstance(p, TorchPredictor) and p.checkpoint.meta.get("data_sha256")
        ]
        extra = split_contexts(data_path, ref.block_size, shas[0] if shas else None)
        if extra is not None:
            options.setdefault("extra_contexts", extra)
            options.setdefault("extra_label", f"dev/test ({Path(data_path).name})")
    return verify(ref, cand, **options)
