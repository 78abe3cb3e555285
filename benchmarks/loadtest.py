"""Load test of ``bnfold serve`` on loopback: throughput, latency, overload behaviour.

Starts the server itself (``cli.py serve`` on 127.0.0.1 and a free port; never any other
address), waits for ``/readyz``, and runs short, bounded scenarios against ``/v1/names``:

* ``count1``    32 connections, count=1         (target >= 2,000 req/s, p99 <= 50 ms)
* ``count100``  32 connections, count=100       (target >= 50,000 names/s)
* ``overload``  320 connections (10x) against a queue of 64: excess must get 429 fast,
                accepted requests must meet the deadline, memory must stay bounded
* ``count1-get`` / ``count100-get``: the same as GET with a query string (one request path:
  GET and POST should cost the same)
* ``count1-fastapi``, ``count1-get-fastapi``, ``count100-fastapi``, ``count100-get-fastapi``:
  the same four against the bare FastAPI app (``bnfold.serve.create_fastapi_app`` under the
  same uvicorn options, no Edge in front), so its ``/v1/names`` routes answer rather than
  the Edge's shortcut (skipped for a checkout that has no such app)
* each of count1/count100 also with ``--batching off`` (one request at a time), to show
  what step-level batching buys.

Each scenario also reports the server's own CPU time per request (from ``/proc``), which
other jobs on a shared machine do not inflate the way they inflate wall-clock rates.
``--compare DIR`` (repeatable) runs another checkout's server (e.g. ``git archive main |
tar -x -C DIR``) on the same scenarios in the same run, its lines labelled with the folder
name; ``--rounds N`` repeats the whole sequence, so the checkouts alternate.

Load generator: ``wrk`` (C, epoll; Debian package ``wrk``) with a Lua script for the POST
body and per-status counts. A Python client shares the GIL-bound 2 cores with the server and
tops out near the server's own rate, so it would measure itself; wrk uses ~1/3 of a core at
these rates. Without wrk the script falls back to a raw-socket asyncio client (figures then
understate the server). Per-status server-side latency comes from the server's own
``/metrics`` histogram (bucket upper bounds), client-side percentiles from wrk.

Every run is bounded: ``--duration`` seconds per scenario (default 5), wrk's own timeout,
and the Python client stops at ``--max-requests``.

    .venv/bin/python benchmarks/loadtest.py [MODEL] [--duration 5] [--compare DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # loopback only, by design

LUA = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  statuses = {}
  wrk.method = os.getenv("BNFOLD_METHOD")
  if wrk.method == "POST" then
    wrk.headers["Content-Type"] = "application/json"
    wrk.body = os.getenv("BNFOLD_BODY")
  end
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do agg[tostring(k)] = (agg[tostring(k)] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(agg) do table.insert(parts, string.format('"%s": %d', k, v)) end
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d,'
    .. ' "max_us": %d, "errors": %d, "timeouts": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max,
    summary.errors.connect + summary.errors.read + summary.errors.write,
    summary.errors.timeout, table.concat(parts, ", ")))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (a rate's denominator that other jobs
    on the machine do not inflate, unlike wall-clock time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


# the bare FastAPI app of a checkout, as `bnfold serve` would run it without the Edge
FASTAPI_ONLY = """
import sys
import uvicorn
from bnfold.serve import ServeSettings, create_fastapi_app
from bnfold.serve.server import uvicorn_options
model, words, host, port = sys.argv[1:]
settings = ServeSettings(model=model, words=words).check()
app = create_fastapi_app(settings)
uvicorn.run(app, host=host, port=int(port), log_level="warning", **uvicorn_options(settings))
"""
FASTAPI = "fastapi"  # a scenario's server: the bare FastAPI app instead of `bnfold serve`


class Server:
    def __init__(self, model: str, words: str, extra: list[str], root: Path = REPO):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        if extra == [FASTAPI]:
            cmd = [sys.executable, "-c", FASTAPI_ONLY, model, words, HOST, str(self.port)]
        else:
            cmd = [sys.executable, str(root / "cli.py"), "serve", model, "--words", words]
            cmd += ["--host", HOST, "--port", str(self.port), "--log-level", "warning", *extra]
        env = {**os.environ, "PYTHONPATH": str(root)}  # that checkout's bnfold, not ours
        self.proc = subprocess.Popen(cmd, cwd=root, stderr=subprocess.PIPE, text=True, env=env)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.proc.stderr.read()}")
            try:
                if get(self.url + "/readyz", 1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise SystemExit("server did not become ready in 60 s")

    def metrics(self) -> str:
        return get(self.url + "/metrics")[1].decode()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def has_fastapi_app(root: Path) -> bool:
    return "def create_fastapi_app" in (root / "bnfold" / "serve" / "http.py").read_text()


def histogram(text: str, name: str, match: dict[str, str]) -> dict[float, float]:
    """Cumulative bucket counts {le: count} of one labelled histogram series."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.index("}")]))
        if all(labels.get(k) == v for k, v in match.items()):
            out[float(labels["le"])] = float(line.rsplit(" ", 1)[1])
    return out


