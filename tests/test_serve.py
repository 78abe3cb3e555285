"""The HTTP service: endpoints and errors, same names as the CLI sampler, determinism under
concurrent load, readiness during start-up and drain, backpressure (429, 504), SIGTERM,
several workers, and schemathesis fuzzing of the API from its own OpenAPI schema."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from conftest import stop_server
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from bnfold.errors import BnfoldError
from bnfold.serve import ServeSettings, create_app, create_fastapi_app, load_and_warm
from bnfold.serve.schema import RequestParser

REPO = Path(__file__).resolve().parent.parent
NAMES = REPO / "data" / "names.txt"


@pytest.fixture(scope="module")
def server(live, serve_settings, front_app):
    """The app of the ``front`` under test (the Edge, or the bare FastAPI app)."""
    settings = serve_settings(max_count=2000)
    with live(settings, app=front_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def edge_server(live, serve_settings):
    """The app as ``bnfold serve`` runs it, for what only the Edge does (body-size limit,
    latency metric)."""
    with live(serve_settings(max_count=2000)) as url:
        yield url


@pytest.fixture(scope="module")
def reference(onnx_model):
    """The CLI's sampler on the same model: what the service must return."""
    from bnfold.runtime.infer import load_predictor
    from bnfold.sampling.sample import SampleOptions, load_labeler, sample_names

    predictor = load_predictor(onnx_model)
    labeler = load_labeler(predictor, NAMES)

    def names(**options):
        got = sample_names(predictor, SampleOptions(**options), labeler)
        return [{"name": s.name, "label": s.label, "logprob": s.logprob} for s in got]

    return names


def stops_accepting(url: str, within: float) -> bool:
    """Whether connections to ``url`` are refused within ``within`` seconds (polled). A
    connection the server closes without an answer (accepted in the instant it stopped
    listening) counts as refused too: it was not served."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
        except (httpx.ConnectError, httpx.RemoteProtocolError):
            return True
        time.sleep(0.01)
    return False


def strip(items):
    return [{k: d[k] for k in ("name", "label", "logprob")} for d in items]


# ------------------------------------------------------------------------------ endpoints


def test_post_and_get_match_the_cli_sampler(server, reference, onnx_model):
    from bnfold.io.files import file_sha256

    opts = {"count": 7, "seed": 11, "prefix": "ma", "temperature": 0.8, "top_k": 10}
    r = httpx.post(server + "/v1/names", json=opts)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 11 and body["count"] == 7
    assert body["model_sha256"] == file_sha256(onnx_model)
    assert strip(body["names"]) == reference(**opts)
    assert [d["index"] for d in body["names"]] == list(range(7))
    assert all(d["name"].startswith("ma") for d in body["names"])
    g = httpx.get(server + "/v1/names", params=opts)
    assert g.status_code == 200 and g.json()["names"] == body["names"]


def test_json_without_content_type_is_accepted(server):
    r = httpx.post(server + "/v1/names", content=b'{"count": 2, "seed": 5}')
    assert r.status_code == 200 and r.json()["count"] == 2


def test_json_sent_as_a_form_like_curl_d_is_accepted(server):
    form = {"content-type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
    r = httpx.post(server + "/v1/names", content=b'{"count": 2, "seed": 5}', headers=form)
    assert r.status_code == 200, r.text
    assert (
        r.json()["names"]
        == httpx.post(server + "/v1/names", json={"count": 2, "seed": 5}).json()["names"]
    )
    # a value the hot path refuses still reaches pydantic as JSON: a field error, not "not a dict"
    bad = httpx.post(server + "/v1/names", content=b'{"count": -1}', headers=form)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "count"]


def test_get_and_post_are_one_path(server):
    """The query string and the JSON body go through one schema: same answers, same errors
    (apart from where the error is)."""
    body = {"count": 9, "seed": 3, "prefix": "al", "temperature": 1, "top_p": 1, "min_length": 3}
    post = httpx.post(server + "/v1/names", json=body)
    get = httpx.get(server + "/v1/names", params=body)
    assert post.status_code == get.status_code == 200
    assert post.json() == get.json()
    assert post.json()["options"]["temperature"] == 1.0  # as the schema gives it: a float
    for bad in ({"count": 0}, {"top_k": 0}, {"colour": "red"}, {"prefix": "Zq1"}):
        p = httpx.post(server + "/v1/names", json=bad).json()["detail"]
        g = httpx.get(server + "/v1/names", params=bad).json()["detail"]
        assert [e["loc"][1:] for e in p] == [e["loc"][1:] for e in g] and p[0]["loc"][0] == "body"
        assert [e["msg"] for e in p] == [e["msg"] for e in g] and g[0]["loc"][0] == "query"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"count": "2"}, "count"),
        ({"count": True}, "count"),
        ({"count": 2.0}, "count"),
        ({"seed": True}, "seed"),
        ({"new_only": "yes"}, "new_only"),
        ({"new_only": 1}, "new_only"),
        ({"temperature": "0.5"}, "temperature"),
        ({"prefix": 7}, "prefix"),
    ],
)
def test_json_types_are_strict(server, body, field):
    """No lax conversions: a JSON value must already be of its field's type."""
    r = httpx.post(server + "/v1/names", json=body)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", field]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("count=1_0", "count"),
        ("count=%2B10", "count"),
        ("count=10.0", "count"),
        ("count=%2010", "count"),
        ("count=%D9%A1", "count"),  # an Arabic-Indic digit one
        ("new_only=yes", "new_only"),
        ("new_only=1", "new_only"),
        ("temperature=inf", "temperature"),
        ("temperature=1_0", "temperature"),
        ("temperature=nan", "temperature"),
    ],
)
def test_query_values_are_strict(server, query, field):
    """Query values follow a strict grammar: decimal digits, true/false, plain decimals."""
    r = httpx.get(server + "/v1/names?" + query)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["query", field]]


