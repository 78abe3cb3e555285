"""The input domain of a character MLP, and the one comparator that walks it.

Every context is one of ``vocab_size ** block_size`` id tuples. :func:`plan_domain` decides
what is checked: the whole domain when it is small enough (a proof, not a sample), else a
seeded uniform sample plus given extra contexts (e.g. every dev/test context).

:func:`compare_over_domain` evaluates each network (and the float64 truth) *once* per chunk
and feeds every requested pair's statistics and float32-aware verdict
(:mod:`bnfold.verify.rounding`) from those outputs, so ``verify``, ``export``, ``bench`` and the
main job walk the domain once for all the pairs they need.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.runtime.predictor import Predictor
from bnfold.runtime.twins import Float64Twin, rerounded_copies
from bnfold.verify.rounding import RoundingAccumulator, RoundingVerdict

DEFAULT_MAX_EXHAUSTIVE = 4_000_000
DEFAULT_SAMPLE_SIZE = 1_000_000
# A sample this large takes ~10 minutes per pair on one core (~150k contexts/s for two
# small MLPs); a 10**12 request would run for days, so it is refused up front.
MAX_SAMPLE_SIZE = 100_000_000
DEFAULT_CHUNK = 32_768
TWIN_CONTEXTS = 10_000  # contexts for the parameter test (float64 twins)


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


@dataclass(frozen=True)
class DomainPlan:
    """What a comparison checks: the whole domain, or a seeded sample plus extra contexts."""

    vocab_size: int
    block_size: int
    exhaustive: bool
    total: int  # number of contexts that will be checked
    coverage: str  # human description
    sample_size: int = 0
    seed: int = 0
    extra: np.ndarray | None = field(default=None, repr=False)

    @property
    def domain_size(self) -> int:
        return self.vocab_size**self.block_size

    def chunks(self, chunk_size: int = DEFAULT_CHUNK) -> Iterator[np.ndarray]:
        """The checked contexts, ``chunk_size`` at a time (same order on every call)."""
        V, T = self.vocab_size, self.block_size
        if self.exhaustive:
            for s in range(0, self.domain_size, chunk_size):
                yield all_contexts(V, T, s, s + chunk_size)
            return
        rng = np.random.default_rng(self.seed)
        for s in range(0, self.sample_size, chunk_size):
            yield rng.integers(0, V, size=(min(chunk_size, self.sample_size - s), T))
        extra = self.extra if self.extra is not None else np.zeros((0, T), np.int64)
        for s in range(0, len(extra), chunk_size):
            yield extra[s : s + chunk_size]


def plan_domain(
    vocab_size: int,
    block_size: int,
    *,
    max_exhaustive: int = DEFAULT_MAX_EXHAUSTIVE,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    extra: np.ndarray | None = None,
    extra_label: str = "dev/test",
) -> DomainPlan:
    """Every context when ``vocab_size ** block_size <= max_exhaustive``, else
    ``sample_size`` seeded uniform ones plus ``extra`` (shape (n, block_size))."""
    domain = vocab_size**block_size
    if domain <= max_exhaustive:
        return DomainPlan(
            vocab_size,
            block_size,
            True,
            domain,
            f"all {vocab_size}^{block_size} = {domain:,} contexts (exhaustive)",
        )
    if sample_size > MAX_SAMPLE_SIZE:
        raise BnfoldError(
            f"--sample-size {sample_size:,} is more than {MAX_SAMPLE_SIZE:,} contexts (about"
            f" {sample_size / 150_000 / 3600:,.0f} hours per pair on one core); use at most"
            f" {MAX_SAMPLE_SIZE:,}"
        )
    extra = (
        np.zeros((0, block_size), np.int64)
        if extra is None
        else np.asarray(extra, dtype=np.int64).reshape(-1, block_size)
    )
    coverage = (
        f"{sample_size:,} uniform random contexts (seed {seed}) of {domain:,}"
        + (f" + all {len(extra):,} {extra_label} contexts" if len(extra) else "")
        + " (sampled, not exhaustive)"
    )
    return DomainPlan(
        vocab_size,
        block_size,
        False,
        sample_size + len(extra),
        coverage,
        sample_size=sample_size,
        seed=seed,
        extra=extra,
    )


class PairStats:
    """Running statistics of one (reference, candidate) pair over the checked contexts."""

    def __init__(self, reference: str, candidate: str, tolerance: float | None, rel_floor: float):
        self.reference, self.candidate = reference, candidate
        self.rel_floor = rel_floor
        self.rounding = RoundingAccumulator(tolerance=tolerance, class_axis=-1)
        self.max_abs = self.sum_abs = self.max_rel = self.max_prob = 0.0
        self.disagree = self.nonfinite = self.n = 0
        self.min_gap, self.gap_ctx, self.worst_ctx = np.inf, [], []

    def add(self, ctx: np.ndarray, a: np.ndarray, b: np.ndarray, z: np.ndarray | None) -> None:
        V = a.shape[1]
        self.rounding.add(a, b, z)
        bad = ~(np.isfinite(a).all(1) & np.isfinite(b).all(1))
        self.nonfinite += int(bad.sum())
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        diff[bad] = np.inf
        row_max = diff.max(1)
        i = int(row_max.argmax())
        if row_max[i] > self.max_abs or not self.worst_ctx:
            self.max_abs, self.worst_ctx = float(row_max[i]), ctx[i].tolist()
        self.sum_abs += float(diff.sum())
        rel = diff / np.maximum(np.abs(a), self.rel_floor)
        self.max_rel = max(self.max_rel, float(rel.max()))
        with np.errstate(invalid="ignore", over="ignore"):
            pdiff = np.abs(_softmax64(a) - _softmax64(b))
        self.max_prob = max(self.max_prob, float(np.nan_to_num(pdiff, nan=np.inf).max()))
        self.disagree += int((a.argmax(1) != b.argmax(1)).sum())
        if V > 1:
            top2 = np.partition(a, V - 2, axis=1)[:, V - 2 :]
            gaps = top2[:, 1].astype(np.float64) - top2[:, 0]
            j = int(gaps.argmin())
            if gaps[j] < self.min_gap:
                self.min_gap, self.gap_ctx = float(gaps[j]), ctx[j].tolist()
        self.n += len(ctx)

    def add_twin(self, z: np.ndarray, twin: np.ndarray, rerounded: list[np.ndarray]) -> None:
        self.rounding.add_twin(z, twin, rerounded)

    def verdict(self) -> RoundingVerdict:
        return self.rounding.verdict()


@dataclass
class DomainComparison:
    """What :func:`compare_over_domain` found: per pair statistics, per network float64 error."""

    plan: DomainPlan
    pairs: dict[tuple[str, str], PairStats]
    float64_error: dict[str, float] | None  # max |logit - float64 truth| per network
    contexts: int
    seconds: float


def _softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def compare_over_domain(
    nets: dict[str, object],
    pairs: list[tuple[str, str]],
    plan: DomainPlan,
    *,
    float64_logits: Callable[[np.ndarray], np.ndarray] | None = None,
    twins: dict[str, Float64Twin | None] | None = None,
    twin_contexts: int = TWIN_CONTEXTS,
    tolerance: float | None = None,
    rel_floor: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = False,
    label: str = "comparing",
) -> DomainComparison:
    """Walk ``plan`` once: each network of ``nets`` (objects with ``logits(contexts)``) and
    ``float64_logits`` (the truth, optional) are evaluated once per chunk, and every pair
    ``(reference, candidate)`` of ``pairs`` is judged from those outputs.

    With the truth, every pair whose candidate has a float64 twin also gets the parameter
    test (:mod:`bnfold.runtime.twins`): ``twins`` maps names to twins; by default each candidate
    that is a :class:`~bnfold.runtime.predictor.Predictor` is asked for its own. The twin and its
    re-rounded copies are evaluated on an evenly spread subset of at most ``twin_contexts``
    contexts: the test is about the whole function, and on 10,000 contexts the two-copy
    yardstick varies by about 1% from one pair of seeds to another (1.1% over five pairs
    on the shipped model; one copy alone: 2.4%).

    ``progress`` prints the share done and an estimate of the time left to stderr (for
    sampled domains large enough to take a while).
    """
    t0 = time.perf_counter()
    used = list(dict.fromkeys(name for pair in pairs for name in pair))
    for name in used:
        if name not in nets:
            raise BnfoldError(f"internal error: no network named {name!r} to compare")
    stats = {p: PairStats(p[0], p[1], tolerance, rel_floor) for p in pairs}
    f64 = dict.fromkeys(used, 0.0) if float64_logits is not None else None
    judged = {}
    if float64_logits is not None and tolerance is None:  # the parameter test judges
        judged = _twins_to_judge(nets, pairs, twins)
    twin_test = _TwinTest(judged, plan.total, twin_contexts)
    eta = _Eta(label, plan.total, t0) if progress else None
    n = 0
    for ctx in plan.chunks(chunk_size):
        if len(ctx) == 0:
            continue
        out = {name: _logits(name, nets[name], ctx, plan.vocab_size) for name in used}
        z = float64_logits(ctx) if float64_logits is not None else None
        for (a, b), s in stats.items():
            s.add(ctx, out[a], out[b], z)
        twin_test.add(stats, ctx, z, n)
        if f64 is not None:
            for name in used:
                d = np.nan_to_num(np.abs(out[name] - z), nan=np.inf)
                f64[name] = max(f64[name], float(d.max()))
        n += len(ctx)
        if eta is not None:
            eta.tick(n)
    if n != plan.total:  # defensive: the chunking must cover everything it claims
        raise BnfoldError(f"internal error: checked {n} contexts, expected {plan.total}")
    return DomainComparison(plan, stats, f64, n, round(time.perf_counter() - t0, 4))


def _logits(name: str, net, ctx: np.ndarray, vocab_size: int) -> np.ndarray:
    """``net``'s float32 logits on ``ctx``; a ``BnfoldError`` unless shaped (n, vocab)."""
    y = np.asarray(net.logits(ctx), dtype=np.float32)
    if y.shape != (len(ctx), vocab_size):
        raise BnfoldError(f"{name}: output shape {y.shape}, expected ({len(ctx)}, {vocab_size})")
    return y


