"""The app's Prometheus metrics, in a registry of its own (several apps per process)."""

from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The ``endpoint`` label of ``bnfold_request_seconds``: every route by its path, the docs'
# assets under one prefix, anything else as "other" (a client picks the path, so the label
# set must stay bounded, whatever it sends).
ENDPOINTS = frozenset(
    [
        "/",
        "/v1/names",
        "/v1/model",
        "/livez",
        "/readyz",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
    ]
)
DOCS_ASSETS = "/static-offline-docs"  # Swagger UI's files, served locally


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a request path: the path itself for a route, the
    :data:`DOCS_ASSETS` prefix for any file under it, "other" for anything else."""
    if path in ENDPOINTS:
        return path
    if path.startswith(DOCS_ASSETS + "/"):
        return DOCS_ASSETS
    return "other"


REJECTION_REASONS = (
    "queue_full",  # 429: queue_size requests in flight
    "deadline",  # 504
    "invalid",  # 422
    "body_too_large",  # 413
    "not_ready",  # 503: loading or draining
    "body_timeout",  # 408: the body did not arrive within body_timeout (connection closed)
    "header_timeout",  # the request line + headers did not arrive within header_timeout
    "header_too_large",  # 431: request line + headers over max_header bytes
    "connection_limit",  # 503 from uvicorn: max_connections open at once
    "bad_request",  # 400: unparsable HTTP
)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        counter, gauge = partial(Counter, registry=r), partial(Gauge, registry=r)
        self.latency = Histogram(
            "bnfold_request_seconds",
            "HTTP request latency by endpoint and status code.",
            ["endpoint", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.names = counter("bnfold_names_generated", "Names sampled and returned.")
        self.rejections = counter(
            "bnfold_rejections",
            "Requests refused, by reason (" + ", ".join(REJECTION_REASONS) + ").",
            ["reason"],
        )
        for reason in REJECTION_REASONS:  # every reason shows, at 0 until it happens
            self.rejections.labels(reason)
        self.queue_depth = gauge("bnfold_queue_depth", "Requests waiting to join a forward step.")
        self.inflight = gauge("bnfold_inflight_requests", "Requests admitted and not yet answered.")
        self.batch_rows = Histogram(
            "bnfold_batch_rows",
            "Rows (names in flight) per step.",
            buckets=tuple(2**i for i in range(15)),
            registry=r,
        )
        self.batch_requests = Histogram(
            "bnfold_batch_requests",
            "Requests sharing a step.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.forward_rows = counter(
            "bnfold_forward_rows",
            "Contexts evaluated by the network (the table engine stores and reuses them).",
        )
        self.engines = gauge("bnfold_engines", "Sampling engines held (one per option group).")
        self.engine_bytes = gauge(
            "bnfold_engine_bytes",
            "Bytes held by the sampling engines (tables and rows), bounded by memory-mb.",
        )
        self.connections = gauge("bnfold_open_connections", "HTTP connections open on this worker.")

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason).inc()
