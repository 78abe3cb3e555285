"""Pure token-sampling functions: random streams, next-token rows, inverse CDF.

Every function here is row-wise: a row's result depends on that row's inputs alone, never
on which other rows share the call or on their order. That is what lets the network
engine (rows derived from fresh logits every step) and the table engine (rows derived
once per context and stored) give bit-identical names and log-probabilities.

A *row* is what sampling needs about one context under one set of options:

* ``cdf`` (vocab,) float32: running sums of the unnormalised, filtered weights (the end
  token's weight first); a draw is the number of entries ``<= u * cdf[-1]``;
* ``lp`` (vocab,) float64: the model's log-probability of each token at temperature 1,
  unfiltered (what ``SampledName.logprob`` adds up).

Random streams: name ``i``'s ``k``-th draw is ``splitmix64(key(seed) + ((i << 16) + k + 1)
* golden)``, of which the top 24 bits are the uniform (the resolution of the float32
probabilities it is compared with).
"""

from __future__ import annotations

import numpy as np

from bnfold.mlp.data import END

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
STEP_BITS = 16  # the stream counter reserves 16 bits per name for its draws
UNIFORM_BITS = 24


# ---------------------------------------------------------------------- random streams


def mix64(z: int) -> int:
    """The splitmix64 finaliser on a Python int."""
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def stream_key(seed: int) -> np.uint64:
    """The 64-bit key of a seed: one splitmix64 step, so nearby seeds give unrelated keys."""
    return np.uint64(mix64((seed * GOLDEN + GOLDEN) & MASK64))


def uniform_bits(key: np.uint64 | np.ndarray, names: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """uint64 in [0, 2**24): the 24 random bits of draw ``draws[j]`` of name ``names[j]``.

    ``key`` is one stream key (:func:`stream_key`) or one per name, so rows of different
    seeds are drawn together.
    """
    z = (names.astype(np.uint64) << np.uint64(STEP_BITS)) + draws.astype(np.uint64)
    z += np.uint64(1)
    z *= np.uint64(GOLDEN)
    z += key
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MIX2)
    z ^= z >> np.uint64(31)
    z >>= np.uint64(64 - UNIFORM_BITS)
    return z


def bits_to_uniform(bits: np.ndarray) -> np.ndarray:
    """float32 in [0, 1): exactly ``bits / 2**24`` (24 bits fit a float32 mantissa)."""
    return bits.astype(np.float32) * np.float32(2.0**-UNIFORM_BITS)


def uniforms(key: np.uint64 | np.ndarray, names: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """float32 uniforms in [0, 1): draw ``draws[j]`` of the stream of name ``names[j]``."""
    return bits_to_uniform(uniform_bits(key, names, draws))


# ----------------------------------------------------------------- rows from logits


def logsumexp(z: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(z))) in float64, stable for any finite logits."""
    z = z.astype(np.float64)
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def plain_rows(z: np.ndarray, no_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Temperature 1, no filters: ``cdf`` = running sums of exp(z) (the end token's weight
    zeroed where ``no_end``), ``lp`` = z - log(total weight, end token included).

    z is not shifted by its row max (fewer operations, and the hot path of the network
    engine): a row whose total falls outside [2**-100, 2**100] (never for a trained model)
    is redone shifted, in float64, so each row's arithmetic depends on its logits alone.
    """
    z = np.asarray(z, dtype=np.float32)
    m, vocab = z.shape
    cdf_t = np.empty((vocab, m), dtype=np.float32)  # (vocab, rows): long contiguous vectors
    with np.errstate(over="ignore"):  # overflowing rows are redone below
        np.exp(z.T, out=cdf_t)
    e0 = None
    if no_end.any():  # below min-length: mask the end token, remember its mass
        e0 = np.where(no_end, cdf_t[END], np.float32(0))
        cdf_t[END, no_end] = 0
    np.add.accumulate(cdf_t, axis=0, out=cdf_t)  # sequential float32 sums, per row
    total = cdf_t[-1]
    bad = ~((total >= np.float32(2.0**-100)) & (total <= np.float32(2.0**100)))
    cdf = np.ascontiguousarray(cdf_t.T)
    with np.errstate(over="ignore", invalid="ignore"):
        lse = np.log(total if e0 is None else total + e0, dtype=np.float64)
    if bad.any():
        r = np.flatnonzero(bad)
        cdf[r] = _shifted_cdf(z[r], no_end[r])
        lse[r] = logsumexp(z[r])
    return cdf, z.astype(np.float64) - lse[:, None]


