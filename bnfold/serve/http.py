"""The HTTP face of one worker: the FastAPI app (routes, OpenAPI schema) and a thin ASGI
layer in front of it for the two things FastAPI does not do: request latency by status
for ``/metrics`` (including answers FastAPI never sees), and the request-body size limit
(the body is read here, at most ``max_body`` bytes, and handed on in one piece).

``GET`` and ``POST /v1/names`` are one path (:class:`NamesEndpoint`): the query string
or the body goes through the same strict schema (:class:`~bnfold.serve.schema.RequestParser`,
pydantic, validated once) and the same :meth:`~bnfold.serve.service.NameService.names`.
The edge answers it itself, because FastAPI's per-request machinery (middleware stack,
router, request and response objects) halved the count=1 rate in a side-by-side wrk run
(1,865 vs 4,439 req/s for the old hand-validated POST; ``benchmarks/loadtest.py``); the
app's OpenAPI schema documents the operation with the same model.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import time
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic.json_schema import models_json_schema

from bnfold.serve.metrics import Metrics
from bnfold.serve.schema import (
    ERRORS,
    RETRY_AFTER,
    Answer,
    ErrorResponse,
    NamesResponse,
    RequestParser,
    ValidationErrorResponse,
    error,
)
from bnfold.serve.service import NameService, hook_signals
from bnfold.serve.settings import ServeSettings

ENDPOINTS = frozenset(["/", "/v1/names", "/v1/model", "/livez", "/readyz", "/metrics"])
_RETRY = {"Retry-After": RETRY_AFTER}


def _response(a: Answer) -> Response:
    return Response(a.body, a.status, _RETRY if a.retry else None, media_type="application/json")


def _page() -> str:
    return importlib.resources.files("bnfold").joinpath("static/index.html").read_text("utf-8")


def _document_names(app: FastAPI, parser: RequestParser) -> None:
    """Put ``GET`` / ``POST /v1/names`` into the app's OpenAPI schema: the request model as
    the body and as query parameters, and the answers (the edge serves the operation)."""
    models = [NamesResponse, ErrorResponse, ValidationErrorResponse]
    _, top = models_json_schema(
        [(model, "serialization") for model in models],
        ref_template="#/components/schemas/{model}",
    )

    def content(model: type) -> dict:
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {"application/json": {"schema": ref}}

    answers = {"200": {"description": "The names", "content": content(NamesResponse)}}
    for status, doc in ERRORS.items():
        answers[str(status)] = {"description": doc["description"], "content": content(doc["model"])}
    request = parser.model.model_json_schema()
    doc = "Sample names. Same model + seed + options -> same names."
    post = {
        "summary": "Sample names (JSON body)",
        "description": doc,
        "operationId": "post_names",
        "requestBody": {"content": {"application/json": {"schema": request}}},
        "responses": answers,
    }
    params = [
        {"name": name, "in": "query", "required": False, "schema": prop}
        for name, prop in request["properties"].items()
    ]
    get = {
        "summary": "Sample names (query string)",
        "description": doc,
        "operationId": "get_names",
        "parameters": params,
        "responses": answers,
    }
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema["paths"] = {"/v1/names": {"get": get, "post": post}, **schema["paths"]}
            schema.setdefault("components", {}).setdefault("schemas", {}).update(top["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: ServeSettings, *, loader=None) -> Edge:
    """The ASGI app of one worker. ``loader(settings) -> LoadedModel`` runs in a thread after
    start-up (default: load the model and warm it up); tests pass their own."""
    settings.check()
    svc = NameService(settings, loader)
    parser = RequestParser(settings.max_count)
    page = _page()
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

    app = FastAPI(
        title="bnfold names",
        version="1",
        summary="Sample names from a folded BatchNorm MLP (ONNX), with step-level batching.",
        lifespan=lifespan,
    )
    app.state.service = svc
    names = NamesEndpoint(svc, parser)
    _document_names(app, parser)

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

    return Edge(app, names, m, settings.max_body)


class NamesEndpoint:
    """``GET`` and ``POST /v1/names``: query string or body -> the one schema -> the
    service -> the answer."""

    def __init__(self, svc: NameService, parser: RequestParser):
        self.svc = svc
        self.parser = parser

    async def answer(self, method: str, query: bytes, body: bytes) -> Answer:
        if method == "GET":
            where, fields = "query", self.parser.query(query)
        else:
            where, fields = "body", self.parser.body(body)
        if isinstance(fields, Answer):
            self.svc.metrics.reject("invalid")
            return fields
        return await self.svc.names(fields, where)


class Edge:
    """Raw ASGI in front of FastAPI: latency by endpoint and status, the body size limit,
    and ``/v1/names`` itself (see the module docstring)."""

    def __init__(self, app: FastAPI, names: NamesEndpoint, metrics: Metrics, max_body: int):
        self.app = app
        self.names = names
        self.state = app.state  # tests reach the service through either object
        self.metrics = metrics
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
        endpoint = path if path in ENDPOINTS else "other"
        status = 0

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            size = _declared_body(scope["headers"])
            if size is not None:
                body = b"" if size > self.max_body else await self._read_body(receive)
                if body is _GONE:  # the client went away (or its body timed out): no answer
                    return
                if size > self.max_body or body is _TOO_LARGE:
                    return await self._reject_body(send_status)
                receive = _replay(body)
            else:
                body = b""
            if path == "/v1/names" and scope["method"] in _NAMES_METHODS:
                a = await self.names.answer(scope["method"], scope["query_string"], body)
                return await _send(send_status, a)
            await self.app(scope, receive, send_status)
        finally:
            if status:  # 0: the client went away before any answer
                self._observe(endpoint, status, time.perf_counter() - t0)

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
