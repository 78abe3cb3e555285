"""Running the service: uvicorn's configuration, the port check, signals, the worker
factory."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import signal
import socket
import tempfile
from pathlib import Path
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
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": int(math.ceil(settings.drain_timeout)),
        "timeout_keep_alive": settings.keep_alive,
        "limit_concurrency": settings.max_connections,
        "backlog": 2048,
    }


def logging_config(log_level: str, access_log: bool) -> dict[str, Any]:
    """uvicorn's logging configuration with ``log_level`` for its messages and, when
    ``access_log`` is on, the access log at INFO whatever ``log_level`` is: asking for
    ``--access-log`` gives one line per request even with ``--log-level warning``
    (uvicorn's own ``log_level`` would set both loggers to the same level)."""
    import copy

    from uvicorn.config import LOG_LEVELS as UVICORN_LEVELS
    from uvicorn.config import LOGGING_CONFIG

    if log_level not in LOG_LEVELS:
        raise BnfoldError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    config = copy.deepcopy(LOGGING_CONFIG)
    level = UVICORN_LEVELS[log_level]
    loggers = config["loggers"]
    loggers["uvicorn.error"]["level"] = level
    loggers["uvicorn.asgi"] = {"level": level}
    loggers["uvicorn.access"]["level"] = "INFO" if access_log else level
    return config


ENV_FAILURE = "BNFOLD_SERVE_FAILURE"  # file a worker writes why its model did not load
ENV_PARENT = "BNFOLD_SERVE_PID"  # the pid of `bnfold serve`: a worker with another is a child
STARTUP_FAILURE = 3  # uvicorn's exit code for "failed to start": its supervisor gives up


def app_from_env():
    """uvicorn factory (``bnfold.serve.server:app_from_env``): each worker builds its own
    app, and so its own ONNX Runtime session, after it starts."""
    return create_app(ServeSettings.from_env(), on_load_error=_worker_failed)


def _worker_failed(reason: str) -> None:
    """A worker's model did not load: serving "not ready" for ever helps no one, so the
    service stops with the reason. The reason goes to :data:`ENV_FAILURE`'s file for
    :func:`run_server`. A lone worker (the `bnfold serve` process itself) shuts down
    gracefully through SIGTERM; a worker process exits with uvicorn's start-up failure
    code, on which uvicorn's supervisor stops every worker instead of restarting it."""
    path = os.environ.get(ENV_FAILURE)
    if path:  # made here, only on failure: a killed service leaves no file behind
        with contextlib.suppress(OSError):
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
            fd = os.open(path, flags, 0o600)
            with open(fd, "a", encoding="utf-8") as f:
                f.write(reason + "\n")
    if os.environ.get(ENV_PARENT) == str(os.getpid()):
        signal.raise_signal(signal.SIGTERM)
    else:
        logging.shutdown()  # flush the "model failed to load" line first
        os._exit(STARTUP_FAILURE)


def _exit_quietly(signum, frame):
    raise SystemExit(0)


def run_server(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "info",
) -> None:
    """Run uvicorn (uvloop + httptools with the bounds of :mod:`bnfold.serve.protocol`;
    an access log only with ``settings.access_log``)."""
    import uvicorn

    settings.check()
    log_config = logging_config(log_level, settings.access_log)
    os.environ[ENV_SETTINGS] = settings.to_env()
    os.environ[ENV_PARENT] = str(os.getpid())
    # where a worker says why its model did not load (an unguessable name, made only then)
    failure = Path(tempfile.gettempdir(), f"bnfold-serve-{os.getpid()}-{secrets.token_hex(8)}")
    os.environ[ENV_FAILURE] = str(failure)
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully: exit 0 then
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        uvicorn.run(
            "bnfold.serve.server:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=log_config,  # the levels are set there (log_level=None: not overridden)
            **uvicorn_options(settings),
        )
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        reason = []
        with contextlib.suppress(FileNotFoundError):
            reason = failure.read_text("utf-8", "replace").strip().splitlines()
            failure.unlink()
    if reason:  # a worker could not load the model: stopped, not serving "not ready"
        raise BnfoldError(f"{settings.model}: the model failed to load: {reason[0]}")
