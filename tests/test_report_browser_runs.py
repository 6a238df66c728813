"""A training run's report and a comparison of two runs in headless Chromium (issue 17): the
loss curve is drawn, the verdict timeline and the contents work, nothing is logged as an
error and no request leaves the page. Same browser set-up as test_report_browser.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_compare import BLOW_STEP, BLOWN
from test_report_browser import chromium

import flowscope as fs

DECODED = (
    "Array.from(document.images).filter(i => i.alt.startsWith(%r))"
    ".map(i => i.decode().then(() => [i.naturalWidth, i.getBoundingClientRect().height]))"
)


@pytest.fixture(scope="module")
def runs(compare_runs: tuple[Path, Path]) -> tuple[Path, Path]:
    return compare_runs  # trained once per session (conftest)


@pytest.fixture(scope="module")
def pages(runs, tmp_path_factory) -> Iterator[dict[str, dict[str, Any]]]:
    """The blown run's report and the comparison healthy -> blown, opened in Chromium."""
    out = tmp_path_factory.mktemp("cmp")
    fs.compare(*runs, out=out)
    with chromium() as open_page:
        yield {
            "run_page": open_page(fs.report(runs[1]), "run-report.png"),
            "compare_page": open_page(out / "compare.html", "compare.png"),
        }


@pytest.fixture
def run_page(pages):
    return pages["run_page"]


@pytest.fixture
def compare_page(pages):
    return pages["compare_page"]


def _images(page: Any, alt: str) -> list[list[float]]:
    return page.evaluate(f"Promise.all({DECODED % alt})")


@pytest.mark.parametrize("which", ["run_page", "compare_page"])
def test_no_console_errors_and_nothing_leaves(which, request):
    seen = request.getfixturevalue(which)
    assert seen["errors"] == [] and seen["outside"] == []
    assert {url.split(":", 1)[0] for url in seen["requests"]} <= {"file", "data"}


@pytest.mark.parametrize("which", ["run_page", "compare_page"])
def test_the_loss_curve_is_drawn(which, request):
    page = request.getfixturevalue(which)["page"]
    loss = _images(page, "Loss over the steps")
    assert len(loss) == 1 and loss[0][0] > 100 and loss[0][1] > 50  # decoded and laid out
    every = page.evaluate(
        "Promise.all(Array.from(document.images).map(i => i.decode().then(() => i.naturalWidth)))"
    )
    assert every and all(w > 0 for w in every)


@pytest.mark.parametrize("which", ["run_page", "compare_page"])
def test_contents_links_reach_their_sections(which, request):
    page = request.getfixturevalue(which)["page"]
    targets = page.evaluate(
        "Array.from(document.querySelectorAll('nav a')).map(a => a.getAttribute('href'))"
    )
    assert targets and [t for t in targets if page.locator(t).count() != 1] == []


def test_the_run_report_shows_when_the_layer_exploded(run_page):
    page = run_page["page"]
    page.click("nav a[href='#timeline']")
    text = page.inner_text("#timeline ~ div.timeline")
    assert f"from step {BLOW_STEP} in '{BLOWN}' (Linear)" in text
    assert page.evaluate("window.scrollY") > 0  # the link moved the page to the section


def test_the_compare_report_calls_out_the_new_problem(compare_page):
    page = compare_page["page"]
    rows = page.locator("#new ~ table.findings").first.inner_text()
    assert "exploding" in rows and f"\t{BLOWN}\t" in rows
    assert page.locator(".glance .tile").count() == 3
