"""The web page at ``/`` and the API docs at ``/docs`` in a real headless Chromium (Debian's
package, driven by Playwright).

Skipped, with the reason, only when Chromium or Playwright is absent outside CI; under CI
(``CI=true``, where ``.ci/run`` installs both) their absence is a failure. Screenshots are
written next to the session's ONNX model (a pytest tmp dir) as artefacts.
"""

from __future__ import annotations

import json
import os
import shutil
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.slow  # a real browser against a live server

CHROMIUM = os.environ.get("BNFOLD_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() == "true"
PHONE = {"width": 390, "height": 844}
SEED_ABOVE_2_53 = "9007199254740993"  # 2**53 + 1: a JS number would round it to ...992


def _browser_missing() -> str | None:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if IN_CI:
            pytest.fail(f"browser test cannot run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=path,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-extensions",
                "--no-first-run",
            ],
        )
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(live, serve_settings):
    """One live server for the page tests that do not stop it (max-count 500, so the
    page's limits are this server's, not the default's)."""
    with live(serve_settings(max_count=500)) as url:
        yield url


@pytest.fixture
def page(browser, server):
    """A page on the live server, offline but for it (every other request is aborted),
    with the model's vocabulary loaded; fails the test on any JavaScript error."""
    context = browser.new_context()
    errors: list[str] = []
    _offline_but(context, server, [])
    p = context.new_page()
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.goto(server + "/")
    p.wait_for_selector("#prefix-hint[data-vocabulary]")
    yield p
    context.close()
    assert errors == []


def _offline_but(context, url: str, blocked: list[str]) -> None:
    """Abort every request of ``context`` that is not for ``url``'s host, recording it."""
    host = urlsplit(url).netloc

    def route(r):
        if urlsplit(r.request.url).netloc == host:
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort("internetdisconnected")

    context.route("**/*", route)


def _shot(page, onnx_model, name: str) -> None:
    page.screenshot(path=str(onnx_model.parent / f"{name}.png"), full_page=True)


def _names(page) -> list[str]:
    return page.locator("tr.name-row td.name").all_inner_texts()


def _error(page) -> str:
    return page.inner_text("#error")


def _generate(page) -> None:
    """Click Generate and wait until that request's answer is on screen."""
    with page.expect_response("**/v1/names"):
        page.click("#generate")
    page.wait_for_function("!document.getElementById('generate').disabled")


def _sent_bodies(page) -> list[str]:
    bodies: list[str] = []
    page.on("request", lambda r: bodies.append(r.post_data) if "/v1/names" in r.url else None)
    return bodies


def test_page_generates_names_with_labels(browser, onnx_model, live, serve_settings):
    with live(serve_settings()) as url:
        page = browser.new_page()
        try:
            page.goto(url + "/")
            assert page.title() == "bnfold names"
            page.fill("#count", "6")
            page.fill("#prefix", "an")
            page.fill("#temperature", "0.8")
            page.fill("#seed", "123")
            page.click("#generate")
            page.wait_for_selector("tr.name-row")
            names = page.locator("tr.name-row td.name").all_inner_texts()
            labels = page.locator("tr.name-row .label").all_inner_texts()
            assert len(names) == 6 and all(n.startswith("an") for n in names)
            assert set(labels) <= {"train", "dev", "test", "new"}
            assert "seed 123" in page.inner_text("#meta")

            api = httpx.post(
                url + "/v1/names",
                json={"count": 6, "prefix": "an", "temperature": 0.8, "seed": 123},
            ).json()
            assert names == [d["name"] for d in api["names"]]
            assert labels == [d["label"] for d in api["names"]]

            # no seed: the server picks one and the page shows it
            page.fill("#seed", "")
            page.fill("#count", "3")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('tr.name-row').length === 3")
            assert int(page.get_attribute("#meta", "data-seed")) >= 0

            # an error is shown, not swallowed
            page.fill("#prefix", "A9")
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            err = page.inner_text("#error")
            assert "422" in err and "vocabulary" in err
            page.screenshot(path=str(onnx_model.parent / "page.png"))
        finally:
            page.close()


