"""report.html in a real browser: headless Chromium (the Debian package) driven by Playwright.

No browser is ever downloaded: Chromium comes from ``apt-get install -y chromium
chromium-driver`` and these tests FAIL (not skip) when it is missing, so CI cannot pass
without them. Every request the page makes is routed: anything but ``file:`` / ``data:``
fails the test. A screenshot is kept under ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_report import CONFIGS, XSS, make_study

from flowscope.reporter.page import report

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
LAPTOP = {"width": 1366, "height": 768}


def _playwright() -> Any:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}; the report's browser tests need it. "
            "Install it with: apt-get update && apt-get install -y chromium chromium-driver "
            "(never `playwright install`: no browser is downloaded).",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "Python package playwright is missing: pip install -e '.[dev]' "
            "(it drives the system Chromium; do not run `playwright install`).",
            pytrace=False,
        )
    return sync_playwright


@contextmanager
def chromium() -> Iterator[Callable[[Path, str], dict[str, Any]]]:
    """Headless Chromium; yields ``open(path, shot)``: the page opened, what it logged as
    errors, the requests it made and those that would have left the machine (aborted), with
    a screenshot ``shot`` under tests/artifacts. One per module: Playwright's sync API runs
    one at a time."""
    sync_playwright = _playwright()
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=ARGS, viewport=LAPTOP
        )

        def open_page(path: Path, shot: str) -> dict[str, Any]:
            seen: dict[str, list[str]] = {"errors": [], "outside": [], "requests": []}

            def route(r: Any) -> None:
                url = r.request.url
                if url.startswith(("file:", "data:")):
                    r.continue_()
                else:
                    seen["outside"].append(url)
                    r.abort()

            page = context.new_page()
            page.route("**/*", route)
            page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(path.resolve().as_uri(), wait_until="load")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / shot))
            return {"page": page, "path": path, **seen}

        try:
            yield open_page
        finally:
            context.close()


@pytest.fixture(scope="module")
def opened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The study report opened in Chromium, with what the page logged and requested."""
    path = report(make_study(tmp_path_factory.mktemp("browser") / "run", xss=True))
    with chromium() as open_page:
        yield open_page(path, "report.png")


def test_no_console_errors(opened):
    assert opened["errors"] == []


def test_no_request_leaves_the_page(opened):
    assert opened["outside"] == []
    schemes = {url.split(":", 1)[0] for url in opened["requests"]}
    assert schemes <= {"file", "data"}, schemes


def test_every_image_decodes(opened):
    sizes = opened["page"].evaluate(
        "Promise.all(Array.from(document.images).map(i => i.decode().then(() => i.naturalWidth)))"
    )
    assert len(sizes) == 1 + 5 * len(CONFIGS)
    assert all(w > 0 for w in sizes), sizes


def test_summary_has_one_row_per_config(opened):
    page = opened["page"]
    assert page.locator("table.summary tbody tr").count() == len(CONFIGS) + 1
    assert page.locator("section.config").count() == len(CONFIGS) + 1


def test_hostile_names_stay_text(opened):
    page = opened["page"]
    assert page.evaluate("document.scripts.length") == 0
    assert page.evaluate("window.__xss") is None
    assert XSS in page.inner_text("body")


def test_contents_links_reach_their_sections(opened):
    targets = opened["page"].evaluate(
        "Array.from(document.querySelectorAll('nav a')).map(a => a.getAttribute('href'))"
    )
    missing = [t for t in targets if opened["page"].locator(t).count() != 1]
    assert targets and missing == []


def test_fits_a_laptop_screen(opened):
    page = opened["page"]
    assert page.evaluate("document.documentElement.scrollWidth") <= LAPTOP["width"]
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
