"""``bnfold serve``: sample names over HTTP, with step-level batching across requests.

Architecture
------------
* One FastAPI app per worker process. The model (an ``.onnx`` file from ``bnfold export``, or a
  ``.pt`` checkpoint) is loaded and warmed up in a background thread after start-up;
  ``/readyz`` answers 503 until then, and again while draining.
* One **batcher** thread per app owns the predictor (one ONNX Runtime session, one ORT
  thread) and runs the very sampler ``bnfold sample`` runs. Requests are grouped by
  :func:`~bnfold.sample.group_key` (temperature, top-k, top-p, min/max length); every
  request of a group is a job of that group's :class:`~bnfold.sample.SamplerEngine`, its
  names rows of the engine's batch next to those of other requests (seed, prefix and
  count vary by row). At every forward step the batcher concatenates the contexts of all
  engines into one array, runs the session once, and hands each engine its slice of the
  logits: one ``advance`` per group, however many requests. Requests that arrive meanwhile
  take free rows at the next step; finished names go back to their request, which is
  answered when its last name is in. The asyncio event loop never runs inference: it
  submits jobs and is handed results through ``loop.call_soon_threadsafe``.
* ``batching=False`` is the plain way, kept to measure what batching buys: the same thread
  runs one request at a time to completion on an engine of its own, one session call per
  step per request.
* The hot path: ``POST /v1/names`` with a plain JSON body is parsed (orjson), checked
  (:func:`plain_request`) and answered (pre-rendered JSON bytes) by the raw ASGI edge layer,
  without FastAPI's routing and pydantic; every other request, including every invalid
  body, goes through FastAPI and the documented pydantic model (so the OpenAPI schema and
  the 422 messages are those of the model).
* Backpressure: at most ``queue_size`` requests are admitted (waiting or running); beyond
  that a request is answered 429 with ``Retry-After`` at once. Every admitted request has
  a deadline (``deadline`` seconds) after which it is answered 504 and dropped from the
  batch. Request bodies over ``max_body`` bytes get 413.
* ``--new-only`` requests run :func:`bnfold.sample.sample_names` itself in a worker thread,
  on a predictor whose ``logits`` joins the batcher's next step.

Names depend only on (model, seed, options): the sampler's random streams are per name and
ONNX Runtime's logits of a row do not depend on which other rows share its batch, so a
request gives the same names alone or in a crowd (``tests/test_serve.py`` checks it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib.resources
import json
import logging
import math
import os
import random
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, create_model

from bnfold.data import file_sha256
from bnfold.errors import BnfoldError
from bnfold.infer import Predictor
from bnfold.sample import (
    DEFAULT_MAX_LENGTH,
    MAX_LENGTH_CAP,
    Labeler,
    SampleJob,
    SampleOptions,
    SamplerEngine,
    group_key,
    load_labeler,
    sample_names,
)

log = logging.getLogger("bnfold.serve")

ENV_SETTINGS = "BNFOLD_SERVE_SETTINGS"  # JSON ServeSettings, read by each worker's factory
SEED_BITS = 53  # random seeds stay below 2**53, exact in JavaScript numbers (the web page)
MAX_SEED = 2**64 - 1
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1_000_000
RETRY_AFTER = "1"  # seconds, for 429 and 503


# -------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServeSettings:
    """What a worker needs to build its app (passed to workers as JSON in an env var)."""

    model: str
    words: str
    max_count: int = 1000  # names per request
    queue_size: int = 256  # requests admitted at once (waiting + running); more get 429
    deadline: float = 10.0  # seconds from arrival to answer; later -> 504
    max_body: int = 16_384  # bytes of request body; more -> 413
    batching: bool = True  # step-level batching across requests (False: one at a time)
    max_rows: int = 8192  # rows per forward step, over all requests
    job_rows: int = 1024  # rows in flight per request
    drain_timeout: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    max_connections: int = 2048  # uvicorn limit_concurrency (503 beyond)

    def check(self) -> ServeSettings:
        positive_ints = ("max_count", "queue_size", "max_body", "max_rows", "job_rows")
        for name in (*positive_ints, "max_connections"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BnfoldError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.max_count > 10_000_000:
            raise BnfoldError(f"max-count must be at most 10,000,000, got {self.max_count:,}")
        for name in ("deadline", "drain_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise BnfoldError(f"{name.replace('_', '-')} must be a number > 0, got {v!r}")
        return self

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ=os.environ) -> ServeSettings:
        raw = environ.get(ENV_SETTINGS)
        if not raw:
            raise BnfoldError(f"{ENV_SETTINGS} is not set (start the service with `bnfold serve`)")
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).check()


# --------------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    predictor: Predictor
    labeler: Labeler
    sha256: str
    info: dict[str, Any]


def parameter_count(path: Path, predictor: Predictor) -> int | None:
    """Number of weights: the ONNX file's initializers, or the torch model's parameters."""
    model = getattr(predictor, "model", None)
    if model is not None and hasattr(model, "parameters"):
        return int(sum(p.numel() for p in model.parameters()))
    if path.suffix == ".onnx":
        from bnfold.onnx_files import load_onnx_file

        proto = load_onnx_file(path).proto
        return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in proto.graph.initializer))
    return None


def load_model(settings: ServeSettings) -> LoadedModel:
    """Load the predictor and the novelty labeler; collect what ``/v1/model`` shows."""
    from bnfold.infer import load_predictor

    path = Path(settings.model)
    predictor = load_predictor(path)
    sha = getattr(predictor, "sha256", None) or file_sha256(path)
    labeler = load_labeler(predictor, settings.words)
    meta = getattr(predictor, "metadata", None) or {}
    ckpt_meta = getattr(getattr(predictor, "checkpoint", None), "meta", None) or {}
    config = meta.get("model_config")
    if config is None and hasattr(predictor, "checkpoint"):
        config = predictor.checkpoint.config.to_dict()
    info = {
        "name": path.name,
        "sha256": sha,
        "backend": predictor.backend,
        "folded": bool(predictor.folded),
        "vocabulary": list(predictor.vocab.chars),
        "vocab_size": predictor.vocab.size,
        "end_token": 0,
        "block_size": predictor.block_size,
        "parameters": parameter_count(path, predictor),
        "model_config": config,
        "verification": meta.get("verification"),
        "source_checkpoint": meta.get("source_checkpoint"),
        "source_sha256": meta.get("source_sha256"),
        "bnfold_version": meta.get("bnfold_version") or ckpt_meta.get("bnfold_version"),
        "data_sha256": meta.get("data_sha256") or ckpt_meta.get("data_sha256"),
        "words": {
            "file": Path(settings.words).name,
            "sha256": labeler.sha256,
            "verified": labeler.verified,
        },
        "service": {
            "batching": "step" if settings.batching else "off",
            "max_count": settings.max_count,
            "queue_size": settings.queue_size,
            "deadline_seconds": settings.deadline,
            "max_body_bytes": settings.max_body,
            "max_rows_per_step": settings.max_rows,
            "ort_threads": getattr(predictor, "threads", None),
        },
    }
    return LoadedModel(predictor, labeler, sha, info)


def warm_up(model: LoadedModel, settings: ServeSettings) -> None:
    """Run the sampler and the largest forward step once, so the first requests are fast."""
    p = model.predictor
    sample_names(p, SampleOptions(count=64, seed=0), model.labeler)
    sample_names(p, SampleOptions(count=8, seed=1, prefix=p.vocab.chars[0]), model.labeler)
    p.logits(np.zeros((settings.max_rows, p.block_size), dtype=np.int64))


# ------------------------------------------------------------------------------- batcher


class DeadlineExceeded(Exception):
    """The request's deadline passed before it was answered."""


