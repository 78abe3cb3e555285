"""The HTTP face of one worker: the FastAPI app (every route and the OpenAPI schema) and a
thin ASGI layer in front of it, the :class:`Edge`, for what FastAPI does not do: request
latency by status for ``/metrics`` (including answers FastAPI never sees), and the
request-body size limit (the body is read there, at most ``max_body`` bytes, and handed on
in one piece). The app also serves the web page (``/``, with the request schema written
into it) and the API docs (``/docs``, Swagger UI from local files: no CDN).

``GET`` and ``POST /v1/names`` are one path, :class:`NamesEndpoint`: the query string or
the body goes through the same strict schema (:class:`~bnfold.serve.schema.RequestParser`,
pydantic, validated once) and the same :meth:`~bnfold.serve.service.NameService.names`.
In the FastAPI app they are two routes (:class:`NamesRoute`), which the OpenAPI schema is
generated from and which answer wherever that app is served on its own
(:func:`create_fastapi_app`, e.g. mounted in another app; then without the Edge's body
limit and latency metric).

``bnfold serve`` runs the app behind the Edge (:func:`create_app`), and the Edge hands
``GET`` / ``POST /v1/names`` straight to the same :meth:`NamesEndpoint.answer`, skipping
only FastAPI's per-request machinery (middleware stack, router, request and response
objects), which costs a fifth to a quarter of the count=1 rate although these routes do
no parameter work: side by side in wrk runs (``benchmarks/loadtest.py --scenarios
count1,...,count1-fastapi,...``, ``benchmarks/results/serve.txt``, load average 0.5-1.4),
the routes served 0.73-0.80x the Edge's count=1 rate (6,222-6,582 against 8,088-8,524
req/s, 32-52 us more server CPU per request) and 0.82-0.97x its count=100 rate, so
answering through them would have made the load-test figures worse. Both paths run the
whole ``/v1/names`` test set (``tests/conftest.py``, fixture ``front``), and a test sends
the same requests to both and compares the answers byte for byte, so they cannot drift
apart.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware.trustedhost import TrustedHostMiddleware

from bnfold.serve.metrics import DOCS_ASSETS, endpoint_label
from bnfold.serve.schema import (
    ERRORS,
    RETRY_AFTER,
    Answer,
    NamesResponse,
    RequestParser,
    error,
)
from bnfold.serve.service import NameService, hook_signals
from bnfold.serve.settings import ServeSettings

_RETRY = {"Retry-After": RETRY_AFTER}
_SCHEMA_SLOT = "__REQUEST_SCHEMA__"  # where the page gets the request schema (its limits)


def _response(a: Answer) -> Response:
    return Response(a.body, a.status, _RETRY if a.retry else None, media_type="application/json")


def _page(parser: RequestParser) -> str:
    """The web page, with this server's request schema (every option's default and
    limits, ``max-count`` included) written into it, so the page's fields refuse exactly
    what the API refuses and nothing it accepts."""
    html = importlib.resources.files("bnfold.serve").joinpath("static/index.html")
    text = html.read_text("utf-8")
    if text.count(_SCHEMA_SLOT) != 1:
        raise RuntimeError(f"static/index.html must hold {_SCHEMA_SLOT} exactly once")
    # inside <script>, "</" could end the element early: JSON allows it escaped as \u003c
    schema = json.dumps(parser.model.model_json_schema()).replace("<", "\\u003c")
    return text.replace(_SCHEMA_SLOT, schema)


class NamesRoute(APIRoute):
    """A FastAPI route whose endpoint is its own request handler, ``(Request) -> Response``
    (FastAPI's documented ``get_route_handler`` hook): FastAPI routes to it and documents it
    (``openapi_extra``, ``responses``) but solves no parameters and serialises nothing,
    since the request is validated once, by :class:`~bnfold.serve.schema.RequestParser`,
    and the answer is JSON bytes already. (FastAPI's default handler for the same endpoint
    served 0.84-0.87x this route's count=1 rate in one wrk run, 24-32 us more server CPU
    per request: ``benchmarks/results/serve.txt``.)"""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        return self.endpoint


def _names_routes(names: NamesEndpoint) -> list[NamesRoute]:
    """``GET`` and ``POST /v1/names``, documented: the request model as query parameters
    and as the JSON body, and every answer."""
    return [
        NamesRoute("/v1/names", names.route, methods=[method], **doc)
        for method, doc in _names_docs(names.parser).items()
    ]


def _names_docs(parser: RequestParser) -> dict[str, dict]:
    """The OpenAPI of ``GET`` and ``POST /v1/names``, by method: the request model as query
    parameters and as the JSON body, and every answer."""
    request = parser.model.model_json_schema()
    responses = {200: {"model": NamesResponse, "description": "The names"}, **ERRORS}
    common = {
        "description": "Sample names. Same model + seed + options -> same names.",
        "responses": responses,
    }
    params = [
        {"name": name, "in": "query", "required": False, "schema": prop}
        for name, prop in request["properties"].items()
    ]
    return {
        "GET": {
            **common,
            "summary": "Sample names (query string)",
            "operation_id": "get_names",
            "openapi_extra": {"parameters": params},
        },
        "POST": {
            **common,
            "summary": "Sample names (JSON body)",
            "operation_id": "post_names",
            "openapi_extra": {
                "requestBody": {"content": {"application/json": {"schema": request}}}
            },
        },
    }


def create_app(settings: ServeSettings, *, loader=None, on_load_error=None) -> Edge:
    """The ASGI app of one worker: the FastAPI app (:func:`create_fastapi_app`) behind the
    Edge. ``loader(settings) -> LoadedModel`` runs in a thread after start-up (default:
    load the model and warm it up); tests pass their own. ``on_load_error(reason)`` is
    called when that fails (``bnfold serve`` exits then; default: ``/livez`` answers 503)."""
    app = create_fastapi_app(settings, loader=loader, on_load_error=on_load_error, check_host=False)
    return Edge(app, app.state.names, settings.max_body, settings.allowed_hosts)


def create_fastapi_app(
    settings: ServeSettings, *, loader=None, on_load_error=None, check_host=True
) -> FastAPI:
    """The FastAPI app of one worker: every route, ``/v1/names`` included, and the OpenAPI
    schema; its lifespan loads the model. :func:`create_app` puts the Edge in front (which
    then checks ``Host``, so this app does not: ``check_host=False``)."""
    settings.check()
    svc = NameService(settings, loader, on_load_error)
    names = NamesEndpoint(svc, RequestParser(settings.max_count))
    page = _page(names.parser)
    m = svc.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        restore = hook_signals(svc)
        await svc.start()
        try:
            # uvicorn hands this state to its connections (bnfold.serve.protocol)
            yield {"bnfold_metrics": m, "bnfold_settings": settings}
        finally:
            await svc.stop()
            restore()

    # /docs loads Swagger UI from files fastapi-offline ships, served under DOCS_ASSETS,
    # not from a CDN: the docs work on a machine without internet. No /redoc: ReDoc's
    # page still fetches its logo from the vendor's CDN.
    app = FastAPIOffline(
        redoc_url=None,
        title="bnfold names",
        version="1",
        summary="Sample names from a folded BatchNorm MLP (ONNX), with step-level batching.",
        lifespan=lifespan,
        routes=_names_routes(names),
        static_url=DOCS_ASSETS,
    )
    app.state.service = svc
    app.state.names = names
    if check_host:
        app.add_middleware(
            TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts, www_redirect=False
        )

    @app.get("/v1/model", responses={503: ERRORS[503]})
    async def model_info() -> JSONResponse:
        """The loaded model: vocabulary, block size, parameters, folded, sha256, verification."""
        if svc.model is None:
            return _response(error(503, "model not loaded yet", retry=True))
        return JSONResponse(svc.model.info)

    @app.get("/livez", responses={503: ERRORS[503]})
    async def livez() -> JSONResponse:
        """200 while the process is alive (503 if the model failed to load)."""
        if svc.load_error:
            return _response(error(503, f"model failed to load: {svc.load_error}"))
        return JSONResponse({"status": "alive"})

    @app.get("/readyz", responses={503: ERRORS[503]})
    async def readyz() -> JSONResponse:
        """200 once the model is loaded and warmed up; 503 before that and while draining."""
        if svc.draining:
            return _response(error(503, "draining", retry=True))
        if not svc.ready:
            why = f"model failed to load: {svc.load_error}" if svc.load_error else "loading"
            return _response(error(503, why, retry=True))
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

    return app


class NamesEndpoint:
    """``GET`` and ``POST /v1/names``: query string or body -> the one schema -> the
    service -> the answer."""

    def __init__(self, svc: NameService, parser: RequestParser):
        self.svc = svc
        self.parser = parser

    async def answer(self, method: str, query: bytes, body: bytes) -> Answer:
        """The answer to ``GET`` (``query``) or ``POST`` (``body``); the one path of both
        the FastAPI routes and the Edge."""
        if method == "GET":
            where, fields = "query", self.parser.query(query)
        else:
            where, fields = "body", self.parser.body(body)
        if isinstance(fields, Answer):
            self.svc.metrics.reject("invalid")
            return fields
        return await self.svc.names(fields, where)

    async def route(self, request: Request) -> Response:
        """The FastAPI routes' handler (:class:`NamesRoute`)."""
        body = await request.body() if request.method == "POST" else b""
        return _response(await self.answer(request.method, request.scope["query_string"], body))


class Edge:
    """Raw ASGI in front of the FastAPI app: latency by endpoint and status, the body size
    limit, and a shortcut for ``/v1/names`` into the routes' own
    :meth:`NamesEndpoint.answer` (see the module docstring)."""

    def __init__(
        self,
        app: FastAPI,
        names: NamesEndpoint,
        max_body: int,
        allowed_hosts: tuple[str, ...] = ("*",),
    ):
        self.app = app
        # Host first (400 for a name not served: no DNS rebinding), then everything below
        self._checked = TrustedHostMiddleware(
            self._handle, allowed_hosts=allowed_hosts, www_redirect=False
        )
        self.names = names
        self.state = app.state  # tests reach the service through either object
        self.metrics = names.svc.metrics
        self.max_body = max_body
        self._observers: dict[tuple[str, int], Any] = {}
        self._too_large = orjson.dumps({"detail": f"request body larger than {max_body} bytes"})

    def _observe(self, endpoint: str, status: int, seconds: float) -> None:
        obs = self._observers.get((endpoint, status))
        if obs is None:
            obs = self.metrics.latency.labels(endpoint, str(status)).observe
            self._observers[(endpoint, status)] = obs
        obs(seconds)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        endpoint = endpoint_label(path)
        status = 0

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._checked(scope, receive, send_status)
        finally:
            if status:  # 0: the client went away before any answer
                self._observe(endpoint, status, time.perf_counter() - t0)

    async def _handle(self, scope, receive, send) -> None:
        """An HTTP request whose ``Host`` is allowed: the body limit, the shortcut, the app."""
        size = _declared_body(scope["headers"])
        if size is not None:
            body = b"" if size > self.max_body else await self._read_body(receive)
            if body is _GONE:  # the client went away (or its body timed out): no answer
                return
            if size > self.max_body or body is _TOO_LARGE:
                return await self._reject_body(send)
            receive = _replay(body)
        else:
            body = b""
        if scope["path"] == "/v1/names" and scope["method"] in _NAMES_METHODS:  # the shortcut
            a = await self.names.answer(scope["method"], scope["query_string"], body)
            return await _send(send, a)
        await self.app(scope, receive, send)

    async def _read_body(self, receive) -> bytes | object:
        """The whole request body; ``_TOO_LARGE`` past ``max_body`` bytes, ``_GONE`` on a
        disconnect."""
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return _TOO_LARGE
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _reject_body(self, send) -> None:
        self.metrics.reject("body_too_large")
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._too_large)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._too_large})


_NAMES_METHODS = frozenset(["GET", "POST"])
_JSON = (b"content-type", b"application/json")
_RETRY_HEADER = (b"retry-after", RETRY_AFTER.encode())


async def _send(send, a: Answer) -> None:
    headers = [_JSON, (b"content-length", str(len(a.body)).encode())]
    if a.retry:
        headers.append(_RETRY_HEADER)
    await send({"type": "http.response.start", "status": a.status, "headers": headers})
    await send({"type": "http.response.body", "body": a.body})


_TOO_LARGE = object()  # sentinels of _read_body
_GONE = object()


def _declared_body(headers) -> int | None:
    """The body size the headers declare (-1: chunked, size unknown); None: no body.
    (The HTTP parser has refused malformed lengths already.)"""
    for k, v in headers:
        if k == b"content-length":
            return int(v) or None
        if k == b"transfer-encoding":
            return -1
    return None


def _replay(body: bytes):
    """A ``receive`` that yields the already-read body once, then waits as uvicorn's would
    (FastAPI never asks again)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return replayed
