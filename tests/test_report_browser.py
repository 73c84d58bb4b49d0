"""The report in a real browser: headless Chromium opens it from disk (file://).

Needs ``chromium`` and ``chromedriver`` on PATH (Debian: chromium, chromium-driver);
the fixture installs them with apt-get when it runs as root, and otherwise skips
these tests with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch.report import write_report
from tests.conftest import make_image
from tests.test_report import (
    MODERATION,
    XSS_PROMPT,
    completed,
    failed,
    run_batch,
    run_event,
    write_ledger,
)

ROWS = 10_000
EDITS_PER_IMAGE = 4
PAGE_GROUPS = 25  # the script's page size


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed with apt-get when missing and root."""

    def found() -> tuple[str | None, str | None]:
        return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which(
            "chromedriver"
        )

    binary, driver = found()
    if binary is None or driver is None:
        if os.geteuid() != 0:
            pytest.skip("chromium/chromedriver missing and not root to apt-get install them")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "chromium", "chromium-driver"],
        ):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                pytest.skip(f"could not install chromium: {' '.join(cmd)}: {exc}")
            if done.returncode != 0:
                pytest.skip(f"could not install chromium: {' '.join(cmd)}: {done.stderr[-400:]}")
        binary, driver = found()
        if binary is None or driver is None:
            pytest.skip("apt-get installed chromium but chromium/chromedriver are not on PATH")
    return binary, driver