def test_every_option_reaches_the_api_unchanged(page, server, onnx_model):
    """All nine options from the page: the body it sends holds each one as typed (the seed
    above 2**53 digit for digit, temperature 0.33 not refused by a step), and the names
    it shows are the ones the API gives for that body."""
    bodies = _sent_bodies(page)
    page.fill("#count", "7")
    page.fill("#prefix", "a")
    page.fill("#temperature", "0.33")
    page.fill("#seed", SEED_ABOVE_2_53)
    page.fill("#top_k", "5")
    page.fill("#top_p", "0.9")
    page.fill("#min_length", "3")
    page.fill("#max_length", "8")
    page.check("#new_only")
    _generate(page)
    _shot(page, onnx_model, "page-every-option")

    sent = json.loads(bodies[-1])  # Python ints are exact: the seed as the page wrote it
    assert sent == {
        "count": 7,
        "prefix": "a",
        "temperature": 0.33,
        "seed": int(SEED_ABOVE_2_53),
        "top_k": 5,
        "top_p": 0.9,
        "min_length": 3,
        "max_length": 8,
        "new_only": True,
    }
    api = httpx.post(server + "/v1/names", json=sent).json()
    assert api["seed"] == int(SEED_ABOVE_2_53)
    assert _names(page) == [d["name"] for d in api["names"]]
    assert page.locator("tr.name-row .label").all_inner_texts() == ["new"] * 7
    assert page.get_attribute("#meta", "data-seed") == SEED_ABOVE_2_53
    assert f"seed {SEED_ABOVE_2_53}" in page.inner_text("#meta")
    assert page.is_hidden("#error")


def test_empty_optional_fields_leave_the_api_defaults(page, server):
    """Cleared number fields and no seed are left out of the body: the API's defaults
    apply, and the seed the server drew is shown (the API gives the same names for it)."""
    bodies = _sent_bodies(page)
    for field in ("#count", "#temperature", "#top_k", "#top_p", "#min_length", "#max_length"):
        page.fill(field, "")
    _generate(page)
    sent = json.loads(bodies[-1])
    assert sent == {"prefix": "", "new_only": False}
    seed = int(page.get_attribute("#meta", "data-seed"))
    api = httpx.post(server + "/v1/names", json={**sent, "seed": seed}).json()
    assert _names(page) == [d["name"] for d in api["names"]]


def test_the_page_shows_the_api_limits_and_prefix_characters(page, server):
    """Each field's range comes from the API's own request schema (this server's
    max-count, 500), and the prefix hint lists the model's vocabulary from /v1/model."""
    schema = httpx.get(server + "/openapi.json").json()
    post = schema["paths"]["/v1/names"]["post"]["requestBody"]["content"]["application/json"]
    props = post["schema"]["properties"]
    assert props["count"]["maximum"] == 500
    assert page.get_attribute("#count", "max") == "500"
    assert page.get_attribute("#count", "min") == str(props["count"]["minimum"])
    assert "1 to 500" in page.inner_text("#count-hint")
    temperature = props["temperature"]
    assert page.get_attribute("#temperature", "max") == str(int(temperature["maximum"]))
    assert page.get_attribute("#temperature", "step") == "any"
    assert page.get_attribute("#top_p", "step") == "any"
    assert page.get_attribute("#max_length", "max") == str(props["max_length"]["maximum"])
    assert page.input_value("#count") == str(props["count"]["default"])
    assert "18446744073709551615" in page.inner_text("#seed-hint")  # 2**64 - 1, exact

    vocabulary = httpx.get(server + "/v1/model").json()["vocabulary"]
    assert page.get_attribute("#prefix-hint", "data-vocabulary") == "".join(vocabulary)
    hint = page.inner_text("#prefix-hint")
    assert hint.startswith("allowed:") and vocabulary[0] in hint and vocabulary[-1] in hint


def test_an_api_error_replaces_the_results(page, onnx_model):
    """A 422 removes the names on screen and shows the API's message by field; a seed is
    text checked by the API (a non-number, 2**64), never by the page."""
    page.fill("#seed", "5")
    _generate(page)
    assert len(_names(page)) == 10

    page.fill("#prefix", "A9")
    _generate(page)
    err = _error(page)
    assert err.startswith("Error 422") and "Prefix:" in err and "vocabulary" in err
    assert _names(page) == [] and page.is_hidden("#results")
    assert page.inner_text("#meta") == ""
    assert page.get_attribute("#prefix", "aria-invalid") == "true"
    _shot(page, onnx_model, "page-error-422")

    page.fill("#prefix", "")
    for seed, words in [("abc", "valid integer"), ("18446744073709551616", "less than or equal")]:
        page.fill("#seed", seed)
        _generate(page)
        err = _error(page)
        assert err.startswith("Error 422") and "Seed:" in err and words in err
        assert "Prefix" not in err  # the previous error is gone, not appended to
        assert page.get_attribute("#seed", "aria-invalid") == "true"
        assert page.get_attribute("#prefix", "aria-invalid") is None

    page.fill("#seed", "18446744073709551615")  # 2**64 - 1: the API's largest seed
    _generate(page)
    assert page.is_hidden("#error") and len(_names(page)) == 10
    assert page.get_attribute("#meta", "data-seed") == "18446744073709551615"