class NamesJob:
    """One request, sampled as a :class:`~bnfold.sample.SampleJob` of the batcher's engine
    for its option group."""

    __slots__ = ("options", "future", "engine", "job", "cancelled")

    def __init__(self, options: SampleOptions, future: asyncio.Future):
        self.options = options
        self.future = future
        self.engine: SamplerEngine | None = None
        self.job: SampleJob | None = None
        self.cancelled = False

    def fail(self, exc: BaseException):
        return (self.future, None, exc)

    def result(self):
        j = self.job
        return (self.future, (j.names, j.logprobs.tolist()), None)


class LogitsJob:
    """Raw contexts from a thread running ``sample_names`` (the new-only path)."""

    __slots__ = ("contexts", "rows", "event", "logits", "error", "deadline")

    def __init__(self, contexts: np.ndarray, deadline: float):
        self.contexts = contexts
        self.rows = len(contexts)
        self.event = threading.Event()
        self.logits: np.ndarray | None = None
        self.error: BaseException | None = None
        self.deadline = deadline

    @property
    def cancelled(self) -> bool:
        return time.monotonic() > self.deadline

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.event.set()


IDLE_ENGINES = 16  # engines of option groups without work kept for reuse


class Batcher:
    """The thread that owns the predictor and runs every forward step.

    Requests are grouped by :func:`~bnfold.sample.group_key`: all requests of a group are
    jobs of one :class:`~bnfold.sample.SamplerEngine` (one ``advance`` per group per
    step, whatever the number of requests); the engines of all groups, plus the raw contexts
    of new-only requests, share each forward pass.
    """

    def __init__(self, model: LoadedModel, settings: ServeSettings, metrics: Metrics, loop):
        self.predictor = model.predictor
        self.settings = settings
        self.metrics = metrics
        self.loop = loop
        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()  # submitted, not taken yet
        self._cancels: collections.deque = collections.deque()  # NamesJobs past deadline
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="bnfold-batcher", daemon=True)
        self.steps = 0
        self.waiting = 0  # requests taken in but with no name started yet

    # -- called from other threads
    def start(self) -> None:
        self._thread.start()

    def submit(self, job) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher has stopped")
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: NamesJob) -> None:
        """Drop a request whose deadline passed (its future is answered already)."""
        job.cancelled = True
        self._cancels.append(job)

    @property
    def depth(self) -> int:
        return len(self._pending) + self.waiting

    def stop(self, timeout: float | None = None) -> bool:
        """Finish every submitted job, then end the thread; True if it ended in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread
    def _run(self) -> None:
        try:
            if self.settings.batching:
                self._run_batched()
            else:
                self._run_plain()
        except BaseException:  # pragma: no cover - a bug: fail loudly, never hang requests
            log.exception("batcher thread died")
            raise

    def _wait(self) -> bool:
        """Block until work arrives; False once stopping with nothing pending."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            return bool(self._pending)

    def _deliver(self, done: list) -> None:
        if done:
            self.loop.call_soon_threadsafe(_resolve_all, done)

    def _engine(self, engines: dict, options: SampleOptions) -> SamplerEngine:
        key = group_key(options)
        e = engines.get(key)
        if e is None:
            p = self.predictor
            e = SamplerEngine(
                p.spec,
                options,
                batch_size=self.settings.max_rows,
                job_rows=self.settings.job_rows,
            )
            engines[key] = e
        return e

    def _run_batched(self) -> None:
        engines: dict[tuple, SamplerEngine] = {}  # option group -> its engine
        raw: collections.deque[LogitsJob] = collections.deque()  # new-only contexts waiting
        budget = self.settings.max_rows
        logits_fn = self.predictor.logits
        observe_rows = self.metrics.batch_rows.observe
        observe_reqs = self.metrics.batch_requests.observe
        pending, cancels = self._pending, self._cancels
        busy: list[SamplerEngine] = []  # engines with work, in the order they got it
        while True:
            if not busy and not raw and not self._wait():
                return  # stopping and nothing left
            done: list = []
            # take in new requests: each joins its group's engine queue (first come, first
            # served); names start below as rows are free within the step budget
            while pending:
                job = pending.popleft()
                if isinstance(job, LogitsJob):
                    raw.append(job)
                    continue
                if job.cancelled:
                    continue
                try:
                    e = self._engine(engines, job.options)
                    job.job = e.submit(job.options, tag=job)
                    job.engine = e
                except Exception as exc:  # a bad option that slipped through: answer it
                    done.append(job.fail(exc))
                    continue
                if job.job.done:  # pragma: no cover - count >= 1 is checked before
                    done.append(job.result())
                elif e not in busy:
                    busy.append(e)
            # drop requests whose deadline passed (their futures are answered 504 already)
            while cancels:
                job = cancels.popleft()
                if job.engine is not None:
                    job.engine.cancel(job.job)
            # fill free rows within the step budget: raw contexts, then the engines' queues
            rows = sum(e.n for e in busy)
            step_raw: list[LogitsJob] = []
            while raw and (rows + raw[0].rows <= budget or rows == 0):
                lj = raw.popleft()
                if lj.cancelled:
                    lj.fail(DeadlineExceeded())
                    continue
                step_raw.append(lj)
                rows += lj.rows
            for e in busy:
                if e.queued and rows < budget:
                    rows += e.admit(budget - rows)
            live = [e for e in busy if e.n]
            self.waiting = sum(e.jobs - e.running for e in busy)
            self._deliver(done)
            done = []
            if not live and not step_raw:
                busy = [e for e in busy if not e.done]
                self._retire(engines, busy)
                continue
            needs = [e.needs() for e in live]
            parts = needs + [lj.contexts for lj in step_raw]
            ctx = parts[0] if len(parts) == 1 else np.concatenate(parts)
            try:
                z = logits_fn(ctx) if len(ctx) else None
            except Exception as exc:  # pragma: no cover - the model cannot run: fail the step
                log.exception("forward step failed")
                for lj in step_raw:
                    lj.fail(exc)
                for e in live:
                    done += [j.tag.fail(exc) for j in e.unfinished()]
                    engines.pop(e.group, None)
                busy = [e for e in busy if e not in live]
                self._deliver(done)
                continue
            self.steps += 1
            observe_rows(len(ctx))
            observe_reqs(sum(e.running for e in live) + len(step_raw))
            off = 0
            for e, need in zip(live, needs, strict=True):
                n = len(need)
                try:
                    finished = e.step(z[off : off + n] if n else None)
                except Exception as exc:  # pragma: no cover - sampler bug: answer 500
                    log.exception("sampler step failed")
                    done += [j.tag.fail(exc) for j in e.unfinished()]
                    engines.pop(e.group, None)
                    busy.remove(e)
                    off += n
                    continue
                off += n
                for j in finished:
                    done.append(j.tag.result())
            for lj in step_raw:
                lj.logits = z[off : off + lj.rows].copy()
                lj.event.set()
                off += lj.rows
            self._deliver(done)
            if any(e.done for e in busy):
                busy = [e for e in busy if not e.done]
                self._retire(engines, busy)

    @staticmethod
    def _retire(engines: dict, busy: list) -> None:
        """Forget the engines of idle option groups beyond the few kept for reuse."""
        if len(engines) > len(busy) + IDLE_ENGINES:
            for key in [k for k, e in engines.items() if e.done and e not in busy]:
                del engines[key]
                if len(engines) <= len(busy) + IDLE_ENGINES:
                    break

    def _run_plain(self) -> None:
        """The plain way: one request at a time on an engine of its own, one session call
        per step (``--batching off``, kept to measure what step-level batching buys)."""
        pending = self._pending
        p = self.predictor
        while self._wait():
            job = pending.popleft()
            if isinstance(job, LogitsJob):
                if job.cancelled:
                    job.fail(DeadlineExceeded())
                    continue
                job.logits = p.logits(job.contexts)
                self.metrics.batch_rows.observe(job.rows)
                self.metrics.batch_requests.observe(1)
                job.event.set()
                continue
            self._cancels.clear()  # only the job at hand can be running
            if job.cancelled:
                continue
            try:
                o = job.options
                e = SamplerEngine(
                    p.spec, o, batch_size=min(o.count, self.settings.job_rows), kind="network"
                )
                job.job = e.submit(o)
                while not e.done and not job.cancelled:
                    e.admit()
                    z = p.logits(e.needs())
                    self.metrics.batch_rows.observe(len(z))
                    self.metrics.batch_requests.observe(1)
                    e.step(z)
                out = job.result()
            except Exception as exc:
                out = job.fail(exc)
            self._deliver([out])


