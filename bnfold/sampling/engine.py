"""The sampling engine: jobs in, names out, one step at a time, never calling a model.

API (stable; :mod:`bnfold.sampling.sample` and the service drive it the same way)
-------------------------------------------------------------------------
An engine samples the jobs of one *option group* (:func:`~bnfold.sampling.options.group_key`:
temperature, top-k, top-p, min/max length) for one model
(a :class:`~bnfold.runtime.predictor.ModelSpec`:
vocab, block_size, sha256). It never runs the model: each step it says which contexts it
needs logits for, and the caller answers them, so a service can put the needs of many
engines into one forward pass.

* ``job = engine.submit(options, start=0, stop=None, tag=None)`` queues names
  ``start .. stop-1`` (default ``0 .. count-1``) of the random streams of ``options.seed``;
  seed, count and prefix may differ between jobs of one engine. ``tag`` is the caller's.
  With ``options.new_only`` the job is a *new-only job* (see below).
* ``engine.cancel(job)`` drops a queued or running job at once (its rows leave the batch).
* One step: ``engine.admit(limit=None)`` starts queued names in free rows (at most
  ``limit``; first come, first served, at most ``job_rows`` rows per job);
  ``ctx = engine.needs()`` is the (m, block_size) int64 contexts whose logits the step
  needs (m may be 0: then skip the forward pass); ``finished = engine.step(logits)``
  consumes the logits of exactly those contexts ((m, vocab) float32, or None when m is 0),
  draws one token for every row in flight, and returns the jobs that finished in this
  step (done, or failed with ``job.error`` set). ``engine.done`` is True when nothing is
  queued or in flight. :func:`run_engine` in :mod:`bnfold.sampling.sample` is this loop.
* Results: ``job.names`` / ``job.logprobs`` / ``job.indexes`` (stream indexes, in order).

Engines (``kind``): ``"network"`` needs the logits of every row's context at every step
and derives its sampling row from them (the context read from the row's own tokens, so
any block size works); ``"table"`` keeps every derived row in a
:class:`~bnfold.sampling.table.RowTable` and needs logits only for contexts it has not
seen (or has evicted), so once warm a step costs no forward pass at all. When the whole
domain fits the table and has at most :data:`PRECOMPUTE_CONTEXTS` contexts (19,683 for the
shipped model), the first step asks for every context at once (the end-masked variants
below min-length still come lazily). The table keys a context by its integer code (an
int64): a domain past :data:`MAX_DOMAIN` contexts (27**14 > 2**63) is sampled by the
network engine instead, with the same names. Both draw with
the same pure functions (:mod:`bnfold.sampling.tokens`), so they give identical names and
log-probabilities; the table answers most draws with one guide-table lookup, which is
exact (see :func:`~bnfold.sampling.tokens.guide_rows`).

Prefixes go through the normal step: a row starts at the empty context and its first
``len(prefix)`` tokens are forced (no draw is used; their log-probability is added), so
the prefix's contexts are needed and stored like any others.

New-only jobs: every finished name is labelled with the engine's ``labeler``; names not
labelled "new" are dropped and the job keeps drawing names ``start, start+1, ...`` until
it has ``count`` new ones, then returns the first ``count`` new names in stream order
(``job.indexes`` says which). It fails (``job.error``) after ``20 * count + 10,000``
draws (``count`` when greedy, where every draw is the same name).

Memory: rows in flight cost ``batch_size * (max_length + 60)`` bytes or so; the table is
allocated at the first step, sized to hold every context of the domain when it fits in
``table_bytes`` (default :data:`DEFAULT_TABLE_BYTES`), else a bounded cache of that size.
``engine.nbytes`` is their total; ``engine.release()`` (only when ``done``) frees the
table and the row buffers; the next job builds them again.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.mlp.data import END
from bnfold.runtime.predictor import ModelSpec
from bnfold.sampling.options import (
    DEFAULT_BATCH,
    NEW_ONLY_DRAWS,
    SampleOptions,
    group_key,
    is_int,
)
from bnfold.sampling.rows import Rows
from bnfold.sampling.table import RowTable
from bnfold.sampling.tokens import (
    STEP_BITS,
    UNIFORM_BITS,
    bits_to_uniform,
    filtered_rows,
    guide_rows,
    inverse_cdf,
    plain_rows,
    stream_key,
    uniform_bits,
)

ENGINES = ("table", "network")
DEFAULT_ENGINE = "table"
DEFAULT_TABLE_BYTES = 256 << 20  # 256 MiB of stored rows per engine
MAX_TABLE_BYTES = 4096 << 20  # refused beyond (up front, not by a MemoryError half-way)
MAX_DOMAIN = 1 << 61  # context codes (and masked keys, 2x) must fit an int64
PRECOMPUTE_CONTEXTS = 1 << 17  # up to this many contexts, the first step asks for them all
STORE_CHUNK = 4096  # new rows derived and stored at a time


def engine_kind(kind: str, vocab_size: int, block_size: int) -> str:
    """The engine that samples a model of ``vocab_size ** block_size`` contexts when
    ``kind`` is asked for: the table keys a context by its int64 code, so a domain past
    :data:`MAX_DOMAIN` (27**14 > 2**63) goes to the network engine, which needs no code
    and gives the very same names, only without stored rows."""
    return "network" if kind == "table" and vocab_size**block_size > MAX_DOMAIN else kind


def new_only_limit(options: SampleOptions) -> int:
    """How many names a new-only request may draw: ``20 * count + 10,000``, or ``count``
    when greedy (every draw is the same name)."""
    want = options.count
    return want if options.greedy else NEW_ONLY_DRAWS[0] * want + NEW_ONLY_DRAWS[1]


def new_only_failure(found: int, drawn: int, want: int) -> BnfoldError:
    return BnfoldError(
        f"only {found:,} of {drawn:,} sampled names were new (wanted {want:,}): with these"
        " options the model mostly reproduces its training words; raise the temperature,"
        " loosen top-k/top-p, or drop --new-only"
    )


class SampleJob:
    """One request's work inside a :class:`SamplerEngine`.

    Results: ``names`` / ``logprobs`` (indexed by position), ``indexes`` (the stream index
    of each name: ``start .. stop-1``, or the new names' for a new-only job). ``done`` when
    finished or failed; ``error`` holds the failure.
    """

    __slots__ = (
        "options",
        "start",
        "stop",
        "tag",
        "key",
        "_names",
        "logprobs",
        "next_name",
        "left",
        "inflight",
        "slot",
        "prefix_ids",
        "new_only",
        "found",
        "done",
        "error",
    )

    def __init__(self, options: SampleOptions, start: int, stop: int, tag=None):
        self.options = options
        self.start, self.stop, self.next_name = start, stop, start
        self.tag = tag
        self.key = stream_key(options.seed)
        self.new_only = bool(options.new_only)
        self._names = np.full(0 if self.new_only else stop - start, None, dtype=object)
        self.logprobs = np.zeros(0 if self.new_only else stop - start, dtype=np.float64)
        self.found: list[tuple[int, str, float]] = []  # new-only: (index, name, logprob)
        self.left = options.count if self.new_only else stop - start
        self.inflight = 0  # rows sampling this job's names right now
        self.slot = -1  # index in the engine's job table while it is there
        self.done = False  # finished or failed
        self.error: BnfoldError | None = None

    @property
    def names(self) -> list[str | None]:
        """The names by position (None where not sampled yet)."""
        return self._names.tolist()

    @property
    def indexes(self) -> list[int]:
        if self.new_only:
            return [i for i, _, _ in self.found]
        return list(range(self.start, self.stop))


class SamplerEngine:
    """Rows in flight, jobs, and the step that draws one token per row (see the module)."""

    def __init__(
        self,
        model: ModelSpec,
        options: SampleOptions,
        *,
        kind: str = DEFAULT_ENGINE,
        batch_size: int = DEFAULT_BATCH,
        job_rows: int | None = None,
        table_bytes: int = DEFAULT_TABLE_BYTES,
        labeler: Callable[[str], str] | None = None,
    ):
        for what, v in (("batch size", batch_size), ("job rows", job_rows)):
            if v is not None and (not is_int(v) or v < 1):
                raise BnfoldError(f"{what} must be a positive integer, got {v!r}")
        if kind not in ENGINES:
            raise BnfoldError(f"engine must be one of {', '.join(ENGINES)}, got {kind!r}")
        if not is_int(table_bytes) or table_bytes < 1:
            raise BnfoldError(f"table size must be a positive number of bytes, got {table_bytes!r}")
        if table_bytes > MAX_TABLE_BYTES:
            raise BnfoldError(
                f"table size must be at most {MAX_TABLE_BYTES >> 20:,} MiB, got"
                f" {table_bytes:,} bytes"
            )
        vocab, T = model.vocab, model.block_size
        domain = vocab.size**T
        kind = engine_kind(kind, vocab.size, T)
        self.model = model
        self.options = options.check(vocab)
        self.group = group_key(options)
        self.kind = kind
        self.vocab = vocab
        self.block_size = T
        self.batch_size = int(batch_size)
        self.job_rows = int(job_rows or batch_size)
        self.table_bytes = int(table_bytes)
        self.labeler = labeler
        o = options
        self._filtered = o.temperature != 1 or o.top_k is not None or o.top_p is not None
        self._V = vocab.size
        self._domain = domain
        self._high = vocab.size ** (T - 1)  # code % high drops the oldest token
        self._width = o.max_length + 1  # room for the end token at max_length
        self._tok_dtype = np.uint8 if vocab.size <= 256 else np.uint16
        self._codepoints = np.array([0, *(ord(c) for c in vocab.chars)], dtype=np.uint32)
        self._as_str = "\x00" not in vocab.chars  # NUL would be stripped by numpy's str view
        self._queue: collections.deque[SampleJob] = collections.deque()  # names to start
        self.queued = 0  # names of queued jobs not started yet
        self._jobs: list[SampleJob | None] = []  # slot -> job (submitted, not finished)
        self._free: list[int] = []
        self.running = 0  # jobs with names started and not finished
        self.rows = Rows.allocate(0, self._width, self._tok_dtype)
        self.table: RowTable | None = None
        self._plan: _Plan | None = None
        self.steps = 0
        self.forward_rows = 0  # contexts asked of the caller so far

    # -- state
    @property
    def done(self) -> bool:
        """No row in flight and nothing queued."""
        return self.rows.n == 0 and not self._queue

    @property
    def n(self) -> int:
        """Rows in flight."""
        return self.rows.n

    active = n

    @property
    def jobs(self) -> int:
        """Jobs submitted and not finished (queued or running)."""
        return len(self._jobs) - len(self._free)

    def unfinished(self) -> list[SampleJob]:
        """The jobs submitted and not finished (queued or running)."""
        return [j for j in self._jobs if j is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of the row buffers and the table (what ``release`` frees)."""
        return self.rows.nbytes + (self.table.nbytes if self.table is not None else 0)

    def release(self) -> None:
        """Free the table and the row buffers (only when ``done``; the next job rebuilds)."""
        if not self.done:
            raise BnfoldError("cannot release an engine with names in flight or queued")
        self.table = None
        self.rows = Rows.allocate(0, self._width, self._tok_dtype)
        self._plan = None

    # -- jobs
    def submit(
        self, options: SampleOptions, *, start: int = 0, stop: int | None = None, tag=None
    ) -> SampleJob:
        """Queue names ``start .. stop-1`` (default ``start .. start + count - 1``) of
        ``options``' seed; a new-only job draws from ``start`` on until it has ``count``
        new names. ``options`` must share the engine's :func:`group_key`."""
        options.check(self.vocab)
        if group_key(options) != self.group:
            raise BnfoldError(
                f"options {group_key(options)} belong to another engine than {self.group}"
            )
        if options.new_only:
            if self.labeler is None:
                raise BnfoldError("new-only sampling needs the training words file (--words)")
            stop = new_only_limit(options) if stop is None else stop  # counted from name 0
        elif stop is None:
            stop = start + options.count
        if not is_int(start) or not is_int(stop):
            raise BnfoldError(f"bad name range [{start!r}, {stop!r})")
        if not 0 <= start <= stop or stop >= 1 << (64 - STEP_BITS):
            raise BnfoldError(f"bad name range [{start}, {stop})")
        job = SampleJob(options, int(start), int(stop), tag)
        job.prefix_ids = np.asarray(self.vocab.encode(options.prefix), dtype=self._tok_dtype)
        if job.stop == job.start:
            self._end_new_only(job) if job.new_only else None
            job.done = True
            return job  # nothing to sample
        if self._free:
            job.slot = self._free.pop()
            self._jobs[job.slot] = job
        else:
            job.slot = len(self._jobs)
            self._jobs.append(job)
        self._queue.append(job)
        self.queued += job.stop - job.start
        return job

    def cancel(self, job: SampleJob) -> None:
        """Drop ``job`` (queued or running): its rows leave the batch, its names stay unset."""
        if job.slot < 0 or self._jobs[job.slot] is not job:
            return  # finished or cancelled already
        self._unqueue(job)
        if job.inflight:
            r = self.rows
            self._plan = None
            r.compact(r.job[: r.n] != job.slot)
            job.inflight = 0
        self._release(job)

    def _unqueue(self, job: SampleJob) -> None:
        if job.next_name < job.stop:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self.queued -= job.stop - job.next_name
            job.stop = job.next_name

    def _release(self, job: SampleJob) -> None:
        if job.next_name > job.start:
            self.running -= 1
        self._jobs[job.slot] = None
        self._free.append(job.slot)
        job.slot = -1

    def admit(self, limit: int | None = None) -> int:
        """Start queued names in free rows: at most ``limit`` (default: up to ``batch_size``
        rows in flight). Returns how many were started."""
        r = self.rows
        room = self.batch_size - r.n
        if limit is not None:
            room = min(room, limit)
        room = min(room, self.queued)
        if room <= 0:
            return 0
        n = r.n
        if n + room > r.capacity:
            self.rows = r = r.grown(min(self.batch_size, max(n + room, 2 * r.capacity, 16)))
        k = self._fill(np.arange(n, n + room))
        r.n = n + k
        self._plan = None
        return k

    def _fill(self, slots: np.ndarray) -> int:
        """Start queued names in rows ``slots`` (first come, first served, at most
        ``job_rows`` rows per job); returns how many of the slots (a prefix) were filled."""
        q = self._queue
        total = len(slots)
        i = j = 0
        r = self.rows
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
            plen = len(job.prefix_ids)
            r.name[s] = np.arange(first, first + k)
            r.key[s] = job.key
            r.code[s] = 0  # the empty context: a prefix is forced through the normal step
            r.length[s] = 0
            r.plen[s] = plen
            r.lp[s] = 0.0
            if plen:
                r.toks[s, :plen] = job.prefix_ids
            r.job[s] = job.slot
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
    def needs(self) -> np.ndarray:
        """(m, block_size) int64: the contexts whose logits the next :meth:`step` needs."""
        if self._plan is None:
            self._plan = self._make_plan()
        if self._plan.codes is None:  # the network engine: every row's context
            return self._contexts()
        return self._decode(self._plan.codes)

    def _make_plan(self) -> _Plan:
        r = self.rows
        n = r.n
        length = r.length[:n]
        masked = length < self.options.min_length
        if self.kind == "network":  # no context codes: any domain size works
            return _Plan(None, masked, None, None, None, None)
        key = r.code[:n] + self._domain * masked if masked.any() else r.code[:n].copy()
        if self.table is None:
            self.table = RowTable(
                self.model.sha256, self.group, self._V, self._domain, self.table_bytes
            )
        t = self.table
        slot = t.slot_of(key)
        missing = t.key[slot] != key
        every = None
        if t.exact and self._domain <= PRECOMPUTE_CONTEXTS and t.stored == 0:
            every = np.arange(self._domain)  # a small domain: every context in one go
        if not missing.any() and every is None:
            return _Plan(key, masked, slot, None, np.empty(0, dtype=np.int64), None)
        wanted = key[missing]
        new_keys = np.unique(wanted if every is None else np.concatenate([wanted, every]))
        inverse = np.searchsorted(new_keys, wanted)
        return _Plan(key, masked, slot, missing, new_keys % self._domain, (new_keys, inverse))

    def _contexts(self) -> np.ndarray:
        """(n, block_size) int64: every row's context, read from its own tokens (the last
        ``block_size`` of them, the end token standing in before the name's start), so
        the network engine never forms the integer code, which overflows int64 once
        ``vocab ** block_size`` passes 2**63."""
        r = self.rows
        n, T = r.n, self.block_size
        pos = r.length[:n, None] - T + np.arange(T)
        ctx = r.toks[np.arange(n)[:, None], np.maximum(pos, 0)].astype(np.int64)
        ctx[pos < 0] = END
        return ctx

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        T, V = self.block_size, self._V
        ctx = np.empty((len(codes), T), dtype=np.int64)
        c = codes.copy()
        for j in range(T - 1, -1, -1):
            c, ctx[:, j] = np.divmod(c, V)
        return ctx

    def _derive(self, z: np.ndarray, no_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        o = self.options
        if self._filtered:
            return filtered_rows(z, no_end, o.temperature, o.top_k, o.top_p)
        return plain_rows(z, no_end)

    def step(self, logits: np.ndarray | None = None) -> list[SampleJob]:
        """Consume the logits of :meth:`needs`: draw one token per row in flight, finish
        the rows that drew the end token (or reached max-length), refill (or, when nothing
        is queued, drop) them; returns the jobs that finished in this step."""
        plan = self._plan if self._plan is not None else self._make_plan()
        self._plan = None
        r = self.rows
        n = r.n
        if n == 0:
            return []
        m = n if plan.codes is None else len(plan.codes)
        if m:
            z = np.asarray(logits, dtype=np.float32) if logits is not None else None
            if z is None or z.shape != (m, self._V):
                got = None if z is None else z.shape
                raise BnfoldError(f"expected logits of shape {(m, self._V)}, got {got}")
        elif logits is not None and len(logits):
            raise BnfoldError(f"expected no logits this step, got {np.shape(logits)}")
        self.forward_rows += m
        length = r.length[:n]
        plen = r.plen[:n]
        bits = uniform_bits(r.key[:n], r.name[:n], length - plen)
        if self.kind == "network":
            cdf, lp_rows = self._derive(z, plan.masked)
            tok = inverse_cdf(cdf, bits_to_uniform(bits))
            lp_of = lambda t: lp_rows[np.arange(n), t]  # noqa: E731
        else:
            tok, lp_of = self._draw_from_table(plan, z if m else None, bits)
        forced = length < plen
        if forced.any():
            f = np.flatnonzero(forced)
            tok[f] = r.toks[f, length[f]]
        tok[length >= self.options.max_length] = END  # long enough: the name stops here
        r.lp[:n] += lp_of(tok)
        r.toks[np.arange(n), length] = tok  # END writes the terminator
        ended = tok == END
        any_ended = bool(ended.any())
        done = self._finish(np.flatnonzero(ended)) if any_ended else []
        if self.kind == "table":  # the next context's code (the network engine has none)
            code = r.code[:n]
            code %= self._high
            code *= self._V
            code += tok
        length += 1
        self.steps += 1
        if any_ended:
            self._refill_or_drop(ended)
        return done

    def _draw_from_table(self, plan: _Plan, z: np.ndarray | None, bits: np.ndarray):
        """Tokens from stored rows: the guide bucket of the uniform's top bits, the full
        CDF only for buckets that hold a boundary; rows whose new context could not be
        stored (slot clash in a bounded table) draw from the freshly derived row."""
        t = self.table
        slot = plan.slot
        local = None
        if z is not None:
            local = self._store_new(plan, z)
        shift = np.uint64(UNIFORM_BITS - (t.buckets.bit_length() - 1))
        g = t.flat_guide[slot * t.buckets + (bits >> shift).astype(np.int64)]
        tok = g.astype(np.int64)
        split = g == t.split
        if split.any():
            s = np.flatnonzero(split)
            tok[s] = inverse_cdf(t.cdf[slot[s]], bits_to_uniform(bits[s]))
        if local is not None:
            rows, idx, cdf, lp = local
            tok[rows] = inverse_cdf(cdf[idx], bits_to_uniform(bits[rows]))

        def lp_of(tk: np.ndarray) -> np.ndarray:
            out = t.flat_lp[slot * t.vocab + tk]
            if local is not None:
                rows, idx, _, lp_local = local
                out[rows] = lp_local[idx, tk[rows]]
            return out

        return tok, lp_of

    def _store_new(self, plan: _Plan, z: np.ndarray):
        """Derive and store the rows of the step's new keys, ``STORE_CHUNK`` at a time (so
        a whole-domain first step stays small in memory). Returns what the rows whose key
        could not be stored (a slot clash in a bounded table) draw from instead:
        (those rows, their index among the new rows, cdf, lp), or None."""
        t = self.table
        new_keys, inverse = plan.new
        pinned = None if t.exact else plan.slot[~plan.missing]
        lost: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        bits = t.buckets.bit_length() - 1
        for s in range(0, len(new_keys), STORE_CHUNK):
            keys = new_keys[s : s + STORE_CHUNK]
            cdf, lp = self._derive(z[s : s + STORE_CHUNK], keys >= self._domain)
            slots = t.slot_of(keys)
            ok = t.store(keys, slots, cdf, lp, guide_rows(cdf, bits, t.split), pinned)
            if not t.exact:  # later chunks of this step must not overwrite these rows
                pinned = slots[ok] if pinned is None else np.concatenate([pinned, slots[ok]])
            if not ok.all():
                lost.append((s + np.flatnonzero(~ok), cdf[~ok], lp[~ok]))
        if not lost:
            return None
        lost_idx = np.concatenate([i for i, _, _ in lost])
        cdf = np.concatenate([c for _, c, _ in lost])
        lp = np.concatenate([x for _, _, x in lost])
        miss_rows = np.flatnonzero(plan.missing)
        is_lost = np.isin(inverse, lost_idx)
        return miss_rows[is_lost], np.searchsorted(lost_idx, inverse[is_lost]), cdf, lp

    def _refill_or_drop(self, ended: np.ndarray) -> None:
        slots = np.flatnonzero(ended)
        k = self._fill(slots) if self._queue else 0
        if k < len(slots):  # nothing left to start: compact the survivors
            keep = np.ones(len(ended), dtype=bool)
            keep[slots[k:]] = False
            self.rows.compact(keep)

    def _words(self, rows: np.ndarray) -> list[str]:
        r = self.rows
        lengths = r.length[rows]
        width = int(lengths.max()) + 1  # tokens up to and including the end token
        codes = self._codepoints[r.toks[rows, :width]]
        codes[np.arange(width) > lengths[:, None]] = 0  # a longer earlier name's tokens
        if self._as_str:  # numpy's str view decodes UTF-32 and drops the trailing zeros
            return codes.view(np.dtype(("U", width))).ravel().tolist()
        return ["".join(map(chr, c[:k])) for c, k in zip(codes, lengths, strict=True)]

    def _finish(self, rows: np.ndarray) -> list[SampleJob]:
        """Record the names of finished ``rows`` into their jobs (called before their lengths
        advance); returns the jobs this completes."""
        r = self.rows
        words = self._words(rows)
        slots = r.job[rows]
        names = r.name[rows]
        lps = r.lp[rows]
        jobs = self._jobs
        done: list[SampleJob] = []
        first = slots[0]
        if (len(rows) == 1 or (slots == first).all()) and not jobs[first].new_only:
            job = jobs[first]  # one plain job (always so for the CLI): vectorised
            index = names - job.start
            job._names[index] = words
            job.logprobs[index] = lps
            job.left -= len(rows)
            job.inflight -= len(rows)
            if job.left == 0:
                done.append(self._complete(job))
            return done
        label = self.labeler
        for s, i, w, lp in zip(slots.tolist(), names.tolist(), words, lps.tolist(), strict=True):
            job = jobs[s]
            job.inflight -= 1
            if job.new_only:
                if label(w) == "new":
                    job.found.append((i, w, lp))
                    if len(job.found) >= job.options.count:
                        self._unqueue(job)  # enough: draw no further names
                if job.inflight == 0 and job.next_name == job.stop:
                    self._end_new_only(job)
                    done.append(self._complete(job))
                continue
            job._names[i - job.start] = w
            job.logprobs[i - job.start] = lp
            job.left -= 1
            if job.left == 0:
                done.append(self._complete(job))
        return done

    def _complete(self, job: SampleJob) -> SampleJob:
        job.done = True
        self._release(job)
        return job

    @staticmethod
    def _end_new_only(job: SampleJob) -> None:
        """The first ``count`` new names in stream order, or the error saying why not."""
        want = job.options.count
        found = sorted(job.found)[:want]
        job.found = found
        job._names = np.array([w for _, w, _ in found] + [None], dtype=object)[:-1]
        job.logprobs = np.array([lp for _, _, lp in found], dtype=np.float64)
        job.left = want - len(found)
        if len(found) < want:
            job.error = new_only_failure(len(found), job.stop - job.start, want)


class _Plan:
    """What one step needs, fixed by :meth:`SamplerEngine.needs` (rows must not change
    between ``needs`` and ``step``; ``admit`` and ``cancel`` drop the plan)."""

    __slots__ = ("key", "masked", "slot", "missing", "codes", "new")

    def __init__(self, key, masked, slot, missing, codes, new):
        self.key = key  # per row: context code (+ domain when the end token is masked)
        self.masked = masked  # per row: below min-length
        self.slot = slot  # per row: table slot (table engine)
        self.missing = missing  # per row: not in the table (None: every row is there)
        self.codes = codes  # context codes whose logits are needed (None: every row's)
        self.new = new  # (distinct missing keys, row -> index among them)