def test_client_validation_sends_nothing_and_clears_results(page, onnx_model):
    """Out-of-range or non-integer numbers are refused by the page, in the same error box
    (no browser bubble), replacing both the results and an earlier server error."""
    bodies = _sent_bodies(page)
    _generate(page)
    assert len(_names(page)) == 10
    page.fill("#prefix", "A9")
    _generate(page)  # a server error first: the client error must replace it
    sent = len(bodies)

    page.fill("#prefix", "")
    page.fill("#temperature", "150")
    page.fill("#top_p", "0")
    page.fill("#count", "2.5")
    page.click("#generate")
    page.wait_for_selector("#error[data-kind=client]")
    err = _error(page)
    assert err.startswith("Not sent")
    assert "Temperature:" in err and "Top-p:" in err and "Count:" in err
    assert "Prefix" not in err and "422" not in err
    for field in ("#temperature", "#top_p", "#count"):
        assert page.get_attribute(field, "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "count"
    assert len(bodies) == sent  # nothing was sent
    _shot(page, onnx_model, "page-error-client")

    # fixed: one request, the error gone, names back
    page.fill("#temperature", "1")
    page.fill("#top_p", "1")
    page.fill("#count", "3")
    _generate(page)
    assert page.is_hidden("#error") and len(_names(page)) == 3
    assert len(bodies) == sent + 1


def test_a_stopped_server_gives_a_readable_message(browser, live, serve_settings, onnx_model):
    """The server goes away after the page loaded: the error says so in words and the old
    names are removed."""
    context = browser.new_context()
    try:
        p = context.new_page()
        with live(serve_settings()) as url:
            p.goto(url + "/")
            _generate(p)
            assert len(_names(p)) == 10
        p.click("#generate")  # the server is stopped now
        p.wait_for_selector("#error[data-kind=network]")
        err = _error(p)
        assert err.startswith(f"Cannot reach the server at {url}")
        assert "TypeError" not in err and "Failed to fetch" not in err
        assert _names(p) == [] and p.is_hidden("#results")
        assert p.is_enabled("#generate")
        _shot(p, onnx_model, "page-error-network")
    finally:
        context.close()


def test_phone_width(browser, server, onnx_model):
    """At 390 px every field and the names fit the screen: no sideways scrolling."""
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        p = context.new_page()
        p.goto(server + "/")
        p.fill("#prefix", "mar")
        p.fill("#seed", SEED_ABOVE_2_53)
        with p.expect_response("**/v1/names"):
            p.tap("#generate")
        p.wait_for_selector("tr.name-row")
        assert p.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        for selector in ("input", "#generate", "#results", "#meta"):
            for box in (el.bounding_box() for el in p.locator(selector).all()):
                assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
        _shot(p, onnx_model, "page-phone")

        p.fill("#prefix", "A9")
        with p.expect_response("**/v1/names"):
            p.tap("#generate")
        p.wait_for_selector("#error[data-kind=api]")
        assert p.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        _shot(p, onnx_model, "page-phone-error")
    finally:
        context.close()


def test_docs_render_offline(browser, server, onnx_model):
    """``/docs`` renders Swagger UI with every request but the server's aborted (no
    internet), and asks for nothing elsewhere; ``/metrics`` counts the docs by name."""
    others_before = _other_requests(server)
    context = browser.new_context()
    blocked: list[str] = []
    _offline_but(context, server, blocked)
    try:
        p = context.new_page()
        p.goto(server + "/docs")
        p.wait_for_selector(".opblock-summary-path")
        paths = p.locator(".opblock-summary-path").evaluate_all(
            "els => els.map((e) => e.dataset.path)"
        )
        assert {"/v1/names", "/v1/model", "/livez", "/readyz", "/metrics"} <= set(paths)
        summaries = p.locator(".opblock-summary-description").all_inner_texts()
        assert "Sample names (JSON body)" in summaries
        _shot(p, onnx_model, "docs-offline")
        assert blocked == []
    finally:
        context.close()

    metrics = httpx.get(server + "/metrics").text
    for endpoint in ("/docs", "/openapi.json", "/static-offline-docs"):
        assert f'bnfold_request_seconds_count{{endpoint="{endpoint}",status="200"}}' in metrics
    assert _other_requests(server) == others_before


def _other_requests(url: str) -> float:
    """Requests /metrics counts under endpoint "other", over every status."""
    text = httpx.get(url + "/metrics").text
    prefix = 'bnfold_request_seconds_count{endpoint="other",'
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))
