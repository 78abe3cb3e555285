"""The batching loop: one thread owns the predictor and runs every step of every request.

The loop (after LitServe's continuous batching and Ray Serve's batch queue) is three
phases, one line each::

    while self.wait():
        done = self.admit()  # submitted requests -> engine jobs; cancels; free rows
        done += self.step()  # one forward pass for every engine's needs, one step each
        self.deliver(done)  # finished (or failed) requests -> their futures

(The phases are public so that tests drive the loop one phase at a time.)

* **Admit.** A request becomes a job of its option group's engine
  (:class:`~bnfold.sampling.engine.SamplerEngine`, taken from the :class:`EnginePool`);
  requests past their deadline leave their engine at once; queued names then take free
  rows, at most ``max_rows`` over all engines (first come, first served). A ``new_only``
  request is a job like any other: the engine labels each finished name and keeps only the
  new ones, so no thread ever waits for another. Prefix rows go through the normal step.
* **Step.** The contexts every engine needs are concatenated into one forward pass
  (:func:`bnfold.sampling.sample.forward`, the CLI's), and each engine consumes its slice. The
  table engine needs logits only for contexts it has not stored, so a warm step may run
  no forward pass at all. Any exception here takes the one failure path: every request in
  those engines is answered with the error and the engines are dropped.
* **Deliver.** Finished requests go back to the event loop in one
  ``call_soon_threadsafe`` per step.

Memory: the pool holds one engine per option group, each bounded (``table_mb`` of stored
rows plus ``max_rows`` rows in flight), and all of them together within ``memory_mb``:
a request whose group has no engine and no room waits (idle engines are freed first, least
recently used first), and its deadline still runs. After ``idle_release`` seconds without
work every engine is freed and the heap trimmed, so an idle worker goes back to its
start-up size.

``batching=False`` (``--batching off``) admits one request at a time: what step-level
batching buys is measured against it (``benchmarks/loadtest.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.sampling.engine import SampleJob, SamplerEngine
from bnfold.sampling.options import SampleOptions, group_key
from bnfold.sampling.sample import forward
from bnfold.serve.settings import ServeSettings

log = logging.getLogger("bnfold.serve")

ROW_OVERHEAD = 64  # bytes per row in flight besides its tokens (see bnfold.sampling.rows)


class DeadlineExceeded(Exception):
    """The request's deadline passed before it was answered."""


class Request:
    """One request inside the batcher: its options, its future, and its engine job."""

    __slots__ = ("options", "future", "engine", "job", "cancelled")

    def __init__(self, options: SampleOptions, future: asyncio.Future | None = None):
        self.options = options
        self.future = future
        self.engine: SamplerEngine | None = None
        self.job: SampleJob | None = None
        self.cancelled = False


# a finished request: (request, (names, logprobs, indexes) or None, error or None)
Outcome = tuple[Request, Any, BaseException | None]


class EnginePool:
    """Engines by option group, within a memory budget (see the module)."""

    def __init__(self, predictor, labeler, settings: ServeSettings):
        self.spec = predictor.spec
        self.labeler = labeler
        self.settings = settings
        self.engines: dict[tuple, SamplerEngine] = {}  # least recently used first

    def bound(self, e: SamplerEngine) -> int:
        """The most bytes ``e`` can hold: its table (``table_mb`` until it is allocated)
        and ``max_rows`` rows in flight."""
        table = 0
        if e.kind == "table":
            table = e.table.nbytes if e.table is not None else self.settings.table_bytes
        return table + e.batch_size * (e.options.max_length + 1 + ROW_OVERHEAD)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.engines.values())

    def get(self, options: SampleOptions) -> SamplerEngine | None:
        """The engine of ``options``' group, made if there is room; None if not (yet)."""
        key = group_key(options)
        e = self.engines.pop(key, None)
        if e is None:
            s = self.settings
            e = SamplerEngine(
                self.spec,
                options,
                kind=s.engine,
                batch_size=s.max_rows,
                job_rows=s.job_rows,
                table_bytes=s.table_bytes,
                labeler=self.labeler,
            )
            if not self._make_room(self.bound(e)):
                return None
        self.engines[key] = e  # most recently used last
        return e

    def _make_room(self, need: int) -> bool:
        budget = self.settings.memory_bytes
        used = sum(self.bound(e) for e in self.engines.values())
        for key in [k for k, e in self.engines.items() if e.done]:
            if used + need <= budget:
                break
            used -= self.bound(self.engines.pop(key))
        return used + need <= budget or not self.engines  # one engine always may run

    def drop(self, e: SamplerEngine) -> None:
        self.engines.pop(e.group, None)

    def release_all(self) -> None:
        """Free every engine (all idle) and give the memory back to the OS."""
        self.engines.clear()
        gc.collect()
        trim_heap()


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's ``malloc_trim``; elsewhere nothing):
    numpy's big buffers come back on their own, the many small ones do not."""
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


