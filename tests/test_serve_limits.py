"""Regression tests of the service's bounds (issue #13, items 7, 9, 10, 11), each through a
real uvicorn on loopback, every load bounded in count and time: options checked before
loading, an occupied port, the engines' memory bound and its release when idle, header
size, header time (slowloris), connections per worker, a body stalled across SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time

import httpx
import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow  # live servers pushed to their limits


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics")


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    """Poll ``predicate`` (a bounded wait, not a timing assertion)."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def closed_by_server(sock: socket.socket, timeout: float = 30) -> bytes:
    """Read until the server closes the connection; what it sent before closing."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def connect(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


# ------------------------------------------------------------------ item 7: serve options


def test_a_bad_log_level_is_refused_before_loading(tmp_path):
    r = run_cli("serve", tmp_path / "nope.onnx", "--log-level", "bogus", timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--log-level" in r.stderr and "bogus" in r.stderr
    assert "no such ONNX file" not in r.stderr  # refused before the model is looked at


def test_an_occupied_port_is_one_error_line(onnx_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", onnx_model, "--port", port, timeout=60)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: the port is in use"
    ]


# ------------------------------------------------------------ item 9: engine memory bound


def test_engine_memory_stays_within_the_budget_and_is_freed_when_idle(
    live, serve_settings, front_app
):
    """12 option groups x 3 concurrent long-name requests against a budget that holds a
    few engines: every answer is 200, the engines never hold more than the budget, and
    after ``idle_release`` seconds without work they hold nothing."""
    settings = serve_settings(memory_mb=64, table_mb=16, idle_release=0.5, deadline=60)
    budget = settings.memory_bytes
    with live(settings, app=front_app(settings)) as url:
        seen: list[float] = []
        stop = False

        async def watch():
            while not stop:
                seen.append(await asyncio.to_thread(metric, url, "bnfold_engine_bytes"))
                await asyncio.sleep(0.02)

        async def fire():
            nonlocal stop
            limits = httpx.Limits(max_connections=36)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
                watcher = asyncio.create_task(watch())
                bodies = [
                    {"count": 200, "max_length": 1000, "seed": i, "temperature": 0.5 + g / 10}
                    for g in range(12)
                    for i in range(3)
                ]
                rs = await asyncio.gather(*(c.post("/v1/names", json=b) for b in bodies))
                stop = True
                await watcher
            return rs

        rs = asyncio.run(fire())
        assert [r.status_code for r in rs] == [200] * 36
        assert 0 < max(seen) <= budget, (max(seen), budget)
        wait_until(lambda: metric(url, "bnfold_engines") == 0, "engines freed when idle")
        assert metric(url, "bnfold_engine_bytes") == 0


# ---------------------------------------------------- item 10: headers and connections


def test_slowloris_connections_are_closed_after_the_header_timeout(live, serve_settings):
    settings = serve_settings(header_timeout=1.0)
    with live(settings) as url:
        socks = [connect(url) for _ in range(5)]
        for s in socks:
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        for s in socks:  # one header byte every 0.2 s: never complete
            s.settimeout(0.2)
            while time.monotonic() - t0 < 30:
                try:
                    s.sendall(b"X")
                    if s.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            else:
                raise AssertionError("a dripping connection stayed open 30 s")
            s.close()
        assert metric(url, "bnfold_rejections_total", reason="header_timeout") == 5
        # a connection that never sends a byte is closed too
        with connect(url) as idle:
            assert closed_by_server(idle) == b""
        assert httpx.get(url + "/livez").status_code == 200


def test_an_oversized_header_gets_431_and_is_not_buffered(live, serve_settings):
    settings = serve_settings(max_header=8192)
    with live(settings) as url, connect(url) as s:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 100 << 20:  # up to 100 MB, as the attack did; stops when closed
                s.sendall(b"a" * 65536)
                sent += 65536
        answer = closed_by_server(s)
        assert sent < 100 << 20  # the server closed the connection long before
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert metric(url, "bnfold_rejections_total", reason="header_too_large") == 1
        ok = httpx.get(url + "/livez", headers={"x-fine": "a" * 4000})
        assert ok.status_code == 200


def test_connections_per_worker_are_bounded_and_refusals_counted(live, serve_settings):
    settings = serve_settings(max_connections=8, header_timeout=2.0)
    with live(settings) as url:
        idle = [connect(url) for _ in range(8)]
        try:
            with socket.create_connection(idle[0].getpeername(), timeout=10) as s:
                s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert closed_by_server(s).startswith(b"HTTP/1.1 503 ")
            # the idle connections are closed after the header timeout; then all is well
            for s in idle:
                assert closed_by_server(s) == b""
        finally:
            for s in idle:
                s.close()
        wait_until(lambda: httpx.get(url + "/livez").status_code == 200, "served again")
        assert metric(url, "bnfold_rejections_total", reason="connection_limit") >= 1
        assert metric(url, "bnfold_rejections_total", reason="header_timeout") == 8


def test_a_stalled_body_gets_408(live, serve_settings, front_app):
    settings = serve_settings(body_timeout=1.0)
    with live(settings, app=front_app(settings)) as url, connect(url) as s:
        s.sendall(
            b"POST /v1/names HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"count": '
        )
        answer = closed_by_server(s)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"not received within 1 s" in answer
        assert metric(url, "bnfold_rejections_total", reason="body_timeout") == 1
        assert httpx.post(url + "/v1/names", json={"count": 1}).status_code == 200


# ------------------------------------------------------ item 11: SIGTERM and a stalled body


def test_sigterm_with_a_stalled_body_drains_cleanly(onnx_model, spawn_serve, wait_ready):
    """The stalled request is answered 408 once its body times out (10 s, well inside the
    30 s drain), the process exits 0, and nothing is logged as an error."""
    proc, url = spawn_serve(onnx_model)
    try:
        wait_ready(url)
        with connect(url) as s:
            s.sendall(  # an allowed Host (bnfold serve's default: the bound address)
                b'POST /v1/names HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"cou'
            )
            # the server holds the stalled connection (the one asking for /metrics is the
            # other open one) before it is told to stop
            deadline = time.monotonic() + 10
            while metric(url, "bnfold_open_connections") < 2:
                assert time.monotonic() < deadline, "the stalled connection never opened"
            proc.send_signal(signal.SIGTERM)
            answer = closed_by_server(s, timeout=40)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert proc.wait(40) == 0
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and "CancelledError" not in err
        assert "Internal Server Error" not in err
        assert not re.search(r"ERROR", err), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