def _twins_to_judge(
    nets: dict[str, object],
    pairs: list[tuple[str, str]],
    twins: dict[str, Float64Twin | None] | None,
) -> dict[str, Float64Twin]:
    """The candidates that get the parameter test, with their float64 twins: those of
    ``twins`` (default: each candidate that is a Predictor, asked for its own) that are not
    None."""
    candidates = dict.fromkeys(b for _, b in pairs)
    if twins is None:
        twins = {k: nets[k].float64_twin() for k in candidates if isinstance(nets[k], Predictor)}
    return {k: t for k, t in twins.items() if t is not None and k in candidates}


class _TwinTest:
    """The parameter test's share of the walk: each judged twin and its re-rounded copies
    evaluated on every ``stride``-th checked context, at most ``twin_contexts`` in all
    (an evenly spread subset, the same whatever the chunk size)."""

    def __init__(self, twins: dict[str, Float64Twin], total: int, twin_contexts: int):
        self.twins = twins
        self.rerounded = {k: rerounded_copies(t) for k, t in twins.items()}
        self.stride = -(-total // twin_contexts) if twins else 0

    def add(self, stats: dict, ctx: np.ndarray, z: np.ndarray | None, start: int) -> None:
        """Feed the pairs judged by a twin; ``start``: the index of ``ctx[0]`` in the walk."""
        if not self.twins:
            return
        rows = np.flatnonzero((np.arange(start, start + len(ctx)) % self.stride) == 0)
        if not len(rows):
            return
        sub = ctx[rows]
        out = {
            k: (t.logits(sub), [r.logits(sub) for r in self.rerounded[k]])
            for k, t in self.twins.items()
        }
        for (_, b), s in stats.items():
            if b in out:
                s.add_twin(z[rows], *out[b])


class _Eta:
    """The share done and an estimate of the time left, on stderr, every 5 s at most."""

    def __init__(self, label: str, total: int, t0: float):
        self.label, self.total, self.t0, self.last = label, total, t0, t0

    def tick(self, n: int) -> None:
        now = time.perf_counter()
        if now - self.last <= 5:
            return
        self.last = now
        left = (self.total - n) / (n / (now - self.t0))
        print(
            f"{self.label}: {n:,}/{self.total:,} contexts ({n / self.total:.0%}),"
            f" about {left:,.0f} s left",
            file=sys.stderr,
            flush=True,
        )
