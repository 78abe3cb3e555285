"""The one rounding-aware verdict: is the difference between two networks' outputs what
the rounding of their dtype (float32, float16 or bfloat16) explains?

Every place bnfold says "equivalent" (``bnfold verify``, ``fold``, ``train-fold``, the ONNX
Runtime check of ``export``, the diagnostics' BN-vs-folded figure) asks this module. It is
pure numpy and knows nothing about models: it judges arrays of outputs.

Three criteria, chosen by what is available:

``float64`` (a float64 evaluation ``z`` of the reference network is given)
    Both float32 networks are judged against the truth ``z``. Let ``R = max |ref - z|`` be
    the reference network's own float32 error over everything checked, ``Q = rms(ref - z)``
    its root-mean-square, ``S = max |z|`` the logits' magnitude and ``u = 2**-24`` float32's
    unit roundoff. The candidate's float32 outputs must satisfy both::

        max |cand - z| <= K * R + F * u * S      (K = 4, F = 4)     worst element
        rms(cand - z)  <= G * Q + u * rms(z)     (G = 3)            all elements together

    and, when the candidate has a float64 twin (:mod:`bnfold.runtime.twins`: its own float32
    parameters evaluated in float64), the *parameter test*::

        rms(twin - z) <= P * rms(rerounded twin - twin)      (P = 3)

    Why ``K = 4`` and ``G = 3``: a correct fold is *another float32 evaluation of the same
    real function* (the folded weights ``W * gamma / sigma`` carry one extra rounding each,
    the BatchNorm arithmetic is gone), so its errors are samples from a distribution of the
    same size as the reference's: over the 21 models of ``benchmarks/verify_matrix.py`` the
    candidate/reference ratio of the maxima is 0.8-1.3 and of the RMS 0.95-1.09 (bnfold's
    fold and torch's ``fuse_linear_bn_eval``). ``K`` and ``G`` leave 3x room above that, so
    float32 noise never rejects a correct fold (the bug this module fixes), and they catch
    every large error (a swapped row, a forgotten beta, a wrong variance). ``F * u * S`` is
    a floor for a reference that happens to be (nearly) exact: storing the output in float32
    alone costs up to ``u * S``; ``u * rms(z)`` is the same for the RMS.

    Why the parameter test, and ``P = 3``: float32 outputs cannot see an error the size of
    their own rounding, and a fold with a slightly wrong eps is exactly that (where the
    running variance is ~1e3, eps 1e-3 instead of 1e-5 moves a layer's scale by ~5e-7: the
    candidate/reference RMS ratio is then ~1.3 to 2.5). The twin has no arithmetic rounding,
    so its distance from the truth is what the candidate's *parameters* get wrong, and the
    yardstick is what one more float32 rounding of every parameter does (two re-rounded
    copies, seeded). bnfold's fold (one cast per weight) measures 0.7-1.0 of it, torch's
    float32 fold (two or three roundings per weight, partly shared along a row) 1.1-1.7;
    ``P = 3`` leaves 1.8x above torch's. A wrong eps measures 1.5-230, a row scaled by
    1 + 1e-3 46-660: so all seven real errors fail in every model but one, where the wrong
    eps changes no weight by more than a couple of float32 spacings, as torch's correct fold
    does too: there the two are the same float32 network (``verify_matrix.txt``).

    Global statistics (maxima and RMS over the whole checked set) are used on purpose: they
    are stable (the maximum over ~1e6 elements barely moves between two correct
    evaluations), while per-element reference errors are often exactly 0 by luck.

    Without a BatchNorm network (two folded files), the reference's own twin is the truth:
    the candidate must then compute what the reference's parameters define, and the same
    three conditions apply (``bnfold.verify.verdict.resolve_float64``).

``magnitude`` (no float64 source, e.g. two ONNX files)
    Without a truth we cannot measure the rounding that is present, only bound it from
    magnitudes. Each row ``i`` gets::

        |cand - ref| <= M * u * max(s_i, 1)      (M = 256)

    where ``s_i`` is the row's logit scale (``max_j |ref_ij|``, the same for ``cand``). A
    float32 forward pass of an MLP of depth ``d`` and width ``n`` has a relative error of
    order ``d * sqrt(n) * u`` per layer output (random-walk accumulation of dot products
    of length ``n``), amplified by cancellations when ``sum |W||x|`` exceeds the logit;
    ``M = 256`` covers the matrix's depths (2-6) and widths (64-512) with room (correct
    folds use at most ~1/5 of it), but it is much coarser than ``float64``: the smaller
    injected errors (a wrong eps, a row scaled by 1 + 1e-3) pass it. It is the fallback for
    networks with no float64 evaluation at all (an ONNX operator without a double kernel in
    ONNX Runtime); the report says which criterion judged.

``absolute`` (an explicit ``tolerance``)
    ``|cand - ref| <= tolerance`` for every element: the user's override.

Other dtypes. Nothing above is specific to float32 except the unit roundoff ``u``: ``K``,
``G`` and ``P`` compare the candidate with the reference's *measured* error, whatever its
size. For a float16 or bfloat16 network (a ``.half()`` export, a converted deployment
graph) ``u`` is that dtype's: ``2**-11`` for float16 and ``2**-8`` for bfloat16 (their
10 and 7 stored fraction bits), ``2**-24`` for float32. It is taken from the outputs'
dtype (the coarser of reference and candidate), so a float16 graph is judged by float16
rounding in the floors ``F * u * S`` and ``u * rms(z)`` and in the magnitude bound: a fold
computed in float64 and cast once to float16 is another float16 evaluation of the same
function, exactly as in the float32 argument. The float64 truth must then be computed
from the half-precision parameters themselves (converted exactly to double), or ``R``
would be zero and nothing could pass.

Argmax: a row where the reference and candidate pick different top-1 classes is a
*near-tie* when the two chosen classes' truth logits (the reference's without a truth)
differ by at most twice the bound (each side may move by the bound), and a *flip*
otherwise. Near-ties are allowed and reported; a flip fails the verdict. Any non-finite
candidate output (where the reference is finite) fails it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2  # u = 2**-24
# Significand bits (stored fraction bits + 1) of each floating dtype: u = 2**-bits.
PRECISION_BITS = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}
FLOAT64_MULTIPLE = 4.0  # K: candidate error may be at most K x the reference's own error
FLOAT64_RMS_MULTIPLE = 3.0  # G: the same for the root-mean-square error
# The RMS criterion compares two RMS of rounding errors; over a handful of elements their
# ratio is noise (6 elements: above G once in a few hundred random Gemms), so it needs a
# population. Below it the maximum criterion judges alone.
FLOAT64_RMS_MIN_ELEMENTS = 64
FLOAT64_FLOOR_ULPS = 4.0  # F: floor, in units of u times the largest |truth| logit
TWIN_MULTIPLE = 3.0  # P: the candidate's parameters may be off by P x one re-rounding
MAGNITUDE_ULPS = 256.0  # M: allowed |cand - ref| in units of u times each row's scale


@dataclass(frozen=True)
class RoundingVerdict:
    passed: bool
    criterion: str  # "float64", "magnitude" or "absolute" (see module docstring)
    bound: float  # the largest allowed |error| that applied (max over elements)
    margin: float  # error / allowed error (float64: the larger of max and RMS); <= 1 passes
    max_abs_error: float  # max |candidate - reference|
    near_ties: int  # argmax disagreements inside the rounding bound (allowed)
    flips: int  # argmax disagreements outside it (a real flip fails)
    reason: str  # one human line: why it passed or failed
    reference_error: float | None = None  # max |reference - truth| (float64 criterion)
    candidate_error: float | None = None  # max |candidate - truth| (float64 criterion)
    nonfinite: int = 0  # rows where the candidate is non-finite but the reference is not
    elements: int = 0  # number of output elements judged
    # the parameter test (float64 twin, see the module docstring); None when not run
    twin_ratio: float | None = None  # rms(twin - truth) / rms(re-rounded twin - twin)
    twin_contexts: int = 0  # contexts the twin was evaluated on
    precision: str = "float32"  # the dtype whose unit roundoff the bounds use

    def to_dict(self) -> dict:
        """JSON-ready: non-finite floats become ``None``."""
        return {
            k: (None if isinstance(v, float) and not np.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def unit_roundoff(dtype) -> float:
    """``u`` of a floating dtype (numpy's, or ml_dtypes' bfloat16): half the distance from
    1 to the next number. Integer and unknown dtypes are judged as float32 (the outputs
    are compared as float64 numbers; float32 is the strictest half-precision-or-wider
    default that never rejects a float32 network)."""
    bits = PRECISION_BITS.get(np.dtype(dtype).name)
    return UNIT_ROUNDOFF if bits is None else 2.0**-bits


def precision_name(u: float) -> str:
    """The dtype whose unit roundoff is ``u`` (for the verdict's text)."""
    return next((k for k, b in PRECISION_BITS.items() if 2.0**-b == u), f"u={u:.3g}")


def float64_bound(reference_error: float, truth_scale: float, u: float = UNIT_ROUNDOFF) -> float:
    """Allowed max |candidate - truth| under the float64 criterion: ``K*R + F*u*S``."""
    return FLOAT64_MULTIPLE * reference_error + FLOAT64_FLOOR_ULPS * u * truth_scale


def magnitude_bounds(
    reference: np.ndarray, candidate: np.ndarray, class_axis: int, u: float = UNIT_ROUNDOFF
) -> np.ndarray:
    """Allowed |candidate - reference| per element under the magnitude criterion:
    ``M * u * max(row scale, 1)``, the row scale being the largest |logit| of either side,
    broadcastable against the outputs."""
    scale = np.maximum(np.abs(reference), np.abs(candidate))
    scale = np.where(np.isfinite(scale), scale, 0.0)
    row = np.max(scale, axis=class_axis, keepdims=True) if reference.ndim else scale
    return MAGNITUDE_ULPS * u * np.maximum(row, 1.0)


def _as_rows(x: np.ndarray, class_axis: int | None) -> np.ndarray:
    """(n, classes) float64 view with the class axis last; without one, (n, 1)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        return x.reshape(1, 1)
    if class_axis is None or x.ndim == 1:
        return x.reshape(len(x), -1) if x.ndim > 1 else x.reshape(-1, 1)
    x = np.moveaxis(x, class_axis, -1)
    return x.reshape(-1, x.shape[-1])


class RoundingAccumulator:
    """Judge outputs chunk by chunk (domains too large to hold at once); :meth:`verdict`
    returns exactly what :func:`judge_outputs` would on the concatenated chunks.

    The float64 bound depends on maxima over *all* chunks, so per-chunk state is a few
    running maxima plus, for rows whose argmax differs (rare for anything that passes),
    the truth/reference gap between the two chosen classes.
    """

    def __init__(self, *, tolerance: float | None = None, class_axis: int | None = -1):
        if tolerance is not None and not (np.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
        self.tolerance = tolerance
        self.class_axis = class_axis
        self.criterion: str | None = "absolute" if tolerance is not None else None
        self.max_abs = 0.0  # max |cand - ref|
        self.ref_err = 0.0  # max |ref - truth|
        self.cand_err = 0.0  # max |cand - truth|
        self.truth_scale = 0.0  # max |truth|
        self.ref_sq = 0.0  # sum of (ref - truth)**2
        self.cand_sq = 0.0  # sum of (cand - truth)**2
        self.truth_sq = 0.0  # sum of truth**2
        self.truth_elements = 0
        self.magnitude_margin = 0.0  # max |cand - ref| / magnitude bound
        self.magnitude_bound = 0.0  # largest magnitude bound seen
        self.nonfinite = 0
        self.elements = 0
        self.twin_sq = 0.0  # sum of (twin - truth)**2
        self.reround_sq = 0.0  # sum of (re-rounded twin - twin)**2, mean over the copies
        self.twin_rows = 0
        self._gaps: list[np.ndarray] = []  # per disagreeing row: gap of the two classes
        self.u: float | None = None  # unit roundoff of the outputs' dtype (first chunk)

    def add(
        self,
        reference: np.ndarray,
        candidate: np.ndarray,
        truth: np.ndarray | None = None,
    ) -> None:
        """Fold one chunk of outputs (same shapes, first axis = examples) into the state."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(
                f"reference and candidate shapes differ: {reference.shape} vs {candidate.shape}"
            )
        if truth is not None and np.shape(truth) != reference.shape:
            raise ValueError(f"truth shape {np.shape(truth)} differs from {reference.shape}")
        kind = "float64" if truth is not None else "magnitude"
        if self.criterion is None:
            self.criterion = kind
        elif self.criterion != "absolute" and self.criterion != kind:
            raise ValueError("every chunk must come with a truth, or none may")
        # the coarser of the two dtypes: a float16 candidate of a float32 reference is
        # judged by float16 rounding (its outputs cannot be closer than that)
        u = max(unit_roundoff(reference.dtype), unit_roundoff(candidate.dtype))
        if self.u is None:
            self.u = u
        elif self.u != u:
            raise ValueError("every chunk must have the same dtype")
        if reference.size == 0:
            return
        ref = _as_rows(reference, self.class_axis)
        cand = _as_rows(candidate, self.class_axis)
        z = _as_rows(truth, self.class_axis) if truth is not None else None
        self.elements += ref.size

        ref_ok = np.isfinite(ref).all(axis=1)
        bad = ref_ok & ~np.isfinite(cand).all(axis=1)
        self.nonfinite += int(bad.sum())
        with np.errstate(invalid="ignore"):
            diff = np.abs(cand - ref)
        self.max_abs = max(self.max_abs, _max_finite_rows(diff, ref_ok & ~bad))
        if z is not None:
            ok = ref_ok & ~bad & np.isfinite(z).all(axis=1)
            self.ref_err = max(self.ref_err, _max_finite_rows(np.abs(ref - z), ok))
            self.cand_err = max(self.cand_err, _max_finite_rows(np.abs(cand - z), ok))
            self.truth_scale = max(self.truth_scale, _max_finite_rows(np.abs(z), ok))
            self.ref_sq += float(np.square(ref[ok] - z[ok]).sum())
            self.cand_sq += float(np.square(cand[ok] - z[ok]).sum())
            self.truth_sq += float(np.square(z[ok]).sum())
            self.truth_elements += int(ok.sum()) * ref.shape[1]
        if self.criterion == "magnitude":
            bounds = magnitude_bounds(ref, cand, 1, self.u)
            ok = ref_ok & ~bad
            self.magnitude_margin = max(self.magnitude_margin, _max_finite_rows(diff / bounds, ok))
            self.magnitude_bound = max(self.magnitude_bound, _max_finite_rows(bounds, ok))

        if self.class_axis is not None and ref.shape[1] > 1:
            ok = ref_ok & ~bad
            ta, tb = ref.argmax(axis=1), cand.argmax(axis=1)
            rows = np.flatnonzero(ok & (ta != tb))
            if len(rows):
                judge = z if z is not None else ref
                gap = np.abs(judge[rows, ta[rows]] - judge[rows, tb[rows]])
                if self.criterion == "magnitude":
                    # per-row bound: store the gap already in units of the row's bound
                    gap = gap / bounds[rows, 0]
                self._gaps.append(gap)

    def add_twin(self, truth: np.ndarray, twin: np.ndarray, rerounded: list[np.ndarray]) -> None:
        """Fold one chunk of the parameter test into the state: the float64 truth, the
        candidate's float64 twin and its re-rounded copies (:mod:`bnfold.runtime.twins`) on the
        same contexts. Rows where any of them is non-finite are left out (the float32
        outputs judge those)."""
        if not rerounded:
            raise ValueError("the parameter test needs at least one re-rounded twin")
        z, t = _as_rows(truth, self.class_axis), _as_rows(twin, self.class_axis)
        copies = [_as_rows(r, self.class_axis) for r in rerounded]
        ok = np.isfinite(z).all(1) & np.isfinite(t).all(1)
        for r in copies:
            ok &= np.isfinite(r).all(1)
        self.twin_sq += float(np.square(t[ok] - z[ok]).sum())
        self.reround_sq += sum(float(np.square(r[ok] - t[ok]).sum()) for r in copies) / len(copies)
        self.twin_rows += int(ok.sum())

    def verdict(self) -> RoundingVerdict:
        """The verdict over everything added so far."""
        criterion = self.criterion or ("absolute" if self.tolerance is not None else "magnitude")
        u = UNIT_ROUNDOFF if self.u is None else self.u
        rms_text = ""
        twin_ratio = None
        if criterion == "absolute":
            bound = float(self.tolerance)
            err = self.max_abs
            margin = _ratio(err, bound)
            tie_limit = 2 * bound
        elif criterion == "float64":
            bound = float64_bound(self.ref_err, self.truth_scale, u)
            err = self.cand_err
            n = max(self.truth_elements, 1)
            rms_bound = (
                FLOAT64_RMS_MULTIPLE * (self.ref_sq / n) ** 0.5 + u * (self.truth_sq / n) ** 0.5
            )
            rms = (self.cand_sq / n) ** 0.5
            if n >= FLOAT64_RMS_MIN_ELEMENTS:
                margin = max(_ratio(err, bound), _ratio(rms, rms_bound))
                rms_text = f"; RMS {rms:.3g} vs {rms_bound:.3g} ({_ratio(rms, rms_bound):.3g})"
            else:
                margin = _ratio(err, bound)
                rms_text = f"; RMS not judged (only {n} elements)"
            if self.twin_rows:
                twin_ratio = _ratio(self.twin_sq**0.5, self.reround_sq**0.5)
                margin = max(margin, twin_ratio / TWIN_MULTIPLE)
                rms_text += (
                    f"; parameters {twin_ratio:.3g}x one re-rounding (bound {TWIN_MULTIPLE:g},"
                    f" {self.twin_rows:,} contexts)"
                )
            tie_limit = 2 * bound
        else:
            bound = self.magnitude_bound
            err = self.max_abs
            margin = self.magnitude_margin
            tie_limit = 2.0  # gaps were stored in units of each row's bound
        gaps = np.concatenate(self._gaps) if self._gaps else np.zeros(0)
        near_ties = int((gaps <= tie_limit).sum())
        flips = int(len(gaps) - near_ties)
        passed = bool(self.nonfinite == 0 and margin <= 1.0 and flips == 0)
        precision = precision_name(u)
        reason = _reason(
            criterion,
            passed,
            err,
            bound,
            margin,
            near_ties,
            flips,
            self.nonfinite,
            rms_text,
            precision,
        )
        f64 = criterion == "float64" or (criterion == "absolute" and self.truth_scale > 0)
        return RoundingVerdict(
            passed=passed,
            criterion=criterion,
            bound=float(bound),
            margin=float(margin),
            max_abs_error=float(self.max_abs) if self.nonfinite == 0 else float("inf"),
            near_ties=near_ties,
            flips=flips,
            reason=reason,
            reference_error=float(self.ref_err) if f64 else None,
            candidate_error=float(self.cand_err) if f64 else None,
            nonfinite=self.nonfinite,
            elements=self.elements,
            twin_ratio=None if twin_ratio is None else float(twin_ratio),
            twin_contexts=self.twin_rows if twin_ratio is not None else 0,
            precision=precision,
        )