def _shifted_cdf(z: np.ndarray, no_end: np.ndarray) -> np.ndarray:
    """(rows, vocab) cumulative exp(z - row max), the end token masked where ``no_end``."""
    s = z.astype(np.float64)
    s[no_end, END] = -np.inf
    e = np.exp(s - s.max(axis=1, keepdims=True)).astype(np.float32)
    return np.cumsum(e, axis=1)


def top_k_filter(s: np.ndarray, k: int | None) -> None:
    """In place: -inf below each row's k-th largest score (ties at the cut-off are kept)."""
    if k is not None and k < s.shape[1]:
        kth = s.shape[1] - k
        s[s < np.partition(s, kth, axis=1)[:, kth : kth + 1]] = -np.inf


def top_p_weights(s: np.ndarray, top_p: float | None) -> np.ndarray:
    """Unnormalised weights exp(s - row max), outside each row's top-p nucleus zeroed: the
    most likely tokens whose mass before them is below ``top_p`` (the top token stays)."""
    e = np.exp(s - s.max(axis=1, keepdims=True))
    if top_p is not None and top_p < 1:
        p = e / e.sum(axis=1, keepdims=True)
        desc = -np.sort(-p, axis=1)
        before = np.cumsum(desc, axis=1) - desc  # mass of the more likely tokens
        # The top token always stays: its mass before is 0, but so is float32(top_p) for
        # a top_p below float32's smallest subnormal (1e-46), and then nothing is < it.
        keep = np.maximum((before < np.float32(top_p)).sum(axis=1), 1)
        cutoff = desc[np.arange(len(p)), keep - 1]
        e[p < cutoff[:, None]] = 0
    return e


def greedy_cdf(best: np.ndarray, vocab: int) -> np.ndarray:
    """The step rows whose inverse CDF is ``best`` whatever the uniform: 0 before it, 1 from it."""
    return (np.arange(vocab) >= best[:, None]).astype(np.float32)