_VALID = {  # each field's valid values
    "count": st.integers(1, 2000),
    "seed": st.none() | st.integers(0, 2**64 - 1),
    "temperature": st.floats(0, 100) | st.integers(0, 100),
    "top_k": st.none() | st.integers(1, 10**6),
    "top_p": st.none() | st.floats(0, 1, exclude_min=True) | st.just(1),
    "prefix": st.text(max_size=4) | st.just("b" * 1000),
    "min_length": st.integers(0, 1000),
    "max_length": st.integers(1, 1000),
    "new_only": st.booleans(),
}


def _as_query(body: dict) -> bytes:
    def text(v):
        return "null" if v is None else json.dumps(v) if isinstance(v, bool) else str(v)

    return urllib.parse.urlencode({k: text(v) for k, v in body.items()}).encode()


@given(st.fixed_dictionaries({}, optional=_VALID))
@hypothesis_settings(max_examples=400, deadline=None, derandomize=True, database=None)
def test_a_valid_request_reads_the_same_as_body_and_as_query(body):
    """Whatever the body says, the query string's plain text form says the same thing."""
    parser = RequestParser(2000)
    from_body = parser.body(json.dumps(body).encode())
    from_query = parser.query(_as_query(body))
    assert isinstance(from_body, dict), from_body
    assert {k: (type(v), v) for k, v in from_query.items()} == {
        k: (type(v), v) for k, v in from_body.items()
    }


def test_tiny_temperature_is_served(server, reference):
    """0 < temperature < 0.001 used to be refused (the sampler gave NaN probabilities)."""
    for t in (1e-300, 1e-5):
        body = {"count": 4, "seed": 2, "temperature": t}
        r = httpx.post(server + "/v1/names", json=body)
        assert r.status_code == 200, r.text
        assert strip(r.json()["names"]) == reference(**body)
        greedy = reference(count=4, seed=2, temperature=0)
        assert [d["name"] for d in r.json()["names"]] == [d["name"] for d in greedy]


def test_random_seed_is_reported_and_replays(server):
    a = httpx.post(server + "/v1/names", json={"count": 5}).json()
    b = httpx.post(server + "/v1/names", json={"count": 5}).json()
    assert 0 <= a["seed"] < 2**53 and a["seed"] != b["seed"]
    again = httpx.post(server + "/v1/names", json={"count": 5, "seed": a["seed"]}).json()
    assert again["names"] == a["names"]


