"""What one worker needs to build its app: :class:`ServeSettings`, passed to every worker
process as JSON in an environment variable (uvicorn's workers import the app factory)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import socket
from dataclasses import asdict, dataclass, fields

from bnfold.errors import BnfoldError
from bnfold.sampling.engine import DEFAULT_ENGINE, ENGINES
from bnfold.sampling.options import MAX_COUNT

ENV_SETTINGS = "BNFOLD_SERVE_SETTINGS"  # JSON ServeSettings, read by each worker's factory
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
MIB = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """Every limit of the service, per worker. `bnfold serve` takes its defaults from here."""

    model: str
    words: str
    max_count: int = 1000  # names per request
    queue_size: int = 256  # requests admitted at once (waiting + running); more get 429
    deadline: float = 10.0  # seconds from arrival to answer; later -> 504
    max_body: int = 16_384  # bytes of request body; more -> 413
    batching: bool = True  # step-level batching across requests (False: one at a time)
    engine: str = DEFAULT_ENGINE  # sampling engine: "table" (memoized rows) or "network"
    max_rows: int = 8192  # rows in flight over all requests (one forward step)
    job_rows: int = 1024  # rows in flight per request
    # memory: every option group (temperature, top-k, top-p, min/max length) has an engine
    # of its own; each engine holds at most table_mb of stored rows plus its rows in flight
    table_mb: int = 32  # per engine; the shipped model's whole domain takes 23 MiB
    memory_mb: int = 256  # all engines together; a group past it waits for an idle one
    idle_release: float = 30.0  # seconds without work after which every engine is freed
    drain_timeout: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    # the connection edge (uvicorn): see bnfold.serve.protocol
    max_connections: int = 1024  # open connections per worker; more get 503
    max_header: int = 16_384  # bytes of request line + headers; more -> 431
    header_timeout: float = 10.0  # seconds to receive the request line + headers; then close
    body_timeout: float = 10.0  # seconds to receive the body once headers are in; then 408
    keep_alive: int = 5  # seconds an idle keep-alive connection stays open
    access_log: bool = False  # one line per request on stdout (uvicorn's access log)
    # `Host` names answered (others get 400: no DNS rebinding against a local service);
    # "*" answers any, "*.example.com" a domain. `bnfold serve` defaults to the bound
    # address (default_allowed_hosts); a service built in Python answers any.
    allowed_hosts: tuple[str, ...] = ("*",)

    def check(self) -> ServeSettings:
        ints = (
            "max_count",
            "queue_size",
            "max_body",
            "max_rows",
            "job_rows",
            "table_mb",
            "memory_mb",
            "max_connections",
            "max_header",
            "keep_alive",
        )
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BnfoldError(f"{_flag(name)} must be an integer >= 1, got {v!r}")
        if self.max_count > MAX_COUNT:
            raise BnfoldError(f"max-count must be at most {MAX_COUNT:,}, got {self.max_count:,}")
        for name in ("deadline", "drain_timeout", "idle_release", "header_timeout", "body_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise BnfoldError(f"{_flag(name)} must be a number > 0, got {v!r}")
        if not isinstance(self.access_log, bool):
            raise BnfoldError(f"access-log must be true or false, got {self.access_log!r}")
        if self.engine not in ENGINES:
            raise BnfoldError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        check_allowed_hosts(self.allowed_hosts)
        if self.table_mb > self.memory_mb:
            raise BnfoldError(
                f"table-mb ({self.table_mb}) must not exceed memory-mb ({self.memory_mb})"
            )
        return self

    @property
    def table_bytes(self) -> int:
        return self.table_mb * MIB

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * MIB

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ=os.environ) -> ServeSettings:
        raw = environ.get(ENV_SETTINGS)
        if not raw:
            raise BnfoldError(f"{ENV_SETTINGS} is not set (start the service with `bnfold serve`)")
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if "allowed_hosts" in data:  # JSON has no tuples
            data["allowed_hosts"] = tuple(data["allowed_hosts"])
        return cls(**data).check()


def _flag(name: str) -> str:
    return name.replace("_", "-")


# --------------------------------------------------------------------- allowed hosts --

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def host_pattern(name: str) -> str:
    """``name`` as the ``Host`` header spells it: lower case, an IPv6 address in brackets
    (``::1`` -> ``[::1]``)."""
    name = name.strip().lower()
    try:
        if ipaddress.ip_address(name).version == 6:
            return f"[{name}]"
    except ValueError:
        pass
    return name


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``--allowed-hosts``: names separated by commas (``*`` for any), checked."""
    return check_allowed_hosts(tuple(host_pattern(n) for n in text.split(",") if n.strip()))


def check_allowed_hosts(hosts: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse an empty list and a pattern other than a name, ``*`` or ``*.domain`` (a
    port, e.g. ``localhost:8000``, would never match: ``Host`` is compared without it)."""
    if not isinstance(hosts, tuple) or not hosts:
        raise BnfoldError("allowed-hosts must name at least one host (or * for any)")
    for h in hosts:
        if not isinstance(h, str) or _has_port(h):
            raise BnfoldError(f"allowed-hosts: {h!r} has a port; give the name alone")
        if (
            not h
            or any(c in h for c in "/@ \t")
            or ("*" in h and h != "*" and not (h.startswith("*.") and "*" not in h[1:]))
        ):
            raise BnfoldError(f"allowed-hosts: {h!r} is not a host name, an address, * or *.domain")
    return hosts


def _has_port(host: str) -> bool:
    if host.startswith("["):  # an IPv6 address: a port would follow the "]"
        return ":" in host.partition("]")[2]
    return ":" in host


def default_allowed_hosts(bind: str) -> tuple[str, ...]:
    """The ``Host`` names a service bound to ``bind`` answers by default: the bound name or
    address; for a loopback address also ``localhost``, ``127.0.0.1`` and ``[::1]``; for a
    wildcard address (``0.0.0.0``, ``::``) this machine's own names and addresses and the
    loopback ones (any other name, e.g. behind a proxy, is given with --allowed-hosts)."""
    try:
        ip = ipaddress.ip_address(bind)
    except ValueError:
        ip = None
    names = [host_pattern(bind)]
    if bind.lower() == "localhost" or (ip is not None and ip.is_loopback):
        names += LOOPBACK_HOSTS
    elif ip is not None and ip.is_unspecified:
        names = [*_own_names(), *LOOPBACK_HOSTS]
    return tuple(dict.fromkeys(names))


def _own_names() -> list[str]:
    """This machine's host name, its fully qualified name and the addresses they resolve to."""
    hostname = socket.gethostname()
    names = [hostname, socket.getfqdn()]
    with contextlib.suppress(OSError):  # a host name that does not resolve: the names alone
        names += [info[4][0] for info in socket.getaddrinfo(hostname, None)]
    return [host_pattern(n.split("%", 1)[0]) for n in names if n]