class Batcher:
    """The thread that owns the predictor and runs the loop of the module docstring."""

    def __init__(self, model, settings: ServeSettings, metrics, deliver: Callable):
        self.predictor = model.predictor
        self.settings = settings
        self.metrics = metrics
        self.pool = EnginePool(model.predictor, model.labeler, settings)
        self._deliver_fn = deliver  # called with the outcomes of a step (from this thread)
        self._cond = threading.Condition()
        self._pending: collections.deque[Request] = collections.deque()  # submitted
        self._cancels: collections.deque[Request] = collections.deque()
        self._held: collections.deque[Request] = collections.deque()  # waiting for an engine
        self._busy: list[SamplerEngine] = []  # engines with work, in the order they got it
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="bnfold-batcher", daemon=True)
        self.steps = 0
        self.waiting = 0  # requests taken in but with no name started yet

    # -- called from other threads
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher has stopped")
            self._pending.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """Drop a request (its future is answered already)."""
        req.cancelled = True
        with self._cond:
            self._cancels.append(req)
            self._cond.notify()

    @property
    def depth(self) -> int:
        return len(self._pending) + len(self._held) + self.waiting

    def stop(self, timeout: float | None = None) -> bool:
        """Finish every submitted request, then end the thread; True if it ended in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread
    def _run(self) -> None:
        while self.wait():
            done = self.admit()
            done += self.step()
            self.deliver(done)

    def wait(self) -> bool:
        """Block until there is work; free every engine after ``idle_release`` seconds
        without any; False once stopping with nothing left."""
        if self._busy or self._held:
            return True
        with self._cond:
            while not self._pending and not self._cancels and not self._stopping:
                if not self._cond.wait(self.settings.idle_release) and self.pool.engines:
                    self.pool.release_all()
                    self.metrics.engines.set(0)
                    self.metrics.engine_bytes.set(0)
            return bool(self._pending or self._cancels)

    def admit(self) -> list[Outcome]:
        """Cancels leave their engines; submitted requests become jobs; queued names take
        free rows within the step budget."""
        done: list[Outcome] = []
        while self._cancels:
            req = self._cancels.popleft()
            if req.engine is not None:
                req.engine.cancel(req.job)
        if self._held:
            self._pending.extendleft(reversed(self._held))  # first come, first served
            self._held.clear()
        one_at_a_time = not self.settings.batching
        while self._pending:
            req = self._pending.popleft()
            if req.cancelled:
                continue
            if one_at_a_time and self._busy:
                self._held.append(req)
                continue
            e = self.pool.get(req.options)
            if e is None:  # no room for another engine yet
                self._held.append(req)
                continue
            try:
                req.job = e.submit(req.options, tag=req)
            except Exception as exc:  # a bad option that slipped through: answer it
                done.append((req, None, exc))
                continue
            req.engine = e
            if e not in self._busy:
                self._busy.append(e)
        self._busy = [e for e in self._busy if not e.done]  # e.g. every job cancelled
        budget = self.settings.max_rows
        rows = sum(e.n for e in self._busy)
        for e in self._busy:
            if rows >= budget:
                break
            if e.queued:
                rows += e.admit(budget - rows)
        self.waiting = sum(e.jobs - e.running for e in self._busy)
        return done

    def step(self) -> list[Outcome]:
        """One forward pass for the needs of every engine with rows, one step each; any
        exception fails every request of the engines in the step (the one failure path)."""
        live = [e for e in self._busy if e.n]
        if not live:
            return []
        try:
            needs = [e.needs() for e in live]
            ctx = needs[0] if len(needs) == 1 else np.concatenate(needs)
            z = forward(self.predictor, ctx)
            finished: list[SampleJob] = []
            off = 0
            for e, need in zip(live, needs, strict=True):
                m = len(need)
                finished += e.step(z[off : off + m] if m else None)
                off += m
        except Exception as exc:
            if isinstance(exc, BnfoldError):  # a refusal, said in one line: no traceback
                log.error("sampling step failed: %s", exc)
            else:
                log.exception("sampling step failed")
            done = [(_detach(j), None, exc) for e in live for j in e.unfinished()]
            for e in live:
                self.pool.drop(e)
            self._busy = [e for e in self._busy if e not in live]
            return done
        self.steps += 1
        m = self.metrics
        m.batch_rows.observe(sum(e.n for e in live))
        m.batch_requests.observe(sum(e.running for e in live))
        m.forward_rows.inc(len(ctx))
        if any(e.done for e in live):
            self._busy = [e for e in self._busy if not e.done]
            m.engines.set(len(self.pool.engines))
            m.engine_bytes.set(self.pool.nbytes)
        return [_outcome(j) for j in finished]

    def deliver(self, done: list[Outcome]) -> None:
        if done:
            self._deliver_fn(done)


def _detach(job: SampleJob) -> Request:
    """The job's request, with the request <-> job <-> engine references cut: a cycle
    would keep a finished request's engine (tables and all) alive until the cyclic garbage
    collector happens to run."""
    req = job.tag
    job.tag = None
    req.job = req.engine = None
    return req


def _outcome(job: SampleJob) -> Outcome:
    if job.error is not None:
        return (_detach(job), None, job.error)
    return (_detach(job), (job.names, job.logprobs.tolist(), job.indexes), None)
