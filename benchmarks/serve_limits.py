"""The service's resource bounds under the attacks of issue #13, this checkout against
another one (``--compare``, e.g. ``git archive main``), side by side on loopback.

* ``memory``: 60 option groups (distinct temperatures) x 9 concurrent
  ``{"count": 1000, "max_length": 1000}`` requests; server RSS before, at its peak, and
  after ``--idle`` seconds without work (the engines are freed after 30 s idle).
* ``headers``: 3 connections each sending up to 100 MB of one unfinished header; server
  RSS before and after, and how much each connection got to send before being closed.
* ``slowloris``: 5 connections dripping a header byte every 0.5 s for ``--drip`` seconds;
  how many the server closed.

Every load is bounded in count and time. Figures go to stdout and ``--out``.

    .venv/bin/python benchmarks/serve_limits.py --compare /tmp/main --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from pathlib import Path

import httpx
from loadtest import HOST, REPO, Server, rss_mib


async def memory(server: Server, idle: float) -> str:
    pid = server.proc.pid
    before = rss_mib(pid)
    peak = before
    done = False

    async def watch():
        nonlocal peak
        while not done:
            peak = max(peak, rss_mib(pid))
            await asyncio.sleep(0.05)

    bodies = [
        {"count": 1000, "max_length": 1000, "seed": i, "temperature": 0.5 + g / 50}
        for g in range(60)
        for i in range(9)
    ]
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
        watcher = asyncio.create_task(watch())
        rs = await asyncio.gather(
            *(c.post("/v1/names", json=b) for b in bodies), return_exceptions=True
        )
        done = True
        await watcher
    wall = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for r in rs:
        k = str(r.status_code) if isinstance(r, httpx.Response) else type(r).__name__
        statuses[k] = statuses.get(k, 0) + 1
    after = rss_mib(pid)
    await asyncio.sleep(idle)
    idle_rss = rss_mib(pid)
    return (
        f"memory: 60 groups x 9 x count=1000 max_length=1000 in {wall:.1f} s,"
        f" statuses {statuses}; RSS {before:.0f} -> peak {peak:.0f} -> {after:.0f} MiB,"
        f" {idle_rss:.0f} MiB after {idle:g} s idle"
    )


def headers(server: Server) -> str:
    pid = server.proc.pid
    before = rss_mib(pid)
    socks = [socket.create_connection((HOST, server.port), timeout=10) for _ in range(3)]
    sent = [0, 0, 0]
    chunk = b"a" * 65536
    for i, s in enumerate(socks):
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
        s.settimeout(10)
        try:
            while sent[i] < 100 << 20:
                s.sendall(chunk)
                sent[i] += len(chunk)
        except OSError:
            pass
    time.sleep(0.5)
    after = rss_mib(pid)
    for s in socks:
        s.close()
    got = ", ".join(f"{n / 2**20:.2f}" for n in sent)
    return (
        f"headers: 3 connections x up to 100 MB of one header: sent {got} MB before the"
        f" server closed; RSS {before:.0f} -> {after:.0f} MiB"
    )


def slowloris(server: Server, drip: float) -> str:
    socks = [socket.create_connection((HOST, server.port), timeout=10) for _ in range(5)]
    for s in socks:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
    closed = [False] * 5
    t0 = time.monotonic()
    while time.monotonic() - t0 < drip and not all(closed):
        for i, s in enumerate(socks):
            if closed[i]:
                continue
            try:
                s.sendall(b"X")
            except OSError:
                closed[i] = True
        time.sleep(0.5)
    for s in socks:
        s.close()
    return f"slowloris: 5 connections dripping for {drip:g} s: {sum(closed)} closed by the server"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(REPO / "models" / "folded.onnx"))
    ap.add_argument("--words", default=str(REPO / "data" / "names.txt"))
    ap.add_argument("--compare", type=Path, help="another checkout, run the same way")
    ap.add_argument("--idle", type=float, default=35.0, help="seconds idle before the last RSS")
    ap.add_argument("--drip", type=float, default=20.0, help="slowloris seconds (<= 60)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lines = [
        f"bnfold serve limits: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs,"
        f" load average at start {os.getloadavg()[0]:.2f}"
    ]
    print(lines[0], flush=True)
    checkouts = [("this checkout", REPO)]
    if args.compare:
        checkouts.append((args.compare.name, args.compare.resolve()))
    for label, root in checkouts:
        for name in ("memory", "headers", "slowloris"):
            server = Server(args.model, args.words, ["--deadline", "60"], root)
            try:
                if name == "memory":
                    line = asyncio.run(memory(server, args.idle))
                elif name == "headers":
                    line = headers(server)
                else:
                    line = slowloris(server, min(args.drip, 60.0))
            finally:
                server.stop()
            lines.append(f"{label}: {line}")
            print(lines[-1], flush=True)
    lines.append(f"load average at end {os.getloadavg()[0]:.2f}")
    print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
