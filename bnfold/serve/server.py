"""Running the service: uvicorn's configuration, the port check, signals, the worker
factory."""

from __future__ import annotations

import errno
import math
import os
import signal
import socket
from typing import Any

from bnfold.errors import BnfoldError
from bnfold.serve.http import create_app
from bnfold.serve.protocol import BoundedHttpToolsProtocol
from bnfold.serve.settings import ENV_SETTINGS, LOG_LEVELS, ServeSettings


def check_port(host: str, port: int) -> None:
    """Refuse, with one clear line, an address this process cannot listen on (checked
    before the model is loaded; uvicorn would print ``[Errno 98]`` and exit 3)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BnfoldError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            why = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise BnfoldError(f"cannot listen on {host}:{port}: {why}") from None


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """uvicorn's bounds for this service (the same for ``bnfold serve`` and the tests)."""
    import importlib.util

    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": BoundedHttpToolsProtocol,
        "access_log": False,
        "timeout_graceful_shutdown": int(math.ceil(settings.drain_timeout)),
        "timeout_keep_alive": settings.keep_alive,
        "limit_concurrency": settings.max_connections,
        "backlog": 2048,
    }


def app_from_env():
    """uvicorn factory (``bnfold.serve.server:app_from_env``): each worker builds its own
    app, and so its own ONNX Runtime session, after it starts."""
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
    """Run uvicorn (uvloop + httptools with the bounds of :mod:`bnfold.serve.protocol`,
    no access log)."""
    import uvicorn

    settings.check()
    if log_level not in LOG_LEVELS:
        raise BnfoldError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    os.environ[ENV_SETTINGS] = settings.to_env()
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully: exit 0 then
    signal.signal(signal.SIGTERM, _exit_quietly)
    uvicorn.run(
        "bnfold.serve.server:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        **uvicorn_options(settings),
    )
