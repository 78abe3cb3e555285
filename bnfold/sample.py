"""Batched, reproducible name sampling on any :class:`~bnfold.infer.Predictor`.

How it works: up to ``batch_size`` names are in flight at once. Each step feeds the
contexts of all unfinished names to the runtime in one call, then samples every row's next
token with a few vectorised numpy operations (softmax, cumulative sum, inverse CDF). A row
that draws the end token is finished; its slot is refilled with the next name, so the batch
stays full until the last names drain (then finished rows are compacted away).

Reproducibility: name ``i`` of a request has its own random stream, and its ``k``-th draw is
``splitmix64(key(seed) + ((i << 16) + k + 1) * golden)``, a counter-based generator evaluated
in vectorised numpy. A name therefore depends only on (model, seed, options, i), never on
the batch size, on which other names share its batch, or on how requests are merged. Only
float rounding of the logits (which a runtime may change with the batch shape) can move a
draw across a probability boundary; that is measured, not assumed
(``benchmarks/sampler.py``).

Log-probability: ``SampledName.logprob`` is the model's natural-log probability, at
temperature 1 and without any top-k / top-p / min-length filtering, of the whole name
*as a complete word*: prefix characters, sampled characters and the end token,
``log P(c_1 ... c_n END)``. It is thus a property of the name and the model alone, the same
whatever options produced it (a name cut at ``max_length`` still gets its end-token term).

One engine, many requests: a :class:`SamplerEngine` holds the rows of any number of jobs
(requests, :class:`SampleJob`) whose options share a :func:`group_key` (temperature, top-k,
top-p, min/max length). Each row carries its own stream key (seed), start context (prefix)
and job; new jobs queue up and take rows as rows free up, and finished names are routed back
to their job. The CLI (one job) and the service (every request of a group) run the same
code, and a forward step costs one ``advance`` per *group*, not per request. The engine
separates "which contexts to evaluate" (:meth:`~SamplerEngine.contexts`) from "consume
their logits" (:meth:`~SamplerEngine.advance`), so a service concatenates the contexts of
all its engines (one per group) into one forward pass and hands each its slice of logits.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bnfold.data import END, Vocab, file_sha256, read_words, split_words
from bnfold.errors import BnfoldError
from bnfold.infer import Predictor

MAX_COUNT = 10_000_000  # names per request
MAX_LENGTH_CAP = 1_000  # characters per name (the stream counter reserves 16 bits per name)
DEFAULT_MAX_LENGTH = 50  # the longest of the 32k training names has 15 characters
DEFAULT_BATCH = 4096  # names in flight; measured best for ONNX Runtime on one thread
NEW_ONLY_DRAWS = (20, 10_000)  # --new-only gives up after 20 * count + 10,000 draws
LABELS = ("train", "dev", "test", "new")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_STEP_BITS = 16


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SampleOptions:
    """Everything that decides which names come out (the batch size does not).

    ``min_length`` / ``max_length`` count the characters of the whole name, prefix
    included: below ``min_length`` the end token is masked out (the default 1 rules out
    the empty name); at ``max_length`` the name stops. ``temperature`` 0 means greedy
    (argmax). ``top_k`` / ``top_p`` filter the temperature-scaled distribution, after the
    end-token mask (ties at the cut-off are kept). ``new_only`` keeps only names in none of
    the training file's train / dev / test splits (see :func:`sample_names`).
    """

    count: int = 10
    seed: int = 42
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    prefix: str = ""
    min_length: int = 1
    max_length: int = DEFAULT_MAX_LENGTH
    new_only: bool = False

    def check(self, vocab: Vocab) -> SampleOptions:
        """Raise a ``BnfoldError`` naming the first bad option; return self if all are fine."""
        if not _is_int(self.count) or not 1 <= self.count <= MAX_COUNT:
            raise BnfoldError(f"count must be between 1 and {MAX_COUNT:,}, got {self.count!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= _MASK64:
            raise BnfoldError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise BnfoldError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise BnfoldError(f"top-k must be an integer >= 1, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise BnfoldError(f"top-p must lie in (0, 1], got {p!r}")
        if not _is_int(self.max_length) or not 1 <= self.max_length <= MAX_LENGTH_CAP:
            raise BnfoldError(
                f"max-length must be between 1 and {MAX_LENGTH_CAP}, got {self.max_length!r}"
            )
        if not _is_int(self.min_length) or self.min_length < 0:
            raise BnfoldError(f"min-length must be an integer >= 0, got {self.min_length!r}")
        if self.min_length > self.max_length:
            raise BnfoldError(
                f"min-length {self.min_length} is greater than max-length {self.max_length}"
            )
        if not isinstance(self.prefix, str):
            raise BnfoldError(f"prefix must be a string, got {type(self.prefix).__name__}")
        unknown = vocab.unknown_chars(self.prefix)
        if unknown:
            shown = ", ".join(repr(c) for c in unknown)
            raise BnfoldError(
                f"prefix {self.prefix!r} has characters outside the model's vocabulary: {shown}"
            )
        if len(self.prefix) > self.max_length:
            raise BnfoldError(
                f"prefix has {len(self.prefix)} characters, more than max-length {self.max_length}"
            )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in _OPTION_NAMES}


_OPTION_NAMES = tuple(f.name for f in fields(SampleOptions))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class SampledName(NamedTuple):
    """One sampled name (a named tuple: cheap to make by the hundred thousand)."""

    name: str
    label: str | None  # "train" / "dev" / "test" / "new"; None when no words file was given
    logprob: float  # model log P(name + end token) at temperature 1, natural log
    index: int  # the name's random-stream index within its request (its draw number)

    def to_dict(self) -> dict:
        return self._asdict()


# ---------------------------------------------------------------------- random streams


def stream_key(seed: int) -> np.uint64:
    """The 64-bit key of a seed: one splitmix64 step, so nearby seeds give unrelated keys."""
    return np.uint64(_mix64_int((seed * _GOLDEN + _GOLDEN) & _MASK64))


def _mix64_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def uniforms(key: np.uint64 | np.ndarray, names: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """float32 uniforms in [0, 1): draw ``draws[j]`` of the stream of name ``names[j]``.

    ``key`` is one stream key (:func:`stream_key`) or one per name (``key[j]``), so rows of
    different seeds are drawn together.

    splitmix64 at counter ``(name << 16) + draw``: 24 random bits per draw (the resolution
    of the float32 probabilities they are compared with).
    """
    z = (names.astype(np.uint64) << np.uint64(_STEP_BITS)) + draws.astype(np.uint64)
    z += np.uint64(1)
    z *= np.uint64(_GOLDEN)
    z += key
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MIX2)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


# ------------------------------------------------------------------------------ engine


def group_key(options: SampleOptions) -> tuple:
    """What the rows of one engine share: every option but seed, count, prefix, new_only.

    Requests with the same group key are sampled by the same :class:`SamplerEngine`, their
    rows side by side in one ``advance``; seed (each row carries its stream key), prefix
    (each request its start context) and count (each request its name range) vary by row.
    """
    o = options
    return (o.temperature, o.top_k, o.top_p, o.min_length, o.max_length)


class SampleJob:
    """One request's work inside a :class:`SamplerEngine`: names ``start .. stop-1`` of the
    random streams of its seed. Results land in ``names`` / ``logprobs`` (indexed by
    ``name index - start``); the job is ``done`` when all of them are in. ``tag`` is the
    caller's (the service keeps its request there)."""

    __slots__ = (
        "options",
        "start",
        "stop",
        "tag",
        "key",
        "names",
        "logprobs",
        "next_name",
        "left",
        "inflight",
        "slot",
        "ctx0",
        "codes0",
        "prefix_len",
        "prefix_lp",
    )

    def __init__(self, options: SampleOptions, start: int, stop: int, tag=None):
        self.options = options
        self.start, self.stop, self.next_name = start, stop, start
        self.tag = tag
        self.key = stream_key(options.seed)
        self.names: list[str | None] = [None] * (stop - start)
        self.logprobs = np.zeros(stop - start, dtype=np.float64)
        self.left = stop - start  # names not finished yet
        self.inflight = 0  # rows sampling this job's names right now
        self.slot = -1  # index in the engine's job table while it is there

    @property
    def done(self) -> bool:
        return self.left == 0