def quantile(before: dict, after: dict, q: float) -> float | None:
    """Upper bucket bound holding quantile q of the observations between two scrapes."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    if not counts or counts[-1] <= 0:
        return None
    for le, c in zip(les, counts, strict=True):
        if c >= q * counts[-1]:
            return le
    return les[-1]


def run_wrk(
    url: str, body: dict, connections: int, duration: float, timeout: float, method: str
) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA)
        script = f.name
    try:
        cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", f"--timeout={timeout:g}s"]
        target = url + "/v1/names"
        if method == "GET":
            target += "?" + urllib.parse.urlencode(body)
        cmd += ["-s", script, target]
        env = {**os.environ, "BNFOLD_BODY": json.dumps(body), "BNFOLD_METHOD": method}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    finally:
        os.unlink(script)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk failed: {out.stdout}\n{out.stderr}")
    r = json.loads(line[len("RESULT ") :])
    r["statuses"] = {int(k): v for k, v in r["statuses"].items()}
    return r


async def _py_client(url, body, connections, duration, timeout, max_requests, method):
    """Raw-socket HTTP/1.1 keep-alive client: one coroutine per connection."""
    port = int(url.rsplit(":", 1)[1])
    payload = json.dumps(body).encode()
    if method == "GET":
        query = urllib.parse.urlencode(body)
        req = f"GET /v1/names?{query} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    else:
        req = (
            f"POST /v1/names HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors = [0]
    stop_at = time.perf_counter() + duration

    async def conn():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.perf_counter() < stop_at and len(lat) < max_requests:
                t0 = time.perf_counter()
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                status = int(head[9:12])
                m = re.search(rb"content-length: (\d+)", head, re.I)
                await reader.readexactly(int(m.group(1)) if m else 0)
                lat.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            errors[0] += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(conn() for _ in range(connections)))
    wall = time.perf_counter() - t0
    lat.sort()

    def pct(p):
        return int(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e6) if lat else 0

    return {
        "requests": len(lat),
        "duration_us": int(wall * 1e6),
        "p50_us": pct(50),
        "p90_us": pct(90),
        "p99_us": pct(99),
        "max_us": int(lat[-1] * 1e6) if lat else 0,
        "errors": errors[0],
        "timeouts": 0,
        "statuses": statuses,
    }


def load(tool, url, body, connections, duration, timeout, max_requests, method="POST"):
    if tool == "wrk":
        return run_wrk(url, body, connections, duration, timeout, method)
    return asyncio.run(_py_client(url, body, connections, duration, timeout, max_requests, method))


def scenario(server, name, tool, body, connections, args, lines, deadline=None):
    m0 = server.metrics()
    rss0 = rss_mib(server.proc.pid)
    cpu0 = cpu_seconds(server.proc.pid)
    method = "GET" if "-get" in name else "POST"
    r = load(tool, server.url, body, connections, args.duration, 10.0, args.max_requests, method)
    cpu1 = cpu_seconds(server.proc.pid)
    m1 = server.metrics()
    rss1 = rss_mib(server.proc.pid)
    secs = r["duration_us"] / 1e6
    ok = r["statuses"].get(200, 0)
    count = body["count"]
    s5xx = sum(v for k, v in r["statuses"].items() if k >= 500)
    res = {
        "scenario": name,
        "connections": connections,
        "count": count,
        "requests": r["requests"],
        "req_s": r["requests"] / secs,
        "ok_req_s": ok / secs,
        "names_s": ok * count / secs,
        "p50_ms": r["p50_us"] / 1e3,
        "p90_ms": r["p90_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3,
        "max_ms": r["max_us"] / 1e3,
        "statuses": r["statuses"],
        "socket_errors": r["errors"],
        "timeouts": r["timeouts"],
        "5xx": s5xx,
        "rss_mib": (round(rss0, 1), round(rss1, 1)),
        "cpu_us_per_request": (cpu1 - cpu0) * 1e6 / max(r["requests"], 1),
    }
    for status in (200, 429, 504):
        h0 = histogram(
            m0, "bnfold_request_seconds", {"endpoint": "/v1/names", "status": str(status)}
        )
        h1 = histogram(
            m1, "bnfold_request_seconds", {"endpoint": "/v1/names", "status": str(status)}
        )
        p99 = quantile(h0, h1, 0.99)
        if p99 is not None:
            res[f"server_p99_{status}_ms_le"] = p99 * 1e3
    b0 = histogram(m0, "bnfold_batch_requests", {})
    b1 = histogram(m1, "bnfold_batch_requests", {})
    med = quantile(b0, b1, 0.5)
    if med is not None:
        res["median_requests_per_step_le"] = med
    lines.append(format_result(res, deadline))
    print(lines[-1], flush=True)
    return res


def format_result(r: dict, deadline: float | None) -> str:
    st = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
    s = (
        f"{r['scenario']:<22} c={r['connections']:<4} count={r['count']:<4}"
        f" {r['req_s']:8.0f} req/s  {r['names_s']:9.0f} names/s"
        f"  p50 {r['p50_ms']:6.2f} ms  p90 {r['p90_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms"
        f"  max {r['max_ms']:7.1f} ms\n{'':24}statuses {{{st}}}  5xx {r['5xx']}"
        f"  socket errors {r['socket_errors']}  timeouts {r['timeouts']}"
        f"  server RSS {r['rss_mib'][0]} -> {r['rss_mib'][1]} MiB"
        f"\n{'':24}server CPU {r['cpu_us_per_request']:.0f} us per request"
        f" ({r['cpu_us_per_request'] / max(r['count'], 1):.2f} us per name)"
    )
    extra = [
        f"server p99 {k.split('_')[2]} <= {v:g} ms"
        for k, v in r.items()
        if k.startswith("server_p99_")
    ]
    if "median_requests_per_step_le" in r:
        extra.append(f"median requests/step <= {r['median_requests_per_step_le']:g}")
    if deadline is not None:
        extra.append(f"deadline {deadline:g} s")
    if extra:
        s += "\n" + " " * 24 + "; ".join(extra)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(REPO / "models" / "folded.onnx"))
    ap.add_argument("--words", default=str(REPO / "data" / "names.txt"))
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per scenario (<= 30)")
    ap.add_argument("--max-requests", type=int, default=200_000, help="python client cap")
    ap.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument(
        "--scenarios",
        default="count1,count1-get,count100,count100-get,count1-plain,count100-plain,overload",
        help="comma-separated subset (also count1-fastapi, count1-get-fastapi,"
        " count100-fastapi, count100-get-fastapi)",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="another checkout (e.g. `git archive main`): run its server on the same"
        " scenarios after this one, and label its lines with its folder name (repeatable)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the whole comparison this many times, checkouts alternating, so that"
        " a change in the machine's load hits every checkout alike",
    )
    ap.add_argument("--out", type=Path, help="also write the figures to this file")
    args = ap.parse_args()
    args.duration = min(max(args.duration, 1.0), 30.0)
    if not Path(args.model).exists():
        raise SystemExit(f"{args.model}: no such model (make one with `bnfold train-fold`)")
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "python"
    wanted = set(args.scenarios.split(","))
    lines = [
        f"bnfold serve load test: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs,"
        f" load generator {tool}, {args.duration:g} s per scenario, loopback {HOST}",
        f"model {Path(args.model).name}; one worker, uvloop + httptools, access log off;"
        f" load average at start {os.getloadavg()[0]:.2f} (other jobs on the cores skew figures)",
    ]
    print("\n".join(lines), flush=True)
    runs = [
        ("count1", [], {"count": 1}, 32),
        ("count1-get", [], {"count": 1}, 32),
        ("count100", [], {"count": 100}, 32),
        ("count100-get", [], {"count": 100}, 32),
        ("count1-plain", ["--batching", "off"], {"count": 1}, 32),
        ("count100-plain", ["--batching", "off"], {"count": 100}, 32),
        ("count1-fastapi", [FASTAPI], {"count": 1}, 32),
        ("count1-get-fastapi", [FASTAPI], {"count": 1}, 32),
        ("count100-fastapi", [FASTAPI], {"count": 100}, 32),
        ("count100-get-fastapi", [FASTAPI], {"count": 100}, 32),
    ]
    checkouts = [("", REPO)] + [(d.name + ":", d.resolve()) for d in args.compare]
    checkouts = checkouts * max(args.rounds, 1)
    for server_args in ([], ["--batching", "off"], [FASTAPI]):
        group = [r for r in runs if r[0] in wanted and r[1] == server_args]
        if not group:
            continue
        for label, root in checkouts:
            if server_args == [FASTAPI] and not has_fastapi_app(root):
                lines.append(f"{label}{group[0][0]}: skipped (no create_fastapi_app there)")
                print(lines[-1], flush=True)
                continue
            server = Server(args.model, args.words, server_args, root)
            try:
                for name, _, body, conns in group:
                    scenario(server, label + name, tool, body, conns, args, lines)
            finally:
                server.stop()
    if "overload" in wanted:
        deadline = 2.0
        server = Server(args.model, args.words, ["--queue-size", "64", "--deadline", str(deadline)])
        try:
            scenario(server, "overload (10x conns)", tool, {"count": 1}, 320, args, lines, deadline)
            ready = get(server.url + "/readyz")[0]
            lines.append(
                f"{'':24}after overload: /readyz {ready}, server alive {server.proc.poll() is None}"
            )
            print(lines[-1], flush=True)
        finally:
            code = server.stop()
            lines.append(f"{'':24}SIGTERM -> exit code {code}")
            print(lines[-1], flush=True)
    lines.append(f"load average at end {os.getloadavg()[0]:.2f}")
    print(lines[-1])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
