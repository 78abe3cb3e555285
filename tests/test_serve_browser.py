"""The web page at ``/`` in a real headless Chromium (Debian's package, driven by Playwright).

Skipped, with the reason, only when Chromium or Playwright is absent outside CI; under CI
(``CI=true``, where ``.ci/run`` installs both) their absence is a failure.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

pytestmark = pytest.mark.slow  # a real browser against a live server

CHROMIUM = os.environ.get("BNFOLD_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() == "true"


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
