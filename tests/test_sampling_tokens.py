"""The pure token functions, alone, against references nobody here wrote: Python's bisect
and math, torch's softmax / log_softmax, and sampling statistics."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnfold.mlp.data import END
from bnfold.sampling.tokens import (
    bits_to_uniform,
    filtered_rows,
    guide_rows,
    guide_rows_exhaustive,
    inverse_cdf,
    plain_rows,
    stream_key,
    uniform_bits,
    uniforms,
)

Z = np.array(
    [
        [0.0, 1.0, 2.0, 3.0],
        [2.0, -1.0, 0.5, 0.5],  # a tie between tokens 2 and 3
        [-30.0, 4.0, -30.0, 4.0],
    ],
    dtype=np.float32,
)
NO_MASK = np.zeros(len(Z), dtype=bool)


def softmax(z, t: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.from_numpy(np.asarray(z, dtype=np.float64)) / t, dim=-1).numpy()


def test_plain_rows_are_softmax_cumsums_and_log_softmax():
    cdf, lp = plain_rows(Z, NO_MASK)
    assert cdf.dtype == np.float32 and lp.dtype == np.float64
    np.testing.assert_allclose(cdf / cdf[:, -1:], np.cumsum(softmax(Z), axis=1), rtol=1e-6)
    ref = torch.log_softmax(torch.from_numpy(Z.astype(np.float64)), dim=1).numpy()
    np.testing.assert_allclose(lp, ref, atol=1e-6)


def test_masked_end_token_has_no_weight_but_keeps_its_probability():
    cdf, lp = plain_rows(Z, np.ones(len(Z), dtype=bool))
    assert (cdf[:, END] == 0).all()
    p = softmax(Z)
    p[:, END] = 0
    np.testing.assert_allclose(cdf / cdf[:, -1:], np.cumsum(p / p.sum(1, keepdims=True), 1), 1e-6)
    ref = torch.log_softmax(torch.from_numpy(Z.astype(np.float64)), dim=1).numpy()
    np.testing.assert_allclose(lp, ref, atol=1e-6)  # log P is the model's, not the masked one


def test_overflowing_rows_are_shifted():
    z = np.array([[0.0, 200.0, 199.0, -5.0]], dtype=np.float32)  # exp(200) overflows float32
    cdf, lp = plain_rows(z, np.zeros(1, dtype=bool))
    assert np.isfinite(cdf).all() and np.isfinite(lp).all()
    np.testing.assert_allclose(cdf[0] / cdf[0, -1], np.cumsum(softmax(z[0])), atol=1e-6)


@pytest.mark.parametrize("t", [0.5, 1.7])
def test_temperature_scales_the_weights(t):
    cdf, lp = filtered_rows(Z, NO_MASK, t, None, None)
    np.testing.assert_allclose(cdf / cdf[:, -1:], np.cumsum(softmax(Z, t), axis=1), rtol=1e-5)
    ref = torch.log_softmax(torch.from_numpy(Z.astype(np.float64)), dim=1).numpy()
    np.testing.assert_allclose(lp, ref, atol=1e-6)  # log P stays at temperature 1


def test_top_k_keeps_the_k_largest_and_ties_at_the_cut():
    cdf, _ = filtered_rows(Z, NO_MASK, 1.0, 2, None)
    weight = np.diff(cdf, prepend=0, axis=1) > 0
    assert weight[0].tolist() == [False, False, True, True]
    assert weight[1].tolist() == [True, False, True, True]  # 0.5 ties for second: both stay
    assert weight[2].tolist() == [False, True, False, True]


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9, 0.99])
def test_top_p_keeps_the_smallest_nucleus(top_p):
    z = np.array([[0.1, 1.5, -0.3, 0.9, 2.2, -1.0]], dtype=np.float32)
    cdf, _ = filtered_rows(z, np.zeros(1, dtype=bool), 1.0, None, top_p)
    kept = set(np.flatnonzero(np.diff(cdf[0], prepend=0) > 0).tolist())
    p = softmax(z[0])
    order = sorted(range(len(p)), key=lambda i: -p[i])
    nucleus, mass = set(), 0.0
    for i in order:  # the independent definition: add tokens until the mass reaches p
        nucleus.add(i)
        mass += p[i]
        if mass >= top_p:
            break
    assert kept == nucleus


def test_greedy_rows_draw_the_argmax_for_every_uniform():
    cdf, _ = filtered_rows(Z, NO_MASK, 0, None, None)
    for u in (0.0, 0.3, 0.999999):
        tok = inverse_cdf(cdf, np.full(len(Z), u, dtype=np.float32))
        assert tok.tolist() == [3, 0, 1]  # ties: the first maximum, as numpy's argmax


def test_inverse_cdf_matches_bisect():
    cdf = np.array([[0.1, 0.3, 0.3, 0.6, 1.0]], dtype=np.float32)  # token 2 has no weight
    for u in np.linspace(0, 1, 101, endpoint=False, dtype=np.float32):
        want = bisect.bisect_right(cdf[0].tolist(), float(np.float32(u) * cdf[0, -1]))
        assert inverse_cdf(cdf, np.array([u], dtype=np.float32))[0] == min(want, 4)
    assert 2 not in inverse_cdf(np.repeat(cdf, 1000, 0), np.linspace(0, 1, 1000, dtype=np.float32))


def test_draw_frequencies_follow_the_probabilities():
    p = np.array([0.05, 0.5, 0.2, 0.25])
    n = 200_000
    cdf = np.tile(np.cumsum(p).astype(np.float32), (n, 1))
    u = uniforms(stream_key(1), np.arange(n), np.zeros(n, dtype=np.int64))
    counts = np.bincount(inverse_cdf(cdf, u), minlength=4)
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 20  # 3 degrees of freedom: p < 2e-4 by chance


def test_uniforms_are_24_bit_and_uniform():
    bits = uniform_bits(stream_key(3), np.arange(100_000), np.zeros(100_000, dtype=np.int64))
    assert bits.max() < 2**24 and bits.dtype == np.uint64
    u = bits_to_uniform(bits)
    assert (u.astype(np.float64) * 2**24 == bits).all()  # exact
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert stream_key(0) != stream_key(1) and math.isfinite(float(u.sum()))


@settings(max_examples=60, deadline=None)
@given(
    weights=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 5), st.integers(2, 30)),
        elements=st.one_of(st.just(0.0), st.floats(1e-9, 1e3)),
    ),
    guide_bits=st.sampled_from([4, 8]),
)
def test_guide_rows_are_exact(weights, guide_bits):
    """Every guide entry that is not 'split' is the draw of every uniform of its bucket."""
    weights[:, -1] += 1e-3  # a row needs some weight
    cdf = np.cumsum(weights.astype(np.float32), axis=1, dtype=np.float32)
    fast = guide_rows(cdf, guide_bits, 255)
    np.testing.assert_array_equal(fast, guide_rows_exhaustive(cdf, guide_bits, 255))
    bits = np.random.default_rng(0).integers(0, 2**24, size=(len(cdf), 2000)).astype(np.uint64)
    bucket = (bits >> np.uint64(24 - guide_bits)).astype(np.int64)
    guided = np.take_along_axis(fast.astype(np.int64), bucket, axis=1)
    direct = inverse_cdf(np.repeat(cdf, 2000, 0), bits_to_uniform(bits.ravel()))
    direct = direct.reshape(len(cdf), 2000)
    ok = guided != 255
    np.testing.assert_array_equal(guided[ok], direct[ok])