def judge_outputs(
    reference: np.ndarray,
    candidate: np.ndarray,
    truth: np.ndarray | None = None,
    *,
    tolerance: float | None = None,
    class_axis: int | None = -1,
    twin: np.ndarray | None = None,
    rerounded: list[np.ndarray] | None = None,
) -> RoundingVerdict:
    """Does ``candidate`` differ from ``reference`` only by what the rounding of their
    dtype (float32, float16, bfloat16: :func:`unit_roundoff`) explains?

    Args:
        reference: float32 outputs of the reference network, shape (n, ...).
        candidate: float32 outputs of the candidate, same shape.
        truth: float64 outputs of the reference network (criterion "float64"), or None
            (criterion "magnitude").
        tolerance: explicit absolute bound on |candidate - reference| (criterion
            "absolute"); overrides the rounding-based criteria.
        class_axis: axis of the classes for the argmax check; None skips it.
        twin, rerounded: the candidate's float64 twin's outputs and those of its
            re-rounded copies (the parameter test; needs ``truth``).
    """
    acc = RoundingAccumulator(tolerance=tolerance, class_axis=class_axis)
    acc.add(reference, candidate, truth)
    if twin is not None:
        if truth is None:
            raise ValueError("the parameter test needs the float64 truth")
        acc.add_twin(truth, twin, rerounded or [])
    return acc.verdict()