def filtered_rows(
    z: np.ndarray,
    no_end: np.ndarray,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy (temperature 0), temperature != 1, top-k or top-p: the ``cdf`` of the scaled
    and filtered weights of a shifted copy of z; ``lp`` at temperature 1, unfiltered.

    float32 first; a row whose weights come out unusable (a temperature so small that
    z / T overflows, or float32(T) is 0, leaving no finite weight) is redone in float64
    with the end-token mask applied *before* the shift by the row max, so the most likely
    allowed token keeps weight exactly 1 whatever the temperature.
    """
    z = np.asarray(z, dtype=np.float32)
    lp = z.astype(np.float64) - logsumexp(z)[:, None]
    greedy = temperature == 0
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        s = z - z.max(axis=1, keepdims=True)
        if not greedy:
            s /= np.float32(temperature)
        s[no_end, END] = -np.inf
        top_k_filter(s, top_k)
        if greedy:
            return greedy_cdf(s.argmax(axis=1), z.shape[1]), lp
        cdf = np.cumsum(top_p_weights(s, top_p), axis=1)
    bad = ~(cdf[:, -1] > 0)  # NaN or no mass left
    if bad.any():
        r = np.flatnonzero(bad)
        s = z[r].astype(np.float64)
        s[no_end[r], END] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
            s /= temperature
        top_k_filter(s, top_k)
        cdf[r] = np.cumsum(top_p_weights(s, top_p), axis=1)
    return cdf, lp


# --------------------------------------------------------------------------- drawing


def inverse_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the token j with cdf[j-1] <= u * total < cdf[j] (total = cdf[-1]): the
    number of running sums <= u * total. Tokens of zero weight can never be chosen."""
    total = cdf[:, -1]
    target = np.minimum(u * total, np.nextafter(total, np.float32(0)))
    below = cdf <= target[:, None]
    return np.add.reduce(below.view(np.uint8), axis=1, dtype=np.int64)


def guide_rows(cdf: np.ndarray, guide_bits: int, split: int) -> np.ndarray:
    """(rows, 2**guide_bits) guide table: entry b is the token every uniform whose top
    ``guide_bits`` bits equal b draws, or ``split`` when the bucket holds a boundary.

    Exact: a draw is a non-decreasing function of the uniform's bits (the float32 product,
    the min and the count are all monotone), so the draw for bits ``x`` is the number of
    entries j whose threshold ``tau_j`` (the least bits with ``cdf[j] <= target``) is at
    most x. Each threshold is found by testing, with the very arithmetic of
    :func:`inverse_cdf`, the few bit values around ``cdf[j] / total * 2**24`` (float32
    rounding moves it by at most one); a row where that bracket is not conclusive is
    done by brute force (:func:`guide_rows_exhaustive`).
    """
    cdf = np.asarray(cdf, dtype=np.float32)
    m, vocab = cdf.shape
    buckets = 1 << guide_bits
    width = 1 << (UNIFORM_BITS - guide_bits)
    never = 1 << UNIFORM_BITS
    total = cdf[:, -1]
    top = np.nextafter(total, np.float32(0))
    guess = np.floor(cdf.astype(np.float64) / total[:, None].astype(np.float64) * never)
    offsets = np.arange(-2, 3)
    cand = guess[:, :, None].astype(np.int64) + offsets  # (rows, vocab, 5)
    np.clip(cand, 0, never - 1, out=cand)
    u = bits_to_uniform(cand)
    target = np.minimum(u * total[:, None, None], top[:, None, None])
    ok = cdf[:, :, None] <= target
    any_ok = ok.any(axis=2)
    first = ok.argmax(axis=2)
    tau = np.take_along_axis(cand, first[:, :, None], axis=2)[:, :, 0]
    tau[~any_ok] = never
    # conclusive: the threshold is the bracket's first success and the value below it
    # fails (or is 0), or nothing succeeds because cdf[j] exceeds every target
    below_fails = (tau == 0) | (first > 0) | ~any_ok
    none_ok_right = any_ok | (cdf > top[:, None]) | (cand[:, :, -1] == never - 1)
    sure = (below_fails & none_ok_right).all(axis=1) & (total > 0) & np.isfinite(total)
    # draw(x) = #{j: tau_j <= x}: count thresholds at or before each bucket's first bits
    start = np.minimum((tau + width - 1) // width, buckets)  # first bucket with start >= tau
    flat = (np.arange(m)[:, None] * (buckets + 1) + start).ravel()
    counts = np.bincount(flat, minlength=m * (buckets + 1)).reshape(m, buckets + 1)
    lo = np.cumsum(counts, axis=1)[:, :buckets]
    inside = (tau % width != 0) & (tau < never)  # a threshold strictly inside a bucket
    is_split = np.zeros((m, buckets), dtype=bool)
    rows = np.broadcast_to(np.arange(m)[:, None], tau.shape)
    is_split[rows[inside], (tau // width)[inside]] = True
    out = np.where(is_split, split, lo).astype(np.uint16 if split > 255 else np.uint8)
    if not sure.all():
        r = np.flatnonzero(~sure)
        out[r] = guide_rows_exhaustive(cdf[r], guide_bits, split)
    return out


def guide_rows_exhaustive(cdf: np.ndarray, guide_bits: int, split: int) -> np.ndarray:
    """:func:`guide_rows` by brute force: the draw at each bucket's first and last bits."""
    m = len(cdf)
    buckets = 1 << guide_bits
    width = 1 << (UNIFORM_BITS - guide_bits)
    first = np.arange(buckets, dtype=np.uint64) * np.uint64(width)
    ends = np.concatenate([first, first + np.uint64(width - 1)])  # (2 * buckets,)
    u = bits_to_uniform(ends)
    out = np.empty((m, buckets), dtype=np.uint16 if split > 255 else np.uint8)
    chunk = max(1, (1 << 21) // (len(u) * cdf.shape[1]))  # ~2M compares per pass
    for s in range(0, m, chunk):
        c = cdf[s : s + chunk]
        k = len(c)
        tok = inverse_cdf(np.repeat(c, len(u), axis=0), np.tile(u, k)).reshape(k, 2, buckets)
        lo, hi = tok[:, 0], tok[:, 1]
        out[s : s + k] = np.where(lo == hi, lo, split)
    return out