_ROW_ARRAYS = ("ctx", "name", "key", "drawn", "length", "lp", "codes", "job")


class SamplerEngine:
    """Step-level state of the names in flight, for any number of requests (jobs).

    An engine samples every job submitted to it whose options share its :func:`group_key`;
    up to ``batch_size`` names are in flight at once, from any mix of jobs, and each forward
    step is one ``advance`` over all of them. :meth:`submit` queues a job; :meth:`admit`
    starts queued names in free rows (up to a limit the caller may set, so that several
    engines can share one forward pass); :meth:`advance` consumes the logits of
    :meth:`contexts`, samples one token per row, records finished names into their job,
    refills the freed rows from the queue (first come, first served, at most ``job_rows``
    rows per job) and returns the jobs that finished. Drive it with
    ``while not e.done: e.admit(); e.advance(runtime(e.contexts()))``
    (:func:`run_engine`).

    Per row: ``ctx`` (the model input), ``name`` (stream index), ``key`` (its job's stream
    key), ``drawn`` (uniforms used), ``length`` (characters so far, prefix included), ``lp``
    (log-probability so far), ``codes`` (the name as Unicode code points, zero-padded) and
    ``job`` (the job's slot). Row order never matters: a row's draws depend only on its
    (key, name, draw) and its own logits.
    """

    def __init__(
        self,
        vocab: Vocab,
        block_size: int,
        options: SampleOptions,
        *,
        batch_size: int = DEFAULT_BATCH,
        job_rows: int | None = None,
    ):
        for what, v in (("batch size", batch_size), ("job rows", job_rows)):
            if v is not None and (not _is_int(v) or v < 1):
                raise BnfoldError(f"{what} must be a positive integer, got {v!r}")
        self.options = options.check(vocab)
        self.group = group_key(options)
        self.vocab = vocab
        self.block_size = block_size
        self.batch_size = int(batch_size)
        self.job_rows = int(job_rows or batch_size)
        o = options
        self._filtered = o.temperature != 1 or o.top_k is not None or o.top_p is not None
        self._width = o.max_length + 1  # room for the (zero) end-token code at max_length
        self._codepoints = np.array([0, *(ord(c) for c in vocab.chars)], dtype=np.uint32)
        self._as_str = "\x00" not in vocab.chars  # NUL would be stripped by numpy's str view
        self._count = np.uint8 if vocab.size <= 255 else np.int64  # tokens below the draw
        self._starts: dict[str, tuple] = {}  # prefix -> (start context, codes, length)
        self._queue: collections.deque[SampleJob] = collections.deque()  # names to start
        self.queued = 0  # names of queued jobs not started yet
        self._jobs: list[SampleJob | None] = []  # slot -> job (submitted, not finished)
        self._free: list[int] = []
        self.running = 0  # jobs with names started and not all finished
        self.n = 0  # rows in flight: the first n rows of every buffer
        self._cap = 0
        self._buf: dict[str, np.ndarray] = {}
        self._grow(0)

    # -- state
    @property
    def done(self) -> bool:
        """No row in flight and nothing queued."""
        return self.n == 0 and not self._queue

    @property
    def active(self) -> int:
        return self.n

    @property
    def jobs(self) -> int:
        """Jobs submitted and not finished (queued or running)."""
        return len(self._jobs) - len(self._free)

    def unfinished(self) -> list[SampleJob]:
        """The jobs submitted and not finished (queued or running)."""
        return [j for j in self._jobs if j is not None]

    def contexts(self) -> np.ndarray:
        """(active rows, block_size) int64: the model inputs for the next step."""
        return self.ctx

    # -- buffers
    def _grow(self, need: int) -> None:
        """Make room for ``need`` rows (at most ``batch_size``), keeping the rows in flight."""
        cap = min(self.batch_size, max(need, 2 * self._cap, 16))
        if self._buf and cap <= self._cap:
            return
        n, old, v = self.n, self._buf, self.vocab.size
        shapes = {
            "ctx": ((cap, self.block_size), np.int64),
            "name": (cap, np.int64),
            "key": (cap, np.uint64),
            "drawn": (cap, np.int64),
            "length": (cap, np.int64),
            "lp": (cap, np.float64),
            "codes": ((cap, self._width), np.uint32),
            "job": (cap, np.int64),
        }
        buf = {}
        for attr, (shape, dtype) in shapes.items():
            buf[attr] = np.empty(shape, dtype=dtype)
            if n:
                buf[attr][:n] = old[attr][:n]
        self._buf, self._cap = buf, cap
        # scratch, reused every step: next contexts, and the (vocab, rows) CDF and its test
        self._ctx_spare = np.empty_like(buf["ctx"])
        self._cdf = np.empty((v, cap), dtype=np.float32)
        self._below = np.empty((v, cap), dtype=bool)
        self._view()

    def _view(self) -> None:
        n = self.n
        for attr in _ROW_ARRAYS:
            setattr(self, attr, self._buf[attr][:n])

    def _compact(self, keep: np.ndarray) -> None:
        """Keep only the rows in flight where ``keep`` (a bool mask over them) is True."""
        m = int(np.count_nonzero(keep))
        for attr in _ROW_ARRAYS:
            b = self._buf[attr]
            b[:m] = getattr(self, attr)[keep]
        self.n = m
        self._view()

    # -- jobs
    def submit(
        self,
        options: SampleOptions,
        prefix_logprob: float = 0.0,
        *,
        start: int = 0,
        stop: int | None = None,
        tag=None,
    ) -> SampleJob:
        """Queue names ``start .. stop-1`` (default ``0 .. count-1``) of ``options``' seed.

        ``options`` must share the engine's :func:`group_key`; ``prefix_logprob`` is the
        model's log P(prefix) (:func:`prefix_logprob`), the starting log-probability.
        """
        options.check(self.vocab)
        if group_key(options) != self.group:
            raise BnfoldError(
                f"options {group_key(options)} belong to another engine than {self.group}"
            )
        stop = start + options.count if stop is None else stop
        if not _is_int(start) or not _is_int(stop):
            raise BnfoldError(f"bad name range [{start!r}, {stop!r})")
        if not 0 <= start <= stop or stop >= 1 << (64 - _STEP_BITS):
            raise BnfoldError(f"bad name range [{start}, {stop})")
        job = SampleJob(options, int(start), int(stop), tag)
        job.ctx0, job.codes0, job.prefix_len = self._start_of(options.prefix)
        job.prefix_lp = float(prefix_logprob)
        if job.left == 0:
            return job  # nothing to sample: done already
        if self._free:
            job.slot = self._free.pop()
            self._jobs[job.slot] = job
        else:
            job.slot = len(self._jobs)
            self._jobs.append(job)
        self._queue.append(job)
        self.queued += job.left
        return job

    def _start_of(self, prefix: str) -> tuple:
        got = self._starts.get(prefix)
        if got is None:
            ids = self.vocab.encode(prefix)
            ctx = np.asarray(([END] * self.block_size + ids)[-self.block_size :], dtype=np.int64)
            codes = np.zeros(self._width, dtype=np.uint32)
            codes[: len(ids)] = self._codepoints[ids]
            got = (ctx, codes, len(ids))
            if len(self._starts) >= 1024:
                self._starts.clear()
            self._starts[prefix] = got
        return got

    def cancel(self, job: SampleJob) -> None:
        """Drop ``job`` (queued or running): its rows leave the batch, its names stay unset."""
        if job.slot < 0 or self._jobs[job.slot] is not job:
            return  # finished or cancelled already
        if job.next_name < job.stop:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self.queued -= job.stop - job.next_name
        if job.inflight:
            self._compact(self.job != job.slot)
            job.inflight = 0
        self._release(job)

    def _release(self, job: SampleJob) -> None:
        if job.next_name > job.start:
            self.running -= 1
        self._jobs[job.slot] = None
        self._free.append(job.slot)
        job.slot = -1

    def admit(self, limit: int | None = None) -> int:
        """Start queued names in free rows: at most ``limit`` (default: up to ``batch_size``
        rows in flight). Returns how many were started."""
        room = self.batch_size - self.n
        if limit is not None:
            room = min(room, limit)
        room = min(room, self.queued)
        if room <= 0:
            return 0
        n = self.n
        if n + room > self._cap:
            self._grow(n + room)
        k = self._fill(np.arange(n, n + room))
        if k:
            self.n = n + k
            self._view()
        return k

    def _fill(self, slots: np.ndarray) -> int:
        """Start queued names in rows ``slots`` (first come, first served, at most
        ``job_rows`` rows per job); returns how many of the slots (a prefix) were filled."""
        q = self._queue
        total = len(slots)
        i = j = 0
        b = self._buf
        cap = self.job_rows
        while i < total and j < len(q):
            job = q[j]
            k = min(total - i, job.stop - job.next_name, cap - job.inflight)
            if k <= 0:
                j += 1
                continue
            s = slots[i : i + k]
            if s[-1] - s[0] == k - 1:  # contiguous: a slice is faster than fancy indexing
                s = slice(int(s[0]), int(s[0]) + k)
            first = job.next_name
            b["name"][s] = np.arange(first, first + k)
            b["key"][s] = job.key
            b["ctx"][s] = job.ctx0
            b["drawn"][s] = 0
            b["length"][s] = job.prefix_len
            b["lp"][s] = job.prefix_lp
            b["codes"][s] = job.codes0
            b["job"][s] = job.slot
            if first == job.start:
                self.running += 1
            job.next_name = first + k
            job.inflight += k
            self.queued -= k
            if job.next_name == job.stop:
                del q[j]
            i += k
        return i

    # -- the step
    def advance(self, logits: np.ndarray) -> list[SampleJob]:
        """Consume the logits of :meth:`contexts`: sample one token per row, finish the rows
        that drew the end token, refill (or, when nothing is queued, drop) them; returns the
        jobs that finished in this step."""
        n = self.n
        z = np.asarray(logits, dtype=np.float32)
        if z.shape != (n, self.vocab.size):
            raise BnfoldError(f"expected logits of shape {(n, self.vocab.size)}, got {z.shape}")
        o = self.options
        rows = np.arange(n)
        no_end = self.length < o.min_length
        if self._filtered:
            tok, lse = self._sample_filtered(z, no_end)
        else:
            tok, lse = self._sample_plain(z, no_end)
        tok[self.length >= o.max_length] = END  # the name is long enough: it stops here
        self.lp += z[rows, tok] - lse  # log-softmax at temperature 1 of the chosen token

        self.codes[rows, self.length] = self._codepoints[tok]  # END writes the 0 terminator
        ended = tok == END
        any_ended = bool(ended.any())
        done = self._finish(np.flatnonzero(ended)) if any_ended else []
        nxt = self._ctx_spare[:n]
        nxt[:, :-1] = self.ctx[:, 1:]
        nxt[:, -1] = tok
        self._buf["ctx"], self._ctx_spare = self._ctx_spare, self._buf["ctx"]
        self.ctx = nxt
        self.length += 1
        self.drawn += 1
        if any_ended:
            self._refill_or_drop(ended)
        return done

    def _refill_or_drop(self, ended: np.ndarray) -> None:
        slots = np.flatnonzero(ended)
        k = self._fill(slots) if self._queue else 0
        if k < len(slots):  # nothing left to start: compact the survivors
            keep = np.ones(len(ended), dtype=bool)
            keep[slots[k:]] = False
            self._compact(keep)

    def _sample_plain(self, z: np.ndarray, no_end: np.ndarray):
        """Temperature 1, no filters, the hot path: inverse CDF on exp(z), laid out
        (vocab, rows) so that every numpy call below is a long contiguous vector operation.

        z is not shifted by its row max: rows whose total falls outside [2**-100, 2**100]
        (never for a trained model) are redone shifted, so each row's arithmetic depends on
        that row's logits alone.
        """
        n, vocab = z.shape
        cdf = self._cdf[:, :n]
        with np.errstate(over="ignore"):  # overflowing rows are redone below
            np.exp(z.T, out=cdf)
        e0 = None
        if no_end.any():  # below min-length: mask the end token, remember its mass
            e0 = np.where(no_end, cdf[END], np.float32(0))
            cdf[END, no_end] = 0
        if n < 200:  # one call; the same sequential float32 sums as the loop below
            np.add.accumulate(cdf, axis=0, out=cdf)
        else:  # many rows: vocab long vector additions are faster than accumulate's walk
            for j in range(1, vocab):
                np.add(cdf[j - 1], cdf[j], out=cdf[j])
        total = cdf[-1]
        bad = ~((total >= np.float32(2.0**-100)) & (total <= np.float32(2.0**100)))
        bad_rows = np.flatnonzero(bad) if bad.any() else None
        if bad_rows is not None:
            cdf[:, bad_rows] = _shifted_cdf(z[bad_rows], no_end[bad_rows]).T
        tok = self._inverse_cdf(cdf, total)
        lse = np.log(total if e0 is None else total + e0, dtype=np.float64)
        if bad_rows is not None:
            lse[bad_rows] = _logsumexp(z[bad_rows])
        return tok, lse

    def _sample_filtered(self, z: np.ndarray, no_end: np.ndarray):
        """Greedy, temperature != 1, top-k or top-p: scale and filter a shifted copy of z.

        float32 first; a row whose weights come out unusable (a temperature so small that
        z / T overflows, or float32(T) is 0, leaving no finite weight) is redone in float64
        with the end-token mask applied *before* the shift by the row max, so the most
        likely allowed token keeps weight exactly 1 whatever the temperature.
        """
        o = self.options
        lse = _logsumexp(z)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            s = z - z.max(axis=1, keepdims=True)
            if not o.greedy:
                s /= np.float32(o.temperature)
            s[no_end, END] = -np.inf
            self._top_k(s)
            if o.greedy:
                return s.argmax(axis=1), lse
            cdf = np.cumsum(self._weights(s), axis=1)
        bad = ~(cdf[:, -1] > 0)  # NaN or no mass left
        if bad.any():
            r = np.flatnonzero(bad)
            s = z[r].astype(np.float64)
            s[no_end[r], END] = -np.inf
            s -= s.max(axis=1, keepdims=True)
            with np.errstate(divide="ignore", over="ignore", under="ignore"):
                s /= o.temperature
            self._top_k(s)
            cdf[r] = np.cumsum(self._weights(s), axis=1)
        cdf = cdf.T
        return self._inverse_cdf(cdf, cdf[-1]), lse

    def _top_k(self, s: np.ndarray) -> None:
        k = self.options.top_k
        if k is not None and k < s.shape[1]:
            kth = s.shape[1] - k
            s[s < np.partition(s, kth, axis=1)[:, kth : kth + 1]] = -np.inf

    def _weights(self, s: np.ndarray) -> np.ndarray:
        """Unnormalised weights exp(s - row max), top-p filtered."""
        e = np.exp(s - s.max(axis=1, keepdims=True))
        top_p = self.options.top_p
        if top_p is not None and top_p < 1:
            p = e / e.sum(axis=1, keepdims=True)
            desc = -np.sort(-p, axis=1)
            before = np.cumsum(desc, axis=1) - desc  # mass of the more likely tokens
            keep = (before < np.float32(top_p)).sum(axis=1)  # >= 1: the top token stays
            cutoff = desc[np.arange(len(p)), keep - 1]
            e[p < cutoff[:, None]] = 0
        return e

    def _inverse_cdf(self, cdf: np.ndarray, total: np.ndarray) -> np.ndarray:
        """Per row (a column of the (vocab, rows) ``cdf``), the token j with
        cdf[j-1] <= u * total < cdf[j], u being the row's next uniform: the number of
        cumulative sums <= u * total. Tokens of zero probability can never be chosen."""
        u = uniforms(self.key, self.name, self.drawn)
        target = np.minimum(u * total, np.nextafter(total, np.float32(0)))
        below = np.less_equal(cdf, target, out=self._below[:, : cdf.shape[1]])
        return np.add.reduce(below.view(np.uint8), axis=0, dtype=self._count)

    def _finish(self, rows: np.ndarray) -> list[SampleJob]:
        """Record the names of finished ``rows`` into their jobs (called before their lengths
        advance); returns the jobs this completes."""
        lengths = self.length[rows]
        width = int(lengths.max()) + 1  # code points up to and including the 0 terminator
        codes = self.codes[rows, :width]
        if self._as_str:  # numpy's str view decodes UTF-32 and drops the trailing zeros
            words = codes.view(np.dtype(("U", width))).ravel().tolist()
        else:
            words = ["".join(map(chr, r[:n])) for r, n in zip(codes, lengths, strict=True)]
        slots = self.job[rows]
        names = self.name[rows]
        lps = self.lp[rows]
        jobs = self._jobs
        done: list[SampleJob] = []
        first = slots[0]
        if len(rows) == 1 or (slots == first).all():  # one job (always so for the CLI)
            job = jobs[first]
            index = (names - job.start).tolist()
            out = job.names
            for i, w in zip(index, words, strict=True):
                out[i] = w
            job.logprobs[index] = lps
            job.left -= len(rows)
            job.inflight -= len(rows)
            if job.left == 0:
                done.append(job)
                self._release(job)
            return done
        for s, i, w, lp in zip(slots.tolist(), names.tolist(), words, lps.tolist(), strict=True):
            job = jobs[s]
            i -= job.start
            job.names[i] = w
            job.logprobs[i] = lp
            job.inflight -= 1
            job.left -= 1
            if job.left == 0:
                done.append(job)
                self._release(job)
        return done


