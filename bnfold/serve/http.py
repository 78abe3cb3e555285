"""The HTTP face of one worker: the FastAPI app (routes, OpenAPI schema) and a thin ASGI
layer in front of it for the two things FastAPI does not do: request latency by status
for ``/metrics`` (including answers FastAPI never sees), and the request-body size limit
(the body is read here, at most ``max_body`` bytes, and handed on in one piece).

``GET`` and ``POST /v1/names`` are one route: the query string or the body goes through
the same strict schema (:class:`~bnfold.serve.schema.RequestParser`, pydantic, validated
once) and the same :meth:`~bnfold.serve.service.NameService.names`. The route takes the
raw request, so FastAPI does no dependency solving or second validation on it; the
OpenAPI schema documents the same model.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bnfold.serve.metrics import Metrics
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

ENDPOINTS = frozenset(["/", "/v1/names", "/v1/model", "/livez", "/readyz", "/metrics"])
_RETRY = {"Retry-After": RETRY_AFTER}


def _response(a: Answer) -> Response:
    return Response(a.body, a.status, _RETRY if a.retry else None, media_type="application/json")


def _page() -> str:
    return importlib.resources.files("bnfold").joinpath("static/index.html").read_text("utf-8")


def _openapi_extra(parser: RequestParser) -> tuple[dict, dict]:
    """The request schema, as the POST body and as GET's query parameters."""
    schema = parser.model.model_json_schema()
    body = {"requestBody": {"content": {"application/json": {"schema": schema}}}}
    params = [
        {"name": name, "in": "query", "required": False, "schema": prop}
        for name, prop in schema["properties"].items()
    ]
    return body, {"parameters": params}


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
    post_doc, get_doc = _openapi_extra(parser)
    responses: dict[int | str, dict[str, Any]] = {200: {"model": NamesResponse}, **ERRORS}

    async def names(request: Request) -> Response:
        """Sample names (JSON body for POST, query string for GET). Same model + seed +
        options -> same names."""
        if request.method == "GET":
            where, fields = "query", parser.query(request.scope["query_string"])
        else:
            where, fields = "body", parser.body(await request.body())
        if isinstance(fields, Answer):
            m.reject("invalid")
            return _response(fields)
        return _response(await svc.names(fields, where))

    app.add_api_route(
        "/v1/names", names, methods=["POST"], responses=responses, openapi_extra=post_doc,
        operation_id="post_names",
    )  # fmt: skip
    app.add_api_route(
        "/v1/names", names, methods=["GET"], responses=responses, openapi_extra=get_doc,
        operation_id="get_names",
    )  # fmt: skip

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

    return Edge(app, m, settings.max_body)


class Edge:
    """Raw ASGI in front of FastAPI: latency by endpoint and status, the body size limit."""

    def __init__(self, app: FastAPI, metrics: Metrics, max_body: int):
        self.app = app
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