def test_new_only_matches_the_cli(server, reference):
    opts = {"count": 20, "seed": 3, "new_only": True}
    r = httpx.post(server + "/v1/names", json=opts)
    assert r.status_code == 200, r.text
    assert strip(r.json()["names"]) == reference(**opts)
    assert {d["label"] for d in r.json()["names"]} == {"new"}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"prefix": "Zq1"}, "prefix", ["outside the model's vocabulary", "'1'", "'Z'"]),
        ({"count": 2001}, "count", ["at most 2000", "max-count"]),
        ({"count": 0}, "count", ["greater than or equal to 1"]),
        ({"temperature": -0.5}, "temperature", ["greater than or equal to 0"]),
        ({"top_p": 0}, "top_p", ["greater than 0"]),
        ({"top_k": 0}, "top_k", ["greater than or equal to 1"]),
        ({"seed": -1}, "seed", ["greater than or equal to 0"]),
        ({"seed": 2**64}, "seed", ["less than or equal to"]),
        ({"min_length": 9, "max_length": 3}, "min_length", ["greater than max-length 3"]),
        ({"prefix": "abcd", "max_length": 3}, "prefix", ["more than max-length 3"]),
        ({"colour": "red"}, "colour", ["Extra inputs are not permitted"]),
        ({"new_only": "perhaps"}, "new_only", ["valid boolean"]),
    ],
)
def test_invalid_options_get_clear_422(server, body, field, words):
    r = httpx.post(server + "/v1/names", json=body)
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", field]
    for w in words:
        assert w in err["msg"], err["msg"]


