"""The monitor's pages in headless Chromium at a phone's width (390×844) and a desktop's: no page scrolls
sideways, the status table's span bars are on screen, rows expand to their details, a phone's rows name
their values (no header row there), and plotly's mode bar covers no title. The site is a real daphne on
a SQLite database seeded with crawls (with a gap in them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.local_swarm import SwarmProcess
from tests.conftest import ROOT, unavailable
from tests.test_monitor_snapshots import MODEL, peer

pytestmark = [pytest.mark.browser]

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}

# Crawls of two models, a restart gap in the middle, hostile and long peer-supplied text: what stretches
# a narrow page if anything can.
SEED = """
import time
from monitor.snapshots import write_snapshot
from monitor.targets import ModelTarget
from swarm.data_structures import ServerState
from tests.test_monitor_snapshots import MODEL, REACHABLE, UNREACHABLE, crawl_result, peer, span

BIG = ModelTarget("bigscience/bloom-petals", 70, "bigscience/bloom", "https://huggingface.co/bigscience/bloom")
now = time.time()
long_name = "a-very-long-public-name-without-any-spaces-at-all-" * 3
for age in (7200, 7140, 7080, 180, 120, 60, 0):
    write_snapshot(crawl_result(
        {
            MODEL: [
                span(peer("a"), 0, 4, public_name=long_name, version="2.3.0-" + "x" * 40, cache_tokens_left=8000,
                     adapters=("org/" + "lora" * 20,), next_pings={peer("b"): 0.01, peer("c"): float("inf")}),
                span(peer("b"), 4, 8, throughput=25.0),
                span(peer("c"), 0, 8, ServerState.JOINING),
            ],
            BIG: [span(peer("bloom"), 0, 35, public_name="half of bloom"), span(peer("d"), 35, 70)],
        },
        {peer("a"): REACHABLE, peer("b"): REACHABLE, peer("bloom"): REACHABLE, peer("d"): UNREACHABLE},
        started_at=now - age,
        bootstrap={peer("boot"): REACHABLE},
    ))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> str:
    """daphne serving the pages from a migrated, seeded SQLite database; stopped at the end."""
    tmp = tmp_path_factory.mktemp("monitor-phone")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DEBUG="1",
        PYTHONUNBUFFERED="1",
        DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}",
        VAR_DIR=str(tmp),
        ALLOWED_HOSTS="127.0.0.1 localhost",
        SWARM_INITIAL_PEERS="/ip4/127.0.0.1/tcp/31337/p2p/" + peer("boot"),
    )
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, cwd=ROOT, check=True, timeout=180)
    subprocess.run([*manage, "shell", "-c", SEED], env=env, cwd=ROOT, check=True, timeout=180)
    daphne = str(Path(sys.executable).parent / "daphne")
    argv = [daphne, "-e", "tcp:port=0:interface=127.0.0.1", "config.asgi:application"]
    server = SwarmProcess("daphne", argv, env, tmp / "daphne.log")
    try:
        line = server.wait_for_line(lambda line: "Listening on TCP address" in line, timeout=120)
        yield f"http://127.0.0.1:{line.rsplit(':', 1)[1].strip()}"
    finally:
        server.stop(timeout=15)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        unavailable("Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _open(browser, url: str, viewport: dict):
    page = browser.new_page(viewport=viewport, device_scale_factor=1)
    page.goto(url)
    return page


def _assert_no_sideways_scroll(page) -> None:
    widths = page.evaluate("[document.scrollingElement.scrollWidth, window.innerWidth]")
    if widths[0] > widths[1]:
        wide = page.evaluate(
            """() => Array.from(document.querySelectorAll('body *'))
                .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
                .slice(0, 5).map(e => e.tagName + '.' + e.className)"""
        )
        pytest.fail(f"{page.url}: scrollWidth {widths[0]} > innerWidth {widths[1]}; too wide: {wide}")


def _wait_for_charts(page, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {count}", timeout=30_000)


def _assert_titles_uncovered(page) -> None:
    assert page.locator(".modebar").count() == 0  # no tool bar over the titles
    for title in page.locator(".gtitle").all():
        box = title.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= page.viewport_size["width"] + 0.5


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_status_page_fits_and_shows_the_span_bars(site, browser, viewport):
    page = _open(browser, site + "/", viewport)
    try:
        bars = page.locator(f'section[data-dht-prefix="{MODEL.dht_prefix}"] tr.server .bar')
        bars.first.wait_for()
        _assert_no_sideways_scroll(page)
        assert bars.count() == 3
        for bar in bars.all():
            assert bar.is_visible()
            box = bar.bounding_box()
            assert box["width"] > 0 and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"]
        # A row expands to its details (pings to next servers, cache, adapters) without widening the page.
        row = page.locator(f'tr.server[data-peer-id="{peer("a")}"]')
        detail = row.locator("xpath=following-sibling::tr[1]")
        assert detail.is_hidden()
        row.locator("button.expand").click()
        assert detail.is_visible() and row.locator("button.expand").get_attribute("aria-expanded") == "true"
        assert "Pings to next servers" in detail.inner_text() and "8,000 tokens" in detail.inner_text()
        _assert_no_sideways_scroll(page)
        contribute = page.locator("#contribute pre.command").first
        assert contribute.is_visible() and "runblockserver" in contribute.inner_text()
        assert page.locator("#reachability").is_visible()
    finally:
        page.close()


# Each cell of a server row that shows a value: [its generated label (CSS ::before), its text].
CELL_LABELS = """(row) => Array.from(row.querySelectorAll('td'))
    .filter((td) => td.offsetParent !== null && !td.matches('.toggle, .blocks'))
    .map((td) => [getComputedStyle(td, '::before').content, td.textContent.trim()])"""


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_server_rows_name_their_values_where_the_header_is_hidden(site, browser, viewport):
    page = _open(browser, site + "/", viewport)
    try:
        row = page.locator(f'tr.server[data-peer-id="{peer("a")}"]')
        row.wait_for()
        cells = row.evaluate(CELL_LABELS)
        header = page.locator(f'section[data-dht-prefix="{MODEL.dht_prefix}"] table.servers thead')
        if viewport is PHONE:  # no header row: every value comes with its column's name
            assert header.is_hidden()
            labels = {label.strip('"'): text for label, text in cells}
            assert all(label not in ("none", "normal", "") for label, _ in cells), cells
            assert labels["Version"].startswith("2.3.0") and labels["Span"] == "0:4", labels
            assert {"Server", "Contributor", "Throughput, req/s", "Cache/block", "Adapters"} <= set(labels)
            _assert_no_sideways_scroll(page)
        else:  # the header names the columns: no labels repeated in the cells
            assert header.is_visible() and {label for label, _ in cells} == {"none"}, cells
    finally:
        page.close()


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_model_and_peer_pages_fit(site, browser, viewport):
    for path, charts in ((f"/models/{MODEL.dht_prefix}/", 5), ("/models/bigscience/bloom-petals/", 5),
                         (f"/peers/{peer('a')}/", 4)):  # fmt: skip
        page = _open(browser, site + path, viewport)
        try:
            _wait_for_charts(page, charts)
            _assert_no_sideways_scroll(page)
            _assert_titles_uncovered(page)
            for chart in page.locator("[data-chart]").all():
                box = chart.bounding_box()
                assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], path
        finally:
            page.close()
