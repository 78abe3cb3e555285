"""The connection edge: uvicorn's httptools protocol, with the bounds it lacks.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and, with
``limit_concurrency``, the connections and requests a worker serves at once (503 beyond).
Its httptools parser has no bound on header size and no timer while a request's head or
body is arriving, so a client dripping header bytes (slowloris), sending an endless header,
or stalling mid-body holds its connection, its buffers and, on SIGTERM, the drain. This
subclass adds, per connection:

* ``max_header``: the request line and headers may take at most that many bytes; more ->
  431 and close (counted once the buffered chunk passes the bound, so at most one read
  chunk, 64-256 KiB, is ever held beyond it);
* ``header_timeout``: from the connection's start (or the first byte of a keep-alive
  request) to the end of the headers; then the connection is closed (a connection that
  never sends anything is closed too: uvicorn only times out connections that have
  finished a request);
* ``body_timeout``: from the end of the headers to the end of the body; then 408 and
  close; the app sees the client gone and answers nothing;
* every refusal, including uvicorn's own 503 past ``limit_concurrency`` and its 400 for
  unparsable requests, is counted in ``bnfold_rejections_total`` (reason label).

The limits and the metrics come from the app's lifespan state (``bnfold_settings``,
``bnfold_metrics``), which uvicorn hands to every connection; the class itself is passed
to uvicorn by name, so worker processes import it.
"""

from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _raw_answer(status: int, reason: str, detail: str) -> bytes:
    body = orjson.dumps({"detail": detail})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """See the module docstring."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        settings = self.app_state["bnfold_settings"]
        self.max_header = settings.max_header
        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout
        self._head_bytes = 0
        self._in_head = True
        self._timer: asyncio.TimerHandle | None = None
        self._arm(self.header_timeout, self._header_timed_out)
        self._gauge(len(self.connections))

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
        self._gauge(len(self.connections))

    # -- the bounds
    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._timer is None:  # the first byte of a keep-alive request
                self._arm(self.header_timeout, self._header_timed_out)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header and not self.transport.is_closing():
            self._reject("header_too_large")
            detail = f"request line and headers larger than {self.max_header} bytes"
            self._close_with(_raw_answer(431, "Request Header Fields Too Large", detail))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        if self.limit_concurrency is not None and (
            len(self.connections) >= self.limit_concurrency
            or len(self.tasks) >= self.limit_concurrency
        ):
            self._reject("connection_limit")  # uvicorn answers 503 below
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body:
            self._arm(self.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._reject("bad_request")
        super().send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_head = True  # the next request's head starts with its first byte
        self._head_bytes = 0

    def _header_timed_out(self) -> None:
        self._timer = None
        if self._in_head and not self.transport.is_closing():
            self._reject("header_timeout")
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        self._reject("body_timeout")
        if not cycle.response_started:
            detail = f"request body not received within {self.body_timeout:g} s"
            self.transport.write(_raw_answer(408, "Request Timeout", detail))
        cycle.response_complete = True  # the app's receive() now says the client is gone
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.close()

    # -- helpers
    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
            self._timer = None

    def _close_with(self, raw: bytes) -> None:
        self._disarm()
        self.transport.write(raw)
        self.transport.close()

    def _reject(self, reason: str) -> None:
        metrics = self.app_state.get("bnfold_metrics")
        if metrics is not None:
            metrics.reject(reason)

    def _gauge(self, n: int) -> None:
        metrics = self.app_state.get("bnfold_metrics")
        if metrics is not None:
            metrics.connections.set(n)
