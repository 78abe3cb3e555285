"""bnfold.verify.rounding: verdicts on outputs whose truth is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.verify.rounding import RoundingAccumulator, judge_outputs


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    """float64 'logits' of a made-up network: 2,000 rows of 60 classes, scale ~10."""
    return np.random.default_rng(0).normal(scale=4.0, size=(2000, 60))


def float32_evaluation(z: np.ndarray, seed: int) -> np.ndarray:
    """Another float32 evaluation of the same function: the truth off by a few ulps."""
    ulps = np.random.default_rng(seed).integers(-3, 4, size=z.shape)
    return (z * (1 + ulps * 2.0**-24)).astype(np.float32)


def test_two_float32_evaluations_of_one_function_pass(truth):
    a, b = float32_evaluation(truth, 1), float32_evaluation(truth, 2)
    v = judge_outputs(a, b, truth)
    assert v.passed and v.criterion == "float64" and v.margin <= 1 and v.flips == 0
    m = judge_outputs(a, b)
    assert m.passed and m.criterion == "magnitude"


@pytest.mark.parametrize("size", [1e-3, 1e-4])
def test_a_small_real_change_fails_with_and_without_truth(truth, size):
    a, b = float32_evaluation(truth, 1), float32_evaluation(truth, 2)
    b[:, 7] += np.float32(size)  # one class shifted everywhere: a changed bias
    assert not judge_outputs(a, b, truth).passed
    assert not judge_outputs(a, b).passed or size < 1e-3  # magnitude: coarser
    assert "FAIL" in judge_outputs(a, b, truth).reason


def test_nonfinite_candidate_fails(truth):
    a, b = float32_evaluation(truth, 1), float32_evaluation(truth, 2)
    b[5, 3] = np.nan
    v = judge_outputs(a, b, truth)
    assert not v.passed and v.nonfinite == 1
    assert v.to_dict()["max_abs_error"] is None  # JSON-safe


def test_argmax_near_tie_is_allowed_and_real_flip_fails(truth):
    z = truth.copy()
    z[0, :2] = 50.0, 50.0 + 1e-6  # a tie inside float32 rounding of ~50
    z[1, :2] = 50.0, 49.0  # a clear winner
    a, b = float32_evaluation(z, 1), float32_evaluation(z, 2)
    before = judge_outputs(a, b, z)  # random logits have a few near-ties of their own
    assert before.passed and before.flips == 0
    a[0, :2], b[0, :2] = (50.0, 49.999996), (49.999996, 50.0)  # each picks another class
    v = judge_outputs(a, b, z)
    assert v.passed and v.near_ties == before.near_ties + 1 and v.flips == 0
    b[1, :2] = 49.0, 50.0  # the clear winner flipped
    v = judge_outputs(a, b, z)
    assert not v.passed and v.flips == 1 and v.near_ties == before.near_ties + 1


def test_explicit_tolerance_overrides(truth):
    a, b = float32_evaluation(truth, 1), float32_evaluation(truth, 2)
    b[:, 7] += np.float32(1e-3)
    v = judge_outputs(a, b, truth, tolerance=1e-2)
    assert v.passed and v.criterion == "absolute" and v.bound == 1e-2
    assert not judge_outputs(a, b, truth, tolerance=1e-4).passed
    with pytest.raises(ValueError):
        judge_outputs(a, b, tolerance=-1.0)


@pytest.mark.parametrize("with_truth", [True, False])
def test_chunks_give_the_verdict_of_the_whole(truth, with_truth):
    a, b = float32_evaluation(truth, 1), float32_evaluation(truth, 2)
    b[100:110, 4] += np.float32(3e-4)
    z = truth if with_truth else None
    acc = RoundingAccumulator()
    for s in range(0, len(a), 300):
        acc.add(a[s : s + 300], b[s : s + 300], None if z is None else z[s : s + 300])
    assert acc.verdict() == judge_outputs(a, b, z)


def test_mixing_chunks_with_and_without_truth_is_refused(truth):
    a = truth.astype(np.float32)
    acc = RoundingAccumulator()
    acc.add(a[:10], a[:10], truth[:10])
    with pytest.raises(ValueError):
        acc.add(a[10:20], a[10:20])
    with pytest.raises(ValueError):
        judge_outputs(a, a[:, :5])


def half_evaluation(z: np.ndarray, seed: int, dtype=np.float16, bits: int = 11) -> np.ndarray:
    """Another half-precision evaluation of the same function: a few of its ulps off."""
    ulps = np.random.default_rng(seed).integers(-3, 4, size=z.shape)
    return (z * (1 + ulps * 2.0**-bits)).astype(dtype)


def test_unit_roundoff_of_each_dtype():
    import ml_dtypes

    from bnfold.verify.rounding import unit_roundoff

    assert unit_roundoff(np.float32) == 2.0**-24
    assert unit_roundoff(np.float16) == 2.0**-11
    assert unit_roundoff(ml_dtypes.bfloat16) == 2.0**-8
    # each is half the gap from 1 to the next number of that dtype
    for dtype in (np.float16, np.float32, ml_dtypes.bfloat16):
        one = np.asarray(1, dtype)
        gap = float(np.nextafter(one, np.asarray(2, dtype))) - 1.0
        assert unit_roundoff(dtype) == gap / 2


def test_float16_outputs_are_judged_by_float16_rounding(truth):
    a, b = half_evaluation(truth, 1), half_evaluation(truth, 2)
    v = judge_outputs(a, b, truth)
    assert v.passed and v.precision == "float16", v.reason
    assert "float16 rounding" in v.reason
    m = judge_outputs(a, b)  # the magnitude bound scales with float16's u as well
    assert m.passed and m.precision == "float16", m.reason
    # the same float16 numbers claimed to be float32 are far outside float32 rounding
    assert not judge_outputs(a.astype(np.float32), b.astype(np.float32)).passed


def test_a_real_change_in_float16_still_fails(truth):
    a, b = half_evaluation(truth, 1), half_evaluation(truth, 2)
    b[:, 7] += np.float16(0.25)  # a changed bias, 2% of the logits' scale
    v = judge_outputs(a, b, truth)
    assert not v.passed and "more than float16 rounding" in v.reason