def _resolve_all(done: list) -> None:
    """On the event loop: answer every finished request of a step."""
    for fut, value, exc in done:
        if fut.done():
            continue  # already answered (deadline)
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


class _BatchedPredictor(Predictor):
    """A predictor whose ``logits`` joins the batcher's next forward step.

    ``sample_names`` runs on it in a worker thread for ``new_only`` requests, so those use
    the sampler's own new-only loop unchanged.
    """

    def __init__(self, model: LoadedModel, batcher: Batcher, deadline: float):
        p = model.predictor
        self.path, self.vocab, self.block_size = p.path, p.vocab, p.block_size
        self.folded, self.backend = p.folded, p.backend
        self.sha256, self.metadata = p.sha256, p.metadata
        self._batcher = batcher
        self._deadline = deadline

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(contexts, dtype=np.int64)
        job = LogitsJob(x, self._deadline)
        self._batcher.submit(job)
        if not job.event.wait(max(0.0, self._deadline - time.monotonic()) + 0.05):
            raise DeadlineExceeded()
        if job.error is not None:
            raise job.error
        return job.logits


# -------------------------------------------------------------------------------- metrics


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps per process)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram(
            "bnfold_request_seconds",
            "HTTP request latency by endpoint and status code.",
            ["endpoint", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.names = Counter("bnfold_names_generated", "Names sampled and returned.", registry=r)
        self.rejections = Counter(
            "bnfold_rejections",
            "Requests refused, by reason (queue_full, deadline, invalid, body_too_large,"
            " not_ready).",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "bnfold_queue_depth", "Requests waiting to join a forward step.", registry=r
        )
        self.inflight = Gauge(
            "bnfold_inflight_requests", "Requests admitted and not yet answered.", registry=r
        )
        self.batch_rows = Histogram(
            "bnfold_batch_rows",
            "Rows (contexts) per forward step.",
            buckets=tuple(2**i for i in range(15)),
            registry=r,
        )
        self.batch_requests = Histogram(
            "bnfold_batch_requests",
            "Requests sharing a forward step.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )


# ------------------------------------------------------------------------------- service


class NameService:
    """Per-app state: the model, the batcher, admission control, readiness."""

    def __init__(self, settings: ServeSettings, loader=None):
        self.settings = settings
        self.loader = loader or _load_and_warm
        self.metrics = Metrics()
        self.model: LoadedModel | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.inflight = 0
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bnfold-newonly")
        # random seeds for requests without one: a PRNG seeded from the OS per app (so per
        # worker); the OS generator itself costs a system call per request
        self._rng = random.Random(secrets.randbits(128))
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth if self.batcher else 0)
        self.metrics.inflight.set_function(lambda: self.inflight)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            model = await asyncio.to_thread(self.loader, self.settings)
        except Exception as e:
            self.load_error = str(e) if isinstance(e, BnfoldError) else f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", self.load_error)
            return
        self.model = model
        self.batcher = Batcher(model, self.settings, self.metrics, loop)
        self.batcher.start()
        self.ready = True
        log.info("ready: %s (sha256 %s)", model.info["name"], model.sha256[:12])

    def begin_drain(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        self.draining = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop, self.settings.drain_timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.ready = False

    # -- sampling
    async def sample(self, options: SampleOptions) -> tuple[list, list, list | None]:
        """Admitted request -> (names, logprobs, stream indexes or None for 0..count-1);
        raises DeadlineExceeded, or BnfoldError when new-only cannot find enough names."""
        loop = asyncio.get_running_loop()
        deadline = self.settings.deadline
        if options.new_only:
            proxy = _BatchedPredictor(self.model, self.batcher, time.monotonic() + deadline)
            # the network engine: a table engine here would build its own table per request
            job = functools.partial(sample_names, engine="network")
            fut = loop.run_in_executor(self._executor, job, proxy, options, self.model.labeler)
            try:
                got = await asyncio.wait_for(fut, deadline)
            except asyncio.TimeoutError:
                raise DeadlineExceeded() from None
            return [s.name for s in got], [s.logprob for s in got], [s.index for s in got]
        fut = loop.create_future()
        job = NamesJob(options, fut)
        timer = loop.call_later(deadline, _expire, self.batcher, job)
        try:
            self.batcher.submit(job)
            names, lps = await fut
        finally:
            timer.cancel()
        return names, lps, None

    async def names(self, f: dict, where: str) -> Answer:
        """Answer a validated request (the request model's fields): 200 with the names, or
        503 / 429 / 422 / 504. Shared by the hot path and the FastAPI routes."""
        m = self.metrics
        if not self.ready or self.draining:
            m.rejections.labels("not_ready").inc()
            why = "draining" if self.draining else "loading the model"
            return _error(503, f"not ready ({why})", retry=True)
        settings = self.settings
        if self.inflight >= settings.queue_size:
            m.rejections.labels("queue_full").inc()
            return _error(429, f"queue full ({settings.queue_size} requests in flight)", True)
        model = self.model
        seed = f["seed"]
        if seed is None:
            seed = self._rng.getrandbits(SEED_BITS)
        try:
            opts = SampleOptions(
                count=f["count"],
                seed=seed,
                temperature=f["temperature"],
                top_k=f["top_k"],
                top_p=f["top_p"],
                prefix=f["prefix"],
                min_length=f["min_length"],
                max_length=f["max_length"],
                new_only=f["new_only"],
            ).check(model.predictor.vocab)
        except BnfoldError as e:
            m.rejections.labels("invalid").inc()
            return _invalid(str(e), where)
        self.inflight += 1
        try:
            names, lps, index = await self.sample(opts)
        except DeadlineExceeded:
            m.rejections.labels("deadline").inc()
            return _error(504, f"deadline of {settings.deadline:g} s exceeded")
        except BnfoldError as e:  # e.g. new-only could not find enough new names
            m.rejections.labels("invalid").inc()
            return _invalid(str(e), where)
        finally:
            self.inflight -= 1
        label = model.labeler
        if index is None:
            index = range(len(names))
        items = [
            {"name": n, "label": label(n), "logprob": lp, "index": i}
            for n, lp, i in zip(names, lps, index, strict=True)
        ]
        m.names.inc(len(items))
        body = {
            "names": items,
            "count": len(items),
            "seed": seed,
            "model_sha256": model.sha256,
            "options": opts.to_dict(),
        }
        return Answer(200, orjson.dumps(body))


def _expire(batcher: Batcher, job: NamesJob) -> None:
    if not job.future.done():
        batcher.cancel(job)
        job.future.set_exception(DeadlineExceeded())


def _load_and_warm(settings: ServeSettings) -> LoadedModel:
    model = load_model(settings)
    warm_up(model, settings)
    return model


# ------------------------------------------------------------------------------ API models


def request_model(max_count: int) -> type[BaseModel]:
    """The request schema (JSON body or query string), with this server's count cap."""
    return create_model(
        "NamesRequest",
        __config__=ConfigDict(extra="forbid"),
        count=(
            int,
            Field(10, ge=1, le=max_count, description=f"Names to sample (at most {max_count})."),
        ),
        seed=(
            int | None,
            Field(
                None,
                ge=0,
                le=MAX_SEED,
                description="Random seed; a random one (below 2**53) when omitted.",
            ),
        ),
        temperature=(
            float,
            Field(
                1.0,
                ge=0,
                le=MAX_TEMPERATURE,
                allow_inf_nan=False,
                description="0 = greedy (argmax); otherwise softmax(logits / temperature).",
            ),
        ),
        top_k=(int | None, Field(None, ge=1, le=MAX_TOP_K)),
        top_p=(float | None, Field(None, gt=0, le=1, allow_inf_nan=False)),
        prefix=(
            str,
            Field("", max_length=MAX_LENGTH_CAP, description="Start every name with this."),
        ),
        min_length=(int, Field(1, ge=0, le=MAX_LENGTH_CAP)),
        max_length=(int, Field(DEFAULT_MAX_LENGTH, ge=1, le=MAX_LENGTH_CAP)),
        new_only=(bool, Field(False, description="Only names in none of train/dev/test.")),
    )


class NameItem(BaseModel):
    name: str
    label: str
    logprob: float
    index: int


class NamesResponse(BaseModel):
    names: list[NameItem]
    count: int
    seed: int
    model_sha256: str
    options: dict[str, Any]


class ErrorResponse(BaseModel):
    detail: str


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationErrorItem]


_ERRORS = {
    413: {"model": ErrorResponse, "description": "Request body too large"},
    422: {"model": ValidationErrorResponse, "description": "Invalid options"},
    429: {"model": ErrorResponse, "description": "Queue full: retry after Retry-After seconds"},
    503: {"model": ErrorResponse, "description": "Not ready (loading or draining)"},
    504: {"model": ErrorResponse, "description": "Deadline exceeded"},
}


class Answer(NamedTuple):
    """A rendered answer: status, JSON body bytes, whether to send ``Retry-After``."""

    status: int
    body: bytes
    retry: bool = False

    def response(self) -> Response:
        headers = {"Retry-After": RETRY_AFTER} if self.retry else None
        return Response(self.body, self.status, headers, media_type="application/json")


def _error(status: int, detail: str, retry: bool = False) -> Answer:
    return Answer(status, orjson.dumps({"detail": detail}), retry)


_OPTION_FIELDS = {
    "count": "count",
    "seed": "seed",
    "temperature": "temperature",
    "top-k": "top_k",
    "top-p": "top_p",
    "prefix": "prefix",
    "min-length": "min_length",
    "max-length": "max_length",
}


def _invalid(msg: str, where: str = "body") -> Answer:
    """422 in FastAPI's format; the field is the option a sampler message starts with."""
    field = _OPTION_FIELDS.get(msg.split(" ", 1)[0])
    loc = [where, field] if field else [where]
    return Answer(422, orjson.dumps({"detail": [{"loc": loc, "msg": msg, "type": "value_error"}]}))


_REQUEST_DEFAULTS = {
    "count": 10,
    "seed": None,
    "temperature": 1.0,
    "top_k": None,
    "top_p": None,
    "prefix": "",
    "min_length": 1,
    "max_length": DEFAULT_MAX_LENGTH,
    "new_only": False,
}
_REQUEST_FIELDS = frozenset(_REQUEST_DEFAULTS)


def plain_request(data: Any, max_count: int) -> dict | None:
    """The hot path's validation: a decoded JSON body that is exactly of the request
    schema's types and within its ranges -> its fields, defaults filled in, as the pydantic
    model would give them; anything else -> None, and FastAPI + pydantic validate it (and
    word the 422). So this only has to be right about what it accepts, never about errors.
    """
    if type(data) is not dict or not data.keys() <= _REQUEST_FIELDS:
        return None
    f = {**_REQUEST_DEFAULTS, **data}
    v = f["count"]
    if type(v) is not int or not 1 <= v <= max_count:
        return None
    v = f["seed"]
    if v is not None and (type(v) is not int or not 0 <= v <= MAX_SEED):
        return None
    v = f["temperature"]
    if type(v) not in (int, float) or not 0 <= v <= MAX_TEMPERATURE:  # NaN fails too
        return None
    f["temperature"] = float(v)
    v = f["top_k"]
    if v is not None and (type(v) is not int or not 1 <= v <= MAX_TOP_K):
        return None
    v = f["top_p"]
    if v is not None:
        if type(v) not in (int, float) or not 0 < v <= 1:
            return None
        f["top_p"] = float(v)
    v = f["prefix"]
    if type(v) is not str or len(v) > MAX_LENGTH_CAP:
        return None
    v = f["min_length"]
    if type(v) is not int or not 0 <= v <= MAX_LENGTH_CAP:
        return None
    v = f["max_length"]
    if type(v) is not int or not 1 <= v <= MAX_LENGTH_CAP:
        return None
    if type(f["new_only"]) is not bool:
        return None
    return f


# ------------------------------------------------------------------------- ASGI edge layer

_ENDPOINTS = frozenset(["/", "/v1/names", "/v1/model", "/livez", "/readyz", "/metrics"])
_JSON_HEADERS = [(b"content-type", b"application/json")]
_RETRY_HEADERS = [(b"retry-after", RETRY_AFTER.encode())]


class _BodyTooLarge(HTTPException):
    """Raised while a body without Content-Length is read; FastAPI answers it (413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


def _with_json_content_type(scope: dict) -> dict:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


class EdgeMiddleware:
    """Raw ASGI in front of FastAPI: request latency by status for /metrics, the request
    body size limit, and the hot path.

    The hot path: ``POST /v1/names`` with a JSON body (no content type, or a JSON one) that
    :func:`plain_request` accepts is answered here, by :meth:`NameService.names`, without
    FastAPI's routing, dependency solving and pydantic validation (a few hundred
    microseconds a request). Any other body is replayed to FastAPI unchanged, which
    validates it with the documented pydantic model and answers exactly as before.
    """

    def __init__(self, app, svc: NameService, max_body: int, max_count: int):
        self.app = app
        self.svc = svc
        self.latency = svc.metrics.latency
        self.rejections = svc.metrics.rejections
        self.max_body = max_body
        self.max_count = max_count
        self._observers: dict[tuple[str, int], Any] = {}

    def _observe(self, endpoint: str, status: int, seconds: float) -> None:
        obs = self._observers.get((endpoint, status))
        if obs is None:
            obs = self.latency.labels(endpoint, str(status)).observe
            self._observers[(endpoint, status)] = obs
        obs(seconds)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        limit = self.max_body
        plain = path == "/v1/names" and scope["method"] == "POST"

        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    too_big = int(v) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._too_large(send)
                    self._observe(endpoint, 413, time.perf_counter() - t0)
                    return
            elif k == b"content-type" and not v.lower().startswith(b"application/json"):
                if plain and v.lower().startswith(b"application/x-www-form-urlencoded"):
                    # `curl -d '{...}'` labels its JSON body as a form: read it as JSON,
                    # here and in FastAPI's fallback alike.
                    scope = _with_json_content_type(scope)
                else:
                    plain = False

        if plain:
            body = await self._read_body(receive)
            if body is None:
                await self._too_large(send)
                self._observe(endpoint, 413, time.perf_counter() - t0)
                return
            try:
                fields = plain_request(orjson.loads(body), self.max_count) if body else None
            except orjson.JSONDecodeError:
                fields = None
            if fields is not None:
                status = 500  # if names() fails, uvicorn answers 500
                try:
                    a = await self.svc.names(fields, "body")
                    status = a.status
                    headers = _JSON_HEADERS + _RETRY_HEADERS if a.retry else _JSON_HEADERS
                    headers = [*headers, (b"content-length", str(len(a.body)).encode())]
                    await send(
                        {"type": "http.response.start", "status": status, "headers": headers}
                    )
                    await send({"type": "http.response.body", "body": a.body})
                finally:
                    self._observe(endpoint, status, time.perf_counter() - t0)
                return
            receive = _replay(body, receive)

        status = [500]
        started = [False]
        seen = [0]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    self.rejections.labels("body_too_large").inc()
                    raise _BodyTooLarge(limit)
            return message

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        except _BodyTooLarge:  # raised outside FastAPI's handlers
            if started[0]:
                raise
            await self._too_large(send, count=False)
            status[0] = 413
        finally:
            self._observe(endpoint, status[0], time.perf_counter() - t0)

    async def _read_body(self, receive) -> bytes | None:
        """The whole request body, or None once it exceeds the limit."""
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected: nothing more will come
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _too_large(self, send, count: bool = True) -> None:
        if count:
            self.rejections.labels("body_too_large").inc()
        body = orjson.dumps({"detail": f"request body larger than {self.max_body} bytes"})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    """A ``receive`` that yields the already-read ``body`` once, then the real messages."""
    first = [True]

    async def replayed():
        if first[0]:
            first[0] = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# ------------------------------------------------------------------------------------ app


def _page() -> str:
    return importlib.resources.files("bnfold").joinpath("static/index.html").read_text("utf-8")


def create_app(settings: ServeSettings, *, loader=None) -> EdgeMiddleware:
    """The ASGI app of one worker. ``loader(settings) -> LoadedModel`` runs in a thread after
    start-up (default: load the model and warm it up); tests pass their own."""
    settings.check()
    svc = NameService(settings, loader)
    Req = request_model(settings.max_count)
    page = _page()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        restore = _hook_signals(svc)
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()
            restore()

    app = FastAPI(
        title="bnfold names",
        version="1",
        summary="Sample names from a folded BatchNorm MLP (ONNX), with step-level batching.",
        lifespan=lifespan,
    )
    app.state.service = svc
    m = svc.metrics

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        m.rejections.labels("invalid").inc()
        errors = []
        for e in exc.errors():
            loc = [x if isinstance(x, int) else str(x) for x in e.get("loc", ())]
            msg = str(e.get("msg", ""))
            if loc[-1:] == ["count"] and e.get("type") == "less_than_equal":
                msg = f"count must be at most {settings.max_count} on this server (max-count)"
            errors.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
        return JSONResponse({"detail": errors}, status_code=422)

    async def post_names(req: BaseModel) -> Response:
        """Sample names. Same model + seed + options -> same names."""
        return (await svc.names(req.model_dump(), "body")).response()

    async def get_names(req: BaseModel) -> Response:
        """Sample names (query-string form of POST /v1/names)."""
        return (await svc.names(req.model_dump(), "query")).response()

    # the request model is built per app (its count cap), so annotate the handlers by hand
    post_names.__annotations__["req"] = Req
    get_names.__annotations__["req"] = Annotated[Req, Query()]
    app.post("/v1/names", response_model=NamesResponse, responses=_ERRORS)(post_names)
    app.get("/v1/names", response_model=NamesResponse, responses=_ERRORS)(get_names)

    @app.get("/v1/model", responses={503: _ERRORS[503]})
    async def model_info() -> JSONResponse:
        """The loaded model: vocabulary, block size, parameters, folded, sha256, verification."""
        if svc.model is None:
            return _error(503, "model not loaded yet", retry=True).response()
        return JSONResponse(svc.model.info)

    @app.get("/livez", responses={503: _ERRORS[503]})
    async def livez() -> JSONResponse:
        """200 while the process is alive (503 if the model failed to load)."""
        if svc.load_error:
            return _error(503, f"model failed to load: {svc.load_error}").response()
        return JSONResponse({"status": "alive"})

    @app.get("/readyz", responses={503: _ERRORS[503]})
    async def readyz() -> JSONResponse:
        """200 once the model is loaded and warmed up; 503 before that and while draining."""
        if svc.draining:
            return _error(503, "draining", retry=True).response()
        if not svc.ready:
            why = f"model failed to load: {svc.load_error}" if svc.load_error else "loading"
            return _error(503, why, retry=True).response()
        return JSONResponse(
            {"status": "ready", "model_sha256": svc.model.sha256, "pid": os.getpid()}
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        """The web page."""
        return HTMLResponse(page)

    edge = EdgeMiddleware(app, svc, settings.max_body, settings.max_count)
    edge.state = app.state  # tests reach the service through either object
    return edge


def _hook_signals(svc: NameService):
    """Mark the service draining on SIGTERM/SIGINT before uvicorn's own handler runs
    (uvicorn then stops accepting and waits for in-flight requests). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    saved = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        prev = signal.getsignal(sig)
        if not callable(prev):
            continue

        def handler(signum, frame, prev=prev):
            svc.begin_drain()
            prev(signum, frame)

        saved[sig] = prev
        signal.signal(sig, handler)

    def restore():
        if threading.current_thread() is threading.main_thread():
            for sig, prev in saved.items():
                signal.signal(sig, prev)

    return restore


def app_from_env():
    """uvicorn factory (``bnfold.serve:app_from_env``): each worker builds its own app, and
    so its own ONNX Runtime session, after it starts."""
    return create_app(ServeSettings.from_env())


def _exit_quietly(signum, frame):
    raise SystemExit(0)


def run_server(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "info",
) -> None:
    """Run uvicorn (uvloop + httptools when installed, no access log)."""
    import importlib.util

    import uvicorn

    settings.check()
    os.environ[ENV_SETTINGS] = settings.to_env()
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully: exit 0 then
    signal.signal(signal.SIGTERM, _exit_quietly)
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    uvicorn.run(
        "bnfold.serve:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop=loop,
        http=http,
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=int(math.ceil(settings.drain_timeout)),
        limit_concurrency=settings.max_connections,
        backlog=2048,
    )