@pytest.fixture(scope="session")
def browser(chromium, tmp_path_factory) -> Iterator[Any]:
    """One headless Chromium for the session, started without selenium-manager."""
    selenium = pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    binary, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,4000",  # tall: every lazy thumbnail of a small page is in view
        f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}",
    ):
        options.add_argument(flag)

    def no_manager(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("selenium-manager was asked to resolve (and maybe download) a driver")

    # selenium-manager is the part that goes to the network; prove it is never consulted.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeleniumManager, "binary_paths", no_manager)
        chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    assert selenium.__version__.startswith("4.")
    try:
        yield chrome
    finally:
        chrome.quit()


def wait_for(browser, script: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(script)
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def open_report(browser, report: Path) -> float:
    """Load the report; return the seconds until its first page of rows is on screen."""
    started = time.perf_counter()
    browser.get(report.resolve().as_uri())
    assert wait_for(browser, "return document.body.getAttribute('data-ready') === '1'", 10)
    return time.perf_counter() - started


def all_images_load(browser) -> list[str]:
    """Scroll every row image into view; return the src of those that did not render."""
    images = "[...document.querySelectorAll('#groups img')]"
    browser.execute_script(f"{images}.forEach(i => i.scrollIntoView())")
    wait_for(browser, f"return {images}.every(i => i.complete && i.naturalWidth > 0)")
    broken: list[str] = browser.execute_script(
        f"return {images}.filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src').slice(0, 80))"
    )
    return broken


def pager_text(browser) -> str:
    text: str = browser.execute_script("return document.getElementById('pager-top').innerText")
    return text


def big_report(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """10,000 rows on 2,500 inputs: some failures, NSFW flags, one unusual prompt; the first
    images exist on disk (thumbnails), the rest are missing (placeholders)."""
    out, inputs = tmp_path / "out", tmp_path / "in"
    events: list[dict[str, Any]] = [run_event(rows=ROWS)]
    counts = {"failed": 0, "nsfw": 0}
    for n in range(ROWS):
        row = f"row-{n:05d}"
        image = f"img-{n // EDITS_PER_IMAGE:04d}.png"
        where = {"image": image, "image_path": str(inputs / image)}
        if n % 97 == 5:
            counts["failed"] += 1
            events += failed(row, 1200, MODERATION, False, **where)
            continue
        flagged = n % 101 == 3
        counts["nsfw"] += flagged
        prompt = "a zebra on a unicycle" if n == 4242 else f"edit {n}: warmer light"
        events += completed(
            row, n % 600, prompt=prompt, nsfw=[flagged], sha256=[f"{n:064x}"],
            outputs=[f"{row}.png"], **where,
        )  # fmt: skip
        if n < 40:
            make_image(out / f"{row}.png", (n * 6, 90, 200 - n * 4), size=48)
            make_image(inputs / image, (200, n * 5, 60), size=48)
    write_ledger(out, events)
    return out, counts


def test_ten_thousand_rows_load_fast_and_search_filter_sort_and_lightbox_work(browser, tmp_path):
    """At 10k rows the page shows in under 3 s; search, filters, sort, pages and lightbox work."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    out, counts = big_report(tmp_path)
    started = time.perf_counter()
    report = write_report(out)
    generated = time.perf_counter() - started
    assert generated < 5, f"generating took {generated:.2f} s"

    load = open_report(browser, report)
    assert load < 3.0, f"the page took {load:.2f} s to show its rows"
    assert browser.execute_script("return window.wsbatchReady") < 3000
    groups = f"{ROWS // EDITS_PER_IMAGE} images"
    assert pager_text(browser).startswith(f"{ROWS} rows in {groups}")
    assert "page 1 of 100" in pager_text(browser)
    shown = browser.execute_script("return document.querySelectorAll('#groups .group').length")
    assert shown == PAGE_GROUPS
    # Failed rows come first; each carries its retry command.
    first = browser.find_element(By.CSS_SELECTOR, "#groups .edit")
    assert "failed" in first.get_attribute("class") and "--retry-failed" in first.text

    # Search by prompt narrows 10k rows to the one that matches.
    box = browser.find_element(By.ID, "q")
    box.send_keys("zebra")
    assert wait_for(browser, "return document.getElementById('pager-top').innerText"
                    ".startsWith('1 row in 1 image')")  # fmt: skip
    ids = browser.execute_script("return [...document.querySelectorAll('.edit')].map(e => e.id)")
    assert ids == ["row-row-04242"]
    # By file name too: an input's name finds its four edits.
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("img-0100.png")
    assert wait_for(browser, "return document.querySelectorAll('.edit').length === 4")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    assert wait_for(browser, f"return document.querySelectorAll('.group').length === {PAGE_GROUPS}")

    # A status filter shows failures alone; the NSFW filter the flagged rows alone.
    Select(browser.find_element(By.ID, "f-status")).select_by_value("failed")
    assert pager_text(browser).startswith(f"{counts['failed']} rows")
    classes = browser.execute_script(
        "return [...document.querySelectorAll('.edit')].map(e => e.className)"
    )
    assert classes and all("failed" in c for c in classes)
    Select(browser.find_element(By.ID, "f-status")).select_by_value("")
    Select(browser.find_element(By.ID, "f-nsfw")).select_by_value("1")
    assert pager_text(browser).startswith(f"{counts['nsfw']} rows")
    assert browser.execute_script("return document.querySelectorAll('.edit .tile.nsfw').length")
    Select(browser.find_element(By.ID, "f-nsfw")).select_by_value("")

    # Sorting: slowest first puts a 599 s row at the top (latencies are n % 600 s).
    Select(browser.find_element(By.ID, "sort")).select_by_value("slow")
    assert "latency 599.0 s" in browser.find_element(By.CSS_SELECTOR, "#groups .edit").text
    Select(browser.find_element(By.ID, "sort")).select_by_value("id")
    assert browser.find_element(By.CSS_SELECTOR, "#groups .edit").get_attribute("id") == (
        "row-row-00000"
    )
    # Pages: the next one shows the next groups.
    browser.find_element(By.CSS_SELECTOR, "#pager-top .next").click()
    assert "page 2 of 100" in pager_text(browser)
    browser.find_element(By.CSS_SELECTOR, "#pager-top .prev").click()

    # The lightbox opens on a thumbnail, steps with the arrow keys and closes on Escape.
    tile = browser.find_element(By.CSS_SELECTOR, "#groups .edit .tile[data-lb]")
    tile.click()
    assert wait_for(browser, "return !document.getElementById('lightbox').hidden")
    assert wait_for(browser, "const i = document.querySelector('#lightbox img');"
                    "return i.complete && i.naturalWidth > 0")  # fmt: skip
    caption = browser.find_element(By.CSS_SELECTOR, "#lightbox figcaption").text
    assert caption.startswith("row-00000")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    moved = "return document.querySelector('#lightbox figcaption').textContent !== "
    assert wait_for(browser, moved + json.dumps(caption))
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert wait_for(browser, "return document.getElementById('lightbox').hidden")


def test_report_of_a_real_run_renders_in_headless_chromium(
    browser, emulator, images, write_manifest, cli, tmp_path
):
    """Opened from disk, every thumbnail loads, prompts are text, bars and hints are drawn."""
    out = run_batch(emulator, images, write_manifest, cli, tmp_path)
    open_report(browser, write_report(out))
    broken = all_images_load(browser)
    assert not broken, f"images that did not render: {broken}"
    assert (
        browser.execute_script("return document.querySelectorAll('#groups img').length") == 14
    )  # 4 inputs, 10 outputs

    prompt = browser.execute_script(
        "const p = document.querySelector('#row-row-0002 .prompt');"
        "return {text: p.textContent, children: p.children.length};"
    )
    assert prompt == {"text": XSS_PROMPT, "children": 0}
    assert browser.execute_script("return window.__xss === undefined")
    assert browser.execute_script("return document.scripts.length") == 2  # data + ours

    bars = browser.execute_script(
        "return [...document.querySelectorAll('svg.hist rect.bar')].map(r => r.getBBox().height);"
    )
    assert bars and all(h > 0 for h in bars)
    failure = browser.execute_script("return document.querySelector('.causes').innerText")
    assert MODERATION in failure and "--retry-failed" in failure
    # "show these rows" filters the rows to that cause.
    browser.execute_script("document.querySelector('button[data-cause]').click()")
    ids = browser.execute_script("return [...document.querySelectorAll('.edit')].map(e => e.id)")
    assert ids == ["row-row-0000"]
    # A #row- link shows that row even when a filter hides it.
    browser.execute_script("location.hash = '#row-row-0003'")
    assert wait_for(browser, "return !!document.getElementById('row-row-0003')")


def test_self_contained_report_shows_its_thumbnails_alone(
    browser, emulator, images, write_manifest, cli, tmp_path
):
    """A --self-contained report moved away from its folder still shows every thumbnail."""
    out = run_batch(emulator, images, write_manifest, cli, tmp_path)
    mailed = tmp_path / "mail" / "report.html"
    mailed.parent.mkdir()
    shutil.copy(write_report(out, self_contained=True), mailed)
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "images")
    open_report(browser, mailed)
    broken = all_images_load(browser)
    assert not broken, f"images that did not render: {broken}"
    assert browser.execute_script("return document.querySelectorAll('#groups img').length") == 14
    # The lightbox falls back to the thumbnail when the full-size file is not there.
    browser.execute_script("document.querySelector('#groups .edit [data-lb]').click()")
    assert wait_for(browser, "const i = document.querySelector('#lightbox img');"
                    "return i.complete && i.naturalWidth > 0")  # fmt: skip