def _max_finite_rows(values: np.ndarray, rows: np.ndarray) -> float:
    """Max of ``values`` over the selected rows (0 when none)."""
    sel = values[rows]
    return float(sel.max()) if sel.size else 0.0


def _ratio(err: float, bound: float) -> float:
    if bound > 0:
        return err / bound
    return 0.0 if err == 0 else float("inf")


def _reason(
    criterion: str,
    passed: bool,
    err: float,
    bound: float,
    margin: float,
    near_ties: int,
    flips: int,
    nonfinite: int,
    rms_text: str = "",
    precision: str = "float32",
) -> str:
    what = {
        "float64": "max |candidate - float64 truth|",
        "magnitude": "max |candidate - reference| (magnitude bound, no float64 truth)",
        "absolute": "max |candidate - reference| (explicit tolerance)",
    }[criterion]
    head = f"{what} {err:.3g} vs bound {bound:.3g} ({_ratio(err, bound):.3g}){rms_text}"
    head += f": error/bound {margin:.3g}"
    ties = f"; {near_ties} argmax near-tie(s) allowed" if near_ties else ""
    if nonfinite:
        return f"FAIL: candidate non-finite on {nonfinite} row(s) where the reference is finite"
    if flips:
        return f"FAIL: {flips} argmax flip(s) outside the rounding bound; {head}{ties}"
    if not passed:
        return f"FAIL: {head}: more than {precision} rounding explains{ties}"
    return f"PASS: {head}: within {precision} rounding{ties}"