def test_invalid_query_and_json(server):
    r = httpx.get(server + "/v1/names", params={"count": "many"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "count"]
    r = httpx.post(
        server + "/v1/names", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422


def test_body_size_limit(edge_server):
    server = edge_server
    big = {"prefix": "a" * 20_000}
    r = httpx.post(server + "/v1/names", json=big)
    assert r.status_code == 413 and "larger than 16384 bytes" in r.json()["detail"]

    def chunks():  # no content-length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 1000

    r = httpx.post(server + "/v1/names", content=chunks())
    assert r.status_code == 413


def test_model_info(server, onnx_model):
    import onnx

    info = httpx.get(server + "/v1/model").json()
    proto = onnx.load(str(onnx_model))
    weights = sum(int(__import__("numpy").prod(t.dims)) for t in proto.graph.initializer)
    assert info["parameters"] == weights > 0
    assert info["folded"] is True and info["block_size"] == 3
    assert info["vocabulary"] == list("abcdefghijklmnopqrstuvwxyz") and info["vocab_size"] == 27
    assert len(info["sha256"]) == 64
    v = info["verification"]["torch_same"]
    assert v["passed"] is True and v["exhaustive"] is True and v["max_abs_logit_error"] < 1e-5
    assert info["words"]["verified"] is True
    assert info["service"]["batching"] == "step" and info["service"]["ort_threads"] == 1


def test_page_and_probes(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="generate"' in page.text and "/v1/names" in page.text
    assert httpx.get(server + "/livez").json() == {"status": "alive"}
    assert httpx.get(server + "/readyz").json()["status"] == "ready"


def test_metrics(server):
    httpx.post(server + "/v1/names", json={"count": 3, "seed": 1})
    httpx.post(server + "/v1/names", json={"count": 0})
    text = httpx.get(server + "/metrics").text
    assert 'bnfold_rejections_total{reason="invalid"}' in text
    for name in ("bnfold_names_generated_total", "bnfold_queue_depth", "bnfold_batch_rows_bucket"):
        assert name in text
    names = float(
        next(ln for ln in text.splitlines() if ln.startswith("bnfold_names_gen")).split()[1]
    )
    assert names >= 3


def test_latency_is_counted_by_endpoint_and_status(edge_server):
    """The Edge times every answer, ``/v1/names`` (its shortcut) as much as FastAPI's."""
    httpx.post(edge_server + "/v1/names", json={"count": 3, "seed": 1})
    httpx.get(edge_server + "/v1/names", params={"count": 0})
    httpx.get(edge_server + "/livez")
    text = httpx.get(edge_server + "/metrics").text
    assert 'bnfold_request_seconds_bucket{endpoint="/v1/names",le="0.05",status="200"}' in text
    assert 'bnfold_request_seconds_count{endpoint="/v1/names",status="422"}' in text
    assert 'bnfold_request_seconds_count{endpoint="/livez",status="200"}' in text


_FORM = "application/x-www-form-urlencoded"  # what `curl -d` sends


def test_the_edge_and_the_fastapi_routes_answer_alike(live, serve_settings):
    """The same requests to ``bnfold serve``'s app (the Edge's shortcut) and to the bare
    FastAPI app (its routes) get the same status, headers and body, byte for byte."""
    settings = serve_settings(max_count=50)
    requests = [
        ("POST", "/v1/names", {"json": {"count": 4, "seed": 9, "prefix": "ja"}}),
        ("GET", "/v1/names", {"params": {"count": 4, "seed": 9, "top_p": 0.5}}),
        ("POST", "/v1/names", {"content": b'{"seed": 3}', "headers": {"content-type": _FORM}}),
        ("POST", "/v1/names", {"content": b"{not json"}),
        ("POST", "/v1/names", {"json": {"count": "2", "colour": "red"}}),
        ("GET", "/v1/names", {"params": {"count": 51, "new_only": "yes"}}),
        ("POST", "/v1/names", {"json": {"prefix": "Zq1", "seed": 1}}),
        ("GET", "/v1/names", {"params": {"min_length": 9, "max_length": 3, "seed": 1}}),
        ("PUT", "/v1/names", {"json": {"count": 1}}),
    ]
    answers = []
    for make in (create_app, create_fastapi_app):
        with live(settings, app=make(settings)) as url, httpx.Client(base_url=url) as c:
            got = []
            for method, path, kw in requests:
                r = c.request(method, path, **kw)
                headers = {k: v for k, v in r.headers.items() if k not in ("date", "server")}
                got.append((r.status_code, headers, r.content))
            answers.append(got)
    edge, fastapi = answers
    assert [a[0] for a in edge] == [200, 200, 200, 422, 422, 422, 422, 422, 405]
    assert '"seed":9' in edge[0][2].decode()
    assert edge == fastapi


# -------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_same_names_under_concurrent_load(server, reference):
    """64 requests at once, varied options and repeated seeds: every answer equals the one it
    gets alone, and the first 16 (every prefix, temperature, top_p and seed among them)
    the CLI sampler's, which builds its whole-domain table per call (all 64: 13 s); the
    metrics show requests really shared steps."""

    def requests():
        for i in range(64):
            yield {
                "count": 1 + (i * 7) % 40,
                "seed": i % 9,
                "prefix": ["", "a", "jo", "k"][i % 4],
                "temperature": [1.0, 0.7, 1.3][i % 3],
                **({"top_p": 0.9} if i % 5 == 0 else {}),
            }

    before = _batch_max(httpx.get(server + "/metrics").text)

    async def fire():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=30) as c:
            rs = await asyncio.gather(*(c.post("/v1/names", json=b) for b in requests()))
        return [r.json() for r in rs]

    crowd = asyncio.run(fire())
    after = _batch_max(httpx.get(server + "/metrics").text)
    assert after[1] > before[1], "no forward step ran more than one request at once"
    for i, (body, got) in enumerate(zip(requests(), crowd, strict=True)):
        alone = httpx.post(server + "/v1/names", json=body).json()
        assert got["names"] == alone["names"]
        if i < 16:
            assert strip(got["names"]) == reference(**body)


def _batch_max(text: str) -> tuple[float, float]:
    """(steps with one request, steps with more) from the batch-requests histogram."""
    buckets = {}
    for ln in text.splitlines():
        if ln.startswith("bnfold_batch_requests_bucket{"):
            le = ln.split('le="')[1].split('"')[0]
            buckets[le] = float(ln.split()[-1])
    return buckets["1.0"], buckets["+Inf"] - buckets["1.0"]


class Gate:
    """Wrap a loaded model so that forward steps block while the gate is closed."""

    def __init__(self):
        self.open = threading.Event()
        self.open.set()

    def loader(self, settings):
        model = load_and_warm(settings)
        inner = model.predictor.logits
        gate = self.open

        def logits(x):
            gate.wait(30)
            return inner(x)

        model.predictor.logits = logits
        return model


def test_queue_full_gets_429_at_once_and_deadline_504(live, serve_settings, front_app):
    gate = Gate()  # the network engine: every step is a forward pass the gate can hold
    settings = serve_settings(queue_size=2, deadline=1.5, engine="network")
    with live(settings, app=front_app(settings, loader=gate.loader)) as url:
        gate.open.clear()  # the batcher stalls: admitted requests stay in flight

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=10) as c:
                slow = [asyncio.create_task(c.post("/v1/names", json={"count": 3})) for _ in "ab"]
                while True:  # both admitted?
                    m = (await c.get("/metrics")).text
                    if "bnfold_inflight_requests 2.0" in m:
                        break
                    await asyncio.sleep(0.01)
                r = await c.post("/v1/names", json={"count": 1})
                waiting = [not t.done() for t in slow]  # the gate is still shut
                return r, waiting, await asyncio.gather(*slow)

        r, waiting, slow = asyncio.run(scenario())
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        # refused at once: answered while both admitted requests still wait at the gate
        assert "queue full" in r.json()["detail"] and waiting == [True, True]
        assert [s.status_code for s in slow] == [504, 504]  # the gate stayed shut past 1.5 s
        assert "deadline of 1.5 s exceeded" in slow[0].json()["detail"]
        gate.open.set()
        ok = httpx.post(url + "/v1/names", json={"count": 2, "seed": 1})
        assert ok.status_code == 200  # the queue emptied: served again
        text = httpx.get(url + "/metrics").text
        assert 'bnfold_rejections_total{reason="queue_full"} 1.0' in text
        assert 'bnfold_rejections_total{reason="deadline"} 2.0' in text


def test_readiness_during_startup_and_drain(live, serve_settings, front_app):
    loaded = threading.Event()

    def slow_loader(settings):
        loaded.wait(30)
        return load_and_warm(settings)

    settings = serve_settings()
    app = front_app(settings, loader=slow_loader)
    with live(settings, app=app, ready=False) as url, httpx.Client(base_url=url) as c:
        assert c.get("/livez").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["detail"] == "loading"
        r = c.post("/v1/names", json={"count": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert c.get("/v1/model").status_code == 503
        loaded.set()
        t0 = time.monotonic()
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() - t0 < 30
            time.sleep(0.02)
        assert c.post("/v1/names", json={"count": 1}).status_code == 200
        app.state.service.begin_drain()
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["detail"] == "draining"
        assert c.post("/v1/names", json={"count": 1}).status_code == 503


def test_load_failure_is_reported(tmp_path, live):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    settings = ServeSettings(model=str(bad), words=str(NAMES))
    with live(settings, ready=False) as url, httpx.Client(base_url=url) as c:
        t0 = time.monotonic()
        while c.get("/livez").status_code == 200:
            assert time.monotonic() - t0 < 30
            time.sleep(0.02)
        r = c.get("/readyz")
        assert r.status_code == 503 and "not a readable ONNX model" in r.json()["detail"]


def test_batching_off_gives_the_same_names(live, serve_settings, reference, front_app):
    settings = serve_settings(batching=False)
    with live(settings, app=front_app(settings)) as url:
        opts = {"count": 12, "seed": 4, "prefix": "e"}
        r = httpx.post(url + "/v1/names", json=opts)
        assert r.status_code == 200 and strip(r.json()["names"]) == reference(**opts)
        assert httpx.get(url + "/v1/model").json()["service"]["batching"] == "off"


# ------------------------------------------------------------------- the real command


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits(onnx_model, spawn_serve, wait_ready):
    proc, url = spawn_serve(
        onnx_model, "--max-count", "100000", "--deadline", "60", "--engine", "network"
    )
    try:
        wait_ready(url)
        results = {}

        def big():
            results["r"] = httpx.post(
                url + "/v1/names", json={"count": 100000, "seed": 2}, timeout=60
            )

        t = threading.Thread(target=big)
        t.start()
        t0 = time.monotonic()
        while "bnfold_inflight_requests 1.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() - t0 < 10
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert stops_accepting(url + "/livez", within=10)
        t.join(60)
        r = results["r"]
        assert r.status_code == 200 and r.json()["count"] == 100000  # finished, not cut
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_workers_each_load_their_own_session(onnx_model, spawn_serve, wait_ready):
    proc, url = spawn_serve(onnx_model, "--workers", "2")
    try:
        wait_ready(url)
        pids = set()
        t0 = time.monotonic()
        while len(pids) < 2 and time.monotonic() - t0 < 20:
            with contextlib.suppress(httpx.HTTPError):  # a fresh connection each time
                r = httpx.get(url + "/readyz", headers={"connection": "close"}, timeout=5)
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
        assert len(pids) == 2 and proc.pid not in pids
        a = httpx.post(url + "/v1/names", json={"count": 9, "seed": 8}).json()
        b = httpx.post(url + "/v1/names", json={"count": 9, "seed": 8}).json()
        assert a["names"] == b["names"]
    finally:
        stop_server(proc)


def test_serve_refuses_a_missing_model(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "serve", str(tmp_path / "nope.onnx")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "no such ONNX file" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------- fuzzing


def test_openapi_documents_names_from_the_routes(server):
    """``/v1/names`` in the OpenAPI schema comes from its FastAPI routes: every request
    field as a query parameter (GET) and in the JSON body (POST), and every answer."""
    doc = httpx.get(server + "/openapi.json").json()
    fields = list(RequestParser(2000).model.model_fields)
    get, post = doc["paths"]["/v1/names"]["get"], doc["paths"]["/v1/names"]["post"]
    assert [p["name"] for p in get["parameters"]] == fields
    assert all(p["in"] == "query" and not p["required"] for p in get["parameters"])
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert list(body["properties"]) == fields and body["additionalProperties"] is False
    assert body["properties"]["count"]["maximum"] == 2000  # this server's --max-count
    for op in (get, post):
        assert sorted(op["responses"]) == ["200", "408", "413", "422", "429", "503", "504"]
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": "#/components/schemas/NamesResponse"}
    assert {"NamesResponse", "ErrorResponse", "ValidationErrorResponse"} <= set(
        doc["components"]["schemas"]
    )


@pytest.mark.slow
def test_openapi_fuzzing_no_server_errors(live, serve_settings, front, front_app):
    """schemathesis generates requests (valid and invalid) for every operation of the app's
    own OpenAPI schema; no answer may be a 5xx, and answers must match the schema."""
    import schemathesis  # a dev dependency: a missing one fails, never skips
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]

    def server_errors(url):  # 5xx counts so far (/readyz answers 503 while loading)
        text = httpx.get(url + "/metrics").text
        return [ln for ln in text.splitlines() if "_count{" in ln and 'status="5' in ln]

    app_settings = serve_settings(max_count=30)
    with live(app_settings, app=front_app(app_settings)) as url:
        before = server_errors(url)
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        failures = []
        ops = 0
        for result in schema.get_all_operations():
            op = result.ok()
            ops += 1

            @settings(
                max_examples=40,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(case=op.as_strategy())
            def run(case):
                case.call_and_validate(checks=checks)

            try:
                run()
            except Exception as e:  # report every failing operation, not just the first
                failures.append(f"{op.label}: {e}")
        assert ops >= 7
        assert not failures, "\n\n".join(failures[:3])
        if front == "edge":  # the Edge's latency metric saw every answer: no 5xx either
            counts = [ln for ln in httpx.get(url + "/metrics").text.splitlines() if "_count{" in ln]
            assert any('endpoint="/v1/names"' in ln for ln in counts)
            assert server_errors(url) == before


def test_settings_from_env_round_trip(onnx_model, serve_settings, monkeypatch):
    s = serve_settings(queue_size=7, batching=False)
    monkeypatch.setenv("BNFOLD_SERVE_SETTINGS", s.to_env())
    assert ServeSettings.from_env() == s
    with pytest.raises(BnfoldError, match="queue-size must be an integer >= 1"):
        serve_settings(queue_size=0).check()
    env = json.loads(s.to_env())
    assert env["model"] == str(onnx_model) and os.path.isabs(env["words"])
