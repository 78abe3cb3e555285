"""What ``bnfold serve`` shows besides ``/v1/names``: the API docs from local files, the
page's embedded request schema, ``/metrics``' endpoint labels and the access log
(``tests/test_serve_browser.py`` renders the page and the docs in Chromium)."""

from __future__ import annotations

import html.parser
import json
import re

import httpx
import pytest

from bnfold.errors import BnfoldError
from bnfold.serve.metrics import DOCS_ASSETS, endpoint_label
from bnfold.serve.server import logging_config
from bnfold.serve.settings import ServeSettings


class _Refs(html.parser.HTMLParser):
    """Every ``src`` and ``href`` of a page, and the text of its ``<script>`` elements."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.scripts: dict[str, str] = {}
        self._script: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [a[k] for k in ("src", "href") if a.get(k)]
        if tag == "script":
            self._script = a.get("id") or ""

    def handle_data(self, data):
        if self._script is not None:
            self.scripts[self._script] = self.scripts.get(self._script, "") + data

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None


def _refs(page: str) -> _Refs:
    parser = _Refs()
    parser.feed(page)
    return parser


def test_docs_load_only_local_files(live, serve_settings):
    """The Swagger UI page names no other host: every script, style and icon is a path on
    this server, and each one is served. (There is no /redoc: ReDoc fetches its logo
    from a CDN.)"""
    with live(serve_settings()) as url:
        assert httpx.get(url + "/redoc").status_code == 404
        page = httpx.get(url + "/docs")
        assert page.status_code == 200
        refs = _refs(page.text).refs
        assert refs, "the docs page loads no asset at all"
        for ref in refs:
            assert ref.startswith(DOCS_ASSETS + "/"), ref
            asset = httpx.get(url + ref)
            assert asset.status_code == 200 and len(asset.content) > 1000, ref
        assert "cdn" not in page.text.lower()


def test_metrics_name_the_docs(live, serve_settings):
    """/docs, /openapi.json and the docs' files have labels of their own; any
    other path is "other" (the label set stays bounded whatever a client asks for)."""
    with live(serve_settings()) as url:
        for path in ("/docs", "/openapi.json", DOCS_ASSETS + "/swagger-ui.css"):
            assert httpx.get(url + path).status_code == 200
        for path in ("/nope", DOCS_ASSETS + "/missing.js", DOCS_ASSETS + "x/swagger-ui.css"):
            assert httpx.get(url + path).status_code == 404
        counts = {
            m.group(1, 2): float(m.group(3))
            for m in re.finditer(
                r'bnfold_request_seconds_count\{endpoint="([^"]+)",status="(\d+)"\} (\S+)',
                httpx.get(url + "/metrics").text,
            )
        }
    for endpoint in ("/docs", "/openapi.json"):
        assert counts[(endpoint, "200")] == 1
    assert counts[(DOCS_ASSETS, "200")] == 1
    assert counts[(DOCS_ASSETS, "404")] == 1
    assert counts[("other", "404")] == 2


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/docs", "/docs"),
        ("/docs/", "other"),
        ("/openapi.json", "/openapi.json"),
        (DOCS_ASSETS, "other"),  # the folder itself is no file
        (DOCS_ASSETS + "/a/b.js", DOCS_ASSETS),
        (DOCS_ASSETS + "-evil/x", "other"),
        ("/v1/names/x", "other"),
    ],
)
def test_endpoint_label(path, label):
    assert endpoint_label(path) == label


def test_the_page_carries_the_api_request_schema(live, serve_settings):
    """The page's limits are the API's: its embedded schema is the one /openapi.json
    documents for POST /v1/names, with this server's max-count."""
    with live(serve_settings(max_count=321)) as url:
        page = httpx.get(url + "/").text
        openapi = httpx.get(url + "/openapi.json").json()
    embedded = json.loads(_refs(page).scripts["request-schema"])
    body = openapi["paths"]["/v1/names"]["post"]["requestBody"]["content"]["application/json"]
    for prop in embedded["properties"].values():  # FastAPI's OpenAPI leaves null defaults out
        if prop.get("default", 0) is None:
            del prop["default"]
    assert embedded == body["schema"]
    assert embedded["properties"]["count"]["maximum"] == 321


def test_access_log_setting_is_checked():
    ServeSettings(model="m", words="w", access_log=True).check()
    with pytest.raises(BnfoldError, match="access-log must be true or false"):
        ServeSettings(model="m", words="w", access_log="yes").check()
    env = ServeSettings(model="m", words="w", access_log=True).to_env()
    assert ServeSettings.from_env({"BNFOLD_SERVE_SETTINGS": env}).access_log is True


@pytest.mark.parametrize("level", ["warning", "error", "debug"])
def test_the_access_log_level_does_not_follow_log_level(level):
    """--access-log logs at INFO even with --log-level warning; without it, the access
    logger has the server's level (uvicorn drops its handler anyway)."""
    import logging

    on = logging_config(level, access_log=True)["loggers"]
    off = logging_config(level, access_log=False)["loggers"]
    assert on["uvicorn.access"]["level"] == "INFO"
    assert on["uvicorn.error"]["level"] == logging.getLevelName(level.upper())
    assert off["uvicorn.access"]["level"] == off["uvicorn.error"]["level"]


def test_logging_config_refuses_an_unknown_level():
    with pytest.raises(BnfoldError, match="log level must be one of"):
        logging_config("loud", access_log=False)


def _served_lines(spawn_serve, model, *extra: str) -> tuple[list[str], str]:
    """Run ``bnfold serve MODEL --log-level warning EXTRA``, send three requests, stop it
    (SIGTERM); its stdout lines and stderr."""
    import signal
    import time

    proc, url = spawn_serve(model, *extra)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "serve did not become ready"
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert httpx.get(url + "/v1/names?count=2&seed=1").status_code == 200
        assert httpx.post(url + "/v1/names", json={"count": 0}).status_code == 422
        assert httpx.get(url + "/docs").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    return out.decode().splitlines(), err.decode()


def test_access_log_flag(spawn_serve, onnx_model):
    """With --access-log (and --log-level warning), one stdout line per request, naming
    the request and its status; without it, none."""
    lines, _ = _served_lines(spawn_serve, onnx_model, "--access-log")
    requests = [ln for ln in lines if '"GET /readyz' not in ln]  # the readiness polls
    assert len(requests) == 3, lines
    assert '"GET /v1/names?count=2&seed=1 HTTP/1.1" 200' in requests[0]
    assert '"POST /v1/names HTTP/1.1" 422' in requests[1]
    assert '"GET /docs HTTP/1.1" 200' in requests[2]
    assert all("127.0.0.1:" in ln for ln in requests)

    lines, _ = _served_lines(spawn_serve, onnx_model)
    assert lines == []