def _logsumexp(z: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(z))) in float64, stable for any finite logits."""
    z = z.astype(np.float64)
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def _shifted_cdf(z: np.ndarray, no_end: np.ndarray) -> np.ndarray:
    """(rows, vocab) cumulative exp(z - row max), the end token masked where ``no_end``."""
    s = z.astype(np.float64)
    s[no_end, END] = -np.inf
    e = np.exp(s - s.max(axis=1, keepdims=True)).astype(np.float32)
    return np.cumsum(e, axis=1)


# ---------------------------------------------------------------------- driver and API


def prefix_logprob(predictor: Predictor, prefix: str) -> float:
    """Model log P(prefix characters) at temperature 1: one forward pass over its contexts."""
    if not prefix:
        return 0.0
    ids = [END] * predictor.block_size + predictor.vocab.encode(prefix)
    b = predictor.block_size
    ctx = np.asarray([ids[i : i + b] for i in range(len(prefix))], dtype=np.int64)
    z = predictor.logits(ctx).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float((z[np.arange(len(prefix)), ids[b:]] - lse).sum())


def run_engine(predictor: Predictor, engine: SamplerEngine) -> SamplerEngine:
    """Step ``engine`` to completion on ``predictor``; returns it (results in its jobs)."""
    while not engine.done:
        engine.admit()
        engine.advance(predictor.logits(engine.contexts()))
    return engine


class Labeler:
    """Novelty labels as in makemore: is a name in the train, dev or test split, or new?

    The split is ``bnfold.data.split_words`` of the words file the model was trained on; the
    file's sha256 is checked against the model's ``data_sha256`` metadata when the model
    carries it (``verified``), and a different file is refused (its labels would be wrong).
    """

    def __init__(self, words_file: str | Path, expected_sha256: str | None = None):
        self.path = Path(words_file)
        words = read_words(self.path)
        self.sha256 = file_sha256(self.path)
        if expected_sha256 is not None and expected_sha256 != self.sha256:
            raise BnfoldError(
                f"{self.path} (sha256 {self.sha256[:12]}...) is not the words file this model"
                f" was trained on (sha256 {expected_sha256[:12]}...); pass the training file"
                " with --words so the train/dev/test/new labels are right"
            )
        self.verified = expected_sha256 is not None
        self._label: dict[str, str] = {}
        for label, split in reversed(list(zip(LABELS[:3], split_words(words), strict=True))):
            self._label.update(dict.fromkeys(split, label))  # train wins over dev over test

    def __call__(self, name: str) -> str:
        return self._label.get(name, "new")


def model_data_sha256(predictor: Predictor) -> str | None:
    """sha256 of the words file the model was trained on, if the model file records it."""
    for meta in (
        getattr(predictor, "metadata", None),  # ONNX files (bnfold.onnx_runtime)
        getattr(getattr(predictor, "checkpoint", None), "meta", None),  # .pt checkpoints
    ):
        if isinstance(meta, dict) and meta.get("data_sha256"):
            return str(meta["data_sha256"])
    return None


def load_labeler(predictor: Predictor, words_file: str | Path) -> Labeler:
    return Labeler(words_file, model_data_sha256(predictor))


def sample_names(
    predictor: Predictor,
    options: SampleOptions,
    labeler: Labeler | None = None,
    *,
    batch_size: int = DEFAULT_BATCH,
) -> list[SampledName]:
    """Sample ``options.count`` names (only new ones with ``new_only``), in stream order.

    The result depends on the model, ``options`` and the labeler's words, not on
    ``batch_size``. ``new_only`` needs a ``labeler``: it draws names 0, 1, 2, ... and
    returns the first ``count`` labelled new, giving up with a ``BnfoldError`` after
    ``20 * count + 10,000`` draws (greedy sampling, where every draw is the same name,
    after ``count``).
    """
    options.check(predictor.vocab)
    if options.new_only and labeler is None:
        raise BnfoldError("new-only sampling needs the training words file (--words)")
    lp0 = prefix_logprob(predictor, options.prefix)

    def draw(start: int, stop: int) -> list[SampledName]:
        engine = SamplerEngine(
            predictor.vocab, predictor.block_size, options, batch_size=batch_size
        )
        job = engine.submit(options, lp0, start=start, stop=stop)
        run_engine(predictor, engine)
        names = job.names
        labels = map(labeler, names) if labeler else [None] * len(names)
        rows = zip(names, labels, job.logprobs.tolist(), range(start, stop), strict=True)
        with _gc_paused():  # 100k new tuples would otherwise set off many GC passes
            return list(map(_make_sampled_name, rows))

    if not options.new_only:
        return draw(0, options.count)
    return _new_only(options, draw)


_make_sampled_name = functools.partial(tuple.__new__, SampledName)  # C-speed constructor


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _new_only(options: SampleOptions, draw) -> list[SampledName]:
    """Draw in rounds sized by the new-name rate seen so far; keep the first ``count`` new."""
    want = options.count
    limit = want if options.greedy else NEW_ONLY_DRAWS[0] * want + NEW_ONLY_DRAWS[1]
    found: list[SampledName] = []
    drawn = 0
    while len(found) < want and drawn < limit:
        need = want - len(found)
        rate = len(found) / drawn if found else 0.5
        size = min(limit - drawn, max(64, math.ceil(need / max(rate, 0.01) * 1.1)))
        found += [s for s in draw(drawn, drawn + size) if s.label == "new"]
        drawn += size
    if len(found) < want:
        raise BnfoldError(
            f"only {len(found):,} of {drawn:,} sampled names were new (wanted {want:,}): with"
            " these options the model mostly reproduces its training words; raise the"
            " temperature, loosen top-k/top-p, or drop --new-only"
        )
    return found[:want]


def label_counts(names: Iterable[SampledName]) -> dict[str, int]:
    """How many names carry each label."""
    counts = dict.fromkeys(LABELS, 0)
    for s in names:
        if s.label is not None:
            counts[s.label] += 1
    return counts
