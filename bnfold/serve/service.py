"""Per-app state and the answer to one names request: readiness, admission (429), the
deadline (504), options -> :class:`~bnfold.sampling.options.SampleOptions` (422 by field),
and the rendered answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import signal
import threading
from collections.abc import Callable

import orjson

from bnfold.errors import BnfoldError
from bnfold.sampling.options import SampleOptions
from bnfold.serve.batcher import Batcher, DeadlineExceeded, Outcome, Request
from bnfold.serve.metrics import Metrics
from bnfold.serve.model import LoadedModel, load_and_warm
from bnfold.serve.schema import Answer, error, invalid, option_error
from bnfold.serve.settings import ServeSettings

log = logging.getLogger("bnfold.serve")

SEED_BITS = 53  # random seeds stay below 2**53, exact in JavaScript numbers (the web page)


class NameService:
    """The model, the batcher, admission control and readiness of one app."""

    def __init__(self, settings: ServeSettings, loader=None, on_load_error=None):
        self.settings = settings
        self.loader = loader or load_and_warm
        # called with the reason when the model fails to load (`bnfold serve`: exit)
        self.on_load_error: Callable[[str], None] | None = on_load_error
        self.metrics = Metrics()
        self.model: LoadedModel | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.inflight = 0
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # random seeds for requests without one: a PRNG seeded from the OS per app (so per
        # worker); the OS generator itself costs a system call per request
        self._rng = random.Random(secrets.randbits(128))
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth if self.batcher else 0)
        self.metrics.inflight.set_function(lambda: self.inflight)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            model = await asyncio.to_thread(self.loader, self.settings)
            self.model = model
            self.batcher = Batcher(model, self.settings, self.metrics, self._deliver)
            self.batcher.start()
            # the default options' engine (and, for the table engine, its stored rows) is
            # built before the first request, not during it
            await self.sample(SampleOptions(count=64, seed=0))
        except Exception as e:  # never "not ready" for ever: say why, and let the owner act
            self.load_error = str(e) if isinstance(e, BnfoldError) else f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
            return
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
        self.ready = False

    # -- the batcher's results, handed to the event loop once per step
    def _deliver(self, done: list[Outcome]) -> None:
        self._loop.call_soon_threadsafe(_resolve_all, done)

    async def sample(self, options: SampleOptions) -> tuple[list, list, list]:
        """Admitted request -> (names, logprobs, stream indexes); raises DeadlineExceeded,
        or BnfoldError when new-only cannot find enough names."""
        loop = asyncio.get_running_loop()
        req = Request(options, loop.create_future())
        timer = loop.call_later(self.settings.deadline, _expire, self.batcher, req)
        try:
            self.batcher.submit(req)
            return await req.future
        finally:
            timer.cancel()

    async def names(self, fields: dict, where: str) -> Answer:
        """Answer validated request fields (:mod:`bnfold.serve.schema`): 200 with the names,
        or 503 / 429 / 422 / 504."""
        m = self.metrics
        if not self.ready or self.draining:
            m.reject("not_ready")
            why = "draining" if self.draining else "loading the model"
            return error(503, f"not ready ({why})", retry=True)
        settings = self.settings
        if self.inflight >= settings.queue_size:
            m.reject("queue_full")
            return error(429, f"queue full ({settings.queue_size} requests in flight)", True)
        model = self.model
        if fields["seed"] is None:
            fields = {**fields, "seed": self._rng.getrandbits(SEED_BITS)}
        try:
            opts = SampleOptions(**fields).check(model.predictor.vocab)
        except BnfoldError as e:
            m.reject("invalid")
            return invalid(option_error(e, where))
        self.inflight += 1
        try:
            names, lps, index = await self.sample(opts)
        except DeadlineExceeded:
            m.reject("deadline")
            return error(504, f"deadline of {settings.deadline:g} s exceeded")
        except BnfoldError as e:  # e.g. new-only could not find enough new names
            m.reject("invalid")
            return invalid(option_error(e, where))
        finally:
            self.inflight -= 1
        label = model.labeler
        items = [
            {"name": n, "label": label(n), "logprob": lp, "index": i}
            for n, lp, i in zip(names, lps, index, strict=True)
        ]
        m.names.inc(len(items))
        body = {
            "names": items,
            "count": len(items),
            "seed": opts.seed,
            "model_sha256": model.sha256,
            "options": opts.to_dict(),
        }
        return Answer(200, orjson.dumps(body))


def _expire(batcher: Batcher, req: Request) -> None:
    if not req.future.done():
        batcher.cancel(req)
        req.future.set_exception(DeadlineExceeded())


def _resolve_all(done: list[Outcome]) -> None:
    """On the event loop: answer every finished request of a step."""
    for req, value, exc in done:
        fut = req.future
        if fut.done():
            continue  # already answered (deadline)
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


def hook_signals(svc: NameService) -> Callable[[], None]:
    """Mark the service draining on SIGTERM/SIGINT before uvicorn's own handler runs
    (uvicorn then stops accepting and waits for in-flight requests). Main thread only;
    returns the function that restores the previous handlers."""
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
